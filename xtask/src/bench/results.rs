//! Reading what the lab runner printed: its `@@bench:` result lines, and per sample the
//! boot-probe timestamps, memory figures, throughput and parallel wall times.

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use super::plan::{PROBE_INIT, PROBE_WORKLOAD};

/// Prefix of the runner's result lines.
pub const RESULT_PREFIX: &str = "@@bench:";

/// The samples of one job.
#[derive(Debug, Deserialize)]
pub struct JobResult {
    /// The job's id from the plan.
    pub id: String,
    /// One JSON object per recorded run (shape depends on the job kind).
    pub samples: Vec<serde_json::Value>,
}

/// The result lines in the lab's console output (other lines are the runner's progress and
/// any kernel chatter).
pub fn parse_console(output: &str) -> Result<Vec<JobResult>> {
    output
        .lines()
        .filter_map(|line| {
            line.find(RESULT_PREFIX)
                .map(|at| &line[at + RESULT_PREFIX.len()..])
        })
        .map(|json| serde_json::from_str(json.trim_end()).context("malformed bench result line"))
        .collect()
}

/// A `timed` or `throughput` sample as the runner reports it.
#[derive(Debug, Deserialize)]
struct TimedSample {
    status: Option<i32>,
    exit_ms: f64,
    lines: Vec<(f64, String)>,
    #[serde(default)]
    stdout_bytes: Option<u64>,
    #[serde(default)]
    last_byte_ms: Option<f64>,
}

impl TimedSample {
    fn parse(sample: &serde_json::Value) -> Result<Self> {
        let parsed: Self = serde_json::from_value(sample.clone()).context("malformed sample")?;
        if parsed.status != Some(0) {
            let output: Vec<&str> = parsed.lines.iter().map(|(_, l)| l.as_str()).collect();
            bail!(
                "the run exited with {:?}; its output:\n{}",
                parsed.status,
                output.join("\n")
            );
        }
        Ok(parsed)
    }

    /// When the first line containing `marker` arrived.
    fn line_at(&self, marker: &str) -> Result<f64> {
        self.lines
            .iter()
            .find(|(_, line)| line.contains(marker))
            .map(|(at, _)| *at)
            .with_context(|| format!("no {marker:?} line in the output"))
    }
}

/// The three boot phases of one run, in ms since the process was started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootPhases {
    /// Init has read its config.
    pub init_ms: f64,
    /// The workload is about to start.
    pub workload_ms: f64,
    /// The VMM process exited.
    pub exit_ms: f64,
}

/// The boot phases of a successful `timed` run with `--boot-probe`.
pub fn boot_phases(sample: &serde_json::Value) -> Result<BootPhases> {
    let sample = TimedSample::parse(sample)?;
    let phases = BootPhases {
        init_ms: sample.line_at(PROBE_INIT)?,
        workload_ms: sample.line_at(PROBE_WORKLOAD)?,
        exit_ms: sample.exit_ms,
    };
    ensure!(
        phases.init_ms <= phases.workload_ms && phases.workload_ms <= phases.exit_ms,
        "probe lines out of order: {phases:?}"
    );
    Ok(phases)
}

/// Exit time of a successful `timed` run.
pub fn exit_ms(sample: &serde_json::Value) -> Result<f64> {
    Ok(TimedSample::parse(sample)?.exit_ms)
}

/// How a `timed` run ended, for runs allowed to fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit status (`None`: killed at the timeout or by a signal).
    pub status: Option<i32>,
    /// The first output line that is not a boot probe (empty if there was none).
    pub first_line: String,
}

/// The exit status and first non-probe output line of a `timed` sample, whatever its status.
pub fn outcome(sample: &serde_json::Value) -> Result<Outcome> {
    let parsed: TimedSample = serde_json::from_value(sample.clone()).context("malformed sample")?;
    let first_line = parsed
        .lines
        .iter()
        .map(|(_, line)| line.trim())
        .find(|line| !line.is_empty() && !line.starts_with("katalite-init: probe "))
        .unwrap_or_default()
        .to_string();
    Ok(Outcome {
        status: parsed.status,
        first_line,
    })
}

/// One try of a `min_memory` job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The `--memory` tried.
    pub memory_mib: u32,
    /// How the run ended.
    pub outcome: Outcome,
}

