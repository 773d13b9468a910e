//! One container as the engine runs it: the resolved, serializable [`ContainerSpec`].
//!
//! Every front end builds one from its own input (`katalite run` from its flags in
//! `run.rs`; later the OCI command line and the containerd shim from a bundle), and
//! everything below the front ends (`boot`, `attach`, `guest_root`, `lifecycle`) sees only
//! this, never the command line. A detached supervisor reads it back from the container's
//! `spec.json` instead of parsing the launcher's arguments again.
//!
//! "Resolved" means: no defaults left to apply from the command line, host files read
//! (`--env-file`), host values copied (`-e NAME`), relative host paths made absolute, so
//! the spec means the same in any working directory. What only the image or the host can
//! answer at boot stays open: the image's entrypoint, env, user and working directory fill
//! what the spec leaves `None` (Docker's rules, in `boot.rs`), and mounts are resolved
//! (volumes made, host paths canonical) when the container's entry is made, into the
//! entry's own `mounts`.

use std::path::PathBuf;

use imagebuilder::source::PullPolicy;
use serde::{Deserialize, Serialize};

use crate::network::{NetworkMode, PortMapping, DEFAULT_NETWORK};
use crate::volumes::MountSpec;

/// Docker's default memory (`-m`), in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Docker's default stop timeout, in seconds.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;

/// Everything needed to make, boot and describe one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerSpec {
    /// `--name`: also the default hostname.
    pub name: Option<String>,
    /// The root filesystem.
    pub root: RootSpec,
    /// The workload, as far as the front end decides it.
    pub process: ProcessSpec,
    /// The VM's size.
    pub resources: Resources,
    /// Bind mounts, volumes and tmpfs mounts in mount order (`-v`, then `--mount`, then
    /// `--tmpfs`); bind sources are absolute.
    pub mounts: Vec<MountSpec>,
    /// The guest's network.
    pub network: NetworkSpec,
    /// How the workload's stdio is attached.
    pub stdio: StdioSpec,
    /// `--rm`: the entry (and its anonymous volumes) go when the container ends.
    pub auto_remove: bool,
    /// `-d`: a supervisor of its own runs the VM; the front end returns once it boots.
    pub detach: bool,
    /// Seconds between the forwarded SIGTERM/SIGINT and stopping the VM.
    pub stop_timeout_secs: u64,
    /// The guest kernel and its diagnostics.
    pub guest: GuestSpec,
    /// `--security-opt seccomp=unconfined`: katalite's threads run without their seccomp
    /// filters (capabilities are still dropped).
    pub seccomp_unconfined: bool,
    /// `--log-driver`: whether the output is kept for `katalite logs`.
    pub log_driver: LogDriver,
}

impl Default for ContainerSpec {
    /// What `katalite run IMAGE` means with no flags (and an empty reference).
    fn default() -> Self {
        Self {
            name: None,
            root: RootSpec::default(),
            process: ProcessSpec::default(),
            resources: Resources::default(),
            mounts: Vec::new(),
            network: NetworkSpec::default(),
            stdio: StdioSpec::default(),
            auto_remove: false,
            detach: false,
            stop_timeout_secs: DEFAULT_STOP_TIMEOUT_SECS,
            guest: GuestSpec::default(),
            seccomp_unconfined: false,
            log_driver: LogDriver::JsonFile,
        }
    }
}

impl ContainerSpec {
    /// What `ps` and `inspect` show as the image: the reference, or the root directory.
    pub fn image_display(&self) -> String {
        match &self.root.source {
            RootSource::Image { reference, .. } => reference.clone(),
            RootSource::Rootfs { path } => path.display().to_string(),
        }
    }
}

/// Where the root filesystem comes from and how it is mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RootSpec {
    /// An image or a host directory.
    pub source: RootSource,
    /// `--read-only`.
    pub read_only: bool,
    /// How the root reaches the guest.
    pub delivery: RootDelivery,
}

