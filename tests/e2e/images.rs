//! User stories for OCI images: pulled from the host's local registry (reached from the lab
//! as `KATALITE_E2E_REGISTRY`, e.g. 10.0.2.2:5000) as a mirror of docker.io, packed, booted.

use super::katalite;

/// The local registry serving `library/busybox` and `library/nginx` (`cargo xtask registry`).
fn registry() -> String {
    std::env::var("KATALITE_E2E_REGISTRY")
        .expect("KATALITE_E2E_REGISTRY must name the test registry: run `cargo xtask lab e2e`")
}

#[test]
fn busybox_from_docker_hub_through_a_local_mirror_prints_ok() {
    let mirror = format!("docker.io=http://{}", registry());
    let run = katalite(&[
        "run",
        "-q",
        "--registry-mirror",
        &mirror,
        "docker.io/library/busybox",
        "echo",
        "ok",
    ]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout.trim_end(), "ok", "{}", run.describe());
}

#[test]
fn nginx_image_boots_and_its_binary_runs() {
    let registry = registry();
    let image = format!("{registry}/library/nginx");
    let run = katalite(&[
        "run",
        "-q",
        "--insecure-registry",
        &registry,
        &image,
        "nginx",
        "-v",
    ]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    // `nginx -v` prints its version on stderr.
    let output = format!("{}{}", run.stdout, run.stderr);
    assert!(
        output.contains("nginx version: nginx/"),
        "{}",
        run.describe()
    );
}

#[test]
fn image_config_env_and_workdir_reach_the_workload() {
    let registry = registry();
    let image = format!("{registry}/library/nginx");
    let run = katalite(&[
        "run",
        "-q",
        "--insecure-registry",
        &registry,
        "-w",
        "/etc/nginx",
        &image,
        "sh",
        "-c",
        "echo $PATH; pwd",
    ]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    );
    assert_eq!(
        lines.get(1).copied(),
        Some("/etc/nginx"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_missing_image_fails_with_125() {
    let registry = registry();
    let image = format!("{registry}/library/does-not-exist");
    let run = katalite(&[
        "run",
        "-q",
        "--insecure-registry",
        &registry,
        &image,
        "true",
    ]);
    assert_eq!(run.status, Some(125), "{}", run.describe());
    assert!(!run.stderr.trim().is_empty(), "{}", run.describe());
}
