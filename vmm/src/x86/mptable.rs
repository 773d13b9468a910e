//! The Intel MultiProcessor Specification 1.4 tables that tell Linux (CONFIG_X86_MPPARSE,
//! no ACPI) how many CPUs there are and how the IOAPIC is wired: a floating pointer and a
//! configuration table, placed at the EBDA where Linux's `smp_scan_config` looks.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_START, HIMEM_START, IOAPIC_START};
use crate::GuestMemory;

/// Errors while building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than APIC ids below the IOAPIC's, or than fit before 1 MiB.
    #[error("mp table cannot describe {0} vcpus")]
    TooManyCpus(u8),
    /// Guest memory does not cover the table.
    #[error("cannot write the mp table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const SPEC_REV_1_4: u8 = 4;
const APIC_VERSION: u8 = 0x14;
/// IOAPIC inputs (and so ISA/virtio IRQs) described, 0..=23.
const IOAPIC_PINS: u8 = 24;

const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPU signature: family 6; only informational.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 9) | 1;
const IOAPIC_ENABLED: u8 = 1;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;

/// Sum-to-zero checksum byte for `bytes` (MP spec §4.1, §4.2).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for a table that will
/// live at guest address `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MptableError> {
    // APIC ids 0..vcpus belong to CPUs and the IOAPIC takes id `vcpus`.
    if vcpus == 0 || vcpus == u8::MAX {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus;
    let table_addr =
        u32::try_from(base + FLOATING_SIZE as u64).map_err(|_| MptableError::TooManyCpus(vcpus))?;

    let mut entries = Vec::new();
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_CPU, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    // ISA IRQ n drives IOAPIC pin n; flags 0 = "conforming to the bus" (ISA: edge, high),
    // which is how KVM's irqfds deliver the serial and virtio interrupts.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // Virtual wire: the PIC's ExtINT on the BSP's LINT0, NMI on every LAPIC's LINT1.
    entries.extend_from_slice(&[ENTRY_LOCAL_INT, INT_TYPE_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INT, INT_TYPE_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    let entry_count = u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let table_len = HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(FLOATING_SIZE + table_len);
    // Floating pointer structure (§4.1): length in 16-byte units, no default config.
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&table_addr.to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REV_1_4, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table[..FLOATING_SIZE]);

    // Configuration table header (§4.2).
    let header_start = table.len();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&u16::try_from(table_len).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&[SPEC_REV_1_4, 0]);
    table.extend_from_slice(b"KATALITE");
    table.extend_from_slice(b"VM-CONTAINER");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[header_start + 7] = checksum(&table[header_start..]);
    Ok(table)
}

/// Writes the MP table for `vcpus` at the EBDA.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MptableError> {
    let table = build(EBDA_START, vcpus)?;
    if EBDA_START + table.len() as u64 > HIMEM_START {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const CPU_ENTRY_SIZE: usize = 20;
    const ENTRY_SIZE: usize = 8;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// What a reader like Linux's `smp_read_mpc` gets out of the table.
    #[derive(Default)]
    struct Parsed {
        cpus: Vec<(u8, u8)>,
        ioapic: Option<(u8, u32)>,
        io_ints: Vec<(u8, u8, u8)>,
        local_ints: Vec<(u8, u8, u8)>,
        buses: Vec<[u8; 6]>,
    }

    fn parse(base: u64, bytes: &[u8]) -> Parsed {
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
        assert_eq!((bytes[8], bytes[9]), (1, 4));
        let table = usize::try_from(u64::from(u32_at(bytes, 4)) - base).expect("offset");
        let header = &bytes[table..];
        assert_eq!(&header[..4], b"PCMP");
        let len = usize::from(u16_at(header, 4));
        assert_eq!(table + len, bytes.len(), "length covers every entry");
        assert_eq!(sum(&header[..len]), 0, "table checksum");
        assert_eq!(u64::from(u32_at(header, 36)), APIC_START);

        let mut parsed = Parsed::default();
        let mut at = HEADER_SIZE;
        for _ in 0..u16_at(header, 34) {
            let e = &header[at..];
            match e[0] {
                ENTRY_CPU => {
                    assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
                    parsed.cpus.push((e[1], e[3]));
                    at += CPU_ENTRY_SIZE;
                    continue;
                }
                ENTRY_BUS => parsed.buses.push(e[2..8].try_into().expect("6 bytes")),
                ENTRY_IOAPIC => parsed.ioapic = Some((e[1], u32_at(e, 4))),
                ENTRY_IO_INT => parsed.io_ints.push((e[5], e[6], e[7])),
                ENTRY_LOCAL_INT => parsed.local_ints.push((e[1], e[6], e[7])),
                other => panic!("unknown entry type {other}"),
            }
            at += ENTRY_SIZE;
        }
        assert_eq!(at, len, "entry count matches the length");
        parsed
    }

    #[test]
    fn every_cpu_is_listed_and_only_the_first_is_the_bsp() {
        let parsed = parse(EBDA_START, &build(EBDA_START, 4).expect("table"));
        assert_eq!(
            parsed.cpus,
            vec![(0, 3), (1, 1), (2, 1), (3, 1)],
            "(apic id, enabled|bsp flags)"
        );
        assert_eq!(parsed.buses, vec![*b"ISA   "]);
        assert_eq!(parsed.ioapic, Some((4, 0xfec0_0000)));
    }

    #[test]
    fn irqs_0_to_23_reach_the_matching_ioapic_pin() {
        let parsed = parse(EBDA_START, &build(EBDA_START, 2).expect("table"));
        let expected: Vec<_> = (0..24).map(|irq| (irq, 2, irq)).collect();
        assert_eq!(parsed.io_ints, expected);
        assert_eq!(
            parsed.local_ints,
            vec![(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, 0xff, 1)]
        );
    }

    #[test]
    fn the_largest_table_fits_below_1m() {
        let table = build(EBDA_START, 32).expect("table");
        assert_eq!(parse(EBDA_START, &table).cpus.len(), 32);
        assert!(EBDA_START + table.len() as u64 <= HIMEM_START);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        write(&mem, 32).expect("write");
        let mut back = vec![0u8; table.len()];
        mem.read_slice(&mut back, GuestAddress(EBDA_START))
            .expect("read");
        assert_eq!(back, table);
    }

    #[test]
    fn zero_cpus_or_no_room_for_the_ioapic_id_is_rejected() {
        assert!(build(EBDA_START, 0).is_err());
        assert!(build(EBDA_START, 255).is_err());
    }
}
