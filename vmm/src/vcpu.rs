//! vCPUs: per-vCPU KVM state at creation (CPUID, MSRs, FPU, LAPIC wiring, MP state, and
//! the boot registers for the BSP only), then one thread per vCPU running KVM_RUN and
//! handing every exit to a bus. The loop knows no port numbers. A stop arrives as a
//! cleared `running` flag plus a signal that makes KVM_RUN return.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_mp_state, kvm_run, CpuId, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::confine::{self, ThreadRole};
use crate::devices::{StopReason, VmStop};
use crate::x86::cpuid::{self, CpuidError, Topology};
use crate::x86::lapic;
use crate::x86::msr::{self, MsrError};
use crate::x86::regs::{self, EntryPoint, RegsError};
use crate::GuestMemory;

/// Errors of one vCPU, at setup or while running.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("kvm {op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID table could not be built.
    #[error("cannot build cpuid")]
    Cpuid(#[from] CpuidError),
    /// The MSR list could not be built.
    #[error("cannot build msrs")]
    Msrs(#[from] MsrError),
    /// KVM accepted only part of the boot MSRs.
    #[error("kvm accepted {set} of {total} boot msrs")]
    MsrsPartial {
        /// MSRs written.
        set: usize,
        /// MSRs requested.
        total: usize,
    },
    /// Boot CPU structures could not be written.
    #[error("cannot set up boot registers")]
    Regs(#[from] RegsError),
    /// The thread could not be started.
    #[error("cannot start the vcpu thread")]
    Spawn(#[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vcpu kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// KVM_EXIT_HLT: only happens without an in-kernel LAPIC, which this VMM always has.
    #[error("vcpu halted outside the in-kernel irqchip")]
    Halted,
    /// KVM_EXIT_INTERNAL_ERROR (e.g. suberror 1: instruction emulation failed, which is
    /// how a stock kernel dies on a PVM host).
    #[error("guest internal error (kvm suberror {suberror}: {})", suberror_name(*suberror))]
    Internal {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    #[error("vm entry failed (hardware reason {reason:#x})")]
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
    },
    /// An exit this VMM does not handle.
    #[error("unexpected kvm exit (reason {reason})")]
    UnexpectedExit {
        /// `kvm_run.exit_reason`.
        reason: u32,
    },
    /// The vCPU thread panicked.
    #[error("vcpu thread panicked")]
    Panicked,
}

/// What the KVM_INTERNAL_ERROR_* suberrors of include/uapi/linux/kvm.h mean.
fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "instruction emulation failed",
        2 => "exception while delivering an exception",
        3 => "cannot deliver an event",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, source }
}

/// What every vCPU of a VM is configured from.
pub struct VcpuSetup<'a> {
    /// KVM_GET_SUPPORTED_CPUID output, adjusted per vCPU.
    pub supported_cpuid: &'a CpuId,
    /// Number of vCPUs.
    pub count: u8,
    /// KVM_CAP_TSC_DEADLINE_TIMER.
    pub tsc_deadline: bool,
    /// Guest memory (the BSP's GDT and page tables go there).
    pub mem: &'a GuestMemory,
    /// Where the BSP starts.
    pub entry: EntryPoint,
}

/// Configures vCPU `index`. Only the BSP (index 0) gets boot registers; the APs stay in
/// KVM's reset state, waiting for INIT/SIPI from the BSP through the in-kernel LAPIC.
pub fn configure(fd: &VcpuFd, index: u8, setup: &VcpuSetup<'_>) -> Result<(), VcpuError> {
    let mut cpuid = setup.supported_cpuid.clone();
    let topology = Topology {
        index,
        count: setup.count,
        tsc_deadline: setup.tsc_deadline,
    };
    cpuid::adjust(&mut cpuid, topology)?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let msrs = msr::boot_msrs()?;
    let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    let total = msrs.as_slice().len();
    if set != total {
        return Err(VcpuError::MsrsPartial { set, total });
    }
    fd.set_fpu(&regs::boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
    let mut lapic_state = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    lapic::set_virtual_wire(&mut lapic_state);
    fd.set_lapic(&lapic_state).map_err(kvm("KVM_SET_LAPIC"))?;

    let mp_state = if index == 0 {
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let sregs = regs::boot_sregs(setup.mem, sregs, setup.entry.mode)?;
        fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&regs::boot_regs(setup.entry))
            .map_err(kvm("KVM_SET_REGS"))?;
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    };
    fd.set_mp_state(kvm_mp_state { mp_state })
        .map_err(kvm("KVM_SET_MP_STATE"))
}

