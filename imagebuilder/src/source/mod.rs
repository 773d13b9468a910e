//! Where images come from (a registry reference, `oci:DIR[:tag]`, `oci-archive:FILE[:tag]`,
//! `docker-archive:FILE[:name]`) and the one synchronous entry point, [`pull`], that applies
//! the pull policy, fetches into the cache and records the image.

mod archive;
mod oci_layout;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

pub use archive::ArchiveError;
pub use oci_layout::LayoutError;

use crate::config::RegistryConfig;
use crate::digest::{Digest, DigestError};
use crate::image::{ImageError, LayerBlob, ParsedConfig, Platform, PulledImage};
use crate::limits::Limits;
use crate::manifest::{
    Manifest, ManifestError, StoredManifest, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE,
};
use crate::progress::Progress;
use crate::reference::{Reference, ReferenceError};
use crate::registry::{self, RegistryError};
use crate::store::{ImageRecord, LayerRecord, Store, StoreError};

/// Errors of [`pull`].
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The image name is malformed.
    #[error("invalid image reference")]
    Reference(#[from] ReferenceError),
    /// `--pull` got something else than always, missing or never.
    #[error("invalid pull policy {0:?}: expected always, missing or never")]
    Policy(String),
    /// `--pull never` and the image is not in the cache.
    #[error("image {0} is not in the cache and --pull never forbids fetching it")]
    NotCached(String),
    /// The async runtime for the network code could not start.
    #[error("start async runtime")]
    Runtime(#[source] std::io::Error),
    /// Pulling from a registry failed.
    #[error("pull {reference}")]
    Registry {
        /// What was pulled.
        reference: String,
        /// Why it failed.
        #[source]
        source: RegistryError,
    },
    /// Reading an OCI layout failed.
    #[error("read OCI layout")]
    Layout(#[from] LayoutError),
    /// Reading an archive failed.
    #[error("read image archive")]
    Archive(#[from] ArchiveError),
    /// The manifest of a cached image is unusable.
    #[error("cached manifest")]
    Manifest(#[from] ManifestError),
    /// The config of the image is unusable.
    #[error("image config")]
    Image(#[from] ImageError),
    /// A recorded digest is malformed.
    #[error("cache index")]
    Digest(#[from] DigestError),
    /// The cache failed.
    #[error("cache")]
    Store(#[from] StoreError),
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference (also written `docker://REF`).
    Registry(Reference),
    /// An OCI layout directory and optional tag.
    OciLayout {
        /// The layout directory (absolute).
        dir: PathBuf,
        /// Its `org.opencontainers.image.ref.name`.
        tag: Option<String>,
    },
    /// An OCI layout as a tarball.
    OciArchive {
        /// The tarball (absolute).
        file: PathBuf,
        /// Its `org.opencontainers.image.ref.name`.
        tag: Option<String>,
    },
    /// A `docker save` tarball.
    DockerArchive {
        /// The tarball (absolute).
        file: PathBuf,
        /// One of its `RepoTags`, when it holds several images.
        name: Option<String>,
    },
}

impl ImageSource {
    /// Parses `oci:DIR[:tag]`, `oci-archive:FILE[:tag]`, `docker-archive:FILE[:name]`,
    /// `docker://REF` or a plain reference. A path that exists as written keeps its colons.
    pub fn parse(input: &str) -> Result<Self, PullError> {
        if let Some(rest) = input.strip_prefix("oci:") {
            let (dir, tag) = split_path(rest);
            return Ok(Self::OciLayout { dir, tag });
        }
        if let Some(rest) = input.strip_prefix("oci-archive:") {
            let (file, tag) = split_path(rest);
            return Ok(Self::OciArchive { file, tag });
        }
        if let Some(rest) = input.strip_prefix("docker-archive:") {
            let (file, name) = split_path(rest);
            return Ok(Self::DockerArchive { file, name });
        }
        let reference = input.strip_prefix("docker://").unwrap_or(input);
        Ok(Self::Registry(Reference::parse(reference)?))
    }

    /// The name the cache records the image under.
    pub fn key(&self) -> String {
        let with = |kind: &str, path: &Path, suffix: &Option<String>| match suffix {
            Some(s) => format!("{kind}:{}:{s}", path.display()),
            None => format!("{kind}:{}", path.display()),
        };
        match self {
            Self::Registry(reference) => reference.to_string(),
            Self::OciLayout { dir, tag } => with("oci", dir, tag),
            Self::OciArchive { file, tag } => with("oci-archive", file, tag),
            Self::DockerArchive { file, name } => with("docker-archive", file, name),
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// `PATH[:suffix]`: the whole string when it names an existing file, else the shortest
/// existing prefix before a colon (a docker-archive name has colons itself), else a split
/// at the last colon. Relative paths are made absolute so the cache key does not depend on
/// the working directory.
fn split_path(input: &str) -> (PathBuf, Option<String>) {
    let absolute = |p: &str| std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p));
    if Path::new(input).exists() {
        return (absolute(input), None);
    }
    let existing = input
        .match_indices(':')
        .map(|(i, _)| (&input[..i], &input[i + 1..]))
        .find(|(path, suffix)| !path.is_empty() && !suffix.is_empty() && Path::new(path).exists());
    if let Some((path, suffix)) = existing {
        return (absolute(path), Some(suffix.to_string()));
    }
    match input.rsplit_once(':') {
        Some((path, suffix)) if !path.is_empty() && !suffix.is_empty() && !suffix.contains('/') => {
            (absolute(path), Some(suffix.to_string()))
        }
        _ => (absolute(input), None),
    }
}

/// When to contact the source (Docker's `--pull`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Always fetch (blobs already cached are not downloaded again).
    Always,
    /// Fetch only when the cache has no intact copy.
    #[default]
    Missing,
    /// Never fetch; fail when not cached.
    Never,
}

impl FromStr for PullPolicy {
    type Err = PullError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "missing" => Ok(Self::Missing),
            "never" => Ok(Self::Never),
            other => Err(PullError::Policy(other.to_string())),
        }
    }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// When to fetch.
    pub policy: PullPolicy,
    /// The platform to choose from multi-platform images.
    pub platform: Platform,
    /// Mirrors, insecure registries, CAs, timeouts.
    pub registries: RegistryConfig,
    /// Where progress goes.
    pub progress: Progress,
    /// Re-hash cached layers before handing them out (detects a flipped byte on disk at
    /// the cost of reading every layer once).
    pub verify_cached_layers: bool,
    /// Caps on what a registry's manifest may announce (`layer_size`, `image_size`).
    pub limits: Limits,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            policy: PullPolicy::Missing,
            platform: Platform::host(),
            registries: RegistryConfig::default(),
            progress: Progress::hidden(),
            verify_cached_layers: true,
            limits: Limits::default(),
        }
    }
}

/// Resolves `source` to a cached, verified image according to `opts.policy`, fetching it
/// if needed, and records it in the cache index.
pub fn pull(
    source: &ImageSource,
    store: &Store,
    opts: &PullOptions,
) -> Result<PulledImage, PullError> {
    let _guard = store.hold()?;
    let key = source.key();
    if opts.policy != PullPolicy::Always {
        match store.image(&key)? {
            Some(record) => match load(store, &record, &opts.platform, opts.verify_cached_layers) {
                Ok(image) => return Ok(image),
                Err(e) if opts.policy == PullPolicy::Never => return Err(e),
                // Damaged (a corrupt blob was just deleted): fetch it again.
                Err(_) => {}
            },
            None if opts.policy == PullPolicy::Never => return Err(PullError::NotCached(key)),
            None => {}
        }
    }
    let progress = &opts.progress;
    let platform = &opts.platform;
    let stored = match source {
        ImageSource::Registry(reference) => {
            progress.message(&format!("pulling {reference}"));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(PullError::Runtime)?;
            runtime
                .block_on(registry::pull(
                    reference,
                    store,
                    &opts.registries,
                    platform,
                    &opts.limits,
                    progress,
                ))
                .map_err(|source| PullError::Registry {
                    reference: key.clone(),
                    source,
                })?
        }
        ImageSource::OciLayout { dir, tag } => {
            oci_layout::import_dir(dir, tag.as_deref(), platform, store)?
        }
        ImageSource::OciArchive { file, tag } => {
            archive::import_oci(file, tag.as_deref(), platform, store, progress)?
        }
        ImageSource::DockerArchive { file, name } => {
            archive::import_docker(file, name.as_deref(), platform, store, progress)?
        }
    };
    let (image, record) = assemble(store, key, &stored, platform)?;
    store.record_image(record)?;
    Ok(image)
}

/// Builds the image (and its index record) from a manifest whose blobs are cached.
fn assemble(
    store: &Store,
    reference: String,
    stored: &StoredManifest,
    platform: &Platform,
) -> Result<(PulledImage, ImageRecord), PullError> {
    let manifest = &stored.manifest;
    let config_bytes = store.read_blob(&manifest.config.digest, MAX_CONFIG_SIZE)?;
    let parsed = ParsedConfig::from_json(&config_bytes)?;
    parsed.check_layer_count(manifest.layers.len())?;
    parsed.check_platform(platform)?;
    let layers: Vec<LayerBlob> = manifest
        .layers
        .iter()
        .map(|(d, compression)| LayerBlob {
            digest: d.digest.to_string(),
            path: store.blob_path(&d.digest),
            compression: *compression,
            size: d.size,
        })
        .collect();
    let record = ImageRecord {
        reference: reference.clone(),
        manifest_digest: stored.digest.to_string(),
        manifest_size: stored.bytes.len() as u64,
        manifest_media_type: manifest.media_type.clone(),
        config_digest: manifest.config.digest.to_string(),
        config_size: manifest.config.size,
        layers: manifest
            .layers
            .iter()
            .map(|(d, _)| LayerRecord {
                digest: d.digest.to_string(),
                size: d.size,
                media_type: d.media_type.clone(),
            })
            .collect(),
        pulled_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let image = PulledImage {
        reference,
        manifest_digest: stored.digest.to_string(),
        config: parsed.config,
        layers,
    };
    Ok((image, record))
}

/// Rebuilds a recorded image from the cache, verifying the manifest and config (and the
/// layers when asked).
fn load(
    store: &Store,
    record: &ImageRecord,
    platform: &Platform,
    verify_layers: bool,
) -> Result<PulledImage, PullError> {
    let digest = Digest::parse(&record.manifest_digest)?;
    let bytes = store.read_blob(&digest, MAX_MANIFEST_SIZE)?;
    let Manifest::Image(manifest) = Manifest::parse(&bytes, Some(&record.manifest_media_type))?
    else {
        return Err(ManifestError::NestedIndex.into());
    };
    for (layer, _) in &manifest.layers {
        if verify_layers {
            store.verify_blob(&layer.digest, Some(layer.size))?;
        } else if !store.has_blob(&layer.digest) {
            return Err(StoreError::NoSuchImage(layer.digest.to_string()).into());
        }
    }
    let stored = StoredManifest {
        bytes,
        digest,
        manifest,
    };
    Ok(assemble(store, record.reference.clone(), &stored, platform)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("with:colon");
        std::fs::create_dir(&odd).expect("mkdir");
        let d = dir.path().display();

        let src = ImageSource::parse(&format!("oci:{d}/layout:v1")).expect("valid");
        assert_eq!(
            src,
            ImageSource::OciLayout {
                dir: dir.path().join("layout"),
                tag: Some("v1".into())
            }
        );
        assert_eq!(src.key(), format!("oci:{d}/layout:v1"));
        let src = ImageSource::parse(&format!("oci:{}", odd.display())).expect("valid");
        assert_eq!(
            src,
            ImageSource::OciLayout {
                dir: odd.clone(),
                tag: None
            }
        );
        let src = ImageSource::parse(&format!("docker-archive:{d}/img.tar")).expect("valid");
        assert_eq!(src.key(), format!("docker-archive:{d}/img.tar"));
        std::fs::write(dir.path().join("img.tar"), b"").expect("write");
        let src =
            ImageSource::parse(&format!("docker-archive:{d}/img.tar:busybox:1.36")).expect("valid");
        assert!(
            matches!(src, ImageSource::DockerArchive { name: Some(n), .. } if n == "busybox:1.36")
        );
        assert!(matches!(
            ImageSource::parse(&format!("oci-archive:{d}/a.tar:latest")),
            Ok(ImageSource::OciArchive { tag: Some(t), .. }) if t == "latest"
        ));
        let src = ImageSource::parse("docker://busybox").expect("valid");
        assert_eq!(src.key(), "docker.io/library/busybox:latest");
        assert_eq!(ImageSource::parse("busybox").expect("valid"), src);
        assert!(matches!(
            ImageSource::parse("Bad Name"),
            Err(PullError::Reference(_))
        ));
        let relative = ImageSource::parse("oci:rel/dir").expect("valid");
        assert!(matches!(relative, ImageSource::OciLayout { dir, .. } if dir.is_absolute()));
    }

    #[test]
    fn pull_policies_parse() {
        assert_eq!(
            "always".parse::<PullPolicy>().expect("valid"),
            PullPolicy::Always
        );
        assert_eq!(
            "missing".parse::<PullPolicy>().expect("valid"),
            PullPolicy::Missing
        );
        assert_eq!(
            "never".parse::<PullPolicy>().expect("valid"),
            PullPolicy::Never
        );
        assert!(matches!(
            "sometimes".parse::<PullPolicy>(),
            Err(PullError::Policy(_))
        ));
    }

    #[test]
    fn never_fails_when_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let opts = PullOptions {
            policy: PullPolicy::Never,
            ..PullOptions::default()
        };
        let source = ImageSource::parse("busybox").expect("valid");
        assert!(matches!(
            pull(&source, &store, &opts),
            Err(PullError::NotCached(_))
        ));
    }
}