/// The attempts of a `min_memory` sample, in the order the runner made them.
pub fn memory_attempts(sample: &serde_json::Value) -> Result<Vec<Attempt>> {
    let attempts = sample["attempts"]
        .as_array()
        .context("a min_memory sample without attempts")?;
    attempts
        .iter()
        .map(|attempt| {
            let memory_mib = attempt["memory_mib"]
                .as_u64()
                .and_then(|mib| u32::try_from(mib).ok())
                .context("an attempt without memory_mib")?;
            Ok(Attempt {
                memory_mib,
                outcome: outcome(attempt)?,
            })
        })
        .collect()
}

/// Guest→host stdout throughput in MiB/s: the bytes received over the time from the
/// workload's start (probe line) to the last byte.
pub fn throughput_mib_s(sample: &serde_json::Value, expected_bytes: u64) -> Result<f64> {
    let sample = TimedSample::parse(sample)?;
    let bytes = sample.stdout_bytes.unwrap_or(0);
    ensure!(
        bytes == expected_bytes,
        "received {bytes} of {expected_bytes} bytes"
    );
    let start = sample.line_at(PROBE_WORKLOAD)?;
    let end = sample.last_byte_ms.context("no byte arrived")?;
    ensure!(
        end > start,
        "the last byte came before the workload started"
    );
    Ok(bytes as f64 / (1 << 20) as f64 / ((end - start) / 1000.0))
}

/// Memory figures of one katalite process while its workload ran, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigures {
    /// Resident set size (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set size so far (VmHWM).
    pub hwm_kib: u64,
    /// Resident anonymous memory (RssAnon): heap, stacks and the guest RAM.
    pub anon_kib: u64,
    /// Resident file-backed memory (RssFile): the executable's pages, embedded guest
    /// kernel and init included.
    pub file_kib: u64,
    /// Resident part of the guest RAM mapping: the guest memory it touched.
    pub guest_kib: u64,
}

#[derive(Debug, Deserialize)]
struct MemorySample {
    triggered: bool,
    status: Option<i32>,
    #[serde(default)]
    proc_status: String,
    /// `[size_kb, rss_kb, start_kb]` each (older runners: no start).
    #[serde(default)]
    mappings: Vec<Vec<u64>>,
}

/// Reads a memory sample of a VM with `guest_mib` of RAM: VmRSS and VmHWM from
/// `/proc/PID/status`, and the guest's touched RAM as the resident size of its mapping
/// (vmm maps RAM below 3 GiB as one region): one mapping of exactly that size, or the one
/// run of adjacent mappings adding up to it (the kernel's segments, mapped from a file over
/// guest RAM, split it in pieces).
pub fn memory_figures(sample: &serde_json::Value, guest_mib: u32) -> Result<MemoryFigures> {
    let sample: MemorySample =
        serde_json::from_value(sample.clone()).context("malformed sample")?;
    ensure!(sample.triggered, "the workload never started");
    ensure!(
        sample.status == Some(0),
        "the run exited with {:?}",
        sample.status
    );
    let field = |name: &str| -> Result<u64> {
        sample
            .proc_status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/PID/status"))
    };
    let guest_kib = u64::from(guest_mib) * 1024;
    let guest = guest_resident_kib(&sample.mappings, guest_kib);
    ensure!(
        guest.len() == 1,
        "expected one {guest_mib} MiB run of mappings, found {}",
        guest.len()
    );
    Ok(MemoryFigures {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
        anon_kib: field("RssAnon")?,
        file_kib: field("RssFile")?,
        guest_kib: guest[0],
    })
}

/// The resident KiB of each run of adjacent mappings (`[size, rss, start]`, KiB) whose
/// sizes add up to `guest_kib`; a mapping without a start only matches alone.
fn guest_resident_kib(mappings: &[Vec<u64>], guest_kib: u64) -> Vec<u64> {
    let mut found = Vec::new();
    for first in 0..mappings.len() {
        let (mut size, mut rss) = (0u64, 0u64);
        for (index, mapping) in mappings.iter().enumerate().skip(first) {
            let (Some(&kb), Some(&resident)) = (mapping.first(), mapping.get(1)) else {
                break;
            };
            if index > first {
                let previous = &mappings[index - 1];
                let adjacent = match (previous.get(2), previous.first(), mapping.get(2)) {
                    (Some(at), Some(len), Some(next)) => at + len == *next,
                    _ => false,
                };
                if !adjacent {
                    break;
                }
            }
            size += kb;
            rss += resident;
            if size >= guest_kib {
                break;
            }
        }
        if size == guest_kib {
            found.push(rss);
        }
    }
    found
}

