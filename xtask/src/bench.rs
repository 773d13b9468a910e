//! `cargo xtask bench`: katalite beside QEMU `-M microvm` booting the same kernel and
//! initramfs, moving the same stdout and serving HTTP through their user networks, plus
//! packing, memory, parallel starts, sizes, and images on katalite's two root paths
//! (initramfs, EROFS disk).
//! Host figures are taken here; VM figures come from one lab boot in which
//! `tests/bench_runner.rs` runs a plan and timestamps it. Writes latest.json, boot.svg,
//! latest.md and the raw lab-console.log to `target/bench/`; numbers are never asserted.

mod chart;
mod erofs_build;
mod host;
mod images;
mod net;
mod plan;
mod readme;
mod report;
mod results;
mod stats;
mod throughput;
mod volumes;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::ci::{static_release_build, workspace_root, xtask, MUSL_TARGET};
use host::{PackResult, Variant};
use plan::{LabInputs, Settings};
use report::{Binaries, Compressed, Environment, LabResults, Report};

pub use erofs_build::{run as erofs_build, Args as ErofsBuildArgs};

/// The test registry as the host reaches it, and as L1 does (QEMU user network).
const REGISTRY_HOST: &str = "127.0.0.1:5000";
const REGISTRY_LAB: &str = "10.0.3.2:5000";

/// The lab run's limit in seconds unless `LAB_TIMEOUT` is set: the `images` section loads,
/// packs and builds an image over 1 GiB under TCG, beyond the lab's default 40 minutes.
const LAB_TIMEOUT_S: u32 = 7200;

/// Images measured on the host (busybox is also the one booted).
const IMAGES: [&str; 2] = ["busybox", "nginx"];

/// Options of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// More samples (about four times as long as the quick default).
    #[arg(long)]
    full: bool,
    /// Use the guest and the static katalite already built.
    #[arg(long)]
    no_build: bool,
    /// Rewrite README.md's benchmark section with this run's table.
    #[arg(long)]
    readme: bool,
    /// Only the network comparison in the lab (no host figures, boots or parallel starts).
    #[arg(long, conflicts_with = "readme")]
    network_only: bool,
    /// Only the volume comparison in the lab (like `--network-only`).
    #[arg(long, hide = true, conflicts_with_all = ["readme", "network_only"])]
    volumes_only: bool,
    /// Only stdout throughput and the network comparison it is measured against.
    #[arg(long, hide = true, conflicts_with_all = ["readme", "network_only", "volumes_only"])]
    stdout_only: bool,
    /// Everything but the volume comparison (its share workload takes longest under TCG;
    /// the table then says it was not measured in this run).
    #[arg(long, conflicts_with_all = ["network_only", "volumes_only", "stdout_only"])]
    skip_volumes: bool,
}

/// Runs every measurement and writes the report files.
pub fn run(args: &Args) -> Result<()> {
    let root = workspace_root()?;
    let target = root.join("target");
    let out = target.join("bench");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut settings = if args.full {
        Settings::full()
    } else {
        Settings::quick()
    };
    settings.network_only = args.network_only;
    settings.volumes_only = args.volumes_only;
    settings.stdout_only = args.stdout_only;
    settings.skip_volumes = args.skip_volumes;
    let host_load_1m = load_average();

    let runner = build_runner(&root)?;
    if !args.no_build {
        xtask(&root, &["build-guest"])?;
        static_release_build(&root)?;
    }
    xtask(&root, &["registry", "start"])?;

    let katalite = target.join(MUSL_TARGET).join("release/katalite");
    let vmlinux = target.join("guest/vmlinux");
    let binaries = Binaries {
        katalite_bytes: host::file_bytes(&katalite)?,
        vmlinux_bytes: host::file_bytes(&vmlinux)?,
        init_bytes: host::file_bytes(&target.join("guest/katalite-init"))?,
    };

    let host = if args.network_only || args.volumes_only || args.stdout_only {
        HostFigures::default()
    } else {
        measure_host(&root, &katalite, &out, if args.full { 5 } else { 3 })?
    };
    let lab = measure_lab(&root, &out, &runner, &vmlinux, &host.initrds, &settings)?;
    let report = assemble(args, &settings, host, lab, binaries, host_load_1m);
    write_outputs(&root, &out, &report, args.readme)
}

/// What the host measured, and the busybox initramfs files QEMU boots in the lab.
#[derive(Default)]
struct HostFigures {
    pack: BTreeMap<String, PackResult>,
    compression: BTreeMap<String, BTreeMap<String, Variant>>,
    initrds: Vec<(String, PathBuf)>,
    /// EROFS disk image builds per image.
    erofs_build: BTreeMap<String, erofs_build::HostBuild>,
    /// Host measurements that failed without stopping the bench.
    errors: Vec<String>,
}

