//! The node table: which host inode each FUSE node id stands for, and how many lookups
//! the guest holds on it. One host inode has one node id, so hard links look alike.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::Stat;
use rustix::io::Errno;

use super::MAX_INODES;
use crate::virtio::fs::abi::ROOT_ID;

/// A host inode: the device and inode numbers.
type Key = (u64, u64);

struct Node {
    fd: OwnedFd,
    key: Key,
    /// Lookups the guest has not forgotten yet.
    refs: u64,
}

pub struct Inodes {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<Key, u64>,
    next: u64,
}

fn key(st: &Stat) -> Key {
    (st.st_dev, st.st_ino)
}

impl Inodes {
    /// A table holding only the root, which is never forgotten.
    pub fn new(root: OwnedFd, st: &Stat) -> Self {
        let mut table = Self {
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            next: ROOT_ID + 1,
        };
        table.by_key.insert(key(st), ROOT_ID);
        table.nodes.insert(
            ROOT_ID,
            Node {
                fd: root,
                key: key(st),
                refs: 1,
            },
        );
        table
    }

    /// Drops every node but the root.
    pub fn reset(&mut self) {
        self.nodes.retain(|&id, _| id == ROOT_ID);
        self.by_key.retain(|_, id| *id == ROOT_ID);
    }

    pub fn fd(&self, node: u64) -> Result<BorrowedFd<'_>, Errno> {
        self.nodes
            .get(&node)
            .map(|n| n.fd.as_fd())
            .ok_or(Errno::NOENT)
    }

    /// Takes a lookup reference on the inode `fd` opens (stat `st`): its existing node
    /// id, or a new one holding `fd`.
    pub fn insert(&mut self, fd: OwnedFd, st: &Stat) -> Result<u64, Errno> {
        if let Some(&id) = self.by_key.get(&key(st)) {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.refs = node.refs.saturating_add(1);
                return Ok(id);
            }
        }
        if self.nodes.len() >= MAX_INODES {
            return Err(Errno::NFILE);
        }
        let id = self.next;
        self.next += 1;
        self.by_key.insert(key(st), id);
        self.nodes.insert(
            id,
            Node {
                fd,
                key: key(st),
                refs: 1,
            },
        );
        Ok(id)
    }

    /// Drops `count` references; the node goes with its last one. Unknown ids and the
    /// root are ignored (a guest may forget what it never had; it gains nothing).
    pub fn forget(&mut self, id: u64, count: u64) {
        if id == ROOT_ID {
            return;
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.refs = node.refs.saturating_sub(count);
        if node.refs == 0 {
            let key = node.key;
            self.nodes.remove(&id);
            self.by_key.remove(&key);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}
