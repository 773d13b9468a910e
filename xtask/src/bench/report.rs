//! `target/bench/latest.json`: the lab's raw samples and the host figures turned into one
//! report of min/median/max summaries. Jobs that failed are listed under `errors` instead
//! of being dropped silently.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use serde::Serialize;

use super::host::{PackResult, Variant};
use super::images::Images;
use super::net::Network;
use super::plan::{BOOT_MEMORY_MIB, MEMORY_RUN_MIB, PARALLEL_MEMORY_MIB};
use super::results::{self, BootPhases, JobResult};
use super::stats::{ratio, round, Stats};
use super::throughput::Throughput;
use super::volumes::Volumes;

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// UTC date of the run (YYYY-MM-DD).
    pub date: String,
    /// `quick` or `full`.
    pub mode: String,
    /// How to read the numbers.
    pub note: String,
    /// Where they were taken.
    pub environment: Environment,
    /// Boot comparison (absent only if it failed; see `errors`).
    pub boot: Option<Boot>,
    /// Pull+pack per image, on the host.
    pub pack: BTreeMap<String, PackResult>,
    /// Per image and compression: size, pack time, and for busybox QEMU's boot time.
    pub compression: BTreeMap<String, BTreeMap<String, Compressed>>,
    /// Median VMM overhead: VmRSS minus the guest RAM the VM touched.
    pub rss_overhead_mib: Option<f64>,
    /// The memory figures behind `rss_overhead_mib`.
    pub memory: Option<Memory>,
    /// Guest→host stdout throughput, katalite beside QEMU microvm's two kinds of port.
    pub throughput: Option<Throughput>,
    /// N VMs started at once.
    pub parallel: Vec<Parallel>,
    /// katalite's user network beside QEMU's, through a forwarded port.
    pub network: Option<Network>,
    /// katalite `-v` beside QEMU with virtiofsd on the same share.
    pub volumes: Option<Volumes>,
    /// The volume comparison was left out of this run (`--skip-volumes`).
    pub volumes_skipped: bool,
    /// Images on katalite's two root paths (initramfs, EROFS disk): start times, the
    /// smallest `--memory`, the VMM's memory running the large image, and the host's
    /// EROFS build.
    pub images: Option<Images>,
    /// Size of the static release katalite (kernel and init embedded).
    pub binary_bytes: u64,
    /// Sizes of the shipped pieces.
    pub binaries: Binaries,
    /// Jobs that produced no figures, with the reason.
    pub errors: Vec<String>,
}

/// Where the numbers were taken.
#[derive(Debug, Serialize)]
pub struct Environment {
    /// Host CPUs.
    pub host_cpus: usize,
    /// Host 1-minute load average when the bench started (other work skews the numbers).
    pub host_load_1m: Option<f64>,
    /// The peer's version line.
    pub qemu: String,
    /// The lab setup.
    pub lab: String,
}

/// Boot comparison: process start to exit of `true` in busybox, same kernel and initramfs.
#[derive(Debug, Serialize)]
pub struct Boot {
    /// katalite, start to exit.
    pub katalite_ms: Stats,
    /// QEMU `-M microvm`, start to exit.
    pub qemu_microvm_ms: Stats,
    /// katalite median / QEMU median.
    pub ratio_median: Option<f64>,
    /// Start to each probe line and to exit, per VMM.
    pub phases: BTreeMap<String, Phases>,
    /// Guest memory of both.
    pub memory_mib: u32,
    /// What was booted.
    pub workload: String,
}

/// Start to each boot phase.
#[derive(Debug, Serialize)]
pub struct Phases {
    /// Init read its config.
    pub init_ms: Stats,
    /// The workload is about to start.
    pub workload_ms: Stats,
    /// The VMM exited.
    pub exit_ms: Stats,
}

