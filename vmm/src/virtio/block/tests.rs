//! The device driven through mock virtqueues the way a (possibly hostile) driver would.

use std::fs::{File, OpenOptions};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_QUEUE_NUM_MAX,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{parse, RequestError};
use super::*;
use crate::bus::BusDevice;
use crate::virtio::tests::{guest_memory, used_elem, DATA_ADDR};
use crate::virtio::MmioTransport;

const HDR_ADDR: u64 = 0x8_0000;
const STATUS_ADDR: u64 = 0x9_0000;
/// Far beyond the 4 MiB of test guest memory.
const OUTSIDE: u64 = 0x7fff_0000_0000;
const UNTOUCHED: u8 = 0xee;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// An unnamed file holding `data`: created, then unlinked while open.
pub(crate) fn temp_file(data: &[u8]) -> File {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("katalite-blk-{}-{n}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("temp file");
    std::fs::remove_file(&path).expect("unlink");
    std::os::unix::fs::FileExt::write_all_at(&file, data, 0).expect("fill");
    file
}

/// SHA-256 of each 4 KiB block of `data`, as a list file read back.
pub(crate) fn hashes_of(data: &[u8]) -> BlockHashes {
    let list: Vec<u8> = data
        .chunks(4096)
        .flat_map(|block| <[u8; 32]>::from(Sha256::digest(block)))
        .collect();
    BlockHashes::read(temp_file(&list)).expect("list").0
}

/// 64 blocks, each byte a function of its offset, so misplaced bytes show.
fn image() -> Vec<u8> {
    (0..64 * 4096u32)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 253).expect("byte"))
        .collect()
}

fn config(data: &[u8]) -> DiskConfig {
    DiskConfig {
        file: temp_file(data),
        read_only: true,
        block_hashes: Some(hashes_of(data)),
        id: "katalite-image".into(),
        on_corrupt: Arc::new(|_| {}),
    }
}

fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
}

fn writable(addr: u64, len: u32) -> RawDescriptor {
    let flags = u16::try_from(VRING_DESC_F_WRITE).expect("flag");
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// Writes a request header at HDR_ADDR and returns its descriptor.
fn header(mem: &GuestMemory, request_type: u32, sector: u64) -> RawDescriptor {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&request_type.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(HDR_ADDR))
        .expect("header");
    readable(HDR_ADDR, 16)
}

fn status() -> RawDescriptor {
    writable(STATUS_ADDR, 1)
}

/// Puts `descs` in a fresh queue as one chain, lets `block` process it, and returns the
/// status byte (UNTOUCHED if not written) and the used length.
fn submit(block: &mut Block, mem: &GuestMemory, descs: &[RawDescriptor]) -> (u8, u32) {
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS_ADDR))
        .expect("status");
    let vq = MockSplitQueue::new(mem, 256);
    let mut queue: Queue = vq.create_queue().expect("queue");
    vq.build_desc_chain(descs).expect("chain");
    assert!(block.process_queue(0, &mut queue, mem).expect("process"));
    let (id, len) = used_elem(&vq, 0);
    assert_eq!(id, 0);
    let status: u8 = mem.read_obj(GuestAddress(STATUS_ADDR)).expect("status");
    (status, len)
}

/// What [`parse`] says about `descs` on a disk of 64 blocks.
fn parse_error(mem: &GuestMemory, descs: &[RawDescriptor]) -> Option<RequestError> {
    let vq = MockSplitQueue::new(mem, 256);
    let chain = vq.build_desc_chain(descs).expect("chain");
    let mut segments = Vec::new();
    let result = parse(chain, mem, 64 * BLOCK_SIZE, &mut segments);
    assert!(segments.len() <= SEG_MAX);
    result.err().map(|rejected| rejected.error)
}

fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    mem.read_slice(&mut out, GuestAddress(addr)).expect("read");
    out
}