#[derive(Debug, Deserialize)]
struct ParallelSample {
    statuses: Vec<Option<i32>>,
    wall_ms: f64,
    /// Stderr of each VM that failed.
    #[serde(default)]
    failures: Vec<String>,
}

/// Wall time of a parallel start in which every VM exited 0.
pub fn parallel_wall_ms(sample: &serde_json::Value) -> Result<f64> {
    let sample: ParallelSample =
        serde_json::from_value(sample.clone()).context("malformed sample")?;
    let failed = sample.statuses.iter().filter(|s| **s != Some(0)).count();
    ensure!(
        failed == 0,
        "{failed} of {} VMs failed: {}",
        sample.statuses.len(),
        sample.failures.join(" | ")
    );
    Ok(sample.wall_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn result_lines_are_found_among_console_noise() {
        let console = "bench-runner: pull 1/1\n[   3.1] some kernel line\n\
             @@bench:{\"id\":\"pull\",\"samples\":[{\"status\":0}]}\r\n\
             noise@@bench:{\"id\":\"x\",\"samples\":[]}\n";
        let results = parse_console(console).expect("parsed");
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].id, "pull");
        assert_eq!(results[0].samples[0]["status"], 0);
        assert_eq!(results[1].id, "x");
        assert!(parse_console("@@bench:{not json\n").is_err());
    }

    fn boot_sample(status: i32, lines: serde_json::Value) -> serde_json::Value {
        json!({ "status": status, "exit_ms": 900.5, "lines": lines })
    }

    #[test]
    fn probe_lines_give_the_boot_phases() {
        let sample = boot_sample(
            0,
            json!([
                [120.0, "reboot: noise"],
                [400.25, "katalite-init: probe init"],
                [650.0, "katalite-init: probe workload"]
            ]),
        );
        let phases = boot_phases(&sample).expect("phases");
        assert_eq!(
            phases,
            BootPhases {
                init_ms: 400.25,
                workload_ms: 650.0,
                exit_ms: 900.5
            }
        );
    }

    #[test]
    fn failed_or_unprobed_runs_are_errors() {
        let failed = boot_sample(125, json!([[1.0, "katalite: the VM failed"]]));
        let err = boot_phases(&failed).expect_err("status 125");
        assert!(format!("{err:#}").contains("the VM failed"), "{err:#}");
        let unprobed = boot_sample(0, json!([[1.0, "katalite-init: probe init"]]));
        assert!(boot_phases(&unprobed).is_err());
        let backwards = boot_sample(
            0,
            json!([
                [5.0, "katalite-init: probe workload"],
                [6.0, "katalite-init: probe init"]
            ]),
        );
        assert!(boot_phases(&backwards).is_err());
        assert_eq!(exit_ms(&boot_sample(0, json!([]))).ok(), Some(900.5));
    }

    #[test]
    fn an_outcome_keeps_the_status_and_the_first_line_after_the_probes() {
        let failed = boot_sample(
            125,
            json!([
                [1.0, "katalite-init: probe init"],
                [2.0, "  "],
                [3.0, "katalite: the root filesystem needs about 4200m"],
                [4.0, "second line"]
            ]),
        );
        assert_eq!(
            outcome(&failed).expect("outcome"),
            Outcome {
                status: Some(125),
                first_line: "katalite: the root filesystem needs about 4200m".into()
            }
        );
        let killed = json!({ "status": null, "exit_ms": 1.0, "lines": [] });
        assert_eq!(outcome(&killed).expect("outcome").status, None);
        assert!(outcome(&json!({ "status": 0 })).is_err(), "no exit_ms");
    }

    #[test]
    fn memory_attempts_are_read_in_order() {
        let sample = json!({ "attempts": [
            { "memory_mib": 1024, "status": 0, "exit_ms": 10.0, "lines": [] },
            { "memory_mib": 256, "status": 125, "exit_ms": 5.0,
              "lines": [[1.0, "katalite: too little"]] },
        ]});
        let attempts = memory_attempts(&sample).expect("attempts");
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].memory_mib, 1024);
        assert_eq!(attempts[1].outcome.status, Some(125));
        assert_eq!(attempts[1].outcome.first_line, "katalite: too little");
        assert!(memory_attempts(&json!({})).is_err());
        assert!(memory_attempts(&json!({ "attempts": [{ "status": 0 }] })).is_err());
    }

    #[test]
    fn throughput_counts_from_the_workload_start_to_the_last_byte() {
        let sample = json!({
            "status": 0, "exit_ms": 5000.0, "stdout_bytes": 8 << 20,
            "first_byte_ms": 1100.0, "last_byte_ms": 3000.0,
            "lines": [[1000.0, "katalite-init: probe workload"]],
        });
        let rate = throughput_mib_s(&sample, 8 << 20).expect("rate");
        assert!((rate - 4.0).abs() < 1e-9, "{rate}");
        assert!(throughput_mib_s(&sample, 9 << 20).is_err());
    }

    #[test]
    fn the_guest_mapping_is_picked_by_size() {
        let sample = json!({
            "triggered": true, "status": 0,
            "proc_status": "VmPeak:\t 400000 kB\nVmHWM:\t   60000 kB\nVmRSS:\t   58000 kB\n\
                            RssAnon:\t   45000 kB\nRssFile:\t   13000 kB",
            "mappings": [[4, 4], [262144, 40000], [2048, 1500]],
        });
        let figures = memory_figures(&sample, 256).expect("figures");
        assert_eq!(
            figures,
            MemoryFigures {
                rss_kib: 58000,
                hwm_kib: 60000,
                anon_kib: 45000,
                file_kib: 13000,
                guest_kib: 40000
            }
        );
        assert!(memory_figures(&sample, 512).is_err(), "no such mapping");
        let untriggered = json!({ "triggered": false, "status": 125 });
        assert!(memory_figures(&untriggered, 256).is_err());
    }

    #[test]
    fn guest_ram_split_by_the_mapped_kernel_is_joined_again() {
        // 16 MiB of RAM, 8 MiB of kernel mapped from a file, the other 232 MiB; then a
        // mapping that is adjacent but would overshoot, and one elsewhere.
        let at = 1 << 30;
        let mappings = json!([
            [4, 4, 100],
            [16384, 1000, at],
            [8192, 6000, at + 16384],
            [237568, 30000, at + 24576],
            [2048, 1500, at + 262144],
            [262144, 7, 1 << 20],
        ]);
        let sample = json!({
            "triggered": true, "status": 0,
            "proc_status": "VmHWM:\t 60000 kB\nVmRSS:\t 58000 kB\nRssAnon:\t 45000 kB\n\
                            RssFile:\t 13000 kB",
            "mappings": mappings,
        });
        // Two candidates: the split run and the whole mapping elsewhere.
        assert!(memory_figures(&sample, 256).is_err(), "ambiguous");
        let mut split = sample.clone();
        split["mappings"].as_array_mut().expect("array").pop();
        let figures = memory_figures(&split, 256).expect("figures");
        assert_eq!(figures.guest_kib, 37000);
        // Not adjacent: no run.
        split["mappings"][2][2] = json!(at + 99999);
        assert!(memory_figures(&split, 256).is_err());
    }

    #[test]
    fn a_parallel_start_counts_only_if_every_vm_succeeded() {
        let ok = json!({ "statuses": [0, 0, 0, 0], "wall_ms": 8000.0 });
        assert_eq!(parallel_wall_ms(&ok).ok(), Some(8000.0));
        let one_failed = json!({
            "statuses": [0, 125, 0, null], "wall_ms": 8000.0,
            "failures": ["katalite: cannot use KVM", ""],
        });
        let err = parallel_wall_ms(&one_failed).expect_err("failures");
        assert_eq!(
            err.to_string(),
            "2 of 4 VMs failed: katalite: cannot use KVM | "
        );
    }
}