/// An image or a host directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootSource {
    /// An image reference (or `oci:DIR`, `docker-archive:FILE`...), pulled as `pull` says.
    Image {
        /// As typed: `imagebuilder` resolves it (Docker's rules, mirrors).
        reference: String,
        /// `--pull`.
        #[serde(with = "pull_policy")]
        pull: PullPolicy,
        /// Platform, registries, progress.
        fetch: FetchOptions,
    },
    /// `--rootfs DIR`: a host directory, absolute.
    Rootfs {
        /// The directory.
        path: PathBuf,
    },
}

impl Default for RootSource {
    fn default() -> Self {
        Self::Image {
            reference: String::new(),
            pull: PullPolicy::default(),
            fetch: FetchOptions::default(),
        }
    }
}

/// How the root filesystem reaches the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootDelivery {
    /// An image's EROFS disk image on a verified read-only disk; a directory over
    /// virtio-fs.
    #[default]
    Disk,
    /// Packed into an initramfs (the bench's `--image-root initramfs` and
    /// `--write-initramfs`).
    Initramfs,
}

/// How images are fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FetchOptions {
    /// `OS/ARCH[/VARIANT]`; `None`: this host's.
    pub platform: Option<String>,
    /// A registries.toml to use instead of the default one.
    pub registries_config: Option<PathBuf>,
    /// `REGISTRY=MIRROR` entries, tried first, in order.
    pub mirrors: Vec<String>,
    /// Registries spoken to over plain http.
    pub insecure: Vec<String>,
    /// Extra CA certificates (PEM files).
    pub ca: Vec<PathBuf>,
    /// No progress output.
    pub quiet: bool,
}

/// The workload as the front end gives it; `None` fields take the image's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessSpec {
    /// Replaces the image's entrypoint and drops its cmd; `Some([])` clears it.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd unless empty.
    pub command: Vec<String>,
    /// `NAME=value` entries set over the image's environment, in order.
    pub env: Vec<String>,
    /// Absolute; `None`: the image's.
    pub working_dir: Option<String>,
    /// `name`, `uid`, `uid:gid` or `name:group`; `None` or empty: the image's.
    pub user: Option<String>,
    /// `None`: the first 12 digits of the container id.
    pub hostname: Option<String>,
}

/// The VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// Virtual CPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
        }
    }
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkSpec {
    /// The backend.
    pub mode: NetworkMode,
    /// Published ports (the user network only).
    pub publish: Vec<PortMapping>,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            mode: DEFAULT_NETWORK,
            publish: Vec::new(),
        }
    }
}

/// Where the workload's output is kept (`--log-driver`, by Docker's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogDriver {
    /// Docker's json-file log in the container's directory, read by `katalite logs`.
    #[default]
    JsonFile,
    /// Nothing is kept: the output reaches an attached terminal only (Docker's `none`).
    None,
}

/// How the workload's stdio is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StdioSpec {
    /// A pseudo-terminal (`-t`).
    pub tty: bool,
    /// Stdin kept open and forwarded (`-i`).
    pub interactive: bool,
}

/// The guest kernel and its diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestSpec {
    /// An uncompressed vmlinux to boot instead of the built-in kernel (absolute).
    pub kernel: Option<PathBuf>,
    /// The kernel's log on stderr.
    pub kernel_log: bool,
    /// Appended to the kernel's command line.
    pub kernel_args: Vec<String>,
    /// Init prints its boot-phase probes (the bench).
    pub boot_probe: bool,
}