/// One compression of an image.
#[derive(Debug, Serialize)]
pub struct Compressed {
    /// Archive size and pack time.
    #[serde(flatten)]
    pub variant: Variant,
    /// QEMU boot (start to exit) of busybox with this archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_boot_ms: Option<Stats>,
}

/// VMM memory of a VM with `guest_mib` of RAM, sampled while its workload ran.
#[derive(Debug, Serialize)]
pub struct Memory {
    /// Guest RAM size.
    pub guest_mib: u32,
    /// VmRSS of the katalite process.
    pub rss_mib: Stats,
    /// VmHWM (peak) of the katalite process.
    pub hwm_mib: Stats,
    /// Resident part of the guest RAM mapping.
    pub guest_touched_mib: Stats,
    /// VmRSS minus guest touched: what the VMM itself holds.
    pub overhead_mib: Stats,
    /// VmHWM minus guest touched: an upper bound (the peak may include freed buffers).
    pub peak_overhead_mib: Stats,
    /// RssAnon minus guest touched: the VMM's own heap and stacks.
    pub anon_overhead_mib: Stats,
    /// RssFile: pages of the katalite executable, the embedded kernel and init included
    /// (shared with other katalite processes and reclaimable).
    pub file_mib: Stats,
    /// How it was measured.
    pub method: String,
}

/// One parallel start.
#[derive(Debug, Serialize)]
pub struct Parallel {
    /// VMs started at once.
    pub vms: u32,
    /// Guest memory of each.
    pub memory_mib: u32,
    /// Wall time until all exited.
    pub wall_ms: Stats,
}

/// Sizes of the shipped pieces.
#[derive(Debug, Serialize)]
pub struct Binaries {
    /// The static release katalite.
    pub katalite_bytes: u64,
    /// The guest kernel (the stripped vmlinux; katalite embeds it packed, about a third).
    pub vmlinux_bytes: u64,
    /// The guest init (embedded).
    pub init_bytes: u64,
}

/// The lab's results by job id, with the figures extracted per sample.
pub struct LabResults {
    jobs: HashMap<String, Vec<serde_json::Value>>,
    /// Failures met while reading them.
    pub errors: Vec<String>,
}

impl LabResults {
    /// Indexes the runner's job results; jobs run in several rounds (same id) are merged.
    pub fn new(results: Vec<JobResult>) -> Self {
        let mut jobs: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        for result in results {
            jobs.entry(result.id).or_default().extend(result.samples);
        }
        Self {
            jobs,
            errors: Vec::new(),
        }
    }

    /// Applies `read` to every sample of job `id`; on any failure records it and returns
    /// `None`, so one broken job does not hide the others.
    pub(super) fn each<T>(
        &mut self,
        id: &str,
        read: impl Fn(&serde_json::Value) -> Result<T>,
    ) -> Option<Vec<T>> {
        let outcome = self
            .jobs
            .get(id)
            .with_context(|| "the lab printed no result")
            .and_then(|samples| {
                samples
                    .iter()
                    .enumerate()
                    .map(|(n, s)| read(s).with_context(|| format!("sample {}", n + 1)))
                    .collect::<Result<Vec<T>>>()
            });
        match outcome {
            Ok(values) if !values.is_empty() => Some(values),
            Ok(_) => {
                self.errors.push(format!("{id}: no samples"));
                None
            }
            Err(err) => {
                self.errors.push(format!("{id}: {err:#}"));
                None
            }
        }
    }

    /// Boot phases of one VMM's job.
    fn phases(&mut self, id: &str) -> Option<Phases> {
        let phases = self.each(id, results::boot_phases)?;
        let stats =
            |pick: fn(&BootPhases) -> f64| Stats::of(&phases.iter().map(pick).collect::<Vec<_>>());
        Some(Phases {
            init_ms: stats(|p| p.init_ms)?,
            workload_ms: stats(|p| p.workload_ms)?,
            exit_ms: stats(|p| p.exit_ms)?,
        })
    }

