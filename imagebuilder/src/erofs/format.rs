//! EROFS on-disk structures, encoded by hand (little endian) from the kernel's
//! `fs/erofs/erofs_fs.h` (Linux 6.12): the superblock, the 64-byte extended inode, inline
//! xattrs and directory entries. Only the uncompressed subset we write is here.

use crate::layers::Xattr;

/// Bits of the block size: 4 KiB blocks, the page size of every host we target (the
/// kernel refuses blocks larger than a page).
pub const BLOCK_BITS: u8 = 12;

/// Bytes of one block.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_BITS;

/// [`BLOCK_SIZE`] for buffers and slices.
pub const BLOCK: usize = 1 << BLOCK_BITS;

/// Byte offset of the superblock in block 0 (`EROFS_SUPER_OFFSET`).
pub const SUPER_OFFSET: u64 = 1024;

/// Bytes of the superblock (`struct erofs_super_block`, no extension slots).
pub const SUPER_SIZE: u64 = SUPER_BYTES as u64;

const SUPER_BYTES: usize = 128;

/// `EROFS_SUPER_MAGIC_V1`.
pub const MAGIC: u32 = 0xE0F5_E1E2;

/// Bytes of an extended inode (`struct erofs_inode_extended`).
pub const INODE_SIZE: u64 = INODE_BYTES as u64;

const INODE_BYTES: usize = 64;

/// Inodes are addressed in 32-byte slots: nid = offset / 32 (with `meta_blkaddr` 0).
pub const SLOT_SIZE: u64 = 32;

/// Bytes of a directory entry (`struct erofs_dirent`).
pub const DIRENT_SIZE: u64 = DIRENT_BYTES as u64;

const DIRENT_BYTES: usize = 12;

/// Longest name a directory entry holds (`EROFS_NAME_LEN`).
pub const NAME_MAX: usize = 255;

/// Bytes of the inline xattr header (`struct erofs_xattr_ibody_header`).
const XATTR_HEADER: usize = 12;

/// Data layouts we write (`EROFS_INODE_FLAT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// All data in contiguous blocks from `raw_blkaddr`, the last one zero-padded.
    Plain = 0,
    /// Whole blocks from `raw_blkaddr`, the tail right after the inode and its xattrs.
    Inline = 2,
}

/// The superblock fields we set; everything else (features, checksum, devices) is zero.
#[derive(Debug, Clone, Copy)]
pub struct Superblock {
    /// Nid of the root directory (the kernel reads it as 16 bits).
    pub root_nid: u16,
    /// Number of inodes.
    pub inos: u64,
    /// Total blocks of the image.
    pub blocks: u32,
}

impl Superblock {
    /// The 128 bytes at [`SUPER_OFFSET`].
    pub fn encode(&self) -> [u8; SUPER_BYTES] {
        let mut b = [0u8; SUPER_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        // checksum (4..8) and feature_compat (8..12) stay zero: no SB_CHKSUM feature.
        b[12] = BLOCK_BITS;
        // sb_extslots (13) zero.
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inos.to_le_bytes());
        // build_time (24..32), build_time_nsec (32..36): only compact inodes use them.
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        // meta_blkaddr (40..44) zero: nids count from the start of the image.
        // xattr_blkaddr, uuid, volume_name, feature_incompat, dirblkbits...: zero.
        b
    }
}

/// File type bits of `i_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// `S_IFREG`.
    Regular,
    /// `S_IFDIR`.
    Directory,
    /// `S_IFLNK`.
    Symlink,
    /// `S_IFIFO`.
    Fifo,
}

impl FileType {
    fn mode_bits(self) -> u16 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::Symlink => 0o120000,
            FileType::Fifo => 0o010000,
        }
    }

    /// The `file_type` of a directory entry (`EROFS_FT_*`, the kernel's `FT_*`).
    pub fn dirent_type(self) -> u8 {
        match self {
            FileType::Regular => 1,
            FileType::Directory => 2,
            FileType::Fifo => 5,
            FileType::Symlink => 7,
        }
    }
}

