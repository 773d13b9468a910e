//! Guest → host stdout throughput: the same `dd if=/dev/zero bs=64k` workload through
//! katalite's channel (init on its generic virtio-console port) beside QEMU microvm booting
//! the initramfs `katalite run --write-initramfs` wrote for it, with init's channel on a
//! `virtserialport` (the same kind of port) and on a `virtconsole` (init falls back to
//! `/dev/hvc0`, the channel katalite had before). The runner's `throughput` job counts
//! the VMM's stdout; for QEMU that is the channel itself, frames and all. The workload
//! is `dd` of 64 KiB blocks rather than busybox `head -c`: in the lab guest `head -c`
//! alone moves only 6–11 MiB/s into /dev/null (its small copy loop, measured by hand on
//! 2026-12-06), below the network figure it is compared with, so it measured `head`.

use std::path::Path;

use anyhow::{ensure, Result};
use serde::Serialize;

use super::net::Network;
use super::plan::{
    self, Job, Kind, LabInputs, QemuChannel, Settings, BOOT_MEMORY_MIB, PROBE_WORKLOAD,
};
use super::report::LabResults;
use super::results;
use super::stats::Stats;

/// Where the lab writes the initramfs QEMU boots (L1's /tmp is a tmpfs).
const INITRD: &str = "/tmp/katalite-bench-throughput.img";

/// The workload's block size: one 64 KiB write per block, a whole frame's payload (the
/// settings' byte counts are multiples of it).
const BLOCK: u64 = 64 * 1024;

/// Job ids, per contender.
const KATALITE: &str = "throughput";
/// katalite with `--log-driver none`: the console path alone, without the json-file log
/// (which, for zeros, writes six bytes per byte).
const KATALITE_NO_LOG: &str = "throughput-no-log";
const QEMU_PORT: &str = "throughput-qemu-virtserialport";
const QEMU_CONSOLE: &str = "throughput-qemu-virtconsole";

/// The throughput jobs: writing QEMU's initramfs, then rounds of one run per contender,
/// so a change in the host's load skews them alike.
pub fn jobs(inputs: &LabInputs, settings: &Settings) -> Vec<Job> {
    let count = format!("count={}", settings.throughput_bytes / BLOCK);
    let block = format!("bs={BLOCK}");
    let command = ["dd", "if=/dev/zero", block.as_str(), count.as_str()];
    let memory = format!("{BOOT_MEMORY_MIB}m");
    let write = plan::katalite_run(
        inputs.registry,
        &[
            "--boot-probe",
            "--memory",
            &memory,
            "--write-initramfs",
            INITRD,
        ],
        &command,
    );
    let mut jobs = vec![Job::new("throughput-initramfs", Kind::Timed, write, 1)];
    let katalite = plan::katalite_run(inputs.registry, &["--boot-probe"], &command);
    let no_log = plan::katalite_run(
        inputs.registry,
        &["--boot-probe", "--log-driver", "none"],
        &command,
    );
    let qemu = |console| {
        let channel = QemuChannel::Count { console };
        plan::qemu_microvm_with(inputs.vmlinux, Path::new(INITRD), "user,id=n", channel)
    };
    let contenders = [
        (KATALITE, katalite),
        (KATALITE_NO_LOG, no_log),
        (QEMU_PORT, qemu(false)),
        (QEMU_CONSOLE, qemu(true)),
    ];
    for _ in 0..settings.throughput_samples {
        for (id, argv) in &contenders {
            jobs.push(Job::new(*id, Kind::Throughput, argv.clone(), 1));
        }
    }
    jobs
}

/// The report's `throughput` section.
#[derive(Debug, Serialize)]
pub struct Throughput {
    /// Bytes written by the workload per run.
    pub bytes: u64,
    /// katalite, from the workload's start to the last byte on the host.
    pub mib_per_s: Option<Stats>,
    /// katalite with `--log-driver none`, measured alike.
    pub no_log_mib_s: Option<Stats>,
    /// QEMU microvm, init on a generic port (`virtserialport`), measured alike.
    pub qemu_virtserialport_mib_s: Option<Stats>,
    /// QEMU microvm, init on `/dev/hvc0` (`virtconsole`), measured alike.
    pub qemu_virtconsole_mib_s: Option<Stats>,
    /// How it was measured.
    pub method: String,
}