thread_local! {
    /// This thread's `kvm_run` while its vCPU loop runs, for the kick handler.
    static RUNNING_VCPU: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // `try_with` on a const-initialized Cell with no destructor only reads this thread's
    // TLS slot: async-signal-safe.
    let _ = RUNNING_VCPU.try_with(|slot| {
        let run = slot.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's own mapped kvm_run, published by `Vcpu::run`
            // before its first KVM_RUN and cleared before the VcpuFd (and the mapping) is
            // dropped. Setting immediate_exit makes a KVM_RUN that has not yet entered the
            // guest return EINTR at once, closing the race between the `running` check
            // and entering KVM_RUN.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
        .map_err(VcpuError::Signal)
}

/// Interrupts `thread`'s KVM_RUN (it must have seen `running` cleared first).
pub fn kick<T>(thread: &JoinHandle<T>) {
    // A thread that already left its loop ignores the signal; a failure means the thread
    // is gone, which is what a kick wants anyway.
    let _ = thread.kill(kick_signal());
}

/// Requests a stop if the vCPU thread unwinds from a panic, so the VM owner wakes up.
struct PanicGuard<'a> {
    stop: &'a VmStop,
    index: u8,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.stop.request(StopReason::VcpuFailed(self.index));
        }
    }
}

/// A configured vCPU and what its exits are dispatched to.
pub struct Vcpu {
    /// vCPU index (= APIC id).
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where stops are requested.
    pub stop: Arc<VmStop>,
    /// Cleared by the VM owner to make every vCPU leave its loop.
    pub running: Arc<AtomicBool>,
}

impl Vcpu {
    /// Starts the vCPU on its own thread, `katalite-vcpu{index}`.
    pub fn spawn(self) -> Result<JoinHandle<Result<(), VcpuError>>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("katalite-vcpu{}", self.index))
            .stack_size(crate::THREAD_STACK_BYTES)
            .spawn(move || self.run())
            .map_err(VcpuError::Spawn)
    }

    fn run(mut self) -> Result<(), VcpuError> {
        let stop = self.stop.clone();
        let _guard = PanicGuard {
            stop: &stop,
            index: self.index,
        };
        let run: *mut kvm_run = self.fd.get_kvm_run();
        RUNNING_VCPU.with(|slot| slot.set(run));
        confine::enter(ThreadRole::Vcpu);
        let result = self.run_loop();
        RUNNING_VCPU.with(|slot| slot.set(std::ptr::null_mut()));
        if result.is_err() {
            self.stop.request(StopReason::VcpuFailed(self.index));
        }
        result
    }

    fn run_loop(&mut self) -> Result<(), VcpuError> {
        while self.running.load(Ordering::Acquire) {
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        if !self.pio.read(u64::from(port), data) {
                            data.fill(0);
                        }
                    }
                    VcpuExit::IoOut(port, data) => {
                        self.pio.write(u64::from(port), data);
                    }
                    // Unmapped MMIO reads as zeros and ignores writes, silently: probing
                    // guests touch such addresses routinely.
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.mmio.read(addr, data) {
                            data.fill(0);
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.mmio.write(addr, data);
                    }
                    VcpuExit::Shutdown => {
                        self.stop.request(StopReason::Reset { triple_fault: true });
                        return Ok(());
                    }
                    VcpuExit::SystemEvent(kind, _)
                        if kind == KVM_SYSTEM_EVENT_RESET || kind == KVM_SYSTEM_EVENT_SHUTDOWN =>
                    {
                        self.stop.request(StopReason::Reset {
                            triple_fault: false,
                        });
                        return Ok(());
                    }
                    VcpuExit::Intr => {}
                    VcpuExit::Hlt => return Err(VcpuError::Halted),
                    VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry { reason }),
                    VcpuExit::InternalError => {
                        return Err(VcpuError::Internal {
                            suberror: internal_suberror(&mut self.fd),
                        })
                    }
                    _ => {
                        return Err(VcpuError::UnexpectedExit {
                            reason: self.fd.get_kvm_run().exit_reason,
                        })
                    }
                },
                // EINTR: kicked (or another signal); EAGAIN: KVM asks to retry.
                Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                    // Cleared before `running` is re-checked, so a kick that lands after
                    // this point still stops the next KVM_RUN.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(source) => {
                    return Err(VcpuError::Kvm {
                        op: "KVM_RUN",
                        source,
                    })
                }
            }
            if self.stop.is_requested() {
                return Ok(());
            }
        }
        Ok(())
    }
}

fn internal_suberror(fd: &mut VcpuFd) -> u32 {
    let run = fd.get_kvm_run();
    // SAFETY: called right after KVM_EXIT_INTERNAL_ERROR, for which the kernel fills the
    // `internal` member of the exit union.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_name_the_suberror() {
        let err = VcpuError::Internal { suberror: 1 };
        assert_eq!(
            err.to_string(),
            "guest internal error (kvm suberror 1: instruction emulation failed)"
        );
        assert!(VcpuError::Internal { suberror: 99 }
            .to_string()
            .ends_with("99: unknown)"));
    }
}
