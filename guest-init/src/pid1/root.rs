//! The container's root on the image's EROFS disk: the disk mounted read-only, an overlay
//! on it whose upper layer is a tmpfs (the container's writable layer, in guest RAM and so
//! bounded by `--memory`), and init moved into the overlay the way `switch_root` does it
//! (the initramfs cannot be pivoted away from, so the overlay is moved onto `/` and init
//! chroots into it). The initramfs keeps only init and its config, a few MiB.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;

use guest_init::{is_disk_name, is_valid_tag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, chroot};

/// Where the disk, the writable layer and the merged root are mounted in the initramfs;
/// all three end up hidden below the new `/`.
const LOWER: &str = "/katalite-lower";
const WRITABLE: &str = "/katalite-rw";
const UPPER: &str = "/katalite-rw/upper";
const WORK: &str = "/katalite-rw/work";
const MERGED: &str = "/katalite-root";

/// With `--read-only` only init writes to the upper layer (/etc/hosts, /etc/hostname,
/// /etc/resolv.conf, the working directory) before the root is remounted read-only, so it
/// gets a small cap instead of half the guest's RAM.
const READ_ONLY_UPPER_SIZE: &str = "size=1m";

/// The root could not be set up on the disk.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The config names something that is not a disk name.
    #[error("root disk name {0:?} is not a block device name")]
    BadName(String),
    /// The config names something that is not a share tag.
    #[error("root share tag {0:?} is not a virtio-fs tag")]
    BadTag(String),
    /// A mount point could not be created.
    #[error("cannot create {path}")]
    Create {
        /// The directory.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A mount failed.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Moving into the new root failed.
    #[error("cannot switch to the root on {0}")]
    Switch(&'static str, #[source] nix::Error),
}

/// Mounts devtmpfs on the initramfs's /dev, so init has a console for its messages and the
/// disk's device node; [`enter`] detaches it again before the switch.
pub fn mount_early_dev() -> Result<(), RootError> {
    create_dir("/dev")?;
    mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(|source| RootError::Mount {
        what: "devtmpfs".into(),
        target: "/dev",
        source,
    })
}

/// Mounts `/dev/<disk>` (EROFS, read-only) under an overlay with a tmpfs upper and makes
/// that overlay the root of init and everything it starts.
pub fn enter(disk: &str, read_only: bool) -> Result<(), RootError> {
    if !is_disk_name(disk) {
        return Err(RootError::BadName(disk.to_string()));
    }
    let device = format!("/dev/{disk}");
    for dir in [LOWER, WRITABLE, MERGED] {
        create_dir(dir)?;
    }
    mount(
        Some(device.as_str()),
        LOWER,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|source| RootError::Mount {
        what: format!("{device} (erofs)"),
        target: LOWER,
        source,
    })?;
    // Mode 0755 like any image's root; the tmpfs default (1777) would show through the
    // overlay's work directory checks but never to the workload.
    let size = if read_only { READ_ONLY_UPPER_SIZE } else { "" };
    let options = format!("mode=0755{}{size}", if size.is_empty() { "" } else { "," });
    mount(
        Some("tmpfs"),
        WRITABLE,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|source| RootError::Mount {
        what: "tmpfs".into(),
        target: WRITABLE,
        source,
    })?;
    for dir in [UPPER, WORK] {
        create_dir(dir)?;
    }
    let layers = format!("lowerdir={LOWER},upperdir={UPPER},workdir={WORK}");
    mount(
        Some("overlay"),
        MERGED,
        Some("overlay"),
        MsFlags::empty(),
        Some(layers.as_str()),
    )
    .map_err(|source| RootError::Mount {
        what: "overlay".into(),
        target: MERGED,
        source,
    })?;
    // The new root gets its own /dev from the kernel-filesystem step; this one only served
    // the disk node and the console, whose open descriptors stay valid.
    let _ = umount2("/dev", MntFlags::MNT_DETACH);
    switch_root()
}

/// Where the identity files of a shared root live: a small tmpfs in the initramfs whose
/// files are bound over the root's own, so init never writes the host's directory.
const IDENTITY: &str = "/katalite-etc";
/// The files [`super::etc_files`] writes.
const IDENTITY_FILES: [&str; 3] = ["hostname", "hosts", "resolv.conf"];

/// Mounts the virtio-fs share `tag` (`--rootfs DIR`: the host directory, writable unless
/// the host made the share read-only) and makes it the root.
pub fn enter_share(tag: &str) -> Result<(), RootError> {
    if !is_valid_tag(tag) {
        return Err(RootError::BadTag(tag.to_string()));
    }
    for dir in [MERGED, IDENTITY] {
        create_dir(dir)?;
    }
    mount(
        Some(tag),
        MERGED,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| RootError::Mount {
        what: format!("{tag} (virtiofs)"),
        target: MERGED,
        source,
    })?;
    mount(
        Some("tmpfs"),
        IDENTITY,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(|source| RootError::Mount {
        what: "tmpfs".into(),
        target: IDENTITY,
        source,
    })?;
    for name in IDENTITY_FILES {
        let target = format!("{MERGED}/etc/{name}");
        // Regular files are covered; a symlink (e.g. to systemd's resolv.conf) is the
        // directory's to keep, as on a disk root. A missing file gets an empty one to mount
        // on, as runc does for Docker's; on a read-only share there is none.
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.file_type().is_file() => {}
            Ok(_) => continue,
            Err(_) => {
                if fs::File::create(&target).is_err() {
                    continue;
                }
            }
        }
        let source = format!("{IDENTITY}/{name}");
        fs::write(&source, "").map_err(|source| RootError::Create {
            path: IDENTITY,
            source,
        })?;
        mount(
            Some(source.as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| RootError::Mount {
            what: format!("{IDENTITY}/{name}"),
            target: "/etc",
            source,
        })?;
    }
    let _ = umount2("/dev", MntFlags::MNT_DETACH);
    switch_root()
}

/// `switch_root`'s move: make MERGED the mount at `/`, then chroot into it.
fn switch_root() -> Result<(), RootError> {
    chdir(MERGED).map_err(|err| RootError::Switch("chdir", err))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|err| RootError::Switch("move mount", err))?;
    chroot(".").map_err(|err| RootError::Switch("chroot", err))?;
    chdir("/").map_err(|err| RootError::Switch("chdir /", err))
}

fn create_dir(path: &'static str) -> Result<(), RootError> {
    let error = |source| RootError::Create { path, source };
    match fs::create_dir(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(error),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(error(err)),
    }
}