/// [`PullPolicy`] as Docker's words (`always`, `missing`, `never`): imagebuilder's type
/// has no serde of its own.
mod pull_policy {
    use imagebuilder::source::PullPolicy;
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(policy: &PullPolicy, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(match policy {
            PullPolicy::Always => "always",
            PullPolicy::Missing => "missing",
            PullPolicy::Never => "never",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PullPolicy, D::Error> {
        let word = String::deserialize(deserializer)?;
        word.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use guest_init::TmpfsMount;
    use vmm::net::usernet::Protocol;

    use super::*;
    use crate::volumes::SpecSource;

    /// A spec with every field away from its default.
    fn full() -> ContainerSpec {
        ContainerSpec {
            name: Some("web".into()),
            root: RootSpec {
                source: RootSource::Image {
                    reference: "busybox".into(),
                    pull: PullPolicy::Never,
                    fetch: FetchOptions {
                        platform: Some("linux/arm64".into()),
                        registries_config: Some("/etc/r.toml".into()),
                        mirrors: vec!["docker.io=http://127.0.0.1:5000".into()],
                        insecure: vec!["plain:80".into()],
                        ca: vec!["/ca.pem".into()],
                        quiet: true,
                    },
                },
                read_only: true,
                delivery: RootDelivery::Initramfs,
            },
            process: ProcessSpec {
                entrypoint: Some(Vec::new()),
                command: vec!["sh".into(), "-c".into(), "exit 3".into()],
                env: vec!["A=1".into()],
                working_dir: Some("/srv".into()),
                user: Some("1000:1000".into()),
                hostname: Some("box".into()),
            },
            resources: Resources {
                cpus: 2,
                memory_mib: 1024,
            },
            mounts: vec![
                MountSpec {
                    source: SpecSource::Bind {
                        path: "/host".into(),
                        create: true,
                    },
                    target: "/data".into(),
                    read_only: true,
                },
                MountSpec {
                    source: SpecSource::Volume(None),
                    target: "/anon".into(),
                    read_only: false,
                },
                MountSpec {
                    source: SpecSource::Tmpfs(TmpfsMount {
                        size_bytes: Some(1 << 20),
                        mode: Some(0o1777),
                        exec: true,
                    }),
                    target: "/run".into(),
                    read_only: false,
                },
            ],
            network: NetworkSpec {
                mode: NetworkMode::User {
                    allow_host_loopback: true,
                },
                publish: vec![PortMapping {
                    host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Udp,
                }],
            },
            stdio: StdioSpec {
                tty: true,
                interactive: true,
            },
            auto_remove: true,
            detach: true,
            stop_timeout_secs: 3,
            guest: GuestSpec {
                kernel: Some("/boot/vmlinux".into()),
                kernel_log: true,
                kernel_args: vec!["initcall_debug".into()],
                boot_probe: true,
            },
            seccomp_unconfined: true,
            log_driver: LogDriver::None,
        }
    }

    #[test]
    fn a_spec_survives_json() {
        for spec in [
            full(),
            ContainerSpec::default(),
            ContainerSpec {
                root: RootSpec {
                    source: RootSource::Rootfs {
                        path: "/srv/root".into(),
                    },
                    ..RootSpec::default()
                },
                network: NetworkSpec {
                    mode: NetworkMode::Tap("ktap0".into()),
                    publish: Vec::new(),
                },
                ..ContainerSpec::default()
            },
        ] {
            let json = serde_json::to_string(&spec).expect("serialize");
            let back: ContainerSpec = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, spec, "{json}");
        }
    }

    #[test]
    fn the_json_reads_plainly() {
        let json = serde_json::to_value(full()).expect("serialize");
        assert_eq!(json["root"]["source"]["image"]["pull"], "never");
        assert_eq!(json["network"]["publish"][0]["protocol"], "udp");
        assert_eq!(json["resources"]["memory_mib"], 1024);
    }

    #[test]
    fn missing_fields_take_the_defaults_and_bad_values_are_refused() {
        let spec: ContainerSpec = serde_json::from_str("{}").expect("empty object");
        assert_eq!(spec, ContainerSpec::default());
        assert_eq!((spec.resources.cpus, spec.resources.memory_mib), (1, 512));
        assert_eq!(spec.stop_timeout_secs, 10);
        let bad =
            r#"{"root":{"source":{"image":{"reference":"x","pull":"sometimes","fetch":{}}}}}"#;
        assert!(serde_json::from_str::<ContainerSpec>(bad).is_err());
        let bad = r#"{"network":{"publish":[{"host_ip":"127.0.0.1","host_port":1,"container_port":2,"protocol":"sctp"}]}}"#;
        assert!(serde_json::from_str::<ContainerSpec>(bad).is_err());
    }
}
