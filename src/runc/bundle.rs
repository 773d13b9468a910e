//! An OCI bundle's `config.json`, as the engines write it (runtime-spec 1.x), made into
//! one [`ContainerSpec`].
//!
//! Only the fields katalite acts on are read (serde skips the rest), with our own small
//! types instead of oci-spec's: its runtime types would be the largest deserializer in
//! the binary, which carries the guest kernel within an 8 MB budget.
//!
//! What a VM makes moot is dropped on purpose: the namespaces (the VM is every one of
//! them), cgroups, capabilities, seccomp, rlimits, and the kernel file systems the
//! engines mount (`/proc`, `/sys`, `/dev`...: the guest's init mounts its own).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use guest_init::TmpfsMount;
use serde::{Deserialize, Serialize};

use crate::network::NetworkMode;
use crate::spec::{
    ContainerSpec, LogDriver, NetworkSpec, ProcessSpec, Resources, RootDelivery, RootSource,
    RootSpec, StdioSpec, DEFAULT_MEMORY_MIB,
};
use crate::volumes::{MountSpec, SpecSource};

/// The largest `config.json` read: real ones are a few KiB.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// The engines decide when a stop becomes a kill (`docker stop -t`): katalite never
/// cuts a SIGTERM short on its own in this mode.
const ENGINE_STOP_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// The parts of `config.json` katalite reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// The spec version the engine wrote.
    pub oci_version: String,
    /// The root filesystem.
    pub root: Option<Root>,
    /// The container's first process.
    pub process: Option<Process>,
    /// The container's hostname.
    pub hostname: Option<String>,
    /// Mounts in order.
    pub mounts: Vec<Mount>,
    /// Hooks by phase.
    pub hooks: Hooks,
    /// Linux-specific settings.
    pub linux: Option<Linux>,
    /// Free-form labels, reported back by `state`.
    pub annotations: BTreeMap<String, String>,
}

/// `root`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Root {
    /// Relative to the bundle, or absolute.
    pub path: PathBuf,
    /// Mounted read-only.
    pub readonly: bool,
}

/// `process` (also the whole of `exec --process FILE`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Process {
    /// A pseudo-terminal.
    pub terminal: bool,
    /// Who runs it.
    pub user: User,
    /// Program and arguments.
    pub args: Vec<String>,
    /// `NAME=value` entries: the whole environment.
    pub env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
}

/// `process.user`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl Process {
    /// `uid:gid`, as katalite's `--user` takes it.
    pub fn user_spec(&self) -> String {
        format!("{}:{}", self.user.uid, self.user.gid)
    }
}

/// One entry of `mounts`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Mount {
    /// Path in the container.
    pub destination: String,
    /// File system type (`bind`, `tmpfs`, `proc`...); bind mounts may leave it out.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Host path for binds.
    pub source: Option<String>,
    /// Mount options (`rbind`, `ro`, `size=65536k`...).
    pub options: Vec<String>,
}

/// `hooks`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Hooks {
    /// Run by `create` once the container exists (deprecated, still used by dockerd).
    pub prestart: Vec<Hook>,
    /// Run by `create` in the runtime's namespaces.
    pub create_runtime: Vec<Hook>,
    /// Run by `start` after the process started.
    pub poststart: Vec<Hook>,
    /// Run by `delete`.
    pub poststop: Vec<Hook>,
}

/// One hook.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Hook {
    /// Absolute program path.
    pub path: PathBuf,
    /// Its argv, argv[0] included.
    pub args: Vec<String>,
    /// Its whole environment.
    pub env: Vec<String>,
    /// Seconds before it is killed.
    pub timeout: Option<u64>,
}

/// `linux`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Linux {
    /// Namespaces asked for (a `path` joins an existing one).
    pub namespaces: Vec<Namespace>,
    /// cgroup limits: the VM's size comes from them.
    pub resources: Option<LinuxResources>,
}

