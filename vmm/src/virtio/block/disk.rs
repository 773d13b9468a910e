//! The host file behind a virtio-blk device, and its optional integrity check: reads go
//! through one bounded bounce buffer in whole 4 KiB blocks, and with a block hash list every
//! block is hashed and compared before any of its bytes leave this module. The file is
//! never loaded whole; it may be far larger than host memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::hashes::BlockHashes;
use super::BLOCK_SIZE;

/// Called with the index of a 4 KiB block whose contents do not match its hash, each time
/// a read hits it (the guest sees an I/O error; a retrying guest may cause several calls).
pub type CorruptionHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Blocks read from the file at once: the bounce buffer is this many 4 KiB blocks.
const BOUNCE_BLOCKS: usize = 32;
/// Most bytes of an identification string (VIRTIO_BLK_ID_BYTES).
pub const MAX_ID_LEN: usize = 20;

/// A disk to give the guest as a virtio-blk device.
pub struct DiskConfig {
    /// The disk image; its size must be a multiple of 4096 bytes. Only read with pread
    /// (and written with pwrite if writable), so the file position does not matter.
    pub file: File,
    /// Whether the guest may only read (VIRTIO_BLK_F_RO; writes get an I/O error). A disk
    /// with `block_hashes` must be read-only.
    pub read_only: bool,
    /// SHA-256 of each 4 KiB block of `file`, in order, one per block: every read is
    /// checked against them, and a mismatch is an I/O error for the guest.
    pub block_hashes: Option<BlockHashes>,
    /// What VIRTIO_BLK_T_GET_ID answers (`/sys/block/vdX/serial`), at most 20 bytes.
    pub id: String,
    /// Told about every block that fails verification.
    pub on_corrupt: CorruptionHook,
}

/// Why a [`DiskConfig`] cannot become a device.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image's size could not be read.
    #[error("cannot read the size of the disk image")]
    Metadata(#[source] io::Error),
    /// The image is not whole 4 KiB blocks.
    #[error("disk image of {0} bytes is not a whole number of 4096-byte blocks")]
    Size(u64),
    /// The hash list does not have one entry per block.
    #[error("disk image has {blocks} blocks but {hashes} block hashes were given")]
    HashCount {
        /// Blocks in the image.
        blocks: u64,
        /// Entries in the list.
        hashes: u64,
    },
    /// Verified disks cannot be written: a write would invalidate the hash list.
    #[error("a disk with block hashes must be read-only")]
    WritableVerified,
    /// The identification string is longer than virtio-blk carries.
    #[error("disk id {0:?} is longer than {MAX_ID_LEN} bytes")]
    IdTooLong(String),
}

/// Why the disk could not serve a request that was well formed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The host file failed (or shrank under us).
    #[error("disk image I/O failed")]
    Io(#[from] io::Error),
    /// A block did not match its hash.
    #[error("block {0} failed verification")]
    Corrupt(u64),
    /// Guest memory could not be accessed.
    #[error("guest memory access failed")]
    Memory,
}

/// An opened, validated disk image.
pub(crate) struct Disk {
    file: File,
    read_only: bool,
    hashes: Option<BlockHashes>,
    on_corrupt: CorruptionHook,
    blocks: u64,
    bounce: Vec<u8>,
}

impl Disk {
    /// Validates `config` and returns the disk and its identification bytes (zero-padded).
    pub(crate) fn new(config: DiskConfig) -> Result<(Self, [u8; MAX_ID_LEN]), DiskError> {
        let DiskConfig {
            file,
            read_only,
            block_hashes,
            id,
            on_corrupt,
        } = config;
        let mut id_bytes = [0u8; MAX_ID_LEN];
        id_bytes
            .get_mut(..id.len())
            .ok_or_else(|| DiskError::IdTooLong(id.clone()))?
            .copy_from_slice(id.as_bytes());
        let size = file.metadata().map_err(DiskError::Metadata)?.len();
        if !size.is_multiple_of(BLOCK_SIZE) {
            return Err(DiskError::Size(size));
        }
        let blocks = size / BLOCK_SIZE;
        if let Some(hashes) = &block_hashes {
            if hashes.blocks() != blocks {
                return Err(DiskError::HashCount {
                    blocks,
                    hashes: hashes.blocks(),
                });
            }
            if !read_only {
                return Err(DiskError::WritableVerified);
            }
        }
        let disk = Self {
            file,
            read_only,
            hashes: block_hashes,
            on_corrupt,
            blocks,
            bounce: vec![0; BOUNCE_BLOCKS * BLOCK_LEN],
        };
        Ok((disk, id_bytes))
    }

