use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::*;

const MIB: u64 = 1 << 20;
const TEXT: u64 = 16 * MIB;
const DATA: u64 = 18 * MIB;
const RODATA: u64 = 20 * MIB;

/// An x86-64 ELF whose `PT_LOAD`s are `loads` (address, file bytes, memory size) in that
/// order, plus a `PT_NOTE` with Xen's PHYS32_ENTRY note when `pvh_entry` is set.
pub(crate) fn vmlinux(loads: &[(u64, &[u8], u64)], pvh_entry: Option<u32>) -> Vec<u8> {
    let mut note = Vec::new();
    if let Some(entry) = pvh_entry {
        // Another note first: the entry must be found among several.
        for (name, kind, desc) in [
            (b"GNU\0", 3u32, &[1u8, 2, 3][..]),
            (b"Xen\0", 18, &entry.to_le_bytes()),
        ] {
            note.extend_from_slice(&4u32.to_le_bytes());
            let descsz = u32::try_from(desc.len()).expect("small note");
            note.extend_from_slice(&descsz.to_le_bytes());
            note.extend_from_slice(&kind.to_le_bytes());
            note.extend_from_slice(name);
            note.extend_from_slice(desc);
            note.resize(note.len().next_multiple_of(4), 0);
        }
    }
    let phnum = loads.len() + usize::from(pvh_entry.is_some());
    let mut elf = vec![0u8; 64];
    elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    elf[0x38..0x3a].copy_from_slice(&u16::try_from(phnum).expect("few").to_le_bytes());
    let mut data_at = 64 + 56 * phnum as u64;
    let mut data = Vec::new();
    let mut phdr = |kind: u32, addr: u64, bytes: &[u8], memsz: u64| {
        let mut header = [0u8; 56];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        for (at, value) in [
            (8, data_at),
            (16, addr),
            (24, addr),
            (32, bytes.len() as u64),
            (40, memsz),
        ] {
            header[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        elf.extend_from_slice(&header);
        data.extend_from_slice(bytes);
        data_at += bytes.len() as u64;
    };
    for (addr, bytes, memsz) in loads {
        phdr(1, *addr, bytes, *memsz);
    }
    if pvh_entry.is_some() {
        phdr(4, 0, &note, note.len() as u64);
    }
    elf.extend(data);
    elf
}

/// Bytes that compress, but not to nothing.
fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(seed) ^ (i / 7)).to_le_bytes()[0])
        .collect()
}

/// A kernel of three segments given out of address order: text (entry inside), data with
/// a BSS, and rodata.
fn three_segments() -> (Vec<u8>, Vec<Vec<u8>>) {
    let parts = vec![pattern(300_000, 3), pattern(5000, 5), pattern(70_000, 11)];
    let elf = vmlinux(
        &[
            (TEXT, &parts[0], 300_000),
            (RODATA, &parts[2], 70_000),
            (DATA, &parts[1], 5000 + 0x3000),
        ],
        Some(0x100_0040),
    );
    (elf, parts)
}

/// Guest memory filled with 0xaa, so zeroing and untouched bytes can be told apart.
fn memory(size: u64) -> GuestMemory {
    let size = usize::try_from(size).expect("size");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("memory");
    mem.write_slice(&vec![0xaa; size], GuestAddress(0))
        .expect("fill");
    mem
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr))
        .expect("read");
    bytes
}

