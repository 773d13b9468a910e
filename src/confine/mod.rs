//! Seccomp per thread role. Every thread of a running katalite installs the allow-list of
//! its role once its setup is done and before it handles anything a guest, a registry or a
//! client controls; a syscall outside the list raises SIGSYS, whose handler names the
//! thread and the syscall on stderr (the container's `katalite.log` when detached) and ends
//! the process with [`EXIT_FORBIDDEN_SYSCALL`]. `--security-opt seccomp=unconfined`
//! installs nothing; `KATALITE_SECCOMP_LOG=1` lets forbidden syscalls through and has the
//! kernel log them (audit type 1326), to find what a new code path needs.
//!
//! Each thread also drops the capabilities its role does not need (see `caps`).
//!
//! Threads a confined thread spawns inherit its filter (an exec session inherits the
//! control thread's), and process-directed signals are blocked everywhere but in the
//! thread that started the VM, so signal handlers only ever run under its filter.

mod caps;
mod filters;
mod precompiled;
mod sigsys;
mod syscall_names;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use vmm::confine::ThreadRole;

#[cfg(test)]
use filters::allowed_syscalls;

/// The exit status of a process that made a forbidden syscall (128 + SIGSYS, as a shell
/// reports a process killed by it).
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 159;

/// What a thread of katalite does: the VM's threads, and the front end's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A thread of the VM.
    Vm(ThreadRole),
    /// Serves the control socket (`stop`, `kill`, `exec`) and the exec sessions.
    Control,
    /// Turns signals into messages for the guest.
    Signals,
    /// Reads the host's stdin for the guest.
    Stdin,
    /// Writes the container's json-file log.
    Log,
}

impl Role {
    /// How the role is named in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vm(ThreadRole::Vcpu) => "vcpu",
            Role::Vm(ThreadRole::Device) => "device",
            Role::Vm(ThreadRole::Output) => "output",
            Role::Vm(ThreadRole::Block) => "block",
            Role::Vm(ThreadRole::Fs) => "fs",
            Role::Vm(ThreadRole::Net) => "net",
            Role::Vm(ThreadRole::Main) => "main",
            Role::Control => "control",
            Role::Signals => "signals",
            Role::Stdin => "stdin",
            Role::Log => "log",
        }
    }

    /// Every role.
    pub const ALL: [Role; 11] = [
        Role::Vm(ThreadRole::Vcpu),
        Role::Vm(ThreadRole::Device),
        Role::Vm(ThreadRole::Output),
        Role::Vm(ThreadRole::Block),
        Role::Vm(ThreadRole::Fs),
        Role::Vm(ThreadRole::Net),
        Role::Vm(ThreadRole::Main),
        Role::Control,
        Role::Signals,
        Role::Stdin,
        Role::Log,
    ];
}

/// Whether threads are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forbidden syscalls end the process.
    Enforce,
    /// Forbidden syscalls are allowed and logged by the kernel (debugging).
    Log,
    /// No filters (`--security-opt seccomp=unconfined`).
    Unconfined,
}

struct Policy {
    programs: HashMap<Role, BpfProgram>,
    clone3_refused: BpfProgram,
}

static POLICY: OnceLock<Option<Policy>> = OnceLock::new();

/// Compiles every role's filter and installs the SIGSYS handler, before any thread of the
/// run exists; then VM threads confine themselves through vmm's thread hook.
pub fn prepare(mode: Mode) -> Result<()> {
    let mode = match (mode, std::env::var_os("KATALITE_SECCOMP_LOG")) {
        (Mode::Enforce, Some(value)) if value == "1" => Mode::Log,
        (mode, _) => mode,
    };
    let policy = match mode {
        Mode::Unconfined => None,
        Mode::Enforce | Mode::Log => {
            let policy = if mode == Mode::Log {
                compiled(SeccompAction::Log)?
            } else {
                embedded()?
            };
            sigsys::install().context("cannot install the SIGSYS handler")?;
            Some(policy)
        }
    };
    let _ = POLICY.set(policy);
    vmm::confine::set_thread_hook(Arc::new(|role| enter(Role::Vm(role))));
    Ok(())
}

/// Every role's program and the clone3 filter, compiled now with `mismatch` for a syscall
/// outside the list.
fn compiled(mismatch: SeccompAction) -> Result<Policy> {
    let mut programs = HashMap::new();
    for role in Role::ALL {
        programs.insert(role, compile(role, mismatch.clone())?);
    }
    Ok(Policy {
        programs,
        clone3_refused: compile_clone3_refused()?,
    })
}

/// The enforcing programs as compiled ahead of time (see `precompiled`).
fn embedded() -> Result<Policy> {
    let mut programs = precompiled::programs(Role::ALL.len() + 1)?;
    let clone3_refused = programs.pop().unwrap_or_default();
    Ok(Policy {
        programs: Role::ALL.into_iter().zip(programs).collect(),
        clone3_refused,
    })
}

/// The BPF program of `role`.
pub fn compile(role: Role, mismatch: SeccompAction) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        filters::rules(role).with_context(|| format!("bad rules for {}", role.name()))?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .with_context(|| format!("cannot build the {} filter", role.name()))?;
    filter
        .try_into()
        .with_context(|| format!("cannot compile the {} filter", role.name()))
}

/// The filter that answers clone3 with ENOSYS (see `filters::SPAWN`).
fn compile_clone3_refused() -> Result<BpfProgram> {
    SeccompFilter::new(
        filters::clone3_refused(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .context("cannot build the clone3 filter")
}

/// Confines the calling thread to `role`'s syscalls (nothing when unconfined or when
/// [`prepare`] was not called). A filter that cannot be installed ends the process: a
/// thread must never run unconfined by accident.
pub fn enter(role: Role) {
    let Some(Some(policy)) = POLICY.get() else {
        return;
    };
    if role != Role::Vm(ThreadRole::Main) {
        sigsys::block_process_signals();
    }
    sigsys::set_thread_role(role.name());
    if let Err(err) = caps::drop_for(role) {
        eprintln!(
            "katalite: cannot drop the {} thread's capabilities: {err}",
            role.name()
        );
        std::process::exit(crate::EXIT_KATALITE_FAILED.into());
    }
    let Some(program) = policy.programs.get(&role) else {
        return;
    };
    let mut applied = Ok(());
    if filters::spawns(role) {
        applied = seccompiler::apply_filter(&policy.clone3_refused);
    }
    if let Err(err) = applied.and_then(|()| seccompiler::apply_filter(program)) {
        eprintln!("katalite: cannot confine the {} thread: {err}", role.name());
        std::process::exit(crate::EXIT_KATALITE_FAILED.into());
    }
}

#[cfg(test)]
mod tests;
