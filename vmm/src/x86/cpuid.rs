//! Per-vCPU CPUID: KVM's supported list adjusted so each vCPU sees its own APIC id and a
//! topology of one socket with N single-thread cores, the hypervisor bit, and no features
//! this VMM does not virtualize (power management leaf 6, the PMU in leaf 0xa).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors while building a vCPU's CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM's table has no room for the topology leaves.
    #[error("cpuid table is full")]
    Full(#[source] vmm_sys_util::fam::Error),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE: u32 = 0x8000_001d;
const LEAF_AMD_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 ECX: the TSC-deadline LAPIC timer mode (emulated by KVM's in-kernel LAPIC).
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: the RDRAND instruction.
const ECX_RDRAND: u32 = 1 << 30;
/// Leaf 1 ECX: "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 6 EAX: APIC timer always running (the only power feature KVM's LAPIC provides).
const EAX_ARAT: u32 = 1 << 2;
/// Leaf 0xb/0x1f level types (Intel SDM vol. 2A, CPUID leaf 0BH).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The shape of the guest's CPU package and the vCPU a table is for.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// This vCPU's index, which is also its APIC id.
    pub index: u8,
    /// Number of vCPUs (one core each, one socket).
    pub count: u8,
    /// Whether KVM can emulate the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
}

impl Topology {
    /// Bits of the APIC id that number cores: ceil(log2(count)).
    fn core_bits(self) -> u32 {
        u32::BITS - u32::from(self.count.max(1) - 1).leading_zeros()
    }
}

/// Whether `cpuid` (KVM_GET_SUPPORTED_CPUID output, which [`adjust`] keeps as it is there)
/// gives the guest RDRAND.
pub fn has_rdrand(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|entry| entry.function == LEAF_FEATURES && entry.ecx & ECX_RDRAND != 0)
}

