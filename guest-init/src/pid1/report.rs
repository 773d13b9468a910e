//! The end of the guest: sync, tell the VMM how the run ended through its status port,
//! and reboot as a fallback (a PID 1 that returned would panic the kernel instead).

use guest_init::{GuestStatus, STATUS_PORT};
use nix::sys::reboot::{reboot, RebootMode};

use super::console::log;

/// Syncs, reports `status` to the VMM and ends the VM.
pub fn finish(status: GuestStatus) -> ! {
    nix::unistd::sync();
    report(status);
    // The VMM stops the VM on the status write; the reset is what it sees otherwise
    // (`reboot=k` on the kernel command line goes through its i8042).
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        // SAFETY: pause has no preconditions; it only waits for a signal.
        unsafe { libc::pause() };
    }
}

/// Writes the status word to the VMM's status port (one 32-bit `out`).
fn report(status: GuestStatus) {
    let word = status.to_word();
    // SAFETY: ioperm only changes this process's I/O permission bitmap; PID 1 runs as root.
    if unsafe { libc::ioperm(libc::c_ulong::from(STATUS_PORT), 4, 1) } != 0 {
        log(&format!("ioperm: {}", std::io::Error::last_os_error()));
        return;
    }
    // SAFETY: the port was granted above; the VMM's status device owns it and the write has
    // no effect on this process's memory.
    unsafe {
        std::arch::asm!("out dx, eax", in("dx") STATUS_PORT, in("eax") word, options(nomem, nostack));
    }
}