    /// Size in bytes.
    pub(crate) fn capacity(&self) -> u64 {
        self.blocks * BLOCK_SIZE
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `len` bytes at `offset` (within the capacity) and hands them to `sink` in
    /// order, in pieces. Whole covering blocks are read and, with a hash list, verified
    /// before any of their bytes reach `sink`; the first bad block ends the read.
    pub(crate) fn read(
        &mut self,
        offset: u64,
        len: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), ServeError>,
    ) -> Result<(), ServeError> {
        let Some(end) = offset
            .checked_add(len)
            .filter(|&end| len > 0 && end <= self.capacity())
        else {
            return Err(ServeError::Io(io::ErrorKind::InvalidInput.into()));
        };
        let mut block = offset / BLOCK_SIZE;
        let mut pos = offset;
        while pos < end {
            let remaining_blocks = (end - 1) / BLOCK_SIZE - block + 1;
            let count =
                usize::try_from(remaining_blocks).map_or(BOUNCE_BLOCKS, |n| n.min(BOUNCE_BLOCKS));
            let chunk_start = block * BLOCK_SIZE;
            let buf = &mut self.bounce[..count * BLOCK_LEN];
            self.file.read_exact_at(buf, chunk_start)?;
            if let Some(hashes) = &mut self.hashes {
                for (i, data) in (block..).zip(buf.chunks_exact(BLOCK_LEN)) {
                    if !block_matches(hashes, i, data) {
                        (self.on_corrupt)(i);
                        return Err(ServeError::Corrupt(i));
                    }
                }
            }
            let chunk_end = chunk_start + as_u64(buf.len());
            // Both are within the chunk just read, so they fit usize.
            let from = usize::try_from(pos - chunk_start).unwrap_or(0);
            let to = usize::try_from(end.min(chunk_end) - chunk_start).unwrap_or(0);
            sink(buf.get(from..to).ok_or(ServeError::Memory)?)?;
            pos = chunk_start + as_u64(to);
            block += as_u64(count);
        }
        Ok(())
    }

    /// Writes `len` bytes at `offset` (within the capacity), taking them from `source` a
    /// bounce buffer at a time: `source` fills the slice it is given.
    pub(crate) fn write(
        &mut self,
        offset: u64,
        len: u64,
        mut source: impl FnMut(&mut [u8]) -> Result<(), ServeError>,
    ) -> Result<(), ServeError> {
        if self.read_only {
            return Err(ServeError::ReadOnly);
        }
        let mut pos = offset;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.capacity())
            .ok_or(ServeError::Io(io::ErrorKind::InvalidInput.into()))?;
        while pos < end {
            let n =
                usize::try_from(end - pos).map_or(self.bounce.len(), |n| n.min(self.bounce.len()));
            let buf = &mut self.bounce[..n];
            source(buf)?;
            self.file.write_all_at(buf, pos)?;
            pos += as_u64(n);
        }
        Ok(())
    }

    /// Makes completed writes durable; nothing to do on a read-only disk.
    pub(crate) fn flush(&self) -> Result<(), ServeError> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// The block size as a buffer length.
