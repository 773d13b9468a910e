//! The one place a running VM records why it must end. Devices (status port, reset line)
//! and vCPU threads request a stop; the first reason wins and later ones are ignored; the
//! thread that started the VM sleeps on it until then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

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
}
