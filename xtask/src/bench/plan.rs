//! What the lab runner (`tests/bench_runner.rs`) executes inside L1: every command as a
//! ready argv, built here so the runner stays a dumb timer and the command lines are tested.

use std::path::Path;

use serde::Serialize;

use super::images;
use super::net::{self, Probe};
use super::throughput;
use super::volumes;

/// Line init prints once it has read its config (`--boot-probe`).
pub const PROBE_INIT: &str = "katalite-init: probe init";
/// Line init prints right before it starts the workload (`--boot-probe`).
pub const PROBE_WORKLOAD: &str = "katalite-init: probe workload";
/// The name katalite gives init's channel port, which QEMU's `virtserialport` gets too.
const CHANNEL_PORT_NAME: &str = guest_init::channel::PORT_NAME;

/// Guest memory of the boot comparison, for katalite (its default) and QEMU alike.
pub const BOOT_MEMORY_MIB: u32 = 512;
/// Guest memory of the memory-overhead runs; its mapping is found by this size.
pub const MEMORY_RUN_MIB: u32 = 256;
/// Guest memory of each parallel VM (katalite's minimum).
pub const PARALLEL_MEMORY_MIB: u32 = 64;

/// katalite's flag for the initramfs root path (its default is the EROFS disk), which
/// the VMM comparisons use so both VMMs boot the same initramfs.
pub const INITRAMFS_ROOT: [&str; 2] = ["--image-root", "initramfs"];

/// The host's Debian QEMU as L1 runs it: through the host's dynamic loader and libraries,
/// shared read-only at `/host` (see `lab.rs`).
const QEMU: [&str; 6] = [
    "/host/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "--library-path",
    "/host/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu",
    "/host/usr/bin/qemu-system-x86_64",
    "-L",
    "/host/usr/share/qemu",
];

/// The guest command line katalite uses (vmm's `BASE_CMDLINE`, then run.rs's quiet one),
/// with `reboot=t`: microvm has no i8042 for `reboot=k`, and the triple fault ends QEMU
/// under `-no-reboot`. microvm appends the `virtio_mmio.device=` entries itself.
const QEMU_GUEST_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 reboot=t panic=-1 noirqdebug \
                                  rdinit=/.katalite/init quiet loglevel=3";

/// How many samples of what.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Boots per VMM for the comparison.
    pub boot_samples: u32,
    /// QEMU boots per extra compression variant.
    pub variant_samples: u32,
    /// Memory-overhead runs.
    pub memory_samples: u32,
    /// Throughput runs, and bytes per run.
    pub throughput_samples: u32,
    /// Bytes written by the throughput workload.
    pub throughput_bytes: u64,
    /// VM counts started at once.
    pub parallel_counts: Vec<u32>,
    /// Runs per VM count.
    pub parallel_samples: u32,
    /// Bytes per network download, each way.
    pub net_bytes: u64,
    /// Recorded network downloads per direction and boot (after one warm-up each).
    pub net_transfers: u32,
    /// Connect + GET samples per boot.
    pub net_latency_samples: u32,
    /// Boots per VMM for the network comparison.
    pub net_rounds: u32,
    /// Recorded runs per image and root path in the `images` section (after one warm-up).
    pub image_samples: u32,
    /// Runs of the large image reading its whole file, for the VMM's memory.
    pub large_rss_samples: u32,
    /// Only the network comparison (`bench --network-only`).
    pub network_only: bool,
    /// Boots per VMM for the volume comparison.
    pub volume_rounds: u32,
    /// Only the volume comparison (`bench --volumes-only`).
    pub volumes_only: bool,
    /// Only stdout throughput and the network jobs (`bench --stdout-only`).
    pub stdout_only: bool,
    /// No volume jobs (`bench --skip-volumes`).
    pub skip_volumes: bool,
}

impl Settings {
    /// A few minutes in the lab.
    pub fn quick() -> Self {
        Self {
            boot_samples: 5,
            variant_samples: 3,
            memory_samples: 3,
            throughput_samples: 3,
            throughput_bytes: 8 << 20,
            parallel_counts: vec![1, 4, 16],
            parallel_samples: 1,
            net_bytes: 8 << 20,
            net_transfers: 4,
            net_latency_samples: 30,
            net_rounds: 2,
            image_samples: 3,
            large_rss_samples: 1,
            network_only: false,
            volume_rounds: 2,
            volumes_only: false,
            stdout_only: false,
            skip_volumes: false,
        }
    }