    /// The boot comparison: katalite against QEMU booting the zstd initramfs.
    pub fn boot(&mut self) -> Option<Boot> {
        let katalite = self.phases("boot-katalite");
        let qemu = self.phases("boot-qemu-zstd");
        let (katalite, qemu) = (katalite?, qemu?);
        Some(Boot {
            katalite_ms: katalite.exit_ms,
            qemu_microvm_ms: qemu.exit_ms,
            ratio_median: ratio(katalite.exit_ms.median, qemu.exit_ms.median),
            phases: BTreeMap::from([
                ("katalite".to_string(), katalite),
                ("qemu_microvm".to_string(), qemu),
            ]),
            memory_mib: BOOT_MEMORY_MIB,
            workload: "busybox `true` from the image cache, `--image-root initramfs`".into(),
        })
    }

    /// QEMU's start-to-exit time booting busybox with `compression`.
    pub fn qemu_boot(&mut self, compression: &str) -> Option<Stats> {
        Stats::of(&self.each(&format!("boot-qemu-{compression}"), results::exit_ms)?)
    }

    /// The samples of job `id`, if the lab printed any.
    pub(super) fn samples(&self, id: &str) -> Option<&[serde_json::Value]> {
        self.jobs.get(id).map(Vec::as_slice)
    }

    /// Memory figures of the `memory` job.
    pub fn memory(&mut self) -> Option<Memory> {
        self.memory_job(
            "memory",
            "katalite run --memory 256m busybox `sleep 2` (from its EROFS disk, the \
             default root), 0.5 s after the workload \
             started: VmRSS/VmHWM/RssAnon/RssFile from /proc/PID/status; guest RAM \
             touched = Rss of the one 256 MiB anonymous mapping in /proc/PID/smaps; \
             overhead = VmRSS minus that, i.e. the executable's resident pages \
             (embedded kernel included) plus the VMM's heap and stacks",
        )
    }

    /// Memory figures of a `memory` job whose guest has [`MEMORY_RUN_MIB`] of RAM.
    pub(super) fn memory_job(&mut self, id: &str, method: &str) -> Option<Memory> {
        let figures = self.each(id, |s| results::memory_figures(s, MEMORY_RUN_MIB))?;
        let mib = |pick: &dyn Fn(&results::MemoryFigures) -> i64| {
            let values: Vec<f64> = figures.iter().map(|f| pick(f) as f64 / 1024.0).collect();
            Stats::of(&values)
        };
        let signed = |kib: u64| i64::try_from(kib).unwrap_or(i64::MAX);
        Some(Memory {
            guest_mib: MEMORY_RUN_MIB,
            rss_mib: mib(&|f| signed(f.rss_kib))?,
            hwm_mib: mib(&|f| signed(f.hwm_kib))?,
            guest_touched_mib: mib(&|f| signed(f.guest_kib))?,
            overhead_mib: mib(&|f| signed(f.rss_kib) - signed(f.guest_kib))?,
            peak_overhead_mib: mib(&|f| signed(f.hwm_kib) - signed(f.guest_kib))?,
            anon_overhead_mib: mib(&|f| signed(f.anon_kib) - signed(f.guest_kib))?,
            file_mib: mib(&|f| signed(f.file_kib))?,
            method: method.into(),
        })
    }

    /// Wall time of starting `count` VMs at once.
    pub fn parallel(&mut self, count: u32) -> Option<Parallel> {
        let walls = self.each(&format!("parallel-{count}"), results::parallel_wall_ms)?;
        Some(Parallel {
            vms: count,
            memory_mib: PARALLEL_MEMORY_MIB,
            wall_ms: Stats::of(&walls)?,
        })
    }

    /// Records a failure of job `id` (e.g. the setup pull) if it did not exit 0.
    pub fn check_setup(&mut self, id: &str) {
        self.each(id, results::exit_ms);
    }
}