/// One entry of `linux.namespaces`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Namespace {
    /// `network`, `pid`, `mount`...
    #[serde(rename = "type")]
    pub kind: String,
    /// An existing namespace to join.
    pub path: Option<PathBuf>,
}

/// `linux.resources`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LinuxResources {
    /// Memory limits.
    pub memory: Option<MemoryLimits>,
    /// CPU limits.
    pub cpu: Option<CpuLimits>,
}

/// `linux.resources.memory`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MemoryLimits {
    /// Bytes; absent or negative: unlimited.
    pub limit: Option<i64>,
}

/// `linux.resources.cpu`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CpuLimits {
    /// Microseconds per period; absent or negative: unlimited.
    pub quota: Option<i64>,
    /// Period in microseconds.
    pub period: Option<u64>,
}

/// The network namespace the container's process is to be in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNamespace {
    /// The runtime's own (no `network` entry in `linux.namespaces`).
    Host,
    /// A new, empty one (dockerd, and CNI through it, set it up from a prestart hook).
    New,
    /// An existing one, by path (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    Join(PathBuf),
}

impl Config {
    /// What `linux.namespaces` says about the network.
    pub fn net_namespace(&self) -> NetNamespace {
        let entry = self
            .linux
            .iter()
            .flat_map(|linux| &linux.namespaces)
            .find(|namespace| namespace.kind == "network");
        match entry {
            None => NetNamespace::Host,
            Some(Namespace {
                path: Some(path), ..
            }) if !path.as_os_str().is_empty() => NetNamespace::Join(path.clone()),
            Some(_) => NetNamespace::New,
        }
    }
}

/// Reads `BUNDLE/config.json`.
pub fn read_config(bundle: &Path) -> Result<Config> {
    read_json(&bundle.join("config.json"))
}

/// Reads a JSON document of at most [`MAX_CONFIG_BYTES`] (a config or a process file).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "invalid {}: larger than {MAX_CONFIG_BYTES} bytes",
            path.display()
        );
    }
    serde_json::from_slice(&bytes).with_context(|| format!("invalid {}", path.display()))
}

/// The container `config` describes, for the bundle at `bundle` (absolute) and the
/// container `id`.
pub fn container_spec(id: &str, bundle: &Path, config: &Config) -> Result<ContainerSpec, String> {
    let root = config.root.as_ref().ok_or("no root in config.json")?;
    let process = config.process.as_ref().ok_or("no process in config.json")?;
    if process.args.is_empty() {
        return Err("process.args in config.json is empty".into());
    }
    let rootfs = bundle.join(&root.path);
    let mut mounts = Vec::new();
    for mount in &config.mounts {
        if let Some(spec) = mount_spec(mount)? {
            mounts.push(spec);
        }
    }
    Ok(ContainerSpec {
        // katalite's own commands (`ps`, `exec`) know the container by the engine's id.
        name: Some(id.to_string()),
        root: RootSpec {
            source: RootSource::Rootfs { path: rootfs },
            read_only: root.readonly,
            delivery: RootDelivery::Disk,
        },
        process: ProcessSpec {
            entrypoint: Some(Vec::new()),
            command: process.args.clone(),
            env: process.env.clone(),
            working_dir: Some(process.cwd.clone()).filter(|cwd| !cwd.is_empty()),
            user: Some(process.user_spec()),
            hostname: config.hostname.clone().filter(|name| !name.is_empty()),
        },
        resources: resources(config.linux.as_ref().and_then(|l| l.resources.as_ref())),
        mounts,
        network: NetworkSpec {
            mode: match config.net_namespace() {
                // The runtime's own namespace is the host's: never taken over.
                NetNamespace::Host => NetworkMode::None,
                NetNamespace::New | NetNamespace::Join(_) => NetworkMode::Engine {
                    resolv_conf: engine_resolv_conf(config),
                },
            },
            publish: Vec::new(),
        },
        stdio: StdioSpec {
            tty: process.terminal,
            // The engine hands over stdin as it wants it (a FIFO, or /dev/null).
            interactive: true,
        },
        auto_remove: true,
        detach: false,
        stop_timeout_secs: ENGINE_STOP_TIMEOUT_SECS,
        log_driver: LogDriver::None,
        ..ContainerSpec::default()
    })
}

