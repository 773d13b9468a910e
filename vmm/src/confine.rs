//! Each VM thread announces its role once its setup is done and before it handles
//! anything the guest controls, so the embedding program can confine it (a seccomp filter
//! per role). The VMM itself holds no policy: it only says which thread does what.

use std::sync::{Arc, OnceLock};

/// What a VM thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// Runs KVM_RUN and dispatches exits to the buses (`katalite-vcpuN`).
    Vcpu,
    /// Runs in-memory device queues: the console's and the rng's (getrandom), and the
    /// console input pump (`katalite-cons`, `katalite-rng`, `katalite-io`).
    Device,
    /// Moves guest output to the host: a terminal, a pipe, a log file, exec clients
    /// (`katalite-out`, `katalite-klog`).
    Output,
    /// Serves one disk: positioned reads and writes on its image (`katalite-blkN`).
    Block,
    /// Serves one shared directory over virtio-fs (`katalite-fsN`).
    Fs,
    /// Moves frames between the NIC and its backend: TAP or the user-mode network's
    /// host sockets (`katalite-net`).
    Net,
    /// The thread that started the VM, once every other VM thread runs: it only waits for
    /// the end and tears down.
    Main,
}

/// Called by every VM thread with its role.
pub type ThreadHook = Arc<dyn Fn(ThreadRole) + Send + Sync>;

static HOOK: OnceLock<ThreadHook> = OnceLock::new();

/// Sets the process's hook (once; later calls are ignored and return false).
pub fn set_thread_hook(hook: ThreadHook) -> bool {
    HOOK.set(hook).is_ok()
}

/// What a VM thread calls with its role once it is set up.
pub(crate) fn enter(role: ThreadRole) {
    if let Some(hook) = HOOK.get() {
        hook(role);
    }
}
