//! The resolved image every source (registry, OCI layout, archives) produces and the packer
//! consumes: manifest digest, the runtime part of the image config, and the ordered layers
//! as digest-verified files in the cache.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// Errors while interpreting an image's config or layer descriptors.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The config blob is not the JSON the OCI image spec describes.
    #[error("malformed image config")]
    Config(#[from] serde_json::Error),
    /// A layer's media type is not one we can unpack.
    #[error("unsupported layer media type {0:?}")]
    LayerMediaType(String),
    /// A `--platform` value is not `os/arch[/variant]`.
    #[error("invalid platform {0:?}: expected os/arch[/variant]")]
    Platform(String),
    /// The image was built for another platform than the one wanted.
    #[error("image is for {image}, not {wanted}")]
    PlatformMismatch {
        /// The image's platform.
        image: String,
        /// The wanted platform.
        wanted: String,
    },
    /// The config lists a different number of layers than the manifest.
    #[error("image config lists {config} layers but the manifest has {manifest}")]
    LayerCount {
        /// Entries in `rootfs.diff_ids`.
        config: usize,
        /// Layers in the manifest.
        manifest: usize,
    },
}

/// How a layer blob is compressed (from its media type, or sniffed for `docker save`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar stream.
    None,
    /// gzip (RFC 1952).
    Gzip,
    /// zstd (RFC 8878).
    Zstd,
}

impl LayerCompression {
    /// Maps an OCI or Docker v2 schema 2 layer media type (image-spec `layer.md`,
    /// including the non-distributable variants) to its compression.
    pub fn from_media_type(media_type: &str) -> Result<Self, ImageError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Self::Zstd),
            other => Err(ImageError::LayerMediaType(other.to_string())),
        }
    }

    /// Guesses the compression from a blob's first bytes (`docker save` writes layers
    /// without media types): gzip starts 1f 8b, a zstd frame 28 b5 2f fd.
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// One layer, ready to be read: a cache file whose sha256 matched `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// `sha256:<hex>` of the blob as stored (compressed).
    pub digest: String,
    /// The verified file in the blob cache.
    pub path: PathBuf,
    /// How to decompress it.
    pub compression: LayerCompression,
    /// Size of the blob in bytes.
    pub size: u64,
}

/// The runtime part of an image config (image-spec `config.md`, the `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `NAME=value` entries.
    pub env: Vec<String>,
    /// The entrypoint argv (may be empty).
    pub entrypoint: Vec<String>,
    /// The default arguments (appended to the entrypoint).
    pub cmd: Vec<String>,
    /// Working directory; empty means `/`.
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: String,
    /// Ports as `80/tcp`, sorted.
    pub exposed_ports: Vec<String>,
    /// Volumes as paths, sorted.
    pub volumes: Vec<String>,
    /// Image labels.
    pub labels: BTreeMap<String, String>,
    /// Signal that stops the container (e.g. `SIGQUIT`); empty means SIGTERM.
    pub stop_signal: String,
}

/// A platform as the OCI index and the image config name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// Go's GOARCH names: `amd64`, `arm64`...
    pub architecture: String,
    /// `v8` for arm64 and the like; often empty.
    pub variant: String,
}

