//! Pulling from a (well-behaved) fake registry on 127.0.0.1: tags, digests, platform
//! selection, anonymous tokens, mirrors, the cache and pull policies, parallel pulls.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use imagebuilder::image::{LayerCompression, Platform};
use imagebuilder::source::{PullError, PullPolicy};
use support::images::{self, Compress};
use support::registry::{FakeRegistry, Response};

fn insecure(registry: &FakeRegistry) -> imagebuilder::config::RegistryConfig {
    let mut config = support::fast_config();
    config.add_insecure(&registry.host()).expect("valid host");
    config
}

#[test]
fn pulls_an_oci_image_by_tag_and_reuses_the_cache() {
    let registry = FakeRegistry::start();
    let image = images::simple(false);
    registry.add_image("library/app", "1.0", &image);
    let (_dir, store) = support::store();
    let mut opts = support::options(insecure(&registry));
    let source = format!("{}/library/app:1.0", registry.host());

    let pulled = support::pull(&source, &store, &opts).expect("pull");
    assert_eq!(pulled.reference, source);
    assert_eq!(pulled.manifest_digest, image.manifest.digest);
    assert_eq!(pulled.config.env, ["PATH=/usr/bin:/bin", "GREETING=hello"]);
    assert_eq!(pulled.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(pulled.config.cmd, ["echo hi"]);
    assert_eq!(pulled.config.working_dir, "/srv");
    assert_eq!(pulled.config.user, "1000:1000");
    assert_eq!(pulled.config.exposed_ports, ["80/tcp"]);
    assert_eq!(
        pulled
            .layers
            .iter()
            .map(|l| l.compression)
            .collect::<Vec<_>>(),
        [LayerCompression::Gzip, LayerCompression::Zstd]
    );
    support::assert_layers_match(&pulled, &image);

    let records = store.images().expect("index");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].reference, source);
    assert_eq!(records[0].manifest_digest, image.manifest.digest);

    // --pull missing: served from the cache without any request.
    let before = registry.requests().len();
    opts.policy = PullPolicy::Missing;
    assert_eq!(
        support::pull(&source, &store, &opts).expect("cached"),
        pulled
    );
    assert_eq!(
        registry.requests().len(),
        before,
        "no request for a cached image"
    );

    // --pull always: the manifest is fetched again, the blobs are not.
    opts.policy = PullPolicy::Always;
    support::pull(&source, &store, &opts).expect("re-pull");
    for layer in &image.layers {
        assert_eq!(registry.gets(&format!("/blobs/{}", layer.digest)), 1);
    }
    assert_eq!(registry.gets("/manifests/1.0"), 2);

    // --pull never works offline once cached.
    let offline = support::options(support::fast_config());
    let offline = imagebuilder::source::PullOptions {
        policy: PullPolicy::Never,
        ..offline
    };
    assert_eq!(
        support::pull(&source, &store, &offline).expect("never"),
        pulled
    );
}

#[test]
fn manifest_without_media_type_field_is_reused_from_the_cache() {
    let registry = FakeRegistry::start();
    let image = images::simple(false);
    let text = String::from_utf8(image.manifest.bytes.clone()).expect("utf8");
    let stripped = text.replace(&format!("\"mediaType\":\"{}\",", images::OCI_MANIFEST), "");
    assert_ne!(stripped, text, "mediaType removed");
    let manifest = images::Blob::new(images::OCI_MANIFEST, stripped.into_bytes());
    registry.add_manifest("app", "latest", &manifest);
    for blob in image.blobs() {
        registry.add_blob(blob);
    }
    let (_dir, store) = support::store();
    let source = format!("{}/app", registry.host());
    let mut opts = support::options(insecure(&registry));
    let pulled = support::pull(&source, &store, &opts).expect("Content-Type names the type");
    opts.policy = PullPolicy::Never;
    assert_eq!(
        support::pull(&source, &store, &opts).expect("from the cache"),
        pulled
    );
}

