//! What the VMM needs to know about one shared host directory.

use std::path::PathBuf;

/// Longest tag a virtio-fs device carries (`struct virtio_fs_config.tag`, virtio 1.2 §5.11.4).
pub const MAX_TAG_LEN: usize = 36;

/// One host directory shared with the guest over virtio-fs; the guest mounts it with
/// `mount -t virtiofs TAG TARGET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsShareConfig {
    /// The name the guest mounts it by: 1..=[`MAX_TAG_LEN`] bytes of ASCII letters, digits,
    /// `-` and `_`, unique per VM.
    pub tag: String,
    /// The host directory, canonical (its last component is opened without following a
    /// symlink). Every path the guest names is resolved beneath it; nothing outside it is
    /// ever reachable.
    pub root: PathBuf,
    /// Refuse every change (writes, creates, setattr, xattr changes) with EROFS, whatever
    /// the guest's mount says.
    pub read_only: bool,
}

/// Whether `tag` is a tag a share may carry (see [`FsShareConfig::tag`]).
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