const BLOCK_LEN: usize = 4096;
const _: () = assert!(BLOCK_LEN as u64 == BLOCK_SIZE);

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Whether block `index`'s bytes hash to its entry (an entry that cannot be read, or whose
/// group of the list changed on disk, never matches).
fn block_matches(hashes: &mut BlockHashes, index: u64, data: &[u8]) -> bool {
    let expected = hashes.expected(index);
    expected.is_ok_and(|expected| Sha256::digest(data).as_slice() == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::tests::{hashes_of, temp_file};
    use std::sync::Mutex;

    fn config(data: &[u8], hashes: Option<BlockHashes>) -> DiskConfig {
        DiskConfig {
            file: temp_file(data),
            read_only: true,
            block_hashes: hashes,
            id: "disk".into(),
            on_corrupt: Arc::new(|_| {}),
        }
    }

    fn read_all(disk: &mut Disk, offset: u64, len: u64) -> Result<Vec<u8>, ServeError> {
        let mut out = Vec::new();
        disk.read(offset, len, |piece| {
            out.extend_from_slice(piece);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn construction_validates_size_hashes_mode_and_id() {
        let data = vec![7u8; 3 * BLOCK_LEN];
        assert!(matches!(
            Disk::new(config(&data[..4000], None)),
            Err(DiskError::Size(4000))
        ));
        assert!(matches!(
            Disk::new(config(&data, Some(hashes_of(&data[..2 * BLOCK_LEN])))),
            Err(DiskError::HashCount {
                blocks: 3,
                hashes: 2
            })
        ));
        let mut writable = config(&data, Some(hashes_of(&data)));
        writable.read_only = false;
        assert!(matches!(
            Disk::new(writable),
            Err(DiskError::WritableVerified)
        ));
        let mut long = config(&data, None);
        long.id = "x".repeat(21);
        assert!(matches!(Disk::new(long), Err(DiskError::IdTooLong(_))));

        let mut exact = config(&data, Some(hashes_of(&data)));
        exact.id = "y".repeat(20);
        let (disk, id) = Disk::new(exact).expect("valid");
        assert_eq!(disk.capacity(), 3 * BLOCK_SIZE);
        assert_eq!(id, [b'y'; 20]);
        let (_, short) = Disk::new(config(&data, None)).expect("valid");
        assert_eq!(&short[..5], b"disk\0");
    }

    #[test]
    fn reads_span_chunks_and_start_mid_block() {
        // More blocks than one bounce buffer holds, each byte telling where it is.
        let data: Vec<u8> = (0..(BOUNCE_BLOCKS + 5) * BLOCK_LEN)
            .map(|i| u8::try_from(i % 251).expect("byte"))
            .collect();
        let (mut disk, _) = Disk::new(config(&data, Some(hashes_of(&data)))).expect("disk");

        let offset = 3 * 512;
        let len = as_u64((BOUNCE_BLOCKS + 2) * BLOCK_LEN + 1024);
        let out = read_all(&mut disk, offset, len).expect("read");

        let start = usize::try_from(offset).expect("offset");
        assert_eq!(out, data[start..start + out.len()]);
        assert_eq!(as_u64(out.len()), len);
        let end = disk.capacity();
        assert!(read_all(&mut disk, end - 512, 1024).is_err());
        assert!(read_all(&mut disk, 0, 0).is_err());
    }

    #[test]
    fn a_corrupt_block_stops_the_read_before_its_bytes_and_is_reported() {
        let mut data = vec![1u8; 4 * BLOCK_LEN];
        let hashes = hashes_of(&data);
        data[2 * BLOCK_LEN + 100] ^= 0x40;
        let reported = Arc::new(Mutex::new(Vec::new()));
        let mut config = config(&data, Some(hashes));
        let log = reported.clone();
        config.on_corrupt = Arc::new(move |block| log.lock().expect("lock").push(block));
        let (mut disk, _) = Disk::new(config).expect("disk");

        assert!(read_all(&mut disk, 0, 2 * BLOCK_SIZE).is_ok());
        let mut seen = Vec::new();
        let result = disk.read(BLOCK_SIZE + 512, 2 * BLOCK_SIZE, |piece| {
            seen.extend_from_slice(piece);
            Ok(())
        });

        assert!(matches!(result, Err(ServeError::Corrupt(2))));
        assert!(
            seen.is_empty(),
            "verification happens before any byte is handed on"
        );
        assert_eq!(*reported.lock().expect("lock"), [2]);
        assert!(read_all(&mut disk, 3 * BLOCK_SIZE, BLOCK_SIZE).is_ok());
    }

    #[test]
    fn writes_reach_the_file_only_on_writable_disks() {
        let data = vec![0u8; 2 * BLOCK_LEN];
        let (mut ro, _) = Disk::new(config(&data, None)).expect("disk");
        assert!(matches!(
            ro.write(0, 512, |_| Ok(())),
            Err(ServeError::ReadOnly)
        ));
        let mut writable = config(&data, None);
        writable.read_only = false;
        let (mut disk, _) = Disk::new(writable).expect("disk");

        disk.write(1024, 512, |buf| {
            buf.fill(9);
            Ok(())
        })
        .expect("write");
        disk.flush().expect("flush");

        let out = read_all(&mut disk, 0, 2 * BLOCK_SIZE).expect("read");
        assert!(out[..1024].iter().all(|&b| b == 0));
        assert!(out[1024..1536].iter().all(|&b| b == 9));
        assert!(out[1536..].iter().all(|&b| b == 0));
    }
}
