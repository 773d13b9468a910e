//! The one small type the host and the guest's init share, and the fixed places it lives.
//! Field names follow Docker's image config (`Cmd`, `Env`, `WorkingDir`...) so a later
//! image config maps onto it without renaming.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Where the host places the serialized [`RunConfig`] inside the initramfs.
pub const CONFIG_PATH: &str = "/.katalite/config.json";

/// Where the host places the init binary inside the initramfs (`rdinit=` points here, so an
/// image's own `/init` is never replaced).
pub const INIT_PATH: &str = "/.katalite/init";

/// The I/O port of the VMM's status device. Init writes one 32-bit [`GuestStatus`] word
/// here; the VMM records it and ends the VM.
pub const STATUS_PORT: u16 = 0x0510;

/// What the guest reports through [`STATUS_PORT`], encoded as one 32-bit word:
/// the kind in bits 8..16, the code in bits 0..8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStatus {
    /// The workload exited; the code is what `docker run` would return (0-255,
    /// 126/127 for exec failures, 128+n for death by signal n).
    Exited(u8),
    /// Init itself failed before or around the workload (bad config, mount failure...).
    InitFailed,
}

const KIND_EXITED: u32 = 1;
const KIND_INIT_FAILED: u32 = 2;

impl GuestStatus {
    /// Encodes the status as the word init writes to the port.
    pub fn to_word(self) -> u32 {
        match self {
            GuestStatus::Exited(code) => (KIND_EXITED << 8) | u32::from(code),
            GuestStatus::InitFailed => KIND_INIT_FAILED << 8,
        }
    }

    /// Decodes a word written by the guest; unknown kinds are `None` (a hostile or broken
    /// guest must not be able to forge anything else).
    pub fn from_word(word: u32) -> Option<Self> {
        let code = (word & 0xff) as u8;
        match word >> 8 {
            KIND_EXITED => Some(GuestStatus::Exited(code)),
            KIND_INIT_FAILED => Some(GuestStatus::InitFailed),
            _ => None,
        }
    }
}

/// What to run in the guest and how. Serialized as JSON at [`CONFIG_PATH`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RunConfig {
    /// The full argv of the workload (entrypoint and command already combined by the host).
    pub args: Vec<String>,
    /// `NAME=value` entries for the workload's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory of the workload; empty means `/`.
    #[serde(default)]
    pub working_dir: String,
    /// Hostname to set in the guest; empty keeps the kernel default.
    #[serde(default)]
    pub hostname: String,
    /// Docker's `--user`: `name`, `uid`, `uid:gid`, `name:group`; resolved by init against
    /// the image's /etc/passwd and /etc/group. Empty means root.
    #[serde(default)]
    pub user: String,
    /// Give the workload a pseudo-terminal (`-t`): stdout and stderr arrive merged as
    /// `Stdout` frames, resizes come as `Resize` frames.
    #[serde(default)]
    pub tty: bool,
    /// Keep the workload's stdin open and fed by `Stdin` frames (`-i`); otherwise it reads
    /// from /dev/null.
    #[serde(default)]
    pub open_stdin: bool,
    /// Mount the root filesystem read-only (`--read-only`).
    #[serde(default)]
    pub read_only: bool,
    /// Print `katalite-init: probe init` and `katalite-init: probe workload` on the kernel
    /// console, so a benchmark can timestamp boot phases as the lines arrive on the host.
    #[serde(default)]
    pub boot_probe: bool,
    /// The guest's `eth0`, configured statically by init; `None` (`--network none`) leaves
    /// only the loopback interface. Loopback is up either way.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// The image's root filesystem as a read-only EROFS disk (the block device's name under
    /// /dev, e.g. `vda`); init mounts it under an overlay with a tmpfs upper and moves into
    /// it. `None`: the root filesystem is the initramfs itself.
    #[serde(default)]
    pub root_disk: Option<String>,
    /// The container's root as a virtio-fs share (its tag): `--rootfs DIR`, the host
    /// directory itself, written through unless `ReadOnly`. Init mounts it and moves into
    /// it; the identity files it writes (/etc/hosts, /etc/hostname, /etc/resolv.conf) go
    /// to a tmpfs bound over the directory's own, which stay untouched.
    #[serde(default)]
    pub root_share: Option<String>,
    /// Volumes and tmpfs mounts (`-v`, `--mount`, `--tmpfs`), mounted by init once the root
    /// and the kernel filesystems are in place, before the working directory is made.
    #[serde(default)]
    pub mounts: Vec<MountConfig>,
}

