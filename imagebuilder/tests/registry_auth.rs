//! Credentials from Docker's config.json (plain `auths` and a `credHelpers` helper) against
//! fake TLS registries with a self-made CA: basic auth, bearer tokens from the registry's
//! own host, and the cases where credentials must NOT be sent (a token realm on another
//! host or over plain http, a plain-http registry). One test: it owns DOCKER_CONFIG and PATH.

mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use imagebuilder::config::RegistryConfig;
use imagebuilder::store::Store;
use support::images;
use support::registry::{FakeRegistry, Response};

const BASIC: &str = "Basic dXNlcjpwYXNz"; // user:pass

fn config_with_ca(ca: &std::path::Path) -> RegistryConfig {
    let mut config = support::fast_config();
    config.ca.push(ca.to_path_buf());
    config
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

fn no_authorization(server: &FakeRegistry) -> bool {
    server
        .requests()
        .iter()
        .all(|r| r.header("authorization").is_none())
}

fn fresh_store() -> (tempfile::TempDir, Store) {
    support::store()
}

#[test]
fn credentials_go_only_where_they_belong() {
    let tls = support::tls::make();
    let image = images::simple(false);
    let registry = FakeRegistry::start_tls(tls.server.clone());
    registry.add_image("private/app", "latest", &image);
    let other_host = FakeRegistry::start_tls(tls.server.clone());
    let plain = FakeRegistry::start();

    let docker = tempfile::tempdir().expect("tempdir");
    let auths = serde_json::json!({
        "auths": {
            registry.host(): {"auth": "dXNlcjpwYXNz"},
            plain.host(): {"auth": "dXNlcjpwYXNz"},
        }
    });
    std::fs::write(docker.path().join("config.json"), auths.to_string()).expect("config.json");
    // The only test in this binary, so nothing else reads the environment meanwhile.
    std::env::set_var("DOCKER_CONFIG", docker.path());
    let source = format!("{}/private/app", registry.host());

    // Basic auth over TLS with the CA from the configuration.
    registry.set_handler(|req| {
        (req.header("authorization") != Some(BASIC)).then(|| {
            Response::new(401, Vec::new()).header("WWW-Authenticate", r#"Basic realm="fake""#)
        })
    });
    let (_d, store) = fresh_store();
    let pulled = support::pull(
        &source,
        &store,
        &support::options(config_with_ca(&tls.ca_file)),
    )
    .expect("basic auth over TLS");
    support::assert_layers_match(&pulled, &image);

    // Without the CA the TLS handshake fails, cleanly.
    let (_d, store) = fresh_store();
    let err = support::pull(&source, &store, &support::options(support::fast_config()))
        .expect_err("unknown CA");
    assert!(
        chain(&err).to_lowercase().contains("certificate"),
        "{}",
        chain(&err)
    );
    assert!(store.images().expect("index").is_empty());

    // Bearer token from a realm on the registry's own https host: credentials are sent.
    let own_realm = format!("https://{}/token", registry.host());
    registry.set_handler(move |req| {
        if req.path == "/token" {
            return Some(match req.header("authorization") {
                Some(BASIC) => Response::new(200, br#"{"access_token":"tok-own"}"#.to_vec()),
                _ => Response::new(401, Vec::new()),
            });
        }
        (req.header("authorization") != Some("Bearer tok-own")).then(|| {
            Response::new(401, Vec::new()).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{own_realm}",service="fake""#),
            )
        })
    });
    let (_d, store) = fresh_store();
    support::pull(
        &source,
        &store,
        &support::options(config_with_ca(&tls.ca_file)),
    )
    .expect("own realm");

    // A realm on another host: credentials are withheld, the realm refuses, clean error.
    let port = other_host.addr.port();
    let foreign_realm = format!("https://localhost:{port}/token");
    other_host.set_handler(|req| {
        Some(match req.header("authorization") {
            Some(BASIC) => Response::new(200, br#"{"token":"tok-foreign"}"#.to_vec()),
            _ => Response::new(401, Vec::new()),
        })
    });
    registry.set_handler(move |req| {
        (req.header("authorization") != Some("Bearer tok-foreign")).then(|| {
            Response::new(401, Vec::new()).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{foreign_realm}""#),
            )
        })
    });
    let (_d, store) = fresh_store();
    let err = support::pull(
        &source,
        &store,
        &support::options(config_with_ca(&tls.ca_file)),
    )
    .expect_err("withheld");
    assert!(
        chain(&err).contains("credentials were withheld"),
        "{}",
        chain(&err)
    );
    assert!(
        no_authorization(&other_host),
        "credentials leaked to another host"
    );
    assert!(store.images().expect("index").is_empty());

    // ...unless that host is trusted for this registry.
    let mut trusted = config_with_ca(&tls.ca_file);
    let text = format!(
        "[registries.\"{}\"]\nauth_hosts = [\"localhost:{port}\"]\n",
        registry.host()
    );
    let extra = RegistryConfig::from_toml(&text, std::path::Path::new("t.toml")).expect("toml");
    trusted.registries = extra.registries;
    let (_d, store) = fresh_store();
    support::pull(&source, &store, &support::options(trusted)).expect("trusted token host");
    assert!(other_host
        .requests()
        .iter()
        .any(|r| r.header("authorization") == Some(BASIC)));

    // A realm over plain http never gets credentials, even on a trusted host.
    let http_realm = format!("http://{}/token", plain.host());
    plain.set_handler(|req| {
        Some(match req.header("authorization") {
            None => Response::new(200, br#"{"token":"anon"}"#.to_vec()),
            Some(_) => Response::new(400, Vec::new()),
        })
    });
    registry.set_handler(move |req| {
        (req.header("authorization") != Some("Bearer anon")).then(|| {
            Response::new(401, Vec::new()).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{http_realm}""#),
            )
        })
    });
    let mut config = config_with_ca(&tls.ca_file);
    let text = format!(
        "[registries.\"{}\"]\nauth_hosts = [\"{}\"]\n",
        registry.host(),
        plain.host()
    );
    config.registries = RegistryConfig::from_toml(&text, std::path::Path::new("t.toml"))
        .expect("toml")
        .registries;
    let (_d, store) = fresh_store();
    support::pull(&source, &store, &support::options(config)).expect("anonymous token over http");
    assert!(no_authorization(&plain), "credentials sent over plain http");

    // A plain-http registry never gets credentials either.
    plain.add_image("private/app", "latest", &image);
    plain.set_handler(|_| {
        Some(Response::new(401, Vec::new()).header("WWW-Authenticate", r#"Basic realm="x""#))
    });
    let mut config = support::fast_config();
    config.add_insecure(&plain.host()).expect("host");
    let (_d, store) = fresh_store();
    let err = support::pull(
        &format!("{}/private/app", plain.host()),
        &store,
        &support::options(config),
    )
    .expect_err("no credentials over http");
    assert!(chain(&err).contains("not authorized"), "{}", chain(&err));
    assert!(no_authorization(&plain));

    // credHelpers: the helper binary supplies the password.
    let bin = tempfile::tempdir().expect("tempdir");
    let helper = bin.path().join("docker-credential-fake");
    let mut script = std::fs::File::create(&helper).expect("helper");
    writeln!(
        script,
        "#!/bin/sh\ncat >/dev/null\necho '{{\"Username\":\"user\",\"Secret\":\"pass\"}}'"
    )
    .expect("write helper");
    drop(script);
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let helpers = serde_json::json!({"credHelpers": {registry.host(): "fake"}});
    std::fs::write(docker.path().join("config.json"), helpers.to_string()).expect("config.json");
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{}:{path}", bin.path().display()));
    registry.set_handler(|req| {
        (req.header("authorization") != Some(BASIC)).then(|| {
            Response::new(401, Vec::new()).header("WWW-Authenticate", r#"Basic realm="fake""#)
        })
    });
    let (_d, store) = fresh_store();
    support::pull(
        &source,
        &store,
        &support::options(config_with_ca(&tls.ca_file)),
    )
    .expect("cred helper");
}