    /// More samples for steadier medians.
    pub fn full() -> Self {
        Self {
            boot_samples: 20,
            variant_samples: 10,
            memory_samples: 5,
            throughput_samples: 5,
            throughput_bytes: 32 << 20,
            parallel_counts: vec![1, 4, 16],
            parallel_samples: 3,
            net_bytes: 16 << 20,
            net_transfers: 6,
            net_latency_samples: 50,
            net_rounds: 3,
            image_samples: 5,
            large_rss_samples: 3,
            network_only: false,
            volume_rounds: 3,
            volumes_only: false,
            stdout_only: false,
            skip_volumes: false,
        }
    }
}

/// Paths and addresses as L1 sees them.
pub struct LabInputs<'a> {
    /// The test registry (`cargo xtask registry`), e.g. `10.0.3.2:5000`.
    pub registry: &'a str,
    /// The guest kernel QEMU boots (katalite embeds the same file).
    pub vmlinux: &'a Path,
    /// Busybox initramfs files written by `--write-initramfs`, per compression; the first
    /// is the one katalite boots (zstd).
    pub initrds: &'a [(String, std::path::PathBuf)],
    /// The OCI layouts of `cargo xtask images` (`busybox/`, `nginx/`, `large/`...).
    pub images_dir: &'a Path,
}

/// What the runner does with a job's argv.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Timestamp every output line and the exit.
    Timed,
    /// Like `Timed`, but stdout is only counted.
    Throughput,
    /// Read the process's memory figures after a trigger line.
    Memory,
    /// Start `count` copies at once; wall time until all exited.
    Parallel,
    /// Boot a guest serving HTTP and measure through its forwarded port (`bench/net.rs`).
    Network,
    /// Find the smallest of `candidates_mib` with which `argv` exits 0 (`{memory}` in argv
    /// is replaced by each), by bisection from the largest.
    #[serde(rename = "min_memory")]
    MinMemory,
}

/// One job of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Names the result.
    pub id: String,
    /// How to run it.
    pub kind: Kind,
    /// The command.
    pub argv: Vec<String>,
    /// Unrecorded runs first (cold caches, first loads over 9p).
    pub warmup: u32,
    /// Recorded runs.
    pub repeat: u32,
    /// `Memory`: the stderr line to wait for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// `Memory`: how long after the trigger to read the figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settle_ms: Option<u64>,
    /// `Parallel`: how many copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// `Network`: the port, sizes and sample counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Probe>,
    /// `MinMemory`: the `--memory` sizes to try, in MiB, ascending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates_mib: Option<Vec<u32>>,
    /// Longest one process may run before it is killed (the runner's default: 600 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

impl Job {
    /// A job run `repeat` times without warm-up.
    pub fn new(id: impl Into<String>, kind: Kind, argv: Vec<String>, repeat: u32) -> Self {
        Self {
            id: id.into(),
            kind,
            argv,
            warmup: 0,
            repeat,
            trigger: None,
            settle_ms: None,
            count: None,
            network: None,
            candidates_mib: None,
            timeout_s: None,
        }
    }
}

/// The runner's input, serialized as JSON.
#[derive(Debug, Serialize)]
pub struct Plan {
    /// In order.
    pub jobs: Vec<Job>,
}

/// The image every lab run boots.
pub fn image(registry: &str) -> String {
    format!("{registry}/library/busybox")
}

/// `katalite run` of the cached busybox image with `options`, then `command`.
pub fn katalite_run(registry: &str, options: &[&str], command: &[&str]) -> Vec<String> {
    let mut with_policy = vec!["--pull", "never"];
    with_policy.extend_from_slice(options);
    katalite_run_image(&image(registry), &with_policy, command)
}

/// `katalite run -q` of `image` with `options`, then `command`.
pub fn katalite_run_image(image: &str, options: &[&str], command: &[&str]) -> Vec<String> {
    let mut argv = strings(&["katalite", "run", "-q"]);
    argv.extend(strings(options));
    argv.push(image.to_string());
    argv.extend(strings(command));
    argv
}

/// A host program as L1 runs it: through the host's loader and libraries at `/host`.
pub fn host_program(path: &str) -> Vec<String> {
    let mut argv = strings(&QEMU[..3]);
    argv.push(path.to_string());
    argv
}

