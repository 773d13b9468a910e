//! One VM from start to end: guest memory registered with KVM, the in-kernel irqchip and
//! PIT, the devices on their buses (COM1, i8042, status port, virtio-mmio rng, console,
//! optionally net and disks), the boot image, the vCPU threads, the console input thread,
//! the network thread and one thread per disk; then wait for the first stop request, stop
//! every vCPU, join them and report how the guest ended.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{Bus, BusError};
use crate::confine::{self, ThreadRole};
use crate::devices::stop::VmStopper;
use crate::devices::{SerialPort, StatusPort, StopReason, VmStop, I8042};
use crate::host_writer::{HostWriter, OutputSender};
use crate::layout;
use crate::net::{nic, NetConfig, NetPump};
use crate::vcpu::{self, Vcpu, VcpuError, VcpuSetup};
use crate::virtio::block::worker as disk_worker;
use crate::virtio::fs;
use crate::virtio::worker::{notify_eventfd, QueueWorker};
use crate::virtio::{
    Console, ConsoleInput, DiskConfig, DiskSetupError, FsShareConfig, InputPump, MmioTransport,
    Rng, ShareSetupError, VirtioDevice, CONSOLE_RECEIVE_QUEUE, CONSOLE_TRANSMIT_QUEUE,
    CONSOLE_WORKER_QUEUES,
};
use crate::x86::boot::{self, BootError, LinuxImage};
use crate::x86::cpuid;
use crate::x86::initramfs::InitramfsPart;
use crate::x86::memory::{self, MemoryError};
use crate::x86::mptable::{self, MptableError};
use crate::x86::regs::{BootMode, EntryPoint};
use crate::GuestMemory;

/// Most vCPUs a VM may have (the MP table and APIC ids are sized for it).
pub const MAX_VCPUS: u8 = 32;
/// Least guest memory: below this a kernel plus initramfs does not fit.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most guest memory accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// What the VMM itself puts first on the kernel command line: the kernel log on COM1
/// (8250 probing limited to it), reboot through the i8042 reset line, and an immediate
/// reboot on panic, so a dying guest ends the VM instead of hanging.
pub const BASE_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1";

const MIB: u64 = 1 << 20;
/// Guest console output the writer thread may hold before the device stops taking the
/// guest's buffers.
const CONSOLE_OUT_CAPACITY: usize = 1 << 20;
/// Kernel log the writer thread may hold; past it, lines are dropped (COM1 has no flow
/// control worth honouring, and the kernel must not stall on its log).
const KERNEL_LOG_CAPACITY: usize = 256 << 10;

/// A Linux VM to run.
pub struct VmConfig<'a> {
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest RAM in MiB, at least [`MIN_MEMORY_MIB`]; what exceeds the device gap below
    /// 4 GiB is placed above 4 GiB.
    pub memory_mib: u64,
    /// Uncompressed vmlinux ELF.
    pub kernel: &'a [u8],
    /// For a packed kernel: the cache file its segments are kept unpacked in and mapped
    /// from, copy-on-write, on later boots; `None`: decompressed at every boot.
    pub kernel_cache: Option<&'a std::path::Path>,
    /// Initramfs parts, placed back to back, each padded to 4 bytes; dropped once loaded.
    pub initramfs: Vec<InitramfsPart>,
    /// Appended after [`BASE_CMDLINE`] and the virtio-mmio device arguments.
    pub cmdline: &'a str,
    /// virtio-console output (the workload's output).
    pub console: Box<dyn Write + Send>,
    /// virtio-console input (host to guest); `None` gives the guest no input. The VM ends
    /// the handle when it ends.
    pub console_input: Option<ConsoleInput>,
    /// Lets the caller end the VM from another thread ([`VmExit::Stopped`]).
    pub stopper: Option<VmStopper>,
    /// COM1 output (the kernel log).
    pub serial: Box<dyn Write + Send>,
    /// A virtio-net NIC and the network behind it; `None` gives the guest no NIC. The
    /// backend is dropped (its sockets and published ports closed) when the VM ends.
    pub network: Option<NetConfig>,
    /// virtio-blk disks, at most [`layout::MAX_DISKS`]: the first is `/dev/vda` in the
    /// guest, the next `/dev/vdb`, and so on. Each is served by its own thread.
    pub disks: Vec<DiskConfig>,
    /// Host directories shared over virtio-fs, each served by its own thread.
    pub shares: Vec<FsShareConfig>,
    /// Called once the kernel and initramfs are in guest memory, before any vCPU runs: the
    /// caller lets go of what it held only for the load (an embedded kernel's pages).
    pub loaded: Option<Box<dyn FnOnce() + 'a>>,
}