/// The host file the engine bind-mounts as the container's /etc/resolv.conf.
fn engine_resolv_conf(config: &Config) -> Option<PathBuf> {
    config
        .mounts
        .iter()
        .find(|mount| mount.destination == "/etc/resolv.conf")
        .and_then(|mount| mount.source.as_ref())
        .filter(|source| source.starts_with('/'))
        .map(PathBuf::from)
}

/// Kernel file systems the engines mount for runc; the guest's init mounts its own.
const GUEST_OWNED_TYPES: [&str; 6] = ["proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"];
const GUEST_OWNED_PATHS: [&str; 5] = ["/proc", "/dev", "/sys", "/dev/pts", "/dev/shm"];
/// Files dockerd and podman bind-mount from their own directories: the guest writes its
/// own resolv.conf, hostname and hosts (file bind mounts do not reach the guest yet), and
/// podman's marker says "in a container", which a VM's workload is not told either.
const ENGINE_FILES: [&str; 4] = [
    "/etc/resolv.conf",
    "/etc/hostname",
    "/etc/hosts",
    "/run/.containerenv",
];

/// One OCI mount as katalite's, `None` for what the guest provides itself.
fn mount_spec(mount: &Mount) -> Result<Option<MountSpec>, String> {
    let kind = mount.kind.as_deref().unwrap_or("");
    let target = mount.destination.trim_end_matches('/');
    let target = if target.is_empty() { "/" } else { target };
    if GUEST_OWNED_TYPES.contains(&kind)
        || GUEST_OWNED_PATHS.contains(&target)
        || target.starts_with("/sys/")
        || target.starts_with("/proc/")
        || ENGINE_FILES.contains(&target)
    {
        return Ok(None);
    }
    let has = |option: &str| mount.options.iter().any(|o| o == option);
    let read_only = has("ro");
    if kind == "bind" || has("bind") || has("rbind") {
        let source = mount
            .source
            .as_deref()
            .filter(|s| s.starts_with('/'))
            .ok_or_else(|| format!("bind mount {target}: the source must be an absolute path"))?;
        if Path::new(source).is_file() {
            return Err(format!(
                "bind-mounting a file is not supported yet: {source} on {target}"
            ));
        }
        return Ok(Some(MountSpec {
            source: SpecSource::Bind {
                path: source.into(),
                create: false,
            },
            target: target.to_string(),
            read_only,
        }));
    }
    if kind == "tmpfs" {
        let mut tmpfs = TmpfsMount {
            exec: !has("noexec"),
            ..TmpfsMount::default()
        };
        for option in &mount.options {
            if let Some(size) = option.strip_prefix("size=") {
                tmpfs.size_bytes = Some(crate::volumes::parse::parse_size(size)?);
            } else if let Some(mode) = option.strip_prefix("mode=") {
                let mode = u32::from_str_radix(mode, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| format!("tmpfs {target}: invalid mode={mode}"))?;
                tmpfs.mode = Some(mode);
            }
        }
        return Ok(Some(MountSpec {
            source: SpecSource::Tmpfs(tmpfs),
            target: target.to_string(),
            read_only,
        }));
    }
    Err(format!(
        "mount {target} of type {kind:?} is not supported in a VM"
    ))
}