/// Where QEMU's guest finds init's channel, and where the channel and the serial console
/// (kernel log, init's lines) go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuChannel {
    /// A generic port named `katalite.channel`, as katalite gives init, its frames
    /// discarded, and the serial console on stdout. The chardev is the file `/dev/null`,
    /// not `null`: QEMU connects a port (PORT_OPEN) only once its chardev reports itself
    /// open, which `null` never does, and init's writes would wait for it.
    Discard,
    /// The frames on stdout for the runner to count, the serial console on stderr:
    /// through a generic port (`virtserialport`, init's `/dev/vport*`), or with `console`
    /// through a console port (`virtconsole`, where init falls back to `/dev/hvc0`).
    Count { console: bool },
}

/// QEMU `-M microvm` booting `vmlinux` with `initrd`: the same memory and vCPU count as
/// katalite, the serial console on stdout, init's channel on a virtio-serial port as
/// katalite gives it ([`QemuChannel::Discard`]), and a virtio-net NIC on QEMU's user
/// network `netdev` (`user,id=n[,hostfwd=...]`) as katalite's default network gives the
/// guest: the initramfs's run config has init configure eth0, which fails without a NIC.
pub fn qemu_microvm(vmlinux: &Path, initrd: &Path, netdev: &str) -> Vec<String> {
    qemu_microvm_with(vmlinux, initrd, netdev, QemuChannel::Discard)
}

/// [`qemu_microvm`] with the channel and serial console as `channel` says.
pub fn qemu_microvm_with(
    vmlinux: &Path,
    initrd: &Path,
    netdev: &str,
    channel: QemuChannel,
) -> Vec<String> {
    let (serial, chardev, port) = match channel {
        QemuChannel::Discard => ("stdio", "file,id=channel,path=/dev/null", false),
        QemuChannel::Count { console } => (
            "file:/dev/stderr",
            "file,id=channel,path=/dev/stdout",
            console,
        ),
    };
    let device = if port {
        "virtconsole,chardev=channel".to_string()
    } else {
        format!("virtserialport,chardev=channel,name={CHANNEL_PORT_NAME}")
    };
    let mut argv = strings(&QEMU);
    argv.extend(strings(&[
        // Without ACPI (our kernel has none) microvm puts its virtio-mmio devices on the
        // kernel command line itself; with it, the kernel would not find the console.
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        &BOOT_MEMORY_MIB.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        serial,
        "-no-reboot",
        "-chardev",
        chardev,
        "-device",
        "virtio-serial-device",
        "-device",
        &device,
        "-netdev",
        netdev,
        "-device",
        "virtio-net-device,netdev=n",
        "-append",
        QEMU_GUEST_CMDLINE,
    ]));
    argv.extend(["-kernel".into(), vmlinux.to_string_lossy().into_owned()]);
    argv.extend(["-initrd".into(), initrd.to_string_lossy().into_owned()]);
    argv
}

/// Every lab job, in the order they run.
pub fn plan(inputs: &LabInputs, settings: &Settings) -> Plan {
    let registry = inputs.registry;
    let mut pull = strings(&["katalite", "pull", "-q", "--insecure-registry", registry]);
    pull.push(image(registry));
    let mut jobs = vec![Job::new("pull", Kind::Timed, pull, 1)];
    if settings.stdout_only {
        jobs.extend(throughput::jobs(inputs, settings));
        jobs.extend(net::jobs(inputs, settings));
        return Plan { jobs };
    }
    if !settings.network_only && !settings.volumes_only {
        jobs.extend(vm_jobs(inputs, settings));
        jobs.extend(images::jobs(inputs, settings));
    }
    if !settings.volumes_only {
        jobs.extend(net::jobs(inputs, settings));
    }
    if !settings.network_only && !settings.skip_volumes {
        jobs.extend(volumes::jobs(inputs, settings));
    }
    Plan { jobs }
}

