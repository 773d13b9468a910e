//! A fake registry that misbehaves on purpose (testing.md §4). Every fault must end in a
//! clean error, in bounded time, with nothing partial in the cache: no blob that does not
//! hash to its name and no image record.

mod support;

use std::time::{Duration, Instant};

use imagebuilder::digest::Digest;
use imagebuilder::image::PulledImage;
use imagebuilder::limits::Limits;
use imagebuilder::source::{PullError, PullOptions};
use imagebuilder::store::Store;
use support::images::{self, Blob, Compress, TestImage};
use support::registry::{Body, FakeRegistry, Response};

fn setup() -> (FakeRegistry, TestImage, tempfile::TempDir, Store) {
    let registry = FakeRegistry::start();
    let image = images::simple(false);
    registry.add_image("app", "latest", &image);
    let (dir, store) = support::store();
    (registry, image, dir, store)
}

fn pull(registry: &FakeRegistry, store: &Store) -> Result<PulledImage, PullError> {
    pull_within(registry, store, Limits::default())
}

fn pull_within(
    registry: &FakeRegistry,
    store: &Store,
    limits: Limits,
) -> Result<PulledImage, PullError> {
    let mut config = support::fast_config();
    config.add_insecure(&registry.host()).expect("host");
    let opts = PullOptions {
        limits,
        ..support::options(config)
    };
    support::pull(&format!("{}/app", registry.host()), store, &opts)
}

/// Every file in the cache's blob and download directories.
fn cache_files(store: &Store) -> Vec<String> {
    let mut files = support::blob_files(store);
    for entry in std::fs::read_dir(store.root().join("tmp")).expect("tmp dir") {
        let name = entry.expect("entry").file_name();
        files.push(format!("tmp/{}", name.to_string_lossy()));
    }
    files
}

/// Asserts no blob was requested: neither the config nor any layer.
fn assert_no_blob_requested(registry: &FakeRegistry) {
    let blobs: Vec<String> = registry
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/"))
        .map(|r| r.path)
        .collect();
    assert!(blobs.is_empty(), "blobs were requested: {blobs:?}");
}

/// Pulls, expects an error whose chain mentions `needle`, checks the cache is clean.
fn expect_clean_error(registry: &FakeRegistry, store: &Store, needle: &str) -> String {
    let start = Instant::now();
    let err = pull(registry, store).expect_err("the pull must fail");
    let chain = chain(&err);
    assert!(chain.contains(needle), "expected {needle:?} in: {chain}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    assert_clean(store);
    chain
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Every blob hashes to its name, no image is recorded.
fn assert_clean(store: &Store) {
    for name in support::blob_files(store) {
        let bytes = std::fs::read(store.root().join("blobs/sha256").join(&name)).expect("blob");
        assert_eq!(
            Digest::of(&bytes).hex(),
            name,
            "partial or corrupt blob in the cache"
        );
    }
    assert!(
        store.images().expect("index").is_empty(),
        "no image may be recorded"
    );
}

fn layer_path(image: &TestImage) -> String {
    format!("/blobs/{}", image.layers[0].digest)
}

#[test]
fn wrong_digest() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let len = image.layers[0].bytes.len();
    registry.set_handler(move |req| {
        req.path
            .ends_with(&path)
            .then(|| Response::new(200, vec![0u8; len]))
    });
    expect_clean_error(&registry, &store, "expected");
}

#[test]
fn body_shorter_than_content_length() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let bytes = image.layers[0].bytes.clone();
    registry.set_handler(move |req| {
        req.path.ends_with(&path).then(|| {
            Response::new(200, Vec::new()).body(Body::Short {
                bytes: bytes[..bytes.len() / 2].to_vec(),
                declared: bytes.len(),
            })
        })
    });
    expect_clean_error(&registry, &store, "end of file before message length");
}

#[test]
fn body_longer_than_the_descriptor() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let mut bytes = image.layers[0].bytes.clone();
    bytes.extend_from_slice(b"trailing garbage");
    registry.set_handler(move |req| {
        req.path
            .ends_with(&path)
            .then(|| Response::new(200, bytes.clone()))
    });
    expect_clean_error(&registry, &store, "longer than");
}