#[test]
fn a_damaged_cached_layer_is_fetched_again() {
    let registry = FakeRegistry::start();
    let image = images::simple(false);
    registry.add_image("app", "latest", &image);
    let (_dir, store) = support::store();
    let mut opts = support::options(insecure(&registry));
    let source = format!("{}/app", registry.host());
    let pulled = support::pull(&source, &store, &opts).expect("pull");

    let mut bytes = std::fs::read(&pulled.layers[0].path).expect("layer");
    bytes[10] ^= 0xff;
    std::fs::write(&pulled.layers[0].path, bytes).expect("flip a byte");

    opts.policy = PullPolicy::Never;
    assert!(
        support::pull(&source, &store, &opts).is_err(),
        "a corrupt layer is never handed out"
    );
    opts.policy = PullPolicy::Missing;
    let again = support::pull(&source, &store, &opts).expect("re-fetched");
    support::assert_layers_match(&again, &image);
    assert_eq!(
        registry.gets(&format!("/blobs/{}", image.layers[0].digest)),
        2
    );
}

#[test]
fn selects_the_platform_from_a_manifest_list() {
    let registry = FakeRegistry::start();
    let amd64 = images::simple(true);
    let arm64 = images::image(&[(&[("bin/arm", b"arm")], Compress::Gzip)], "arm64", true);
    let list = images::index(
        &[
            (&arm64.manifest, "linux", "arm64"),
            (&amd64.manifest, "linux", "amd64"),
        ],
        true,
    );
    registry.add_manifest("multi", "latest", &list);
    for image in [&amd64, &arm64] {
        registry.add_manifest("multi", &image.manifest.digest, &image.manifest);
        for blob in image.blobs() {
            registry.add_blob(blob);
        }
    }
    let (_dir, store) = support::store();
    let source = format!("{}/multi:latest", registry.host());
    let pulled =
        support::pull(&source, &store, &support::options(insecure(&registry))).expect("amd64");
    assert_eq!(pulled.manifest_digest, amd64.manifest.digest);
    support::assert_layers_match(&pulled, &amd64);

    let mut opts = support::options(insecure(&registry));
    opts.platform = Platform::parse("linux/arm64").expect("platform");
    let pulled = support::pull(&source, &store, &opts).expect("arm64");
    assert_eq!(pulled.manifest_digest, arm64.manifest.digest);

    // Pinned by the list's digest.
    let pinned = format!("{}/multi@{}", registry.host(), list.digest);
    let pulled =
        support::pull(&pinned, &store, &support::options(insecure(&registry))).expect("by digest");
    assert_eq!(pulled.manifest_digest, amd64.manifest.digest);
}

#[test]
fn anonymous_bearer_token_flow() {
    let registry = FakeRegistry::start();
    let image = images::simple(false);
    registry.add_image("library/busybox", "latest", &image);
    let realm = format!("http://{}/token", registry.host());
    registry.set_handler(move |req| {
        if req.path == "/token" {
            assert!(
                req.query
                    .contains("scope=repository%3Alibrary%2Fbusybox%3Apull"),
                "{}",
                req.query
            );
            return Some(Response::new(
                200,
                br#"{"token":"t0k3n","expires_in":300}"#.to_vec(),
            ));
        }
        (req.header("authorization") != Some("Bearer t0k3n")).then(|| {
            Response::new(401, Vec::new()).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{realm}",service="fake""#),
            )
        })
    });
    let (_dir, store) = support::store();
    let source = format!("{}/library/busybox", registry.host());
    let pulled =
        support::pull(&source, &store, &support::options(insecure(&registry))).expect("pull");
    support::assert_layers_match(&pulled, &image);
    assert!(registry.requests().iter().all(|r| !r
        .header("authorization")
        .is_some_and(|a| a.starts_with("Basic"))));
}