#[test]
fn reads_return_exactly_the_files_bytes_across_blocks_and_segments() {
    let mem = guest_memory();
    let data = image();
    let mut block = Block::new(config(&data)).expect("block");
    // Sector 7 starts 512 bytes before block 1 ends; 5 KiB in three uneven segments
    // spans blocks 0..=2 and ends mid-block.
    let segments = [
        (DATA_ADDR, 512u32),
        (DATA_ADDR + 0x1_0000, 2560),
        (DATA_ADDR + 0x2_0000, 2048),
    ];
    let mut descs = vec![header(&mem, VIRTIO_BLK_T_IN, 7)];
    descs.extend(segments.iter().map(|&(addr, len)| writable(addr, len)));
    descs.push(status());

    assert_eq!(submit(&mut block, &mem, &descs), (S_OK, 5120 + 1));

    let mut offset = 7 * 512;
    for (addr, len) in segments {
        let len = usize::try_from(len).expect("len");
        assert_eq!(guest_bytes(&mem, addr, len), data[offset..offset + len]);
        offset += len;
    }

    // A large read through more blocks than one bounce buffer, to the disk's last byte.
    let len = 40 * 4096;
    let descs = [
        header(&mem, VIRTIO_BLK_T_IN, (64 - 40) * 8),
        writable(DATA_ADDR, u32::try_from(len).expect("len")),
        status(),
    ];
    assert_eq!(
        submit(&mut block, &mem, &descs),
        (S_OK, u32::try_from(len + 1).expect("len"))
    );
    assert_eq!(guest_bytes(&mem, DATA_ADDR, len), data[data.len() - len..]);
}

#[test]
fn a_flipped_byte_fails_the_read_and_names_its_block() {
    let mem = guest_memory();
    let mut data = image();
    let hashes = hashes_of(&data);
    data[5 * 4096 + 17] ^= 1;
    let reported = Arc::new(Mutex::new(Vec::new()));
    let log = reported.clone();
    let mut config = config(&data);
    config.block_hashes = Some(hashes);
    config.on_corrupt = Arc::new(move |block| log.lock().expect("lock").push(block));
    let mut block = Block::new(config).expect("block");
    mem.write_slice(&[0u8; 8192], GuestAddress(DATA_ADDR))
        .expect("clear");

    let descs = [
        header(&mem, VIRTIO_BLK_T_IN, 5 * 8 + 1),
        writable(DATA_ADDR, 1024),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (S_IOERR, 1));
    assert_eq!(*reported.lock().expect("lock"), [5]);
    assert!(
        guest_bytes(&mem, DATA_ADDR, 1024).iter().all(|&b| b == 0),
        "no byte of the bad block reaches the guest"
    );

    // Its neighbours still read.
    let descs = [
        header(&mem, VIRTIO_BLK_T_IN, 4 * 8),
        writable(DATA_ADDR, 4096),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (S_OK, 4097));
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 4096), data[4 * 4096..5 * 4096]);
    assert_eq!(reported.lock().expect("lock").len(), 1);
}

#[test]
fn writes_to_a_read_only_disk_fail_and_leave_it_alone() {
    let mem = guest_memory();
    let data = image();
    let mut config = config(&data);
    let file = config.file.try_clone().expect("clone");
    config.block_hashes = None;
    let mut block = Block::new(config).expect("block");
    mem.write_slice(&[0xab; 512], GuestAddress(DATA_ADDR))
        .expect("data");

    let descs = [
        header(&mem, VIRTIO_BLK_T_OUT, 0),
        readable(DATA_ADDR, 512),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (S_IOERR, 1));

    let mut first = [0u8; 512];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut first, 0).expect("read");
    assert_eq!(first[..], data[..512]);
}

