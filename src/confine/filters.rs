//! The allow-list of each role (x86_64, the static musl build): what the role's own code,
//! Rust's std and musl underneath it call. Arguments are checked where the syscall is a
//! multiplexer that matters: ioctl request numbers (KVM_RUN only for a vCPU), clone
//! (threads only, never a new process), socket domains, prctl operations and the signals
//! tkill may send.

use std::collections::{BTreeMap, BTreeSet};

use libc::*;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm::confine::ThreadRole;

use super::Role;

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// Terminal ioctls: raw mode on and off (rustix speaks termios2: TCGETS2, TCSETS2,
/// TCSETSW2, TCSETSF2), the window size. (The casts are needed on musl, whose ioctl request
/// type is `c_int`.)
#[allow(clippy::unnecessary_cast)]
const TTY_IOCTLS: [u64; 9] = [
    TCGETS as u64,
    TCSETS as u64,
    TCSETSW as u64,
    TCSETSF as u64,
    0x802c_542a,
    0x402c_542b,
    0x402c_542c,
    0x402c_542d,
    TIOCGWINSZ as u64,
];
/// What std and mio do to descriptors they own.
#[allow(clippy::unnecessary_cast)]
const FD_IOCTLS: [u64; 3] = [FIONBIO as u64, FIOCLEX as u64, FIONREAD as u64];

/// Every thread: memory, futexes, signal returns, clocks, thread exit, and what a panic
/// (message, then abort) needs.
const BASE: &[c_long] = &[
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_close,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_brk,
    SYS_mprotect,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_rt_sigaction,
    SYS_sigaltstack,
    SYS_exit,
    SYS_exit_group,
    SYS_sched_yield,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettid,
    SYS_getpid,
    SYS_getrandom,
    SYS_restart_syscall,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_poll,
    SYS_ppoll,
];

/// Starting threads (the child runs under its parent's filter until it installs its own).
/// clone3 is allowed here because [`clone3_refused`] answers it with ENOSYS first (its
/// flags sit in memory, where a filter cannot check CLONE_THREAD); glibc then falls back to
/// clone, whose flags are checked. musl never calls it.
const SPAWN: &[c_long] = &[
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sched_getaffinity,
    SYS_clone3,
];

/// Opening, inspecting and changing files.
const FILES: &[c_long] = &[
    SYS_open,
    SYS_openat,
    SYS_fstat,
    SYS_stat,
    SYS_lstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_lseek,
    SYS_fcntl,
    SYS_dup,
    SYS_dup3,
    SYS_getdents64,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fstatfs,
    SYS_statfs,
    SYS_readlink,
    SYS_readlinkat,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
];

/// Changing the file tree (the fs share's guest requests, the supervisor's state).
const FILE_CHANGES: &[c_long] = &[
    SYS_openat2,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_rmdir,
    SYS_unlink,
    SYS_unlinkat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_link,
    SYS_linkat,
    SYS_symlink,
    SYS_symlinkat,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_utimensat,
    SYS_getxattr,
    SYS_lgetxattr,
    SYS_fgetxattr,
    SYS_setxattr,
    SYS_lsetxattr,
    SYS_fsetxattr,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_flistxattr,
    SYS_removexattr,
    SYS_lremovexattr,
    SYS_fremovexattr,
    SYS_flock,
    SYS_umask,
    SYS_getcwd,
    SYS_chdir,
    SYS_copy_file_range,
    SYS_sendfile,
];

/// Moving data on sockets that exist.
const SOCKET_IO: &[c_long] = &[
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_accept,
    SYS_accept4,
];

/// Identity queries.
const IDS: &[c_long] = &[SYS_getuid, SYS_geteuid, SYS_getgid, SYS_getegid, SYS_uname];

/// Collects unconditional syscalls and argument rules.
#[derive(Default)]
struct Builder {
    always: BTreeSet<c_long>,
    when: BTreeMap<c_long, Vec<SeccompRule>>,
}

impl Builder {
    fn allow(&mut self, syscalls: &[c_long]) -> &mut Self {
        self.always.extend(syscalls);
        self
    }

    /// Allows `syscall` when argument `arg` (its low 32 bits) is one of `values`.
    fn allow_arg(
        &mut self,
        syscall: c_long,
        arg: u8,
        values: &[u64],
    ) -> Result<&mut Self, seccompiler::BackendError> {
        for &value in values {
            let condition =
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
            self.when
                .entry(syscall)
                .or_default()
                .push(SeccompRule::new(vec![condition])?);
        }
        Ok(self)
    }

    /// Allows `syscall` when argument `arg` has all of `bits` set.
    fn allow_bits(
        &mut self,
        syscall: c_long,
        arg: u8,
        bits: u64,
    ) -> Result<&mut Self, seccompiler::BackendError> {
        let condition = SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(bits),
            bits,
        )?;
        self.when
            .entry(syscall)
            .or_default()
            .push(SeccompRule::new(vec![condition])?);
        Ok(self)
    }

    fn build(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = self.when;
        // An empty rule list matches unconditionally, and wins over conditions.
        for syscall in self.always {
            rules.insert(syscall, Vec::new());
        }
        rules
    }
}

