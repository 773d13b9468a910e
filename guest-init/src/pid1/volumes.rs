//! The container's volumes and tmpfs mounts (`-v`, `--mount`, `--tmpfs`), mounted once the
//! root and the kernel filesystems are in place and before the working directory is made,
//! as Docker orders it. Init runs inside the container's root by then (chrooted onto the
//! overlay, or on the initramfs), so paths, symlinks included, resolve within it.
//! Parents go first, so `/data` and `/data/cache` nest.

use std::fs;
use std::io;
use std::path::Path;

use guest_init::{MountConfig, MountConfigError, MountKind, TmpfsMount};
use nix::mount::{mount, MsFlags};

/// A mount init could not make.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The config's mount is not acceptable.
    #[error(transparent)]
    Invalid(#[from] MountConfigError),
    /// The target exists in the image as something other than a directory.
    #[error("cannot mount on {0}: not a directory")]
    NotADirectory(String),
    /// The target directory could not be created.
    #[error("cannot create the mount point {path}")]
    Create {
        /// The target.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The mount itself failed.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// `virtio-fs share TAG` or `tmpfs`.
        what: String,
        /// The target.
        target: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// Mounts every entry of `mounts`, parents before children.
pub fn mount_all(mounts: &[MountConfig]) -> Result<(), VolumeError> {
    for m in mounts {
        m.validate()?;
    }
    for m in in_mount_order(mounts) {
        prepare_target(&m.target)?;
        mount_one(m)?;
    }
    Ok(())
}

/// `mounts` by the depth of their targets, shallowest first; equal depths keep their order.
fn in_mount_order(mounts: &[MountConfig]) -> Vec<&MountConfig> {
    let mut ordered: Vec<&MountConfig> = mounts.iter().collect();
    ordered.sort_by_key(|m| depth(&m.target));
    ordered
}

/// How many real components a path has (`/a//b/./` has 2).
fn depth(path: &str) -> usize {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .count()
}

/// Makes `target` a directory: creates it (and its parents) when missing; refuses one the
/// image has as a file (symlinks are followed, within the container's root).
fn prepare_target(target: &str) -> Result<(), VolumeError> {
    match fs::metadata(target) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(VolumeError::NotADirectory(target.to_string())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(target).map_err(|source| create_error(target, source))
        }
        Err(source) => Err(create_error(target, source)),
    }
}

fn create_error(target: &str, source: io::Error) -> VolumeError {
    match source.kind() {
        // A path component is a file: Docker's "not a directory".
        io::ErrorKind::NotADirectory => VolumeError::NotADirectory(target.to_string()),
        _ => VolumeError::Create {
            path: target.to_string(),
            source,
        },
    }
}

fn mount_one(m: &MountConfig) -> Result<(), VolumeError> {
    let read_only = if m.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let target = Path::new(&m.target);
    let (what, result) = match &m.kind {
        MountKind::VirtioFs(share) => (
            format!("virtio-fs share {}", share.tag),
            mount(
                Some(share.tag.as_str()),
                target,
                Some("virtiofs"),
                read_only,
                None::<&str>,
            ),
        ),
        MountKind::Tmpfs(tmpfs) => {
            let data = tmpfs_data(tmpfs);
            let data = (!data.is_empty()).then_some(data.as_str());
            (
                "tmpfs".to_string(),
                mount(
                    Some("tmpfs"),
                    target,
                    Some("tmpfs"),
                    tmpfs_flags(tmpfs) | read_only,
                    data,
                ),
            )
        }
    };
    result.map_err(|source| VolumeError::Mount {
        what,
        target: m.target.clone(),
        source,
    })
}

/// Docker's tmpfs flags: `nosuid,nodev,noexec`, `exec` lifting the last.
fn tmpfs_flags(tmpfs: &TmpfsMount) -> MsFlags {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if tmpfs.exec {
        flags
    } else {
        flags | MsFlags::MS_NOEXEC
    }
}

/// The tmpfs data string: `mode=` (octal) and `size=` (bytes) when given.
fn tmpfs_data(tmpfs: &TmpfsMount) -> String {
    let mut options = Vec::new();
    if let Some(mode) = tmpfs.mode {
        options.push(format!("mode={mode:o}"));
    }
    if let Some(size) = tmpfs.size_bytes {
        options.push(format!("size={size}"));
    }
    options.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_init::VirtioFsMount;

    fn share(target: &str, tag: &str) -> MountConfig {
        MountConfig {
            target: target.into(),
            read_only: false,
            kind: MountKind::VirtioFs(VirtioFsMount { tag: tag.into() }),
        }
    }

    #[test]
    fn parents_are_mounted_before_children() {
        let mounts = [
            share("/data/cache/deep", "c"),
            share("/data", "a"),
            share("/other", "b"),
            share("/data//cache/./", "d"),
        ];
        let order: Vec<&str> = in_mount_order(&mounts)
            .iter()
            .map(|m| m.target.as_str())
            .collect();
        assert_eq!(
            order,
            ["/data", "/other", "/data//cache/./", "/data/cache/deep"]
        );
        assert_eq!(depth("/"), 0);
        assert_eq!(depth("/a/./b//"), 2);
    }

    #[test]
    fn tmpfs_options_follow_docker() {
        let tmpfs = TmpfsMount {
            size_bytes: Some(64 << 20),
            mode: Some(0o1777),
            exec: false,
        };
        assert_eq!(tmpfs_data(&tmpfs), "mode=1777,size=67108864");
        assert_eq!(tmpfs_data(&TmpfsMount::default()), "");
        assert!(tmpfs_flags(&tmpfs).contains(MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID));
        let exec = TmpfsMount {
            exec: true,
            ..TmpfsMount::default()
        };
        assert!(!tmpfs_flags(&exec).contains(MsFlags::MS_NOEXEC));
        assert!(tmpfs_flags(&exec).contains(MsFlags::MS_NODEV));
    }

    #[test]
    fn targets_are_created_and_files_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let nested = tmp.path().join("a/b/c");
        let nested = nested.to_str().expect("utf-8");
        prepare_target(nested).expect("created");
        assert!(Path::new(nested).is_dir());
        prepare_target(nested).expect("an existing directory is fine");
        let file = tmp.path().join("file");
        fs::write(&file, "x").expect("write");
        let file = file.to_str().expect("utf-8");
        let err = prepare_target(file).expect_err("a file");
        assert_eq!(
            err.to_string(),
            format!("cannot mount on {file}: not a directory")
        );
        let below = format!("{file}/sub");
        let err = prepare_target(&below).expect_err("below a file");
        assert!(matches!(err, VolumeError::NotADirectory(_)), "{err}");
    }

    #[test]
    fn invalid_configs_are_refused_before_any_mount() {
        let err = mount_all(&[share("/ok", "t"), share("relative", "t")]).expect_err("bad");
        assert_eq!(
            err.to_string(),
            "invalid mount target \"relative\": it must be an absolute path other than / \
             without .."
        );
    }
}