#[test]
fn a_writable_disk_takes_writes_and_flushes() {
    let mem = guest_memory();
    let data = image();
    let mut config = config(&data);
    let file = config.file.try_clone().expect("clone");
    config.block_hashes = None;
    config.read_only = false;
    let mut block = Block::new(config).expect("block");
    assert_eq!(block.features() & 1 << VIRTIO_BLK_F_RO, 0);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA_ADDR))
        .expect("data");
    mem.write_slice(&[0xcd; 1024], GuestAddress(DATA_ADDR + 0x1000))
        .expect("data");

    let descs = [
        header(&mem, VIRTIO_BLK_T_OUT, 3),
        readable(DATA_ADDR, 512),
        readable(DATA_ADDR + 0x1000, 1024),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &descs), (S_OK, 1));
    let flush = [header(&mem, VIRTIO_BLK_T_FLUSH, 0), status()];
    assert_eq!(submit(&mut block, &mem, &flush), (S_OK, 1));

    let mut back = vec![0u8; 2048];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 1024).expect("read");
    assert_eq!(back[..512], data[1024..1536]);
    assert!(back[512..1024].iter().all(|&b| b == 0xab));
    assert!(back[1024..2048].iter().all(|&b| b == 0xcd));
}

#[test]
fn get_id_flush_and_unknown_types_are_answered() {
    let mem = guest_memory();
    let mut block = Block::new(config(&image())).expect("block");
    mem.write_slice(&[0xff; 32], GuestAddress(DATA_ADDR))
        .expect("fill");

    let get_id = [
        header(&mem, VIRTIO_BLK_T_GET_ID, 0),
        writable(DATA_ADDR, 20),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &get_id), (S_OK, 21));
    let mut expected = b"katalite-image".to_vec();
    expected.resize(20, 0);
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 20), expected);
    assert_eq!(guest_bytes(&mem, DATA_ADDR + 20, 1), [0xff]);

    let get_id = [
        header(&mem, VIRTIO_BLK_T_GET_ID, 0),
        readable(DATA_ADDR, 20),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &get_id), (S_IOERR, 1));

    let flush = [header(&mem, VIRTIO_BLK_T_FLUSH, 0), status()];
    assert_eq!(submit(&mut block, &mem, &flush), (S_OK, 1));

    for request_type in [2, 11, 13, 99, u32::MAX] {
        let descs = [
            header(&mem, request_type, 0),
            writable(DATA_ADDR, 512),
            status(),
        ];
        assert_eq!(
            submit(&mut block, &mem, &descs),
            (S_UNSUPP, 1),
            "type {request_type}"
        );
    }
}