/// One extended inode.
#[derive(Debug, Clone, Copy)]
pub struct Inode {
    /// Where the data is.
    pub layout: DataLayout,
    /// Bytes of the inline xattr area (0 or at least 16).
    pub xattr_size: u32,
    /// Type.
    pub file_type: FileType,
    /// Permission bits including setuid, setgid and sticky.
    pub permissions: u32,
    /// `i_size`.
    pub size: u64,
    /// First data block (0 when there is none).
    pub blkaddr: u32,
    /// 32-bit inode number for old stat calls.
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Link count.
    pub nlink: u32,
}

impl Inode {
    /// The 64 bytes of `struct erofs_inode_extended`.
    pub fn encode(&self) -> [u8; INODE_BYTES] {
        let mut b = [0u8; INODE_BYTES];
        // i_format: bit 0 = extended layout, bits 1..3 = data layout.
        let format: u16 = 1 | ((self.layout as u16) << 1);
        b[0..2].copy_from_slice(&format.to_le_bytes());
        b[2..4].copy_from_slice(&xattr_icount(self.xattr_size).to_le_bytes());
        let mode = self.file_type.mode_bits() | (self.permissions & 0o7777) as u16;
        b[4..6].copy_from_slice(&mode.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..20].copy_from_slice(&self.blkaddr.to_le_bytes());
        b[20..24].copy_from_slice(&self.ino.to_le_bytes());
        b[24..28].copy_from_slice(&self.uid.to_le_bytes());
        b[28..32].copy_from_slice(&self.gid.to_le_bytes());
        b[32..40].copy_from_slice(&self.mtime.to_le_bytes());
        // i_mtime_nsec (40..44) zero: tar times are whole seconds once PAX is parsed.
        b[44..48].copy_from_slice(&self.nlink.to_le_bytes());
        b
    }
}

/// `i_xattr_icount` for an inline xattr area of `size` bytes: the kernel computes the
/// size back as `12 + 4 * (icount - 1)` (`erofs_xattr_ibody_size`).
fn xattr_icount(size: u32) -> u16 {
    if size == 0 {
        return 0;
    }
    // Sizes are capped far below this by `MAX_XATTR_BYTES`.
    u16::try_from((size as usize - XATTR_HEADER) / 4 + 1).unwrap_or(u16::MAX)
}

/// Where an xattr goes in EROFS: its name index, the name without the prefix and the
/// value's length; `None` for what EROFS (without long-prefix support) or the kernel
/// cannot hold, which is dropped and counted.
fn xattr_slot(xattr: &Xattr) -> Option<(u8, &[u8], u16)> {
    const PREFIXES: [(&[u8], u8); 3] = [(b"user.", 1), (b"trusted.", 4), (b"security.", 6)];
    let name = &*xattr.name;
    let value_len = u16::try_from(xattr.value.len()).ok()?;
    for (prefix, index) in PREFIXES {
        if let Some(rest) = name.strip_prefix(prefix) {
            return (!rest.is_empty()).then_some((index, rest, value_len));
        }
    }
    // POSIX ACLs: EROFS keeps the value in the same `posix_acl_xattr` format getxattr
    // returns and tar writers record (the kernel decodes it with posix_acl_from_xattr);
    // anything not in that format is dropped rather than mounted as a broken ACL.
    let index = match name {
        b"system.posix_acl_access" => 2,
        b"system.posix_acl_default" => 3,
        _ => return None,
    };
    let value = &*xattr.value;
    let valid = value.len() >= 4
        && (value.len() - 4).is_multiple_of(8)
        && value[0..4] == 2u32.to_le_bytes();
    valid.then_some((index, &[][..], value_len))
}