/// Overwrites the little-endian u64 at `at`.
fn poke(packed: &mut [u8], at: usize, value: u64) {
    packed[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Offset of field `field` (0 address, 1 file size, 2 memory size, 3 compressed size) of
/// segment `index` in the table.
fn table(index: usize, field: usize) -> usize {
    HEADER_LEN + SEGMENT_LEN * index + 8 * field
}

#[test]
fn round_trip_restores_the_segments_and_zeroes_the_bss() {
    let (elf, parts) = three_segments();
    let packed = pack(&elf).expect("pack");
    assert!(is_packed(&packed));
    assert!(
        packed.len() < elf.len() / 2,
        "{} of {}",
        packed.len(),
        elf.len()
    );

    let (header, _) = Header::parse(&packed).expect("parse");
    let addrs: Vec<u64> = header.segments.iter().map(|s| s.addr).collect();
    assert_eq!(addrs, [TEXT, DATA, RODATA], "sorted by address");
    assert_eq!(header.source_sha256[..], Sha256::digest(&elf)[..]);
    assert_eq!(header.entry, 0x100_0040);

    let mem = memory(64 * MIB);
    let loaded = load(&mem, &packed).expect("load");
    assert_eq!(
        loaded,
        Loaded {
            entry: 0x100_0040,
            kernel_end: RODATA + 70_000
        }
    );
    assert_eq!(read(&mem, TEXT, parts[0].len()), parts[0]);
    assert_eq!(read(&mem, DATA, parts[1].len()), parts[1]);
    assert_eq!(read(&mem, RODATA, parts[2].len()), parts[2]);
    assert_eq!(
        read(&mem, DATA + 5000, 0x3000),
        vec![0; 0x3000],
        "BSS zeroed"
    );
    assert_eq!(
        read(&mem, DATA + 5000 + 0x3000, 16),
        vec![0xaa; 16],
        "nothing past memsz"
    );
    assert_eq!(read(&mem, TEXT - 16, 16), vec![0xaa; 16], "nothing before");
}

#[test]
fn the_payload_is_one_zstd_stream_of_the_segments() {
    let (elf, parts) = three_segments();
    let packed = pack(&elf).expect("pack");
    let payload = &packed[HEADER_LEN + 3 * SEGMENT_LEN..];
    let whole = zstd::decode_all(payload).expect("decode");
    assert_eq!(whole, [&parts[0][..], &parts[1], &parts[2]].concat());
}

#[test]
fn only_pvh_x86_64_elf_files_are_packed() {
    let text = pattern(100, 1);
    let no_note = vmlinux(&[(TEXT, &text, 100)], None);
    assert!(matches!(pack(&no_note), Err(PackError::NoPvhEntry)));
    assert!(matches!(
        pack(b"MZ\x90\0 not an elf"),
        Err(PackError::NotElf)
    ));
    let mut arm = vmlinux(&[(TEXT, &text, 100)], Some(0x100_0000));
    arm[0x12] = 183; // EM_AARCH64
    assert!(matches!(pack(&arm), Err(PackError::NotElf)));
    let mut truncated = vmlinux(&[(TEXT, &text, 100)], Some(0x100_0000));
    truncated.truncate(truncated.len() - 40);
    assert!(matches!(pack(&truncated), Err(PackError::Truncated(_))));
}

#[test]
fn overlapping_or_low_segments_are_not_packed() {
    let text = pattern(0x2000, 1);
    let overlapping = vmlinux(
        &[(TEXT, &text, 0x2000), (TEXT + 0x1000, &text, 0x2000)],
        Some(0x100_0000),
    );
    assert!(matches!(
        pack(&overlapping),
        Err(PackError::Invalid(PackedKernelError::Segment {
            index: 1,
            ..
        }))
    ));
    let low = vmlinux(&[(0x1000, &text, 0x2000)], Some(0x1000));
    assert!(matches!(
        pack(&low),
        Err(PackError::Invalid(PackedKernelError::Segment {
            index: 0,
            ..
        }))
    ));
}

#[test]
fn bad_magic_version_and_truncated_headers_are_refused() {
    let (elf, _) = three_segments();
    let packed = pack(&elf).expect("pack");
    let mem = memory(64 * MIB);
    assert!(matches!(load(&mem, &elf), Err(PackedKernelError::BadMagic)));
    let mut newer = packed.clone();
    newer[8] = 2;
    assert!(matches!(
        load(&mem, &newer),
        Err(PackedKernelError::Version(2))
    ));
    assert!(matches!(
        load(&mem, &packed[..40]),
        Err(PackedKernelError::Truncated)
    ));
    assert!(matches!(
        load(&mem, &packed[..HEADER_LEN + 40]),
        Err(PackedKernelError::Truncated)
    ));
    for count in [0, MAX_SEGMENTS + 1, u32::MAX] {
        let mut bad = packed.clone();
        bad[12..16].copy_from_slice(&count.to_le_bytes());
        assert!(matches!(load(&mem, &bad), Err(PackedKernelError::SegmentCount(c)) if c == count));
    }
    let mut reserved = packed.clone();
    reserved[60] = 1;
    assert!(matches!(
        load(&mem, &reserved),
        Err(PackedKernelError::Reserved)
    ));
}

#[test]
fn segments_outside_guest_memory_are_refused_before_anything_is_written() {
    let (elf, _) = three_segments();
    let packed = pack(&elf).expect("pack");
    // RODATA (20 MiB) ends past 20 MiB of RAM: segment 2 is outside.
    let mem = memory(20 * MIB);
    assert!(matches!(
        load(&mem, &packed),
        Err(PackedKernelError::OutsideMemory { index: 2, .. })
    ));
    assert_eq!(read(&mem, TEXT, 16), vec![0xaa; 16], "nothing was written");
    let mut huge = packed.clone();
    poke(&mut huge, table(2, 2), u64::MAX - RODATA);
    assert!(matches!(
        load(&memory(64 * MIB), &huge),
        Err(PackedKernelError::OutsideMemory { index: 2, .. })
    ));
}

#[test]
fn inconsistent_segment_tables_are_refused() {
    let (elf, _) = three_segments();
    let packed = pack(&elf).expect("pack");
    let mem = memory(64 * MIB);
    let refused = |index: usize, field: usize, value: u64| {
        let mut bad = packed.clone();
        poke(&mut bad, table(index, field), value);
        match load(&mem, &bad) {
            Err(PackedKernelError::Segment { index: at, .. }) => assert_eq!(at, index),
            other => panic!("segment {index} field {field} = {value:#x}: {other:?}"),
        }
    };
    refused(1, 0, TEXT + 0x1000); // inside the text segment
    refused(1, 0, TEXT - MIB); // before it
    refused(0, 0, 0x8000); // below 1 MiB
    refused(1, 1, 5000 + 0x3001); // file size beyond memory size
    refused(2, 0, u64::MAX - 10); // wraps around
    refused(1, 2, 0); // empty
}

#[test]
fn an_entry_outside_the_segments_is_refused() {
    let (elf, _) = three_segments();
    let mut packed = pack(&elf).expect("pack");
    poke(&mut packed, 48, DATA + 5000 + 4); // in the BSS: no code there
    assert!(matches!(
        load(&memory(64 * MIB), &packed),
        Err(PackedKernelError::Entry(_))
    ));
}

#[test]
fn truncated_or_extended_payloads_are_refused() {
    let (elf, _) = three_segments();
    let packed = pack(&elf).expect("pack");
    let mem = memory(64 * MIB);
    assert!(matches!(
        load(&mem, &packed[..packed.len() - 1]),
        Err(PackedKernelError::PayloadLength { .. })
    ));
    let mut longer = packed.clone();
    longer.push(0);
    assert!(matches!(
        load(&mem, &longer),
        Err(PackedKernelError::PayloadLength { .. })
    ));
    // The table agrees with a payload cut short inside the last frame.
    let mut cut = packed[..packed.len() - 10].to_vec();
    let last = u64::from_le_bytes(cut[table(2, 3)..table(2, 3) + 8].try_into().expect("8"));
    poke(&mut cut, table(2, 3), last - 10);
    assert!(matches!(
        load(&mem, &cut),
        Err(PackedKernelError::Decompress { index: 2, .. })
    ));
}

#[test]
fn corrupt_frames_are_refused() {
    let (elf, _) = three_segments();
    let packed = pack(&elf).expect("pack");
    let first_frame = HEADER_LEN + 3 * SEGMENT_LEN;
    let compressed =
        u64::from_le_bytes(packed[table(0, 3)..table(0, 3) + 8].try_into().expect("8"));
    // Every byte of the frame but its header: the frame checksum catches what the format
    // itself would decode into other bytes.
    for offset in (16..usize::try_from(compressed).expect("size")).step_by(97) {
        let mut bad = packed.clone();
        bad[first_frame + offset] ^= 0x55;
        let result = load(&memory(64 * MIB), &bad);
        assert!(
            matches!(result, Err(PackedKernelError::Decompress { index: 0, .. })),
            "byte {offset}: {result:?}"
        );
    }
}

#[test]
fn a_frame_of_another_length_than_the_table_is_refused() {
    let (elf, _) = three_segments();
    let packed = pack(&elf).expect("pack");
    let mem = memory(64 * MIB);
    // The data segment's frame holds 5000 bytes.
    let mut longer = packed.clone();
    poke(&mut longer, table(1, 1), 5001);
    assert!(matches!(
        load(&mem, &longer),
        Err(PackedKernelError::Length {
            index: 1,
            expected: 5001,
            found: 5000
        })
    ));
    let mut shorter = packed.clone();
    poke(&mut shorter, table(1, 1), 4999);
    assert!(matches!(
        load(&mem, &shorter),
        Err(PackedKernelError::Decompress { index: 1, .. })
    ));
}

#[test]
fn a_mapped_kernel_matches_a_decompressed_one_and_its_cache_is_written_once_checked() {
    let (elf, parts) = three_segments();
    let packed = pack(&elf).expect("pack");
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("kernel/vmlinux.segments");
    std::fs::create_dir(dir.path().join("kernel")).expect("dir");
    std::fs::write(dir.path().join("kernel/older.segments"), b"old").expect("older");
    let check = |mem: &GuestMemory| {
        assert_eq!(read(mem, TEXT, parts[0].len()), parts[0]);
        assert_eq!(read(mem, DATA, parts[1].len()), parts[1]);
        assert_eq!(read(mem, RODATA, parts[2].len()), parts[2]);
        assert_eq!(read(mem, DATA + 5000, 0x3000), vec![0; 0x3000], "BSS");
        assert_eq!(read(mem, DATA + 5000 + 0x3000, 16), vec![0xaa; 16]);
        assert_eq!(read(mem, TEXT - 16, 16), vec![0xaa; 16]);
    };
    let expected = Loaded {
        entry: 0x100_0040,
        kernel_end: RODATA + 70_000,
    };

    // No cache yet: decompressed, then the cache is written (whole pages per segment).
    let first = memory(64 * MIB);
    assert_eq!(
        load_mapped(&first, &packed, &cache).expect("load"),
        expected
    );
    check(&first);
    let size = std::fs::metadata(&cache).expect("cache written").len();
    assert_eq!(size, 303_104 + 8192 + 73_728);
    assert_eq!(
        std::fs::read_dir(cache.parent().expect("dir"))
            .expect("dir")
            .count(),
        1
    );

    // Mapped from the cache; writes by the guest stay in its memory, not the file.
    let second = memory(64 * MIB);
    assert_eq!(
        load_mapped(&second, &packed, &cache).expect("load"),
        expected
    );
    check(&second);
    second
        .write_slice(b"guest", GuestAddress(TEXT))
        .expect("write");
    let third = memory(64 * MIB);
    load_mapped(&third, &packed, &cache).expect("load");
    check(&third);
    assert_eq!(std::fs::metadata(&cache).expect("cache").len(), size);

    // A cache file of the wrong size is not used, and is replaced.
    std::fs::write(&cache, b"short").expect("spoil");
    let fourth = memory(64 * MIB);
    load_mapped(&fourth, &packed, &cache).expect("load");
    check(&fourth);
    assert_eq!(std::fs::metadata(&cache).expect("cache").len(), size);
}

#[test]
fn a_cache_that_cannot_be_written_still_loads_the_kernel() {
    let (elf, parts) = three_segments();
    let packed = pack(&elf).expect("pack");
    let dir = tempfile::tempdir().expect("tempdir");
    // Its directory is a file: neither read nor written.
    std::fs::write(dir.path().join("file"), b"x").expect("file");
    let cache = dir.path().join("file/vmlinux.segments");
    let mem = memory(64 * MIB);
    load_mapped(&mem, &packed, &cache).expect("load");
    assert_eq!(read(&mem, TEXT, parts[0].len()), parts[0]);
}
