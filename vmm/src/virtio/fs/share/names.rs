//! What the guest may name and which ids it sees: the checks that keep every request inside
//! the share and the host's ids out of its view when katalite runs rootless.

use std::ffi::CStr;

use rustix::io::Errno;

/// Longest name of one directory entry (NAME_MAX).
const NAME_MAX: usize = 255;

/// Checks a name the guest sends for one directory entry: not empty, at most NAME_MAX
/// bytes, no `/`, not `.` or `..`. Lookups then resolve it beneath its parent only, so no
/// name can reach outside the share whatever the guest sends.
pub fn entry_name(name: &CStr) -> Result<&CStr, Errno> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." {
        return Err(Errno::INVAL);
    }
    if bytes.len() > NAME_MAX {
        return Err(Errno::NAMETOOLONG);
    }
    if bytes.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    Ok(name)
}

/// Which extended attributes the guest may read, list and change. `trusted.*` is the
/// host's (overlayfs keeps its own state there) and never shown; `security.*` and
/// `system.*` (file capabilities, SELinux labels, ACLs) are readable, but a hostile guest
/// changing them on host files would grant the host's privileges, so only `user.*`
/// may change unless the share allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XattrPolicy {
    /// Let the guest set and remove `security.*` and `system.*` attributes.
    pub privileged_writes: bool,
}

impl XattrPolicy {
    pub fn may_read(self, name: &[u8]) -> bool {
        !name.starts_with(b"trusted.")
    }

    pub fn may_write(self, name: &[u8]) -> bool {
        name.starts_with(b"user.")
            || (self.privileged_writes
                && (name.starts_with(b"security.") || name.starts_with(b"system.")))
    }
}

/// The overflow id (`/proc/sys/kernel/overflowuid`) a user namespace shows for ids it
/// does not map.
pub const OVERFLOW_ID: u32 = 65534;

/// How host ids appear to the guest. As root the share passes ids through (Docker's bind
/// mounts). Rootless, katalite cannot give files other owners, so it maps like podman's
/// default rootless user namespace: the invoking user and group are the guest's 0, every
/// other host id shows as 65534, and files the guest creates belong to the invoking user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMap {
    /// Ids pass through unchanged; new files get the requester's uid and gid.
    Identity,
    /// The host uid and gid that appear as 0 in the guest.
    Rootless { uid: u32, gid: u32 },
}

/// `(uid_t)-1`: what chown(2) takes for "leave unchanged", never an owner.
const NO_ID: u32 = u32::MAX;

impl IdMap {
    /// The map for this process: identity when it runs as root.
    pub fn for_this_process() -> Self {
        let uid = rustix::process::geteuid().as_raw();
        if uid == 0 {
            IdMap::Identity
        } else {
            IdMap::Rootless {
                uid,
                gid: rustix::process::getegid().as_raw(),
            }
        }
    }

    /// The guest's view of a host uid and gid.
    pub fn to_guest(self, uid: u32, gid: u32) -> (u32, u32) {
        match self {
            IdMap::Identity => (uid, gid),
            IdMap::Rootless {
                uid: host_uid,
                gid: host_gid,
            } => (
                if uid == host_uid { 0 } else { OVERFLOW_ID },
                if gid == host_gid { 0 } else { OVERFLOW_ID },
            ),
        }
    }

    /// The host ids a guest `chown` to `uid`/`gid` asks for; `None` where the map has no
    /// host id for it (the host refuses with EPERM, as a user namespace does). An id of
    /// -1 is no id at all (chown reads it as "unchanged", rustix refuses it): EINVAL.
    pub fn to_host(
        self,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(Option<u32>, Option<u32>), Errno> {
        if uid == Some(NO_ID) || gid == Some(NO_ID) {
            return Err(Errno::INVAL);
        }
        match self {
            IdMap::Identity => Ok((uid, gid)),
            IdMap::Rootless {
                uid: host_uid,
                gid: host_gid,
            } => {
                let uid = match uid {
                    Some(0) => Some(host_uid),
                    Some(_) => return Err(Errno::PERM),
                    None => None,
                };
                let gid = match gid {
                    Some(0) => Some(host_gid),
                    Some(_) => return Err(Errno::PERM),
                    None => None,
                };
                Ok((uid, gid))
            }
        }
    }

    /// Whether files the guest creates get the requester's ids (as root only).
    pub fn chowns_new_files(self) -> bool {
        self == IdMap::Identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components() {
        assert!(entry_name(c"file").is_ok());
        assert!(entry_name(c"...").is_ok());
        for bad in [c"", c".", c"..", c"a/b", c"/", c"../etc"] {
            assert_eq!(entry_name(bad), Err(Errno::INVAL), "{bad:?}");
        }
        let long = std::ffi::CString::new(vec![b'a'; 256]).expect("name");
        assert_eq!(entry_name(&long), Err(Errno::NAMETOOLONG));
    }

    #[test]
    fn only_user_xattrs_change_unless_allowed() {
        let strict = XattrPolicy {
            privileged_writes: false,
        };
        assert!(strict.may_write(b"user.x"));
        assert!(!strict.may_write(b"security.capability"));
        assert!(!strict.may_write(b"trusted.overlay.opaque"));
        assert!(!strict.may_write(b"system.posix_acl_access"));
        assert!(strict.may_read(b"security.capability"));
        assert!(!strict.may_read(b"trusted.overlay.opaque"));
        let open = XattrPolicy {
            privileged_writes: true,
        };
        assert!(open.may_write(b"security.capability"));
        assert!(!open.may_write(b"trusted.x"));
    }

    #[test]
    fn rootless_maps_the_user_to_root_and_hides_the_rest() {
        let map = IdMap::Rootless {
            uid: 1000,
            gid: 1000,
        };
        assert_eq!(map.to_guest(1000, 1000), (0, 0));
        assert_eq!(map.to_guest(0, 5), (OVERFLOW_ID, OVERFLOW_ID));
        assert_eq!(map.to_host(Some(0), None), Ok((Some(1000), None)));
        assert_eq!(map.to_host(Some(0), Some(u32::MAX)), Err(Errno::INVAL));
        assert_eq!(map.to_host(Some(1), None), Err(Errno::PERM));
        assert_eq!(IdMap::Identity.to_guest(7, 8), (7, 8));
        assert!(!map.chowns_new_files());
    }
}
