//! The guest physical memory map and every fixed device address, in one place.
//! Low memory follows the Linux x86 boot protocol (Documentation/arch/x86/boot.rst) and PVH;
//! devices live in a gap below 4 GiB that is never RAM.

/// GDT used for the initial protected/long-mode segments.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty; Linux installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length the x86 kernel accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM below stops here; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the device gap below 4 GiB (never RAM).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the device gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the first virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt line of the first virtio-mmio device; the next ones follow.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The virtio-mmio slot of the NIC (rng and console take 0 and 1).
pub const VIRTIO_NET_SLOT: u32 = 2;
/// The virtio-mmio slot of the first disk (`/dev/vda`); the others follow.
pub const VIRTIO_BLK_FIRST_SLOT: u32 = 3;
/// Number of virtio-mmio device slots (IRQs 5..=23 on the IOAPIC).
pub const VIRTIO_MAX_DEVICES: u32 = 19;
/// Most disks a VM can have: the slots after the first disk's.
pub const MAX_DISKS: u32 = VIRTIO_MAX_DEVICES - VIRTIO_BLK_FIRST_SLOT;
/// KVM's three-page TSS for real-mode emulation on Intel (KVM_SET_TSS_ADDR); in the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's one-page identity map for real-mode emulation on Intel (KVM_SET_IDENTITY_MAP_ADDR),
/// right below the TSS pages.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// IOAPIC register window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const APIC_START: u64 = 0xfee0_0000;

/// COM1: the 8250 serial console.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Size of the COM1 port window.
pub const SERIAL_PORT_SIZE: u16 = 8;
/// COM1's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller's command port (guest reboot requests arrive here).
pub const I8042_PORT_BASE: u16 = 0x60;
/// i8042 window: ports 0x60..=0x64.
pub const I8042_PORT_SIZE: u16 = 5;
/// Port of the exit-status device (shared with guest-init through the contract).
pub const STATUS_PORT: u16 = guest_status_port();
/// Size of the status device window (one 32-bit register).
pub const STATUS_PORT_SIZE: u16 = 4;

// The status port is part of the host<->init contract; the value is repeated here so the
// vmm crate does not depend on the guest side. A unit test keeps the two in step.
const fn guest_status_port() -> u16 {
    0x0510
}

/// Guest address of virtio-mmio slot `index`.
pub fn virtio_mmio_addr(index: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE
}
