//! Process hardening done first thing, before any thread or file exists: katalite parses
//! what guests and registries send, often as root, so it keeps nothing it did not open
//! itself, gains no privileges through exec, and never dumps guest memory to a core file.

use anyhow::{Context, Result};

/// Closes inherited descriptors from `first_closed` up (3: everything above stderr), sets
/// `PR_SET_NO_NEW_PRIVS` and makes RLIMIT_CORE 0.
pub fn at_start(first_closed: u32) -> Result<()> {
    // SAFETY: close_range on descriptors this process has not opened: at the start of main
    // nothing but stdin, stdout and stderr (and the listener a caller keeps) belongs to
    // any object of ours.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32) };
    if closed != 0 {
        // Kernels before 5.9 lack close_range: close what /proc lists instead.
        close_listed_fds(first_closed);
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers.
    let set = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1u64, 0u64, 0u64, 0u64) };
    if set != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set no_new_privs");
    }
    let none = rustix::process::Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(rustix::process::Resource::Core, none)
        .context("cannot disable core dumps")?;
    Ok(())
}

fn close_listed_fds(first_closed: u32) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| u32::try_from(fd).is_ok_and(|fd| fd >= first_closed))
        .collect();
    for fd in fds {
        // SAFETY: as above; a descriptor of the directory listing itself is closed after
        // the listing is done, and closing a stale number fails harmlessly.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_child_keeps_only_stdio_gains_no_privileges_and_dumps_no_core() {
        // Checked in a child process: the test harness's own descriptors must survive.
        let script = "ls /proc/self/fd | wc -l; grep NoNewPrivs /proc/self/status; ulimit -c";
        let exe = std::env::current_exe().expect("exe");
        if std::env::var_os("KATALITE_HARDENING_CHILD").is_some() {
            super::at_start(3).expect("hardening");
            let out = std::process::Command::new("sh")
                .args(["-c", script])
                .output()
                .expect("sh");
            print!("{}", String::from_utf8_lossy(&out.stdout));
            return;
        }
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "hardening::tests::a_child_keeps_only_stdio_gains_no_privileges_and_dumps_no_core",
                "--nocapture",
            ])
            .env("KATALITE_HARDENING_CHILD", "1")
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        assert!(text.lines().any(|l| l.trim() == "0"), "core limit: {text}");
        // sh's own listing: 0, 1, 2 and the directory it reads.
        assert!(text.lines().any(|l| l.trim() == "4"), "fds: {text}");
    }
}