impl Platform {
    /// The platform katalite runs on (guests run the host's architecture).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: String::new(),
        }
    }

    /// Parses Docker's `--platform` syntax, `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if parts.iter().all(valid) => Ok(Self {
                os: os.to_ascii_lowercase(),
                architecture: normalize_arch(&arch.to_ascii_lowercase()).into(),
                variant: parts
                    .get(2)
                    .map_or(String::new(), |v| v.to_ascii_lowercase()),
            }),
            _ => Err(ImageError::Platform(s.to_string())),
        }
    }

    /// Whether an image built for `candidate` runs here. An empty wanted variant accepts any;
    /// arm64's variant defaults to `v8` as in containerd's platform matcher.
    pub fn matches(&self, candidate: &Platform) -> bool {
        let variant = |p: &Platform| match (p.architecture.as_str(), p.variant.as_str()) {
            ("arm64", "") => "v8".to_string(),
            (_, v) => v.to_string(),
        };
        self.os == candidate.os
            && self.architecture == normalize_arch(&candidate.architecture)
            && (self.variant.is_empty() || variant(self) == variant(candidate))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// Go's architecture names, which images use, for the names `uname` gives.
fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An image resolved to local, verified files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference as the user gave it, normalized (`docker.io/library/busybox:latest`,
    /// `oci:/path:tag`...).
    pub reference: String,
    /// `sha256:<hex>` of the image manifest (identifies the image for caching).
    pub manifest_digest: String,
    /// The runtime config.
    pub config: ImageConfig,
    /// Layers in application order (lowest first).
    pub layers: Vec<LayerBlob>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfigFile {
    os: String,
    architecture: String,
    variant: String,
    config: Option<RawConfig>,
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRootfs {
    diff_ids: Vec<String>,
}

// Docker writes `null` for empty lists and maps, so every field is an Option.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct RawConfig {
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde::de::IgnoredAny>>,
    volumes: Option<BTreeMap<String, serde::de::IgnoredAny>>,
    labels: Option<BTreeMap<String, String>>,
    stop_signal: Option<String>,
}

/// What the config blob says beyond the runtime config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedConfig {
    /// The runtime config.
    pub config: ImageConfig,
    /// The platform the image was built for.
    pub platform: Platform,
    /// Digests of the uncompressed layers, in order.
    pub diff_ids: Vec<String>,
}

impl ParsedConfig {
    /// Parses an image config blob (`application/vnd.oci.image.config.v1+json` or Docker's
    /// `application/vnd.docker.container.image.v1+json`; both share this shape).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ImageError> {
        let raw: RawConfigFile = serde_json::from_slice(bytes)?;
        let c = raw.config.unwrap_or_default();
        let config = ImageConfig {
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            volumes: c.volumes.unwrap_or_default().into_keys().collect(),
            labels: c.labels.unwrap_or_default(),
            stop_signal: c.stop_signal.unwrap_or_default(),
        };
        Ok(Self {
            config,
            platform: Platform {
                os: raw.os,
                architecture: raw.architecture,
                variant: raw.variant,
            },
            diff_ids: raw.rootfs.unwrap_or_default().diff_ids,
        })
    }

    /// Checks the image runs on `wanted` (configs that state no platform pass).
    pub fn check_platform(&self, wanted: &Platform) -> Result<(), ImageError> {
        if self.platform.os.is_empty()
            || self.platform.architecture.is_empty()
            || wanted.matches(&self.platform)
        {
            Ok(())
        } else {
            Err(ImageError::PlatformMismatch {
                image: self.platform.to_string(),
                wanted: wanted.to_string(),
            })
        }
    }

    /// Checks that the config describes as many layers as the manifest lists (a mismatch
    /// means the manifest and config do not belong together).
    pub fn check_layer_count(&self, manifest_layers: usize) -> Result<(), ImageError> {
        if self.diff_ids.len() == manifest_layers {
            Ok(())
        } else {
            Err(ImageError::LayerCount {
                config: self.diff_ids.len(),
                manifest: manifest_layers,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compression() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar",
                LayerCompression::None,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                LayerCompression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                LayerCompression::Zstd,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                LayerCompression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                LayerCompression::Gzip,
            ),
        ];
        for (media_type, want) in cases {
            let got = LayerCompression::from_media_type(media_type).expect("known type");
            assert_eq!(got, want, "{media_type}");
        }
        assert!(matches!(
            LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar+bzip2"),
            Err(ImageError::LayerMediaType(_))
        ));
    }

    #[test]
    fn sniffs_magic_bytes() {
        assert_eq!(
            LayerCompression::sniff(&[0x1f, 0x8b, 8]),
            LayerCompression::Gzip
        );
        assert_eq!(
            LayerCompression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            LayerCompression::Zstd
        );
        assert_eq!(LayerCompression::sniff(b"etc/\0\0"), LayerCompression::None);
        assert_eq!(LayerCompression::sniff(&[]), LayerCompression::None);
    }

    #[test]
    fn parses_docker_style_config_with_nulls() {
        let json = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin"], "Entrypoint": null, "Cmd": ["nginx", "-g", "daemon off;"],
                "WorkingDir": "", "User": "101:101",
                "ExposedPorts": {"80/tcp": {}, "443/tcp": {}}, "Volumes": null,
                "Labels": {"maintainer": "x"}, "StopSignal": "SIGQUIT"
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]},
            "history": []
        }"#;
        let parsed = ParsedConfig::from_json(json).expect("valid config");
        assert_eq!(parsed.config.env, ["PATH=/usr/bin"]);
        assert!(parsed.config.entrypoint.is_empty());
        assert_eq!(parsed.config.cmd, ["nginx", "-g", "daemon off;"]);
        assert_eq!(parsed.config.user, "101:101");
        assert_eq!(parsed.config.exposed_ports, ["443/tcp", "80/tcp"]);
        assert_eq!(parsed.config.stop_signal, "SIGQUIT");
        assert_eq!(
            parsed.config.labels.get("maintainer").map(String::as_str),
            Some("x")
        );
        assert_eq!(parsed.platform.architecture, "amd64");
        assert!(parsed.check_layer_count(2).is_ok());
        assert!(parsed
            .check_platform(&Platform::parse("linux/amd64").expect("p"))
            .is_ok());
        assert!(matches!(
            parsed.check_platform(&Platform::parse("linux/arm64").expect("p")),
            Err(ImageError::PlatformMismatch { .. })
        ));
        assert!(matches!(
            parsed.check_layer_count(3),
            Err(ImageError::LayerCount {
                config: 2,
                manifest: 3
            })
        ));
    }

    #[test]
    fn platforms_parse_and_match() {
        let amd64 = Platform::parse("linux/amd64").expect("valid");
        assert_eq!(amd64.to_string(), "linux/amd64");
        assert_eq!(Platform::parse("linux/x86_64").expect("valid"), amd64);
        let arm = Platform::parse("linux/arm64/v8").expect("valid");
        assert_eq!(arm.variant, "v8");
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/amd64/v8/x",
            "linux/am d64",
        ] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
        let image = |os: &str, arch: &str, variant: &str| Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.into(),
        };
        assert!(amd64.matches(&image("linux", "amd64", "")));
        assert!(!amd64.matches(&image("linux", "arm64", "")));
        assert!(!amd64.matches(&image("windows", "amd64", "")));
        assert!(
            arm.matches(&image("linux", "arm64", "")),
            "arm64 defaults to v8"
        );
        assert!(!Platform::parse("linux/arm/v7")
            .expect("valid")
            .matches(&image("linux", "arm", "v6")));
        assert!(Platform::parse("linux/arm")
            .expect("valid")
            .matches(&image("linux", "arm", "v6")));
        assert_eq!(Platform::host().os, "linux");
    }

    #[test]
    fn config_without_runtime_section_is_empty() {
        let parsed = ParsedConfig::from_json(br#"{"os":"linux"}"#).expect("valid config");
        assert_eq!(parsed.config, ImageConfig::default());
        assert!(ParsedConfig::from_json(b"[1,2]").is_err());
        assert!(ParsedConfig::from_json(br#"{"config":{"Env":"notalist"}}"#).is_err());
    }
}