#[test]
fn body_longer_than_content_length_is_cut_off() {
    // The server declares the right length but keeps writing; HTTP framing ends the body at
    // Content-Length, so the extra bytes never reach the file.
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let bytes = image.layers[0].bytes.clone();
    registry.set_handler(move |req| {
        req.path.ends_with(&path).then(|| {
            let mut long = bytes.clone();
            long.extend_from_slice(&[7u8; 4096]);
            Response::new(200, Vec::new()).body(Body::Short {
                bytes: long,
                declared: bytes.len(),
            })
        })
    });
    let pulled = pull(&registry, &store).expect("framing protects us");
    support::assert_layers_match(&pulled, &image);
}

#[test]
fn connection_reset_mid_blob_every_time() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let bytes = image.layers[0].bytes.clone();
    registry.set_handler(move |req| {
        req.path.ends_with(&path).then(|| {
            Response::new(200, Vec::new()).body(Body::Reset {
                bytes: bytes.clone(),
                after: bytes.len() / 2,
            })
        })
    });
    expect_clean_error(&registry, &store, &image.layers[0].digest);
}

#[test]
fn connection_reset_once_resumes_with_range() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let bytes = image.layers[0].bytes.clone();
    let sent = std::sync::atomic::AtomicBool::new(false);
    registry.set_handler(move |req| {
        (req.path.ends_with(&path) && !sent.swap(true, std::sync::atomic::Ordering::SeqCst)).then(
            || {
                Response::new(200, Vec::new()).body(Body::Reset {
                    bytes: bytes.clone(),
                    after: bytes.len() / 2,
                })
            },
        )
    });
    let pulled = pull(&registry, &store).expect("resumed");
    support::assert_layers_match(&pulled, &image);
    let layer = layer_path(&image);
    let ranged: Vec<_> = registry
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with(&layer))
        .collect();
    assert_eq!(ranged.len(), 2);
    assert!(ranged[1]
        .header("range")
        .is_some_and(|r| r.starts_with("bytes=") && r != "bytes=0-"));
}

#[test]
fn slow_drip_times_out() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let bytes = image.layers[0].bytes.clone();
    registry.set_handler(move |req| {
        req.path.ends_with(&path).then(|| {
            Response::new(200, Vec::new()).body(Body::Drip {
                bytes: bytes.clone(),
                every: Duration::from_millis(50),
            })
        })
    });
    expect_clean_error(&registry, &store, "stalled");
}

#[test]
fn stalled_manifest_times_out() {
    let (registry, _image, _dir, store) = setup();
    registry.set_handler(|req| {
        req.path.contains("/manifests/").then(|| {
            Response::new(200, Vec::new()).body(Body::Drip {
                bytes: vec![b' '; 100_000],
                every: Duration::from_millis(100),
            })
        })
    });
    expect_clean_error(&registry, &store, "stalled");
}

#[test]
fn retry_after_is_honoured() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let first = std::sync::atomic::AtomicUsize::new(0);
    registry.set_handler(move |req| {
        let n = first.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if req.path.contains("/manifests/") && n == 1 {
            return Some(Response::new(429, Vec::new()).header("Retry-After", "1"));
        }
        (req.path.ends_with(&path) && n < 6).then(|| Response::new(503, b"busy".to_vec()))
    });
    let start = Instant::now();
    let pulled = pull(&registry, &store).expect("succeeds after retries");
    support::assert_layers_match(&pulled, &image);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was waited for"
    );
}

#[test]
fn retry_after_beyond_our_patience() {
    let (registry, _image, _dir, store) = setup();
    registry.set_handler(|req| {
        req.path
            .contains("/manifests/")
            .then(|| Response::new(503, Vec::new()).header("Retry-After", "3600"))
    });
    expect_clean_error(&registry, &store, "retry after 3600");
}

#[test]
fn persistent_server_errors() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    registry.set_handler(move |req| {
        req.path
            .ends_with(&path)
            .then(|| Response::new(500, b"oops".to_vec()))
    });
    expect_clean_error(&registry, &store, "500");
    registry.set_handler(|req| {
        req.path
            .contains("/manifests/")
            .then(|| Response::new(429, Vec::new()))
    });
    expect_clean_error(&registry, &store, "429");
}

