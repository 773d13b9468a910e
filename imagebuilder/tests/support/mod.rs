//! Shared helpers of the integration tests: image builders, a fake registry, TLS material.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod images;
pub mod registry;
pub mod tls;

use std::time::Duration;

use imagebuilder::config::RegistryConfig;
use imagebuilder::image::PulledImage;
use imagebuilder::source::{self, ImageSource, PullError, PullOptions, PullPolicy};
use imagebuilder::store::Store;

/// A fresh cache in a temporary directory.
pub fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("cache")).expect("open store");
    (dir, store)
}

/// Registry settings with short timeouts so fault tests end quickly.
pub fn fast_config() -> RegistryConfig {
    RegistryConfig {
        stall_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        attempts: 3,
        max_retry_after: Duration::from_secs(2),
        ..RegistryConfig::default()
    }
}

/// Options for pulling `linux/amd64` with `config`, always contacting the source.
pub fn options(config: RegistryConfig) -> PullOptions {
    PullOptions {
        policy: PullPolicy::Always,
        platform: imagebuilder::image::Platform::parse("linux/amd64").expect("platform"),
        registries: config,
        ..PullOptions::default()
    }
}

pub fn pull(source: &str, store: &Store, opts: &PullOptions) -> Result<PulledImage, PullError> {
    source::pull(
        &ImageSource::parse(source).expect("valid source"),
        store,
        opts,
    )
}

/// Names of files in the cache's blob directory.
pub fn blob_files(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.root().join("blobs/sha256"))
        .expect("blobs dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts the image's layers are complete, verified cache files holding `image`'s blobs.
pub fn assert_layers_match(pulled: &PulledImage, image: &images::TestImage) {
    assert_eq!(pulled.layers.len(), image.layers.len());
    for (got, want) in pulled.layers.iter().zip(&image.layers) {
        assert_eq!(got.digest, want.digest);
        assert_eq!(got.size, want.bytes.len() as u64);
        assert_eq!(std::fs::read(&got.path).expect("layer file"), want.bytes);
    }
}
