//! The `images` section: busybox, nginx and an image over 1 GiB (`cargo xtask images`'s OCI
//! layouts) on both of katalite's root paths, `--image-root initramfs` (packed, unpacked
//! into guest RAM) and `disk` (the EROFS image on a verified read-only virtio-blk disk, the
//! default). Measured in the lab: start → workload and start → exit from the cache, the
//! smallest `--memory` that runs `true`, and the VMM's memory while the large image's
//! 1000 MiB file is read in a 256 MiB guest. The host's EROFS build figures come from
//! `erofs_build.rs`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::erofs_build::HostBuild;
use super::plan::{
    katalite_run_image, Job, Kind, LabInputs, Settings, BOOT_MEMORY_MIB, MEMORY_RUN_MIB,
    PROBE_WORKLOAD,
};
use super::report::{LabResults, Memory};
use super::results::{self, Attempt, BootPhases, Outcome};
use super::stats::Stats;

/// The images booted, smallest first.
pub const IMAGES: [&str; 3] = ["busybox", "nginx", "large"];

/// katalite's root paths (`--image-root`).
pub const ROOTS: [&str; 2] = ["initramfs", "disk"];

/// `--memory` sizes searched for the smallest that runs, ascending.
pub const MEMORY_LADDER_MIB: [u32; 9] = [64, 96, 128, 192, 256, 384, 512, 768, 1024];

/// (image, root) runs expected to fail: 1000 MiB of incompressible data does not fit in
/// guest RAM as an initramfs. Their failures are figures, not errors.
const EXPECTED_FAILURES: [(&str, &str); 1] = [("large", "initramfs")];

/// The large image's 1000 MiB file (`cargo xtask images`' recipe, `images/storage.rs`).
const LARGE_DATA: &str = "data/random.bin";

/// What the large image's workload prints on stderr once it has read its whole file.
const READ_DONE: &str = "katalite-bench: large file read";

/// Longest one run of an image job may take: a warm-up loads the large image from the 9p
/// share and packs or builds 1000 MiB under TCG.
const TIMEOUT_S: u64 = 1800;

/// Job id of the VMM memory run of the large image.
const LARGE_RSS: &str = "image-rss-large-disk";

/// `oci:DIR/NAME:latest` of one test image, `images_dir` as L1 sees it.
pub fn reference(images_dir: &Path, name: &str) -> String {
    format!("oci:{}:latest", images_dir.join(name).display())
}

fn boot_id(image: &str, root: &str) -> String {
    format!("image-boot-{image}-{root}")
}

fn memory_id(image: &str, root: &str) -> String {
    format!("image-memory-{image}-{root}")
}

/// The lab jobs: timed rounds (every image and root once per round, the first round with
/// a warm-up that loads the layout and packs or builds, so later runs start from the
/// cache), then one smallest-memory search per image and root, then the large image read
/// through in a 256 MiB guest with its memory sampled.
pub fn jobs(inputs: &LabInputs, settings: &Settings) -> Vec<Job> {
    let memory = format!("{BOOT_MEMORY_MIB}m");
    let mut jobs = Vec::new();
    for round in 0..settings.image_samples {
        for image in IMAGES {
            for root in ROOTS {
                let argv = katalite_run_image(
                    &reference(inputs.images_dir, image),
                    &["--boot-probe", "--image-root", root, "--memory", &memory],
                    &["true"],
                );
                let mut job = Job::new(boot_id(image, root), Kind::Timed, argv, 1);
                job.warmup = u32::from(round == 0);
                job.timeout_s = Some(TIMEOUT_S);
                jobs.push(job);
            }
        }
    }
    for image in IMAGES {
        for root in ROOTS {
            let argv = katalite_run_image(
                &reference(inputs.images_dir, image),
                &["--image-root", root, "--memory", "{memory}m"],
                &["true"],
            );
            let mut job = Job::new(memory_id(image, root), Kind::MinMemory, argv, 1);
            job.candidates_mib = Some(MEMORY_LADDER_MIB.to_vec());
            job.timeout_s = Some(TIMEOUT_S);
            jobs.push(job);
        }
    }
    let script = format!("cat /{LARGE_DATA} >/dev/null && echo '{READ_DONE}' >&2 && sleep 2");
    let argv = katalite_run_image(
        &reference(inputs.images_dir, "large"),
        &[
            "--image-root",
            "disk",
            "--memory",
            &format!("{MEMORY_RUN_MIB}m"),
        ],
        &["sh", "-c", &script],
    );
    let mut job = Job::new(LARGE_RSS, Kind::Memory, argv, settings.large_rss_samples);
    job.trigger = Some(READ_DONE.into());
    job.settle_ms = Some(500);
    job.timeout_s = Some(TIMEOUT_S);
    jobs.push(job);
    jobs
}

