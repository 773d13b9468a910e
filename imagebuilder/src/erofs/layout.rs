//! Where everything goes in the image, decided from the merged tree before a byte is
//! written: sizes are known from the tar headers, so every inode's nid and every data
//! block's address can be fixed up front and the image then written strictly in order:
//!
//! ```text
//! block 0        superblock at 1024
//! metadata       inodes (root first), each with its inline xattrs and inline tail
//! dir blocks     whole blocks of directories and symlinks too big to inline
//! file blocks    file contents, in the order the second pass streams them
//! ```

use super::format::{
    blocks_for, DataLayout, FileType, BLOCK_SIZE, DIRENT_SIZE, INODE_SIZE, NAME_MAX, SLOT_SIZE,
    SUPER_OFFSET, SUPER_SIZE,
};
use crate::layers::{NodeId, NodeKind, Tree, ROOT};

/// No slot (removed nodes, devices).
const NONE: u32 = u32::MAX;

/// Why the tree cannot be laid out as EROFS.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A name is longer than a directory entry holds.
    #[error("name {0:?} exceeds 255 bytes")]
    NameTooLong(String),
    /// More blocks than 32-bit block addresses reach (16 TiB).
    #[error("image exceeds 2^32 blocks")]
    TooLarge,
    /// More inodes than 32-bit inode numbers count.
    #[error("too many inodes")]
    TooManyInodes,
}

/// One inode of the image.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// The tree node (for files, the first surviving name).
    pub node: NodeId,
    /// The parent directory (directories only; the root is its own parent).
    pub parent: NodeId,
    /// Type.
    pub file_type: FileType,
    /// Node id: byte offset / 32.
    pub nid: u64,
    /// `i_size`.
    pub size: u64,
    /// Plain or inline tail.
    pub layout: DataLayout,
    /// First whole data block (0 when there is none).
    pub blkaddr: u32,
    /// Link count.
    pub nlink: u32,
    /// Bytes of the inline xattr area.
    pub xattr_size: u32,
}

impl Slot {
    /// Bytes kept inline after the inode and xattrs.
    pub fn inline_len(&self) -> u64 {
        match self.layout {
            DataLayout::Inline => self.size % BLOCK_SIZE,
            DataLayout::Plain => 0,
        }
    }

    /// Whole blocks of data at `blkaddr`.
    pub fn data_blocks(&self) -> u64 {
        match self.layout {
            DataLayout::Inline => self.size / BLOCK_SIZE,
            DataLayout::Plain => blocks_for(self.size),
        }
    }

    /// Byte offset of the inode.
    pub fn offset(&self) -> u64 {
        self.nid * SLOT_SIZE
    }
}

/// The whole image's layout.
pub struct Layout {
    /// Inodes in the order they are written (root first).
    pub slots: Vec<Slot>,
    /// Slot of each tree node ([`NONE`] if not written).
    by_node: Vec<u32>,
    /// Slot of each file inode.
    by_inode: Vec<u32>,
    /// End of the metadata region (block aligned).
    pub meta_end: u64,
    /// Blocks of the whole image.
    pub blocks: u32,
}

impl Layout {
    /// Lays out `tree` (after [`Tree::finish`]); `xattr_size` gives each node's inline
    /// xattr area.
    pub fn new(tree: &Tree, xattr_size: impl Fn(NodeId) -> u32) -> Result<Self, LayoutError> {
        let mut layout = Layout {
            slots: Vec::new(),
            by_node: vec![NONE; tree.node_count()],
            by_inode: vec![NONE; tree.inode_count()],
            meta_end: 0,
            blocks: 0,
        };
        layout.collect(tree, &xattr_size)?;
        layout.place_inodes();
        layout.place_data(tree)?;
        Ok(layout)
    }

    /// The slot a tree node is written as, if any.
    pub fn slot_of(&self, node: NodeId) -> Option<&Slot> {
        let index = *self.by_node.get(node)?;
        self.slots.get(index as usize)
    }

