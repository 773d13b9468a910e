//! `Stats`: what the container's VM costs the host, as the `io.containerd.cgroups.v2.Metrics`
//! that `ctr task metrics` and CRI decode: CPU time (user, system, total) and resident
//! memory of the VM's process (guest RAM it touched plus the VMM), read from /proc.
//! Field numbers: containerd/cgroups `cgroup2/stats/metrics.proto`.

use crate::messages::any;
use crate::proto::Encoder;

const TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// The encoded `StatsResponse` for the VM process `pid` (zeros once it is gone).
pub fn metrics(pid: u32) -> Vec<u8> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let (user, system) = cpu_usec(&stat);
    let mut cpu = Encoder::new();
    cpu.uint(1, user + system).uint(2, user).uint(3, system);
    let mut memory = Encoder::new();
    memory.uint(32, rss_bytes(&status));
    let mut metrics = Encoder::new();
    metrics
        .message(2, &cpu.finish())
        .message(4, &memory.finish());
    let mut response = Encoder::new();
    response.message(1, &any(TYPE_URL, &metrics.finish()));
    response.finish()
}

/// utime and stime (fields 14 and 15 of /proc/PID/stat, after the parenthesised name) in
/// microseconds.
fn cpu_usec(stat: &str) -> (u64, u64) {
    // SAFETY: sysconf has no memory effects.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let mut fields = after_name.split_whitespace().skip(11);
    let mut next = || {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (user, system) = (next(), next());
    (user * 1_000_000 / ticks, system * 1_000_000 / ticks)
}

fn rss_bytes(status: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_past_the_process_name() {
        let stat = "42 (katalite (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        // SAFETY: sysconf has no memory effects.
        let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("ticks");
        assert_eq!(
            cpu_usec(stat),
            (250 * 1_000_000 / ticks, 50 * 1_000_000 / ticks)
        );
        assert_eq!(rss_bytes("Name:\tk\nVmRSS:\t   30720 kB\n"), 30720 * 1024);
        assert!(!metrics(std::process::id()).is_empty());
    }
}