/// Boot comparison, memory, stdout throughput and parallel starts.
fn vm_jobs(inputs: &LabInputs, settings: &Settings) -> Vec<Job> {
    let registry = inputs.registry;
    let mut jobs = Vec::new();
    let probe = ["--boot-probe"];
    let [root_flag, root_path] = INITRAMFS_ROOT;
    // The comparison boots the same initramfs in both VMMs, so katalite takes its
    // initramfs path rather than its default EROFS disk (see the `images` section).
    jobs.extend(boot_rounds(
        inputs,
        settings,
        &katalite_run(registry, &[probe[0], root_flag, root_path], &["true"]),
    ));
    let memory = format!("{MEMORY_RUN_MIB}m");
    let mut job = Job::new(
        "memory",
        Kind::Memory,
        katalite_run(
            registry,
            &["--boot-probe", "--memory", &memory],
            &["sleep", "2"],
        ),
        settings.memory_samples,
    );
    job.trigger = Some(PROBE_WORKLOAD.into());
    job.settle_ms = Some(500);
    jobs.push(job);

    jobs.extend(throughput::jobs(inputs, settings));

    let memory = format!("{PARALLEL_MEMORY_MIB}m");
    for &count in &settings.parallel_counts {
        let mut job = Job::new(
            format!("parallel-{count}"),
            Kind::Parallel,
            katalite_run(registry, &["--memory", &memory], &["true"]),
            settings.parallel_samples,
        );
        job.count = Some(count);
        jobs.push(job);
    }
    jobs
}