#[test]
fn hostile_chains_get_an_io_error_and_touch_nothing() {
    let mem = guest_memory();
    let mut block = Block::new(config(&image())).expect("block");
    // The header's sector is written per case; this is its descriptor.
    let hdr = readable(HDR_ADDR, 16);
    let data = |len| writable(DATA_ADDR, len);
    let too_many: Vec<_> = std::iter::once(hdr)
        .chain((0..=SEG_MAX).map(|_| data(512)))
        .chain([status()])
        .collect();
    let max_segments: Vec<_> = std::iter::once(hdr)
        .chain((0..SEG_MAX).map(|_| data(512)))
        .chain([status()])
        .collect();
    let cases: Vec<(&str, u64, Vec<RawDescriptor>, RequestError)> = vec![
        (
            "header writable",
            0,
            vec![writable(HDR_ADDR, 16), data(512), status()],
            RequestError::Header,
        ),
        (
            "short header",
            0,
            vec![readable(HDR_ADDR, 8), data(512), status()],
            RequestError::Header,
        ),
        (
            "long header",
            0,
            vec![readable(HDR_ADDR, 17), data(512), status()],
            RequestError::Header,
        ),
        (
            "header outside memory",
            0,
            vec![readable(OUTSIDE, 16), data(512), status()],
            RequestError::HeaderUnreadable,
        ),
        (
            "readable data for a read",
            0,
            vec![hdr, readable(DATA_ADDR, 512), status()],
            RequestError::WrongDirection,
        ),
        (
            "mixed directions",
            0,
            vec![hdr, data(512), readable(DATA_ADDR, 512), status()],
            RequestError::WrongDirection,
        ),
        ("no data", 0, vec![hdr, status()], RequestError::NoData),
        (
            "not whole sectors",
            0,
            vec![hdr, data(1000), status()],
            RequestError::Unaligned(1000),
        ),
        (
            "sector past the end",
            64 * 8,
            vec![hdr, data(512), status()],
            RequestError::OutOfRange {
                sector: 512,
                len: 512,
            },
        ),
        (
            "last sector plus one",
            64 * 8 - 1,
            vec![hdr, data(1024), status()],
            RequestError::OutOfRange {
                sector: 511,
                len: 1024,
            },
        ),
        (
            "sector * 512 overflows",
            u64::MAX / 256,
            vec![hdr, data(512), status()],
            RequestError::OutOfRange {
                sector: u64::MAX / 256,
                len: 512,
            },
        ),
        (
            "sector + len overflows",
            u64::MAX / 512,
            vec![hdr, data(1024), status()],
            RequestError::OutOfRange {
                sector: u64::MAX / 512,
                len: 1024,
            },
        ),
        (
            "data outside memory",
            0,
            vec![hdr, writable(OUTSIDE, 512), status()],
            RequestError::OutsideMemory,
        ),
        (
            "data running off memory",
            0,
            vec![hdr, writable((4 << 20) - 512, 1024), status()],
            RequestError::OutsideMemory,
        ),
        (
            "huge length",
            0,
            vec![hdr, writable(DATA_ADDR, u32::MAX - 511), status()],
            RequestError::OutsideMemory,
        ),
        // Overlapping buffers inside memory, together beyond the request limit.
        (
            "too large",
            0,
            vec![hdr, data(3 << 20), data(3 << 20), status()],
            RequestError::TooLarge(6 << 20),
        ),
        (
            "too many segments",
            0,
            too_many,
            RequestError::TooManySegments,
        ),
    ];
    for (name, sector, descs, expected) in cases {
        header(&mem, VIRTIO_BLK_T_IN, sector);
        mem.write_slice(&[UNTOUCHED; 1024], GuestAddress(DATA_ADDR))
            .expect("fill");
        assert_eq!(parse_error(&mem, &descs), Some(expected), "{name}");
        assert_eq!(submit(&mut block, &mem, &descs), (S_IOERR, 1), "{name}");
        assert!(
            guest_bytes(&mem, DATA_ADDR, 1024)
                .iter()
                .all(|&b| b == UNTOUCHED),
            "{name}: data written"
        );
    }

    // The limits themselves are fine.
    header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(parse_error(&mem, &max_segments), None);
    assert_eq!(submit(&mut block, &mem, &max_segments).0, S_OK);
    let last = [
        header(&mem, VIRTIO_BLK_T_IN, 64 * 8 - 2),
        data(1024),
        status(),
    ];
    assert_eq!(submit(&mut block, &mem, &last), (S_OK, 1025));
}

#[test]
fn chains_without_a_status_byte_are_returned_empty() {
    let mem = guest_memory();
    let mut block = Block::new(config(&image())).expect("block");
    let hdr = header(&mem, VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("header only", vec![hdr]),
        ("no status", vec![hdr, writable(DATA_ADDR, 512)]),
        (
            "status too long",
            vec![hdr, writable(DATA_ADDR, 512), writable(STATUS_ADDR, 2)],
        ),
        (
            "status readable",
            vec![hdr, writable(DATA_ADDR, 512), readable(STATUS_ADDR, 1)],
        ),
        (
            "status outside memory",
            vec![hdr, writable(DATA_ADDR, 512), writable(OUTSIDE, 1)],
        ),
        (
            "status empty",
            vec![hdr, writable(DATA_ADDR, 512), writable(STATUS_ADDR, 0)],
        ),
    ];
    for (name, descs) in cases {
        mem.write_slice(&[UNTOUCHED; 512], GuestAddress(DATA_ADDR))
            .expect("fill");
        assert_eq!(
            parse_error(&mem, &descs),
            Some(RequestError::NoStatus),
            "{name}"
        );
        assert_eq!(submit(&mut block, &mem, &descs), (UNTOUCHED, 0), "{name}");
        assert!(
            guest_bytes(&mem, DATA_ADDR, 512)
                .iter()
                .all(|&b| b == UNTOUCHED),
            "{name}: data written"
        );
    }
}