#[test]
fn malformed_www_authenticate() {
    let (registry, _image, _dir, store) = setup();
    for header in [
        r#"Bearer realm="/relative""#,
        "Bearer",
        "Negotiate xyz",
        r#"Bearer realm="https://x/t"junk"#,
    ] {
        let header = header.to_string();
        registry.set_handler(move |_| {
            Some(Response::new(401, Vec::new()).header("WWW-Authenticate", &header))
        });
        expect_clean_error(&registry, &store, "WWW-Authenticate");
    }
    registry.set_handler(|_| Some(Response::new(401, Vec::new())));
    expect_clean_error(&registry, &store, "WWW-Authenticate");
}

#[test]
fn garbage_token_response() {
    let (registry, _image, _dir, store) = setup();
    let realm = format!("http://{}/token", registry.host());
    registry.set_handler(move |req| {
        Some(match req.path.as_str() {
            "/token" => Response::new(200, b"<html>".to_vec()),
            _ => Response::new(401, Vec::new())
                .header("WWW-Authenticate", &format!(r#"Bearer realm="{realm}""#)),
        })
    });
    expect_clean_error(&registry, &store, "malformed token response");
}

#[test]
fn redirect_to_another_host_drops_authorization() {
    let (registry, image, _dir, store) = setup();
    let cdn = FakeRegistry::start();
    for blob in image.blobs() {
        cdn.add_blob(blob);
    }
    let realm = format!("http://{}/token", registry.host());
    let cdn_host = cdn.host();
    registry.set_handler(move |req| {
        if req.path == "/token" {
            return Some(Response::new(200, br#"{"token":"secret-token"}"#.to_vec()));
        }
        if req.header("authorization") != Some("Bearer secret-token") {
            return Some(
                Response::new(401, Vec::new())
                    .header("WWW-Authenticate", &format!(r#"Bearer realm="{realm}""#)),
            );
        }
        req.path.contains("/blobs/").then(|| {
            Response::new(307, Vec::new())
                .header("Location", &format!("http://{cdn_host}{}", req.path))
        })
    });
    let pulled = pull(&registry, &store).expect("redirected pull");
    support::assert_layers_match(&pulled, &image);
    let cdn_requests = cdn.requests();
    assert!(!cdn_requests.is_empty(), "blobs came from the other host");
    assert!(
        cdn_requests
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "Authorization was forwarded to another host"
    );
}

#[test]
fn redirect_loops_end() {
    let (registry, image, _dir, store) = setup();
    let path = layer_path(&image);
    let host = registry.host();
    registry.set_handler(move |req| {
        req.path.contains("/blobs/").then(|| {
            let next = if req.path.ends_with(&path) {
                format!("{path}-loop")
            } else {
                path.clone()
            };
            Response::new(302, Vec::new())
                .header("Location", &format!("http://{host}/v2/app{next}"))
        })
    });
    expect_clean_error(&registry, &store, "redirect");
}

#[test]
fn oversized_manifest() {
    let (registry, _image, _dir, store) = setup();
    let huge = Blob::new(images::OCI_MANIFEST, vec![b' '; 5 << 20]);
    registry.add_manifest("app", "latest", &huge);
    expect_clean_error(&registry, &store, "exceeds");
    // The same without an honest Content-Length: the cap holds while streaming.
    registry.set_handler(|req| {
        req.path.contains("/manifests/").then(|| {
            Response::new(200, Vec::new()).body(Body::Short {
                bytes: vec![b' '; 5 << 20],
                declared: 5 << 20,
            })
        })
    });
    expect_clean_error(&registry, &store, "exceeds");
}

#[test]
fn unknown_manifest_media_type() {
    let (registry, _image, _dir, store) = setup();
    let artifact = Blob::new(
        "application/vnd.example.artifact+json",
        br#"{"schemaVersion":2,"mediaType":"application/vnd.example.artifact+json"}"#.to_vec(),
    );
    registry.add_manifest("app", "latest", &artifact);
    expect_clean_error(&registry, &store, "unsupported manifest media type");
    let schema1 = Blob::new(
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        br#"{"schemaVersion":1,"name":"app","tag":"latest","fsLayers":[]}"#.to_vec(),
    );
    registry.add_manifest("app", "latest", &schema1);
    expect_clean_error(&registry, &store, "schema version 1");
}

#[test]
fn unknown_layer_media_type() {
    let (registry, image, _dir, store) = setup();
    let text = String::from_utf8(image.manifest.bytes.clone())
        .expect("utf8")
        .replace("tar+zstd", "tar+lz4");
    registry.add_manifest(
        "app",
        "latest",
        &Blob::new(images::OCI_MANIFEST, text.into_bytes()),
    );
    expect_clean_error(&registry, &store, "tar+lz4");
}

#[test]
fn descriptor_size_disagrees_with_blob() {
    let (registry, image, _dir, store) = setup();
    let real = image.layers[0].bytes.len();
    for (claimed, needle) in [(real + 10, "ended after"), (real - 10, "longer than")] {
        let text = String::from_utf8(image.manifest.bytes.clone())
            .expect("utf8")
            .replace(&format!("\"size\":{real}"), &format!("\"size\":{claimed}"));
        registry.add_manifest(
            "app",
            "latest",
            &Blob::new(images::OCI_MANIFEST, text.into_bytes()),
        );
        expect_clean_error(&registry, &store, needle);
    }
}

#[test]
fn manifest_digest_header_mismatch() {
    let (registry, image, _dir, store) = setup();
    let bytes = image.manifest.bytes.clone();
    registry.set_handler(move |req| {
        req.path.contains("/manifests/").then(|| {
            Response::new(200, bytes.clone())
                .header("Content-Type", images::OCI_MANIFEST)
                .header("Docker-Content-Digest", &Digest::of(b"other").to_string())
        })
    });
    expect_clean_error(&registry, &store, "expected");
}

#[test]
fn pinned_digest_mismatch() {
    let (registry, image, _dir, store) = setup();
    let wrong = Digest::of(b"not the manifest");
    registry.add_manifest("app", &wrong.to_string(), &image.manifest);
    let mut config = support::fast_config();
    config.add_insecure(&registry.host()).expect("host");
    let err = support::pull(
        &format!("{}/app@{wrong}", registry.host()),
        &store,
        &support::options(config),
    )
    .expect_err("mismatch");
    assert!(chain(&err).contains("expected"), "{}", chain(&err));
    assert_clean(&store);
}

#[test]
fn index_without_matching_platform() {
    let (registry, image, _dir, store) = setup();
    let index = images::index(
        &[
            (&image.manifest, "linux", "s390x"),
            (&image.manifest, "windows", "amd64"),
        ],
        false,
    );
    registry.add_manifest("app", "latest", &index);
    expect_clean_error(&registry, &store, "no image for platform linux/amd64");
}

#[test]
fn index_pointing_to_an_index() {
    let (registry, image, _dir, store) = setup();
    let inner = images::index(&[(&image.manifest, "linux", "amd64")], false);
    let mut outer = images::index(&[(&inner, "linux", "amd64")], false);
    // The inner entry keeps its index media type.
    let text = String::from_utf8(outer.bytes.clone()).expect("utf8");
    outer = Blob::new(images::OCI_INDEX, text.into_bytes());
    registry.add_manifest("app", "latest", &outer);
    registry.add_manifest("app", &inner.digest, &inner);
    expect_clean_error(&registry, &store, "index points to another index");
}

#[test]
fn image_for_another_platform() {
    let (registry, _image, _dir, store) = setup();
    let arm = images::image(&[(&[("a", b"a")], images::Compress::Gzip)], "arm64", false);
    registry.add_image("app", "latest", &arm);
    expect_clean_error(&registry, &store, "image is for linux/arm64");
    // Nothing of the layers was downloaded: the config stopped the pull first.
    assert_eq!(
        registry.gets(&format!("/blobs/{}", arm.layers[0].digest)),
        0
    );
}

#[test]
fn missing_manifest_and_blob() {
    let (registry, image, _dir, store) = setup();
    let mut config = support::fast_config();
    config.add_insecure(&registry.host()).expect("host");
    let err = support::pull(
        &format!("{}/app:nope", registry.host()),
        &store,
        &support::options(config),
    )
    .expect_err("no such tag");
    assert!(chain(&err).contains("not found"), "{}", chain(&err));
    let path = layer_path(&image);
    registry.set_handler(move |req| {
        req.path.ends_with(&path).then(|| {
            Response::new(
                404,
                br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#.to_vec(),
            )
        })
    });
    expect_clean_error(&registry, &store, "blob unknown");
}

#[test]
fn a_layer_announced_as_one_tebibyte_is_refused_before_any_byte_is_written() {
    let registry = FakeRegistry::start();
    let mut image = images::simple(false);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&image.manifest.bytes).expect("manifest json");
    manifest["layers"][0]["size"] = serde_json::json!(1u64 << 40);
    image.manifest = Blob::new(
        &image.manifest.media_type,
        serde_json::to_vec(&manifest).expect("json"),
    );
    registry.add_image("app", "latest", &image);
    let (_dir, store) = support::store();
    assert!(cache_files(&store).is_empty(), "a fresh cache");
    let chain = expect_clean_error(&registry, &store, "more than the layer-size limit");
    assert!(chain.contains("1099511627776"), "{chain}");
    assert!(
        cache_files(&store).is_empty(),
        "written: {:?}",
        cache_files(&store)
    );
    assert_no_blob_requested(&registry);
}

#[test]
fn a_smaller_custom_limit_refuses_a_normal_image() {
    let (registry, image, _dir, store) = setup();
    let largest = image.layers.iter().map(|l| l.bytes.len() as u64).max();
    let largest = largest.expect("layers");
    let total: u64 = image.layers.iter().map(|l| l.bytes.len() as u64).sum();

    let tight_layer = Limits {
        layer_size: largest - 1,
        ..Limits::default()
    };
    let err = pull_within(&registry, &store, tight_layer).expect_err("layer over the cap");
    let text = chain(&err);
    assert!(text.contains("layer-size limit of"), "{text}");
    assert!(text.contains(&(largest - 1).to_string()), "{text}");

    let tight_image = Limits {
        image_size: total - 1,
        ..Limits::default()
    };
    let err = pull_within(&registry, &store, tight_image).expect_err("image over the cap");
    let text = chain(&err);
    assert!(text.contains("image-size limit of"), "{text}");
    assert!(text.contains(&total.to_string()), "{text}");

    assert!(cache_files(&store).is_empty(), "{:?}", cache_files(&store));
    assert_no_blob_requested(&registry);
    assert_clean(&store);

    // At the limit exactly, the same image pulls.
    let exact = Limits {
        layer_size: largest,
        image_size: total,
        ..Limits::default()
    };
    let pulled = pull_within(&registry, &store, exact).expect("within the caps");
    support::assert_layers_match(&pulled, &image);
}

#[test]
fn a_blob_streaming_past_its_size_is_cut_off_and_removed() {
    // Without a Content-Length only our own byte count stops the body: the layer (1 MiB,
    // several chunks) arrives whole, then as much again.
    let registry = FakeRegistry::start();
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let image = images::image(&[(&[("big", &content)], Compress::None)], "amd64", false);
    registry.add_image("app", "latest", &image);
    let (_dir, store) = support::store();
    let path = layer_path(&image);
    let mut long = image.layers[0].bytes.clone();
    long.extend_from_slice(&image.layers[0].bytes);
    registry.set_handler(move |req| {
        req.path
            .ends_with(&path)
            .then(|| Response::new(200, Vec::new()).body(Body::Unframed(long.clone())))
    });
    let chain = expect_clean_error(&registry, &store, "is longer than its");
    assert!(
        chain.contains(&image.layers[0].bytes.len().to_string()),
        "{chain}"
    );
    // Only the (verified) config is left: no layer, no partial download.
    assert_eq!(
        cache_files(&store),
        [image.config.digest.strip_prefix("sha256:").expect("sha256")],
    );
}