#[test]
fn token_expiry_is_handled_by_reauthenticating() {
    let registry = FakeRegistry::start();
    let image = images::simple(false);
    registry.add_image("app", "latest", &image);
    let realm = format!("http://{}/token", registry.host());
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    registry.set_handler(move |req| {
        if req.path == "/token" {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            return Some(Response::new(
                200,
                format!(r#"{{"token":"t{n}"}}"#).into_bytes(),
            ));
        }
        // Only the newest token is valid: the first one "expires" after the manifest.
        let current = format!(
            "Bearer t{}",
            counter.load(Ordering::SeqCst).saturating_sub(1)
        );
        let expired = req.path.contains("/blobs/") && counter.load(Ordering::SeqCst) == 1;
        (req.header("authorization") != Some(current.as_str()) || expired).then(|| {
            Response::new(401, Vec::new())
                .header("WWW-Authenticate", &format!(r#"Bearer realm="{realm}""#))
        })
    });
    let (_dir, store) = support::store();
    let source = format!("{}/app", registry.host());
    let pulled =
        support::pull(&source, &store, &support::options(insecure(&registry))).expect("pull");
    support::assert_layers_match(&pulled, &image);
    assert!(
        issued.load(Ordering::SeqCst) >= 2,
        "a second token was fetched"
    );
}

#[test]
fn docker_hub_is_served_by_a_local_mirror() {
    let mirror = FakeRegistry::start();
    let image = images::simple(true);
    mirror.add_image("library/busybox", "latest", &image);
    let (_dir, store) = support::store();
    let mut config = support::fast_config();
    config
        .add_mirror("docker.io", &format!("http://{}", mirror.host()), false)
        .expect("mirror");
    let pulled = support::pull("busybox", &store, &support::options(config)).expect("via mirror");
    assert_eq!(pulled.reference, "docker.io/library/busybox:latest");
    support::assert_layers_match(&pulled, &image);
    assert!(mirror.gets("/v2/library/busybox/manifests/latest") == 1);
}

#[test]
fn a_broken_mirror_falls_through_to_the_next() {
    let broken = FakeRegistry::start();
    broken.set_handler(|_| Some(Response::new(404, Vec::new())));
    let good = FakeRegistry::start();
    let image = images::simple(false);
    good.add_image("team/app", "v2", &image);
    // A closed port: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);

    let mut config = support::fast_config();
    for mirror in [closed_addr.to_string(), broken.host(), good.host()] {
        config
            .add_mirror(
                "registry.example.invalid",
                &format!("http://{mirror}"),
                false,
            )
            .expect("mirror");
    }
    let (_dir, store) = support::store();
    let start = std::time::Instant::now();
    let pulled = support::pull(
        "registry.example.invalid/team/app:v2",
        &store,
        &support::options(config),
    )
    .expect("third mirror");
    support::assert_layers_match(&pulled, &image);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(3),
        "dead mirrors are skipped without waiting: {:?}",
        start.elapsed()
    );
}

#[test]
fn all_endpoints_failing_reports_each() {
    let broken = FakeRegistry::start();
    broken.set_handler(|_| Some(Response::new(404, Vec::new())));
    let mut config = support::fast_config();
    // The origin, nonexistent.invalid, does not resolve.
    config
        .add_mirror(
            "nonexistent.invalid",
            &format!("http://{}", broken.host()),
            false,
        )
        .expect("mirror");
    let (_dir, store) = support::store();
    let err = support::pull("nonexistent.invalid/x", &store, &support::options(config))
        .expect_err("fails");
    let PullError::Registry { source, .. } = &err else {
        panic!("unexpected {err:?}")
    };
    let text = source.to_string();
    assert!(
        text.contains(&broken.host()) && text.contains("nonexistent.invalid"),
        "{text}"
    );
}

#[test]
fn eight_parallel_pulls_download_each_blob_once() {
    let registry = FakeRegistry::start();
    let big = vec![42u8; 3 << 20];
    let image = images::image(
        &[
            (&[("big", &big)], Compress::None),
            (&[("small", b"x")], Compress::Gzip),
        ],
        "amd64",
        false,
    );
    registry.add_image("app", "latest", &image);
    let (_dir, store) = support::store();
    let root = store.root().to_path_buf();
    let config = insecure(&registry);
    let source = format!("{}/app", registry.host());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (root, config, source) = (root.clone(), config.clone(), source.clone());
            std::thread::spawn(move || {
                let store = imagebuilder::store::Store::open(root).expect("open");
                support::pull(&source, &store, &support::options(config))
            })
        })
        .collect();
    for t in threads {
        let pulled = t.join().expect("thread").expect("pull");
        support::assert_layers_match(&pulled, &image);
    }
    for blob in image.blobs() {
        assert_eq!(
            registry.gets(&format!("/blobs/{}", blob.digest)),
            1,
            "{}",
            blob.digest
        );
    }
}
