//! The guest kernel source: Debian's `linux-source-X.Y` tarball of the LTS series named in
//! `kernel-config/source.toml`, or a user's Linux tree given with `--kernel-source`.
//!
//! Debian's security archive serves only the newest revision of a series, so an exact pin
//! cannot be installed once Debian moves on. apt already authenticates the package (signed
//! Release files, package checksums), so by default any revision of the pinned series is
//! accepted and the one used is recorded; `--locked` insists on the exact pin (reproducible
//! builds) and `--update-pin` rewrites the pin to what is installed. A series change
//! (6.12 -> 6.18) stays a deliberate edit of the pin file.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `kernel-config/source.toml`: which Debian package, series and tarball the kernel is built
/// from, and the revision last recorded.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Debian package that installs the tarball, e.g. `linux-source-6.12`.
    pub package: String,
    /// The LTS series every accepted revision belongs to, e.g. `6.12`.
    pub series: String,
    /// The package version recorded last (`dpkg-query -W`).
    pub debian_version: String,
    /// The kernel version in that tarball's Makefile, e.g. `6.12.117`.
    pub upstream_version: String,
    /// Where the package puts the tarball.
    pub tarball: PathBuf,
    /// Lowercase hex sha256 of the recorded tarball.
    pub sha256: String,
}

/// The tarball actually installed: what a build used and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Debian package name.
    pub package: String,
    /// The installed package version, e.g. `6.12.118-1~deb12u1`.
    pub debian_version: String,
    /// The upstream kernel version of that package, e.g. `6.12.118`.
    pub upstream_version: String,
    /// Lowercase hex sha256 of the tarball.
    pub sha256: String,
}

/// The text written by `--update-pin` before the fields.
const PIN_HEADER: &str = "\
# The guest kernel source: Debian's linux-source package (Linux LTS plus Debian's fixes).
# `cargo xtask build-guest` accepts any installed revision of `series` (apt authenticates
# the package) and records the one it used; `--locked` refuses a tarball that is not the one
# below, and `--update-pin` rewrites this file to the installed revision. Changing the
# series (package, series, tarball) is a deliberate edit: check the config fragment builds.
";

