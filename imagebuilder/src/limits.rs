//! Caps on what one image may make the puller and the packer do: every manifest and layer is
//! untrusted input, so download sizes, size, entry count, name length, depth and planning
//! memory are bounded, and a hostile registry or decompression bomb hits a cap long before
//! it fills a disk or the host's memory. A `--rootfs` directory is walked under the same caps.

use std::fmt;

/// A cap that an image exceeded, or a malformed override.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The uncompressed layers (or a directory's files) together are larger than allowed.
    #[error("contents exceed the total-size limit of {0} bytes")]
    TotalSize(u64),
    /// A single file is larger than allowed.
    #[error("a file exceeds the file-size limit of {0} bytes")]
    FileSize(u64),
    /// The layers (or a directory tree) hold more entries than allowed.
    #[error("more entries than the entries limit of {0}")]
    Entries(u64),
    /// A path or link target is longer than allowed.
    #[error("a name exceeds the name-length limit of {0} bytes")]
    NameLength(u64),
    /// A path is nested deeper than allowed.
    #[error("a path is nested deeper than the depth limit of {0}")]
    Depth(u64),
    /// Names and link targets kept while planning exceed the memory budget.
    #[error("names and link targets exceed the tree-bytes limit of {0} bytes")]
    TreeBytes(u64),
    /// `--limit NAME=VALUE` names no limit.
    #[error("unknown limit {0:?} (known: {known})", known = Limits::NAMES.join(", "))]
    UnknownName(String),
    /// `--limit NAME=VALUE` has a value that is not a size.
    #[error("limit value {0:?} is not a number with an optional K/M/G/T suffix")]
    BadValue(String),
}

/// The caps applied while pulling an image and turning layers (or a directory) into an
/// initramfs or disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Compressed bytes of one layer, as its manifest announces it and as it streams.
    pub layer_size: u64,
    /// Compressed bytes of all of an image's layers together, as its manifest announces.
    pub image_size: u64,
    /// Bytes of all decompressed tar streams together (headers, contents, padding); for a
    /// directory, of its files' contents.
    pub total_size: u64,
    /// Bytes of one file (newc stores sizes in 32 bits, so at most 4 GiB - 1 anyway).
    pub file_size: u64,
    /// Tar entries of all layers together, including those a later layer deletes; for a
    /// directory, the entries its walk lists.
    pub entries: u64,
    /// Bytes of one path or link target (the kernel's PATH_MAX is 4096 with the NUL).
    pub name_length: u64,
    /// Components of one path.
    pub depth: u64,
    /// Bytes of names and link targets held in memory while planning the merged tree.
    pub tree_bytes: u64,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Limits {
    /// Generous for real images (a Debian-based nginx is ~150 MiB and ~10k entries; the
    /// biggest real layers, CUDA and ML images, are a few GiB compressed) yet small enough
    /// that the initramfs still fits a VM's memory. A `const`, so that a `const` of custom
    /// limits can take the rest from it (`..Limits::DEFAULT`).
    pub const DEFAULT: Limits = Limits {
        layer_size: 10 * GIB,
        image_size: 50 * GIB,
        total_size: 4 * GIB,
        file_size: 2 * GIB,
        entries: 500_000,
        name_length: 4095,
        depth: 128,
        tree_bytes: 256 * MIB,
    };

    /// Names accepted by [`Limits::set`].
    pub const NAMES: [&'static str; 8] = [
        "layer-size",
        "image-size",
        "total-size",
        "file-size",
        "entries",
        "name-length",
        "depth",
        "tree-bytes",
    ];

    /// Overrides one limit from text such as `total-size=8G` (a `--limit` flag).
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), LimitError> {
        let value = parse_size(value)?;
        let slot = match name {
            "layer-size" => &mut self.layer_size,
            "image-size" => &mut self.image_size,
            "total-size" => &mut self.total_size,
            "file-size" => &mut self.file_size,
            "entries" => &mut self.entries,
            "name-length" => &mut self.name_length,
            "depth" => &mut self.depth,
            "tree-bytes" => &mut self.tree_bytes,
            _ => return Err(LimitError::UnknownName(name.to_string())),
        };
        *slot = value;
        Ok(())
    }

    /// Overrides limits from `NAME=VALUE[,NAME=VALUE...]`.
    pub fn apply_overrides(&mut self, spec: &str) -> Result<(), LimitError> {
        for item in spec.split(',').filter(|item| !item.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| LimitError::BadValue(item.to_string()))?;
            self.set(name.trim(), value.trim())?;
        }
        Ok(())
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layer-size={},image-size={},total-size={},file-size={},entries={},name-length={},\
             depth={},tree-bytes={}",
            self.layer_size,
            self.image_size,
            self.total_size,
            self.file_size,
            self.entries,
            self.name_length,
            self.depth,
            self.tree_bytes
        )
    }
}