/// Longest virtio-fs tag (`struct virtio_fs_config.tag`, virtio 1.2 §5.11.4); the VMM's
/// `MAX_TAG_LEN` is the same number.
pub const MAX_TAG_LEN: usize = 36;

/// Whether `tag` can name a virtio-fs share: 1..=[`MAX_TAG_LEN`] ASCII letters, digits,
/// `-` and `_` (the VMM's rule).
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One filesystem init mounts into the container, at `Target`:
/// `{"Target":"/data","ReadOnly":false,"Kind":{"VirtioFs":{"Tag":"katalite-vol0"}}}` or
/// `{"Target":"/run","ReadOnly":false,"Kind":{"Tmpfs":{"SizeBytes":67108864,"Mode":1023}}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct MountConfig {
    /// Absolute path in the container, without `..`; missing directories are created.
    pub target: String,
    /// Mount it read-only (`:ro`, `readonly`).
    #[serde(default)]
    pub read_only: bool,
    /// What is mounted there.
    pub kind: MountKind,
}

/// What a [`MountConfig`] mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub enum MountKind {
    /// A host directory shared by the VMM over virtio-fs (a bind mount or a named volume).
    VirtioFs(VirtioFsMount),
    /// A fresh tmpfs in guest RAM (`--tmpfs`, `--mount type=tmpfs`).
    Tmpfs(TmpfsMount),
}

/// A virtio-fs share, by the tag its device carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct VirtioFsMount {
    /// The device's tag (see [`is_valid_tag`]).
    pub tag: String,
}

/// A tmpfs's options. Like Docker's, it is mounted `nosuid,nodev` and `noexec` unless
/// `Exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct TmpfsMount {
    /// Size limit in bytes; `None`: the kernel's default (half the guest's RAM).
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Permission bits of its root (at most 0o7777); `None`: the kernel's default, 1777.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Allow executing files from it.
    #[serde(default)]
    pub exec: bool,
}

/// A [`MountConfig`] init refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountConfigError {
    /// The target is relative, `/`, or has `..` components.
    #[error("invalid mount target {0:?}: it must be an absolute path other than / without ..")]
    BadTarget(String),
    /// The virtio-fs tag breaks [`is_valid_tag`].
    #[error("invalid virtio-fs tag {0:?}")]
    BadTag(String),
    /// The tmpfs mode has bits beyond 0o7777.
    #[error("invalid tmpfs mode {0:o} for {1}")]
    BadMode(u32, String),
}

impl MountConfig {
    /// Checks what init must be able to trust before mounting: an absolute target other
    /// than `/` with no `..` (nor NUL), a valid tag, a mode within 0o7777.
    pub fn validate(&self) -> Result<(), MountConfigError> {
        let target = &self.target;
        let clean = target.starts_with('/')
            && !target.contains('\0')
            && !target.split('/').any(|c| c == "..")
            && target.split('/').any(|c| !c.is_empty() && c != ".");
        if !clean {
            return Err(MountConfigError::BadTarget(target.clone()));
        }
        match &self.kind {
            MountKind::VirtioFs(share) if !is_valid_tag(&share.tag) => {
                Err(MountConfigError::BadTag(share.tag.clone()))
            }
            MountKind::Tmpfs(TmpfsMount {
                mode: Some(mode), ..
            }) if *mode > 0o7777 => Err(MountConfigError::BadMode(*mode, target.clone())),
            _ => Ok(()),
        }
    }
}

/// Whether `name` can be a block device name under /dev that init mounts: a short run of
/// lowercase letters and digits (`vda`), so it can never name a path elsewhere.
pub fn is_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 16
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A static IPv4 setup for the guest's `eth0`: what a DHCP lease would say, decided by the
/// host (the user-mode network's fixed plan, or the TAP user's choice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct NetworkConfig {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Prefix length of the guest's subnet (24 for a /24).
    pub prefix_len: u8,
    /// The default route's next hop.
    pub gateway: Ipv4Addr,
    /// Resolvers for /etc/resolv.conf, in order.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// A static IPv6 setup besides (an engine's IPv6 network); None: link-local only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Config>,
}

