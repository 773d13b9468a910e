//! OCI layers to an uncompressed EROFS image (4 KiB blocks), written by our own code in
//! the same two streaming passes as the newc archive: the first plans the merged tree
//! from tar headers and lays out every inode and block, the second writes the image
//! strictly sequentially, copying each file's bytes straight from the decompressor.
//! Memory grows with the entry count (capped), never with content bytes; every block's
//! SHA-256 is computed on the way out.

mod blocks;
mod format;
mod layout;
#[cfg(test)]
pub(crate) mod tests;

use std::io::{self, Read, Write};

use indicatif::ProgressBar;

pub use blocks::BlockSink;
pub use format::{BLOCK_SIZE, MAGIC};
pub use layout::LayoutError;

use crate::image::LayerBlob;
use crate::layers::{self, LayerError, NodeKind, Tree, UnpackStats};
use crate::limits::Limits;
use format::{xattr_body, FileType, Inode, Superblock, BLOCK, DIRENT_SIZE, SUPER_OFFSET};
use layout::{dir_entries, pack_dir, Layout, Slot};

/// Copy buffer for file contents.
const COPY_BUFFER: usize = 256 * 1024;

/// Why an EROFS image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// The layers could not be read or merged.
    #[error(transparent)]
    Layers(#[from] LayerError),
    /// The merged tree does not fit EROFS.
    #[error("lay out EROFS image")]
    Layout(#[from] LayoutError),
    /// Copying a file's content from a layer failed (truncated or corrupt stream).
    #[error("layer {digest}: copy {path:?}")]
    Copy {
        /// The layer.
        digest: String,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing the image or its block list failed.
    #[error("write EROFS image")]
    Write(#[source] io::Error),
}

/// What the image holds, and what the layers had that it does not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ErofsStats {
    /// Directories written (the root included).
    pub directories: u64,
    /// Regular files written (distinct inodes).
    pub files: u64,
    /// Extra names of regular files (hard links).
    pub hard_links: u64,
    /// Symlinks written.
    pub symlinks: u64,
    /// Named pipes written.
    pub fifos: u64,
    /// Bytes of file content written.
    pub content_bytes: u64,
    /// Device nodes left out: the guest's devtmpfs provides devices.
    pub devices_skipped: u64,
    /// Extended attributes written.
    pub xattrs_kept: u64,
    /// Extended attributes of written entries that EROFS or the kernel cannot hold
    /// (names outside user./trusted./security., malformed POSIX ACLs, huge values).
    pub xattrs_dropped: u64,
    /// Blocks of the image (its size is `blocks * 4096`).
    pub blocks: u64,
}

/// Merges `layers` (lowest first) and writes the EROFS image to `out`, and the SHA-256
/// of each of its 4 KiB blocks (32 bytes each, in order) to `block_hashes`. Merge rules
/// are those of [`layers::write_cpio`]: devices are left out; xattrs are kept.
pub fn write_erofs<W: Write, H: Write>(
    layers: &[LayerBlob],
    limits: Limits,
    progress: &ProgressBar,
    out: W,
    block_hashes: H,
) -> Result<(W, H, ErofsStats), ErofsError> {
    let mut unpack = UnpackStats::default();
    let tree = layers::plan(layers, limits, progress, &mut unpack)?;
    let layout = Layout::new(&tree, |id| {
        tree.node(id).map_or(0, |(_, _, xattrs)| {
            // At most MAX_XATTR_BYTES plus per-entry overhead.
            u32::try_from(xattr_body(xattrs).0.len()).unwrap_or(u32::MAX)
        })
    })?;
    let mut stats = ErofsStats {
        devices_skipped: unpack.devices_skipped,
        blocks: u64::from(layout.blocks),
        ..ErofsStats::default()
    };
    let mut sink = BlockSink::new(out, block_hashes);
    write_metadata(&tree, &layout, &mut sink, &mut stats).map_err(ErofsError::Write)?;
    let mut buffer = vec![0u8; COPY_BUFFER];
    layers::stream_files(
        layers,
        &tree,
        limits,
        progress,
        |layer, id, inode, content| {
            let slot = layout.file_slot(id).ok_or_else(|| {
                ErofsError::Write(io::Error::other("layout error: file without an inode"))
            })?;
            if inode.size > 0 {
                let start = u64::from(slot.blkaddr) * BLOCK_SIZE;
                sink.pad_to(start).map_err(ErofsError::Write)?;
            }
            copy_exact(content, &mut sink, inode.size, &mut buffer).map_err(|err| match err {
                CopyError::Read(source) => ErofsError::Copy {
                    digest: layer.digest.clone(),
                    path: tree.path(slot.node),
                    source,
                },
                CopyError::Write(source) => ErofsError::Write(source),
            })?;
            sink.pad_block().map_err(ErofsError::Write)?;
            Ok::<(), ErofsError>(())
        },
    )?;
    sink.pad_to(u64::from(layout.blocks) * BLOCK_SIZE)
        .map_err(ErofsError::Write)?;
    let (out, hashes) = sink.finish().map_err(ErofsError::Write)?;
    Ok((out, hashes, stats))
}

/// Block 0, every inode (with inline xattrs and tails) and the whole blocks of
/// directories and symlinks: everything before the first file block.
fn write_metadata<W: Write, H: Write>(
    tree: &Tree,
    layout: &Layout,
    sink: &mut BlockSink<W, H>,
    stats: &mut ErofsStats,
) -> io::Result<()> {
    let root_nid = u16::try_from(layout.slots[0].nid)
        .map_err(|_| io::Error::other("layout error: root nid does not fit 16 bits"))?;
    let superblock = Superblock {
        root_nid,
        inos: layout.slots.len() as u64,
        blocks: layout.blocks,
    };
    sink.pad_to(SUPER_OFFSET)?;
    sink.write_all(&superblock.encode())?;
    for (index, slot) in layout.slots.iter().enumerate() {
        let (_, meta, xattrs) = tree
            .node(slot.node)
            .ok_or_else(|| io::Error::other("layout error: slot of a removed node"))?;
        let (body, kept, dropped) = xattr_body(xattrs);
        stats.xattrs_kept += kept;
        stats.xattrs_dropped += dropped;
        match slot.file_type {
            FileType::Directory => stats.directories += 1,
            FileType::Regular => {
                stats.files += 1;
                stats.hard_links += u64::from(slot.nlink.saturating_sub(1));
                stats.content_bytes += slot.size;
            }
            FileType::Symlink => stats.symlinks += 1,
            FileType::Fifo => stats.fifos += 1,
        }
        let inode = Inode {
            layout: slot.layout,
            xattr_size: slot.xattr_size,
            file_type: slot.file_type,
            permissions: meta.mode,
            size: slot.size,
            blkaddr: slot.blkaddr,
            // The layout counts slots in 32 bits, below u32::MAX.
            ino: u32::try_from(index + 1).map_err(|_| bug("inode number"))?,
            uid: meta.uid,
            gid: meta.gid,
            mtime: u64::from(meta.mtime),
            nlink: slot.nlink,
        };
        sink.pad_to(slot.offset())?;
        sink.write_all(&inode.encode())?;
        sink.write_all(&body)?;
        let inline = to_usize(slot.inline_len())?;
        if inline > 0 {
            let data = slot_data(tree, layout, slot)?;
            sink.write_all(&data[data.len() - inline..])?;
        }
    }
    sink.pad_to(layout.meta_end)?;
    for slot in &layout.slots {
        let blocks = slot.data_blocks();
        if slot.file_type == FileType::Regular || blocks == 0 {
            continue;
        }
        let data = slot_data(tree, layout, slot)?;
        let whole = to_usize(blocks * BLOCK_SIZE)?.min(data.len());
        sink.pad_to(u64::from(slot.blkaddr) * BLOCK_SIZE)?;
        sink.write_all(&data[..whole])?;
        sink.pad_block()?;
    }
    Ok(())
}

/// The data of a directory (its entry blocks, `i_size` bytes) or a symlink (its target).
fn slot_data(tree: &Tree, layout: &Layout, slot: &Slot) -> io::Result<Vec<u8>> {
    match tree.node(slot.node) {
        Some((NodeKind::Symlink(target), ..)) => Ok(target.as_bytes().to_vec()),
        Some((NodeKind::Dir, ..)) => {
            let entries = dir_entries(tree, slot.node, slot.parent);
            let mut data = Vec::with_capacity(to_usize(slot.size)?);
            let mut missing = false;
            pack_dir(&entries, |range| {
                data.resize(data.len().next_multiple_of(BLOCK), 0);
                let block = data.len();
                let mut nameoff = range.len() as u64 * DIRENT_SIZE;
                for (name, child) in &entries[range.clone()] {
                    // Below 4096: the packing keeps entries and names within the block.
                    let (Some(child), Ok(offset)) =
                        (layout.slot_of(*child), u16::try_from(nameoff))
                    else {
                        missing = true;
                        return;
                    };
                    let entry = format::dirent(child.nid, offset, child.file_type);
                    data.extend_from_slice(&entry);
                    nameoff += name.len() as u64;
                }
                for (name, _) in &entries[range] {
                    data.extend_from_slice(name.as_bytes());
                }
                debug_assert!(data.len() - block <= BLOCK);
            });
            if missing || data.len() as u64 != slot.size {
                return Err(bug("directory size"));
            }
            Ok(data)
        }
        _ => Err(bug("data of a node without data")),
    }
}

fn bug(what: &str) -> io::Error {
    io::Error::other(format!("layout error: {what}"))
}

fn to_usize(value: u64) -> io::Result<usize> {
    usize::try_from(value).map_err(|_| bug("size exceeds the address space"))
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies exactly `size` bytes; a source that ends early is an error.
fn copy_exact(
    from: &mut dyn Read,
    to: &mut impl Write,
    size: u64,
    buffer: &mut [u8],
) -> Result<(), CopyError> {
    let mut left = size;
    while left > 0 {
        let want = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match from.read(&mut buffer[..want]) {
            Ok(0) => {
                return Err(CopyError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "layer ends inside a file",
                )))
            }
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(CopyError::Read(err)),
        };
        to.write_all(&buffer[..n]).map_err(CopyError::Write)?;
        left -= n as u64;
    }
    Ok(())
}
