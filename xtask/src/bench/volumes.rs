//! The volume comparison: katalite `-v` (its own virtio-fs server) beside QEMU microvm with
//! Debian's virtiofsd (vhost-user-fs), both booting the same busybox guest that times
//! sequential I/O, small-file churn and a tree walk on the share itself. The guest prints
//! `@@vol NAME START END` (seconds of /proc/uptime); this module plans the jobs and turns
//! those lines into the report's `volumes` section. QEMU virtio-9p is not measured: the
//! guest kernel has no 9p (kernel-config lacks CONFIG_9P_FS and CONFIG_NET_9P).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::plan::{self, Job, Kind, LabInputs, Settings, BOOT_MEMORY_MIB};
use super::report::LabResults;
use super::stats::{ratio, Stats};

/// The shared directory on L1's disk-backed scratch.
pub const SHARE: &str = "/scratch/katalite-bench-vol";
/// Where the guest mounts it.
pub const GUEST_DIR: &str = "/data";
/// The tag katalite gives the first `-v` share (src/volumes), which init mounts.
pub const TAG: &str = "katalite-vol0";
/// virtiofsd's socket.
const SOCKET: &str = "/tmp/katalite-bench-virtiofsd.sock";
/// Where the lab writes the initramfs QEMU boots.
const INITRD: &str = "/tmp/katalite-bench-vol.img";
/// Debian's virtiofsd (qemu-system-common) through the host's loader, as QEMU runs.
const VIRTIOFSD: &str = "/host/usr/lib/qemu/virtiofsd";
/// MiB of the sequential file, each way.
pub const SEQ_MIB: u32 = 100;
/// Files created, stat'ed and unlinked.
pub const SMALL_FILES: u32 = 5000;
/// Directories × files of the tree `tar` reads.
pub const TREE: (u32, u32) = (100, 100);
/// Why virtio-9p has no column.
pub const NINE_P_MISSING: &str =
    "not measured: the guest kernel has no 9p (kernel-config lacks CONFIG_9P_FS, CONFIG_NET_9P)";

