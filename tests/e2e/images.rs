//! User stories for OCI images: pulled from the host's local registry (reached from the lab
//! as `KATALITE_E2E_REGISTRY`, e.g. 10.0.3.2:5000) as a mirror of docker.io, packed, booted.

use super::{katalite, Outcome};

/// The local registry serving `library/busybox` and `library/nginx` (`cargo xtask registry`).
fn registry() -> String {
    std::env::var("KATALITE_E2E_REGISTRY")
        .expect("KATALITE_E2E_REGISTRY must name the test registry: run `cargo xtask lab e2e`")
}

/// `katalite run -q OPTIONS REGISTRY/library/NAME COMMAND...` against the plain-http local
/// registry.
fn run_local(options: &[&str], name: &str, command: &[&str]) -> Outcome {
    let registry = registry();
    let image = format!("{registry}/library/{name}");
    let mut args = vec!["run", "-q", "--insecure-registry", &registry];
    args.extend_from_slice(options);
    args.push(&image);
    args.extend_from_slice(command);
    katalite(&args)
}

#[test]
fn busybox_from_docker_hub_through_a_local_mirror_prints_ok() {
    let mirror = format!("docker.io=http://{}", registry());
    let args = [
        "run",
        "-q",
        "--registry-mirror",
        &mirror,
        "docker.io/library/busybox",
        "echo",
        "ok",
    ];
    let run = katalite(&args);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout.trim_end(), "ok", "{}", run.describe());
}

#[test]
fn nginx_image_boots_and_its_binary_runs() {
    let run = run_local(&[], "nginx", &["nginx", "-v"]);
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
    let run = run_local(
        &["-w", "/etc/nginx"],
        "nginx",
        &["sh", "-c", "echo $PATH; pwd"],
    );
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let lines: Vec<&str> = run.stdout.lines().collect();
    let image_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    assert_eq!(lines, [image_path, "/etc/nginx"], "{}", run.describe());
}

#[test]
fn a_missing_image_fails_with_125() {
    let run = run_local(&[], "does-not-exist", &["true"]);
    assert_eq!(run.status, Some(125), "{}", run.describe());
    assert!(!run.stderr.trim().is_empty(), "{}", run.describe());
}
