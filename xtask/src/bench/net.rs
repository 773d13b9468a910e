//! The network comparison: katalite's user network with `-p` beside QEMU's user network
//! (`-netdev user,hostfwd=`) on microvm, both booting the same busybox guest that serves
//! HTTP. The lab runner's `network` job measures; this module plans those jobs and turns
//! their raw samples into the report's `network` section.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::plan::{self, Job, Kind, LabInputs, Settings, BOOT_MEMORY_MIB};
use super::report::LabResults;
use super::stats::{ratio, Stats};

/// The lab's server the guest downloads from, at 10.0.2.2 in the guest (L1's loopback).
pub const SERVER_PORT: u16 = 18080;
/// Host port katalite publishes to the guest's port 80.
pub const KATALITE_PORT: u16 = 18081;
/// Host port QEMU forwards to the guest's port 80.
pub const QEMU_PORT: u16 = 18082;
/// Connections held open for the memory figure.
pub const CONNECTIONS: u32 = 50;
/// Where the lab writes the initramfs QEMU boots (L1's /tmp is a tmpfs).
const INITRD: &str = "/tmp/katalite-bench-net.img";

/// The guest's workload: a blob of `bytes` zeros and a small page under /www, a CGI that
/// downloads the lab server's blob (`wget` exits 0 only with every byte), then busybox
/// `httpd` in the foreground on port 80.
pub fn guest_script(bytes: u64) -> String {
    let cgi = [
        "#!/bin/sh",
        "echo Content-Type: text/plain",
        "echo",
        &format!("/bin/wget -q -O /dev/null http://10.0.2.2:{SERVER_PORT}/blob && echo pulled"),
    ];
    let cgi: Vec<String> = cgi.iter().map(|line| format!("echo '{line}'")).collect();
    format!(
        "set -e; mkdir -p /www/cgi-bin; head -c {bytes} /dev/zero >/www/blob; \
         echo ok >/www/small; {{ {}; }} >/www/cgi-bin/pull; chmod 755 /www/cgi-bin/pull; \
         exec httpd -f -p 80 -h /www",
        cgi.join("; ")
    )
}

/// What the runner's `network` job reads from `job["network"]`.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Host port forwarded to the guest's port 80.
    pub port: u16,
    /// Port of the runner's download server.
    pub server_port: u16,
    /// Bytes per download, both ways.
    pub bytes: u64,
    /// Unrecorded downloads per direction first: the first pays one-time costs (code
    /// paths first run in L1 under TCG, the guest's first fork of httpd and wget).
    pub warmup_transfers: u32,
    /// Recorded downloads per direction.
    pub transfers: u32,
    /// Sequential connect + GET samples.
    pub latency_samples: u32,
    /// Connections held open for the memory figure.
    pub connections: u32,
    /// Wait after the last held connection opened before reading the memory.
    pub settle_ms: u64,
    /// Longest wait for the guest's first answer.
    pub ready_timeout_s: u64,
}

/// The network jobs: writing QEMU's initramfs with the guest script, then one boot per VMM
/// per round, alternating, so load changes skew both alike.
pub fn jobs(inputs: &LabInputs, settings: &Settings) -> Vec<Job> {
    let script = guest_script(settings.net_bytes);
    let command = ["sh", "-c", script.as_str()];
    let memory = format!("{BOOT_MEMORY_MIB}m");
    let write = plan::katalite_run(
        inputs.registry,
        &["--memory", &memory, "--write-initramfs", INITRD],
        &command,
    );
    let mut jobs = vec![Job::new("net-initramfs", Kind::Timed, write, 1)];
    let publish = format!("127.0.0.1:{KATALITE_PORT}:80");
    // The initramfs path, as QEMU boots: the same guest, the time to the first page too.
    let [root_flag, root_path] = plan::INITRAMFS_ROOT;
    // The guest downloads from L1's loopback, which katalite's user network opens only
    // when asked (QEMU's slirp does by default).
    let katalite = plan::katalite_run(
        inputs.registry,
        &[
            "--memory",
            &memory,
            root_flag,
            root_path,
            "-p",
            &publish,
            "--network",
            "user:allow_host_loopback=true",
        ],
        &command,
    );
    let forward = format!("user,id=n,hostfwd=tcp:127.0.0.1:{QEMU_PORT}-:80");
    let qemu = plan::qemu_microvm(inputs.vmlinux, Path::new(INITRD), &forward);
    for _ in 0..settings.net_rounds {
        for (id, argv, port) in [
            ("net-katalite", &katalite, KATALITE_PORT),
            ("net-qemu", &qemu, QEMU_PORT),
        ] {
            let mut job = Job::new(id, Kind::Network, argv.clone(), 1);
            job.network = Some(Probe {
                port,
                server_port: SERVER_PORT,
                bytes: settings.net_bytes,
                warmup_transfers: 1,
                transfers: settings.net_transfers,
                latency_samples: settings.net_latency_samples,
                connections: CONNECTIONS,
                settle_ms: 1000,
                ready_timeout_s: 300,
            });
            jobs.push(job);
        }
    }
    jobs
}

