//! Signals and children of PID 1. Init blocks the signals it handles and reads them from a
//! signalfd in its poll loop: SIGCHLD to reap every child (orphans are re-parented to init),
//! the stop and user signals to pass on to the workload. Blocked signals are queued even for
//! PID 1 (kernel/signal.c, `sig_ignored`); std's spawn clears the mask in the child.

use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Signals that, sent to init, are meant for the workload (as `docker kill` and the host's
/// `katalite run` forward them).
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Setting up the signalfd failed.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Blocking the handled signals failed.
    #[error("cannot block signals")]
    Block(#[source] Errno),
    /// Creating or reading the signalfd failed.
    #[error("cannot read signals")]
    Fd(#[source] Errno),
}

/// The signalfd, plus what to do with what it reports.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks SIGCHLD and the forwarded signals and opens a non-blocking signalfd for them.
    /// Must run before any child exists, so no SIGCHLD is missed.
    pub fn install() -> Result<Self, SignalError> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        for signal in FORWARDED {
            set.add(signal);
        }
        set.thread_swap_mask(SigmaskHow::SIG_BLOCK)
            .map_err(SignalError::Block)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(SignalError::Fd)?;
        Ok(Self { fd })
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads every pending signal; returns those to forward to the workload (SIGCHLD is
    /// only a wake-up: the caller reaps).
    pub fn drain(&self) -> Result<Vec<Signal>, SignalError> {
        let mut forward = Vec::new();
        while let Some(info) = self.fd.read_signal().map_err(SignalError::Fd)? {
            let number = i32::try_from(info.ssi_signo).unwrap_or(0);
            if let Ok(signal) = Signal::try_from(number) {
                if FORWARDED.contains(&signal) {
                    forward.push(signal);
                }
            }
        }
        Ok(forward)
    }
}

/// Reaps every child that has ended, without blocking; returns each one's pid and Docker
/// exit status (the workload's, exec sessions', and orphans' that nobody asks about).
pub fn reap() -> Vec<(Pid, u8)> {
    let mut ended = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return ended,
            Ok(status) => {
                if let (Some(pid), Some(code)) = (status.pid(), exit_code(status)) {
                    ended.push((pid, code));
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return ended,
        }
    }
}

/// Sends SIGKILL to every process but init (kill(2) with pid -1) and waits for all of them.
pub fn kill_all_and_reap() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    loop {
        match waitpid(None, None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Sends SIGKILL to every process but init, without waiting.
pub fn kill_all() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
}

/// Docker's status for an ended process: its exit code, or 128+n when signal n killed it.
pub fn exit_code(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => u8::try_from(code & 0xff).ok(),
        WaitStatus::Signaled(_, signal, _) => u8::try_from(128 + signal as i32).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker() {
        let pid = Pid::from_raw(42);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 0)), Some(0));
        assert_eq!(exit_code(WaitStatus::Exited(pid, 42)), Some(42));
        assert_eq!(exit_code(WaitStatus::Exited(pid, 255)), Some(255));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
        assert_eq!(exit_code(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
    }

    #[test]
    fn reaping_reports_every_ended_child_with_its_status() {
        let _children = crate::pid1::CHILDREN.lock();
        let spawn = |code: i32| {
            std::process::Command::new("sh")
                .args(["-c", &format!("exit {code}")])
                .spawn()
                .map(|child| Pid::from_raw(i32::try_from(child.id()).expect("pid")))
                .expect("spawn sh")
        };
        let other = spawn(3);
        let workload = spawn(7);
        let mut ended = Vec::new();
        while ended.len() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            ended.extend(reap());
        }
        ended.sort();
        let mut expected = vec![(other, 3), (workload, 7)];
        expected.sort();
        assert_eq!(ended, expected);
        assert!(reap().is_empty());
        assert_eq!(
            waitpid(other, Some(WaitPidFlag::WNOHANG)),
            Err(Errno::ECHILD)
        );
    }
}
