//! A hostile virtio driver: a program of register accesses, guest memory writes and queue
//! operations, decoded from the fuzz input and run against one device behind the real
//! [`MmioTransport`], in guest memory of [`MEM_SIZE`] bytes laid out as below. Besides raw
//! accesses, [`Op::Init`] and [`Op::Chain`] do what a well-behaved driver does, so the
//! fuzzer reaches the devices' request parsers instead of spending itself on the handshake.

// Register halves and buffer lengths (bounded by MEM_SIZE) are cut to 32 bits on purpose.
#![allow(clippy::cast_possible_truncation)]

use vm_memory::{Bytes, GuestAddress};
use vmm::virtio::{MmioTransport, VirtioDevice};
use vmm::{BusDevice, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::{put_bytes, Input};

/// Guest RAM, from guest physical address 0.
pub const MEM_SIZE: u64 = 0x4_0000;
/// Queue `q`'s rings: descriptor table at `RINGS + q * RING_STRIDE`, the available ring
/// [`AVAIL_OFFSET`] and the used ring [`USED_OFFSET`] after it (room for 1024 entries).
pub const RINGS: u64 = 0x1000;
pub const RING_STRIDE: u64 = 0x8000;
pub const AVAIL_OFFSET: u64 = 0x4000;
pub const USED_OFFSET: u64 = 0x5000;
/// Most queues the driver sets up (every device here has two or one).
pub const MAX_QUEUES: u8 = 4;
/// Buffers of [`Op::Chain`] go here, one after the other, wrapping around.
pub const DATA: u64 = RINGS + RING_STRIDE * MAX_QUEUES as u64;

// virtio-mmio registers (virtio 1.2 §4.2.2) and bits the driver uses.
const STATUS: u16 = 0x70;
const DEVICE_FEATURES: u16 = 0x10;
const DEVICE_FEATURES_SEL: u16 = 0x14;
const DRIVER_FEATURES: u16 = 0x20;
const DRIVER_FEATURES_SEL: u16 = 0x24;
const QUEUE_SEL: u16 = 0x30;
const QUEUE_NUM_MAX: u16 = 0x34;
const QUEUE_NUM: u16 = 0x38;
const QUEUE_READY: u16 = 0x44;
const QUEUE_NOTIFY: u16 = 0x50;
const QUEUE_DESC_LOW: u16 = 0x80;
const QUEUE_AVAIL_LOW: u16 = 0x90;
const QUEUE_USED_LOW: u16 = 0xa0;
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Register window accesses stay below this (the config space ends well before).
const WINDOW: u16 = 0x200;

/// One step of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// Reset, then the whole initialisation (§3.1.1): accept the offered features that
    /// `features` has, every queue at its rings with 2^`size_log2` entries (capped at the
    /// queue's maximum), DRIVER_OK.
    Init { features: u64, size_log2: u8 },
    /// A 32-bit write to a register (or the config space).
    Write { offset: u16, value: u32 },
    /// A write of any width (the config space, or an access the transport must ignore).
    WriteBytes { offset: u16, bytes: &'a [u8] },
    /// A read of `len` bytes (0 to 8).
    Read { offset: u16, len: u8 },
    /// Guest memory at `addr` (wrapped into RAM) gets `bytes`.
    Fill { addr: u32, bytes: &'a [u8] },
    /// Writes descriptor `index` of `queue`'s table as given.
    Desc {
        queue: u8,
        index: u16,
        addr: u32,
        len: u32,
        flags: u16,
        next: u16,
    },
    /// Puts `head` in `queue`'s available ring and publishes it.
    Avail { queue: u8, head: u16 },
    /// Writes QueueNotify.
    Notify { queue: u8 },
    /// A well-formed chain on `queue`, made available and notified: `readable` in
    /// 1 + `split % 4` descriptors (after a first one of its first 16 bytes, a virtio-blk
    /// header, with [`CHAIN_HEADER`]), then `writable` bytes of room in 1 + `split / 4 % 4`,
    /// then a 1-byte one (a status byte) with [`CHAIN_STATUS`].
    Chain {
        queue: u8,
        split: u8,
        readable: &'a [u8],
        writable: u16,
    },
    /// Device-specific input (a frame for the NIC, console input).
    Extra { bytes: &'a [u8] },
}

const OPS: u8 = 10;
/// [`Op::Chain`] flag: a 1-byte device-writable descriptor ends the chain.
pub const CHAIN_STATUS: u8 = 0x10;
/// [`Op::Chain`] flag: the first 16 readable bytes get a descriptor of their own.
pub const CHAIN_HEADER: u8 = 0x20;
/// Size of that header.
const CHAIN_HEADER_LEN: usize = 16;

impl<'a> Op<'a> {
    /// The next op of `input`, `None` once it runs out.
    pub fn decode(input: &mut Input<'a>) -> Option<Self> {
        let op = match input.u8()? % OPS {
            0 => Op::Init {
                features: input.u64()?,
                size_log2: input.u8()?,
            },
            1 => Op::Write {
                offset: input.u16()?,
                value: input.u32()?,
            },
            2 => Op::WriteBytes {
                offset: input.u16()?,
                bytes: input.bytes()?,
            },
            3 => Op::Read {
                offset: input.u16()?,
                len: input.u8()?,
            },
            4 => Op::Fill {
                addr: input.u32()?,
                bytes: input.bytes()?,
            },
            5 => Op::Desc {
                queue: input.u8()?,
                index: input.u16()?,
                addr: input.u32()?,
                len: input.u32()?,
                flags: input.u16()?,
                next: input.u16()?,
            },
            6 => Op::Avail {
                queue: input.u8()?,
                head: input.u16()?,
            },
            7 => Op::Notify { queue: input.u8()? },
            8 => Op::Chain {
                queue: input.u8()?,
                split: input.u8()?,
                readable: input.bytes()?,
                writable: input.u16()?,
            },
            _ => Op::Extra {
                bytes: input.bytes()?,
            },
        };
        Some(op)
    }

    /// Appends the encoding [`decode`](Self::decode) reads.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Op::Init {
                features,
                size_log2,
            } => {
                out.push(0);
                out.extend_from_slice(&features.to_le_bytes());
                out.push(size_log2);
            }
            Op::Write { offset, value } => {
                out.push(1);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            Op::WriteBytes { offset, bytes } => {
                out.push(2);
                out.extend_from_slice(&offset.to_le_bytes());
                put_bytes(out, bytes);
            }
            Op::Read { offset, len } => {
                out.push(3);
                out.extend_from_slice(&offset.to_le_bytes());
                out.push(len);
            }
            Op::Fill { addr, bytes } => {
                out.push(4);
                out.extend_from_slice(&addr.to_le_bytes());
                put_bytes(out, bytes);
            }
            Op::Desc {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => {
                out.push(5);
                out.push(queue);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&next.to_le_bytes());
            }
            Op::Avail { queue, head } => {
                out.push(6);
                out.push(queue);
                out.extend_from_slice(&head.to_le_bytes());
            }
            Op::Notify { queue } => out.extend_from_slice(&[7, queue]),
            Op::Chain {
                queue,
                split,
                readable,
                writable,
            } => {
                out.extend_from_slice(&[8, queue, split]);
                put_bytes(out, readable);
                out.extend_from_slice(&writable.to_le_bytes());
            }
            Op::Extra { bytes } => {
                out.push(9);
                put_bytes(out, bytes);
            }
        }
    }
}

/// Encodes a whole program.
pub fn program(ops: &[Op<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// The guest side of one device under test.
pub struct Driver {
    pub mem: GuestMemory,
    pub transport: MmioTransport,
    /// Keeps the interrupt eventfd's counter drained, as KVM's irqfd would.
    irq: EventFd,
    /// Entries of each queue as set at the last [`Op::Init`].
    sizes: [u16; MAX_QUEUES as usize],
    /// The next descriptor [`Op::Chain`] uses, per queue.
    next_desc: [u16; MAX_QUEUES as usize],
    /// Where the next [`Op::Chain`] buffer goes.
    data: u64,
}

impl Driver {
    /// `device` behind a fresh transport in fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let transport = MmioTransport::new(mem.clone(), device, irq.try_clone().expect("dup"));
        Self {
            mem,
            transport,
            irq,
            sizes: [16; MAX_QUEUES as usize],
            next_desc: [0; MAX_QUEUES as usize],
            data: DATA,
        }
    }

    /// Runs the program in `input`; `extra` handles [`Op::Extra`].
    pub fn run(&mut self, input: &[u8], mut extra: impl FnMut(&mut Self, &[u8])) {
        let mut input = Input::new(input);
        while let Some(op) = Op::decode(&mut input) {
            self.step(&op, &mut extra);
            let _ = self.irq.read();
        }
    }

    fn step(&mut self, op: &Op<'_>, extra: &mut impl FnMut(&mut Self, &[u8])) {
        match *op {
            Op::Init {
                features,
                size_log2,
            } => self.init(features, size_log2),
            Op::Write { offset, value } => self.write(offset % WINDOW, value),
            Op::WriteBytes { offset, bytes } => {
                let bytes = &bytes[..bytes.len().min(8)];
                self.transport.write(u64::from(offset % WINDOW), bytes);
            }
            Op::Read { offset, len } => {
                let mut data = [0u8; 8];
                let len = usize::from(len % 9);
                self.transport
                    .read(u64::from(offset % WINDOW), &mut data[..len]);
            }
            Op::Fill { addr, bytes } => self.fill(u64::from(addr) % MEM_SIZE, bytes),
            Op::Desc {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => self.desc(queue, index, u64::from(addr), len, flags, next),
            Op::Avail { queue, head } => self.avail(queue, head),
            Op::Notify { queue } => self.write(QUEUE_NOTIFY, u32::from(queue)),
            Op::Chain {
                queue,
                split,
                readable,
                writable,
            } => self.chain(queue % MAX_QUEUES, split, readable, writable),
            Op::Extra { bytes } => extra(self, bytes),
        }
    }

    pub fn write(&mut self, offset: u16, value: u32) {
        self.transport
            .write(u64::from(offset), &value.to_le_bytes());
    }

    pub fn read(&mut self, offset: u16) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn add_status(&mut self, bit: u32) {
        let status = self.read(STATUS);
        self.write(STATUS, status | bit);
    }

    fn init(&mut self, features: u64, size_log2: u8) {
        self.write(STATUS, 0);
        self.add_status(ACKNOWLEDGE);
        self.add_status(DRIVER);
        for sel in 0..2u32 {
            self.write(DEVICE_FEATURES_SEL, sel);
            let offered = self.read(DEVICE_FEATURES);
            let wanted = (features >> (32 * sel)) as u32 | u32::from(sel == 1);
            self.write(DRIVER_FEATURES_SEL, sel);
            // VIRTIO_F_VERSION_1 (bit 32) is always taken: without it FEATURES_OK fails.
            self.write(DRIVER_FEATURES, offered & wanted);
        }
        self.add_status(FEATURES_OK);
        for queue in 0..MAX_QUEUES {
            self.write(QUEUE_SEL, u32::from(queue));
            let max = self.read(QUEUE_NUM_MAX);
            if max == 0 {
                continue;
            }
            let size = (1u32 << (size_log2 % 11)).min(max);
            let base = RINGS + RING_STRIDE * u64::from(queue);
            // Fresh rings: nothing available or used yet.
            self.fill(base, &[0; RING_STRIDE as usize]);
            self.write(QUEUE_NUM, size);
            for (low, addr) in [
                (QUEUE_DESC_LOW, base),
                (QUEUE_AVAIL_LOW, base + AVAIL_OFFSET),
                (QUEUE_USED_LOW, base + USED_OFFSET),
            ] {
                self.write(low, addr as u32);
                self.write(low + 4, (addr >> 32) as u32);
            }
            self.write(QUEUE_READY, 1);
            self.sizes[usize::from(queue)] = u16::try_from(size).unwrap_or(u16::MAX);
            self.next_desc[usize::from(queue)] = 0;
        }
        self.add_status(DRIVER_OK);
    }

    fn fill(&mut self, addr: u64, bytes: &[u8]) {
        let room = usize::try_from(MEM_SIZE.saturating_sub(addr)).unwrap_or(0);
        let bytes = &bytes[..bytes.len().min(room)];
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("inside guest memory");
    }

    fn size(&self, queue: u8) -> u16 {
        self.sizes[usize::from(queue % MAX_QUEUES)].max(1)
    }

    fn desc(&mut self, queue: u8, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let queue = queue % MAX_QUEUES;
        let slot = u64::from(index % self.size(queue));
        let at = RINGS + RING_STRIDE * u64::from(queue) + slot * 16;
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.fill(at, &raw);
    }

    fn avail(&mut self, queue: u8, head: u16) {
        let queue = queue % MAX_QUEUES;
        let avail = RINGS + RING_STRIDE * u64::from(queue) + AVAIL_OFFSET;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let slot = u64::from(idx % self.size(queue));
        self.fill(avail + 4 + 2 * slot, &head.to_le_bytes());
        self.fill(avail + 2, &idx.wrapping_add(1).to_le_bytes());
    }

    /// Room for `len` bytes of buffer in the data area.
    fn buffer(&mut self, len: usize) -> (u64, usize) {
        let len = len.min((MEM_SIZE - DATA) as usize);
        if self.data + len as u64 > MEM_SIZE {
            self.data = DATA;
        }
        let addr = self.data;
        self.data += (len as u64).div_ceil(8) * 8;
        (addr, len)
    }

    fn chain(&mut self, queue: u8, split: u8, readable: &[u8], writable: u16) {
        let size = self.size(queue);
        let mut pieces: Vec<(u64, u32, u16)> = Vec::new();
        let mut readable_pieces = Vec::new();
        let mut rest = readable;
        if split & CHAIN_HEADER != 0 {
            let (header, tail) = rest.split_at(rest.len().min(CHAIN_HEADER_LEN));
            readable_pieces.push(header);
            rest = tail;
        }
        let n = usize::from(split % 4) + 1;
        readable_pieces.extend(rest.chunks(rest.len().div_ceil(n).max(1)));
        for part in readable_pieces {
            let (addr, len) = self.buffer(part.len());
            self.fill(addr, &part[..len]);
            pieces.push((addr, len as u32, 0));
        }
        let n = u16::from(split / 4 % 4) + 1;
        if writable > 0 {
            for _ in 0..n {
                let (addr, len) = self.buffer(usize::from(writable.div_ceil(n)));
                pieces.push((addr, len as u32, DESC_F_WRITE));
            }
        }
        if split & CHAIN_STATUS != 0 {
            let (addr, _) = self.buffer(1);
            pieces.push((addr, 1, DESC_F_WRITE));
        }
        pieces.truncate(usize::from(size));
        let Some(last) = pieces.len().checked_sub(1) else {
            return;
        };
        let head = self.next_desc[usize::from(queue)] % size;
        let mut index = head;
        for (i, &(addr, len, flags)) in pieces.iter().enumerate() {
            let next = (index + 1) % size;
            let flags = if i == last {
                flags
            } else {
                flags | DESC_F_NEXT
            };
            self.desc(queue, index, addr, len, flags, next);
            index = next;
        }
        self.next_desc[usize::from(queue)] = index;
        self.avail(queue, head);
        self.write(QUEUE_NOTIFY, u32::from(queue));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The used ring of `queue`: (index, [(head, len)]).
    fn used(driver: &Driver, queue: u64) -> (u16, Vec<(u32, u32)>) {
        let ring = RINGS + RING_STRIDE * queue + USED_OFFSET;
        let idx: u16 = driver.mem.read_obj(GuestAddress(ring + 2)).expect("idx");
        let elems = (0..u64::from(idx))
            .map(|i| {
                let at = GuestAddress(ring + 4 + 8 * i);
                let head: u32 = driver.mem.read_obj(at).expect("id");
                let len: u32 = driver.mem.read_obj(GuestAddress(at.0 + 4)).expect("len");
                (head, len)
            })
            .collect();
        (idx, elems)
    }

    #[test]
    fn chains_reach_the_device_and_come_back_used() {
        let mut driver = Driver::new(Box::new(vmm::virtio::Rng::new()));
        let read = Op::Chain {
            queue: 0,
            split: 0x04,
            readable: &[],
            writable: 64,
        };
        driver.run(
            &program(&[
                Op::Init {
                    features: u64::MAX,
                    size_log2: 4,
                },
                read.clone(),
                read,
            ]),
            |_, _| {},
        );
        assert_eq!(
            driver.read(STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        // Two chains of two 32-byte descriptors each, filled with entropy.
        assert_eq!(used(&driver, 0), (2, vec![(0, 64), (2, 64)]));
    }

    #[test]
    fn the_fs_seed_is_a_working_session() {
        let dir = tempfile::tempdir().expect("share");
        std::fs::write(dir.path().join("file"), b"hello\n").expect("file");
        std::fs::create_dir(dir.path().join("dir")).expect("dir");
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/corpus/virtio_fs/session"
        ))
        .expect("seed");
        let mut driver = Driver::new(vmm::virtio::fuzzing::fs(dir.path(), false).expect("fs"));
        driver.run(&seed[1..], |_, _| {});
        let (count, elems) = used(&driver, 1);
        assert_eq!(count, 10);
        // Error replies are a bare 16-byte header: INIT, LOOKUP, OPEN, READ ("hello\n"),
        // WRITE, OPENDIR, READDIR, MKDIR and SETXATTR all succeed.
        let lens: Vec<u32> = elems.iter().map(|&(_, len)| len).collect();
        assert_eq!(
            &lens[..9],
            &[80, 144, 32, 22, 24, 32, lens[6], 144, 16],
            "{lens:?}"
        );
        assert!(lens[6] > 16);
        assert_eq!(
            std::fs::read(dir.path().join("file")).expect("file"),
            b"heworld"
        );
    }

    #[test]
    fn the_console_seed_sets_up_the_port_and_moves_input() {
        use vmm::virtio::fuzzing::{console, CONSOLE_WORKER_QUEUES};
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/corpus/virtio_console/handshake"
        ))
        .expect("seed");
        let input = vmm::virtio::ConsoleInput::new();
        let mut driver = Driver::new(console(input.clone()).expect("console"));
        // What the fuzz target's extra op does.
        driver.run(&seed, |driver, bytes| {
            input.send(bytes).expect("input");
            for queue in CONSOLE_WORKER_QUEUES {
                driver.transport.run_queue(queue);
            }
        });
        // PORT_ADD, PORT_NAME ("katalite.channel"), PORT_OPEN; then the input, which was
        // held until the port was opened.
        let (count, elems) = used(&driver, 2);
        assert_eq!(count, 3);
        let lens: Vec<u32> = elems.iter().map(|&(_, len)| len).collect();
        assert_eq!(lens, [8, 24, 8]);
        assert_eq!(used(&driver, 3).0, 3);
        let (count, elems) = used(&driver, 0);
        assert_eq!(count, 1);
        assert_eq!(elems[0].1, 19);
        assert_eq!(used(&driver, 1).0, 1);
    }

    #[test]
    fn programs_decode_as_they_were_encoded() {
        let ops = [
            Op::Init {
                features: 7,
                size_log2: 3,
            },
            Op::Write {
                offset: 0x70,
                value: 1,
            },
            Op::WriteBytes {
                offset: 0x100,
                bytes: b"ab",
            },
            Op::Read {
                offset: 0x104,
                len: 2,
            },
            Op::Fill {
                addr: 9,
                bytes: b"xyz",
            },
            Op::Desc {
                queue: 1,
                index: 2,
                addr: 3,
                len: 4,
                flags: 5,
                next: 6,
            },
            Op::Avail { queue: 1, head: 2 },
            Op::Notify { queue: 1 },
            Op::Chain {
                queue: 0,
                split: 0x31,
                readable: b"req",
                writable: 9,
            },
            Op::Extra { bytes: b"frame" },
        ];
        let bytes = program(&ops);
        let mut input = Input::new(&bytes);
        let decoded: Vec<Op<'_>> = std::iter::from_fn(|| Op::decode(&mut input)).collect();
        assert_eq!(decoded, ops);
    }
}
