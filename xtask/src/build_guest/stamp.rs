//! The kernel's build stamp: a key over everything the vmlinux depends on (source identity,
//! the requested options, the host toolchain, the build recipe) and a record of the source
//! it was built from, written as `vmlinux.stamp` beside the artifact. A rerun with the same
//! key skips the kernel entirely instead of waiting for a no-op `make`, the user cache
//! (`super::cache`) is indexed by it, and katalite's build script reads the record for
//! `katalite --version`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::kconfig::Config;
use super::source::{sha256_hex, short, Installed};

/// Names the steps of `kernel::build`; change it when they change so old stamps go stale.
const RECIPE: &str = "v1: make ARCH=x86_64 tinyconfig, overlay, olddefconfig, vmlinux, strip";

/// Where a kernel's source came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum KernelSource {
    /// A Debian `linux-source-X.Y` tarball.
    Debian {
        package: String,
        debian_version: String,
        upstream_version: String,
        tarball_sha256: String,
    },
    /// A user's Linux tree (`--kernel-source`).
    Tree {
        path: PathBuf,
        upstream_version: String,
    },
}

impl KernelSource {
    /// The source of a build from Debian's tarball.
    pub fn debian(installed: &Installed) -> Self {
        Self::Debian {
            package: installed.package.clone(),
            debian_version: installed.debian_version.clone(),
            upstream_version: installed.upstream_version.clone(),
            tarball_sha256: installed.sha256.clone(),
        }
    }

    /// One line for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Debian {
                package,
                debian_version,
                upstream_version,
                tarball_sha256,
            } => format!(
                "Debian {package} {debian_version} (Linux {upstream_version}, tarball sha256 \
                 {})",
                short(tarball_sha256)
            ),
            Self::Tree {
                path,
                upstream_version,
            } => format!("tree {} (Linux {upstream_version})", path.display()),
        }
    }

    /// What identifies the source's content in the key. A tree is named only by its path
    /// and version, which its content may outgrow: its kernels stay out of the user cache.
    fn identity(&self) -> String {
        match self {
            Self::Debian {
                package,
                upstream_version,
                tarball_sha256,
                ..
            } => format!("debian {package} {upstream_version} {tarball_sha256}"),
            Self::Tree {
                path,
                upstream_version,
            } => format!("tree {} {upstream_version}", path.display()),
        }
    }

    /// True when the content is fully identified by `identity` (safe to share across clones).
    pub fn is_content_addressed(&self) -> bool {
        matches!(self, Self::Debian { .. })
    }
}

/// `vmlinux.stamp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stamp {
    /// The key the vmlinux was built for.
    pub key: String,
    /// The first line of each host tool's `--version` that went into the key.
    pub toolchain: Vec<String>,
    /// What it was built from.
    pub source: KernelSource,
}

impl Stamp {
    /// The stamp of a kernel built from `source` with the options `request` by `toolchain`.
    /// Options are hashed in their rendered form, so editing a comment in a fragment does
    /// not force a rebuild.
    pub fn new(source: KernelSource, request: &Config, toolchain: Vec<String>) -> Self {
        let text = format!(
            "{RECIPE}\nsource {}\ntoolchain {}\n{}",
            source.identity(),
            toolchain.join("\n"),
            request.render()
        );
        Self {
            key: sha256_hex(text.as_bytes()),
            toolchain,
            source,
        }
    }

    /// Reads a stamp; `None` when it is missing or unreadable (an old or broken stamp only
    /// means "rebuild").
    pub fn read(path: &Path) -> Option<Self> {
        toml::from_str(&fs::read_to_string(path).ok()?).ok()
    }

    /// True when `stamp` records this key and `artifact` exists.
    pub fn is_fresh(&self, stamp: &Path, artifact: &Path) -> bool {
        artifact.is_file() && Self::read(stamp).is_some_and(|found| found.key == self.key)
    }