/// The report's `images` section.
#[derive(Debug, Serialize)]
pub struct Images {
    /// What every timed run boots.
    pub workload: String,
    /// Guest memory of the timed runs.
    pub memory_mib: u32,
    /// Per image, per root path (`initramfs`, `disk`).
    pub runs: BTreeMap<String, BTreeMap<String, RootFigures>>,
    /// The `--memory` sizes the smallest-memory search chose from.
    pub memory_candidates_mib: Vec<u32>,
    /// The VMM's memory while the large image ran from its disk and read its big file.
    pub large_rss: Option<Memory>,
    /// Building the EROFS disk image on the host, per image.
    pub host_build: BTreeMap<String, HostBuild>,
    /// How it was measured.
    pub method: String,
}

/// One image on one root path.
#[derive(Debug, Default, Serialize)]
pub struct RootFigures {
    /// Process start → the `probe workload` line (successful runs).
    pub start_to_workload_ms: Option<Stats>,
    /// Process start → exit (successful runs).
    pub start_to_exit_ms: Option<Stats>,
    /// Why timed runs failed, if any did.
    pub failure: Option<Failure>,
    /// The smallest candidate `--memory` with which `true` exited 0.
    pub min_memory_mib: Option<u32>,
    /// Every try of the search, in order: `[MiB, exit status]`.
    pub memory_attempts: Vec<(u32, Option<i32>)>,
    /// Why even the largest candidate failed, when none passed.
    pub memory_failure: Option<Failure>,
}

/// Runs that did not exit 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The first failed run's exit status (`null`: killed at the runner's timeout).
    pub status: Option<i32>,
    /// Its first output line other than the boot probes (katalite's error).
    pub message: String,
    /// How many runs failed.
    pub failed_runs: usize,
    /// Out of how many.
    pub runs: usize,
    /// Whether this failure is the expected one (the large image as an initramfs).
    pub expected: bool,
}

fn expected(image: &str, root: &str) -> bool {
    EXPECTED_FAILURES.contains(&(image, root))
}

/// The section from the lab's `image-*` jobs and the host's build figures; unexpected
/// failures also go to `lab.errors`.
pub fn section(lab: &mut LabResults, host_build: BTreeMap<String, HostBuild>) -> Images {
    let mut runs: BTreeMap<String, BTreeMap<String, RootFigures>> = BTreeMap::new();
    for image in IMAGES {
        for root in ROOTS {
            let figures = root_figures(lab, image, root);
            runs.entry(image.to_string())
                .or_default()
                .insert(root.to_string(), figures);
        }
    }
    let large_rss = lab.memory_job(
        LARGE_RSS,
        &format!(
            "katalite run --image-root disk --memory {MEMORY_RUN_MIB}m of the large image, \
             `cat /{LARGE_DATA} >/dev/null` (1000 MiB, every block verified by the VMM as \
             it is read), figures read 0.5 s after it finished; fields as in `memory`"
        ),
    );
    Images {
        workload: "`true` from the image cache (`--boot-probe`)".into(),
        memory_mib: BOOT_MEMORY_MIB,
        runs,
        memory_candidates_mib: MEMORY_LADDER_MIB.to_vec(),
        large_rss,
        host_build,
        method: format!(
            "In the lab, images as OCI layouts from `cargo xtask images` (large: nginx plus \
             /{LARGE_DATA}, 1000 MiB of incompressible data), `katalite run --image-root \
             initramfs|disk --memory {BOOT_MEMORY_MIB}m IMAGE true`; per round every image \
             and root once, the first round after one unrecorded warm-up each (the load \
             from the layout and the pack or EROFS build). start_to_workload: the `{PROBE_WORKLOAD}` \
             line; a cached start still re-hashes the image's layers. Smallest memory: \
             `true` with the largest candidate, then bisection (assumes more memory never \
             fails). Host build: `cargo xtask bench-erofs-build` (release), one fresh \
             process per sample, layers already in its store (page cache warm), \
             disk_image into an empty directory, fsync included; peak RSS = VmHWM after \
             the build, reset through /proc/self/clear_refs just before it"
        ),
    }
}