/// The note every report and table carries.
pub const NOTE: &str = "Measured in the lab: KVM nested in QEMU TCG (software emulation), \
    where everything runs tens of times slower than on hardware. Compare ratios between \
    katalite and QEMU from the same run, not absolute milliseconds.";

/// The median overhead, rounded, for the top-level field.
pub fn rss_overhead(memory: Option<&Memory>) -> Option<f64> {
    memory.map(|m| round(m.overhead_mib.median))
}

/// `YYYY-MM-DD` of a Unix time in seconds (UTC), by the civil-from-days algorithm.
pub fn utc_date(unix_seconds: u64) -> String {
    let days = i64::try_from(unix_seconds / 86_400).unwrap_or(0) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn boot_sample(init: f64, workload: f64, exit: f64) -> serde_json::Value {
        json!({ "status": 0, "exit_ms": exit, "lines": [
            [init, "katalite-init: probe init"], [workload, "katalite-init: probe workload"]
        ]})
    }

    fn lab() -> LabResults {
        LabResults::new(vec![
            JobResult {
                id: "boot-katalite".into(),
                samples: vec![boot_sample(100.0, 150.0, 200.0)],
            },
            JobResult {
                id: "boot-katalite".into(),
                samples: vec![boot_sample(110.0, 160.0, 220.0)],
            },
            JobResult {
                id: "boot-qemu-zstd".into(),
                samples: vec![
                    boot_sample(300.0, 350.0, 400.0),
                    boot_sample(320.0, 370.0, 440.0),
                ],
            },
            JobResult {
                id: "parallel-4".into(),
                samples: vec![json!({ "statuses": [0, 0, 0, 1], "wall_ms": 10.0 })],
            },
        ])
    }

    #[test]
    fn the_boot_section_has_the_fields_other_tools_read() {
        let mut lab = lab();
        let boot = lab.boot().expect("boot");
        let json = serde_json::to_value(&boot).expect("json");
        assert_eq!(json["katalite_ms"]["median"], 210.0);
        assert_eq!(json["qemu_microvm_ms"]["min"], 400.0);
        assert_eq!(json["qemu_microvm_ms"]["max"], 440.0);
        assert_eq!(json["ratio_median"], 0.5);
        assert_eq!(json["phases"]["katalite"]["init_ms"]["median"], 105.0);
        assert!(lab.errors.is_empty(), "{:?}", lab.errors);
    }

    #[test]
    fn failed_and_missing_jobs_become_errors() {
        let mut lab = lab();
        assert!(lab.parallel(4).is_none());
        assert!(lab.memory().is_none());
        assert_eq!(lab.errors.len(), 2);
        assert!(lab.errors[0].starts_with("parallel-4: sample 1: 1 of 4 VMs failed"));
        assert_eq!(lab.errors[1], "memory: the lab printed no result");
    }

    #[test]
    fn memory_overhead_is_rss_minus_the_touched_guest_ram() {
        let sample = json!({
            "triggered": true, "status": 0,
            "proc_status": "VmHWM:\t 61440 kB\nVmRSS:\t 51200 kB\n\
                            RssAnon:\t 45056 kB\nRssFile:\t 6144 kB",
            "mappings": [[262144, 40960]],
        });
        let mut lab = LabResults::new(vec![JobResult {
            id: "memory".into(),
            samples: vec![sample],
        }]);
        let memory = lab.memory().expect("memory");
        assert_eq!(memory.overhead_mib.median, 10.0);
        assert_eq!(memory.peak_overhead_mib.median, 20.0);
        assert_eq!(memory.guest_touched_mib.median, 40.0);
        assert_eq!(memory.anon_overhead_mib.median, 4.0);
        assert_eq!(memory.file_mib.median, 6.0);
        assert_eq!(rss_overhead(Some(&memory)), Some(10.0));
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_767_225_599), "2025-12-31");
        assert_eq!(utc_date(1_767_225_600), "2026-01-01");
    }
}
