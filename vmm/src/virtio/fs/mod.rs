//! virtio-fs device (virtio 1.2 §5.11): a FUSE server for one shared host directory.

mod config;

pub use config::{is_valid_tag, FsShareConfig, MAX_TAG_LEN};