/// The throughput section from the lab's `throughput*` jobs; failures go to `lab.errors`.
pub fn throughput(lab: &mut LabResults, settings: &Settings) -> Option<Throughput> {
    let bytes = settings.throughput_bytes;
    let blocks = bytes / BLOCK;
    lab.check_setup("throughput-initramfs");
    let mut katalite = |id| {
        lab.each(id, |s| results::throughput_mib_s(s, bytes))
            .and_then(|rates| Stats::of(&rates))
    };
    let (with_log, no_log) = (katalite(KATALITE), katalite(KATALITE_NO_LOG));
    let mut qemu = |id| {
        lab.each(id, |s| framed_throughput_mib_s(s, bytes))
            .and_then(|rates| Stats::of(&rates))
    };
    let (port, console) = (qemu(QEMU_PORT), qemu(QEMU_CONSOLE));
    if with_log.is_none() && no_log.is_none() && port.is_none() && console.is_none() {
        return None;
    }
    Some(Throughput {
        bytes,
        mib_per_s: with_log,
        no_log_mib_s: no_log,
        qemu_virtserialport_mib_s: port,
        qemu_virtconsole_mib_s: console,
        method: format!(
            "`dd if=/dev/zero bs={BLOCK} count={blocks}` as the workload, {BOOT_MEMORY_MIB} MiB, 1 vCPU, one \
             run per contender and round: katalite (its stdout, the frames' payload; with its \
             json-file log, the default, and with `--log-driver none`), and \
             QEMU microvm booting the initramfs `katalite run --write-initramfs` wrote for \
             the same command, its channel chardev on stdout (the frames themselves, a \
             9-byte header per at most 64 KiB) and its serial console on stderr; stdout is \
             a 1 MiB pipe for all (QEMU drops what a full pipe refuses on a console port). \
             MiB/s of the workload's bytes from init's `{PROBE_WORKLOAD}` line to the last \
             byte the runner read"
        ),
    })
}

/// Throughput of a QEMU sample whose stdout is the channel's frames: the `payload` bytes
/// the workload wrote over the same span as [`results::throughput_mib_s`]. The frames add
/// a 9-byte header per read of init's pipe (at least 4 KiB each while `dd` writes 64 KiB
/// blocks), the 9-byte `Ready` and `dd`'s summary on stderr; more than [`framing_bound`]
/// over `payload`, or less than `payload`, means bytes were lost or added.
fn framed_throughput_mib_s(sample: &serde_json::Value, payload: u64) -> Result<f64> {
    let counted = sample["stdout_bytes"].as_u64().unwrap_or(0);
    ensure!(
        (payload..=payload + framing_bound(payload)).contains(&counted),
        "received {counted} bytes of frames for {payload} bytes of output"
    );
    let mut exact = sample.clone();
    exact["stdout_bytes"] = payload.into();
    results::throughput_mib_s(&exact, payload)
}

/// Most framing bytes `payload` bytes of output may come with: a header per 4 KiB, plus
/// the last partial frame and the `Ready` frame (`dd`'s summary on stderr, about a hundred
/// bytes in one frame, fits in what 64 KiB writes leave unused of this bound).
fn framing_bound(payload: u64) -> u64 {
    const HEADER: u64 = guest_init::channel::HEADER_LEN as u64;
    HEADER * (payload / 4096 + 2)
}