impl Pin {
    /// Reads and parses the pin file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad pin file {}", path.display()))
    }

    fn parse(text: &str) -> Result<Self> {
        let pin: Self = toml::from_str(text)?;
        ensure!(
            pin.sha256.len() == 64 && pin.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
            "sha256 must be 64 hex digits"
        );
        ensure!(
            in_series(&pin.upstream_version, &pin.series),
            "upstream_version {} is not of series {}",
            pin.upstream_version,
            pin.series
        );
        Ok(pin)
    }

    /// Identifies the installed tarball: its package version (dpkg), the upstream version
    /// that implies, and its sha256 (memoised in `memo`). Fails when it is not of the series.
    pub fn installed(&self, memo: &Path) -> Result<Installed> {
        let sha256 = sha256_file_memo(&self.tarball, memo)?;
        let debian_version = installed_version(&self.package).with_context(|| {
            format!(
                "{} exists but dpkg does not list {} as installed",
                self.tarball.display(),
                self.package
            )
        })?;
        self.identify(&debian_version, sha256)
    }

    fn identify(&self, debian_version: &str, sha256: String) -> Result<Installed> {
        let upstream_version = upstream_of(debian_version)
            .with_context(|| format!("cannot read a kernel version from {debian_version}"))?;
        ensure!(
            in_series(&upstream_version, &self.series),
            "installed {} {debian_version} is Linux {upstream_version}, not of the series {} \
             in kernel-config/source.toml (a series change is a deliberate edit of that file)",
            self.package,
            self.series
        );
        Ok(Installed {
            package: self.package.clone(),
            debian_version: debian_version.to_owned(),
            upstream_version,
            sha256,
        })
    }

    /// True when `installed` is exactly the recorded tarball.
    pub fn matches(&self, installed: &Installed) -> bool {
        installed.sha256.eq_ignore_ascii_case(&self.sha256)
    }

    /// `--locked`: fails in one line naming both versions unless `installed` is the pin.
    pub fn check_locked(&self, installed: &Installed) -> Result<()> {
        if self.matches(installed) {
            return Ok(());
        }
        bail!(
            "--locked: installed {package} {installed_version} (sha256 {installed_sha}) is not \
             the pinned {pinned_version} (sha256 {pinned_sha}) of kernel-config/source.toml; \
             record it with `cargo xtask build-guest --update-pin`",
            package = self.package,
            installed_version = installed.debian_version,
            installed_sha = short(&installed.sha256),
            pinned_version = self.debian_version,
            pinned_sha = short(&self.sha256),
        )
    }

    /// The pin recording `installed` (same package, series and tarball path).
    pub fn updated(&self, installed: &Installed) -> Self {
        Self {
            debian_version: installed.debian_version.clone(),
            upstream_version: installed.upstream_version.clone(),
            sha256: installed.sha256.clone(),
            ..self.clone()
        }
    }

    /// Writes the pin file (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!("{PIN_HEADER}{}", toml::to_string(self)?);
        let partial = path.with_extension("toml.partial");
        fs::write(&partial, text).with_context(|| format!("cannot write {}", partial.display()))?;
        fs::rename(&partial, path).with_context(|| format!("cannot replace {}", path.display()))
    }

    /// Unpacks the tarball under `build_dir` unless the tree there came from `installed`;
    /// returns the source directory. A new tarball also discards `stale_objects`.
    pub fn unpack(
        &self,
        installed: &Installed,
        build_dir: &Path,
        stale_objects: &Path,
    ) -> Result<PathBuf> {
        let tree = build_dir.join(&self.package);
        let marker = build_dir.join(format!("{}.unpacked", self.package));
        let sha256 = installed.sha256.as_str();
        if tree.is_dir() && fs::read_to_string(&marker).is_ok_and(|m| m.trim() == sha256) {
            return Ok(tree);
        }
        println!("build-guest: unpacking {}", self.tarball.display());
        let _ = fs::remove_file(&marker);
        let scratch = build_dir.join("unpack.tmp");
        for stale in [tree.as_path(), scratch.as_path(), stale_objects] {
            if stale.exists() {
                fs::remove_dir_all(stale)
                    .with_context(|| format!("cannot remove {}", stale.display()))?;
            }
        }
        fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        super::run_command(
            Command::new("tar")
                .arg("-xJf")
                .arg(&self.tarball)
                .arg("-C")
                .arg(&scratch),
        )?;
        let unpacked = scratch.join(&self.package);
        ensure!(
            unpacked.is_dir(),
            "{} has no top-level {}/ directory",
            self.tarball.display(),
            self.package
        );
        fs::rename(&unpacked, &tree).context("cannot move the unpacked tree into place")?;
        fs::remove_dir_all(&scratch).context("cannot remove the unpack scratch directory")?;
        let version = tree_version(&tree)?;
        ensure!(
            version == installed.upstream_version,
            "{} contains Linux {version}, but its package {} {} says {}",
            self.tarball.display(),
            self.package,
            installed.debian_version,
            installed.upstream_version
        );
        fs::write(&marker, sha256).context("cannot write the unpack marker")?;
        Ok(tree)
    }
}

/// The upstream kernel version of a Debian package version: `6.12.118-1~deb12u1` (an epoch
/// `N:` would come first) gives `6.12.118`.
fn upstream_of(debian_version: &str) -> Option<String> {
    let without_epoch = debian_version
        .split_once(':')
        .map_or(debian_version, |(_, rest)| rest);
    let upstream = without_epoch.split('-').next()?;
    let numeric = !upstream.is_empty()
        && upstream.split('.').count() >= 2
        && upstream
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    numeric.then(|| upstream.to_owned())
}