/// A global IPv6 address for `eth0` and the default route's next hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Ipv6Config {
    /// The guest's address.
    pub address: Ipv6Addr,
    /// Prefix length of its subnet (64 for a /64).
    pub prefix_len: u8,
    /// The default route's next hop, if the network has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv6Addr>,
}

/// One `katalite exec` session: what to run beside the workload and how. Sent as the JSON
/// payload of an `Exec` channel frame; field names are those of Docker's exec API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ExecConfig {
    /// The full argv; `Args[0]` is searched in the session's PATH when it has no slash.
    pub args: Vec<String>,
    /// `NAME=value` entries applied on top of the workload's environment (`-e`).
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; empty means the workload's.
    #[serde(default)]
    pub working_dir: String,
    /// Docker's `--user` syntax; empty means the workload's user.
    #[serde(default)]
    pub user: String,
    /// Give the process a pseudo-terminal (`-t`); resizes come as `Resize` frames on the
    /// session's stream.
    #[serde(default)]
    pub tty: bool,
    /// Feed the process's stdin from `Stdin` frames (`-i`); otherwise it reads /dev/null.
    #[serde(default)]
    pub open_stdin: bool,
    /// With `tty`, the terminal's first size as `[rows, columns]`, applied before the
    /// process starts (so it never sees 0x0).
    #[serde(default)]
    pub console_size: Option<[u16; 2]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words_round_trip() {
        for status in [
            GuestStatus::Exited(0),
            GuestStatus::Exited(42),
            GuestStatus::Exited(255),
            GuestStatus::InitFailed,
        ] {
            assert_eq!(GuestStatus::from_word(status.to_word()), Some(status));
        }
    }

    #[test]
    fn unknown_status_kinds_are_rejected() {
        assert_eq!(GuestStatus::from_word(0), None);
        assert_eq!(GuestStatus::from_word(0xdead_beef), None);
    }

    #[test]
    fn config_uses_docker_field_names() {
        let config = RunConfig {
            args: vec!["sh".into(), "-c".into(), "exit 3".into()],
            env: vec!["PATH=/bin".into()],
            working_dir: "/tmp".into(),
            hostname: "box".into(),
            user: "1000:1000".into(),
            tty: true,
            open_stdin: true,
            read_only: false,
            boot_probe: true,
            network: Some(NetworkConfig {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
                ipv6: Some(Ipv6Config {
                    address: "fd00:dead::2".parse().expect("v6"),
                    prefix_len: 64,
                    gateway: Some("fd00:dead::1".parse().expect("v6")),
                }),
            }),
            root_disk: Some("vda".into()),
            root_share: None,
            mounts: vec![
                MountConfig {
                    target: "/data".into(),
                    read_only: true,
                    kind: MountKind::VirtioFs(VirtioFsMount {
                        tag: "katalite-vol0".into(),
                    }),
                },
                MountConfig {
                    target: "/run".into(),
                    read_only: false,
                    kind: MountKind::Tmpfs(TmpfsMount {
                        size_bytes: Some(64 << 20),
                        mode: Some(0o1777),
                        exec: false,
                    }),
                },
            ],
        };
        let json = serde_json::to_string(&config).expect("serialize");
        assert!(json.contains(
            r#""Mounts":[{"Target":"/data","ReadOnly":true,"Kind":{"VirtioFs":{"Tag":"katalite-vol0"}}}"#
        ));
        assert!(json.contains(
            r#"{"Target":"/run","ReadOnly":false,"Kind":{"Tmpfs":{"SizeBytes":67108864,"Mode":1023,"Exec":false}}}"#
        ));
        assert!(json.contains("\"Args\"") && json.contains("\"WorkingDir\""));
        assert!(json.contains("\"RootDisk\":\"vda\""));
        assert!(json.contains("\"BootProbe\":true"));
        assert!(json.contains("\"Address\":\"10.0.2.15\""));
        assert!(json.contains(
            r#""Ipv6":{"Address":"fd00:dead::2","PrefixLen":64,"Gateway":"fd00:dead::1"}"#
        ));
        let back: RunConfig = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, config);
    }

    #[test]
    fn mounts_default_to_none_and_refuse_unknown_fields() {
        let config: RunConfig = serde_json::from_str(r#"{"Args":["true"]}"#).expect("parse");
        assert!(config.mounts.is_empty());
        let minimal = r#"{"Args":["true"],"Mounts":[{"Target":"/t","Kind":{"Tmpfs":{}}}]}"#;
        let config: RunConfig = serde_json::from_str(minimal).expect("parse");
        assert_eq!(
            config.mounts,
            [MountConfig {
                target: "/t".into(),
                read_only: false,
                kind: MountKind::Tmpfs(TmpfsMount::default()),
            }]
        );
        for bad in [
            r#"{"Target":"/t","Kind":{"Tmpfs":{}},"Propagation":"shared"}"#,
            r#"{"Target":"/t","Kind":{"Bind":{"Source":"/x"}}}"#,
            r#"{"Target":"/t","Kind":{"VirtioFs":{"Tag":"a","Cache":"always"}}}"#,
            r#"{"Kind":{"Tmpfs":{}}}"#,
        ] {
            assert!(serde_json::from_str::<MountConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_targets_tags_and_modes_are_validated() {
        let share = |target: &str, tag: &str| MountConfig {
            target: target.into(),
            read_only: false,
            kind: MountKind::VirtioFs(VirtioFsMount { tag: tag.into() }),
        };
        for good in ["/data", "/a/b/c", "/with space", "/x/./y", "/trailing/"] {
            assert_eq!(share(good, "katalite-vol0").validate(), Ok(()), "{good}");
        }
        for bad in [
            "", "data", "/", "//", "/a/../b", "/..", "/a/..", "/.", "/a\0b",
        ] {
            assert_eq!(
                share(bad, "t").validate(),
                Err(MountConfigError::BadTarget(bad.into())),
                "{bad:?}"
            );
        }
        let long = "t".repeat(MAX_TAG_LEN + 1);
        for bad in ["", "a/b", "a b", "é", long.as_str()] {
            assert_eq!(
                share("/d", bad).validate(),
                Err(MountConfigError::BadTag(bad.into()))
            );
        }
        assert!(is_valid_tag(&"t".repeat(MAX_TAG_LEN)));
        let tmpfs = |mode| MountConfig {
            target: "/t".into(),
            read_only: false,
            kind: MountKind::Tmpfs(TmpfsMount {
                mode: Some(mode),
                ..TmpfsMount::default()
            }),
        };
        assert_eq!(tmpfs(0o7777).validate(), Ok(()));
        let err = tmpfs(0o10000).validate().expect_err("mode too large");
        assert_eq!(err.to_string(), "invalid tmpfs mode 10000 for /t");
    }

    #[test]
    fn disk_names_cannot_leave_dev() {
        assert!(is_disk_name("vda") && is_disk_name("vdb1"));
        for bad in [
            "",
            "../vda",
            "vda/x",
            "VDA",
            ".",
            "vda ",
            "aaaaaaaaaaaaaaaaa",
        ] {
            assert!(!is_disk_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn exec_config_uses_docker_field_names_and_defaults() {
        let config: ExecConfig =
            serde_json::from_str(r#"{"Args":["echo","hi"]}"#).expect("minimal config");
        assert_eq!(config.args, ["echo", "hi"]);
        assert!(config.env.is_empty() && config.user.is_empty() && !config.tty);
        let config = ExecConfig {
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            working_dir: "/tmp".into(),
            user: "nobody".into(),
            tty: true,
            open_stdin: true,
            console_size: Some([24, 80]),
        };
        let json = serde_json::to_string(&config).expect("serialize");
        assert!(json.contains("\"OpenStdin\":true") && json.contains("\"ConsoleSize\":[24,80]"));
        assert_eq!(
            serde_json::from_str::<ExecConfig>(&json).expect("parse"),
            config
        );
        assert!(serde_json::from_str::<ExecConfig>(r#"{"Args":[],"Privileged":true}"#).is_err());
    }
}