/// Single-quotes `word` for `sh`.
pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn shell(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

/// L1's setup: the file to read and the tree to archive, owned by nobody in particular.
pub fn setup_script() -> String {
    let (dirs, files) = TREE;
    format!(
        "set -e; rm -rf {SHARE}; mkdir -p {SHARE}/tree; \
         dd if=/dev/zero of={SHARE}/r.bin bs=1M count={SEQ_MIB} 2>/dev/null; cd {SHARE}/tree; \
         for d in $(seq {dirs}); do mkdir d$d; for f in $(seq {files}); do \
         echo file-$d-$f >d$d/f$f; done; done; chmod -R a+rwX {SHARE}; sync"
    )
}

/// The guest's workload on the share at [`GUEST_DIR`]. katalite's init mounts it for `-v`;
/// the initramfs QEMU boots has no mounts (`--write-initramfs` refuses `-v`), so the script
/// mounts the tag itself when nothing is at [`GUEST_DIR`]. Each result goes to stdout
/// (katalite) and to /dev/console (QEMU's serial; its channel goes to /dev/null).
pub fn guest_script() -> String {
    format!(
        "set -e; grep -q ' {GUEST_DIR} ' /proc/mounts || {{ mkdir -p {GUEST_DIR}; \
         mount -t virtiofs {TAG} {GUEST_DIR}; }}; cd {GUEST_DIR}; \
         t() {{ cut -d' ' -f1 /proc/uptime; }}; \
         r() {{ echo \"@@vol $*\"; echo \"@@vol $*\" >/dev/console 2>/dev/null || true; }}; \
         rm -rf w.bin small; \
         a=$(t); dd if=/dev/zero of=w.bin bs=1M count={SEQ_MIB} 2>/dev/null; sync; b=$(t); \
         r seq_write $a $b; \
         a=$(t); cat r.bin >/dev/null; b=$(t); r seq_read $a $b; \
         mkdir small; cd small; a=$(t); seq {SMALL_FILES} | xargs touch; \
         seq {SMALL_FILES} | xargs stat >/dev/null; seq {SMALL_FILES} | xargs rm; b=$(t); \
         cd ..; rmdir small; r small_files $a $b; \
         a=$(t); tar cf /dev/null tree; b=$(t); r tar $a $b; rm -f w.bin"
    )
}

/// Drops L1's page cache, then runs `argv` (the runner runs as root in L1).
fn cold(argv: &[String]) -> Vec<String> {
    let script = format!(
        "sync; echo 3 >/proc/sys/vm/drop_caches || true; exec {}",
        shell(argv)
    );
    vec!["sh".into(), "-c".into(), script]
}

/// virtiofsd on [`SOCKET`], then QEMU with the vhost-user-fs device, after a cold cache.
pub fn qemu_virtiofsd(vmlinux: &Path) -> Vec<String> {
    let mut qemu = plan::qemu_microvm(vmlinux, Path::new(INITRD), "user,id=n");
    let memory = format!("memory-backend-memfd,id=mem,size={BOOT_MEMORY_MIB}M,share=on");
    let chardev = format!("socket,id=fs,path={SOCKET}");
    let device = format!("vhost-user-fs-device,chardev=fs,tag={TAG},queue-size=1024");
    for arg in [
        // vhost-user-fs is a virtio 1.0 device; microvm's virtio-mmio defaults to legacy.
        "-global",
        "virtio-mmio.force-legacy=false",
        "-object",
        &memory,
        "-machine",
        "memory-backend=mem",
        "-chardev",
        &chardev,
        "-device",
        &device,
    ] {
        qemu.push(arg.to_string());
    }
    let mut daemon: Vec<String> = plan::host_program(VIRTIOFSD);
    daemon.extend([
        format!("--socket-path={SOCKET}"),
        "-o".into(),
        format!("source={SHARE}"),
        "-o".into(),
        "cache=auto".into(),
        "-o".into(),
        "sandbox=chroot".into(),
    ]);
    let script = format!(
        "sync; echo 3 >/proc/sys/vm/drop_caches || true; rm -f {SOCKET}; {} & v=$!; i=0; \
         while [ ! -S {SOCKET} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; {}; \
         s=$?; kill $v 2>/dev/null; wait; exit $s",
        shell(&daemon),
        shell(&qemu)
    );
    vec!["sh".into(), "-c".into(), script]
}

/// The volume jobs: data setup, QEMU's initramfs, then one boot per VMM per round.
pub fn jobs(inputs: &LabInputs, settings: &Settings) -> Vec<Job> {
    let setup = vec!["sh".into(), "-c".into(), setup_script()];
    let script = guest_script();
    let command = ["sh", "-c", script.as_str()];
    let memory = format!("{BOOT_MEMORY_MIB}m");
    let volume = format!("{SHARE}:{GUEST_DIR}");
    let write = plan::katalite_run(
        inputs.registry,
        &["--memory", &memory, "--write-initramfs", INITRD],
        &command,
    );
    let mut jobs = vec![
        Job::new("vol-setup", Kind::Timed, setup, 1),
        Job::new("vol-initramfs", Kind::Timed, write, 1),
    ];
    let [root_flag, root_path] = plan::INITRAMFS_ROOT;
    let katalite = cold(&plan::katalite_run(
        inputs.registry,
        &["--memory", &memory, root_flag, root_path, "-v", &volume],
        &command,
    ));
    let qemu = qemu_virtiofsd(inputs.vmlinux);
    for _ in 0..settings.volume_rounds {
        for (id, argv) in [("vol-katalite", &katalite), ("vol-virtiofsd", &qemu)] {
            let mut job = Job::new(id, Kind::Timed, argv.clone(), 1);
            job.timeout_s = Some(1800);
            jobs.push(job);
        }
    }
    jobs
}

/// One boot's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    seq_write_mib_s: f64,
    seq_read_mib_s: f64,
    small_files_per_s: f64,
    tar_s: f64,
}

/// Seconds of each `@@vol NAME START END` line (the first of each name).
fn phases(lines: &[&str]) -> BTreeMap<String, f64> {
    let mut seconds = BTreeMap::new();
    for line in lines {
        let Some(rest) = line.trim().strip_prefix("@@vol ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if let [name, start, end] = words[..] {
            if let (Ok(a), Ok(b)) = (start.parse::<f64>(), end.parse::<f64>()) {
                seconds.entry(name.to_string()).or_insert(b - a);
            }
        }
    }
    seconds
}

