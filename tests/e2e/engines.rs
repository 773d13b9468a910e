//! katalite as the OCI runtime of the real engines, beside runc in the same engine:
//! dockerd with `--runtime katalite` (daemon.json points at `katalite-runc`), podman with
//! `--runtime katalite-runc`, and containerd's own runc shim driving `katalite-runc`.
//! They need `cargo xtask lab e2e --runtimes` (docker, podman and ctr on PATH, the
//! daemons started); anywhere else they fail loudly.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{OnceLock, PoisonError, RwLock, RwLockReadGuard};
use std::thread;
use std::time::Instant;

use super::{rootfs, Outcome, RUN_TIMEOUT};

/// The busybox test tree imported once into each engine.
pub(super) const IMAGE: &str = "katalite-e2e-bb";

/// Held by every test that needs containerd (dockerd's too) for reading, and for writing
/// by the one that restarts it (shim.rs), so no other test talks to a containerd that is
/// going away.
pub(super) static CONTAINERD: RwLock<()> = RwLock::new(());

/// [`CONTAINERD`] for reading (a failed test's panic does not poison it for the others).
pub(super) fn containerd_shared() -> RwLockReadGuard<'static, ()> {
    CONTAINERD.read().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `program ARGS` with `stdin` (`None`: /dev/null) and waits at most [`RUN_TIMEOUT`].
pub(super) fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Outcome {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{program} must be on PATH (lab e2e --runtimes): {err}"));
    if let (Some(data), Some(mut pipe)) = (stdin.map(<[u8]>::to_vec), child.stdin.take()) {
        thread::spawn(move || pipe.write_all(&data));
    }
    let waiter = thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() {
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "{program} {args:?} did not finish within {RUN_TIMEOUT:?}"
        );
        thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = waiter.join().expect("waiter").expect("wait");
    Outcome {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `sh -c SCRIPT`, for pipelines.
pub(super) fn shell(script: &str) -> Outcome {
    run("sh", &["-c", script], None)
}

/// The busybox tree as a Docker image, exported once as an archive the other engines load;
/// Docker itself runs it as `docker load` brought it back (no registry in the lab).
pub(super) fn docker_image() -> &'static str {
    static ARCHIVE: OnceLock<String> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let archive = std::env::temp_dir().join("katalite-e2e-bb.tar");
        let archive = archive.to_string_lossy().into_owned();
        let script = format!(
            "set -e; tar -C '{}' -c . | docker import - {IMAGE} >/dev/null; \
             docker save -o '{archive}' {IMAGE}; docker rmi {IMAGE} >/dev/null; \
             docker load -q -i '{archive}'",
            rootfs("busybox")
        );
        let import = shell(&script);
        assert_eq!(import.status, Some(0), "{}", import.describe());
        archive
    })
}

/// The guest kernel's release as katalite reports it, and the lab's own.
pub(super) fn kernels() -> (String, String) {
    let host = run("uname", &["-r"], None).stdout.trim().to_string();
    let version = run("katalite", &["--version"], None).stdout;
    assert!(!host.is_empty(), "no uname -r");
    (version, host)
}

#[test]
fn docker_runs_katalite_vms_beside_runc_containers() {
    let _containerd = containerd_shared();
    docker_image();
    let (katalite_version, host_kernel) = kernels();
    let vm = run(
        "docker",
        &[
            "run",
            "--rm",
            "--runtime",
            "katalite",
            IMAGE,
            "sh",
            "-c",
            "uname -r; exit 3",
        ],
        None,
    );
    assert_eq!(vm.status, Some(3), "{}", vm.describe());
    let guest_kernel = vm.stdout.trim();
    assert_ne!(guest_kernel, host_kernel, "{}", vm.describe());
    assert!(
        katalite_version.contains(guest_kernel.split('-').next().unwrap_or("?")),
        "guest kernel {guest_kernel} is not katalite's ({katalite_version})"
    );
    let plain = run("docker", &["run", "--rm", IMAGE, "uname", "-r"], None);
    assert_eq!(plain.status, Some(0), "{}", plain.describe());
    assert_eq!(plain.stdout.trim(), host_kernel, "{}", plain.describe());

    let env_and_stdin = run(
        "docker",
        &[
            "run",
            "--rm",
            "-i",
            "-e",
            "GREETING=hi",
            "--runtime",
            "katalite",
            IMAGE,
            "sh",
            "-c",
            "read line; echo \"$GREETING $line\"",
        ],
        Some(b"there\n"),
    );
    assert_eq!(
        env_and_stdin.status,
        Some(0),
        "{}",
        env_and_stdin.describe()
    );
    assert_eq!(
        env_and_stdin.stdout,
        "hi there\n",
        "{}",
        env_and_stdin.describe()
    );
    let tty = run(
        "docker",
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            "katalite",
            IMAGE,
            "sh",
            "-c",
            "test -t 1 && echo is-a-tty; exit 2",
        ],
        None,
    );
    assert_eq!(tty.status, Some(2), "{}", tty.describe());
    assert!(tty.stdout.contains("is-a-tty"), "{}", tty.describe());
}