fn parse_size(text: &str) -> Result<u64, LimitError> {
    let bad = || LimitError::BadValue(text.to_string());
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let unit = match suffix
        .trim_end_matches(['i', 'B'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 1,
        "K" => KIB,
        "M" => MIB,
        "G" => GIB,
        "T" => 1024 * GIB,
        _ => return Err(bad()),
    };
    number.checked_mul(unit).ok_or_else(bad)
}

/// What one packing run has used so far, checked against [`Limits`] at every step.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    bytes: u64,
    entries: u64,
    tree_bytes: u64,
}

impl Budget {
    /// A fresh budget under `limits`.
    pub fn new(limits: Limits) -> Self {
        Budget {
            limits,
            bytes: 0,
            entries: 0,
            tree_bytes: 0,
        }
    }

    /// The limits this budget enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts `n` decompressed bytes.
    pub fn charge_bytes(&mut self, n: u64) -> Result<(), LimitError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.limits.total_size {
            return Err(LimitError::TotalSize(self.limits.total_size));
        }
        Ok(())
    }

    /// Counts one tar entry.
    pub fn charge_entry(&mut self) -> Result<(), LimitError> {
        self.entries += 1;
        if self.entries > self.limits.entries {
            return Err(LimitError::Entries(self.limits.entries));
        }
        Ok(())
    }

    /// Counts `n` bytes of names or link targets kept in memory.
    pub fn charge_tree(&mut self, n: usize) -> Result<(), LimitError> {
        self.tree_bytes = self.tree_bytes.saturating_add(n as u64);
        if self.tree_bytes > self.limits.tree_bytes {
            return Err(LimitError::TreeBytes(self.limits.tree_bytes));
        }
        Ok(())
    }

    /// Checks the size a tar header declares for one file.
    pub fn check_file_size(&self, size: u64) -> Result<(), LimitError> {
        if size > self.limits.file_size {
            return Err(LimitError::FileSize(self.limits.file_size));
        }
        Ok(())
    }

    /// Checks the length of a path or link target.
    pub fn check_name_length(&self, len: usize) -> Result<(), LimitError> {
        if len as u64 > self.limits.name_length {
            return Err(LimitError::NameLength(self.limits.name_length));
        }
        Ok(())
    }

    /// Checks the number of components of a path.
    pub fn check_depth(&self, depth: usize) -> Result<(), LimitError> {
        if depth as u64 > self.limits.depth {
            return Err(LimitError::Depth(self.limits.depth));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_sizes_and_names() {
        let mut limits = Limits::default();
        limits
            .apply_overrides("total-size=8G,entries=10,file-size=512KiB,depth=3,layer-size=1T")
            .expect("valid overrides");
        assert_eq!(limits.layer_size, 1024 * GIB);
        assert_eq!(limits.image_size, 50 * GIB, "untouched");
        assert_eq!(limits.total_size, 8 * GIB);
        assert_eq!(limits.entries, 10);
        assert_eq!(limits.file_size, 512 * KIB);
        assert_eq!(limits.depth, 3);
        assert!(matches!(
            limits.set("inodes", "1"),
            Err(LimitError::UnknownName(_))
        ));
        for bad in ["", "x", "1Q", "-1", "99999999999T"] {
            assert!(
                matches!(limits.set("entries", bad), Err(LimitError::BadValue(_))),
                "{bad:?}"
            );
        }
        assert!(limits.apply_overrides("entries").is_err());
    }

    #[test]
    fn budget_trips_exactly_past_each_limit() {
        let limits = Limits {
            layer_size: 1,
            image_size: 1,
            total_size: 100,
            file_size: 10,
            entries: 2,
            name_length: 5,
            depth: 2,
            tree_bytes: 8,
        };
        let mut budget = Budget::new(limits);
        budget.charge_bytes(100).expect("at the limit");
        assert!(matches!(
            budget.charge_bytes(1),
            Err(LimitError::TotalSize(100))
        ));
        budget.charge_entry().expect("first");
        budget.charge_entry().expect("second");
        assert!(matches!(budget.charge_entry(), Err(LimitError::Entries(2))));
        budget.charge_tree(8).expect("at the limit");
        assert!(budget.charge_tree(1).is_err());
        assert!(budget.check_file_size(10).is_ok());
        assert!(budget.check_file_size(11).is_err());
        assert!(budget.check_name_length(5).is_ok());
        assert!(budget.check_name_length(6).is_err());
        assert!(budget.check_depth(2).is_ok());
        assert!(budget.check_depth(3).is_err());
    }

    #[test]
    fn display_round_trips_through_overrides() {
        let limits = Limits {
            entries: 7,
            image_size: 3 * MIB,
            ..Limits::default()
        };
        let mut parsed = Limits {
            entries: 1,
            depth: 1,
            ..Limits::default()
        };
        parsed
            .apply_overrides(&limits.to_string())
            .expect("own format parses");
        assert_eq!(parsed, limits);
    }
}
