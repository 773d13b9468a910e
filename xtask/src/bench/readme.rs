//! The report as a Markdown table (`target/bench/latest.md`), and with `--readme` in
//! README.md between the `<!-- bench:start -->` and `<!-- bench:end -->` markers.

use anyhow::{ensure, Result};

use super::images::{Images, RootFigures};
use super::net::{Network, Side, CONNECTIONS};
use super::report::{Report, NOTE};
use super::stats::Stats;

/// Opens README's generated section.
pub const START: &str = "<!-- bench:start -->";
/// Closes it.
pub const END: &str = "<!-- bench:end -->";

fn secs(stats: &Stats) -> String {
    format!(
        "{:.2} s ({:.2}–{:.2})",
        stats.median / 1000.0,
        stats.min / 1000.0,
        stats.max / 1000.0
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn ms(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.2} s", value / 1000.0)
    } else {
        format!("{value:.0} ms")
    }
}

/// The Markdown tables of `report`.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "Measured {} with `cargo xtask bench{}` (min–max in parentheses; raw numbers in \
         `target/bench/latest.json`, chart in `target/bench/boot.svg`). {NOTE}\n\n",
        report.date,
        if report.mode == "full" { " --full" } else { "" },
    );
    if let Some(boot) = &report.boot {
        out.push_str(&format!(
            "Boot of busybox `true` from the image cache, same kernel and initramfs, \
             {} MiB, 1 vCPU; median of {} runs each:\n\n",
            boot.memory_mib, boot.katalite_ms.n
        ));
        out.push_str("| process start → | katalite | QEMU `-M microvm` | katalite / QEMU |\n");
        out.push_str("| --- | --- | --- | --- |\n");
        let (katalite, qemu) = (boot.phases.get("katalite"), boot.phases.get("qemu_microvm"));
        if let (Some(k), Some(q)) = (katalite, qemu) {
            for (name, k, q) in [
                ("init (config read)", &k.init_ms, &q.init_ms),
                ("workload start", &k.workload_ms, &q.workload_ms),
                ("exit", &k.exit_ms, &q.exit_ms),
            ] {
                out.push_str(&format!(
                    "| {name} | {} | {} | {:.2} |\n",
                    secs(k),
                    secs(q),
                    k.median / q.median
                ));
            }
        }
        out.push('\n');
    }
    if let Some(network) = &report.network {
        out.push_str(&network_table(network));
    }
    if let Some(throughput) = &report.throughput {
        out.push_str(&super::throughput::table(
            throughput,
            report.network.as_ref(),
        ));
    }
    if let Some(volumes) = &report.volumes {
        out.push_str(&super::volumes::table(volumes));
    } else if report.volumes_skipped {
        out.push_str(
            "Volumes: not measured in this run (`--skip-volumes`); see [Volumes](#volumes) \
             for figures measured by hand.\n\n",
        );
    }
    if let Some(images) = &report.images {
        out.push_str(&images_table(images));
    }
    out.push_str("| measure | result |\n| --- | --- |\n");
    for (image, pack) in &report.pack {
        out.push_str(&format!(
            "| pull+pack {image} (host), cold / cached | {} / {}, packed (zstd) {} |\n",
            ms(pack.cold_ms.median),
            ms(pack.cached_ms.median),
            mib(pack.packed_bytes)
        ));
    }
    for (image, variants) in &report.compression {
        let cells: Vec<String> = variants
            .iter()
            .map(|(name, v)| {
                let boot = v
                    .qemu_boot_ms
                    .as_ref()
                    .map(|s| format!(", boots in {}", ms(s.median)))
                    .unwrap_or_default();
                format!(
                    "{name} {} (packed in {}{boot})",
                    mib(v.variant.bytes),
                    ms(v.variant.pack_ms)
                )
            })
            .collect();
        out.push_str(&format!(
            "| {image} initramfs by compression | {} |\n",
            cells.join("; ")
        ));
    }
    if let Some(memory) = &report.memory {
        out.push_str(&format!(
            "| VMM memory overhead, {} MiB guest | {:.1} MiB (VmRSS {:.1} − guest RAM touched \
             {:.1}): file-backed {:.1} (the binary, embedded kernel included) + anonymous \
             {:.1}; peak (VmHWM) {:.1} MiB |\n",
            memory.guest_mib,
            memory.overhead_mib.median,
            memory.rss_mib.median,
            memory.guest_touched_mib.median,
            memory.file_mib.median,
            memory.anon_overhead_mib.median,
            memory.peak_overhead_mib.median
        ));
    }
    if !report.parallel.is_empty() {
        let counts: Vec<String> = report.parallel.iter().map(|p| p.vms.to_string()).collect();
        let walls: Vec<String> = report
            .parallel
            .iter()
            .map(|p| format!("{:.2}", p.wall_ms.median / 1000.0))
            .collect();
        let per_vm: Vec<String> = report
            .parallel
            .iter()
            .map(|p| format!("{:.2}", p.wall_ms.median / 1000.0 / f64::from(p.vms.max(1))))
            .collect();
        out.push_str(&format!(
            "| {} VMs started at once ({} MiB each), all exited after | {} s ({} s per VM) |\n",
            counts.join(" / "),
            report.parallel[0].memory_mib,
            walls.join(" / "),
            per_vm.join(" / ")
        ));
    }
    out.push_str(&format!(
        "| static release katalite (kernel + init embedded) / vmlinux | {} / {} |\n",
        mib(report.binaries.katalite_bytes),
        mib(report.binaries.vmlinux_bytes)
    ));
    if !report.errors.is_empty() {
        out.push_str("\nNot measured this time:\n\n");
        for error in &report.errors {
            let first = error.lines().next().unwrap_or_default();
            out.push_str(&format!("- {first}\n"));
        }
    }
    out
}