/// The inline xattr area for `xattrs` (empty when none is kept), and how many were kept
/// and dropped.
pub fn xattr_body(xattrs: &[Xattr]) -> (Vec<u8>, u64, u64) {
    let (mut kept, mut dropped) = (0, 0);
    let mut body = Vec::new();
    for xattr in xattrs {
        let Some((index, name, value_len)) = xattr_slot(xattr) else {
            dropped += 1;
            continue;
        };
        let Ok(name_len) = u8::try_from(name.len()) else {
            dropped += 1;
            continue;
        };
        if body.is_empty() {
            // h_name_filter 0 (no XATTR_FILTER feature), no shared xattrs.
            body.resize(XATTR_HEADER, 0);
        }
        body.push(name_len);
        body.push(index);
        body.extend_from_slice(&value_len.to_le_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&xattr.value);
        body.resize(body.len().next_multiple_of(4), 0);
        kept += 1;
    }
    (body, kept, dropped)
}

/// A directory entry.
pub fn dirent(nid: u64, nameoff: u16, file_type: FileType) -> [u8; DIRENT_BYTES] {
    let mut b = [0u8; DIRENT_BYTES];
    b[0..8].copy_from_slice(&nid.to_le_bytes());
    b[8..10].copy_from_slice(&nameoff.to_le_bytes());
    b[10] = file_type.dirent_type();
    b
}

/// Blocks needed for `size` bytes.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_icount_round_trips_the_kernel_formula() {
        for size in [16u32, 20, 64, 4096, 65_552] {
            let icount = u32::from(xattr_icount(size));
            assert_eq!(12 + 4 * (icount - 1), size);
        }
        assert_eq!(xattr_icount(0), 0);
    }

    #[test]
    fn xattr_names_map_to_kernel_indexes() {
        let x = |name: &str, value: &[u8]| Xattr {
            name: name.as_bytes().into(),
            value: value.into(),
        };
        let acl = [2u8, 0, 0, 0, 1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff];
        let (body, kept, dropped) = xattr_body(&[
            x("security.capability", &[1, 0, 0, 2]),
            x("user.a", b""),
            x("system.posix_acl_access", &acl),
            x("system.posix_acl_default", b"\x01\x00"),
            x("system.nfs4_acl", b"x"),
            x("user.", b"x"),
        ]);
        assert_eq!((kept, dropped), (3, 3));
        let mut want = vec![0u8; 12];
        want.extend_from_slice(&[10, 6, 4, 0]);
        want.extend_from_slice(b"capability\x01\x00\x00\x02");
        want.extend_from_slice(&[0, 0]);
        want.extend_from_slice(&[1, 1, 0, 0, b'a', 0, 0, 0]);
        want.extend_from_slice(&[0, 2, 12, 0]);
        want.extend_from_slice(&acl);
        assert_eq!(body, want);
    }

    #[test]
    fn superblock_and_inode_fields_sit_where_the_kernel_reads_them() {
        let sb = Superblock {
            root_nid: 36,
            inos: 7,
            blocks: 9,
        }
        .encode();
        assert_eq!(&sb[0..4], &[0xe2, 0xe1, 0xf5, 0xe0]);
        assert_eq!((sb[12], sb[14], sb[16], sb[36]), (12, 36, 7, 9));
        let inode = Inode {
            layout: DataLayout::Inline,
            xattr_size: 16,
            file_type: FileType::Directory,
            permissions: 0o1777,
            size: 0x1_0000_0001,
            blkaddr: 5,
            ino: 3,
            uid: 1000,
            gid: 1001,
            mtime: 1_700_000_000,
            nlink: 4,
        }
        .encode();
        assert_eq!(u16::from_le_bytes([inode[0], inode[1]]), 0b101);
        assert_eq!(u16::from_le_bytes([inode[2], inode[3]]), 2);
        assert_eq!(u16::from_le_bytes([inode[4], inode[5]]), 0o041777);
        assert_eq!(inode[8..16], 0x1_0000_0001u64.to_le_bytes());
        assert_eq!(inode[44..48], 4u32.to_le_bytes());
    }
}