#[test]
fn a_run_stops_at_the_work_budget_and_asks_to_be_run_again() {
    let mem = guest_memory();
    let mut block = Block::new(config(&image())).expect("block");
    let more = block.more_work();
    let vq = MockSplitQueue::new(&mem, 32);
    let mut queue: Queue = vq.create_queue().expect("queue");
    // Six chains, each reading the whole 256 KiB disk.
    let len = 256 * 1024;
    let next = u16::try_from(VRING_DESC_F_NEXT).expect("flag");
    let write = u16::try_from(VRING_DESC_F_WRITE).expect("flag");
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let mut descs = Vec::new();
    for i in 0..6u16 {
        let base = 3 * i;
        descs.extend([
            Descriptor::new(HDR_ADDR, 16, next, base + 1),
            Descriptor::new(DATA_ADDR, len, write | next, base + 2),
            Descriptor::new(STATUS_ADDR + u64::from(i), 1, write, 0),
        ]);
    }
    let descs: Vec<_> = descs.into_iter().map(RawDescriptor::from).collect();
    vq.add_desc_chains(&descs, 0).expect("chains");

    // Four chains reach the 1 MiB budget.
    assert!(block.process_queue(0, &mut queue, &mem).expect("process"));
    assert_eq!(vq.used().idx().load(), 4);
    assert!(more.swap(false, Ordering::AcqRel), "asks to be run again");
    assert!(block.process_queue(0, &mut queue, &mem).expect("process"));
    assert_eq!(vq.used().idx().load(), 6);
    assert!(!more.load(Ordering::Acquire), "done");
    for i in 0..6 {
        assert_eq!(
            used_elem(&vq, i),
            (3 * u32::try_from(i).expect("i"), len + 1)
        );
    }
}

