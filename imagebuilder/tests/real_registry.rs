//! Pulls from Debian's docker-registry (`cargo xtask registry start [--tls-auth]`), run
//! only when `KATALITE_TEST_REGISTRY=host:port` names the plain instance holding
//! library/busybox and library/nginx. With `KATALITE_TEST_REGISTRY_TLS=host:port` the
//! basic-auth-over-TLS instance is tested too; its CA and password are read from
//! `$KATALITE_REGISTRY_DIR/tls-auth/` (default /var/tmp/katalite-registry), user `katalite`.

mod support;

use std::path::PathBuf;
use std::time::Instant;

use imagebuilder::config::RegistryConfig;
use imagebuilder::image::LayerCompression;
use imagebuilder::source::PullPolicy;

fn plain_registry() -> Option<String> {
    let host = std::env::var("KATALITE_TEST_REGISTRY")
        .ok()
        .filter(|h| !h.is_empty());
    if host.is_none() {
        eprintln!("KATALITE_TEST_REGISTRY not set: real registry tests skipped");
    }
    host
}

fn insecure(host: &str) -> RegistryConfig {
    let mut config = RegistryConfig::default();
    config.add_insecure(host).expect("host");
    config
}

#[test]
fn pulls_busybox_and_nginx_over_http() {
    let Some(host) = plain_registry() else { return };
    let (_d, store) = support::store();
    let opts = support::options(insecure(&host));

    let start = Instant::now();
    let busybox =
        support::pull(&format!("{host}/library/busybox:latest"), &store, &opts).expect("busybox");
    eprintln!("pull busybox: {:?}", start.elapsed());
    assert!(!busybox.layers.is_empty());
    assert!(busybox.layers.iter().all(|l| l.path.is_file()));

    let start = Instant::now();
    let nginx = support::pull(&format!("{host}/library/nginx"), &store, &opts).expect("nginx");
    eprintln!(
        "pull nginx: {:?} ({} layers)",
        start.elapsed(),
        nginx.layers.len()
    );
    assert!(
        nginx.layers.len() > 1,
        "the nginx test image has several layers"
    );
    assert!(nginx
        .layers
        .iter()
        .all(|l| l.compression != LayerCompression::Zstd || l.path.is_file()));
    let argv: Vec<&str> = nginx
        .config
        .entrypoint
        .iter()
        .chain(&nginx.config.cmd)
        .map(String::as_str)
        .collect();
    assert!(argv.contains(&"nginx"), "{argv:?}");
    assert!(nginx.config.env.iter().any(|e| e.starts_with("PATH=")));

    // Cached: no network needed any more.
    let mut never = support::options(RegistryConfig::default());
    never.policy = PullPolicy::Never;
    let start = Instant::now();
    let again =
        support::pull(&format!("{host}/library/nginx"), &store, &never).expect("cached nginx");
    eprintln!("cached nginx (layers re-verified): {:?}", start.elapsed());
    assert_eq!(again.manifest_digest, nginx.manifest_digest);
}

#[test]
fn docker_hub_through_the_local_registry_as_mirror() {
    let Some(host) = plain_registry() else { return };
    let (_d, store) = support::store();
    let mut config = RegistryConfig::default();
    config
        .add_mirror("docker.io", &format!("http://{host}"), false)
        .expect("mirror");
    let opts = support::options(config);
    let busybox =
        support::pull("busybox", &store, &opts).expect("docker.io/library/busybox via mirror");
    assert_eq!(busybox.reference, "docker.io/library/busybox:latest");
    let nginx =
        support::pull("docker.io/library/nginx:latest", &store, &opts).expect("nginx via mirror");
    assert!(nginx.layers.len() > 1);
    let names: Vec<String> = store
        .images()
        .expect("index")
        .into_iter()
        .map(|r| r.reference)
        .collect();
    assert_eq!(
        names,
        [
            "docker.io/library/busybox:latest",
            "docker.io/library/nginx:latest"
        ]
    );
}

#[test]
fn basic_auth_over_tls_with_own_ca() {
    let Some(host) = std::env::var("KATALITE_TEST_REGISTRY_TLS")
        .ok()
        .filter(|h| !h.is_empty())
    else {
        eprintln!("KATALITE_TEST_REGISTRY_TLS not set: TLS registry test skipped");
        return;
    };
    let dir = std::env::var_os("KATALITE_REGISTRY_DIR")
        .map_or_else(
            || PathBuf::from("/var/tmp/katalite-registry"),
            PathBuf::from,
        )
        .join("tls-auth");
    let password = std::fs::read_to_string(dir.join("password")).expect("registry password");
    let mut config = RegistryConfig::default();
    config.ca.push(dir.join("ca.crt"));
    let source = format!("{host}/library/busybox:latest");

    // Without credentials: refused, cleanly.
    let empty = tempfile::tempdir().expect("tempdir");
    std::env::set_var("DOCKER_CONFIG", empty.path());
    let (_d, store) = support::store();
    let err = support::pull(&source, &store, &support::options(config.clone()))
        .expect_err("no credentials");
    assert!(format!("{err:?}").contains("Unauthorized"), "{err:?}");

    // With credentials from config.json.
    let docker = tempfile::tempdir().expect("tempdir");
    let auth = base64_encode(format!("katalite:{}", password.trim()).as_bytes());
    let json = serde_json::json!({"auths": {host.clone(): {"auth": auth}}});
    std::fs::write(docker.path().join("config.json"), json.to_string()).expect("config.json");
    std::env::set_var("DOCKER_CONFIG", docker.path());
    let pulled =
        support::pull(&source, &store, &support::options(config)).expect("basic auth over TLS");
    assert!(!pulled.layers.is_empty());
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(TABLE[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_encode(input.as_bytes()), want);
    }
}