/// The timed runs and the memory search of one image on one root.
fn root_figures(lab: &mut LabResults, image: &str, root: &str) -> RootFigures {
    let mut figures = RootFigures::default();
    let expected = expected(image, root);
    let id = boot_id(image, root);
    match lab.samples(&id).map(|samples| timed(samples, expected)) {
        None => lab.errors.push(format!("{id}: the lab printed no result")),
        Some((phases, failure)) => {
            let stats = |pick: fn(&BootPhases) -> f64| {
                Stats::of(&phases.iter().map(pick).collect::<Vec<_>>())
            };
            figures.start_to_workload_ms = stats(|p| p.workload_ms);
            figures.start_to_exit_ms = stats(|p| p.exit_ms);
            if let Some(failure) = &failure {
                if !expected {
                    lab.errors.push(describe(&id, failure));
                }
            }
            figures.failure = failure;
        }
    }
    let id = memory_id(image, root);
    let attempts = lab.samples(&id).map(|samples| {
        samples
            .iter()
            .map(results::memory_attempts)
            .collect::<anyhow::Result<Vec<_>>>()
    });
    match attempts {
        None => lab.errors.push(format!("{id}: the lab printed no result")),
        Some(Err(err)) => lab.errors.push(format!("{id}: {err:#}")),
        Some(Ok(samples)) => {
            let attempts: Vec<Attempt> = samples.into_iter().flatten().collect();
            let (min, failure) = smallest(&attempts, expected);
            if let Some(failure) = &failure {
                if !expected {
                    lab.errors.push(describe(&id, failure));
                }
            }
            figures.min_memory_mib = min;
            figures.memory_failure = failure;
            figures.memory_attempts = attempts
                .iter()
                .map(|a| (a.memory_mib, a.outcome.status))
                .collect();
        }
    }
    figures
}

/// The boot phases of the successful samples, and the first failure if any sample failed.
fn timed(samples: &[serde_json::Value], expected: bool) -> (Vec<BootPhases>, Option<Failure>) {
    let mut phases = Vec::new();
    let mut first: Option<Outcome> = None;
    let mut failed = 0;
    for sample in samples {
        match results::boot_phases(sample) {
            Ok(p) => phases.push(p),
            Err(err) => {
                failed += 1;
                let outcome = results::outcome(sample).unwrap_or(Outcome {
                    status: None,
                    first_line: String::new(),
                });
                first.get_or_insert(match outcome.status {
                    // It exited 0 but the probe lines were missing or out of order.
                    Some(0) => Outcome {
                        first_line: format!("{err:#}"),
                        ..outcome
                    },
                    _ => outcome,
                });
            }
        }
    }
    let failure = first.map(|outcome| Failure {
        status: outcome.status,
        message: outcome.first_line,
        failed_runs: failed,
        runs: samples.len(),
        expected,
    });
    (phases, failure)
}

/// The smallest passing size, or why the largest tried failed when none passed.
fn smallest(attempts: &[Attempt], expected: bool) -> (Option<u32>, Option<Failure>) {
    let passed = attempts.iter().filter(|a| a.outcome.status == Some(0));
    if let Some(min) = passed.map(|a| a.memory_mib).min() {
        return (Some(min), None);
    }
    let failure = attempts
        .iter()
        .max_by_key(|a| a.memory_mib)
        .map(|a| Failure {
            status: a.outcome.status,
            message: a.outcome.first_line.clone(),
            failed_runs: attempts.len(),
            runs: attempts.len(),
            expected,
        });
    let failure = failure.or(Some(Failure {
        status: None,
        message: "no attempt was made".into(),
        failed_runs: 0,
        runs: 0,
        expected,
    }));
    (None, failure)
}

