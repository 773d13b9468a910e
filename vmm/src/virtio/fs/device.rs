//! The virtio-fs device (virtio 1.2 §5.11): a hiprio queue (FORGET) and one request
//! queue, each chain a FUSE request in its device-readable part and room for the reply in
//! its device-writable part. Chains are copied in and out through bounded buffers, so
//! the server only ever parses host memory of a size we chose.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};

use super::abi::OutHeader;
use super::server::{Server, MAX_REQUEST};
use super::MAX_TAG_LEN;
use crate::virtio::{drain_queue_budgeted, read_config_space, DeviceError, VirtioDevice};
use crate::GuestMemory;

/// virtio device ID of a file system device (§5.11.1).
const VIRTIO_ID_FS: u32 = 26;
/// hiprio holds only FORGETs; the request queue is large enough for a 1 MiB WRITE or READ
/// in page-sized descriptors (Linux caps a request at the queue size less 4).
const QUEUE_SIZES: [u16; 2] = [128, 1024];
/// `struct virtio_fs_config`: the tag and num_request_queues.
const CONFIG_LEN: usize = MAX_TAG_LEN + 4;
/// Request bytes served per run before the worker is asked to come back: the transport
/// stays locked while the device works, and the guest's interrupt handler needs it.
const WORK_BUDGET: u64 = 4 << 20;

pub struct Fs {
    config: [u8; CONFIG_LEN],
    server: Server,
    request: Vec<u8>,
    reply: Vec<u8>,
    writable: Vec<(GuestAddress, u32)>,
    more: Arc<AtomicBool>,
}

impl Fs {
    pub fn new(tag: &str, server: Server) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        let tag = tag.as_bytes();
        let n = tag.len().min(MAX_TAG_LEN);
        config[..n].copy_from_slice(&tag[..n]);
        config[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Self {
            config,
            server,
            request: Vec::new(),
            reply: Vec::new(),
            writable: Vec::new(),
            more: Arc::default(),
        }
    }

    /// A device sharing `root` with the policy every share gets, built without KVM or a
    /// worker thread: for the fuzz targets (`fuzz/`), which drive it as a hostile driver.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn for_fuzzing(root: &std::path::Path, read_only: bool) -> std::io::Result<Self> {
        use super::share::{IdMap, Policy, Share, XattrPolicy};
        let policy = Policy {
            read_only,
            xattrs: XattrPolicy {
                privileged_writes: false,
            },
            ids: IdMap::for_this_process(),
        };
        Ok(Self::new("fuzz", Server::new(Share::new(root, policy)?)))
    }

    pub(crate) fn more_work(&self) -> Arc<AtomicBool> {
        self.more.clone()
    }

    /// Serves one chain; returns the bytes written into it and the request's size.
    fn serve(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> (u32, usize) {
        if self.gather(chain, mem).is_err() {
            return (0, 0);
        }
        self.server.handle(&self.request, &mut self.reply);
        let room: u64 = self.writable.iter().map(|&(_, len)| u64::from(len)).sum();
        if self.reply.len() as u64 > room {
            // The guest left too little room for the answer: say so if the header fits.
            let header = std::mem::size_of::<OutHeader>();
            if room < header as u64 {
                return (0, self.request.len());
            }
            let unique = self
                .reply
                .get(8..16)
                .map_or([0; 8], |u| u.try_into().unwrap_or([0; 8]));
            self.reply.truncate(header);
            self.reply[0..4].copy_from_slice(&16u32.to_le_bytes());
            self.reply[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
            self.reply[8..16].copy_from_slice(&unique);
        }
        let written = self.scatter(mem);
        (written, self.request.len() + self.reply.len())
    }

    /// Copies the chain's readable part into `request` (at most MAX_REQUEST bytes: a longer
    /// request arrives cut short, and its header's length then fails the server's check)
    /// and notes its writable part. A readable descriptor after a writable one breaks the
    /// chain's layout (§2.7.4.2) and the chain is dropped unanswered.
    fn gather(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<(), ()> {
        self.request.clear();
        self.writable.clear();
        for desc in chain {
            if desc.is_write_only() {
                self.writable.push((desc.addr(), desc.len()));
                continue;
            }
            if !self.writable.is_empty() {
                return Err(());
            }
            let room = MAX_REQUEST - self.request.len();
            let take = usize::try_from(desc.len()).map_or(room, |len| len.min(room));
            let start = self.request.len();
            self.request.resize(start + take, 0);
            mem.read_slice(&mut self.request[start..], desc.addr())
                .map_err(|_| ())?;
        }
        Ok(())
    }

    /// Copies the reply into the writable part; returns the bytes written.
    fn scatter(&self, mem: &GuestMemory) -> u32 {
        let mut rest = &self.reply[..];
        let mut written = 0u32;
        for &(addr, len) in &self.writable {
            if rest.is_empty() {
                break;
            }
            let n = usize::try_from(len).map_or(rest.len(), |len| len.min(rest.len()));
            if mem.write_slice(&rest[..n], addr).is_err() {
                break;
            }
            rest = &rest[n..];
            written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
        written
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
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
            let (len, cost) = self.serve(chain, mem);
            // Even an empty request costs its round trip.
            (len, (cost as u64).max(4096))
        })
    }
}
