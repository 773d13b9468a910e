//! Pulling from registries (OCI distribution spec): each configured mirror in order, then
//! the origin; manifest and platform selection; config and layers downloaded into the
//! verified cache through oci-client.

mod auth;
mod blob;
mod http;
mod session;

use std::fmt;
use std::path::PathBuf;

use futures_util::{StreamExt, TryStreamExt};

use crate::config::{ConfigError, Endpoint, RegistryConfig};
use crate::digest::Digest;
use crate::image::{ImageError, ParsedConfig, Platform};
use crate::limits::Limits;
use crate::manifest::{self, Manifest, ManifestError, StoredManifest, MAX_CONFIG_SIZE};
use crate::progress::Progress;
use crate::reference::Reference;
use crate::store::{Store, StoreError};
use session::Session;

/// Layers downloaded at once from one registry.
const PARALLEL_LAYERS: usize = 3;
/// Free space the cache keeps beyond what a pull needs.
const SPACE_MARGIN: u64 = 256 << 20;

/// Parses a registry's `WWW-Authenticate` challenge as a pull does and says whether it was
/// accepted: for the fuzz targets in `fuzz/` (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn fuzz_parse_challenge(header: &str) -> bool {
    auth::parse_challenge(header).is_ok()
}

/// Errors while pulling from a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry configuration is unusable.
    #[error("registry configuration")]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error("set up http client")]
    Client(#[source] reqwest::Error),
    /// oci-client could not be built.
    #[error("set up registry client")]
    Oci(#[source] oci_client::errors::OciDistributionError),
    /// A CA file could not be read.
    #[error("read CA certificate {path}")]
    CertificateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A CA file holds no usable certificate.
    #[error("invalid CA certificate {path}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<reqwest::Error>,
    },
    /// A CA file holds no PEM certificate at all.
    #[error("no PEM certificate in {0}")]
    NoCertificate(PathBuf),
    /// Docker's credential store failed.
    #[error("read docker credentials")]
    Credentials(#[source] docker_credential::CredentialRetrievalError),
    /// A request failed at the HTTP level (connection, TLS, redirects).
    #[error("request to {url} failed")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// An unexpected status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The registry asked us to come back later than we are willing to wait.
    #[error("{url} asked to retry after {secs} s")]
    RetryAfter {
        /// The URL.
        url: String,
        /// Its `Retry-After`.
        secs: u64,
    },
    /// Authentication was refused.
    #[error("not authorized for {url} (check credentials in docker's config.json)")]
    Unauthorized {
        /// The URL.
        url: String,
    },
    /// A token service we withheld credentials from refused us.
    #[error("token service {url} answered HTTP {status}; credentials were withheld because it is not on the registry's host or not https (trust it with auth_hosts in registries.toml)")]
    TokenWithheld {
        /// The realm.
        url: String,
        /// Its answer.
        status: u16,
    },
    /// The manifest does not exist.
    #[error("manifest not found at {url}")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// A `WWW-Authenticate` header we cannot follow.
    #[error("malformed WWW-Authenticate challenge {0:?}")]
    Challenge(String),
    /// The token service answered something that is not a token.
    #[error("malformed token response from {url}")]
    TokenResponse {
        /// The realm.
        url: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The token response holds no usable token.
    #[error("no token in the response from {url}")]
    EmptyToken {
        /// The realm.
        url: String,
    },
    /// A transfer made too little progress.
    #[error("transfer from {url} stalled")]
    Stalled {
        /// The URL.
        url: String,
    },
    /// A response body is larger than we accept.
    #[error("response from {url} exceeds {max} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap.
        max: u64,
    },
    /// Content does not match the digest that names it.
    #[error("content from {url} has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The URL.
        url: String,
        /// The digest asked for.
        expected: Digest,
        /// What arrived.
        actual: Digest,
    },
    /// The manifest is unusable.
    #[error("manifest")]
    Manifest(#[from] ManifestError),
    /// The image config is unusable.
    #[error("image config")]
    Image(#[from] ImageError),
    /// oci-client failed to fetch a blob.
    #[error("fetch {url}")]
    Blob {
        /// The blob URL.
        url: String,
        /// Why.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// A blob transfer broke off.
    #[error("transfer from {url} broke off")]
    Transfer {
        /// The blob URL.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blob body ended early on every attempt.
    #[error("{url} ended after {got} of {size} bytes")]
    Truncated {
        /// The blob URL.
        url: String,
        /// Bytes received.
        got: u64,
        /// Bytes promised by the descriptor.
        size: u64,
    },
    /// A blob body is longer than its descriptor says.
    #[error("blob {digest} is longer than its {size} bytes")]
    Overlong {
        /// The blob.
        digest: Digest,
        /// The size in the descriptor.
        size: u64,
    },
    /// A descriptor announces a config larger than we read.
    #[error("image config {digest} is {size} bytes, more than {MAX_CONFIG_SIZE}")]
    ConfigTooLarge {
        /// The config blob.
        digest: Digest,
        /// Its announced size.
        size: u64,
    },
    /// A manifest announces a layer larger than [`Limits::layer_size`].
    #[error(
        "layer {digest} is announced as {size} bytes, more than the layer-size limit of {max}"
    )]
    LayerTooLarge {
        /// The layer.
        digest: Digest,
        /// Its announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A manifest's layers add up to more than [`Limits::image_size`].
    #[error(
        "the image's layers are announced as {size} bytes, more than the image-size limit of {max}"
    )]
    ImageTooLarge {
        /// The announced total.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The cache's file system has too little free space for the layers still missing.
    #[error("the cache needs {needed} bytes for this image but its file system has {free} free")]
    NoSpace {
        /// Bytes of missing layers plus a margin.
        needed: u64,
        /// Bytes available to us.
        free: u64,
    },
    /// The cache failed.
    #[error("cache")]
    Store(#[from] StoreError),
    /// Every mirror and the origin failed.
    #[error("pull failed at every endpoint: {}", Failures(.0))]
    Endpoints(Vec<(String, RegistryError)>),
}

/// Checks what the manifest announces before any byte is written: each layer and the image
/// within `limits`, and the blobs still missing within the cache's free space. Streaming
/// cuts every blob at its descriptor's size, so these sums also bound what is written.
fn check_sizes(
    store: &Store,
    manifest: &manifest::ImageManifest,
    limits: &Limits,
) -> Result<(), RegistryError> {
    let (mut total, mut missing) = (0u64, 0u64);
    for (layer, _) in &manifest.layers {
        if layer.size > limits.layer_size {
            return Err(RegistryError::LayerTooLarge {
                digest: layer.digest.clone(),
                size: layer.size,
                max: limits.layer_size,
            });
        }
        total = total.saturating_add(layer.size);
        if !store.has_blob(&layer.digest) {
            missing = missing.saturating_add(layer.size);
        }
    }
    if total > limits.image_size {
        return Err(RegistryError::ImageTooLarge {
            size: total,
            max: limits.image_size,
        });
    }
    if !store.has_blob(&manifest.config.digest) {
        missing = missing.saturating_add(manifest.config.size);
    }
    if missing > 0 {
        let free = free_space(store.root()).map_err(|source| StoreError::Io {
            path: store.root().to_path_buf(),
            source,
        })?;
        let needed = missing.saturating_add(SPACE_MARGIN);
        if needed > free {
            return Err(RegistryError::NoSpace { needed, free });
        }
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_space(path: &std::path::Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

/// Formats the per-endpoint failures with their causes, one per endpoint.
struct Failures<'a>(&'a [(String, RegistryError)]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (host, error)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{host}: {error}")?;
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                write!(f, ": {cause}")?;
                source = cause.source();
            }
        }
        Ok(())
    }
}

/// Pulls `reference` for `platform` into `store`, trying mirrors first; `limits` caps what
/// the manifest may announce (`layer_size`, `image_size`).
pub async fn pull(
    reference: &Reference,
    store: &Store,
    registries: &RegistryConfig,
    platform: &Platform,
    limits: &Limits,
    progress: &Progress,
) -> Result<StoredManifest, RegistryError> {
    let mut failures = Vec::new();
    for endpoint in registries.endpoints(reference.registry())? {
        let fetched = pull_from(
            &endpoint, reference, store, registries, platform, limits, progress,
        );
        match fetched.await {
            Ok(fetched) => return Ok(fetched),
            Err(e) if failures.is_empty() && !endpoint.mirror => return Err(e),
            Err(e) => {
                progress.message(&format!("{}: {e}", endpoint.host));
                failures.push((endpoint.host.clone(), e));
            }
        }
    }
    Err(RegistryError::Endpoints(failures))
}

async fn pull_from(
    endpoint: &Endpoint,
    reference: &Reference,
    store: &Store,
    registries: &RegistryConfig,
    platform: &Platform,
    limits: &Limits,
    progress: &Progress,
) -> Result<StoredManifest, RegistryError> {
    let session = Session::connect(endpoint, reference.repository(), registries).await?;
    let top = session
        .manifest(&reference.manifest_reference(), reference.digest())
        .await?;
    let (fetched, manifest) = match Manifest::parse(&top.bytes, top.content_type.as_deref())? {
        Manifest::Image(manifest) => (top, manifest),
        Manifest::Index(entries) => {
            let entry = manifest::select_platform(&entries, platform)?;
            let digest = &entry.descriptor.digest;
            let child = session.manifest(&digest.to_string(), Some(digest)).await?;
            let content_type = child
                .content_type
                .clone()
                .unwrap_or_else(|| entry.descriptor.media_type.clone());
            match Manifest::parse(&child.bytes, Some(&content_type))? {
                Manifest::Image(manifest) => (child, manifest),
                Manifest::Index(_) => return Err(ManifestError::NestedIndex.into()),
            }
        }
    };

    // Sizes first, from the manifest alone: a hostile registry gets no byte written.
    let config = &manifest.config;
    if config.size > MAX_CONFIG_SIZE {
        return Err(RegistryError::ConfigTooLarge {
            digest: config.digest.clone(),
            size: config.size,
        });
    }
    check_sizes(store, &manifest, limits)?;
    // Then the config: a wrong platform or a layer count mismatch stops us before the
    // (large) layers are downloaded.
    let hidden = indicatif::ProgressBar::hidden();
    blob::fetch(&session, store, config, MAX_CONFIG_SIZE, &hidden).await?;
    let parsed = ParsedConfig::from_json(&store.read_blob(&config.digest, MAX_CONFIG_SIZE)?)?;
    parsed.check_layer_count(manifest.layers.len())?;
    parsed.check_platform(platform)?;

    futures_util::stream::iter(manifest.layers.iter())
        .map(|(layer, _)| {
            let bar = progress.bytes(layer.digest.short(), Some(layer.size));
            let session = &session;
            let max = limits.layer_size;
            async move { blob::fetch(session, store, layer, max, &bar).await }
        })
        .buffered(PARALLEL_LAYERS)
        .try_collect::<Vec<_>>()
        .await?;
    store.put_bytes(Some(&fetched.digest), &fetched.bytes)?;
    Ok(StoredManifest {
        bytes: fetched.bytes,
        digest: fetched.digest,
        manifest,
    })
}
