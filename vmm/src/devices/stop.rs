//! The one place a running VM records why it must end. Devices (status port, reset line),
//! vCPU threads and the host (through a [`VmStopper`]) request a stop; the first reason
//! wins and later ones are ignored; the thread that started the VM sleeps on it until then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Why the VM ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote this word to the status port.
    Status(u32),
    /// The guest asked for a reset (i8042) or triple-faulted.
    Reset {
        /// KVM_EXIT_SHUTDOWN rather than a reset request.
        triple_fault: bool,
    },
    /// vCPU `index` failed; its thread returns the error.
    VcpuFailed(u8),
    /// The host asked for the VM to end ([`VmStopper::stop`]).
    Stopped,
}

/// Shared stop request: set once, waited on by the VM's owner.
#[derive(Debug, Default)]
pub struct VmStop {
    reason: Mutex<Option<StopReason>>,
    changed: Condvar,
    requested: AtomicBool,
}

impl VmStop {
    /// No stop requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Option<StopReason>> {
        // The guarded value is a plain Option; a panic elsewhere cannot leave it torn.
        self.reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `reason` unless an earlier one exists, and wakes the waiter.
    pub fn request(&self, reason: StopReason) {
        let mut current = self.lock();
        if current.is_none() {
            *current = Some(reason);
            self.requested.store(true, Ordering::Release);
            self.changed.notify_all();
        }
    }

    /// Whether a stop was requested (cheap; vCPU threads poll it after device exits).
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Blocks until a stop is requested and returns the first reason.
    pub fn wait(&self) -> StopReason {
        let mut current = self.lock();
        loop {
            if let Some(reason) = *current {
                return reason;
            }
            current = self
                .changed
                .wait(current)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// Ends a VM from outside it, from any thread: e.g. one that waits for signals and gives
/// up on the guest after a grace period. Clones share one VM; a stopper serves one VM.
///
/// Not async-signal-safe (it takes a lock): call it from a thread, not a signal handler.
#[derive(Debug, Clone, Default)]
pub struct VmStopper {
    stop: Arc<VmStop>,
}

impl VmStopper {
    /// A stopper for a VM that has yet to be started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the VM at once: the guest is not told, its vCPUs are kicked out of KVM_RUN,
    /// and `run` returns `VmExit::Stopped` unless the guest had already ended. Called
    /// before the VM starts, it ends the VM as soon as it starts; afterwards, it does
    /// nothing.
    pub fn stop(&self) {
        self.stop.request(StopReason::Stopped);
    }

    /// The stop request the VM waits on.
    pub(crate) fn shared(&self) -> Arc<VmStop> {
        self.stop.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_first_reason_wins() {
        let stop = VmStop::new();
        assert!(!stop.is_requested());
        stop.request(StopReason::Status(0x12a));
        stop.request(StopReason::Reset { triple_fault: true });
        assert!(stop.is_requested());
        assert_eq!(stop.wait(), StopReason::Status(0x12a));
    }

    #[test]
    fn wait_wakes_when_another_thread_requests() {
        let stop = Arc::new(VmStop::new());
        let requester = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                stop.request(StopReason::VcpuFailed(1));
            })
        };
        assert_eq!(stop.wait(), StopReason::VcpuFailed(1));
        requester.join().expect("join");
    }

    #[test]
    fn a_stopper_requests_stopped_unless_the_guest_ended_first() {
        let stopper = VmStopper::new();
        let vm_side = stopper.shared();
        stopper.clone().stop();
        vm_side.request(StopReason::Status(0));
        assert_eq!(vm_side.wait(), StopReason::Stopped);

        let stopper = VmStopper::new();
        let vm_side = stopper.shared();
        vm_side.request(StopReason::Status(3));
        stopper.stop();
        assert_eq!(vm_side.wait(), StopReason::Status(3));
    }
}
