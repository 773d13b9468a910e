//! Model-specific registers every vCPU starts with: syscall/sysenter entry points cleared,
//! TSC at zero, fast strings on, and MTRRs defaulting to write-back (without that, Linux
//! maps all of RAM uncached).

use kvm_bindings::{kvm_msr_entry, Msrs};

/// Errors while building the MSR list.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The list does not fit KVM's MSR array.
    #[error("cannot build the boot msr list")]
    List(#[source] vmm_sys_util::fam::Error),
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-string operations (`rep movs`/`stos`).
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: bit 11 enables MTRRs, type 6 = write-back for unmatched ranges.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// The `(index, value)` pairs written to every vCPU.
pub fn boot_msr_values() -> [(u32, u64); 11] {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
}

/// The boot MSRs as KVM_SET_MSRS input.
pub fn boot_msrs() -> Result<Msrs, MsrError> {
    let entries: Vec<kvm_msr_entry> = boot_msr_values()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(MsrError::List)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_write_back_mtrrs_and_fast_strings() {
        let msrs = boot_msrs().expect("msrs");
        let value = |index| {
            msrs.as_slice()
                .iter()
                .find(|e| e.index == index)
                .map(|e| e.data)
        };
        assert_eq!(msrs.as_slice().len(), boot_msr_values().len());
        assert_eq!(value(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(value(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(value(MSR_LSTAR), Some(0));
        assert_eq!(value(MSR_IA32_TSC), Some(0));
    }
}
