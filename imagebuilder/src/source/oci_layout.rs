//! OCI image layouts (image-spec `image-layout.md`: `oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), as a directory (`oci:DIR[:tag]`) or inside an `oci-archive:`
//! tarball. An image is chosen by tag (`org.opencontainers.image.ref.name`) and platform;
//! its blobs are copied into the cache and verified on the way.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::image::Platform;
use crate::manifest::{
    self, Descriptor, IndexEntry, Manifest, ManifestError, StoredManifest, MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE, OCI_INDEX,
};
use crate::store::{Store, StoreError};

/// Errors reading an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The `oci-layout` marker file is missing.
    #[error("{0} is not an OCI image layout (no oci-layout file)")]
    NotALayout(PathBuf),
    /// The marker names a layout version we do not know.
    #[error("unsupported OCI layout version {0:?}")]
    Version(String),
    /// A file of the layout cannot be read.
    #[error("read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `oci-layout` or `index.json` is not the JSON the spec describes.
    #[error("malformed {0}")]
    Json(&'static str, #[source] serde_json::Error),
    /// `index.json` is larger than any manifest we read.
    #[error("index.json exceeds {MAX_MANIFEST_SIZE} bytes")]
    IndexTooLarge,
    /// `index.json` is a manifest, not an index.
    #[error("index.json is not an image index")]
    NotAnIndex,
    /// No entry carries the tag.
    #[error("no image tagged {tag:?} (tags: {available})")]
    TagNotFound {
        /// The tag asked for.
        tag: String,
        /// The tags present.
        available: String,
    },
    /// Several untagged choices and no platform to tell them apart.
    #[error("the layout holds several images; name one with :TAG (tags: {0})")]
    Ambiguous(String),
    /// A blob the manifest needs is absent.
    #[error("blob {0} is missing")]
    MissingBlob(Digest),
    /// A blob's size disagrees with its descriptor, or it is too large to read.
    #[error("blob {digest} is {actual} bytes, descriptor says {expected}")]
    Size {
        /// The blob.
        digest: Digest,
        /// Descriptor size.
        expected: u64,
        /// Actual size (or the cap).
        actual: u64,
    },
    /// A blob does not hash to its name.
    #[error("blob {expected} has digest {actual}")]
    Digest {
        /// Its name.
        expected: Digest,
        /// What its content hashes to.
        actual: Digest,
    },
    /// A manifest is unusable.
    #[error("manifest")]
    Manifest(#[from] ManifestError),
    /// The cache failed.
    #[error("cache")]
    Store(#[from] StoreError),
}

/// Where a layout's blobs come from.
pub(crate) trait Blobs {
    /// A small blob's verified bytes (at most `max`).
    fn read(&mut self, desc: &Descriptor, max: u64) -> Result<Vec<u8>, LayoutError>;
    /// Makes sure the blob is in the cache, verified.
    fn import(&mut self, desc: &Descriptor) -> Result<(), LayoutError>;
}

/// Blobs of a layout directory, copied into the cache.
pub(crate) struct DirBlobs<'a> {
    pub dir: &'a Path,
    pub store: &'a Store,
}

impl DirBlobs<'_> {
    fn open(&self, digest: &Digest) -> Result<(PathBuf, File), LayoutError> {
        // The path is built from a validated 64-hex digest, so it cannot leave blobs/.
        let path = self.dir.join("blobs/sha256").join(digest.hex());
        match File::open(&path) {
            Ok(file) => Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(LayoutError::MissingBlob(digest.clone()))
            }
            Err(source) => Err(LayoutError::Io { path, source }),
        }
    }
}

impl Blobs for DirBlobs<'_> {
    fn read(&mut self, desc: &Descriptor, max: u64) -> Result<Vec<u8>, LayoutError> {
        let (path, file) = self.open(&desc.digest)?;
        let mut bytes = Vec::new();
        file.take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Io { path, source })?;
        check(desc, &bytes)?;
        Ok(bytes)
    }

    fn import(&mut self, desc: &Descriptor) -> Result<(), LayoutError> {
        if self.store.has_blob(&desc.digest) {
            return Ok(());
        }
        let (_, file) = self.open(&desc.digest)?;
        self.store
            .put_reader(Some(&desc.digest), Some(desc.size), file)?;
        Ok(())
    }
}

/// Blobs an archive scan already put into the cache.
pub(crate) struct StoreBlobs<'a> {
    pub store: &'a Store,
    pub present: &'a HashSet<Digest>,
}

impl Blobs for StoreBlobs<'_> {
    fn read(&mut self, desc: &Descriptor, max: u64) -> Result<Vec<u8>, LayoutError> {
        self.import(desc)?;
        let bytes = self.store.read_blob(&desc.digest, max)?;
        check(desc, &bytes)?;
        Ok(bytes)
    }

    fn import(&mut self, desc: &Descriptor) -> Result<(), LayoutError> {
        // Blobs in the cache were verified when they were written (the scan just did).
        if !self.present.contains(&desc.digest) && !self.store.has_blob(&desc.digest) {
            return Err(LayoutError::MissingBlob(desc.digest.clone()));
        }
        let path = self.store.blob_path(&desc.digest);
        let actual = std::fs::metadata(&path)
            .map_err(|source| LayoutError::Io { path, source })?
            .len();
        if actual != desc.size {
            return Err(LayoutError::Size {
                digest: desc.digest.clone(),
                expected: desc.size,
                actual,
            });
        }
        Ok(())
    }
}

