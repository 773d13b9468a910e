//! The guest kernel source: Debian's tarball pinned by `kernel-config/source.toml`, checked
//! against its sha256 and unpacked once; or a user's Linux tree given with `--kernel-source`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `kernel-config/source.toml`: which Debian package and tarball the kernel is built from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Debian package that installs the tarball, e.g. `linux-source-6.12`.
    pub package: String,
    /// The package version the pin was taken from (`dpkg-query -W`).
    pub debian_version: String,
    /// The kernel version in the tarball's Makefile, e.g. `6.12.117`.
    pub upstream_version: String,
    /// Where the package puts the tarball.
    pub tarball: PathBuf,
    /// Lowercase hex sha256 of the tarball.
    pub sha256: String,
}

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
        Ok(pin)
    }

    /// Hashes the installed tarball and fails, explaining how to update the pin, when it is
    /// not the pinned one. Returns the hash.
    pub fn verify(&self, memo: &Path) -> Result<String> {
        let actual = sha256_file_memo(&self.tarball, memo)?;
        if actual.eq_ignore_ascii_case(&self.sha256) {
            return Ok(actual);
        }
        let installed = installed_version(&self.package)
            .unwrap_or_else(|| "unknown (dpkg-query failed)".to_owned());
        bail!(
            "{tarball} does not match the pin in kernel-config/source.toml: the Debian package \
             {package} changed (installed {installed}, pinned {pinned}).\n  tarball sha256: \
             {actual}\n  pinned sha256:  {expected}\nTo move to the new version, review its \
             changelog, then set debian_version = \"{installed}\", upstream_version (the \
             VERSION.PATCHLEVEL.SUBLEVEL in the tarball's Makefile) and sha256 = \"{actual}\" \
             in kernel-config/source.toml, and rebuild.",
            tarball = self.tarball.display(),
            package = self.package,
            pinned = self.debian_version,
            expected = self.sha256,
        )
    }

    /// Unpacks the tarball under `build_dir` unless the tree there came from `sha256`;
    /// returns the source directory. A new tarball also discards `stale_objects`.
    pub fn unpack(&self, sha256: &str, build_dir: &Path, stale_objects: &Path) -> Result<PathBuf> {
        let tree = build_dir.join(&self.package);
        let marker = build_dir.join(format!("{}.unpacked", self.package));
        if tree.is_dir() && fs::read_to_string(&marker).is_ok_and(|m| m.trim() == sha256) {
            return Ok(tree);
        }
        println!("build-guest: unpacking {}", self.tarball.display());
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
            version == self.upstream_version,
            "{} contains Linux {version}, but kernel-config/source.toml pins {}",
            self.tarball.display(),
            self.upstream_version
        );
        fs::write(&marker, sha256).context("cannot write the unpack marker")?;
        Ok(tree)
    }
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
        assert!(pin.upstream_version.starts_with("6.12."));
    }

    #[test]
    fn pin_rejects_bad_hash_and_unknown_fields() {
        let good = "package = \"p\"\ndebian_version = \"1\"\nupstream_version = \"6.12.1\"\n\
                    tarball = \"/x.tar.xz\"\n";
        let hash = "a".repeat(64);
        assert!(Pin::parse(&format!("{good}sha256 = \"{hash}\"\n")).is_ok());
        assert!(Pin::parse(&format!("{good}sha256 = \"abc\"\n")).is_err());
        assert!(Pin::parse(&format!("{good}sha256 = \"{hash}\"\nextra = 1\n")).is_err());
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
            debian_version: "1.0-1".into(),
            upstream_version: "6.12.7".into(),
            tarball: tarball.to_path_buf(),
            sha256: sha256.into(),
        }
    }

    #[test]
    fn mismatch_explains_how_to_update_the_pin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tarball = dir.path().join("linux.tar.xz");
        fs::write(&tarball, b"not the pinned tarball").expect("write");
        let pin = pin_for(&tarball, &"0".repeat(64));
        let message = pin
            .verify(&dir.path().join("memo"))
            .expect_err("hash differs")
            .to_string();
        assert!(
            message.contains("package linux-source-test changed"),
            "{message}"
        );
        assert!(
            message.contains(&sha256_hex(b"not the pinned tarball")),
            "{message}"
        );
        assert!(message.contains("kernel-config/source.toml"), "{message}");
        let good = pin_for(&tarball, &sha256_hex(b"not the pinned tarball"));
        assert!(good.verify(&dir.path().join("memo")).is_ok());
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

        let tree = pin.unpack(&sha, &build, &objects).expect("unpack");
        assert_eq!(tree_version(&tree).expect("version"), "6.12.7");
        assert!(!objects.exists(), "objects of another tree must go");
        // Unchanged tarball: the tree is reused, so a file added to it survives.
        fs::write(tree.join("built-here"), b"").expect("write");
        pin.unpack(&sha, &build, &objects).expect("second unpack");
        assert!(tree.join("built-here").exists());
        // A different tarball hash unpacks afresh.
        pin.unpack(&"f".repeat(64), &build, &objects)
            .expect("new tarball");
        assert!(!tree.join("built-here").exists());

        let wrong = Pin {
            upstream_version: "6.12.8".into(),
            ..pin
        };
        let error = wrong
            .unpack("other", &build, &objects)
            .expect_err("version");
        assert!(error.to_string().contains("pins 6.12.8"), "{error}");
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