impl Sample {
    /// A complete sample from a `Timed` result; a failed one is an error with its output.
    fn parse(value: &serde_json::Value) -> Result<Self> {
        let lines: Vec<&str> = value["lines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|line| line[1].as_str())
            .collect();
        let seconds = phases(&lines);
        let get = |name: &str| -> Result<f64> {
            let s = *seconds.get(name).with_context(|| {
                format!(
                    "no `{name}` figure (exit {}); the VMM printed:\n{}",
                    value["status"],
                    lines.join("\n")
                )
            })?;
            // /proc/uptime counts hundredths: a phase under one tick is below resolution.
            Ok(s.max(0.01))
        };
        if value["status"].as_i64() != Some(0) {
            bail!(
                "exit {}; the VMM printed:\n{}",
                value["status"],
                lines.join("\n")
            );
        }
        Ok(Self {
            seq_write_mib_s: f64::from(SEQ_MIB) / get("seq_write")?,
            seq_read_mib_s: f64::from(SEQ_MIB) / get("seq_read")?,
            small_files_per_s: f64::from(SMALL_FILES) / get("small_files")?,
            tar_s: get("tar")?,
        })
    }
}

/// One VMM's volume figures, pooled over its rounds.
#[derive(Debug, Serialize)]
pub struct Side {
    /// `dd` of zeros into a new file, 1 MiB blocks, then `sync`.
    pub seq_write_mib_s: Stats,
    /// `cat` of the file L1 wrote, L1's cache dropped, the guest's fresh.
    pub seq_read_mib_s: Stats,
    /// Files per second through create (`touch`), `stat` and `rm`, by xargs batches.
    pub small_files_per_s: Stats,
    /// `tar cf /dev/null` of the tree, seconds.
    pub tar_s: Stats,
}

impl Side {
    fn of(samples: &[Sample]) -> Option<Self> {
        let pooled =
            |pick: fn(&Sample) -> f64| Stats::of(&samples.iter().map(pick).collect::<Vec<_>>());
        Some(Self {
            seq_write_mib_s: pooled(|s| s.seq_write_mib_s)?,
            seq_read_mib_s: pooled(|s| s.seq_read_mib_s)?,
            small_files_per_s: pooled(|s| s.small_files_per_s)?,
            tar_s: pooled(|s| s.tar_s)?,
        })
    }
}

/// The report's `volumes` section.
#[derive(Debug, Serialize)]
pub struct Volumes {
    /// katalite `run -v`, its own virtio-fs server.
    pub katalite: Option<Side>,
    /// QEMU microvm, vhost-user-fs-device with Debian's virtiofsd (cache=auto).
    pub qemu_virtiofsd: Option<Side>,
    /// QEMU virtio-9p: why it has no figures.
    pub qemu_9p: String,
    /// katalite / virtiofsd per figure, as a speed-up (above 1: katalite faster; for `tar`
    /// virtiofsd's time over katalite's).
    pub speedup_median: BTreeMap<String, f64>,
    /// How it was measured.
    pub method: String,
}

/// The volumes section from the lab's `vol-*` jobs; failures go to `lab.errors`.
pub fn volumes(lab: &mut LabResults) -> Option<Volumes> {
    lab.check_setup("vol-setup");
    lab.check_setup("vol-initramfs");
    let mut side = |id: &str| Side::of(&lab.each(id, Sample::parse)?);
    let katalite = side("vol-katalite");
    let qemu_virtiofsd = side("vol-virtiofsd");
    let mut speedup_median = BTreeMap::new();
    if let (Some(k), Some(q)) = (&katalite, &qemu_virtiofsd) {
        let figures = [
            (
                "seq_write",
                ratio(k.seq_write_mib_s.median, q.seq_write_mib_s.median),
            ),
            (
                "seq_read",
                ratio(k.seq_read_mib_s.median, q.seq_read_mib_s.median),
            ),
            (
                "small_files",
                ratio(k.small_files_per_s.median, q.small_files_per_s.median),
            ),
            ("tar", ratio(q.tar_s.median, k.tar_s.median)),
        ];
        for (name, r) in figures {
            if let Some(r) = r {
                speedup_median.insert(name.to_string(), r);
            }
        }
    }
    if katalite.is_none() && qemu_virtiofsd.is_none() {
        return None;
    }
    let (dirs, files) = TREE;
    Some(Volumes {
        katalite,
        qemu_virtiofsd,
        qemu_9p: NINE_P_MISSING.into(),
        speedup_median,
        method: format!(
            "One boot per VMM and round in the lab, {BOOT_MEMORY_MIB} MiB, 1 vCPU, the same \
             busybox guest (katalite's initramfs path; QEMU boots the initramfs `katalite run \
             --write-initramfs` wrote, whose script mounts tag {TAG} itself as \
             --write-initramfs refuses -v) on a directory of L1's \
             disk ({SHARE}), L1's page cache dropped before each boot. katalite: `run -v`. \
             QEMU: microvm, vhost-user-fs-device, memfd-backed shared memory, Debian's \
             virtiofsd -o cache=auto,sandbox=chroot, queue-size=1024, modern virtio-mmio. \
             The guest times each phase with \
             /proc/uptime (10 ms): dd of {SEQ_MIB} MiB of zeros in 1 MiB blocks + sync; cat \
             of a {SEQ_MIB} MiB file L1 wrote; touch, stat and rm of {SMALL_FILES} empty \
             files by xargs; tar cf /dev/null of {dirs}×{files} small files. QEMU virtio-9p: \
             {NINE_P_MISSING}"
        ),
    })
}

/// `median (min–max)` with `unit` and `decimals`.
fn range(stats: &Stats, decimals: usize, unit: &str) -> String {
    format!(
        "{:.decimals$} {unit} ({:.decimals$}–{:.decimals$})",
        stats.median, stats.min, stats.max
    )
}

/// README's volume table: one row per figure, virtio-9p's column saying why it is empty.
pub fn table(volumes: &Volumes) -> String {
    let mut out = String::from(
        "Volumes, the same busybox guest on a directory of L1's disk (katalite `-v`, QEMU \
         microvm with Debian's virtiofsd, cache=auto):\n\n\
         | | katalite `-v` | QEMU + virtiofsd | QEMU virtio-9p | katalite / virtiofsd |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    type Cell = fn(&Side) -> String;
    let (dirs, files) = TREE;
    let write = format!("sequential write, {SEQ_MIB} MiB");
    let read = format!("sequential read, {SEQ_MIB} MiB");
    let small = format!("create + stat + unlink, {SMALL_FILES} files");
    let tar = format!("`tar cf /dev/null`, {} files", dirs * files);
    let rows: [(&str, &str, Cell); 4] = [
        (&write, "seq_write", |s| {
            range(&s.seq_write_mib_s, 1, "MiB/s")
        }),
        (&read, "seq_read", |s| range(&s.seq_read_mib_s, 1, "MiB/s")),
        (&small, "small_files", |s| {
            range(&s.small_files_per_s, 0, "files/s")
        }),
        (&tar, "tar", |s| range(&s.tar_s, 2, "s")),
    ];
    for (label, key, cell) in rows {
        let side = |side: &Option<Side>| side.as_ref().map_or("—".to_string(), cell);
        let speedup = volumes
            .speedup_median
            .get(key)
            .map_or("—".to_string(), |r| format!("{r:.2}×"));
        out.push_str(&format!(
            "| {label} | {} | {} | not measured (no 9p in the guest kernel) | {speedup} |\n",
            side(&volumes.katalite),
            side(&volumes.qemu_virtiofsd)
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

    fn lab_jobs() -> Vec<Job> {
        let initrds = [("zstd".to_string(), PathBuf::from("/src/x.img"))];
        let inputs = LabInputs {
            registry: "10.0.3.2:5000",
            vmlinux: Path::new("/src/target/guest/vmlinux"),
            initrds: &initrds,
            images_dir: Path::new("/host/var/tmp/katalite-images"),
        };
        jobs(&inputs, &Settings::quick())
    }

    fn has(argv: &[String], pair: [&str; 2]) -> bool {
        argv.windows(2).any(|w| w == pair)
    }

    #[test]
    fn both_vmms_share_the_same_directory_with_the_same_script() {
        let jobs = lab_jobs();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "vol-setup",
                "vol-initramfs",
                "vol-katalite",
                "vol-virtiofsd",
                "vol-katalite",
                "vol-virtiofsd"
            ]
        );
        let script = guest_script();
        let write = &jobs[1].argv;
        assert!(has(write, ["--write-initramfs", INITRD]));
        assert!(!write.iter().any(|a| a == "-v"));
        assert_eq!(write.last(), Some(&script));
        // katalite runs after L1's cache is dropped, its argv quoted whole.
        let katalite = &jobs[2].argv;
        assert_eq!(katalite[..2], ["sh", "-c"]);
        assert!(katalite[2]
            .starts_with("sync; echo 3 >/proc/sys/vm/drop_caches || true; exec 'katalite' 'run'"));
        assert!(katalite[2]
            .contains("'--image-root' 'initramfs' '-v' '/scratch/katalite-bench-vol:/data'"));
        assert!(katalite[2].ends_with(&quote(&script)));
        let qemu = &jobs[3].argv[2];
        assert!(qemu.contains(
            "'/host/usr/lib/qemu/virtiofsd' '--socket-path=/tmp/katalite-bench-virtiofsd.sock' \
             '-o' 'source=/scratch/katalite-bench-vol' '-o' 'cache=auto'"
        ));
        assert!(qemu.contains(
            "'-device' 'vhost-user-fs-device,chardev=fs,tag=katalite-vol0,queue-size=1024'"
        ));
        assert!(qemu.contains("'-global' 'virtio-mmio.force-legacy=false'"));
        assert!(qemu.contains("'memory-backend-memfd,id=mem,size=512M,share=on'"));
        assert!(qemu.contains("'-machine' 'memory-backend=mem'"));
        assert!(qemu.contains("'-initrd' '/tmp/katalite-bench-vol.img'"));
        assert!(jobs[2..].iter().all(|j| j.timeout_s == Some(1800)));
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
        assert!(guest_script().contains("cut -d' ' -f1 /proc/uptime"));
        assert!(guest_script().starts_with(
            "set -e; grep -q ' /data ' /proc/mounts || { mkdir -p /data; \
             mount -t virtiofs katalite-vol0 /data; }; cd /data;"
        ));
        assert!(setup_script().contains("bs=1M count=100"));
    }

    fn sample(scale: f64) -> serde_json::Value {
        let line = |name: &str, s: f64| json!([1.0, format!("@@vol {name} 10.00 {:.2}", 10.0 + s)]);
        json!({"status": 0, "exit_ms": 1.0, "lines": [
            [0.5, "noise"],
            line("seq_write", 2.0 * scale),
            line("seq_read", 1.0 * scale),
            line("small_files", 5.0 * scale),
            line("tar", 4.0 * scale),
            // QEMU prints each line once more on its console: the first counts.
            line("tar", 99.0),
        ]})
    }

    #[test]
    fn guest_lines_become_rates_and_speedups() {
        let mut lab = LabResults::new(vec![
            JobResult {
                id: "vol-setup".into(),
                samples: vec![json!({"status": 0, "exit_ms": 1.0, "lines": []})],
            },
            JobResult {
                id: "vol-initramfs".into(),
                samples: vec![json!({"status": 0, "exit_ms": 1.0, "lines": []})],
            },
            JobResult {
                id: "vol-katalite".into(),
                samples: vec![sample(1.0), sample(1.0)],
            },
            JobResult {
                id: "vol-virtiofsd".into(),
                samples: vec![sample(2.0)],
            },
        ]);
        let volumes = volumes(&mut lab).expect("section");
        assert!(lab.errors.is_empty(), "{:?}", lab.errors);
        let k = volumes.katalite.as_ref().expect("katalite");
        assert_eq!(k.seq_write_mib_s.median, 50.0);
        assert_eq!(k.seq_read_mib_s.median, 100.0);
        assert_eq!(k.small_files_per_s.median, 1000.0);
        assert_eq!(k.tar_s.median, 4.0);
        assert_eq!(k.tar_s.n, 2);
        for figure in ["seq_write", "seq_read", "small_files", "tar"] {
            assert_eq!(volumes.speedup_median[figure], 2.0, "{figure}");
        }
        assert!(volumes.qemu_9p.contains("CONFIG_9P_FS"));
        let table = table(&volumes);
        assert!(table.contains(
            "| sequential read, 100 MiB | 100.0 MiB/s (100.0–100.0) | 50.0 MiB/s (50.0–50.0) \
             | not measured (no 9p in the guest kernel) | 2.00× |"
        ));
        assert!(table.contains("| `tar cf /dev/null`, 10000 files | 4.00 s (4.00–4.00) |"));
    }

    #[test]
    fn a_failed_or_incomplete_boot_is_an_error_with_its_output() {
        let failed =
            json!({"status": 1, "exit_ms": 1.0, "lines": [[1.0, "virtiofsd: no such file"]]});
        let partial =
            json!({"status": 0, "exit_ms": 1.0, "lines": [[1.0, "@@vol seq_write 1.00 2.00"]]});
        let mut lab = LabResults::new(vec![
            JobResult {
                id: "vol-katalite".into(),
                samples: vec![partial],
            },
            JobResult {
                id: "vol-virtiofsd".into(),
                samples: vec![failed],
            },
        ]);
        assert!(volumes(&mut lab).is_none());
        assert_eq!(lab.errors.len(), 4, "{:?}", lab.errors);
        assert!(lab.errors[2].starts_with("vol-katalite: sample 1: no `seq_read` figure"));
        assert!(lab.errors[3].contains("exit 1") && lab.errors[3].contains("no such file"));
    }
}
