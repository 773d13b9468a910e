//! `kill -9` in the middle of a pull, then a rerun: the killed process leaves no visible
//! cache entry, and the rerun resumes the download and succeeds. The test re-executes its
//! own binary as the process to kill.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::images::{self, Compress};
use support::registry::{Body, FakeRegistry, Response};

const CHILD: &str = "KATALITE_TEST_PULL_CHILD";

#[test]
fn killed_pull_resumes() {
    if let Ok(spec) = std::env::var(CHILD) {
        // We are the child: pull until killed.
        let (host, root) = spec.split_once('|').expect("host|root");
        let store = imagebuilder::store::Store::open(root).expect("open");
        let mut config = imagebuilder::config::RegistryConfig::default();
        config.add_insecure(host).expect("host");
        let _ = support::pull(&format!("{host}/app"), &store, &support::options(config));
        return;
    }

    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let image = images::image(&[(&[("big", &big)], Compress::None)], "amd64", false);
    let layer = image.layers[0].clone();
    let registry = FakeRegistry::start();
    registry.add_image("app", "latest", &image);
    let stalled_once = Arc::new(AtomicBool::new(false));
    let flag = stalled_once.clone();
    let path = format!("/blobs/{}", layer.digest);
    let bytes = layer.bytes.clone();
    registry.set_handler(move |req| {
        (req.path.ends_with(&path) && !flag.swap(true, Ordering::SeqCst)).then(|| {
            Response::new(200, Vec::new()).body(Body::Pause {
                bytes: bytes.clone(),
                after: bytes.len() / 2,
                pause: Duration::from_secs(120),
            })
        })
    });
    let (_dir, store) = support::store();

    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "killed_pull_resumes", "--test-threads=1"])
        .env(
            CHILD,
            format!("{}|{}", registry.host(), store.root().display()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    let partial: PathBuf = store
        .root()
        .join("tmp")
        .join(format!("{}.partial", &layer.digest[7..]));
    let start = Instant::now();
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < (layer.bytes.len() / 2) as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child never got half the layer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    // Nothing of the killed pull is visible as a cache entry.
    assert!(!support::blob_files(&store).contains(&layer.digest[7..].to_string()));
    assert!(store.images().expect("index").is_empty());

    let mut config = support::fast_config();
    config.add_insecure(&registry.host()).expect("host");
    let pulled = support::pull(
        &format!("{}/app", registry.host()),
        &store,
        &support::options(config),
    )
    .expect("rerun succeeds");
    support::assert_layers_match(&pulled, &image);
    let layer_requests: Vec<_> = registry
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with(&layer.digest))
        .collect();
    assert_eq!(layer_requests.len(), 2);
    let range = layer_requests[1]
        .header("range")
        .expect("the rerun resumed with Range");
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .expect("byte offset");
    assert!(
        from >= (layer.bytes.len() / 2) as u64,
        "resumed from {from}"
    );
    assert!(!partial.exists(), "the partial file became the blob");
}