/// One `network` sample as the runner prints it.
#[derive(Debug, Deserialize)]
struct Sample {
    ready_ms: f64,
    latency_ms: Vec<f64>,
    rss_idle_kib: u64,
    /// `[bytes, ms]` per download.
    inbound: Vec<(u64, f64)>,
    outbound: Vec<(u64, f64)>,
    connections_open: u32,
    rss_conns_kib: u64,
    hwm_kib: u64,
}

impl Sample {
    /// A complete sample; a failed one is an error carrying the VMM's first lines.
    fn parse(value: &serde_json::Value) -> Result<Self> {
        if let Some(error) = value["error"].as_str() {
            let output: Vec<&str> = value["output"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|line| line[1].as_str())
                .collect();
            bail!("{error}; the VMM printed:\n{}", output.join("\n"));
        }
        Ok(serde_json::from_value(value.clone())?)
    }
}

/// MiB/s of each `[bytes, ms]` download.
fn rates(downloads: &[(u64, f64)]) -> Vec<f64> {
    downloads
        .iter()
        .map(|&(bytes, ms)| bytes as f64 / f64::from(1u32 << 20) / (ms / 1000.0))
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One VMM's network figures, pooled over its rounds.
#[derive(Debug, Serialize)]
pub struct Side {
    /// VMM start to the first page served through the forwarded port.
    pub first_response_ms: Stats,
    /// Host downloads from the guest's httpd through the forwarded port.
    pub host_to_guest_mib_s: Stats,
    /// The guest's `wget` from the lab's server at 10.0.2.2.
    pub guest_to_host_mib_s: Stats,
    /// Connect + GET of the 3-byte page + close, sequential.
    pub connect_get_ms: Stats,
    /// VmRSS of the VMM process after the latency runs.
    pub rss_idle_mib: Stats,
    /// VmRSS with `connections` downloads open and unread.
    pub rss_connections_mib: Stats,
    /// VmHWM of the VMM process at that point.
    pub hwm_mib: Stats,
    /// Connections held open.
    pub connections: u32,
}

impl Side {
    fn of(samples: &[Sample]) -> Option<Self> {
        let pooled = |pick: &dyn Fn(&Sample) -> Vec<f64>| {
            Stats::of(&samples.iter().flat_map(pick).collect::<Vec<_>>())
        };
        Some(Self {
            first_response_ms: pooled(&|s| vec![s.ready_ms])?,
            host_to_guest_mib_s: pooled(&|s| rates(&s.inbound))?,
            guest_to_host_mib_s: pooled(&|s| rates(&s.outbound))?,
            connect_get_ms: pooled(&|s| s.latency_ms.clone())?,
            rss_idle_mib: pooled(&|s| vec![mib(s.rss_idle_kib)])?,
            rss_connections_mib: pooled(&|s| vec![mib(s.rss_conns_kib)])?,
            hwm_mib: pooled(&|s| vec![mib(s.hwm_kib)])?,
            connections: samples.iter().map(|s| s.connections_open).min()?,
        })
    }

    /// Medians by figure name, for the ratios.
    fn medians(&self) -> [(&'static str, f64); 6] {
        [
            ("first_response", self.first_response_ms.median),
            ("host_to_guest", self.host_to_guest_mib_s.median),
            ("guest_to_host", self.guest_to_host_mib_s.median),
            ("connect_get", self.connect_get_ms.median),
            ("rss_idle", self.rss_idle_mib.median),
            ("rss_connections", self.rss_connections_mib.median),
        ]
    }
}

/// The report's `network` section.
#[derive(Debug, Serialize)]
pub struct Network {
    /// Bytes per download.
    pub bytes: u64,
    /// katalite `run -p`, its built-in user network.
    pub katalite: Option<Side>,
    /// QEMU microvm, `-netdev user` (libslirp) with `hostfwd`.
    pub qemu_user: Option<Side>,
    /// katalite median / QEMU median per figure (above 1: katalite higher).
    pub ratio_median: BTreeMap<String, f64>,
    /// How it was measured.
    pub method: String,
}

/// The network section from the lab's `net-*` jobs; failures go to `lab.errors`.
pub fn network(lab: &mut LabResults, settings: &Settings) -> Option<Network> {
    lab.check_setup("net-initramfs");
    let mut side = |id: &str| Side::of(&lab.each(id, Sample::parse)?);
    let katalite = side("net-katalite");
    let qemu_user = side("net-qemu");
    let mut ratio_median = BTreeMap::new();
    if let (Some(k), Some(q)) = (&katalite, &qemu_user) {
        for ((name, k), (_, q)) in k.medians().into_iter().zip(q.medians()) {
            if let Some(r) = ratio(k, q) {
                ratio_median.insert(name.to_string(), r);
            }
        }
    }
    if katalite.is_none() && qemu_user.is_none() {
        return None;
    }
    Some(Network {
        bytes: settings.net_bytes,
        katalite,
        qemu_user,
        ratio_median,
        method: format!(
            "One boot per VMM and round in the lab, {BOOT_MEMORY_MIB} MiB, 1 vCPU, the same \
             busybox guest (katalite packs it, QEMU boots the initramfs `katalite run \
             --write-initramfs` wrote) running httpd on port 80, forwarded from \
             127.0.0.1:{KATALITE_PORT} (katalite -p) and 127.0.0.1:{QEMU_PORT} (QEMU \
             -netdev user,hostfwd, virtio-net-device). After one unrecorded download each \
             way: host to guest, HTTP/1.0 GET of the guest's blob, from the request sent to \
             the last byte. Guest to host: a CGI runs \
             the guest's wget of the same size from the runner's server at 10.0.2.2:{SERVER_PORT}, \
             timed by that server from the request read to the guest's close. Latency: \
             sequential connect + GET of a 3-byte page until EOF. Memory: VmRSS of the VMM \
             process (guest RAM included) after the latency runs, and 1 s after {CONNECTIONS} \
             connections each started a download they never read"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::JobResult;
    use serde_json::json;
    use std::path::PathBuf;

    fn settings() -> Settings {
        Settings::quick()
    }

    fn lab_jobs() -> Vec<Job> {
        let initrds = [("zstd".to_string(), PathBuf::from("/src/x.img"))];
        let inputs = LabInputs {
            registry: "10.0.3.2:5000",
            vmlinux: Path::new("/src/target/guest/vmlinux"),
            initrds: &initrds,
            images_dir: Path::new("/host/var/tmp/katalite-images"),
        };
        jobs(&inputs, &settings())
    }

    #[test]
    fn both_vmms_boot_the_same_guest_script_and_forward_port_80() {
        let jobs = lab_jobs();
        let script = guest_script(settings().net_bytes);
        let write = &jobs[0].argv;
        assert_eq!(jobs[0].id, "net-initramfs");
        assert!(write.windows(2).any(|w| w == ["--write-initramfs", INITRD]));
        assert_eq!(write.last(), Some(&script));
        let katalite = jobs.iter().find(|j| j.id == "net-katalite").expect("job");
        assert_eq!(katalite.kind, Kind::Network);
        assert!(katalite
            .argv
            .windows(2)
            .any(|w| w == ["--image-root", "initramfs"]));
        assert!(katalite
            .argv
            .windows(2)
            .any(|w| w == ["-p", "127.0.0.1:18081:80"]));
        assert_eq!(katalite.argv.last(), Some(&script));
        let qemu = jobs.iter().find(|j| j.id == "net-qemu").expect("job");
        assert!(qemu.argv.windows(2).any(|w| w == ["-initrd", INITRD]));
        assert!(qemu
            .argv
            .windows(2)
            .any(|w| w == ["-netdev", "user,id=n,hostfwd=tcp:127.0.0.1:18082-:80"]));
        assert!(qemu.argv.iter().any(|a| a == "virtio-net-device,netdev=n"));
        let ports: Vec<u16> = jobs
            .iter()
            .filter_map(|j| Some(j.network.as_ref()?.port))
            .collect();
        // Rounds alternate the VMMs.
        assert_eq!(ports, [KATALITE_PORT, QEMU_PORT, KATALITE_PORT, QEMU_PORT]);
    }

    #[test]
    fn the_guest_script_downloads_from_the_server_and_serves_port_80() {
        let script = guest_script(4096);
        assert!(script.contains("head -c 4096 /dev/zero >/www/blob"));
        assert!(script.contains("wget -q -O /dev/null http://10.0.2.2:18080/blob && echo pulled"));
        assert!(script.ends_with("exec httpd -f -p 80 -h /www"));
        // The CGI lines are single-quoted for echo: none may contain a quote itself.
        assert_eq!(script.matches('\'').count() % 2, 0);
    }

    fn sample(rate_ms: f64) -> serde_json::Value {
        json!({
            "status": null, "ready_ms": 5000.0, "latency_ms": [10.0, 30.0, 20.0],
            "rss_idle_kib": 102400, "inbound": [[4194304, rate_ms], [4194304, rate_ms * 2.0]],
            "outbound": [[4194304, 1000.0]], "connections_open": 50,
            "rss_conns_kib": 112640, "hwm_kib": 120000,
        })
    }

    #[test]
    fn samples_become_rates_and_ratios() {
        let mut lab = LabResults::new(vec![
            JobResult {
                id: "net-initramfs".into(),
                samples: vec![json!({"status": 0, "exit_ms": 1.0, "lines": []})],
            },
            JobResult {
                id: "net-katalite".into(),
                samples: vec![sample(500.0)],
            },
            JobResult {
                id: "net-qemu".into(),
                samples: vec![sample(1000.0)],
            },
        ]);
        let network = network(&mut lab, &settings()).expect("section");
        assert!(lab.errors.is_empty(), "{:?}", lab.errors);
        let katalite = network.katalite.as_ref().expect("katalite");
        assert_eq!(katalite.host_to_guest_mib_s.max, 8.0);
        assert_eq!(katalite.host_to_guest_mib_s.median, 6.0);
        assert_eq!(katalite.guest_to_host_mib_s.median, 4.0);
        assert_eq!(katalite.connect_get_ms.median, 20.0);
        assert_eq!(katalite.rss_connections_mib.median, 110.0);
        assert_eq!(network.ratio_median["host_to_guest"], 2.0);
        assert_eq!(network.ratio_median["connect_get"], 1.0);
    }

    #[test]
    fn a_failed_sample_is_an_error_with_the_vmm_output() {
        let failed = json!({
            "status": 125, "ready_ms": 10.0, "error": "no answer on 127.0.0.1:18082 after 300 s",
            "output": [[1.0, "qemu: could not load kernel"]],
        });
        let mut lab = LabResults::new(vec![
            JobResult {
                id: "net-katalite".into(),
                samples: vec![sample(500.0)],
            },
            JobResult {
                id: "net-qemu".into(),
                samples: vec![failed],
            },
        ]);
        let network = network(&mut lab, &settings()).expect("katalite side");
        assert!(network.qemu_user.is_none() && network.ratio_median.is_empty());
        assert_eq!(lab.errors.len(), 2, "{:?}", lab.errors);
        assert_eq!(lab.errors[0], "net-initramfs: the lab printed no result");
        assert!(lab.errors[1].starts_with("net-qemu: sample 1: no answer"));
        assert!(lab.errors[1].contains("could not load kernel"));
    }
}