fn read_register(transport: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    transport.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn device_features(transport: &mut MmioTransport, sel: u32) -> u32 {
    transport.write(
        u64::from(VIRTIO_MMIO_DEVICE_FEATURES_SEL),
        &sel.to_le_bytes(),
    );
    read_register(transport, u64::from(VIRTIO_MMIO_DEVICE_FEATURES))
}

#[test]
fn writes_count_against_the_work_budget_too() {
    let mem = guest_memory();
    let mut config = config(&image());
    config.block_hashes = None;
    config.read_only = false;
    let mut block = Block::new(config).expect("block");
    let more = block.more_work();
    let vq = MockSplitQueue::new(&mem, 32);
    let mut queue: Queue = vq.create_queue().expect("queue");
    let next = u16::try_from(VRING_DESC_F_NEXT).expect("flag");
    let write = u16::try_from(VRING_DESC_F_WRITE).expect("flag");
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let mut descs = Vec::new();
    for i in 0..6u16 {
        let base = 3 * i;
        descs.extend([
            Descriptor::new(HDR_ADDR, 16, next, base + 1),
            Descriptor::new(DATA_ADDR, 256 * 1024, next, base + 2),
            Descriptor::new(STATUS_ADDR + u64::from(i), 1, write, 0),
        ]);
    }
    let descs: Vec<_> = descs.into_iter().map(RawDescriptor::from).collect();
    vq.add_desc_chains(&descs, 0).expect("chains");

    assert!(block.process_queue(0, &mut queue, &mem).expect("process"));

    assert_eq!(vq.used().idx().load(), 4);
    assert!(more.load(Ordering::Acquire));
    assert_eq!(used_elem(&vq, 3), (9, 1));
}

#[test]
fn behind_the_transport_it_is_a_block_device_with_its_geometry() {
    let mem = guest_memory();
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let device = Box::new(Block::new(config(&image())).expect("block"));
    let mut transport = MmioTransport::new(mem, device, irq);
    let t = &mut transport;
    let low = device_features(t, 0);
    let high = device_features(t, 1);
    let expected_low = 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_RO
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH;
    assert_eq!(low, expected_low);
    assert_eq!(high, 1 << (VIRTIO_F_VERSION_1 - 32));

    let config = u64::from(VIRTIO_MMIO_CONFIG);
    let read = |t: &mut MmioTransport, offset| read_register(t, offset);
    assert_eq!(read(t, u64::from(VIRTIO_MMIO_DEVICE_ID)), 2);
    assert_eq!(read(t, config), 64 * 8, "capacity in sectors, low half");
    assert_eq!(read(t, config + 4), 0, "capacity, high half");
    assert_eq!(read(t, config + 8), 32 * 1024, "size_max");
    assert_eq!(read(t, config + 12), 128, "seg_max");
    assert_eq!(read(t, config + 20), 4096, "blk_size");
    assert_eq!(read(t, config + 24), 0, "topology is not offered");
    assert_eq!(read(t, config + 0x100), 0);
    let mut byte = [0xffu8; 1];
    t.read(config + 21, &mut byte);
    assert_eq!(byte, [0x10], "byte-wide config reads");
    assert_eq!(read(t, u64::from(VIRTIO_MMIO_QUEUE_NUM_MAX)), 256);
}

/// What a driver does to bring the device up (§3.1.1) with `vq` as requestq.
fn initialise(transport: &mut MmioTransport, vq: &MockSplitQueue<GuestMemory>) {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_bindings::virtio_mmio::{
        VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
        VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
        VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
    };
    let mut write = |reg: u32, value: u64| {
        let value = u32::try_from(value).expect("32-bit value");
        transport.write(u64::from(reg), &value.to_le_bytes());
    };
    let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    write(VIRTIO_MMIO_STATUS, status.into());
    status |= VIRTIO_CONFIG_S_DRIVER;
    write(VIRTIO_MMIO_STATUS, status.into());
    write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write(VIRTIO_MMIO_DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
    status |= VIRTIO_CONFIG_S_FEATURES_OK;
    write(VIRTIO_MMIO_STATUS, status.into());
    write(VIRTIO_MMIO_QUEUE_NUM, 16);
    write(VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr().0);
    write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr().0);
    write(VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr().0);
    write(VIRTIO_MMIO_QUEUE_READY, 1);
    status |= VIRTIO_CONFIG_S_DRIVER_OK;
    write(VIRTIO_MMIO_STATUS, status.into());
    assert_eq!(
        read_register(transport, u64::from(VIRTIO_MMIO_STATUS)),
        status
    );
}

#[test]
fn the_worker_serves_a_notified_read_and_interrupts_the_guest() {
    use std::time::{Duration, Instant};
    let mem = guest_memory();
    let data = image();
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let block = Block::new(config(&data)).expect("block");
    let more = block.more_work();
    let mut transport =
        MmioTransport::new(mem.clone(), Box::new(block), irq.try_clone().expect("fd"));
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    initialise(&mut transport, &vq);
    let transport = Arc::new(Mutex::new(transport));
    let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let guest = notify.try_clone().expect("clone");
    let mut worker = crate::virtio::worker::QueueWorker::new(
        "katalite-blk0".into(),
        crate::confine::ThreadRole::Block,
        notify,
        more,
    )
    .expect("worker");
    worker
        .start(worker::run_queue(transport.clone()))
        .expect("start");
    let descs = [
        header(&mem, VIRTIO_BLK_T_IN, 8),
        writable(DATA_ADDR, 8192),
        status(),
    ];
    vq.build_desc_chain(&descs).expect("chain");

    // What KVM does when the guest writes 0 to QueueNotify.
    guest.write(1).expect("notify");

    let deadline = Instant::now() + Duration::from_secs(10);
    while vq.used().idx().load() == 0 {
        assert!(
            Instant::now() < deadline,
            "the worker did not serve the request"
        );
        std::thread::yield_now();
    }
    assert_eq!(used_elem(&vq, 0), (0, 8193));
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 8192), data[4096..3 * 4096]);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS_ADDR))
            .expect("status"),
        S_OK
    );
    assert_eq!(irq.read().expect("an interrupt"), 1);
    drop(worker);
}
