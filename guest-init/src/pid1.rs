//! The PID-1 steps. Every failure of init itself is reported as `InitFailed` (the host
//! turns it into exit code 125); workload failures map to Docker's codes (126, 127, 128+n).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use guest_init::{GuestStatus, RunConfig, CONFIG_PATH, STATUS_PORT};

/// Docker's default PATH when the config sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the workload's output goes: the virtio console, else the kernel console.
const OUTPUT_DEVICES: [&str; 2] = ["/dev/hvc0", "/dev/console"];

pub fn main() {
    let status = match run() {
        Ok(status) => status,
        Err(err) => {
            log(&format!("katalite-init: {err}"));
            GuestStatus::InitFailed
        }
    };
    finish(status)
}

fn run() -> Result<GuestStatus, String> {
    mount_kernel_filesystems()?;
    let config = read_config()?;
    if !config.hostname.is_empty() {
        set_hostname(&config.hostname)?;
    }
    let output = open_output()?;
    let pid = match spawn_workload(&config, &output) {
        Ok(pid) => pid,
        Err(status) => return Ok(status),
    };
    let status = reap_until(pid);
    stop_remaining_processes();
    Ok(status)
}

fn mount_kernel_filesystems() -> Result<(), String> {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        std::fs::create_dir_all(target).map_err(|e| format!("create {target}: {e}"))?;
        mount(source, target, fstype)?;
    }
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    let c = |s: &str| CString::new(s).map_err(|_| format!("bad mount argument {s:?}"));
    let (source_c, target_c, fstype_c) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // An already-mounted devtmpfs (CONFIG_DEVTMPFS_MOUNT) is fine.
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(format!("mount {fstype} on {target}: {err}"));
        }
    }
    Ok(())
}

fn read_config() -> Result<RunConfig, String> {
    let text = std::fs::read(CONFIG_PATH).map_err(|e| format!("read {CONFIG_PATH}: {e}"))?;
    let config: RunConfig =
        serde_json::from_slice(&text).map_err(|e| format!("parse {CONFIG_PATH}: {e}"))?;
    if config.args.is_empty() {
        return Err("the run config has no command".into());
    }
    Ok(config)
}

fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(format!("set hostname: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn open_output() -> Result<File, String> {
    OUTPUT_DEVICES
        .iter()
        .find_map(|path| OpenOptions::new().write(true).open(path).ok())
        .ok_or_else(|| "no output device (/dev/hvc0, /dev/console)".to_string())
}

/// Starts the workload as a child in its own session. Exec failures come back as the
/// status Docker gives them: 127 not found, 126 not executable.
fn spawn_workload(config: &RunConfig, output: &File) -> Result<libc::pid_t, GuestStatus> {
    let mut command = Command::new(&config.args[0]);
    command.args(&config.args[1..]).env_clear();
    if !config.env.iter().any(|e| e.starts_with("PATH=")) {
        command.env("PATH", DEFAULT_PATH);
    }
    for entry in &config.env {
        // Entries without '=' are dropped, as Docker drops them for unset host variables.
        if let Some((name, value)) = entry.split_once('=') {
            command.env(name, value);
        }
    }
    let workdir = if config.working_dir.is_empty() {
        "/"
    } else {
        &config.working_dir
    };
    command.current_dir(workdir);
    let stdio = |f: &File| f.try_clone().map(Stdio::from);
    let (Ok(out), Ok(err)) = (stdio(output), stdio(output)) else {
        log("katalite-init: cannot duplicate the output device");
        return Err(GuestStatus::InitFailed);
    };
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    match command.spawn() {
        Ok(child) => Ok(child.id() as libc::pid_t),
        Err(err) => {
            // Docker: 127 when the command does not exist, 126 when it cannot be run
            // (permission, wrong format, ...).
            let code = if err.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let mut out = output;
            let _ = writeln!(out, "katalite: {}: {err}", config.args[0]);
            Err(GuestStatus::Exited(code))
        }
    }
}

/// Reaps every child (orphans are re-parented to us) until `workload` exits.
fn reap_until(workload: libc::pid_t) -> GuestStatus {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer for the duration of the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == workload {
            return exit_status(status);
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            log("katalite-init: lost track of the workload");
            return GuestStatus::InitFailed;
        }
    }
}

/// Docker's convention: the exit code, or 128+n for death by signal n.
fn exit_status(status: libc::c_int) -> GuestStatus {
    if libc::WIFEXITED(status) {
        GuestStatus::Exited((libc::WEXITSTATUS(status) & 0xff) as u8)
    } else if libc::WIFSIGNALED(status) {
        GuestStatus::Exited((128 + libc::WTERMSIG(status)).clamp(0, 255) as u8)
    } else {
        GuestStatus::InitFailed
    }
}

fn stop_remaining_processes() {
    // SAFETY: kill(-1) signals every process but us; no memory is involved.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: a null status pointer is allowed; reap until no children remain.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } > 0 {}
}

/// Syncs, reports `status` through the VMM's status port, and powers off.
fn finish(status: GuestStatus) -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    report(status);
    // The VMM stops the VM on the status write; a reboot is the fallback (the VMM sees the
    // reset), because a PID 1 that returns would panic the kernel instead.
    // SAFETY: reboot with a valid command; only returns on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn report(status: GuestStatus) {
    let word = status.to_word();
    // SAFETY: ioperm only changes this process's I/O permission bitmap; PID 1 runs as root.
    if unsafe { libc::ioperm(libc::c_ulong::from(STATUS_PORT), 4, 1) } != 0 {
        log(&format!(
            "katalite-init: ioperm: {}",
            io::Error::last_os_error()
        ));
        return;
    }
    // SAFETY: the port was granted above; the VMM's status device owns it and the write has
    // no effect on this process's memory.
    unsafe {
        std::arch::asm!("out dx, eax", in("dx") STATUS_PORT, in("eax") word, options(nomem, nostack));
    }
}

fn log(message: &str) {
    if let Ok(mut console) = OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(console, "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_docker() {
        assert_eq!(exit_status(42 << 8), GuestStatus::Exited(42));
        assert_eq!(exit_status(0), GuestStatus::Exited(0));
        // Killed by SIGKILL (9) and SIGTERM (15).
        assert_eq!(exit_status(9), GuestStatus::Exited(137));
        assert_eq!(exit_status(15), GuestStatus::Exited(143));
    }
}