/// `median (min–max)` with `unit` and `decimals`.
fn range(stats: &Stats, decimals: usize, unit: &str) -> String {
    format!(
        "{:.decimals$} {unit} ({:.decimals$}–{:.decimals$})",
        stats.median, stats.min, stats.max
    )
}

/// katalite beside QEMU's user network, one row per figure.
fn network_table(network: &Network) -> String {
    let mut out = format!(
        "Network through a forwarded port, the same busybox guest serving HTTP (katalite \
         `-p`, QEMU microvm `-netdev user,hostfwd=`), {} per download:\n\n\
         | | katalite | QEMU user network | katalite / QEMU |\n| --- | --- | --- | --- |\n",
        mib(network.bytes)
    );
    type Cell = fn(&Side) -> String;
    let held = format!("VMM VmRSS with {CONNECTIONS} unread downloads open");
    let rows: [(&str, &str, Cell); 6] = [
        ("host → guest download", "host_to_guest", |s| {
            range(&s.host_to_guest_mib_s, 1, "MiB/s")
        }),
        (
            "guest → host download (guest `wget` from 10.0.2.2)",
            "guest_to_host",
            |s| range(&s.guest_to_host_mib_s, 1, "MiB/s"),
        ),
        ("connect + GET of a 3-byte page", "connect_get", |s| {
            range(&s.connect_get_ms, 0, "ms")
        }),
        ("VMM VmRSS (guest RAM included), idle", "rss_idle", |s| {
            range(&s.rss_idle_mib, 1, "MiB")
        }),
        (&held, "rss_connections", |s| {
            range(&s.rss_connections_mib, 1, "MiB")
        }),
        (
            "process start → first page served",
            "first_response",
            |s| secs(&s.first_response_ms),
        ),
    ];
    for (label, key, cell) in rows {
        let side = |side: &Option<Side>| side.as_ref().map_or("—".to_string(), cell);
        let ratio = network
            .ratio_median
            .get(key)
            .map_or("—".to_string(), |r| format!("{r:.2}"));
        out.push_str(&format!(
            "| {label} | {} | {} | {ratio} |\n",
            side(&network.katalite),
            side(&network.qemu_user)
        ));
    }
    out.push('\n');
    out
}