/// The boot comparison as rounds of one run per VMM and compression, so a change in the
/// host's load during the bench skews every contender alike. The first round of katalite
/// and of QEMU is a warm-up: katalite packs the image into L1's cache, and QEMU's libraries
/// and the files are first read over 9p. The runner reports each round as its own job;
/// results with the same id are merged.
fn boot_rounds(inputs: &LabInputs, settings: &Settings, katalite: &[String]) -> Vec<Job> {
    let mut jobs = Vec::new();
    let rounds = settings.boot_samples.max(settings.variant_samples);
    for round in 0..rounds {
        let warmup = u32::from(round == 0);
        if round < settings.boot_samples {
            let mut job = Job::new("boot-katalite", Kind::Timed, katalite.to_vec(), 1);
            job.warmup = warmup;
            jobs.push(job);
        }
        for (index, (variant, initrd)) in inputs.initrds.iter().enumerate() {
            let samples = if index == 0 {
                settings.boot_samples
            } else {
                settings.variant_samples
            };
            if round < samples {
                let argv = qemu_microvm(inputs.vmlinux, initrd, "user,id=n");
                let mut job = Job::new(format!("boot-qemu-{variant}"), Kind::Timed, argv, 1);
                job.warmup = warmup;
                jobs.push(job);
            }
        }
    }
    jobs
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn plan_for(settings: &Settings) -> Plan {
        let initrds = [
            (
                "zstd".to_string(),
                PathBuf::from("/src/target/bench/zstd.img"),
            ),
            (
                "gzip".to_string(),
                PathBuf::from("/src/target/bench/gzip.img"),
            ),
        ];
        let inputs = LabInputs {
            registry: "10.0.3.2:5000",
            vmlinux: Path::new("/src/target/guest/vmlinux"),
            initrds: &initrds,
            images_dir: Path::new("/host/var/tmp/katalite-images"),
        };
        plan(&inputs, settings)
    }

    #[test]
    fn katalite_and_qemu_boot_the_same_kernel_memory_and_probe() {
        let plan = plan_for(&Settings::quick());
        let job = |id: &str| {
            plan.jobs
                .iter()
                .find(|job| job.id == id)
                .unwrap_or_else(|| panic!("no job {id}"))
        };
        let runs = |id: &str| -> (u32, u32) {
            let jobs = plan.jobs.iter().filter(|job| job.id == id);
            jobs.fold((0, 0), |(w, r), job| (w + job.warmup, r + job.repeat))
        };
        let katalite = job("boot-katalite");
        assert_eq!(
            katalite.argv.join(" "),
            "katalite run -q --pull never --boot-probe --image-root initramfs \
             10.0.3.2:5000/library/busybox true"
        );
        assert_eq!(runs("boot-katalite"), (1, 5));
        let qemu = job("boot-qemu-zstd");
        let after = |flag: &str| {
            let at = qemu.argv.iter().position(|a| a == flag);
            at.and_then(|i| qemu.argv.get(i + 1)).map(String::as_str)
        };
        assert_eq!(after("-M"), Some("microvm,acpi=off"));
        assert_eq!(after("-m"), Some("512"));
        assert_eq!(after("-kernel"), Some("/src/target/guest/vmlinux"));
        assert_eq!(after("-initrd"), Some("/src/target/bench/zstd.img"));
        assert!(qemu.argv.iter().any(|a| a == "-no-reboot"));
        // init gets the kind of channel katalite gives it: a generic port of that name,
        // connected (a file chardev, never `null`), its frames discarded.
        assert_eq!(after("-serial"), Some("stdio"));
        assert_eq!(after("-chardev"), Some("file,id=channel,path=/dev/null"));
        assert!(qemu
            .argv
            .iter()
            .any(|a| a == "virtserialport,chardev=channel,name=katalite.channel"));
        // katalite's default user network has a NIC, and init configures eth0 on both.
        assert_eq!(after("-netdev"), Some("user,id=n"));
        assert!(qemu.argv.iter().any(|a| a == "virtio-net-device,netdev=n"));
        assert!(after("-append")
            .is_some_and(|c| c.contains("reboot=t") && c.contains("rdinit=/.katalite/init")));
        assert_eq!(runs("boot-qemu-zstd"), (1, 5));
        assert_eq!(runs("boot-qemu-gzip"), (1, 3));
        // Rounds alternate the contenders.
        let order: Vec<&str> = plan.jobs.iter().map(|job| job.id.as_str()).collect();
        assert_eq!(
            order[1..5],
            [
                "boot-katalite",
                "boot-qemu-zstd",
                "boot-qemu-gzip",
                "boot-katalite"
            ]
        );
    }

    #[test]
    fn memory_parallel_and_throughput_jobs_are_sized() {
        let plan = plan_for(&Settings::full());
        let memory = plan
            .jobs
            .iter()
            .find(|j| j.kind == Kind::Memory)
            .expect("memory");
        assert!(memory.argv.windows(2).any(|w| w == ["--memory", "256m"]));
        assert_eq!(memory.trigger.as_deref(), Some(PROBE_WORKLOAD));
        let counts: Vec<u32> = plan
            .jobs
            .iter()
            .filter(|j| j.kind == Kind::Parallel)
            .filter_map(|j| j.count)
            .collect();
        assert_eq!(counts, [1, 4, 16]);
        let throughput = plan.jobs.iter().find(|j| j.kind == Kind::Throughput);
        let argv = &throughput.expect("throughput").argv;
        assert_eq!(
            argv[argv.len() - 4..],
            ["dd", "if=/dev/zero", "bs=65536", "count=512"]
        );
    }

    #[test]
    fn network_only_keeps_the_pull_and_the_network_jobs() {
        let ids = |settings: &Settings| -> Vec<String> {
            let plan = plan_for(settings);
            plan.jobs.into_iter().map(|job| job.id).collect()
        };
        let mut settings = Settings::quick();
        assert!(ids(&settings).iter().any(|id| id == "boot-katalite"));
        assert_eq!(
            ids(&settings).last().map(String::as_str),
            Some("vol-virtiofsd")
        );
        settings.volumes_only = true;
        let volumes = ids(&settings);
        assert_eq!(volumes[..3], ["pull", "vol-setup", "vol-initramfs"]);
        assert!(volumes[3..].iter().all(|id| id.starts_with("vol-")));
        settings.volumes_only = false;
        settings.network_only = true;
        assert_eq!(
            ids(&settings),
            [
                "pull",
                "net-initramfs",
                "net-katalite",
                "net-qemu",
                "net-katalite",
                "net-qemu"
            ]
        );
        let network = plan_for(&settings).jobs.pop().and_then(|job| job.network);
        let json = serde_json::to_value(network).expect("json");
        assert_eq!(json["port"], 18082);
        assert_eq!(json["bytes"], 8 << 20);
        assert_eq!(json["warmup_transfers"], 1);
        assert_eq!(json["connections"], 50);
    }

    #[test]
    fn the_plan_serializes_as_the_runner_reads_it() {
        let json = serde_json::to_value(plan_for(&Settings::quick())).expect("json");
        let first = &json["jobs"][0];
        assert_eq!(first["id"], "pull");
        assert_eq!(first["kind"], "timed");
        assert!(first.get("count").is_none());
        assert!(first.get("timeout_s").is_none(), "the runner's default");
        let parallel = json["jobs"]
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["kind"] == "parallel"))
            .expect("parallel job");
        assert_eq!(parallel["count"], 1);
    }
}
