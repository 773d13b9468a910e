//! Image manifests and indexes (OCI image-spec and Docker v2 schema 2, parsed with
//! oci-client's types), validated before anything is downloaded: known media types, sha256
//! digests, sane sizes; and platform selection in an index or manifest list.

use oci_client::manifest::{OciDescriptor, OciImageIndex, OciImageManifest, Versioned};

use crate::digest::{Digest, DigestError};
use crate::image::{ImageError, LayerCompression, Platform};

/// Largest manifest or index we read (containerd uses the same bound).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config we read into memory.
pub const MAX_CONFIG_SIZE: u64 = 8 << 20;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, v2 schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The `Accept` header for manifest requests.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Annotation naming a manifest in an OCI layout's index.json.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("malformed manifest")]
    Json(#[from] serde_json::Error),
    /// Only schema version 2 exists for these media types.
    #[error("unsupported manifest schema version {0}")]
    SchemaVersion(i32),
    /// A media type we do not pull (schema 1, artifacts...).
    #[error("unsupported manifest media type {0:?}")]
    MediaType(String),
    /// The config is not a container image config (a Helm chart, a Wasm module...).
    #[error("not a container image: config media type {0:?}")]
    ConfigMediaType(String),
    /// A layer media type we cannot unpack.
    #[error("unsupported layer")]
    Layer(#[from] ImageError),
    /// A descriptor digest is malformed or not sha256.
    #[error("bad descriptor digest")]
    Digest(#[from] DigestError),
    /// A descriptor has a negative size.
    #[error("descriptor {0} has an invalid size")]
    Size(String),
    /// No manifest in the index runs on the wanted platform.
    #[error("no image for platform {want} (available: {available})")]
    NoPlatform {
        /// What we looked for.
        want: String,
        /// What the index offers.
        available: String,
    },
    /// The entry chosen in an index is itself an index.
    #[error("image index points to another index")]
    NestedIndex,
}

/// A validated content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// An image manifest: config plus layers, lowest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    /// Its media type (from the body, or the header / descriptor when the body has none).
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// The layers with their compression.
    pub layers: Vec<(Descriptor, LayerCompression)>,
}

/// An image manifest whose config and layers are in the cache, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// The manifest bytes as served (or, for `docker save` archives, as synthesized).
    pub bytes: Vec<u8>,
    /// Their digest, which identifies the image.
    pub digest: Digest,
    /// The parsed manifest.
    pub manifest: ImageManifest,
}

/// One entry of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The manifest it points to.
    pub descriptor: Descriptor,
    /// Its platform, if stated.
    pub platform: Option<Platform>,
    /// Its `org.opencontainers.image.ref.name` annotation (tags in an OCI layout).
    pub ref_name: Option<String>,
}

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// A single-platform image.
    Image(ImageManifest),
    /// An index or manifest list.
    Index(Vec<IndexEntry>),
}

impl Manifest {
    /// Parses manifest bytes; `content_type` (from HTTP or a descriptor) is used when the
    /// body has no `mediaType` field, which OCI allows.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self, ManifestError> {
        let versioned: Versioned = serde_json::from_slice(bytes)?;
        if versioned.schema_version != 2 {
            return Err(ManifestError::SchemaVersion(versioned.schema_version));
        }
        let header = content_type.map(|c| c.split(';').next().unwrap_or(c).trim());
        let media_type = versioned
            .media_type
            .as_deref()
            .or(header)
            .unwrap_or_default();
        match media_type {
            OCI_MANIFEST | DOCKER_MANIFEST => {
                let manifest: OciImageManifest = serde_json::from_slice(bytes)?;
                Ok(Self::Image(image_manifest(manifest, media_type)?))
            }
            OCI_INDEX | DOCKER_LIST => {
                let index: OciImageIndex = serde_json::from_slice(bytes)?;
                Ok(Self::Index(index_entries(index)?))
            }
            other => Err(ManifestError::MediaType(other.to_string())),
        }
    }
}

fn descriptor(d: &OciDescriptor) -> Result<Descriptor, ManifestError> {
    descriptor_parts(&d.media_type, &d.digest, d.size)
}