/// A hand-written real-mode guest, for testing the VMM on hosts (like PVM) that cannot
/// boot a stock kernel. It runs with the same devices, buses and vCPU loop as
/// [`VmConfig`]; only the boot setup differs (CS = 0, IP = `load_addr`).
pub struct RawGuest<'a> {
    /// Machine code, copied to `load_addr`.
    pub code: &'a [u8],
    /// Where the code goes and the BSP starts.
    pub load_addr: u16,
    /// Number of vCPUs; the APs wait for INIT/SIPI like in a Linux VM.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// COM1 output.
    pub serial: Box<dyn Write + Send>,
    /// Lets the caller end the VM from another thread ([`VmExit::Stopped`]).
    pub stopper: Option<VmStopper>,
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this word to the status port (layout::STATUS_PORT, 32-bit `out`).
    Status(u32),
    /// The guest reset/rebooted (i8042 0xFE, or KVM_EXIT_SHUTDOWN = triple fault) without
    /// reporting a status. `panic` is the "Kernel panic - not syncing: ..." line if the
    /// serial console printed one.
    Reset {
        /// KVM_EXIT_SHUTDOWN (triple fault) rather than a reset request.
        triple_fault: bool,
        /// The kernel's panic line, if it printed one.
        panic: Option<String>,
    },
    /// The caller ended the VM through its [`VmStopper`] before the guest ended.
    Stopped,
}

