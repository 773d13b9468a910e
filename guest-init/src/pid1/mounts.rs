//! The kernel filesystems a container expects, as Docker's default (unprivileged) container
//! has them: proc, a /dev with its own devpts, /dev/shm and /dev/mqueue, sysfs and cgroup2
//! read-only. /tmp and /run stay as the image has them (Docker mounts nothing there); the
//! root itself (the initramfs, or the overlay on the image's disk) is made read-only last
//! for `--read-only`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};

/// A failed mount or mount-point preparation.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Mounting a filesystem failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Creating a mount point, symlink or directory failed.
    #[error("cannot create {path}")]
    Create {
        /// What could not be created.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Remounting the root read-only failed.
    #[error("cannot remount / read-only")]
    ReadOnly(#[source] nix::Error),
    /// The remount succeeded but the root still accepts writes.
    #[error("/ is still writable after the read-only remount")]
    StillWritable,
}

struct KernelMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In mount order; options as `docker run` shows them in /proc/mounts.
const MOUNTS: [KernelMount; 7] = [
    KernelMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    KernelMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    // A private instance, so /dev/ptmx (-> pts/ptmx) allocates from it (devpts.rst).
    KernelMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
    },
    KernelMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV_NOEXEC,
        data: "mode=1777,size=65536k",
    },
    KernelMount {
        fstype: "mqueue",
        target: "/dev/mqueue",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    KernelMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC.union(MsFlags::MS_RDONLY),
        data: "",
    },
    KernelMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC.union(MsFlags::MS_RDONLY),
        data: "",
    },
];

/// Links every container finds in /dev (Docker's defaults, and `ptmx` for the devpts
/// instance above).
const DEV_LINKS: [(&str, &str); 5] = [
    ("/dev/ptmx", "pts/ptmx"),
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// Gives an initramfs root its usual mode, then mounts the kernel filesystems and creates
/// the /dev links.
pub fn mount_kernel_filesystems(initramfs_root: bool) -> Result<(), MountError> {
    // The kernel creates the initramfs root as a 1777 tmpfs; an image's root is 0755, and a
    // world-writable / would let any user of the workload create files there. A root on the
    // image's disk already has the image's mode.
    if initramfs_root {
        fs::set_permissions("/", fs::Permissions::from_mode(0o755))
            .map_err(|source| MountError::Create { path: "/", source })?;
    }
    for m in &MOUNTS {
        create_dir(m.target, 0o755)?;
        let data = (!m.data.is_empty()).then_some(m.data);
        mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, data).map_err(|source| {
            MountError::Mount {
                fstype: m.fstype,
                target: m.target,
                source,
            }
        })?;
    }
    for (link, target) in DEV_LINKS {
        // devtmpfs has its own ptmx node, which would allocate from the initial instance.
        match fs::remove_file(link) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(MountError::Create { path: link, source }),
        }
        std::os::unix::fs::symlink(target, link)
            .map_err(|source| MountError::Create { path: link, source })?;
    }
    Ok(())
}

/// Creates /tmp with mode 1777 when the image has none (Docker leaves /tmp to the image).
pub fn ensure_tmp() -> Result<(), MountError> {
    if fs::symlink_metadata("/tmp").is_err() {
        create_dir("/tmp", 0o1777)?;
    }
    Ok(())
}

/// Makes the root mount read-only (`--read-only`) and checks that it took; the mounts
/// on /dev, /proc and /sys keep their own flags, as in Docker.
pub fn remount_root_read_only() -> Result<(), MountError> {
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).map_err(MountError::ReadOnly)?;
    let stat = statvfs("/").map_err(MountError::ReadOnly)?;
    if !stat.flags().contains(FsFlags::ST_RDONLY) {
        return Err(MountError::StillWritable);
    }
    Ok(())
}

/// Creates `path` with exactly `mode` (not masked by the umask) unless it is a directory.
fn create_dir(path: &'static str, mode: u32) -> Result<(), MountError> {
    let error = |source| MountError::Create { path, source };
    if Path::new(path).is_dir() {
        return Ok(());
    }
    fs::create_dir_all(path).map_err(error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(error)
}
