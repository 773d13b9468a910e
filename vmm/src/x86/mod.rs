//! x86-64 machine description: guest RAM and its e820 map, kernel loading and the two boot
//! protocols, boot CPU state, CPUID, MSRs, LAPIC wiring and the MP table. Pure data
//! builders over guest memory and KVM structures; the ioctls happen in `vm` and `vcpu`.

pub mod boot;
pub mod cpuid;
pub mod initramfs;
pub mod lapic;
pub mod memory;
pub mod mptable;
pub mod msr;
pub mod packed_kernel;
pub mod pvh;
pub mod regs;
pub mod zeropage;