/// Errors of [`run`] and [`run_raw`].
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The vCPU count is out of range.
    #[error("{requested} vcpus requested; between 1 and {max} are supported")]
    VcpuCount {
        /// Requested count.
        requested: u8,
        /// Highest supported count.
        max: u8,
    },
    /// Less memory than a guest needs.
    #[error("{mib} MiB of guest memory is too little; at least {min} MiB are needed")]
    MemoryTooSmall {
        /// Requested MiB.
        mib: u64,
        /// Minimum MiB.
        min: u64,
    },
    /// More memory than supported.
    #[error("{mib} MiB of guest memory is more than the supported {max} MiB")]
    MemoryTooLarge {
        /// Requested MiB.
        mib: u64,
        /// Maximum MiB.
        max: u64,
    },
    /// A VM-level KVM ioctl failed.
    #[error("kvm {op} failed")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("guest memory setup failed")]
    Memory(#[from] MemoryError),
    /// The kernel, initramfs or command line could not be loaded.
    #[error("cannot load the guest")]
    Boot(#[from] BootError),
    /// The raw guest's code does not fit guest memory.
    #[error("cannot load the raw guest code")]
    RawCode(#[source] vm_memory::GuestMemoryError),
    /// The MP table could not be written.
    #[error("cannot write the mp table")]
    Mptable(#[from] MptableError),
    /// An interrupt eventfd could not be created.
    #[error("cannot create the {device} interrupt eventfd")]
    EventFd {
        /// The device.
        device: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Two devices were given overlapping addresses.
    #[error("cannot place a device on a bus")]
    Bus(#[from] BusError),
    /// The console input or network thread could not be started.
    #[error("cannot start the io thread")]
    IoThread(#[source] io::Error),
    /// A device's queue notification eventfd could not be set up.
    #[error("cannot set up a device's queue notification")]
    Notify(#[source] io::Error),
    /// The NIC's link or notification eventfds could not be set up.
    #[error("cannot set up the network device")]
    Net(#[source] io::Error),
    /// More disks and shares than there are device slots for them.
    #[error("{count} disks and shared directories requested; at most {max} are supported")]
    DiskCount {
        /// Requested disks.
        count: usize,
        /// Most disks.
        max: u32,
    },
    /// A disk could not be set up.
    #[error("cannot set up disk {index}")]
    Disk {
        /// Its position in [`VmConfig::disks`].
        index: usize,
        /// What went wrong.
        #[source]
        source: DiskSetupError,
    },
    /// A shared directory could not be set up.
    #[error("cannot share directory {index}")]
    Share {
        /// Its position in [`VmConfig::shares`].
        index: usize,
        /// What went wrong.
        #[source]
        source: ShareSetupError,
    },
    /// A vCPU could not be set up or failed while running.
    #[error("vcpu {index} failed")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// What went wrong.
        #[source]
        source: VcpuError,
    },
}

/// Whether the guest needs virtio-rng for entropy: only when its CPU has no RDRAND. With
/// RDRAND (x86-64 CPUs since 2012-2015) Linux seeds its CRNG from it at boot ("crng init
/// done" before any driver), and the device would only cost boot time (its probe reads
/// entropy synchronously: about 70 ms of a lab boot), a thread and exits. Not knowing
/// counts as needing it.
fn needs_rng(kvm: &Kvm) -> bool {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_or(true, |supported| !cpuid::has_rdrand(&supported))
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Boots `config` and blocks until the guest reports a status, resets, fails, or is
/// stopped.
pub fn run(config: VmConfig<'_>) -> Result<VmExit, VmError> {
    let machine = Machine::new(
        config.vcpus,
        config.memory_mib,
        Outputs {
            serial: config.serial,
            console: config.console,
            console_input: config.console_input.unwrap_or_default(),
        },
        config.stopper.unwrap_or_default(),
        config.network,
        Storage {
            disks: config.disks,
            shares: config.shares,
        },
    )?;
    let cmdline = machine.cmdline(config.cmdline);
    let image = LinuxImage {
        kernel: config.kernel,
        kernel_cache: config.kernel_cache,
        initramfs: config.initramfs,
        cmdline: &cmdline,
    };
    let entry = boot::load(&machine.mem, machine.mem_size, image)?;
    if let Some(loaded) = config.loaded {
        loaded();
    }
    machine.run(entry)
}

/// Runs `guest` (real mode) and blocks until it reports a status, resets, fails, or is
/// stopped.
pub fn run_raw(guest: RawGuest<'_>) -> Result<VmExit, VmError> {
    let machine = Machine::new(
        guest.vcpus,
        guest.memory_mib,
        Outputs {
            serial: guest.serial,
            console: Box::new(io::sink()),
            console_input: ConsoleInput::new(),
        },
        guest.stopper.unwrap_or_default(),
        None,
        Storage::default(),
    )?;
    let addr = u64::from(guest.load_addr);
    machine
        .mem
        .write_slice(guest.code, GuestAddress(addr))
        .map_err(VmError::RawCode)?;
    machine.run(EntryPoint {
        mode: BootMode::RealMode,
        addr,
    })
}

fn check_shape(vcpus: u8, memory_mib: u64) -> Result<u64, VmError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount {
            requested: vcpus,
            max: MAX_VCPUS,
        });
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(VmError::MemoryTooSmall {
            mib: memory_mib,
            min: MIN_MEMORY_MIB,
        });
    }
    if memory_mib > MAX_MEMORY_MIB {
        return Err(VmError::MemoryTooLarge {
            mib: memory_mib,
            max: MAX_MEMORY_MIB,
        });
    }
    Ok(memory_mib * MIB)
}

/// A created VM with its devices, before any vCPU exists.
struct Machine {
    kvm: Kvm,
    // Declared (and so dropped) before `mem`: the memory slots must not outlive the
    // mappings they point at.
    vm: VmFd,
    mem: GuestMemory,
    mem_size: u64,
    vcpus: u8,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialPort>>,
    serial_out: HostWriter,
    console: Arc<Mutex<MmioTransport>>,
    // Runs the console's queues when the guest notifies them or the writer has room.
    console_worker: QueueWorker,
    console_out: HostWriter,
    console_stalled: Arc<AtomicBool>,
    // Only for a guest whose CPU has no RDRAND (see `needs_rng`).
    rng: Option<(Arc<Mutex<MmioTransport>>, QueueWorker)>,
    // Dropped with the machine, which ends the console input on every path out of `run`.
    pump: InputPump,
    // Likewise, dropping it stops the network thread and closes the backend's sockets.
    net: Option<(Arc<Mutex<MmioTransport>>, NetPump)>,
    // Likewise for each disk's thread.
    disks: Vec<(Arc<Mutex<MmioTransport>>, QueueWorker)>,
    // And for each share's.
    shares: Vec<(Arc<Mutex<MmioTransport>>, QueueWorker)>,
    stop: Arc<VmStop>,
    device_args: Vec<String>,
    // Declared last, so dropped last: the mappings behind `mem`, unmapped only once every
    // thread above that used guest memory has been joined and the KVM slots are gone.
    _ram: memory::RamMappings,
}

/// Where the guest's output goes and where its console input comes from.
struct Outputs {
    serial: Box<dyn Write + Send>,
    console: Box<dyn Write + Send>,
    console_input: ConsoleInput,
}

/// The VM's disks and shared directories, which take the virtio slots after the NIC's.
#[derive(Default)]
struct Storage {
    disks: Vec<DiskConfig>,
    shares: Vec<FsShareConfig>,
}

impl Machine {
    fn new(
        vcpus: u8,
        memory_mib: u64,
        outputs: Outputs,
        stopper: VmStopper,
        network: Option<NetConfig>,
        storage: Storage,
    ) -> Result<Self, VmError> {
        let Storage {
            disks: disk_configs,
            shares: share_configs,
        } = storage;
        let count = disk_configs.len() + share_configs.len();
        if count > usize::try_from(layout::MAX_DISKS).unwrap_or(usize::MAX) {
            return Err(VmError::DiskCount {
                count,
                max: layout::MAX_DISKS,
            });
        }
        let pump = InputPump::new(outputs.console_input.clone());
        let mem_size = check_shape(vcpus, memory_mib)?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::VcpuCount {
                requested: vcpus,
                max: u8::try_from(max).unwrap_or(MAX_VCPUS),
            });
        }
        let (mem, ram) = memory::create(mem_size)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        register_memory(&vm, &mem)?;

        // The TSS and identity-map pages KVM needs for real-mode emulation on Intel sit in
        // the device gap, away from RAM and device windows.
        vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDRESS).unwrap_or(usize::MAX))
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
                .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let stop = stopper.shared();
        let mut pio = Bus::new();
        let serial_irq = irqfd(&vm, "serial", layout::SERIAL_IRQ)?;
        let serial_out =
            HostWriter::start("katalite-klog", outputs.serial, KERNEL_LOG_CAPACITY, None)
                .map_err(VmError::IoThread)?;
        let serial = Arc::new(Mutex::new(SerialPort::new(
            serial_irq,
            Box::new(DroppingWriter(serial_out.sender())),
        )));
        pio.insert(
            serial.clone(),
            u64::from(layout::SERIAL_PORT_BASE),
            u64::from(layout::SERIAL_PORT_SIZE),
        )?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(stop.clone()))),
            u64::from(layout::I8042_PORT_BASE),
            u64::from(layout::I8042_PORT_SIZE),
        )?;
        pio.insert(
            Arc::new(Mutex::new(StatusPort::new(stop.clone()))),
            u64::from(layout::STATUS_PORT),
            u64::from(layout::STATUS_PORT_SIZE),
        )?;

        let mut mmio = Bus::new();
        let mut device_args = Vec::new();
        let mut place = |slot: u32, name, device: Box<dyn VirtioDevice>| {
            let addr = layout::virtio_mmio_addr(slot);
            let irq = layout::VIRTIO_FIRST_IRQ + slot;
            let evt = irqfd(&vm, name, irq)?;
            let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), device, evt)));
            mmio.insert(transport.clone(), addr, layout::VIRTIO_MMIO_SIZE)?;
            // CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES: "<size>@<base>:<irq>".
            device_args.push(format!("virtio_mmio.device=4K@0x{addr:x}:{irq}"));
            Ok::<_, VmError>(transport)
        };
        // The rng and the console run on worker threads woken by their queues' ioeventfds:
        // a vCPU never does their host work (getrandom, output) in its exit.
        let rng = if needs_rng(&kvm) {
            let rng_notify =
                notify_eventfd(&vm, layout::virtio_mmio_addr(0), &[0]).map_err(VmError::Notify)?;
            let rng_worker = QueueWorker::new(
                "katalite-rng".into(),
                ThreadRole::Device,
                rng_notify,
                Arc::default(),
            )
            .map_err(VmError::IoThread)?;
            Some((place(0, "virtio-rng", Box::new(Rng::new()))?, rng_worker))
        } else {
            None
        };
        let console_notify =
            notify_eventfd(&vm, layout::virtio_mmio_addr(1), &CONSOLE_WORKER_QUEUES)
                .map_err(VmError::Notify)?;
        // The writer signals the same eventfd when a full queue has room again.
        let room = console_notify.try_clone().map_err(VmError::Notify)?;
        let console_out = HostWriter::start(
            "katalite-out",
            outputs.console,
            CONSOLE_OUT_CAPACITY,
            Some(room),
        )
        .map_err(VmError::IoThread)?;
        let console_device = Console::new(console_out.sender(), outputs.console_input);
        let console_stalled = console_device.stalled();
        let console_worker = QueueWorker::new(
            "katalite-cons".into(),
            ThreadRole::Device,
            console_notify,
            Arc::default(),
        )
        .map_err(VmError::IoThread)?
        .with_later(console_device.later());
        let console = place(1, "virtio-console", Box::new(console_device))?;
        let net = match network {
            Some(config) => {
                let window = layout::virtio_mmio_addr(layout::VIRTIO_NET_SLOT);
                let (device, pump) = nic::build(&vm, window, config).map_err(VmError::Net)?;
                Some((place(layout::VIRTIO_NET_SLOT, "virtio-net", device)?, pump))
            }
            None => None,
        };
        let mut disks = Vec::with_capacity(disk_configs.len());
        for ((index, config), slot) in disk_configs
            .into_iter()
            .enumerate()
            .zip(layout::VIRTIO_BLK_FIRST_SLOT..)
        {
            let window = layout::virtio_mmio_addr(slot);
            let (device, worker) = disk_worker::build(&vm, window, index, config)
                .map_err(|source| VmError::Disk { index, source })?;
            disks.push((place(slot, "virtio-blk", device)?, worker));
        }
        // Shares take the slots after the disks.
        let mut shares = Vec::with_capacity(share_configs.len());
        let first_share_slot =
            layout::VIRTIO_BLK_FIRST_SLOT + u32::try_from(disks.len()).unwrap_or(0);
        for ((index, config), slot) in share_configs
            .into_iter()
            .enumerate()
            .zip(first_share_slot..)
        {
            let window = layout::virtio_mmio_addr(slot);
            let (device, worker) = fs::build(&vm, window, index, config)
                .map_err(|source| VmError::Share { index, source })?;
            shares.push((place(slot, "virtio-fs", device)?, worker));
        }

        Ok(Self {
            kvm,
            vm,
            mem,
            mem_size,
            vcpus,
            pio,
            mmio,
            serial,
            serial_out,
            console,
            console_worker,
            console_out,
            console_stalled,
            rng,
            pump,
            net,
            disks,
            shares,
            stop,
            device_args,
            _ram: ram,
        })
    }

    /// The full kernel command line: the VMM's arguments, the devices, then `user`.
    fn cmdline(&self, user: &str) -> String {
        let mut parts = vec![BASE_CMDLINE.to_owned()];
        parts.extend(self.device_args.iter().cloned());
        if !user.is_empty() {
            parts.push(user.to_owned());
        }
        parts.join(" ")
    }

    fn run(mut self, entry: EntryPoint) -> Result<VmExit, VmError> {
        let vcpu_err = |index| move |source| VmError::Vcpu { index, source };
        vcpu::install_kick_handler().map_err(vcpu_err(0))?;
        mptable::write(&self.mem, self.vcpus)?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let setup = VcpuSetup {
            supported_cpuid: &supported,
            count: self.vcpus,
            tsc_deadline: self.kvm.check_extension(Cap::TscDeadlineTimer),
            mem: &self.mem,
            entry,
        };
        let mut fds = Vec::with_capacity(usize::from(self.vcpus));
        for index in 0..self.vcpus {
            let fd = self
                .vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu::configure(&fd, index, &setup).map_err(vcpu_err(index))?;
            fds.push(fd);
        }

        let console = self.console.clone();
        self.console_worker
            .start(move || {
                let mut transport = console.lock().unwrap_or_else(PoisonError::into_inner);
                for queue in CONSOLE_WORKER_QUEUES {
                    transport.run_queue(queue);
                }
            })
            .map_err(VmError::IoThread)?;
        if let Some((rng, worker)) = &mut self.rng {
            let rng = rng.clone();
            worker
                .start(move || {
                    rng.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .run_queue(0);
                })
                .map_err(VmError::IoThread)?;
        }
        // Host input reaches the guest even while no vCPU exits (a guest spinning in user
        // space, or idle in HLT inside KVM): the io thread runs receiveq0 itself.
        let console = self.console.clone();
        self.pump
            .start(move || {
                console
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .run_queue(CONSOLE_RECEIVE_QUEUE);
            })
            .map_err(VmError::IoThread)?;
        // Frames from the network reach the guest the same way, from `katalite-net`.
        if let Some((transport, pump)) = &mut self.net {
            pump.start(nic::run_queue(transport.clone()))
                .map_err(VmError::IoThread)?;
        }
        // Disk requests are served by each disk's thread, woken through its ioeventfd.
        for (transport, worker) in &mut self.disks {
            worker
                .start(disk_worker::run_queue(transport.clone()))
                .map_err(VmError::IoThread)?;
        }
        // And file system requests by each share's.
        for (transport, worker) in &mut self.shares {
            worker
                .start(fs::run_queues(transport.clone()))
                .map_err(VmError::IoThread)?;
        }

        let running = Arc::new(AtomicBool::new(true));
        let pio = Arc::new(self.pio.clone());
        let mmio = Arc::new(self.mmio.clone());
        let mut threads = Vec::with_capacity(fds.len());
        for (index, fd) in (0u8..).zip(fds) {
            let vcpu = Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: self.stop.clone(),
                running: running.clone(),
            };
            match vcpu.spawn() {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    stop_vcpus(&running, threads);
                    return Err(VmError::Vcpu { index, source });
                }
            }
        }

        // Every VM thread runs: from here this thread only waits and tears down.
        confine::enter(ThreadRole::Main);
        let reason = self.stop.wait();
        let results = stop_vcpus(&running, threads);
        // The workers first, so nothing else takes the guest's output, then what the guest
        // left in its transmit queue (its last buffers may not have been taken yet). A VM
        // stopped from outside does not wait for a host reader that may never read.
        drop(self.console_worker);
        drop(self.rng);
        let drain = reason != StopReason::Stopped;
        if drain {
            drain_console(
                &self.console,
                &self.console_stalled,
                &self.console_out.sender(),
            );
        }
        self.console_out.finish(drain);
        let mut serial = self
            .serial
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The kernel log is best effort; a closed output must not hide the guest's result.
        let _ = serial.finish();
        self.serial_out.finish(drain);
        match reason {
            StopReason::Status(word) => Ok(VmExit::Status(word)),
            StopReason::Reset { triple_fault } => Ok(VmExit::Reset {
                triple_fault,
                panic: serial.panic_line(),
            }),
            StopReason::Stopped => Ok(VmExit::Stopped),
            StopReason::VcpuFailed(index) => {
                let source = results
                    .into_iter()
                    .nth(usize::from(index))
                    .and_then(Result::err)
                    .unwrap_or(VcpuError::Panicked);
                Err(VmError::Vcpu { index, source })
            }
        }
    }
}

