//! The expected SHA-256 of every 4 KiB block of a verified disk, without holding the list
//! in memory: the list file (32 bytes per block, 8 MiB per GiB of image) stays on disk and
//! is read a group of [`GROUP_BLOCKS`] hashes at a time. What stays resident is one digest
//! per group (32 bytes per MiB of image) taken while the list was read once at start, and
//! the last few groups read. A group read later must hash to its digest, so a list changed
//! on disk during the run fails verification like a changed block.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

/// Block hashes per group: one group is 8 KiB of list and covers 1 MiB of disk.
const GROUP_BLOCKS: u64 = 256;
/// Bytes of one block hash.
const HASH_LEN: usize = 32;
/// Groups kept after reading them (guest reads are mostly sequential or clustered).
const CACHED_GROUPS: usize = 4;

/// A disk's block hash list, read on demand and checked against per-group digests.
pub struct BlockHashes {
    list: File,
    blocks: u64,
    group_digests: Vec<[u8; 32]>,
    /// Recently read groups, most recent last: (group index, its hashes).
    cache: Vec<(u64, Vec<[u8; 32]>)>,
}

/// Why a block's expected hash is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum BlockHashError {
    /// The list could not be read.
    #[error("cannot read the block hash list")]
    Io(#[from] io::Error),
    /// The list's length is not a whole number of hashes.
    #[error("the block hash list is {0} bytes, not a whole number of 32-byte hashes")]
    Length(u64),
    /// A group of the list no longer matches what was read at start.
    #[error("group {0} of the block hash list changed on disk")]
    Changed(u64),
    /// The block is beyond the list.
    #[error("block {0} is beyond the block hash list")]
    OutOfRange(u64),
}

impl BlockHashes {
    /// Reads `list` once and returns it with the SHA-256 of its whole
    /// content, which the caller checks against what it expects (the list's name).
    pub fn read(list: File) -> Result<(Self, [u8; 32]), BlockHashError> {
        let mut whole = Sha256::new();
        let mut group_digests = Vec::new();
        let mut group = vec![0u8; usize_of(GROUP_BLOCKS) * HASH_LEN];
        let mut total = 0u64;
        loop {
            let filled = read_full(&list, &mut group, total)?;
            if filled == 0 {
                break;
            }
            whole.update(&group[..filled]);
            group_digests.push(Sha256::digest(&group[..filled]).into());
            total += filled as u64;
            if filled < group.len() {
                break;
            }
        }
        if !total.is_multiple_of(HASH_LEN as u64) {
            return Err(BlockHashError::Length(total));
        }
        let hashes = Self {
            list,
            blocks: total / HASH_LEN as u64,
            group_digests,
            cache: Vec::with_capacity(CACHED_GROUPS),
        };
        Ok((hashes, whole.finalize().into()))
    }

    /// Number of blocks the list covers.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The expected hash of `block`.
    pub(crate) fn expected(&mut self, block: u64) -> Result<[u8; 32], BlockHashError> {
        if block >= self.blocks {
            return Err(BlockHashError::OutOfRange(block));
        }
        let group = block / GROUP_BLOCKS;
        let at = usize_of(block % GROUP_BLOCKS);
        if let Some(found) = self.cache.iter().position(|(index, _)| *index == group) {
            let entry = self.cache.remove(found);
            let hash = entry.1[at];
            self.cache.push(entry);
            return Ok(hash);
        }
        let hashes = self.load_group(group)?;
        let hash = hashes[at];
        if self.cache.len() == CACHED_GROUPS {
            self.cache.remove(0);
        }
        self.cache.push((group, hashes));
        Ok(hash)
    }

    /// Reads group `group` from the list and checks it against its digest.
    fn load_group(&self, group: u64) -> Result<Vec<[u8; 32]>, BlockHashError> {
        let first = group * GROUP_BLOCKS;
        let count = (self.blocks - first).min(GROUP_BLOCKS);
        let mut bytes = vec![0u8; usize_of(count) * HASH_LEN];
        let read = read_full(&self.list, &mut bytes, first * HASH_LEN as u64)?;
        let expected = self.group_digests.get(usize_of(group));
        if read != bytes.len() || expected != Some(&Sha256::digest(&bytes).into()) {
            return Err(BlockHashError::Changed(group));
        }
        Ok(bytes
            .chunks_exact(HASH_LEN)
            .map(|hash| {
                let mut out = [0u8; 32];
                out.copy_from_slice(hash);
                out
            })
            .collect())
    }
}

/// Fills `buf` from `file` at `offset` until it is full or the file ends; returns how many
/// bytes were read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::virtio::block::tests::temp_file;

    /// A list of `blocks` distinct hashes (hash i is SHA-256 of i) and its file.
    fn list(blocks: u64) -> (Vec<[u8; 32]>, File) {
        let hashes: Vec<[u8; 32]> = (0..blocks)
            .map(|i| Sha256::digest(i.to_le_bytes()).into())
            .collect();
        let bytes: Vec<u8> = hashes.iter().flatten().copied().collect();
        (hashes, temp_file(&bytes))
    }

    #[test]
    fn every_block_across_groups_gets_its_hash_and_the_whole_digest_is_returned() {
        let blocks = 3 * GROUP_BLOCKS + 17;
        let (expected, file) = list(blocks);
        let whole: [u8; 32] = Sha256::digest(expected.concat()).into();
        let (mut hashes, digest) = BlockHashes::read(file).expect("read");
        assert_eq!(digest, whole);
        assert_eq!(hashes.blocks(), blocks);
        assert_eq!(hashes.group_digests.len(), 4);
        // Out of order, revisiting groups beyond the cache's size.
        for block in (0..blocks).rev().chain(0..blocks).step_by(7) {
            assert_eq!(
                hashes.expected(block).expect("hash"),
                expected[usize_of(block)]
            );
        }
        assert!(hashes.cache.len() <= CACHED_GROUPS);
        assert!(matches!(
            hashes.expected(blocks),
            Err(BlockHashError::OutOfRange(_))
        ));
    }

    #[test]
    fn a_list_changed_after_the_start_fails_its_group() {
        let (_, file) = list(2 * GROUP_BLOCKS);
        let writer = file.try_clone().expect("clone");
        let (mut hashes, _) = BlockHashes::read(file).expect("read");
        writer
            .write_all_at(&[0xff; 32], 32 * (GROUP_BLOCKS + 3))
            .expect("tamper");
        assert!(hashes.expected(0).is_ok());
        assert!(matches!(
            hashes.expected(GROUP_BLOCKS),
            Err(BlockHashError::Changed(1))
        ));
        writer.set_len(32 * GROUP_BLOCKS).expect("truncate");
        assert!(matches!(
            hashes.expected(GROUP_BLOCKS + 1),
            Err(BlockHashError::Changed(1))
        ));
    }

    #[test]
    fn a_list_of_partial_hashes_is_refused() {
        assert!(matches!(
            BlockHashes::read(temp_file(&[0u8; 33])),
            Err(BlockHashError::Length(33))
        ));
        let (hashes, _) = BlockHashes::read(temp_file(&[])).expect("empty");
        assert_eq!(hashes.blocks(), 0);
    }
}