    /// Writes the stamp (through a temporary file and a rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# written by `cargo xtask build-guest`; katalite's build script reads it\n{}",
            toml::to_string(self)?
        );
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        fs::write(&partial, text).with_context(|| format!("cannot write {}", partial.display()))?;
        fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The host tools a kernel build runs, by the first line of their `--version`: a compiler
/// or binutils update may change the code, so it is part of the key.
pub fn toolchain() -> Result<Vec<String>> {
    ["gcc", "ld", "make", "strip"]
        .into_iter()
        .map(|tool| {
            let output = Command::new(tool)
                .arg("--version")
                .output()
                .with_context(|| format!("cannot run {tool} --version"))?;
            let text = String::from_utf8_lossy(&output.stdout);
            Ok(text.lines().next().unwrap_or(tool).trim().to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).expect("valid fragment")
    }

    fn debian(sha: &str) -> KernelSource {
        KernelSource::Debian {
            package: "linux-source-6.12".into(),
            debian_version: "6.12.118-1~deb12u1".into(),
            upstream_version: "6.12.118".into(),
            tarball_sha256: sha.repeat(32),
        }
    }

    fn key(source: KernelSource, request: &Config) -> String {
        Stamp::new(source, request, vec!["gcc 12".into()]).key
    }

    #[test]
    fn key_follows_the_fragment_values_only() {
        let base = key(debian("aa"), &config("CONFIG_SMP=y\n"));
        let commented = key(debian("aa"), &config("# Platform: why\nCONFIG_SMP=y\n\n"));
        assert_eq!(base, commented);
        let changed = key(debian("aa"), &config("# CONFIG_SMP is not set\n"));
        assert_ne!(base, changed);
        let added = key(debian("aa"), &config("CONFIG_SMP=y\nCONFIG_PVH=y\n"));
        assert_ne!(base, added);
    }

    #[test]
    fn key_follows_the_source_and_the_toolchain() {
        let request = config("CONFIG_SMP=y\n");
        assert_ne!(key(debian("aa"), &request), key(debian("bb"), &request));
        let tree = |path: &str| KernelSource::Tree {
            path: path.into(),
            upstream_version: "6.12.0".into(),
        };
        assert_ne!(key(tree("/a"), &request), key(tree("/b"), &request));
        let newer_gcc = Stamp::new(debian("aa"), &request, vec!["gcc 13".into()]).key;
        assert_ne!(key(debian("aa"), &request), newer_gcc);
    }

    #[test]
    fn the_stamp_records_the_source_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmlinux.stamp");
        let stamp = Stamp::new(debian("ab"), &config("CONFIG_SMP=y\n"), vec!["gcc".into()]);
        stamp.write(&path).expect("write");
        let text = fs::read_to_string(&path).expect("read");
        assert!(
            text.contains("debian_version = \"6.12.118-1~deb12u1\""),
            "{text}"
        );
        assert!(text.contains("upstream_version = \"6.12.118\""), "{text}");
        assert!(text.contains(&"ab".repeat(32)), "{text}");
        assert_eq!(Stamp::read(&path), Some(stamp));
        assert!(Stamp::read(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn fresh_needs_matching_stamp_and_artifact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, artifact) = (dir.path().join("stamp"), dir.path().join("vmlinux"));
        let one = Stamp::new(debian("aa"), &config("CONFIG_SMP=y\n"), vec![]);
        let two = Stamp::new(debian("bb"), &config("CONFIG_SMP=y\n"), vec![]);
        assert!(!one.is_fresh(&path, &artifact));
        one.write(&path).expect("record");
        assert!(!one.is_fresh(&path, &artifact), "artifact missing");
        fs::write(&artifact, b"elf").expect("write");
        assert!(one.is_fresh(&path, &artifact));
        assert!(!two.is_fresh(&path, &artifact));
        fs::write(&path, b"not toml").expect("garble");
        assert!(!one.is_fresh(&path, &artifact));
    }
}
