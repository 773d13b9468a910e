//! virtio-blk device (virtio 1.2 §5.2) on one request queue, backed by a host file and,
//! for image disks, checked block by block against a SHA-256 list. Requests are served
//! by the disk's own `katalite-blkN` thread (see [`worker`]), never on a vCPU.

mod disk;
mod hashes;
mod request;
#[cfg(test)]
pub(crate) mod tests;
pub(crate) mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};

pub use disk::{CorruptionHook, DiskConfig, DiskError, MAX_ID_LEN};
pub use hashes::{BlockHashError, BlockHashes};

use super::{drain_queue_budgeted, read_config_space, DeviceError, VirtioDevice};
use crate::GuestMemory;
use disk::{Disk, ServeError};
use request::{Kind, Rejected, Request, RequestError, Segment};

/// virtio-blk addresses the disk in 512-byte sectors whatever its block size (§5.2.6).
const SECTOR_SIZE: u64 = 512;
/// The disk's logical block size (VIRTIO_BLK_F_BLK_SIZE) and its verification unit.
const BLOCK_SIZE: u64 = 4096;
/// Size of the request queue.
const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (VIRTIO_BLK_F_SEG_MAX). Linux sizes its requests to it,
/// so it also bounds what one request costs to parse.
const SEG_MAX: usize = 128;
/// Largest data segment (VIRTIO_BLK_F_SIZE_MAX): with SEG_MAX it caps what Linux puts in
/// one request at 4 MiB, which is what this device accepts.
const SIZE_MAX: u32 = 32 * 1024;
/// Most data bytes one request may carry.
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bytes served per run of the queue before the worker is asked to come back: the
/// transport stays locked while the device works, and the guest's interrupt handler
/// needs it.
const WORK_BUDGET: u64 = 1 << 20;
/// `struct virtio_blk_config` up to blk_size (§5.2.4); later fields belong to features
/// this device does not offer and read as zero.
const CONFIG_LEN: usize = 24;

/// The virtio-blk device.
pub struct Block {
    disk: Disk,
    id: [u8; MAX_ID_LEN],
    config: [u8; CONFIG_LEN],
    /// The current request's data segments, kept to reuse the allocation.
    segments: Vec<Segment>,
    /// Set when a run of the queue stopped at the budget with chains left; the worker
    /// runs it again.
    more: Arc<AtomicBool>,
}

impl Block {
    /// A device for `config`, validated (see [`DiskError`]).
    pub fn new(config: DiskConfig) -> Result<Self, DiskError> {
        let (disk, id) = Disk::new(config)?;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(disk.capacity() / SECTOR_SIZE).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        let seg_max = u32::try_from(SEG_MAX).unwrap_or(u32::MAX);
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // 16..20: geometry, only meaningful with VIRTIO_BLK_F_GEOMETRY.
        let blk_size = u32::try_from(BLOCK_SIZE).unwrap_or(u32::MAX);
        config[20..24].copy_from_slice(&blk_size.to_le_bytes());
        Ok(Self {
            disk,
            id,
            config,
            segments: Vec::with_capacity(SEG_MAX),
            more: Arc::default(),
        })
    }

    /// The flag through which the device asks its worker to run the queue again.
    pub(crate) fn more_work(&self) -> Arc<AtomicBool> {
        self.more.clone()
    }