/// Rewrites `cpuid` (KVM_GET_SUPPORTED_CPUID output) for the vCPU described by `topo`.
pub fn adjust(cpuid: &mut CpuId, topo: Topology) -> Result<(), CpuidError> {
    let apic_id = u32::from(topo.index);
    let count = u32::from(topo.count);
    let core_bits = topo.core_bits();
    let mut topology_leaves = Vec::new();

    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:0] (brand index, CLFLUSH size) kept.
                entry.ebx = (entry.ebx & 0xffff) | (apic_id << 24) | ((count & 0xff) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if topo.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS | LEAF_AMD_CACHE => {
                if entry.eax & 0x1f == 0 {
                    continue; // "no more caches"
                }
                // EAX[25:14]: logical processors sharing this cache - 1; only the L3 is
                // shared between cores. EAX[31:26] (Intel only): cores per package - 1.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14);
                if entry.function == LEAF_CACHE_PARAMS {
                    entry.eax |= (((1 << core_bits) - 1) & 0x3f) << 26;
                }
            }
            LEAF_POWER => {
                entry.eax &= EAX_ARAT;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_PMU => {
                // Version 0: no architectural performance monitoring.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 if !topology_leaves.contains(&entry.function) => {
                topology_leaves.push(entry.function);
            }
            LEAF_AMD_SIZES => {
                // ECX[15:12]: APIC id bits for cores; ECX[7:0]: cores per package - 1.
                entry.ecx = (entry.ecx & !0xf0ff) | ((core_bits & 0xf) << 12) | (count - 1);
            }
            LEAF_AMD_APIC_ID => {
                // Extended APIC id, core id (one thread per core), node 0 of 1.
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }

    // The extended topology leaves are rebuilt whole: KVM reports the host's levels, which
    // have nothing to do with this guest's.
    if topology_leaves.is_empty() {
        return Ok(());
    }
    cpuid.retain(|entry| !topology_leaves.contains(&entry.function));
    for function in topology_leaves {
        for entry in topology_entries(function, apic_id, count, core_bits) {
            cpuid.push(entry).map_err(CpuidError::Full)?;
        }
    }
    Ok(())
}

/// Leaf 0xb / 0x1f sub-leaves: SMT level (1 thread per core), core level (all vCPUs), then
/// the terminating invalid level.
fn topology_entries(
    function: u32,
    apic_id: u32,
    count: u32,
    core_bits: u32,
) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        entry(0, 0, 1, LEVEL_SMT),
        entry(1, core_bits, count, LEVEL_CORE),
        entry(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn synthetic() -> CpuId {
        CpuId::from_entries(&[
            leaf(0, 0, [0x1f, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            // Host APIC id 7, 64 logical CPUs, CLFLUSH 8.
            leaf(1, 0, [0x00a0_0f11, 0x0740_0800, 0x0, 0x0]),
            // L1d (level 1, type 1) and L3 (level 3, type 3) shared by 128 host threads.
            leaf(4, 0, [0xfc00_4121, 0, 0, 0]),
            leaf(4, 1, [0xfc1f_c163, 0, 0, 0]),
            leaf(4, 2, [0, 0, 0, 0]),
            leaf(6, 0, [0x77, 1, 9, 0]),
            leaf(0xa, 0, [0x0803_0402, 0, 0, 0x603]),
            leaf(0xb, 0, [1, 2, 0x100, 7]),
            leaf(0xb, 1, [7, 64, 0x201, 7]),
            leaf(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            leaf(0x8000_0008, 0, [0x3030, 0, 0x703f, 0]),
            leaf(0x8000_001e, 0, [7, 0x103, 0x300, 0]),
        ])
        .expect("cpuid")
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    #[test]
    fn rdrand_is_read_from_leaf_1_and_kept_by_adjust() {
        let mut cpuid = synthetic();
        let topo = Topology {
            index: 0,
            count: 1,
            tsc_deadline: false,
        };
        let with = find(&cpuid, 1, 0).ecx & ECX_RDRAND != 0;
        assert_eq!(has_rdrand(&cpuid), with);
        for entry in cpuid.as_mut_slice() {
            if entry.function == LEAF_FEATURES {
                entry.ecx |= ECX_RDRAND;
            }
        }
        adjust(&mut cpuid, topo).expect("adjust");
        assert!(has_rdrand(&cpuid));
        for entry in cpuid.as_mut_slice() {
            entry.ecx &= !ECX_RDRAND;
        }
        assert!(!has_rdrand(&cpuid));
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_package() {
        let mut cpuid = synthetic();
        let topo = Topology {
            index: 2,
            count: 3,
            tsc_deadline: true,
        };
        adjust(&mut cpuid, topo).expect("adjust");

        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);

        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.ecx >> 8) & 0xff, 0, "invalid level terminates");
        assert_eq!(
            cpuid
                .as_slice()
                .iter()
                .filter(|e| e.function == 0xb)
                .count(),
            3
        );

        let l1d = find(&cpuid, 4, 0);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!(l1d.eax >> 26, 3, "4 addressable core ids - 1");
        assert_eq!(l1d.eax & 0x3fff, 0x0121, "cache type and level kept");
        let l3 = find(&cpuid, 4, 1);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        assert_eq!(find(&cpuid, 4, 2).eax, 0);

        assert_eq!(find(&cpuid, 6, 0).eax, EAX_ARAT);
        assert_eq!(find(&cpuid, 6, 0).ecx, 0);
        let pmu = find(&cpuid, 0xa, 0);
        assert_eq!((pmu.eax, pmu.edx), (0, 0));

        let sizes = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 2);
        assert_eq!((sizes.ecx >> 12) & 0xf, 2);
        let ext = find(&cpuid, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (2, 2, 0));

        // Leaves nobody needs to touch pass through.
        assert_eq!(find(&cpuid, 0x4000_0000, 0).ebx, 0x4b4d_564b);
    }

    #[test]
    fn a_single_vcpu_has_no_htt_and_zero_core_bits() {
        let mut cpuid = synthetic();
        let topo = Topology {
            index: 0,
            count: 1,
            tsc_deadline: false,
        };
        adjust(&mut cpuid, topo).expect("adjust");
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ebx >> 16, 1);
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx), (0, 1));
        assert_eq!(find(&cpuid, 4, 0).eax >> 26, 0);
    }

    #[test]
    fn core_bits_round_up_to_a_power_of_two() {
        let bits = |count| {
            Topology {
                index: 0,
                count,
                tsc_deadline: false,
            }
            .core_bits()
        };
        assert_eq!(
            [bits(1), bits(2), bits(3), bits(4), bits(5), bits(32)],
            [0, 1, 2, 2, 3, 5]
        );
    }
}