fn check(desc: &Descriptor, bytes: &[u8]) -> Result<(), LayoutError> {
    if bytes.len() as u64 != desc.size {
        return Err(LayoutError::Size {
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: bytes.len() as u64,
        });
    }
    let actual = Digest::of(bytes);
    if actual != desc.digest {
        return Err(LayoutError::Digest {
            expected: desc.digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// Checks the `oci-layout` marker (`{"imageLayoutVersion": "1.0.0"}`).
pub(crate) fn check_marker(bytes: &[u8]) -> Result<(), LayoutError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Marker {
        image_layout_version: String,
    }
    let marker: Marker =
        serde_json::from_slice(bytes).map_err(|e| LayoutError::Json("oci-layout", e))?;
    if marker.image_layout_version.split('.').next() != Some("1") {
        return Err(LayoutError::Version(marker.image_layout_version));
    }
    Ok(())
}

/// Imports the image `tag` (or the only / the platform's image) of a layout directory.
pub(crate) fn import_dir(
    dir: &Path,
    tag: Option<&str>,
    platform: &Platform,
    store: &Store,
) -> Result<StoredManifest, LayoutError> {
    let read_small = |name: &str| {
        let path = dir.join(name);
        let mut bytes = Vec::new();
        let file = File::open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound if name == "oci-layout" => {
                LayoutError::NotALayout(dir.to_path_buf())
            }
            _ => LayoutError::Io {
                path: path.clone(),
                source,
            },
        })?;
        file.take(MAX_MANIFEST_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Io { path, source })?;
        Ok::<_, LayoutError>(bytes)
    };
    check_marker(&read_small("oci-layout")?)?;
    let index = read_small("index.json")?;
    resolve(&index, tag, platform, store, &mut DirBlobs { dir, store })
}

/// Chooses and imports an image given a layout's `index.json`.
pub(crate) fn resolve(
    index_json: &[u8],
    tag: Option<&str>,
    platform: &Platform,
    store: &Store,
    blobs: &mut impl Blobs,
) -> Result<StoredManifest, LayoutError> {
    if index_json.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(LayoutError::IndexTooLarge);
    }
    let Manifest::Index(entries) = Manifest::parse(index_json, Some(OCI_INDEX))? else {
        return Err(LayoutError::NotAnIndex);
    };
    let tags = || {
        let names: Vec<&str> = entries
            .iter()
            .filter_map(|e| e.ref_name.as_deref())
            .collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    let candidates: Vec<IndexEntry> = match tag {
        Some(tag) => entries
            .iter()
            .filter(|e| {
                e.ref_name
                    .as_deref()
                    .is_some_and(|n| n == tag || n.ends_with(&format!(":{tag}")))
            })
            .cloned()
            .collect(),
        None => entries.clone(),
    };
    let chosen = match candidates.as_slice() {
        [] => {
            return Err(LayoutError::TagNotFound {
                tag: tag.unwrap_or_default().to_string(),
                available: tags(),
            })
        }
        [only] => only.clone(),
        many if many.iter().all(|e| e.platform.is_none()) => {
            return Err(LayoutError::Ambiguous(tags()))
        }
        many => manifest::select_platform(many, platform)?.clone(),
    };
    let mut desc = chosen.descriptor;
    let mut bytes = blobs.read(&desc, MAX_MANIFEST_SIZE)?;
    if let Manifest::Index(children) = Manifest::parse(&bytes, Some(&desc.media_type))? {
        desc = manifest::select_platform(&children, platform)?
            .descriptor
            .clone();
        bytes = blobs.read(&desc, MAX_MANIFEST_SIZE)?;
    }
    let Manifest::Image(image) = Manifest::parse(&bytes, Some(&desc.media_type))? else {
        return Err(ManifestError::NestedIndex.into());
    };
    if image.config.size > MAX_CONFIG_SIZE {
        return Err(LayoutError::Size {
            digest: image.config.digest.clone(),
            expected: image.config.size,
            actual: MAX_CONFIG_SIZE,
        });
    }
    blobs.import(&image.config)?;
    for (layer, _) in &image.layers {
        blobs.import(layer)?;
    }
    store.put_bytes(Some(&desc.digest), &bytes)?;
    Ok(StoredManifest {
        bytes,
        digest: desc.digest,
        manifest: image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_marker_versions() {
        assert!(check_marker(br#"{"imageLayoutVersion":"1.0.0"}"#).is_ok());
        assert!(matches!(
            check_marker(br#"{"imageLayoutVersion":"2.0.0"}"#),
            Err(LayoutError::Version(_))
        ));
        assert!(matches!(check_marker(b"{}"), Err(LayoutError::Json(..))));
    }

    #[test]
    fn missing_layout_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("cache")).expect("store");
        let err = import_dir(dir.path(), None, &Platform::host(), &store).expect_err("empty dir");
        assert!(matches!(err, LayoutError::NotALayout(_)), "{err}");
    }
}