#[test]
fn docker_detached_katalite_containers_take_exec_and_stop() {
    let _containerd = containerd_shared();
    docker_image();
    let name = "katalite-e2e-detached";
    let _ = run("docker", &["rm", "-f", name], None);
    let started = run(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            name,
            "--runtime",
            "katalite",
            IMAGE,
            "sleep",
            "300",
        ],
        None,
    );
    assert_eq!(started.status, Some(0), "{}", started.describe());
    let exec = run(
        "docker",
        &["exec", name, "sh", "-c", "echo exec-ok; exit 6"],
        None,
    );
    assert_eq!(exec.status, Some(6), "{}", exec.describe());
    assert_eq!(exec.stdout, "exec-ok\n", "{}", exec.describe());
    let ps = run("docker", &["ps", "--filter", &format!("name={name}")], None);
    assert!(ps.stdout.contains(name), "{}", ps.describe());
    let stop = run("docker", &["stop", name], None);
    assert_eq!(stop.status, Some(0), "{}", stop.describe());
    let code = run(
        "docker",
        &["inspect", name, "--format", "{{.State.ExitCode}}"],
        None,
    );
    assert_eq!(code.stdout.trim(), "143", "{}", code.describe());
    let removed = run("docker", &["rm", name], None);
    assert_eq!(removed.status, Some(0), "{}", removed.describe());
}

#[test]
fn podman_runs_katalite_runc_as_its_runtime() {
    let archive = docker_image();
    let load = run("podman", &["load", "-q", "-i", archive], None);
    assert_eq!(load.status, Some(0), "{}", load.describe());
    let (_, host_kernel) = kernels();
    let image = format!("localhost/{IMAGE}");
    let vm = run(
        "podman",
        &[
            "--runtime",
            "/usr/local/bin/katalite-runc",
            "run",
            "--rm",
            &image,
            "sh",
            "-c",
            "uname -r; exit 5",
        ],
        None,
    );
    assert_eq!(vm.status, Some(5), "{}", vm.describe());
    assert_ne!(vm.stdout.trim(), host_kernel, "{}", vm.describe());
}

#[test]
fn containerds_runc_shim_drives_katalite_runc() {
    let _containerd = containerd_shared();
    let archive = docker_image();
    let import = run("ctr", &["images", "import", archive], None);
    assert_eq!(import.status, Some(0), "{}", import.describe());
    let (_, host_kernel) = kernels();
    let image = format!("docker.io/library/{IMAGE}:latest");
    let vm = run(
        "ctr",
        &[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.runc.v2",
            "--runc-binary",
            "/usr/local/bin/katalite-runc",
            &image,
            "katalite-e2e-ctr",
            "sh",
            "-c",
            "uname -r; exit 3",
        ],
        None,
    );
    assert_eq!(vm.status, Some(3), "{}", vm.describe());
    assert_ne!(vm.stdout.trim(), host_kernel, "{}", vm.describe());
    let plain = run(
        "ctr",
        &[
            "run",
            "--rm",
            &image,
            "katalite-e2e-ctr-runc",
            "uname",
            "-r",
        ],
        None,
    );
    assert_eq!(plain.status, Some(0), "{}", plain.describe());
    assert_eq!(plain.stdout.trim(), host_kernel, "{}", plain.describe());
}