/// Each image on both root paths, then the large image's VMM memory and the host builds.
fn images_table(images: &Images) -> String {
    let samples = images
        .runs
        .values()
        .flat_map(|roots| roots.values())
        .filter_map(|figures| figures.start_to_exit_ms.map(|s| s.n))
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "Images from the cache on katalite's two root paths (`initramfs`: packed and unpacked \
         into guest RAM; `disk`: the EROFS image on a read-only virtio-blk disk, the \
         default), `true`, {} MiB, 1 vCPU; median of {samples} runs:\n\n\
         | image | root | start → workload | start → exit | smallest `--memory` |\n\
         | --- | --- | --- | --- | --- |\n",
        images.memory_mib
    );
    let largest = images.memory_candidates_mib.last().copied().unwrap_or(0);
    for (image, roots) in &images.runs {
        for (root, figures) in roots {
            out.push_str(&format!(
                "| {image} | {root} | {} | {} |\n",
                timing_cells(figures),
                figures.min_memory_mib.map_or_else(
                    || format!("none up to {largest} MiB"),
                    |mib| format!("{mib} MiB")
                )
            ));
        }
    }
    out.push('\n');
    let mut rows = Vec::new();
    if let Some(memory) = &images.large_rss {
        rows.push(format!(
            "| VMM memory, large image from its disk in a {} MiB guest, after reading its \
             1000 MiB file | VmRSS {:.1} MiB (guest RAM touched {:.1}), peak (VmHWM) {:.1} MiB |",
            memory.guest_mib,
            memory.rss_mib.median,
            memory.guest_touched_mib.median,
            memory.hwm_mib.median
        ));
    }
    for (image, build) in &images.host_build {
        rows.push(format!(
            "| EROFS build of {image} on the host ({} rootfs, from cached layers) | {} \
             ({:.0} MiB/s), peak RSS {:.1} MiB ({:.1} before) |",
            mib(build.rootfs_bytes),
            ms(build.seconds.median * 1000.0),
            build.rootfs_mib_per_s.median,
            build.peak_rss_mib.median,
            build.rss_before_mib.median
        ));
    }
    if !rows.is_empty() {
        out.push_str("| measure | result |\n| --- | --- |\n");
        for row in rows {
            out.push_str(&row);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// The two timing cells of one image and root, or the failure across both.
fn timing_cells(figures: &RootFigures) -> String {
    match (&figures.start_to_workload_ms, &figures.start_to_exit_ms) {
        (Some(workload), Some(exit)) => {
            let mut cells = format!("{} | {}", secs(workload), secs(exit));
            if let Some(failure) = &figures.failure {
                cells.push_str(&format!(
                    " ({} of {} runs failed)",
                    failure.failed_runs, failure.runs
                ));
            }
            cells
        }
        _ => {
            let reason = figures.failure.as_ref().map_or_else(
                || "not measured".to_string(),
                |failure| {
                    let status = failure
                        .status
                        .map_or("killed".to_string(), |s| format!("exit {s}"));
                    // Pipes would end the cell.
                    let message = failure.message.replace('|', "/");
                    format!("fails ({status}): {message}")
                },
            );
            format!("{reason} | —")
        }
    }
}

/// `readme` with the text between the bench markers replaced by `table`.
pub fn replace_section(readme: &str, table: &str) -> Result<String> {
    let start = readme.find(START);
    let end = readme.find(END);
    let (Some(start), Some(end)) = (start, end) else {
        anyhow::bail!("README.md has no {START} ... {END} section");
    };
    ensure!(start < end, "README.md's bench markers are out of order");
    Ok(format!(
        "{}{START}\n{table}{}",
        &readme[..start],
        &readme[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::host::{PackResult, Variant};
    use crate::bench::report::{Binaries, Boot, Compressed, Environment, Parallel, Phases};
    use std::collections::BTreeMap;

    fn stats(median: f64) -> Stats {
        Stats::of(&[median - 100.0, median, median + 100.0]).expect("stats")
    }

    fn report() -> Report {
        let phases = |base: f64| Phases {
            init_ms: stats(base),
            workload_ms: stats(base + 200.0),
            exit_ms: stats(base + 400.0),
        };
        Report {
            date: "2026-01-02".into(),
            mode: "quick".into(),
            note: NOTE.into(),
            environment: Environment {
                host_cpus: 2,
                host_load_1m: Some(1.0),
                qemu: "QEMU emulator version 7.2".into(),
                lab: "lab".into(),
            },
            boot: Some(Boot {
                katalite_ms: stats(1400.0),
                qemu_microvm_ms: stats(2800.0),
                ratio_median: Some(0.5),
                phases: BTreeMap::from([
                    ("katalite".into(), phases(1000.0)),
                    ("qemu_microvm".into(), phases(2400.0)),
                ]),
                memory_mib: 512,
                workload: "busybox".into(),
            }),
            pack: BTreeMap::from([(
                "busybox".into(),
                PackResult {
                    cold_ms: stats(300.0),
                    cached_ms: stats(150.0),
                    packed_bytes: 2 << 20,
                },
            )]),
            compression: BTreeMap::from([(
                "busybox".into(),
                BTreeMap::from([(
                    "gzip".into(),
                    Compressed {
                        variant: Variant {
                            bytes: 3 << 20,
                            pack_ms: 250.0,
                        },
                        qemu_boot_ms: Some(stats(3000.0)),
                    },
                )]),
            )]),
            rss_overhead_mib: None,
            memory: None,
            throughput: None,
            parallel: vec![Parallel {
                vms: 4,
                memory_mib: 64,
                wall_ms: stats(5000.0),
            }],
            network: None,
            volumes: None,
            volumes_skipped: true,
            images: None,
            binary_bytes: 27 << 20,
            binaries: Binaries {
                katalite_bytes: 27 << 20,
                vmlinux_bytes: 17 << 20,
                init_bytes: 1 << 20,
            },
            errors: vec!["memory: the workload never started\ndetails".into()],
        }
    }

    #[test]
    fn the_table_has_the_date_the_caveat_and_each_measure() {
        let text = table(&report());
        assert!(text.starts_with("Measured 2026-01-02 with `cargo xtask bench`"));
        assert!(text.contains("ratios"), "the lab caveat is missing");
        assert!(text.contains("| exit | 1.40 s (1.30–1.50) | 2.80 s (2.70–2.90) | 0.50 |"));
        assert!(text.contains("| pull+pack busybox (host), cold / cached | 300 ms / 150 ms"));
        assert!(text.contains("gzip 3.00 MiB (packed in 250 ms, boots in 3.00 s)"));
        assert!(text.contains(
            "| 4 VMs started at once (64 MiB each), all exited after | 5.00 s (1.25 s per VM) |"
        ));
        assert!(text.contains("- memory: the workload never started\n"));
        assert!(!text.contains("details"));
        assert!(text.contains("Volumes: not measured in this run (`--skip-volumes`)"));
    }

    #[test]
    fn the_network_table_puts_katalite_beside_qemu() {
        let side = |rate: f64| Side {
            first_response_ms: stats(6000.0),
            host_to_guest_mib_s: Stats::of(&[rate - 1.0, rate, rate + 1.0]).expect("stats"),
            guest_to_host_mib_s: Stats::of(&[rate]).expect("stats"),
            connect_get_ms: stats(150.0),
            rss_idle_mib: stats(300.0),
            rss_connections_mib: stats(320.0),
            hwm_mib: stats(330.0),
            connections: 50,
        };
        let mut report = report();
        report.network = Some(Network {
            bytes: 4 << 20,
            katalite: Some(side(6.0)),
            qemu_user: None,
            ratio_median: BTreeMap::new(),
            method: "m".into(),
        });
        let text = table(&report);
        assert!(text.contains("4.00 MiB per download"));
        assert!(text.contains("| host → guest download | 6.0 MiB/s (5.0–7.0) | — | — |"));
        assert!(text.contains("| connect + GET of a 3-byte page | 150 ms (50–250) | — | — |"));
        assert!(
            text.contains("| VMM VmRSS with 50 unread downloads open | 320.0 MiB (220.0–420.0)")
        );
        assert!(text.contains("| process start → first page served | 6.00 s (5.90–6.10)"));
        report.network = report.network.map(|mut n| {
            n.qemu_user = Some(side(3.0));
            n.ratio_median.insert("host_to_guest".into(), 2.0);
            n
        });
        assert!(table(&report).contains("| 6.0 MiB/s (5.0–7.0) | 3.0 MiB/s (2.0–4.0) | 2.00 |"));
    }

    #[test]
    fn the_images_table_shows_both_roots_failures_and_host_builds() {
        use crate::bench::erofs_build::HostBuild;
        use crate::bench::images::{Failure, Images, RootFigures};
        let ok = RootFigures {
            start_to_workload_ms: Some(stats(1500.0)),
            start_to_exit_ms: Some(stats(1800.0)),
            min_memory_mib: Some(96),
            ..RootFigures::default()
        };
        let failed = RootFigures {
            failure: Some(Failure {
                status: Some(125),
                message: "katalite: needs about 4200m | more".into(),
                failed_runs: 3,
                runs: 3,
                expected: true,
            }),
            ..RootFigures::default()
        };
        let build = HostBuild {
            rootfs_bytes: 1000 << 20,
            image_bytes: 1001 << 20,
            layer_bytes: 1000 << 20,
            files: 10,
            seconds: Stats::of(&[2.5]).expect("stats"),
            rootfs_mib_per_s: stats(400.0),
            rss_before_mib: stats(150.0),
            peak_rss_mib: stats(200.0),
            build_rss_mib: stats(150.0),
            peak_reset: true,
        };
        let mut report = report();
        report.images = Some(Images {
            workload: "true".into(),
            memory_mib: 512,
            runs: BTreeMap::from([
                ("busybox".into(), BTreeMap::from([("disk".into(), ok)])),
                (
                    "large".into(),
                    BTreeMap::from([("initramfs".into(), failed)]),
                ),
            ]),
            memory_candidates_mib: vec![64, 1024],
            large_rss: None,
            host_build: BTreeMap::from([("large".into(), build)]),
            method: "m".into(),
        });
        let text = table(&report);
        assert!(text.contains("1 vCPU; median of 3 runs:"), "{text}");
        assert!(
            text.contains("| busybox | disk | 1.50 s (1.40–1.60) | 1.80 s (1.70–1.90) | 96 MiB |")
        );
        assert!(text.contains(
            "| large | initramfs | fails (exit 125): katalite: needs about 4200m / more | — \
             | none up to 1024 MiB |"
        ));
        assert!(text.contains(
            "| EROFS build of large on the host (1000.00 MiB rootfs, from cached layers) | \
             2.50 s (400 MiB/s), peak RSS 200.0 MiB (150.0 before) |"
        ));
    }

    #[test]
    fn only_the_marked_section_is_replaced() {
        let readme = format!("# x\n\n## Benchmarks\n\n{START}\nold\n{END}\n\n## Next\n");
        let new = replace_section(&readme, "new table\n").expect("replaced");
        assert_eq!(
            new,
            format!("# x\n\n## Benchmarks\n\n{START}\nnew table\n{END}\n\n## Next\n")
        );
        assert!(replace_section("# no markers\n", "t").is_err());
        assert!(replace_section(&format!("{END}{START}"), "t").is_err());
    }
}
