//! Wakes L1 when QEMU's TCG loses its timer interrupt. Seen with Debian's QEMU 7.2: L1
//! halts its only CPU waiting for its next LAPIC timer interrupt, which never comes; QEMU
//! then uses no CPU at all and the run stalls until some other interrupt arrives (minutes
//! later, or never), and the tests inside see time jump (L1's soft-lockup watchdog reports
//! hundreds of seconds "stuck" in its idle task). A healthy L1 always has a timer due within
//! seconds (that same watchdog's), so QEMU burning no CPU time for [`STALL`] means a lost
//! interrupt. A key press on L1's PS/2 keyboard (an i8042 interrupt) wakes the CPU but not
//! always its timer: once the programmed expiry has passed unseen, neither the idle loop nor
//! a woken task reprograms it (a CI run saw 35 key presses change nothing for 262 s, and a
//! bench run 40 key presses and newlines). So the watch also types a newline on L1's serial
//! console, QEMU's stdin, where a loop of L1's init (`lab/init.sh`) answers each line by
//! setting the clock, which makes the kernel reprogram every CPU's timer. Each wake-up is
//! reported on stderr.

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ChildStdin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How long QEMU may use no CPU time before L1 is woken.
const STALL: Duration = Duration::from_secs(8);
/// How often QEMU's CPU time is read.
const POLL: Duration = Duration::from_secs(1);

/// Watches QEMU `pid` until dropped.
pub struct StallWatch {
    done: Arc<AtomicBool>,
}

impl StallWatch {
    /// Starts watching QEMU `pid`, whose human monitor listens at `monitor` and whose
    /// `serial` is L1's console input.
    pub fn start(pid: u32, monitor: PathBuf, serial: ChildStdin) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        thread::spawn(move || watch(pid, &monitor, serial, &flag));
        Self { done }
    }
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

fn watch(pid: u32, monitor: &std::path::Path, mut serial: ChildStdin, done: &AtomicBool) {
    let mut last = cpu_ticks(pid);
    let mut since = Instant::now();
    while !done.load(Ordering::Relaxed) {
        thread::sleep(POLL);
        let Some(now) = cpu_ticks(pid) else { return };
        if Some(now) != last {
            last = Some(now);
            since = Instant::now();
        } else if since.elapsed() >= STALL {
            let typed = serial.write_all(b"\n").and_then(|()| serial.flush());
            let pressed = UnixStream::connect(monitor)
                .and_then(|mut socket| writeln!(socket, "sendkey shift"));
            eprintln!(
                "lab: QEMU used no CPU for {} s (L1's timer interrupt was lost); {}",
                STALL.as_secs(),
                match typed.and(pressed) {
                    Ok(()) => "woke L1 with a newline on its console and a key press".to_string(),
                    Err(err) => format!("cannot wake L1: {err}"),
                }
            );
            since = Instant::now();
        }
    }
}

/// utime + stime of `pid` in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ticks(&stat)
}

fn parse_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let stat = "23082 (qemu system x86) S 1 2 3 4 5 6 7 8 9 10 2900 171 0 0 20 0 3";
        assert_eq!(parse_ticks(stat), Some(3071));
        assert_eq!(parse_ticks("garbage"), None);
    }

    #[test]
    fn our_own_cpu_time_is_readable() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