    /// Depth-first from the root, children sorted: one slot per directory, symlink,
    /// fifo and file inode (hard links share their file's).
    fn collect(
        &mut self,
        tree: &Tree,
        xattr_size: &dyn Fn(NodeId) -> u32,
    ) -> Result<(), LayoutError> {
        let mut stack = vec![(ROOT, ROOT)];
        while let Some((id, parent)) = stack.pop() {
            let Some((kind, _, _)) = tree.node(id) else {
                continue;
            };
            if let NodeKind::File(inode) = kind {
                if self.by_inode[inode] != NONE {
                    self.by_node[id] = self.by_inode[inode];
                    continue;
                }
            }
            let index = u32::try_from(self.slots.len())
                .ok()
                .filter(|&i| i != NONE)
                .ok_or(LayoutError::TooManyInodes)?;
            let (file_type, size, nlink) = match kind {
                NodeKind::Dir => {
                    let entries = dir_entries(tree, id, parent);
                    for (name, _) in &entries {
                        if name.len() > NAME_MAX {
                            let path = format!("{}/{name}", tree.path(id));
                            return Err(LayoutError::NameTooLong(path));
                        }
                    }
                    let subdirs = entries[2..]
                        .iter()
                        .filter(|(_, child)| matches!(tree.node(*child), Some((NodeKind::Dir, ..))))
                        .count();
                    let children = entries
                        .iter()
                        .filter(|(name, _)| !matches!(*name, "." | ".."));
                    stack.extend(children.rev().map(|&(_, child)| (child, id)));
                    let nlink =
                        u32::try_from(2 + subdirs).map_err(|_| LayoutError::TooManyInodes)?;
                    (FileType::Directory, dir_size(&entries), nlink)
                }
                NodeKind::File(inode) => {
                    self.by_inode[inode] = index;
                    let inode = tree.inode(inode);
                    let nlink =
                        u32::try_from(inode.names.len()).map_err(|_| LayoutError::TooManyInodes)?;
                    (FileType::Regular, inode.size, nlink)
                }
                NodeKind::Symlink(target) => (FileType::Symlink, target.len() as u64, 1),
                NodeKind::Fifo => (FileType::Fifo, 0, 1),
            };
            // Whole-block-free tails of directories and symlinks go inline; file
            // contents arrive after the metadata is written, so files are always plain.
            let layout = match file_type {
                FileType::Directory | FileType::Symlink if !size.is_multiple_of(BLOCK_SIZE) => {
                    let total = INODE_SIZE + u64::from(xattr_size(id)) + size % BLOCK_SIZE;
                    if total <= BLOCK_SIZE {
                        DataLayout::Inline
                    } else {
                        DataLayout::Plain
                    }
                }
                _ => DataLayout::Plain,
            };
            self.by_node[id] = index;
            self.slots.push(Slot {
                node: id,
                parent,
                file_type,
                nid: 0,
                size,
                layout,
                blkaddr: 0,
                nlink,
                xattr_size: xattr_size(id),
            });
        }
        Ok(())
    }

    /// Assigns nids: inodes follow each other in 32-byte slots after the superblock; an
    /// inode with its xattrs and inline tail never crosses a block boundary when it fits
    /// in one (the kernel refuses inline data that crosses one).
    fn place_inodes(&mut self) {
        let mut pos = (SUPER_OFFSET + SUPER_SIZE).next_multiple_of(SLOT_SIZE);
        for slot in &mut self.slots {
            let total = INODE_SIZE + u64::from(slot.xattr_size) + slot.inline_len();
            if total <= BLOCK_SIZE && pos % BLOCK_SIZE + total > BLOCK_SIZE {
                pos = pos.next_multiple_of(BLOCK_SIZE);
            }
            slot.nid = pos / SLOT_SIZE;
            pos = (pos + total).next_multiple_of(SLOT_SIZE);
        }
        self.meta_end = pos.next_multiple_of(BLOCK_SIZE);
    }

    /// Assigns data blocks: directories and symlinks in slot order, then files in the
    /// order the second pass streams them (layer by layer, member by member).
    fn place_data(&mut self, tree: &Tree) -> Result<(), LayoutError> {
        let mut next = self.meta_end / BLOCK_SIZE;
        let mut place = |slot: &mut Slot| -> Result<(), LayoutError> {
            let blocks = slot.data_blocks();
            if blocks > 0 {
                slot.blkaddr = u32::try_from(next).map_err(|_| LayoutError::TooLarge)?;
                next += blocks;
            }
            Ok(())
        };
        for slot in &mut self.slots {
            if slot.file_type != FileType::Regular {
                place(slot)?;
            }
        }
        for layer in 0..tree.layers() {
            for &(_, inode) in tree.wanted(layer) {
                let index = self.by_inode[inode];
                if index != NONE {
                    place(&mut self.slots[index as usize])?;
                }
            }
        }
        self.blocks = u32::try_from(next).map_err(|_| LayoutError::TooLarge)?;
        Ok(())
    }

    /// The slot of a file inode.
    pub fn file_slot(&self, inode: usize) -> Option<&Slot> {
        let index = *self.by_inode.get(inode)?;
        self.slots.get(index as usize)
    }
}

/// A directory's entries as written: its children that are written, `.` and `..`,
/// sorted by name bytes (the kernel binary-searches them across blocks).
pub fn dir_entries(tree: &Tree, dir: NodeId, parent: NodeId) -> Vec<(&str, NodeId)> {
    let mut entries: Vec<(&str, NodeId)> = vec![(".", dir), ("..", parent)];
    entries.extend(
        tree.children(dir)
            .filter(|&(_, id)| tree.node(id).is_some()),
    );
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    entries
}

/// Walks the block packing of `names`: calls `block` with each block's entries (index
/// range) and returns `i_size` (whole blocks before the last, then the last one's used
/// bytes). An entry and its name never straddle a block.
pub fn pack_dir(names: &[(&str, NodeId)], mut block: impl FnMut(std::ops::Range<usize>)) -> u64 {
    let (mut start, mut used, mut size) = (0, 0u64, 0u64);
    for (i, (name, _)) in names.iter().enumerate() {
        let need = DIRENT_SIZE + name.len() as u64;
        if used + need > BLOCK_SIZE {
            block(start..i);
            size += BLOCK_SIZE;
            (start, used) = (i, 0);
        }
        used += need;
    }
    block(start..names.len());
    size + used
}

fn dir_size(names: &[(&str, NodeId)]) -> u64 {
    pack_dir(names, |_| {})
}