fn descriptor_parts(
    media_type: &str,
    digest: &str,
    size: i64,
) -> Result<Descriptor, ManifestError> {
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest: Digest::parse(digest)?,
        size: u64::try_from(size).map_err(|_| ManifestError::Size(digest.to_string()))?,
    })
}

fn image_manifest(m: OciImageManifest, media_type: &str) -> Result<ImageManifest, ManifestError> {
    let config = descriptor(&m.config)?;
    if config.media_type != OCI_CONFIG && config.media_type != DOCKER_CONFIG {
        return Err(ManifestError::ConfigMediaType(config.media_type));
    }
    let layers = m
        .layers
        .iter()
        .map(|l| {
            let compression = LayerCompression::from_media_type(&l.media_type)?;
            Ok((descriptor(l)?, compression))
        })
        .collect::<Result<_, ManifestError>>()?;
    Ok(ImageManifest {
        media_type: media_type.to_string(),
        config,
        layers,
    })
}

fn index_entries(index: OciImageIndex) -> Result<Vec<IndexEntry>, ManifestError> {
    index
        .manifests
        .iter()
        .map(|e| {
            Ok(IndexEntry {
                descriptor: descriptor_parts(&e.media_type, &e.digest, e.size)?,
                platform: e.platform.as_ref().map(|p| Platform {
                    os: p.os.to_string(),
                    architecture: p.architecture.to_string(),
                    variant: p.variant.clone().unwrap_or_default(),
                }),
                ref_name: e
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME).cloned()),
            })
        })
        .collect()
}