fn describe(id: &str, failure: &Failure) -> String {
    let status = failure
        .status
        .map_or("no exit status".to_string(), |s| format!("exit {s}"));
    format!(
        "{id}: {} of {} runs failed ({status}): {}",
        failure.failed_runs, failure.runs, failure.message
    )
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

    #[test]
    fn every_image_boots_on_both_roots_from_its_layout() {
        let settings = Settings::quick();
        let jobs = lab_jobs(&settings);
        let runs = |id: &str| -> (u32, u32) {
            let jobs = jobs.iter().filter(|job| job.id == id);
            jobs.fold((0, 0), |(w, r), job| (w + job.warmup, r + job.repeat))
        };
        for image in IMAGES {
            for root in ROOTS {
                assert_eq!(runs(&boot_id(image, root)), (1, 3), "{image} {root}");
            }
        }
        let large = jobs
            .iter()
            .find(|job| job.id == "image-boot-large-initramfs")
            .expect("job");
        assert_eq!(large.kind, Kind::Timed);
        assert_eq!(
            large.argv.join(" "),
            "katalite run -q --boot-probe --image-root initramfs --memory 512m \
             oci:/host/var/tmp/katalite-images/large:latest true"
        );
        // Rounds go through every image and root before repeating one.
        let order: Vec<&str> = jobs.iter().take(7).map(|job| job.id.as_str()).collect();
        assert_eq!(order[0], "image-boot-busybox-initramfs");
        assert_eq!(order[1], "image-boot-busybox-disk");
        assert_eq!(order[6], "image-boot-busybox-initramfs");
        assert_eq!(jobs[6].warmup, 0);
    }

    #[test]
    fn memory_searches_try_the_ladder_with_a_placeholder() {
        let jobs = lab_jobs(&Settings::quick());
        let search = jobs
            .iter()
            .find(|job| job.id == "image-memory-nginx-disk")
            .expect("job");
        assert_eq!(search.kind, Kind::MinMemory);
        assert!(search
            .argv
            .windows(2)
            .any(|w| w == ["--memory", "{memory}m"]));
        assert!(search
            .argv
            .windows(2)
            .any(|w| w == ["--image-root", "disk"]));
        assert_eq!(search.argv.last().map(String::as_str), Some("true"));
        let json = serde_json::to_value(search).expect("json");
        assert_eq!(json["kind"], "min_memory");
        assert_eq!(json["candidates_mib"][0], 64);
        assert_eq!(json["candidates_mib"][8], 1024);
        assert_eq!(json["timeout_s"], TIMEOUT_S);
        let searches = jobs.iter().filter(|j| j.kind == Kind::MinMemory).count();
        assert_eq!(searches, 6);
    }

    #[test]
    fn the_large_image_is_read_through_in_a_256m_guest() {
        let jobs = lab_jobs(&Settings::full());
        let rss = jobs.last().expect("jobs");
        assert_eq!((rss.id.as_str(), rss.kind), (LARGE_RSS, Kind::Memory));
        assert_eq!(rss.repeat, 3);
        assert_eq!(rss.trigger.as_deref(), Some(READ_DONE));
        assert!(rss.argv.windows(2).any(|w| w == ["--memory", "256m"]));
        assert!(rss.argv.windows(2).any(|w| w == ["--image-root", "disk"]));
        let script = rss.argv.last().expect("script");
        assert!(script.starts_with("cat /data/random.bin >/dev/null && echo"));
        assert!(script.contains(READ_DONE));
    }

    fn boot(workload: f64, exit: f64) -> serde_json::Value {
        json!({ "status": 0, "exit_ms": exit, "lines": [
            [workload - 50.0, "katalite-init: probe init"],
            [workload, "katalite-init: probe workload"]
        ]})
    }

    fn failed(status: i32, line: &str) -> serde_json::Value {
        json!({ "status": status, "exit_ms": 20.0, "lines": [[10.0, line]] })
    }

    fn search(attempts: &[(u32, i32)]) -> serde_json::Value {
        let attempts: Vec<serde_json::Value> = attempts
            .iter()
            .map(|&(mib, status)| {
                json!({ "memory_mib": mib, "status": status, "exit_ms": 1.0,
                        "lines": [[0.5, format!("katalite: at {mib}m")]] })
            })
            .collect();
        json!({ "attempts": attempts })
    }

    fn all_jobs() -> Vec<JobResult> {
        let mut results = Vec::new();
        for image in IMAGES {
            for root in ROOTS {
                let samples = if expected(image, root) {
                    vec![failed(
                        125,
                        "katalite: the root filesystem needs about 4200m",
                    )]
                } else {
                    vec![boot(100.0, 200.0), boot(110.0, 240.0), boot(90.0, 180.0)]
                };
                results.push(JobResult {
                    id: boot_id(image, root),
                    samples,
                });
                let attempts = if expected(image, root) {
                    search(&[(1024, 125)])
                } else {
                    search(&[(1024, 0), (256, 0), (128, 0), (96, 125)])
                };
                results.push(JobResult {
                    id: memory_id(image, root),
                    samples: vec![attempts],
                });
            }
        }
        results
    }

    #[test]
    fn the_expected_failure_is_a_figure_and_others_are_errors() {
        let mut lab = LabResults::new(all_jobs());
        let images = section(&mut lab, BTreeMap::new());
        // The large RSS job printed nothing: that one is an error.
        assert_eq!(lab.errors.len(), 1, "{:?}", lab.errors);
        assert!(lab.errors[0].starts_with("image-rss-large-disk:"));
        let busybox = &images.runs["busybox"]["disk"];
        let workload = busybox.start_to_workload_ms.expect("stats");
        assert_eq!((workload.min, workload.median), (90.0, 100.0));
        assert_eq!(busybox.start_to_exit_ms.map(|s| s.max), Some(240.0));
        assert_eq!(busybox.min_memory_mib, Some(128));
        assert_eq!(
            busybox.memory_attempts,
            [
                (1024, Some(0)),
                (256, Some(0)),
                (128, Some(0)),
                (96, Some(125))
            ]
        );
        let large = &images.runs["large"]["initramfs"];
        assert!(large.start_to_exit_ms.is_none());
        let failure = large.failure.as_ref().expect("failure");
        assert_eq!(failure.status, Some(125));
        assert!(failure.message.contains("needs about 4200m"));
        assert!(failure.expected);
        assert_eq!((failure.failed_runs, failure.runs), (1, 1));
        assert_eq!(large.min_memory_mib, None);
        let memory = large.memory_failure.as_ref().expect("memory failure");
        assert_eq!(memory.message, "katalite: at 1024m");
        let json = serde_json::to_value(&images).expect("json");
        assert_eq!(json["runs"]["nginx"]["initramfs"]["min_memory_mib"], 128);
        assert_eq!(json["runs"]["large"]["disk"]["memory_attempts"][3][1], 125);
        assert!(json["large_rss"].is_null());
        assert!(json["host_build"].as_object().is_some());
    }

    #[test]
    fn unexpected_failures_and_missing_jobs_are_errors() {
        let mut results = all_jobs();
        for result in &mut results {
            if result.id == "image-boot-nginx-disk" {
                result.samples[1] = failed(127, "katalite: exec: true: not found");
            }
            if result.id == "image-memory-busybox-disk" {
                result.samples = vec![search(&[(1024, 125)])];
            }
        }
        results.retain(|r| r.id != "image-boot-busybox-initramfs");
        let mut lab = LabResults::new(results);
        let images = section(&mut lab, BTreeMap::new());
        let errors = lab.errors.join("\n");
        assert!(errors.contains("image-boot-busybox-initramfs: the lab printed no result"));
        assert!(errors.contains(
            "image-boot-nginx-disk: 1 of 3 runs failed (exit 127): katalite: exec: true"
        ));
        assert!(errors.contains("image-memory-busybox-disk: 1 of 1 runs failed (exit 125)"));
        // The successful samples still count.
        let nginx = &images.runs["nginx"]["disk"];
        assert_eq!(nginx.start_to_exit_ms.map(|s| s.n), Some(2));
        assert!(nginx.failure.as_ref().is_some_and(|f| !f.expected));
    }

    #[test]
    fn a_run_without_probe_lines_fails_with_the_reason() {
        let unprobed = json!({ "status": 0, "exit_ms": 5.0, "lines": [] });
        let (phases, failure) = timed(&[unprobed], false);
        assert!(phases.is_empty());
        let failure = failure.expect("failure");
        assert_eq!(failure.status, Some(0));
        assert!(
            failure.message.contains("probe init"),
            "{}",
            failure.message
        );
        let (min, failure) = smallest(&[], false);
        assert_eq!(min, None);
        assert_eq!(failure.map(|f| f.runs), Some(0));
    }
}