#[test]
fn docker_publishes_a_katalite_containers_port_on_its_own_network() {
    let _containerd = containerd_shared();
    docker_image();
    let name = "katalite-e2e-web";
    let _ = run("docker", &["rm", "-f", name], None);
    let started = run(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            name,
            "--runtime",
            "katalite",
            "-p",
            "18080:80",
            IMAGE,
            "sh",
            "-c",
            "hostname > /tmp/index.html; ip -4 addr show eth0 >> /tmp/index.html; \
                       exec httpd -f -p 80 -h /tmp",
        ],
        None,
    );
    assert_eq!(started.status, Some(0), "{}", started.describe());
    let address = run(
        "docker",
        &[
            "inspect",
            name,
            "--format",
            "{{.NetworkSettings.IPAddress}}",
        ],
        None,
    );
    let address = address.stdout.trim().to_string();
    assert!(!address.is_empty(), "no address for {name}");
    // Through Docker's own port mapping, and straight to the container's bridge address,
    // which the guest now holds.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let page = loop {
        let page = run(
            "wget",
            &["-q", "-O", "-", "-T", "5", "http://127.0.0.1:18080/"],
            None,
        );
        if page.status == Some(0) || Instant::now() > deadline {
            break page;
        }
        thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(page.status, Some(0), "{}", page.describe());
    assert!(
        page.stdout.contains(&format!("inet {address}/")),
        "{}",
        page.describe()
    );
    let direct = run(
        "wget",
        &["-q", "-O", "-", "-T", "5", &format!("http://{address}:80/")],
        None,
    );
    assert_eq!(direct.stdout, page.stdout, "{}", direct.describe());
    // The guest reaches out through the bridge's gateway (the lab's host side).
    let out = run(
        "docker",
        &["exec", name, "sh", "-c", "ip route | grep default"],
        None,
    );
    assert!(out.stdout.contains("default via"), "{}", out.describe());
    let removed = run("docker", &["rm", "-f", name], None);
    assert_eq!(removed.status, Some(0), "{}", removed.describe());
}

#[test]
fn docker_network_none_gives_a_katalite_container_loopback_only() {
    let _containerd = containerd_shared();
    docker_image();
    let out = run(
        "docker",
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--runtime",
            "katalite",
            IMAGE,
            "sh",
            "-c",
            "ls /sys/class/net",
        ],
        None,
    );
    assert_eq!(out.status, Some(0), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "lo", "{}", out.describe());
}

#[test]
fn docker_ipv6_network_gives_a_katalite_container_its_address_and_route() {
    let _containerd = containerd_shared();
    docker_image();
    let network = "katalite-e2e-v6";
    let _ = run("docker", &["network", "rm", network], None);
    let created = run(
        "docker",
        &[
            "network",
            "create",
            "--ipv6",
            "--subnet",
            "fd00:dead:beef::/64",
            network,
        ],
        None,
    );
    assert_eq!(created.status, Some(0), "{}", created.describe());
    // The guest's own stack: the engine's global address on eth0, the default route via
    // the bridge, and neighbour discovery and ICMPv6 to the gateway through the interface.
    let script = "ip -6 addr show dev eth0 scope global; ip -6 route show default; \
                  ping6 -c 1 -W 10 fd00:dead:beef::1 >/dev/null && echo v6-gateway-answers; \
                  ip -4 addr show dev eth0 | grep -q inet && echo v4-too";
    let out = run(
        "docker",
        &[
            "run",
            "--rm",
            "--network",
            network,
            "--runtime",
            "katalite",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
        None,
    );
    let _ = run("docker", &["network", "rm", network], None);
    assert_eq!(out.status, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("inet6 fd00:dead:beef::") && out.stdout.contains("/64"),
        "no global IPv6 address: {}",
        out.describe()
    );
    assert!(
        out.stdout.contains("default via fd00:dead:beef::1"),
        "no default IPv6 route: {}",
        out.describe()
    );
    assert!(
        out.stdout.contains("v6-gateway-answers") && out.stdout.contains("v4-too"),
        "{}",
        out.describe()
    );
}
