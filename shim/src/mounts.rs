//! The task's rootfs: containerd's snapshot mounts (an overlay, or a bind of the native
//! snapshotter's directory) mounted in order on the bundle's `rootfs`, which katalite-runc
//! then shares with the VM over virtio-fs; unmounted at delete.

use std::io;
use std::path::Path;

use rustix::mount::{MountFlags, UnmountFlags};
use thiserror::Error;

use crate::messages::Mount;

/// A mount that failed.
#[derive(Debug, Error)]
#[error("cannot mount {kind} {source_path} on {target}: {error}")]
pub struct MountError {
    kind: String,
    source_path: String,
    target: String,
    error: io::Error,
}

/// Mounts `mounts` on `target` in order; on failure, unmounts what was mounted.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    for mount in mounts {
        if let Err(error) = mount_one(mount, target) {
            let _ = unmount_all(target);
            return Err(MountError {
                kind: mount.kind.clone(),
                source_path: mount.source.clone(),
                target: target.display().to_string(),
                error,
            });
        }
    }
    Ok(())
}

/// mount(8)'s option words as flags; the rest is the file system's data.
fn parse_options(options: &[String]) -> (MountFlags, String) {
    let mut flags = MountFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MountFlags::RDONLY,
            "rw" | "defaults" => {}
            "bind" => flags |= MountFlags::BIND,
            "rbind" => flags |= MountFlags::BIND | MountFlags::REC,
            "nosuid" => flags |= MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "noatime" => flags |= MountFlags::NOATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

fn mount_one(mount: &Mount, target: &Path) -> io::Result<()> {
    let (flags, data) = parse_options(&mount.options);
    let data =
        std::ffi::CString::new(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let data = (!data.is_empty()).then_some(data.as_c_str());
    rustix::mount::mount(
        mount.source.as_str(),
        target,
        mount.kind.as_str(),
        flags,
        data,
    )?;
    if flags.contains(MountFlags::BIND) && flags.contains(MountFlags::RDONLY) {
        // A bind mount ignores RDONLY until remounted.
        rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")?;
    }
    Ok(())
}

/// Unmounts everything stacked on `target` (nothing mounted is fine).
pub fn unmount_all(target: &Path) -> io::Result<()> {
    for _ in 0..64 {
        match rustix::mount::unmount(target, UnmountFlags::DETACH) {
            Ok(()) => {}
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => return Ok(()),
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_options_split_into_flags_and_data() {
        let options = [
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/a:/b",
            "ro",
        ]
        .map(String::from);
        let (flags, data) = parse_options(&options);
        assert_eq!(flags, MountFlags::RDONLY);
        assert_eq!(data, "index=off,workdir=/w,upperdir=/u,lowerdir=/a:/b");
        let (flags, data) = parse_options(&["rbind".into(), "rw".into()]);
        assert_eq!(flags, MountFlags::BIND | MountFlags::REC);
        assert!(data.is_empty());
    }
}