/// Whether `role` starts threads.
pub(super) fn spawns(role: Role) -> bool {
    matches!(
        role,
        Role::Control | Role::Signals | Role::Vm(ThreadRole::Main)
    )
}

/// A filter stacked under the role's by threads that spawn: clone3 fails with ENOSYS.
pub(super) fn clone3_refused() -> BTreeMap<i64, Vec<SeccompRule>> {
    BTreeMap::from([(SYS_clone3, Vec::new())])
}

/// The seccompiler rules of `role`.
pub(super) fn rules(
    role: Role,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut b = Builder::default();
    b.allow(BASE);
    // A panic aborts: musl raises SIGABRT with tkill.
    b.allow_arg(SYS_tkill, 1, &[SIGABRT as u64])?;
    b.allow_arg(SYS_tgkill, 2, &[SIGABRT as u64])?;
    if spawns(role) {
        b.allow(SPAWN);
        b.allow_bits(SYS_clone, 0, CLONE_THREAD as u64)?;
        b.allow_arg(SYS_prctl, 0, &[PR_SET_NAME as u64])?;
    }
    match role {
        Role::Vm(ThreadRole::Vcpu) => {
            b.allow_arg(SYS_ioctl, 1, &[KVM_RUN])?;
        }
        Role::Vm(ThreadRole::Device) => {}
        Role::Vm(ThreadRole::Output) => {
            // Terminals, pipes, the JSON log (rotated by rename), exec clients' sockets;
            // a detached supervisor, once init is up, moves its stderr to katalite.log and
            // its stdout to /dev/null (dup2) and leaves its directory (chdir).
            b.allow(FILES)
                .allow(&[SYS_rename, SYS_renameat, SYS_renameat2]);
            b.allow(&[SYS_sendto, SYS_sendmsg, SYS_shutdown]);
            b.allow(&[SYS_dup2, SYS_dup3, SYS_chdir]);
        }
        Role::Vm(ThreadRole::Block) => {
            b.allow(&[
                SYS_pread64,
                SYS_pwrite64,
                SYS_preadv,
                SYS_pwritev,
                SYS_preadv2,
                SYS_pwritev2,
                SYS_fsync,
                SYS_fdatasync,
                SYS_fallocate,
                SYS_lseek,
                SYS_fstat,
                SYS_statx,
            ]);
        }
        Role::Vm(ThreadRole::Fs) => {
            b.allow(FILES).allow(FILE_CHANGES).allow(IDS);
            b.allow(&[SYS_setfsuid, SYS_setfsgid]);
            // The share's thread drops its supplementary groups (an empty list only).
            b.allow_arg(SYS_setgroups, 0, &[0])?;
        }
        Role::Vm(ThreadRole::Net) => {
            b.allow(SOCKET_IO)
                .allow(&[SYS_connect, SYS_bind, SYS_listen, SYS_fcntl]);
            b.allow_arg(SYS_socket, 0, &[AF_INET as u64, AF_INET6 as u64])?;
            b.allow_arg(SYS_ioctl, 1, &FD_IOCTLS)?;
        }
        Role::Vm(ThreadRole::Main) => {
            // Tears the VM down and records its end: state files, `--rm`, the control
            // socket's wake-up connection, the terminal, vCPU kicks, signal handlers.
            b.allow(FILES)
                .allow(FILE_CHANGES)
                .allow(SOCKET_IO)
                .allow(IDS);
            b.allow(&[SYS_connect, SYS_kill, SYS_prlimit64, SYS_sysinfo, SYS_dup2]);
            b.allow(&[SYS_tkill, SYS_tgkill]);
            b.allow_arg(SYS_socket, 0, &[AF_UNIX as u64])?;
            b.allow_arg(SYS_ioctl, 1, &TTY_IOCTLS)?;
            b.allow_arg(SYS_ioctl, 1, &FD_IOCTLS)?;
        }
        Role::Control => {
            // Requests and exec sessions on accepted connections; `kill` restores the
            // terminal.
            b.allow(SOCKET_IO).allow(&[SYS_fcntl]);
            b.allow_arg(SYS_ioctl, 1, &TTY_IOCTLS)?;
            b.allow_arg(SYS_ioctl, 1, &FD_IOCTLS)?;
        }
        Role::Signals => {
            b.allow(SOCKET_IO).allow(&[SYS_fcntl]);
            b.allow_arg(SYS_ioctl, 1, &TTY_IOCTLS)?;
            b.allow_arg(SYS_ioctl, 1, &FD_IOCTLS)?;
        }
        Role::Log => {
            // Appends to the log and rotates it (rename, then open a new one).
            b.allow(FILES)
                .allow(&[SYS_rename, SYS_renameat, SYS_renameat2]);
        }
        Role::Stdin => {
            b.allow(&[SYS_fcntl, SYS_fstat, SYS_recvfrom]);
            b.allow_arg(SYS_ioctl, 1, &TTY_IOCTLS)?;
            b.allow_arg(SYS_ioctl, 1, &FD_IOCTLS)?;
        }
    }
    Ok(b.build())
}

#[cfg(test)]
/// How many syscalls `role` may make (each counted once, with or without argument
/// conditions).
pub fn allowed_syscalls(role: Role) -> usize {
    rules(role).map(|rules| rules.len()).unwrap_or(0)
}