/// Takes what the guest left in the console's transmit queue once its vCPUs are stopped,
/// waiting for the writer whenever its queue is full.
fn drain_console(console: &Mutex<MmioTransport>, stalled: &AtomicBool, out: &OutputSender) {
    loop {
        console
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .run_queue(CONSOLE_TRANSMIT_QUEUE);
        if !stalled.load(Ordering::Acquire) {
            return;
        }
        out.wait_for_room();
    }
}

/// The kernel log's host side: COM1 must never wait, so lines the writer has no room for
/// are dropped.
struct DroppingWriter(OutputSender);

impl Write for DroppingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push_or_drop(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Clears `running`, kicks every vCPU out of KVM_RUN, joins them, and returns each
/// thread's result (a panicked thread as [`VcpuError::Panicked`]).
fn stop_vcpus(
    running: &AtomicBool,
    threads: Vec<JoinHandle<Result<(), VcpuError>>>,
) -> Vec<Result<(), VcpuError>> {
    running.store(false, Ordering::Release);
    for thread in &threads {
        vcpu::kick(thread);
    }
    threads
        .into_iter()
        .map(|thread| thread.join().unwrap_or(Err(VcpuError::Panicked)))
        .collect()
}

fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::TooLarge(region.len()))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region describes a live mapping of `mem` of exactly that size; the
        // mapping outlives the VM fd (Machine drops `vm` before `mem`), and the host only
        // touches guest memory through vm-memory's volatile accessors.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// An eventfd registered as KVM irqfd for `gsi`: writing it raises the interrupt.
fn irqfd(vm: &VmFd, device: &'static str, gsi: u32) -> Result<EventFd, VmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| VmError::EventFd { device, source })?;
    vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(evt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_count_and_memory_are_checked_before_touching_kvm() {
        assert!(matches!(
            check_shape(0, 512),
            Err(VmError::VcpuCount { requested: 0, .. })
        ));
        assert!(matches!(
            check_shape(33, 512),
            Err(VmError::VcpuCount { max: 32, .. })
        ));
        assert!(matches!(
            check_shape(1, 63),
            Err(VmError::MemoryTooSmall { min: 64, .. })
        ));
        assert!(matches!(
            check_shape(1, MAX_MEMORY_MIB + 1),
            Err(VmError::MemoryTooLarge { .. })
        ));
        assert_eq!(check_shape(32, 64).expect("ok"), 64 << 20);
    }

    #[test]
    fn the_errors_say_what_is_wrong() {
        let err = check_shape(40, 512).expect_err("too many");
        assert_eq!(
            err.to_string(),
            "40 vcpus requested; between 1 and 32 are supported"
        );
        let err = check_shape(1, 16).expect_err("too small");
        assert!(err.to_string().contains("at least 64 MiB"));
    }
}