/// The throughput table, with the same run's guest → host network figures for scale.
pub fn table(throughput: &Throughput, network: Option<&Network>) -> String {
    let cell = |stats: Option<&Stats>| {
        stats.map_or("—".to_string(), |s| {
            format!("{:.1} MiB/s ({:.1}–{:.1})", s.median, s.min, s.max)
        })
    };
    let mut out = format!(
        "Guest → host stdout, {:.2} MiB of `dd` from init's workload start to the last \
         byte on the host, the same initramfs in QEMU:\n\n\
         | | katalite (generic port, json-file log) | katalite, `--log-driver none` | QEMU \
         `virtserialport` (generic port) | QEMU `virtconsole` (hvc0) |\n\
         | --- | --- | --- | --- | --- |\n",
        throughput.bytes as f64 / f64::from(1u32 << 20)
    );
    out.push_str(&format!(
        "| stdout throughput | {} | {} | {} | {} |\n",
        cell(throughput.mib_per_s.as_ref()),
        cell(throughput.no_log_mib_s.as_ref()),
        cell(throughput.qemu_virtserialport_mib_s.as_ref()),
        cell(throughput.qemu_virtconsole_mib_s.as_ref()),
    ));
    if let Some(network) = network {
        out.push_str(&format!(
            "| for scale: guest → host network download (same run) | {} | {} | {} (QEMU \
             user network) | — |\n",
            cell(network.katalite.as_ref().map(|s| &s.guest_to_host_mib_s)),
            cell(network.katalite.as_ref().map(|s| &s.guest_to_host_mib_s)),
            cell(network.qemu_user.as_ref().map(|s| &s.guest_to_host_mib_s)),
        ));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::JobResult;
    use serde_json::json;
    use std::path::PathBuf;

    fn lab_jobs(settings: &Settings) -> Vec<Job> {
        let initrds = [("zstd".to_string(), PathBuf::from("/src/x.img"))];
        let inputs = LabInputs {
            registry: "10.0.3.2:5000",
            vmlinux: Path::new("/src/target/guest/vmlinux"),
            initrds: &initrds,
            images_dir: Path::new("/host/var/tmp/katalite-images"),
        };
        jobs(&inputs, settings)
    }

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn every_contender_moves_the_same_bytes_in_alternating_rounds() {
        let settings = Settings::quick();
        let jobs = lab_jobs(&settings);
        let write = &jobs[0];
        assert_eq!(write.id, "throughput-initramfs");
        assert!(write
            .argv
            .windows(2)
            .any(|w| w == ["--write-initramfs", INITRD]));
        assert!(write.argv.iter().any(|a| a == "--boot-probe"));
        let tail = ["dd", "if=/dev/zero", "bs=65536", "count=128"];
        assert_eq!(write.argv[write.argv.len() - 4..], tail);
        let ids: Vec<&str> = jobs[1..].iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids.len(), 12);
        assert_eq!(
            ids[..4],
            [KATALITE, KATALITE_NO_LOG, QEMU_PORT, QEMU_CONSOLE]
        );
        assert_eq!(ids[4..8], ids[..4]);
        assert!(jobs[1..].iter().all(|j| j.kind == Kind::Throughput));
        let katalite = &jobs[1].argv;
        assert_eq!(katalite[katalite.len() - 4..], tail);
        assert!(!katalite.iter().any(|a| a == "--log-driver"));
        let no_log = &jobs[2].argv;
        assert_eq!(no_log[no_log.len() - 4..], tail);
        assert!(no_log.windows(2).any(|w| w == ["--log-driver", "none"]));

        let port = &jobs[3].argv;
        assert_eq!(after(port, "-initrd"), [INITRD]);
        assert_eq!(after(port, "-serial"), ["file:/dev/stderr"]);
        assert_eq!(
            after(port, "-chardev"),
            ["file,id=channel,path=/dev/stdout"]
        );
        assert_eq!(
            after(port, "-device"),
            [
                "virtio-serial-device",
                "virtserialport,chardev=channel,name=katalite.channel",
                "virtio-net-device,netdev=n"
            ]
        );
        let console = &jobs[4].argv;
        assert!(after(console, "-device").contains(&"virtconsole,chardev=channel"));
        assert_eq!(after(console, "-chardev"), after(port, "-chardev"));
    }

    #[test]
    fn qemu_samples_count_the_frames_of_the_workload_bytes() {
        let sample = |counted: u64| {
            json!({
                "status": 0, "exit_ms": 5000.0, "stdout_bytes": counted,
                "first_byte_ms": 1100.0, "last_byte_ms": 3000.0,
                "lines": [[1000.0, "katalite-init: probe workload"]],
            })
        };
        let payload = 8 << 20;
        // 128 frames of 64 KiB and the Ready frame.
        let rate = framed_throughput_mib_s(&sample(payload + 129 * 9), payload).expect("rate");
        assert!((rate - 4.0).abs() < 1e-9, "{rate}");
        assert!(framed_throughput_mib_s(&sample(payload - 1), payload).is_err());
        let too_much = payload + framing_bound(payload) + 1;
        assert!(framed_throughput_mib_s(&sample(too_much), payload).is_err());
    }

    #[test]
    fn a_failed_contender_leaves_the_others_and_an_error() {
        let settings = Settings::quick();
        let bytes = settings.throughput_bytes;
        let ok = |counted: u64| {
            json!({
                "status": 0, "exit_ms": 5000.0, "stdout_bytes": counted,
                "last_byte_ms": 2000.0, "lines": [[1000.0, "katalite-init: probe workload"]],
            })
        };
        let result = |id: &str, sample| JobResult {
            id: id.into(),
            samples: vec![sample],
        };
        let mut lab = LabResults::new(vec![
            result(
                "throughput-initramfs",
                json!({ "status": 0, "exit_ms": 1.0, "lines": [] }),
            ),
            result(KATALITE, ok(bytes)),
            result(KATALITE_NO_LOG, ok(bytes)),
            result(QEMU_PORT, ok(bytes + 9 * 130)),
            result(
                QEMU_CONSOLE,
                json!({ "status": 1, "exit_ms": 1.0, "lines": [] }),
            ),
        ]);
        let section = throughput(&mut lab, &settings).expect("section");
        assert_eq!(section.mib_per_s.as_ref().map(|s| s.median), Some(8.0));
        assert_eq!(section.no_log_mib_s.as_ref().map(|s| s.median), Some(8.0));
        assert_eq!(
            section.qemu_virtserialport_mib_s.as_ref().map(|s| s.median),
            Some(8.0)
        );
        assert!(section.qemu_virtconsole_mib_s.is_none());
        assert_eq!(lab.errors.len(), 1);
        assert!(lab.errors[0].starts_with(QEMU_CONSOLE), "{:?}", lab.errors);
        let text = table(&section, None);
        assert!(text.contains(
            "| stdout throughput | 8.0 MiB/s (8.0–8.0) | 8.0 MiB/s (8.0–8.0) | 8.0 MiB/s"
        ));
        assert!(text.contains("| — |"));
    }
}