/// The VM's size from the cgroup limits: the memory limit (at least the default when
/// none is set) and the CPU quota rounded up to whole vCPUs.
fn resources(limits: Option<&LinuxResources>) -> Resources {
    let mut resources = Resources::default();
    let Some(limits) = limits else {
        return resources;
    };
    if let Some(bytes) = limits.memory.as_ref().and_then(|m| m.limit) {
        if bytes > 0 {
            let mib = (bytes as u64).div_ceil(1 << 20);
            resources.memory_mib = mib.max(crate::guest_root::BASE_MEMORY_MIB);
        }
    } else {
        resources.memory_mib = DEFAULT_MEMORY_MIB;
    }
    if let Some(cpu) = &limits.cpu {
        if let (Some(quota), Some(period)) = (cpu.quota, cpu.period) {
            if quota > 0 && period > 0 {
                let cpus = (quota as u64).div_ceil(period);
                resources.cpus = u8::try_from(cpus)
                    .unwrap_or(u8::MAX)
                    .clamp(1, vmm::MAX_VCPUS);
            }
        }
    }
    resources
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from what dockerd 20.10 writes for `docker run --rm -v /srv:/data:ro
    /// --tmpfs /run:size=64k -m 300m --cpus 1.5 -h web IMG sh -c 'exit 3'`.
    const DOCKER_CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {
            "user": {"uid": 1000, "gid": 100, "additionalGids": [10]},
            "args": ["sh", "-c", "exit 3"],
            "env": ["PATH=/usr/bin:/bin", "HOSTNAME=web"],
            "cwd": "/",
            "capabilities": {"bounding": ["CAP_CHOWN"]},
            "oomScoreAdj": 0
        },
        "root": {"path": "/var/lib/docker/overlay2/abc/merged", "readonly": true},
        "hostname": "web",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
            {"destination": "/dev/shm", "type": "bind", "source": "/var/lib/docker/shm",
             "options": ["rbind", "rprivate"]},
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": "/var/lib/docker/containers/abc/resolv.conf", "options": ["rbind"]},
            {"destination": "/data", "type": "bind", "source": "/srv",
             "options": ["rbind", "ro", "rprivate"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
             "options": ["size=64k", "noexec", "mode=1777"]}
        ],
        "hooks": {"prestart": [{"path": "/usr/bin/dockerd",
                                "args": ["libnetwork-setkey", "-exec-root=/var/run/docker", "abc"]}]},
        "linux": {
            "resources": {"memory": {"limit": 314572800}, "cpu": {"quota": 150000, "period": 100000}},
            "namespaces": [{"type": "mount"}, {"type": "network"}, {"type": "pid"}],
            "maskedPaths": ["/proc/kcore"]
        }
    }"#;

    fn parse(json: &str) -> Config {
        serde_json::from_str(json).expect("config")
    }

    #[test]
    fn a_docker_config_becomes_a_container() {
        let config = parse(DOCKER_CONFIG);
        let spec = container_spec("abc", Path::new("/b"), &config).expect("spec");
        assert_eq!(spec.name.as_deref(), Some("abc"));
        assert_eq!(
            spec.root.source,
            RootSource::Rootfs {
                path: "/var/lib/docker/overlay2/abc/merged".into()
            }
        );
        assert!(spec.root.read_only);
        assert_eq!(spec.process.entrypoint, Some(Vec::new()));
        assert_eq!(spec.process.command, ["sh", "-c", "exit 3"]);
        assert_eq!(spec.process.env, ["PATH=/usr/bin:/bin", "HOSTNAME=web"]);
        assert_eq!(spec.process.user.as_deref(), Some("1000:100"));
        assert_eq!(spec.process.working_dir.as_deref(), Some("/"));
        assert_eq!(spec.process.hostname.as_deref(), Some("web"));
        assert_eq!(spec.resources.memory_mib, 300);
        assert_eq!(spec.resources.cpus, 2);
        assert_eq!(
            spec.network.mode,
            NetworkMode::Engine {
                resolv_conf: Some("/var/lib/docker/containers/abc/resolv.conf".into())
            }
        );
        assert!(spec.stdio.interactive && !spec.stdio.tty);
        assert!(spec.auto_remove && !spec.detach);
        assert_eq!(spec.log_driver, LogDriver::None);
        // Only the user's mounts remain; the guest makes /proc, /dev, /sys and the files.
        let targets: Vec<&str> = spec.mounts.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["/data", "/run"]);
        assert_eq!(
            spec.mounts[0].source,
            SpecSource::Bind {
                path: "/srv".into(),
                create: false
            }
        );
        assert!(spec.mounts[0].read_only);
        let SpecSource::Tmpfs(tmpfs) = &spec.mounts[1].source else {
            panic!("not a tmpfs");
        };
        assert_eq!(tmpfs.size_bytes, Some(64 << 10));
        assert_eq!(tmpfs.mode, Some(0o1777));
        assert!(!tmpfs.exec);
        assert_eq!(config.hooks.prestart[0].args[0], "libnetwork-setkey");
    }

    #[test]
    fn the_network_namespace_is_the_hosts_a_new_one_or_a_named_one() {
        assert_eq!(parse(DOCKER_CONFIG).net_namespace(), NetNamespace::New);
        assert_eq!(parse("{}").net_namespace(), NetNamespace::Host);
        let joined = parse(
            r#"{"linux": {"namespaces": [{"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"}]}}"#,
        );
        assert_eq!(
            joined.net_namespace(),
            NetNamespace::Join("/var/run/netns/cni-1".into())
        );
    }

    #[test]
    fn a_relative_root_is_inside_the_bundle_and_limits_have_floors() {
        let config = parse(
            r#"{"root": {"path": "rootfs"}, "process": {"args": ["true"], "terminal": true},
                "linux": {"resources": {"memory": {"limit": 1048576}}}}"#,
        );
        let spec = container_spec("c1", Path::new("/run/b"), &config).expect("spec");
        assert_eq!(
            spec.root.source,
            RootSource::Rootfs {
                path: "/run/b/rootfs".into()
            }
        );
        assert!(spec.stdio.tty);
        assert_eq!(
            spec.resources.memory_mib,
            crate::guest_root::BASE_MEMORY_MIB
        );
        assert_eq!(spec.resources.cpus, 1);
        assert_eq!(spec.process.hostname, None);
    }

    #[test]
    fn what_cannot_run_is_refused() {
        for (json, why) in [
            (r#"{"process": {"args": ["true"]}}"#, "no root"),
            (r#"{"root": {"path": "r"}}"#, "no process"),
            (
                r#"{"root": {"path": "r"}, "process": {"args": []}}"#,
                "empty",
            ),
            (
                r#"{"root": {"path": "r"}, "process": {"args": ["true"]},
                    "mounts": [{"destination": "/x", "type": "bind", "source": "rel"}]}"#,
                "absolute",
            ),
            (
                r#"{"root": {"path": "r"}, "process": {"args": ["true"]},
                    "mounts": [{"destination": "/x", "type": "nfs", "source": "h:/e"}]}"#,
                "not supported",
            ),
            (
                r#"{"root": {"path": "r"}, "process": {"args": ["true"]},
                    "mounts": [{"destination": "/x", "type": "bind", "source": "/etc/passwd"}]}"#,
                "a file is not supported",
            ),
        ] {
            let error = container_spec("c", Path::new("/b"), &parse(json)).expect_err(why);
            assert!(error.contains(why), "{error}");
        }
        assert!(serde_json::from_str::<Config>(r#"{"process": {"args": "sh"}}"#).is_err());
    }

    #[test]
    fn oversized_or_invalid_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{not json").expect("write");
        let error = read_config(dir.path()).expect_err("invalid");
        assert!(format!("{error:#}").starts_with("invalid "), "{error:#}");
        std::fs::write(
            &path,
            vec![b' '; usize::try_from(MAX_CONFIG_BYTES + 1).expect("size")],
        )
        .expect("write");
        let error = read_config(dir.path()).expect_err("large");
        assert!(error.to_string().contains("larger than"), "{error}");
    }
}
