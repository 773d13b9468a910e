//! `docker save` tarballs (`docker-archive:`) and `oci-archive:` tarballs (optionally
//! gzipped), read in one streaming pass: blobs go straight into the cache, hashed on the
//! way; only small JSON files stay in memory, bounded. Links between entries (the legacy
//! docker format links repeated layers) are resolved inside the archive, never on disk.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::oci_layout::{self, LayoutError, StoreBlobs};
use crate::digest::Digest;
use crate::image::{ImageError, LayerCompression, ParsedConfig, Platform};
use crate::manifest::{Manifest, ManifestError, StoredManifest, MAX_CONFIG_SIZE, OCI_MANIFEST};
use crate::progress::Progress;
use crate::reference::Reference;
use crate::store::{Store, StoreError};

/// JSON kept in memory while scanning, in total.
const MAX_METADATA: u64 = 64 << 20;
/// Links followed from one name before giving up (a loop).
const MAX_LINK_HOPS: usize = 8;

/// Errors reading an image archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive cannot be opened or is not a (complete) tar stream.
    #[error("read archive {path}")]
    Read {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An entry name is not UTF-8 or climbs out of the archive.
    #[error("archive entry {0:?} has an invalid name")]
    Name(String),
    /// The JSON files together are larger than we keep in memory.
    #[error("archive metadata exceeds {MAX_METADATA} bytes")]
    Metadata,
    /// A file the format requires is absent.
    #[error("archive has no {0}")]
    Missing(String),
    /// `manifest.json` of a `docker save` archive is malformed.
    #[error("malformed manifest.json")]
    DockerManifest(#[source] serde_json::Error),
    /// The archive holds several images and none was named.
    #[error("the archive holds several images; name one with :NAME:TAG (images: {0})")]
    Ambiguous(String),
    /// No image of the archive has the requested name.
    #[error("no image named {name:?} in the archive (images: {available})")]
    NameNotFound {
        /// The name asked for.
        name: String,
        /// The names present.
        available: String,
    },
    /// A link points at nothing usable, or links loop.
    #[error("archive link {0:?} does not lead to a file")]
    Link(String),
    /// An uncompressed layer does not match the config's `rootfs.diff_ids`.
    #[error("layer {layer} has digest {digest}, the image config says {diff_id}")]
    DiffId {
        /// The layer's name in the archive.
        layer: String,
        /// Its digest.
        digest: Digest,
        /// What the config lists.
        diff_id: String,
    },
    /// The image config is unusable.
    #[error("image config")]
    Image(#[from] ImageError),
    /// The synthesized manifest does not parse (a layer of an unknown kind).
    #[error("manifest")]
    Manifest(#[from] ManifestError),
    /// The OCI layout inside the archive is unusable.
    #[error("OCI layout in the archive")]
    Layout(#[from] LayoutError),
    /// The cache failed.
    #[error("cache")]
    Store(#[from] StoreError),
}

/// What one pass over an archive found.
#[derive(Default)]
struct Scan {
    /// Small JSON files by name.
    small: HashMap<String, Vec<u8>>,
    /// Files stored as blobs, by name.
    blobs: HashMap<String, (Digest, u64)>,
    /// Symbolic and hard links: name → target name.
    links: HashMap<String, String>,
    present: HashSet<Digest>,
}

impl Scan {
    fn resolve(&self, name: &str) -> Result<&(Digest, u64), ArchiveError> {
        let mut current = name.to_string();
        for _ in 0..=MAX_LINK_HOPS {
            if let Some(blob) = self.blobs.get(&current) {
                return Ok(blob);
            }
            match self.links.get(&current) {
                Some(target) => current = target.clone(),
                None => break,
            }
        }
        Err(ArchiveError::Link(name.to_string()))
    }
}

/// Imports the image of an `oci-archive:` tarball.
pub(crate) fn import_oci(
    path: &Path,
    tag: Option<&str>,
    platform: &Platform,
    store: &Store,
    progress: &Progress,
) -> Result<StoredManifest, ArchiveError> {
    let scan = scan(path, store, progress)?;
    let marker = scan
        .small
        .get("oci-layout")
        .ok_or_else(|| ArchiveError::Missing("oci-layout".into()))?;
    oci_layout::check_marker(marker)?;
    let index = scan
        .small
        .get("index.json")
        .ok_or_else(|| ArchiveError::Missing("index.json".into()))?;
    let mut blobs = StoreBlobs {
        store,
        present: &scan.present,
    };
    Ok(oci_layout::resolve(
        index, tag, platform, store, &mut blobs,
    )?)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OciManifestOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: DescriptorOut,
    layers: Vec<DescriptorOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescriptorOut {
    media_type: &'static str,
    digest: String,
    size: u64,
}

/// Imports an image of a `docker save` tarball (`name` picks one of several by
/// `RepoTags`). The archive has no manifest, so an OCI manifest is synthesized from its
/// config and layers; the same archive always yields the same manifest digest.
pub(crate) fn import_docker(
    path: &Path,
    name: Option<&str>,
    platform: &Platform,
    store: &Store,
    progress: &Progress,
) -> Result<StoredManifest, ArchiveError> {
    let scan = scan(path, store, progress)?;
    let listing = scan
        .small
        .get("manifest.json")
        .ok_or_else(|| ArchiveError::Missing("manifest.json".into()))?;
    let images: Vec<DockerImage> =
        serde_json::from_slice(listing).map_err(ArchiveError::DockerManifest)?;
    let image = choose(&images, name)?;

    let config_name = normalize(&image.config)?;
    let config_bytes = match scan.small.get(&config_name) {
        Some(bytes) => bytes.clone(),
        None => store.read_blob(&scan.resolve(&config_name)?.0, MAX_CONFIG_SIZE)?,
    };
    let config_digest = store.put_bytes(None, &config_bytes)?;
    let parsed = ParsedConfig::from_json(&config_bytes)?;
    parsed.check_layer_count(image.layers.len())?;
    parsed.check_platform(platform)?;

    let mut layers = Vec::new();
    for (layer, diff_id) in image.layers.iter().zip(&parsed.diff_ids) {
        let (digest, size) = scan.resolve(&normalize(layer)?)?.clone();
        let compression = sniff(store, &digest)?;
        // An uncompressed layer is its own diff: its digest must be the config's diff_id.
        if compression == LayerCompression::None && diff_id != &digest.to_string() {
            return Err(ArchiveError::DiffId {
                layer: layer.clone(),
                digest,
                diff_id: diff_id.clone(),
            });
        }
        let media_type = match compression {
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        layers.push(DescriptorOut {
            media_type,
            digest: digest.to_string(),
            size,
        });
    }
    let manifest = OciManifestOut {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config: DescriptorOut {
            media_type: "application/vnd.oci.image.config.v1+json",
            digest: config_digest.to_string(),
            size: config_bytes.len() as u64,
        },
        layers,
    };
    let bytes = serde_json::to_vec(&manifest).map_err(ManifestError::Json)?;
    let digest = store.put_bytes(None, &bytes)?;
    match Manifest::parse(&bytes, None)? {
        Manifest::Image(manifest) => Ok(StoredManifest {
            bytes,
            digest,
            manifest,
        }),
        Manifest::Index(_) => Err(ManifestError::NestedIndex.into()),
    }
}

fn choose<'a>(
    images: &'a [DockerImage],
    name: Option<&str>,
) -> Result<&'a DockerImage, ArchiveError> {
    let all_tags = || {
        let tags: Vec<&str> = images
            .iter()
            .flat_map(|i| i.repo_tags.iter().flatten().map(String::as_str))
            .collect();
        if tags.is_empty() {
            "untagged".to_string()
        } else {
            tags.join(", ")
        }
    };
    let Some(name) = name else {
        return match images {
            [only] => Ok(only),
            [] => Err(ArchiveError::Missing("image in manifest.json".into())),
            _ => Err(ArchiveError::Ambiguous(all_tags())),
        };
    };
    // `busybox` and `docker.io/library/busybox:latest` name the same image.
    let wanted = Reference::parse(name).map(|r| r.to_string()).ok();
    images
        .iter()
        .find(|i| {
            i.repo_tags.iter().flatten().any(|t| {
                t == name
                    || (wanted.is_some()
                        && Reference::parse(t).map(|r| r.to_string()).ok() == wanted)
            })
        })
        .ok_or_else(|| ArchiveError::NameNotFound {
            name: name.to_string(),
            available: all_tags(),
        })
}

fn sniff(store: &Store, digest: &Digest) -> Result<LayerCompression, ArchiveError> {
    let path = store.blob_path(digest);
    let mut head = Vec::with_capacity(4);
    File::open(&path)
        .and_then(|f| f.take(4).read_to_end(&mut head))
        .map_err(|source| StoreError::Io { path, source })?;
    Ok(LayerCompression::sniff(&head))
}

/// A name inside the archive without `./`, empty or `.` parts; `..` may not climb out.
fn normalize(name: &str) -> Result<String, ArchiveError> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts
                    .pop()
                    .ok_or_else(|| ArchiveError::Name(name.to_string()))?;
            }
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return Err(ArchiveError::Name(name.to_string()));
    }
    Ok(parts.join("/"))
}

fn is_metadata(name: &str) -> bool {
    matches!(
        name,
        "manifest.json" | "index.json" | "oci-layout" | "repositories"
    ) || (name.ends_with(".json") && !name.contains('/'))
}

fn blob_name(name: &str) -> Option<Digest> {
    name.strip_prefix("blobs/sha256/")
        .and_then(Digest::from_hex)
}

fn scan(path: &Path, store: &Store, progress: &Progress) -> Result<Scan, ArchiveError> {
    let read_err = |source| ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(read_err)?);
    let gzip = reader
        .fill_buf()
        .map_err(read_err)?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(reader);
    let mut scan = Scan::default();
    let mut metadata = 0u64;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|e| ArchiveError::Name(String::from_utf8_lossy(e.as_bytes()).into_owned()))?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        let name = normalize(&raw)?;
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .ok_or_else(|| ArchiveError::Link(name.clone()))?;
            let base = match (kind.is_symlink(), name.rsplit_once('/')) {
                (true, Some((parent, _))) => format!("{parent}/{target}"),
                _ => target,
            };
            scan.links.insert(name, normalize(&base)?);
            continue;
        }
        if !kind.is_file() && !kind.is_contiguous() {
            continue;
        }
        let size = entry.size();
        if is_metadata(&name) {
            metadata += size;
            if size > MAX_CONFIG_SIZE || metadata > MAX_METADATA {
                return Err(ArchiveError::Metadata);
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(read_err)?;
            scan.small.insert(name, bytes);
            continue;
        }
        let expected = blob_name(&name);
        // Layers may have any name (`<id>/layer.tar`, skopeo's `<hex>.tar`); only the
        // per-layer bookkeeping of the legacy format is known not to be one.
        if expected.is_none() && (name.ends_with("/VERSION") || name.ends_with("/json")) {
            continue;
        }
        let label = expected.as_ref().map_or("layer", Digest::short).to_string();
        let bar = progress.bytes(&label, Some(size));
        let (digest, size, _) =
            store.put_reader(expected.as_ref(), Some(size), bar.wrap_read(&mut entry))?;
        bar.finish_and_clear();
        scan.present.insert(digest.clone());
        scan.blobs.insert(name, (digest, size));
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_inside_the_archive() {
        assert_eq!(normalize("./abc/layer.tar").expect("ok"), "abc/layer.tar");
        assert_eq!(
            normalize("abc/../def/./layer.tar").expect("ok"),
            "def/layer.tar"
        );
        assert!(normalize("../etc/passwd").is_err());
        assert!(normalize("./").is_err());
        assert!(is_metadata("manifest.json") && is_metadata("abc.json"));
        assert!(!is_metadata("abc/json") && !is_metadata("abc/x.json"));
    }

    #[test]
    fn links_resolve_and_loops_fail() {
        let d = Digest::of(b"x");
        let mut scan = Scan::default();
        scan.blobs.insert("a/layer.tar".into(), (d.clone(), 1));
        scan.links
            .insert("b/layer.tar".into(), "a/layer.tar".into());
        scan.links
            .insert("c/layer.tar".into(), "b/layer.tar".into());
        scan.links.insert("x".into(), "y".into());
        scan.links.insert("y".into(), "x".into());
        assert_eq!(scan.resolve("c/layer.tar").expect("resolves").0, d);
        assert!(matches!(scan.resolve("x"), Err(ArchiveError::Link(_))));
        assert!(matches!(
            scan.resolve("nothing"),
            Err(ArchiveError::Link(_))
        ));
    }
}
