//! Read-only views of a finished tree, for the writers: the cpio writer walks it in
//! archive order, the EROFS writer lays out every node and directory listing.

use super::{Body, Inode, InodeId, Meta, NodeId, Tree, ROOT};
use crate::layers::xattr::Xattr;

/// What a surviving node is, for writers that lay out the whole tree (EROFS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind<'a> {
    /// A directory; its entries come from [`Tree::children`].
    Dir,
    /// A name of a regular file (hard links share the inode).
    File(InodeId),
    /// A symlink and its target.
    Symlink(&'a str),
    /// A named pipe.
    Fifo,
}

/// A non-file node the first pass found, in the order it must be written.
pub enum Item<'a> {
    /// A directory.
    Dir,
    /// A symlink and its target.
    Symlink(&'a str),
    /// A named pipe.
    Fifo,
}

impl Tree {
    /// Number of layers the tree was finished with.
    pub fn layers(&self) -> usize {
        self.wanted.len()
    }

    /// Members of `layer` whose content survives, by ascending ordinal (after `finish`).
    pub fn wanted(&self, layer: usize) -> &[(u64, InodeId)] {
        self.wanted.get(layer).map_or(&[], Vec::as_slice)
    }

    /// A surviving file's content and names.
    pub fn inode(&self, id: InodeId) -> &Inode {
        &self.inodes[id]
    }

    /// Calls `visit` for every directory, symlink and fifo, parents before children,
    /// names sorted, with the path below the root.
    pub fn walk<E>(
        &self,
        mut visit: impl FnMut(&str, Meta, Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut stack: Vec<NodeId> = self.children_rev(ROOT);
        while let Some(id) = stack.pop() {
            let node = &self.nodes[id];
            let item = match &node.body {
                Body::Dir(_) => {
                    stack.extend(self.children_rev(id));
                    Item::Dir
                }
                Body::Symlink(target) => Item::Symlink(target),
                Body::Fifo => Item::Fifo,
                Body::File(_) | Body::Omitted | Body::Removed => continue,
            };
            visit(&self.path(id), node.meta, item)?;
        }
        Ok(())
    }

    /// Number of node slots (removed nodes included); every [`NodeId`] is below it.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// A surviving node's kind, metadata and xattrs (a file's come from its inode);
    /// `None` for removed nodes and device nodes.
    pub fn node(&self, id: NodeId) -> Option<(NodeKind<'_>, Meta, &[Xattr])> {
        let node = &self.nodes[id];
        Some(match &node.body {
            Body::Dir(_) => (NodeKind::Dir, node.meta, &node.xattrs),
            Body::File(id) => {
                let inode = &self.inodes[*id];
                (NodeKind::File(*id), inode.meta, &inode.xattrs)
            }
            Body::Symlink(target) => (NodeKind::Symlink(target), node.meta, &node.xattrs),
            Body::Fifo => (NodeKind::Fifo, node.meta, &node.xattrs),
            Body::Omitted | Body::Removed => return None,
        })
    }

    /// The surviving entries of directory `dir`, sorted by name bytes (device nodes
    /// included: callers skip what [`Tree::node`] does not show).
    pub fn children(&self, dir: NodeId) -> impl Iterator<Item = (&str, NodeId)> + '_ {
        let children = match &self.nodes[dir].body {
            Body::Dir(children) => Some(children.iter().map(|(name, &id)| (&**name, id))),
            _ => None,
        };
        children.into_iter().flatten()
    }

    /// Number of file inodes; every [`InodeId`] is below it.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    fn children_rev(&self, dir: NodeId) -> Vec<NodeId> {
        match &self.nodes[dir].body {
            Body::Dir(children) => children.values().rev().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// The path of a node below the root (`usr/bin/sh`).
    pub fn path(&self, mut id: NodeId) -> String {
        let mut names = Vec::new();
        while id != ROOT {
            names.push(&*self.nodes[id].name);
            id = self.nodes[id].parent;
        }
        names.reverse();
        names.join("/")
    }
}