    /// Serves one chain and returns the used length: the bytes written to its
    /// device-writable part (data read plus the status byte), 1 for a status alone, and
    /// 0 when the chain has no status byte to answer in. Also returns what it cost, in
    /// bytes moved (a sector at least), for the work budget.
    fn serve(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> (u32, u64) {
        let parsed = request::parse(chain, mem, self.disk.capacity(), &mut self.segments);
        let cost = parsed
            .as_ref()
            .map_or(0, |request| u64::from(request.data_len))
            .max(SECTOR_SIZE);
        let (status, code, written) = match parsed {
            Ok(request) => match self.execute(&request, mem) {
                Ok(written) => (request.status, VIRTIO_BLK_S_OK, written),
                Err(_) => (request.status, VIRTIO_BLK_S_IOERR, 0),
            },
            Err(Rejected { status: None, .. }) => return (0, cost),
            Err(Rejected {
                status: Some(status),
                error,
            }) => {
                let code = match error {
                    RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
                    _ => VIRTIO_BLK_S_IOERR,
                };
                (status, code, 0)
            }
        };
        // The codes are small constants.
        let code = u8::try_from(code).unwrap_or(u8::MAX);
        let used = match mem.write_obj(code, status) {
            Ok(()) => written.saturating_add(1),
            // Checked inside guest memory by parse; a vanished byte leaves nothing written.
            Err(_) => 0,
        };
        (used, cost)
    }

    /// Carries out a well-formed request; returns the data bytes written to the guest.
    fn execute(&mut self, request: &Request, mem: &GuestMemory) -> Result<u32, ServeError> {
        let offset = request.sector.saturating_mul(SECTOR_SIZE);
        let len = u64::from(request.data_len);
        let mut cursor = Cursor::new(mem, &self.segments);
        match request.kind {
            Kind::In => {
                self.disk.read(offset, len, |piece| cursor.write(piece))?;
                Ok(request.data_len)
            }
            Kind::Out => {
                self.disk.write(offset, len, |buf| cursor.read(buf))?;
                Ok(0)
            }
            Kind::Flush => {
                self.disk.flush()?;
                Ok(0)
            }
            Kind::GetId => {
                // The id is NUL-padded to 20 bytes; a shorter buffer gets what fits (§5.2.6).
                let n = self
                    .id
                    .len()
                    .min(usize::try_from(len).unwrap_or(usize::MAX));
                cursor.write(&self.id[..n])?;
                Ok(u32::try_from(n).unwrap_or(0))
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let features = 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.disk.read_only() {
            features | 1 << VIRTIO_BLK_F_RO
        } else {
            features
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let more = self.more.clone();
        drain_queue_budgeted(queue, mem, WORK_BUDGET, &more, |chain| {
            self.serve(chain, mem)
        })
    }
}

/// Walks a request's data segments, copying bytes between them and the host in order.
struct Cursor<'a> {
    mem: &'a GuestMemory,
    segments: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(mem: &'a GuestMemory, segments: &'a [Segment]) -> Self {
        Self {
            mem,
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// The guest range the next `want` bytes go to or come from, at most to the end of
    /// the current segment; advances past it.
    fn next_range(&mut self, want: usize) -> Result<(GuestAddress, usize), ServeError> {
        loop {
            let segment = self.segments.get(self.index).ok_or(ServeError::Memory)?;
            let room = segment.len - self.offset;
            if room == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = usize::try_from(room).map_or(want, |room| room.min(want));
            let addr = segment
                .addr
                .0
                .checked_add(u64::from(self.offset))
                .ok_or(ServeError::Memory)?;
            // n ≤ room, a u32.
            self.offset += u32::try_from(n).map_err(|_| ServeError::Memory)?;
            return Ok((GuestAddress(addr), n));
        }
    }

    fn write(&mut self, mut data: &[u8]) -> Result<(), ServeError> {
        while !data.is_empty() {
            let (addr, n) = self.next_range(data.len())?;
            let (now, rest) = data.split_at(n);
            self.mem
                .write_slice(now, addr)
                .map_err(|_| ServeError::Memory)?;
            data = rest;
        }
        Ok(())
    }

    fn read(&mut self, mut buf: &mut [u8]) -> Result<(), ServeError> {
        while !buf.is_empty() {
            let (addr, n) = self.next_range(buf.len())?;
            let (now, rest) = buf.split_at_mut(n);
            self.mem
                .read_slice(now, addr)
                .map_err(|_| ServeError::Memory)?;
            buf = rest;
        }
        Ok(())
    }
}
