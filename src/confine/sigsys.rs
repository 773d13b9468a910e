//! The SIGSYS side of seccomp: the handler that reports a forbidden syscall and ends the
//! process, the thread's role it names, and the signal mask of confined threads.

use std::cell::Cell;
use std::io;
use std::os::raw::{c_int, c_void};

use super::syscall_names::NAMES;
use super::EXIT_FORBIDDEN_SYSCALL;

thread_local! {
    /// The calling thread's role, for the SIGSYS message.
    static ROLE: Cell<&'static str> = const { Cell::new("unconfined") };
}

/// Records the calling thread's role for the SIGSYS message.
pub(super) fn set_thread_role(role: &'static str) {
    ROLE.with(|slot| slot.set(role));
}

/// Installs the SIGSYS handler for the process.
pub(super) fn install() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler is an
    // `extern "C"` function with the SA_SIGINFO signature, async-signal-safe (it only
    // reads its arguments and a const-initialized TLS cell, formats into a stack buffer,
    // and calls write(2) and _exit(2)).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handle_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Blocks every signal a user or a terminal sends to the process in the calling thread,
/// so those signals are handled by the thread that started the VM (whose filter allows
/// what the handlers do). Faults, SIGSYS, SIGABRT and the vCPU kick stay deliverable.
pub(super) fn block_process_signals() {
    // SAFETY: sigset_t is plain data initialized by sigfillset before use;
    // pthread_sigmask only changes the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for keep in [
            libc::SIGSYS,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGABRT,
            libc::SIGRTMIN(),
        ] {
            libc::sigdelset(&mut set, keep);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Where the kernel puts the syscall number in a SIGSYS siginfo (`si_syscall`, after
/// si_signo, si_errno, si_code, padding and `si_call_addr`), in 32-bit words.
const SI_SYSCALL_WORD: usize = 6;

extern "C" fn handle_sigsys(_: c_int, info: *mut libc::siginfo_t, _: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose `_sigsys` member holds
    // the syscall number at this offset on x86_64.
    let nr = unsafe { *info.cast::<i32>().add(SI_SYSCALL_WORD) };
    let role = ROLE.try_with(Cell::get).unwrap_or("unknown");
    let mut message = Message::default();
    message.push(b"katalite: seccomp: the ");
    message.push(role.as_bytes());
    message.push(b" thread made a forbidden syscall: ");
    let name = usize::try_from(nr)
        .ok()
        .and_then(|nr| NAMES.get(nr))
        .filter(|name| !name.is_empty());
    match name {
        Some(name) => message.push(name.as_bytes()),
        None => message.push(b"unknown"),
    }
    message.push(b" (");
    message.push_number(nr);
    message.push(b"); stopping\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives on this stack.
    unsafe {
        libc::write(2, message.bytes.as_ptr().cast(), message.len);
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

/// A fixed buffer for the message (no allocation in a signal handler).
struct Message {
    bytes: [u8; 192],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Self {
            bytes: [0; 192],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, part: &[u8]) {
        let n = part.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&part[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i32) {
        let mut digits = [0u8; 12];
        let mut at = digits.len();
        let mut rest = i64::from(value).unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}