/// Pull+pack and compression figures of every image, and EROFS builds; `samples` runs each.
fn measure_host(root: &Path, katalite: &Path, out: &Path, samples: u32) -> Result<HostFigures> {
    let work = tempfile::tempdir_in(out).context("cannot create a scratch dir")?;
    let mut figures = HostFigures::default();
    for image in IMAGES {
        eprintln!("bench: pull+pack {image} on the host");
        let keep = (image == "busybox").then_some(out);
        let measured =
            host::measure_image(katalite, REGISTRY_HOST, image, samples, work.path(), keep)?;
        figures.pack.insert(image.to_string(), measured.pack);
        figures
            .compression
            .insert(image.to_string(), measured.variants);
        if !measured.initrds.is_empty() {
            figures.initrds = measured.initrds;
        }
    }
    let images_dir = crate::images::images_dir();
    (figures.erofs_build, figures.errors) =
        erofs_build::measure(root, work.path(), &images_dir, samples);
    Ok(figures)
}

/// Writes the plan, runs it in one lab boot and reads the results; a failed lab run is
/// recorded as an error next to whatever results it printed.
fn measure_lab(
    root: &Path,
    out: &Path,
    runner: &Path,
    vmlinux: &Path,
    initrds: &[(String, PathBuf)],
    settings: &Settings,
) -> Result<LabResults> {
    let initrds: Vec<(String, PathBuf)> = initrds
        .iter()
        .map(|(name, path)| (name.clone(), in_lab(root, path)))
        .collect();
    let inputs = LabInputs {
        registry: REGISTRY_LAB,
        vmlinux: &in_lab(root, vmlinux),
        initrds: &initrds,
        images_dir: &in_lab(root, &crate::images::images_dir()),
    };
    let plan_file = out.join("plan.json");
    fs::write(
        &plan_file,
        serde_json::to_vec_pretty(&plan::plan(&inputs, settings))?,
    )?;
    eprintln!("bench: running the plan in the lab (one boot)");
    let (console, lab_error) = run_in_lab(root, runner, &plan_file)?;
    // The raw samples, for a second look at any figure.
    fs::write(out.join("lab-console.log"), &console)?;
    let mut lab = LabResults::new(results::parse_console(&console)?);
    lab.errors.extend(lab_error);
    lab.check_setup("pull");
    Ok(lab)
}

/// The report from the host figures and the lab's results.
fn assemble(
    args: &Args,
    settings: &Settings,
    host: HostFigures,
    mut lab: LabResults,
    binaries: Binaries,
    host_load_1m: Option<f64>,
) -> Report {
    // `--network-only` ran no other lab job: asking for them would only list errors.
    let vm = !settings.network_only && !settings.volumes_only && !settings.stdout_only;
    let boot = if vm { lab.boot() } else { None };
    let mut compression = BTreeMap::new();
    for (image, variants) in host.compression {
        let mut compressed = BTreeMap::new();
        for (name, variant) in variants {
            // Only busybox is booted per compression (by QEMU; katalite always packs zstd).
            let qemu_boot_ms = (image == "busybox").then(|| lab.qemu_boot(&name)).flatten();
            let entry = Compressed {
                variant,
                qemu_boot_ms,
            };
            compressed.insert(name, entry);
        }
        compression.insert(image, compressed);
    }
    let memory = if vm { lab.memory() } else { None };
    let throughput = if vm || settings.stdout_only {
        throughput::throughput(&mut lab, settings)
    } else {
        None
    };
    let counts = if vm {
        &settings.parallel_counts[..]
    } else {
        &[]
    };
    let parallel = counts
        .iter()
        .filter_map(|&count| lab.parallel(count))
        .collect();
    let images = vm.then(|| images::section(&mut lab, host.erofs_build));
    let network = if settings.volumes_only {
        None
    } else {
        net::network(&mut lab, settings)
    };
    let volumes = if settings.network_only || settings.stdout_only || settings.skip_volumes {
        None
    } else {
        volumes::volumes(&mut lab)
    };
    lab.errors.extend(host.errors);
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    Report {
        date: report::utc_date(now.map_or(0, |d| d.as_secs())),
        mode: if args.full { "full" } else { "quick" }.into(),
        note: report::NOTE.into(),
        environment: Environment {
            host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            host_load_1m,
            qemu: qemu_version(),
            lab: "L1: Debian's kernel under qemu-system-x86_64 TCG (-cpu EPYC, emulated \
                  AMD-V), kvm-amd inside; both VMMs run in L1 on its /dev/kvm"
                .into(),
        },
        boot,
        pack: host.pack,
        compression,
        rss_overhead_mib: report::rss_overhead(memory.as_ref()),
        memory,
        throughput,
        parallel,
        network,
        volumes,
        volumes_skipped: settings.skip_volumes,
        images,
        binary_bytes: binaries.katalite_bytes,
        binaries,
        errors: lab.errors,
    }
}