/// Picks the manifest for `want` from an index: the first image manifest whose platform
/// matches, or the only image manifest when no entry states a platform.
pub fn select_platform<'a>(
    entries: &'a [IndexEntry],
    want: &Platform,
) -> Result<&'a IndexEntry, ManifestError> {
    let is_image = |e: &&IndexEntry| {
        matches!(
            e.descriptor.media_type.as_str(),
            OCI_MANIFEST | DOCKER_MANIFEST
        )
    };
    let is_index =
        |e: &IndexEntry| matches!(e.descriptor.media_type.as_str(), OCI_INDEX | DOCKER_LIST);
    let matching = entries
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(|p| want.matches(p)));
    if let Some(entry) = matching {
        return match is_index(entry) {
            true => Err(ManifestError::NestedIndex),
            false if is_image(&entry) => Ok(entry),
            false => Err(ManifestError::MediaType(
                entry.descriptor.media_type.clone(),
            )),
        };
    }
    if entries.iter().all(|e| e.platform.is_none()) {
        if entries.len() == 1 && is_index(&entries[0]) {
            return Err(ManifestError::NestedIndex);
        }
        let mut images = entries.iter().filter(is_image);
        if let (Some(only), None) = (images.next(), images.next()) {
            return Ok(only);
        }
    }
    let available: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref().map(Platform::to_string))
        .collect();
    Err(ManifestError::NoPlatform {
        want: want.to_string(),
        available: if available.is_empty() {
            "none stated".to_string()
        } else {
            available.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn image_json(layer_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
               "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{}","size":10}},
               "layers":[{{"mediaType":"{layer_type}","digest":"{}","size":20}}]}}"#,
            d(1),
            d(2)
        )
    }

    fn entry(media_type: &str, n: u8, platform: Option<(&str, &str, &str)>) -> String {
        let platform = platform.map_or(String::new(), |(os, arch, variant)| {
            format!(r#","platform":{{"os":"{os}","architecture":"{arch}","variant":"{variant}"}}"#)
        });
        format!(
            r#"{{"mediaType":"{media_type}","digest":"{}","size":5{platform}}}"#,
            d(n)
        )
    }

    fn index(entries: &[String]) -> Vec<IndexEntry> {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
            entries.join(",")
        );
        match Manifest::parse(json.as_bytes(), None).expect("valid index") {
            Manifest::Index(entries) => entries,
            other => panic!("not an index: {other:?}"),
        }
    }

    #[test]
    fn parses_docker_v2_manifest() {
        let m = Manifest::parse(
            image_json("application/vnd.docker.image.rootfs.diff.tar.gzip").as_bytes(),
            None,
        )
        .expect("valid");
        let Manifest::Image(m) = m else {
            panic!("not an image")
        };
        assert_eq!(m.config.size, 10);
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].1, LayerCompression::Gzip);
        assert_eq!(m.layers[0].0.digest.to_string(), d(2));
    }

    #[test]
    fn media_type_from_header_when_body_has_none() {
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        assert!(Manifest::parse(
            json.as_bytes(),
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8")
        )
        .is_ok());
        assert!(matches!(
            Manifest::parse(json.as_bytes(), Some("text/plain")),
            Err(ManifestError::MediaType(_))
        ));
    }

    #[test]
    fn refuses_what_we_cannot_pull() {
        let schema1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            Manifest::parse(schema1, None),
            Err(ManifestError::SchemaVersion(1))
        ));
        let artifact = br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart"}"#;
        assert!(matches!(
            Manifest::parse(artifact, None),
            Err(ManifestError::MediaType(_))
        ));
        let bad_layer = image_json("application/vnd.oci.image.layer.v1.tar+bzip2");
        assert!(matches!(
            Manifest::parse(bad_layer.as_bytes(), None),
            Err(ManifestError::Layer(_))
        ));
        let helm =
            image_json("x").replace(DOCKER_CONFIG, "application/vnd.cncf.helm.config.v1+json");
        assert!(matches!(
            Manifest::parse(helm.as_bytes(), None),
            Err(ManifestError::ConfigMediaType(_))
        ));
        let md5 = image_json("application/vnd.oci.image.layer.v1.tar").replace(&d(2), "md5:abc");
        assert!(matches!(
            Manifest::parse(md5.as_bytes(), None),
            Err(ManifestError::Digest(_))
        ));
        let negative = image_json("application/vnd.oci.image.layer.v1.tar")
            .replace("\"size\":20", "\"size\":-1");
        assert!(matches!(
            Manifest::parse(negative.as_bytes(), None),
            Err(ManifestError::Size(_))
        ));
        assert!(matches!(
            Manifest::parse(b"\x00garbage", None),
            Err(ManifestError::Json(_))
        ));
    }

    #[test]
    fn selects_host_platform_from_index() {
        let entries = index(&[
            entry(OCI_MANIFEST, 1, Some(("linux", "arm64", "v8"))),
            entry(OCI_MANIFEST, 2, Some(("linux", "amd64", ""))),
            entry(OCI_MANIFEST, 3, Some(("unknown", "unknown", ""))),
        ]);
        let amd64 = Platform::parse("linux/amd64").expect("platform");
        let chosen = select_platform(&entries, &amd64).expect("match");
        assert_eq!(chosen.descriptor.digest.to_string(), d(2));
        let arm = Platform::parse("linux/arm64").expect("platform");
        assert_eq!(
            select_platform(&entries, &arm)
                .expect("match")
                .descriptor
                .digest
                .to_string(),
            d(1)
        );

        let err = select_platform(&entries, &Platform::parse("linux/s390x").expect("platform"))
            .expect_err("no s390x");
        assert!(
            err.to_string().contains("linux/arm64/v8, linux/amd64"),
            "{err}"
        );
    }

    #[test]
    fn nested_index_and_platformless_entries() {
        let amd64 = Platform::parse("linux/amd64").expect("platform");
        let nested = index(&[entry(OCI_INDEX, 1, Some(("linux", "amd64", "")))]);
        assert!(matches!(
            select_platform(&nested, &amd64),
            Err(ManifestError::NestedIndex)
        ));
        let nested = index(&[entry(OCI_INDEX, 1, None)]);
        assert!(matches!(
            select_platform(&nested, &amd64),
            Err(ManifestError::NestedIndex)
        ));
        let single = index(&[entry(OCI_MANIFEST, 4, None)]);
        assert_eq!(
            select_platform(&single, &amd64)
                .expect("only one")
                .descriptor
                .digest
                .to_string(),
            d(4)
        );
        let ambiguous = index(&[entry(OCI_MANIFEST, 4, None), entry(OCI_MANIFEST, 5, None)]);
        assert!(matches!(
            select_platform(&ambiguous, &amd64),
            Err(ManifestError::NoPlatform { .. })
        ));
    }
}
