//! Tests of `katalite run`'s front end: flags to spec, env files, the written initramfs.

use std::net::{IpAddr, Ipv4Addr};

use clap::Parser;
use guest_init::TmpfsMount;
use imagebuilder::source::PullPolicy;
use vmm::net::usernet::Protocol;

use super::*;
use crate::cli::{Cli, Command};
use crate::network::{NetworkMode, PortMapping};

fn args(argv: &[&str]) -> RunArgs {
    let cli = Cli::try_parse_from(["katalite", "run"].iter().chain(argv)).expect("valid arguments");
    match cli.command {
        Command::Run(run) => *run,
        _ => panic!("not a run"),
    }
}

/// The spec of `katalite run ARGV` with no host environment.
fn spec(argv: &[&str]) -> ContainerSpec {
    container_spec(&args(argv), |_| None).expect("spec")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn no_flags_mean_dockers_defaults() {
    let spec = spec(&["busybox"]);
    assert_eq!(
        spec,
        ContainerSpec {
            root: RootSpec {
                source: RootSource::Image {
                    reference: "busybox".into(),
                    pull: PullPolicy::Missing,
                    fetch: FetchOptions::default(),
                },
                ..RootSpec::default()
            },
            ..ContainerSpec::default()
        }
    );
}

#[test]
fn flags_become_the_spec() {
    let spec = spec(&[
        "-it",
        "--rm",
        "-d",
        "--name",
        "web",
        "-e",
        "A=1",
        "-w",
        "/srv",
        "-u",
        "1000:1000",
        "--entrypoint",
        "/bin/sh",
        "--cpus",
        "1.5",
        "-m",
        "1g",
        "--read-only",
        "--stop-timeout",
        "3",
        "--pull",
        "never",
        "-q",
        "--platform",
        "linux/arm64",
        "--registry-ca",
        "/ca.pem",
        "-p",
        "0.0.0.0:8080:80/udp",
        "--network",
        "user:allow_host_loopback=true",
        "--security-opt",
        "seccomp=unconfined",
        "--kernel",
        "/boot/vmlinux",
        "--kernel-log",
        "--kernel-arg",
        "initcall_debug",
        "--boot-probe",
        "busybox",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(spec.name.as_deref(), Some("web"));
    let RootSource::Image {
        reference,
        pull,
        fetch,
    } = &spec.root.source
    else {
        panic!("not an image: {:?}", spec.root.source);
    };
    assert_eq!((reference.as_str(), *pull), ("busybox", PullPolicy::Never));
    assert!(fetch.quiet);
    assert_eq!(fetch.platform.as_deref(), Some("linux/arm64"));
    assert_eq!(fetch.ca, [PathBuf::from("/ca.pem")]);
    assert!(spec.root.read_only);
    assert_eq!(spec.root.delivery, RootDelivery::Disk);
    assert_eq!(
        spec.process,
        ProcessSpec {
            entrypoint: Some(strings(&["/bin/sh"])),
            command: strings(&["sh", "-c", "exit 3"]),
            env: strings(&["A=1"]),
            working_dir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            // The name is the default hostname.
            hostname: Some("web".into()),
        }
    );
    assert_eq!(
        spec.resources,
        Resources {
            cpus: 2,
            memory_mib: 1024
        }
    );
    assert_eq!(
        spec.network,
        NetworkSpec {
            mode: NetworkMode::User {
                allow_host_loopback: true
            },
            publish: vec![PortMapping {
                host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Udp,
            }],
        }
    );
    assert_eq!(
        spec.stdio,
        StdioSpec {
            tty: true,
            interactive: true
        }
    );
    assert!(spec.auto_remove && spec.detach && spec.seccomp_unconfined);
    assert_eq!(spec.stop_timeout_secs, 3);
    assert_eq!(
        spec.guest,
        GuestSpec {
            kernel: Some("/boot/vmlinux".into()),
            kernel_log: true,
            kernel_args: strings(&["initcall_debug"]),
            boot_probe: true,
        }
    );
}

#[test]
fn hostname_is_the_flag_then_the_name_then_left_to_the_id() {
    let hostname = |argv: &[&str]| spec(argv).process.hostname;
    assert_eq!(
        hostname(&["-h", "box", "--name", "web", "img"]).as_deref(),
        Some("box")
    );
    assert_eq!(hostname(&["--name", "web", "img"]).as_deref(), Some("web"));
    assert_eq!(hostname(&["img"]), None);
}

#[test]
fn an_empty_entrypoint_clears_the_images() {
    assert_eq!(
        spec(&["--entrypoint", "", "img", "ls"]).process.entrypoint,
        Some(Vec::new())
    );
    assert_eq!(spec(&["img"]).process.entrypoint, None);
}

#[test]
fn relative_host_paths_become_absolute() {
    let cwd = std::env::current_dir().expect("cwd");
    let spec = spec(&[
        "--rootfs",
        "root",
        "-v",
        "data:/data",
        "-v",
        "./here:/here:ro",
        "--mount",
        "type=bind,source=/abs,target=/abs",
        "--tmpfs",
        "/run:size=1m",
        "--kernel",
        "vmlinux",
        "true",
    ]);
    assert_eq!(
        spec.root.source,
        RootSource::Rootfs {
            path: cwd.join("root")
        }
    );
    assert_eq!(spec.image_display(), cwd.join("root").display().to_string());
    assert_eq!(spec.guest.kernel, Some(cwd.join("vmlinux")));
    assert_eq!(spec.process.command, strings(&["true"]));
    let sources: Vec<&SpecSource> = spec.mounts.iter().map(|m| &m.source).collect();
    assert_eq!(
        sources,
        [
            &SpecSource::Volume(Some("data".into())),
            &SpecSource::Bind {
                path: cwd.join("./here"),
                create: true
            },
            &SpecSource::Bind {
                path: "/abs".into(),
                create: false
            },
            &SpecSource::Tmpfs(TmpfsMount {
                size_bytes: Some(1 << 20),
                mode: None,
                exec: false
            }),
        ]
    );
    assert!(spec.mounts[1].read_only);
}

#[test]
fn bench_flags_pick_the_initramfs() {
    assert_eq!(
        spec(&["--image-root", "initramfs", "img"]).root.delivery,
        RootDelivery::Initramfs
    );
    assert_eq!(
        spec(&["--write-initramfs", "/tmp/x", "img"]).root.delivery,
        RootDelivery::Initramfs
    );
}

#[test]
fn env_files_then_e_entries_with_host_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("env");
    std::fs::write(&file, "F=file\nA=file\nHOSTVAR\n").expect("write");
    let file = file.display().to_string();
    let run = args(&[
        "--env-file",
        &file,
        "-e",
        "A=cli",
        "-e",
        "HOSTVAR",
        "-e",
        "MISSING",
        "img",
    ]);
    let host = |name: &str| (name == "HOSTVAR").then(|| "h".to_string());
    let spec = container_spec(&run, host).expect("spec");
    assert_eq!(
        spec.process.env,
        strings(&["F=file", "A=file", "HOSTVAR=h", "A=cli", "HOSTVAR=h"])
    );
}

#[test]
fn conversion_errors_read_as_before() {
    let err = container_spec(&args(&[]), |_| None).expect_err("no image");
    assert_eq!(
        err.to_string(),
        "\"katalite run\" requires an image (or --rootfs DIR)"
    );
    let missing = args(&["--env-file", "/nonexistent/env", "img"]);
    let err = container_spec(&missing, |_| None).expect_err("no env file");
    assert_eq!(err.to_string(), "cannot read env file /nonexistent/env");
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("env");
    std::fs::write(&bad, "MY VAR=1\n").expect("write");
    let bad_file = bad.display().to_string();
    let err = container_spec(&args(&["--env-file", &bad_file, "img"]), |_| None)
        .expect_err("bad env file");
    assert_eq!(
        format!("{err:#}"),
        format!("invalid env file {bad_file}: variable 'MY VAR' contains whitespaces")
    );
}

#[test]
fn a_converted_spec_survives_json() {
    let spec = spec(&[
        "--name", "web", "-v", "/h:/d", "-p", "8080:80", "-e", "A=1", "busybox", "echo", "hi",
    ]);
    let json = serde_json::to_vec(&spec).expect("serialize");
    let back: ContainerSpec = serde_json::from_slice(&json).expect("deserialize");
    assert_eq!(back, spec);
}

#[test]
fn env_files_read_as_docker_reads_them() {
    let host = |name: &str| (name == "HOSTVAR").then(|| "from host".to_string());
    let text =
        "\u{feff}# a comment\n\nA=1\n  B= spaced value \nHOSTVAR\nUNSET\r\nC=x=y\n\t#x\nEMPTY=\n";
    let env = parse_env_file(text, host).expect("valid");
    assert_eq!(
        env,
        strings(&[
            "A=1",
            "B= spaced value ",
            "HOSTVAR=from host",
            "C=x=y",
            "EMPTY="
        ])
    );
}

#[test]
fn env_file_names_must_be_clean() {
    let none = |_: &str| None;
    let err = parse_env_file("MY VAR=1\n", none).expect_err("space in name");
    assert_eq!(err.to_string(), "variable 'MY VAR' contains whitespaces");
    let err = parse_env_file("=1\n", none).expect_err("no name");
    assert_eq!(err.to_string(), "no variable name on line '=1'");
    assert!(parse_env_file("TRAILING \n", none).is_err());
}

#[test]
fn container_ids_are_random_12_hex() {
    let a = container_id().expect("id");
    let b = container_id().expect("id");
    assert_eq!(a.len(), 12);
    assert!(a
        .bytes()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_ne!(a, b);
}

#[test]
fn written_initramfs_pads_each_archive_to_4_bytes() {
    assert_eq!(padded_concat(&[b"abcde", b"fg"]), b"abcde\0\0\0fg\0\0");
    assert_eq!(padded_concat(&[b"abcd", b""]), b"abcd");
}