/// Writes latest.json, boot.svg and latest.md (and README's section with `readme`), prints
/// the table, and fails if any measurement did.
fn write_outputs(root: &Path, out: &Path, report: &Report, readme: bool) -> Result<()> {
    let json = out.join("latest.json");
    fs::write(&json, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    if let Some(boot) = &report.boot {
        let series = |name: &str, key: &str| {
            boot.phases.get(key).map(|p| chart::BootSeries {
                name: name.into(),
                phases: [p.init_ms, p.workload_ms, p.exit_ms],
            })
        };
        let data = chart::ChartData {
            boot: [
                series("katalite", "katalite"),
                series("QEMU microvm", "qemu_microvm"),
            ]
            .into_iter()
            .flatten()
            .collect(),
            parallel: report.parallel.iter().map(|p| (p.vms, p.wall_ms)).collect(),
            caption: format!(
                "{}, `cargo xtask bench` in the lab: KVM nested in QEMU TCG; compare ratios, \
                 not absolute times",
                report.date
            ),
        };
        chart::write(&data, &out.join("boot.svg"))?;
    }
    let table = readme::table(report);
    fs::write(out.join("latest.md"), &table)?;
    if readme {
        let path = root.join("README.md");
        let text = fs::read_to_string(&path).context("cannot read README.md")?;
        fs::write(&path, readme::replace_section(&text, &table)?)
            .context("cannot write README.md")?;
    }
    println!("{table}");
    eprintln!("bench: wrote {}", json.display());
    if !report.errors.is_empty() {
        bail!(
            "{} measurement(s) failed:\n{}",
            report.errors.len(),
            report.errors.join("\n")
        );
    }
    Ok(())
}

/// Builds the static lab runner and returns its executable (named with a hash by cargo).
fn build_runner(root: &Path) -> Result<PathBuf> {
    let output = Command::new(env!("CARGO"))
        .current_dir(root)
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .args(["test", "--release", "--target", MUSL_TARGET])
        .args(["--package", "katalite-tests", "--features", "bench"])
        .args(["--test", "bench_runner", "--no-run"])
        .arg("--message-format=json")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the bench runner failed ({})", output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| msg["target"]["name"] == "bench_runner")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no bench_runner executable")
}

/// Boots the lab once running the runner on `plan`; returns the console output and, if the
/// lab run failed, why. Progress lines are shown on stderr as they come.
fn run_in_lab(root: &Path, runner: &Path, plan: &Path) -> Result<(String, Option<String>)> {
    let command = format!(
        "{} {}",
        in_lab(root, runner).display(),
        in_lab(root, plan).display()
    );
    // Through cargo, as ci.rs runs xtask: our own executable may have been replaced by a
    // rebuild since it started.
    let mut lab = Command::new(env!("CARGO"));
    lab.args(["run", "--quiet", "--package", "xtask", "--"])
        .args(["lab", "run", "--no-build", "--", &command])
        .current_dir(root)
        .stdout(Stdio::piped());
    if std::env::var_os("LAB_TIMEOUT").is_none() {
        lab.env("LAB_TIMEOUT", LAB_TIMEOUT_S.to_string());
    }
    let mut child = lab.spawn().context("cannot start the lab")?;
    let stdout = child.stdout.take().context("the lab has no stdout")?;
    let mut console = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read the lab's output")?;
        if !line.contains(results::RESULT_PREFIX) {
            eprintln!("{line}");
        }
        console.push_str(&line);
        console.push('\n');
    }
    let status = child.wait().context("cannot wait for the lab")?;
    let error = (!status.success()).then(|| format!("the lab run failed ({status})"));
    Ok((console, error))
}

/// Where L1 sees a host path: under `/src` inside the repository, else under `/host`
/// (the lab's read-only shares).
fn in_lab(repo: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix(repo) {
        Ok(inside) => Path::new("/src").join(inside),
        Err(_) => Path::new("/host").join(path.strip_prefix("/").unwrap_or(path)),
    }
}

/// The host's 1-minute load average.
fn load_average() -> Option<f64> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// QEMU's version line (the peer), or why it is unknown.
fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_into_the_lab_shares() {
        let repo = Path::new("/work/main");
        assert_eq!(
            in_lab(repo, Path::new("/work/main/target/bench/plan.json")),
            Path::new("/src/target/bench/plan.json")
        );
        assert_eq!(
            in_lab(repo, Path::new("/var/tmp/x")),
            Path::new("/host/var/tmp/x")
        );
    }
}