/// True when `version` (e.g. `6.12.118`) is `series` (e.g. `6.12`) or one of its revisions.
fn in_series(version: &str, series: &str) -> bool {
    version == series
        || version
            .strip_prefix(series)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The first 12 hex digits of a hash, for messages.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The release of a Linux tree from its top-level Makefile: `VERSION.PATCHLEVEL.SUBLEVEL`
/// plus `EXTRAVERSION`.
pub fn tree_version(tree: &Path) -> Result<String> {
    let path = tree.join("Makefile");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    makefile_version(&text).with_context(|| format!("{} is not a Linux tree", tree.display()))
}

fn makefile_version(makefile: &str) -> Result<String> {
    let field = |name: &str| {
        makefile.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    let number = |name: &str| {
        field(name)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .with_context(|| format!("no numeric {name} in the Makefile"))
    };
    let extra = field("EXTRAVERSION").unwrap_or_default();
    Ok(format!(
        "{}.{}.{}{extra}",
        number("VERSION")?,
        number("PATCHLEVEL")?,
        number("SUBLEVEL")?
    ))
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes a file, reusing the hash in `memo` while the file's size, mtime and inode are
/// unchanged (hashing 150 MB takes seconds; a no-op rebuild should not).
fn sha256_file_memo(path: &Path, memo: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| {
        format!(
            "cannot stat {} (is the source package installed?)",
            path.display()
        )
    })?;
    let identity = format!(
        "{} {} {}.{}",
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    if let Ok(text) = fs::read_to_string(memo) {
        if let Some((known, hash)) = text.trim().rsplit_once(' ') {
            if known == identity {
                return Ok(hash.to_owned());
            }
        }
    }
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    let hash = hex(&hasher.finalize());
    fs::write(memo, format!("{identity} {hash}\n"))
        .with_context(|| format!("cannot write {}", memo.display()))?;
    Ok(hash)
}

fn installed_version(package: &str) -> Option<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()?;
    let version = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !version.is_empty()).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_pin_parses() {
        let pin = Pin::parse(include_str!("../../../kernel-config/source.toml")).expect("pin");
        assert_eq!(pin.package, "linux-source-6.12");
        assert_eq!(pin.series, "6.12");
        assert!(pin.upstream_version.starts_with("6.12."));
    }

    const GOOD: &str = "package = \"p\"\nseries = \"6.12\"\ndebian_version = \"1\"\n\
                        upstream_version = \"6.12.1\"\ntarball = \"/x.tar.xz\"\n";

    #[test]
    fn pin_rejects_bad_hash_unknown_fields_and_other_series() {
        let hash = "a".repeat(64);
        assert!(Pin::parse(&format!("{GOOD}sha256 = \"{hash}\"\n")).is_ok());
        assert!(Pin::parse(&format!("{GOOD}sha256 = \"abc\"\n")).is_err());
        assert!(Pin::parse(&format!("{GOOD}sha256 = \"{hash}\"\nextra = 1\n")).is_err());
        let other = GOOD.replace("6.12.1\"", "6.18.1\"");
        assert!(Pin::parse(&format!("{other}sha256 = \"{hash}\"\n")).is_err());
    }

    #[test]
    fn upstream_versions_come_from_debian_versions() {
        assert_eq!(
            upstream_of("6.12.118-1~deb12u1").as_deref(),
            Some("6.12.118")
        );
        assert_eq!(upstream_of("1:6.12.5-2").as_deref(), Some("6.12.5"));
        assert_eq!(upstream_of("6.12-1").as_deref(), Some("6.12"));
        assert_eq!(upstream_of("6.12.x-1"), None);
        assert_eq!(upstream_of("6-1"), None);
        assert_eq!(upstream_of(""), None);
    }

    #[test]
    fn series_membership_is_by_whole_components() {
        assert!(in_series("6.12.118", "6.12"));
        assert!(in_series("6.12", "6.12"));
        assert!(!in_series("6.120.1", "6.12"));
        assert!(!in_series("6.18.2", "6.12"));
    }

    #[test]
    fn makefile_version_with_and_without_extraversion() {
        let makefile = "# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\nEXTRAVERSION =\n";
        assert_eq!(makefile_version(makefile).expect("version"), "6.12.117");
        let rc = "VERSION = 6\nPATCHLEVEL = 13\nSUBLEVEL = 0\nEXTRAVERSION = -rc1\n";
        assert_eq!(makefile_version(rc).expect("version"), "6.13.0-rc1");
        assert!(makefile_version("all:\n\techo hi\n").is_err());
    }

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn pin_for(tarball: &Path, sha256: &str) -> Pin {
        Pin {
            package: "linux-source-test".into(),
            series: "6.12".into(),
            debian_version: "6.12.7-1".into(),
            upstream_version: "6.12.7".into(),
            tarball: tarball.to_path_buf(),
            sha256: sha256.into(),
        }
    }

    #[test]
    fn another_revision_of_the_series_is_accepted_but_not_when_locked() {
        let pin = pin_for(Path::new("/x.tar.xz"), &"0".repeat(64));
        let newer = pin
            .identify("6.12.9-1~deb12u1", "b".repeat(64))
            .expect("same series");
        assert_eq!(newer.upstream_version, "6.12.9");
        assert!(!pin.matches(&newer));
        let message = pin.check_locked(&newer).expect_err("locked").to_string();
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(message.contains("6.12.9-1~deb12u1"), "{message}");
        assert!(message.contains("6.12.7-1"), "{message}");
        assert!(message.contains("--update-pin"), "{message}");
        let updated = pin.updated(&newer);
        assert!(updated.check_locked(&newer).is_ok());
        assert_eq!(updated.debian_version, "6.12.9-1~deb12u1");
        assert_eq!(updated.upstream_version, "6.12.9");
        assert_eq!(updated.sha256, "b".repeat(64));
        let error = pin
            .identify("6.18.1-1", "c".repeat(64))
            .expect_err("series");
        assert!(error.to_string().contains("series 6.12"), "{error}");
    }

    #[test]
    fn an_updated_pin_round_trips_through_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("source.toml");
        let pin = pin_for(Path::new("/usr/src/x.tar.xz"), &"d".repeat(64));
        pin.save(&path).expect("save");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# The guest kernel source"), "{text}");
        assert_eq!(Pin::load(&path).expect("load"), pin);
        assert!(!path.with_extension("toml.partial").exists());
    }

    fn installed_for(pin: &Pin, sha256: &str) -> Installed {
        Installed {
            package: pin.package.clone(),
            debian_version: pin.debian_version.clone(),
            upstream_version: pin.upstream_version.clone(),
            sha256: sha256.into(),
        }
    }

    #[test]
    fn unpacks_once_and_checks_the_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let staging = dir.path().join("staging/linux-source-test");
        fs::create_dir_all(&staging).expect("mkdir");
        let makefile = "VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 7\nEXTRAVERSION =\n";
        fs::write(staging.join("Makefile"), makefile).expect("write");
        let tarball = dir.path().join("linux.tar.xz");
        let packed = Command::new("tar")
            .arg("-cJf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir.path().join("staging"))
            .arg("linux-source-test")
            .status()
            .expect("run tar");
        assert!(packed.success());
        let (build, objects) = (dir.path().join("build"), dir.path().join("build/obj"));
        fs::create_dir_all(&objects).expect("mkdir");
        let sha = sha256_hex(&fs::read(&tarball).expect("read"));
        let pin = pin_for(&tarball, &sha);
        let installed = installed_for(&pin, &sha);

        let tree = pin.unpack(&installed, &build, &objects).expect("unpack");
        assert_eq!(tree_version(&tree).expect("version"), "6.12.7");
        assert!(!objects.exists(), "objects of another tree must go");
        // Unchanged tarball: the tree is reused, so a file added to it survives.
        fs::write(tree.join("built-here"), b"").expect("write");
        pin.unpack(&installed, &build, &objects)
            .expect("second unpack");
        assert!(tree.join("built-here").exists());
        // A different tarball hash unpacks afresh.
        let other = installed_for(&pin, &"f".repeat(64));
        pin.unpack(&other, &build, &objects).expect("new tarball");
        assert!(!tree.join("built-here").exists());

        let wrong = Installed {
            upstream_version: "6.12.8".into(),
            sha256: "e".repeat(64),
            ..installed
        };
        let error = pin.unpack(&wrong, &build, &objects).expect_err("version");
        assert!(error.to_string().contains("says 6.12.8"), "{error}");
    }

    #[test]
    fn file_hash_is_memoised_by_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, memo) = (dir.path().join("f"), dir.path().join("memo"));
        fs::write(&file, b"abc").expect("write");
        let first = sha256_file_memo(&file, &memo).expect("hash");
        assert_eq!(first, sha256_hex(b"abc"));
        // A memo for this identity is trusted: prove it by planting a different hash.
        let text = fs::read_to_string(&memo).expect("memo");
        let (identity, _) = text.trim().rsplit_once(' ').expect("memo format");
        fs::write(&memo, format!("{identity} planted\n")).expect("plant");
        assert_eq!(sha256_file_memo(&file, &memo).expect("hash"), "planted");
        // Changing the file changes its size, so it is hashed again.
        fs::write(&file, b"abcd").expect("rewrite");
        assert_eq!(
            sha256_file_memo(&file, &memo).expect("hash"),
            sha256_hex(b"abcd")
        );
    }
}
