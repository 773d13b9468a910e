//! User stories for host directories in the VM: `-v`, `--mount`, `--tmpfs`, named volumes
//! and `--rootfs DIR` over virtio-fs.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::{katalite_busybox, katalite_captured_with, rootfs, sha256_hex, Outcome};

/// 50 MiB of bytes no compressor or page-sharing trick can shortcut.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

fn assert_ok(run: &Outcome) {
    assert_eq!(run.status, Some(0), "{}", run.describe());
}

/// `katalite ARGS` with named volumes kept under `data` (`KATALITE_DATA_DIR`).
fn katalite_with_data(data: &Path, args: &[&str]) -> Outcome {
    let env = [("KATALITE_DATA_DIR", data.as_os_str())];
    let run = katalite_captured_with(args, &env, None);
    Outcome {
        status: run.status,
        stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
    }
}

#[test]
fn fifty_megabytes_cross_both_ways_byte_exact() {
    let dir = tempfile::tempdir().expect("share");
    let data = noise(50 << 20);
    std::fs::write(dir.path().join("in"), &data).expect("host file");
    let volume = format!("{}:/data", dir.path().display());
    let script = "sha256sum /data/in && head -c 52428800 /dev/urandom > /data/out && \
                  sha256sum /data/out";
    let run = katalite_busybox(&["-v", &volume], &["sh", "-c", script]);
    assert_ok(&run);
    let sums: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(sums.len(), 2, "{}", run.describe());
    assert_eq!(
        sums[0],
        sha256_hex(&data),
        "the guest read what the host wrote"
    );
    let written = std::fs::read(dir.path().join("out")).expect("guest's file");
    assert_eq!(written.len(), 50 << 20);
    assert_eq!(
        sums[1],
        sha256_hex(&written),
        "the host reads what the guest wrote"
    );
}

#[test]
fn files_the_guest_creates_belong_to_the_guests_user() {
    let dir = tempfile::tempdir().expect("share");
    // The guest's kernel checks permissions as the host's would: the directory must let
    // user 1234 in, as on Docker.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let volume = format!("{}:/data", dir.path().display());
    let run = katalite_busybox(
        &["-v", &volume, "-u", "1234:5678"],
        &["sh", "-c", "echo hi > /data/mine && mkdir /data/sub"],
    );
    assert_ok(&run);
    for name in ["mine", "sub"] {
        let meta = std::fs::metadata(dir.path().join(name)).expect(name);
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("mine")).expect("mine"),
        "hi\n"
    );
}

#[test]
fn read_only_volumes_refuse_writes_and_leave_the_host_alone() {
    let dir = tempfile::tempdir().expect("share");
    std::fs::write(dir.path().join("keep"), "original").expect("file");
    let volume = format!("{}:/data:ro", dir.path().display());
    let script = "cat /data/keep; echo changed > /data/keep || echo WRITE-FAILED; \
                  touch /data/new || echo CREATE-FAILED; rm /data/keep || echo RM-FAILED";
    let run = katalite_busybox(&["-v", &volume], &["sh", "-c", script]);
    assert_ok(&run);
    for line in ["original", "WRITE-FAILED", "CREATE-FAILED", "RM-FAILED"] {
        assert!(run.stdout.contains(line), "{line}: {}", run.describe());
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keep")).expect("keep"),
        "original"
    );
    assert!(!dir.path().join("new").exists());
}

#[test]
fn a_symlink_to_the_hosts_root_resolves_in_the_guests_root() {
    let dir = tempfile::tempdir().expect("share");
    std::os::unix::fs::symlink("/", dir.path().join("root")).expect("symlink");
    let volume = format!("{}:/data", dir.path().display());
    // The guest's root has /bin/busybox; the lab's host root has a /scratch the guest lacks.
    let script = "ls /data/root/bin/busybox && (ls /data/root/scratch || echo NO-SCRATCH)";
    let run = katalite_busybox(&["-v", &volume], &["sh", "-c", script]);
    assert_ok(&run);
    assert!(run.stdout.contains("NO-SCRATCH"), "{}", run.describe());
}

#[test]
fn named_volumes_persist_across_runs_and_rm_removes_them() {
    let data = tempfile::tempdir().expect("data dir");
    let busybox = rootfs("busybox");
    let run = |volume: &str, script: &str| {
        let mount = format!("{volume}:/v");
        katalite_with_data(
            data.path(),
            &[
                "run", "--rm", "--rootfs", &busybox, "-v", &mount, "--", "sh", "-c", script,
            ],
        )
    };
    assert_ok(&run("kept", "echo persisted > /v/file"));
    let second = run("kept", "cat /v/file");
    assert_ok(&second);
    assert_eq!(second.stdout, "persisted\n");
    let ls = katalite_with_data(data.path(), &["volume", "ls", "-q"]);
    assert_ok(&ls);
    assert!(ls.stdout.lines().any(|l| l == "kept"), "{}", ls.describe());
    assert_ok(&katalite_with_data(data.path(), &["volume", "rm", "kept"]));
    let ls = katalite_with_data(data.path(), &["volume", "ls", "-q"]);
    assert!(!ls.stdout.lines().any(|l| l == "kept"), "{}", ls.describe());
    let gone = run("kept", "cat /v/file 2>/dev/null || echo EMPTY");
    assert_eq!(gone.stdout, "EMPTY\n", "{}", gone.describe());
}

#[test]
fn tmpfs_and_both_mount_forms_work() {
    let data = tempfile::tempdir().expect("data dir");
    let dir = tempfile::tempdir().expect("share");
    std::fs::write(dir.path().join("hello"), "from host").expect("file");
    let busybox = rootfs("busybox");
    let bind = format!(
        "type=bind,source={},target=/b,readonly",
        dir.path().display()
    );
    let script = "cat /b/hello; echo; touch /b/x 2>/dev/null || echo BIND-RO; \
                  echo vol > /named/f && cat /named/f; \
                  grep -E ' /t(mp2)? tmpfs' /proc/mounts | sort; echo t > /t/f && cat /t/f";
    let run = katalite_with_data(
        data.path(),
        &[
            "run",
            "--rm",
            "--rootfs",
            &busybox,
            "--mount",
            &bind,
            "--mount",
            "type=volume,source=mvol,target=/named",
            "--mount",
            "type=tmpfs,target=/tmp2,tmpfs-size=1m",
            "--tmpfs",
            "/t:size=2m",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert_ok(&run);
    for line in [
        "from host",
        "BIND-RO",
        "vol",
        " /t tmpfs",
        " /tmp2 tmpfs",
        "t",
    ] {
        assert!(run.stdout.contains(line), "{line}: {}", run.describe());
    }
    assert!(run.stdout.contains("size=2048k"), "{}", run.describe());
}

#[test]
fn volumes_work_with_detached_containers_and_exec() {
    let runtime = tempfile::tempdir().expect("runtime dir");
    let dir = tempfile::tempdir().expect("share");
    let busybox = rootfs("busybox");
    let volume = format!("{}:/data", dir.path().display());
    let env = [("KATALITE_RUNTIME_DIR", runtime.path().as_os_str())];
    let katalite = |args: &[&str]| {
        let run = katalite_captured_with(args, &env, None);
        Outcome {
            status: run.status,
            stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
        }
    };
    let started = katalite(&[
        "run", "-d", "--rootfs", &busybox, "-v", &volume, "--", "sleep", "1000",
    ]);
    assert_ok(&started);
    let id = started.stdout.trim().to_string();
    let exec = katalite(&["exec", &id, "sh", "-c", "echo from-exec > /data/e"]);
    let _ = katalite(&["rm", "-f", &id]);
    assert_ok(&exec);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("e")).expect("exec's file"),
        "from-exec\n"
    );
}

#[test]
fn a_rootfs_directory_is_the_root_and_writes_persist_unless_read_only() {
    let root = tempfile::tempdir().expect("root");
    // A copy of busybox's tree, so the shared test rootfs stays clean.
    let copy = std::process::Command::new("cp")
        .args(["-a", &format!("{}/.", rootfs("busybox"))])
        .arg(root.path())
        .status()
        .expect("cp");
    assert!(copy.success());
    let dir = root.path().to_string_lossy().into_owned();
    std::fs::write(root.path().join("etc/hosts"), "127.0.0.1 mine\n").expect("hosts");
    let run = katalite_captured_with(
        &[
            "run",
            "--rm",
            "--rootfs",
            &dir,
            "--",
            "sh",
            "-c",
            "echo kept > /persisted",
        ],
        &[],
        None,
    );
    assert_eq!(
        run.status,
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("persisted")).expect("written through"),
        "kept\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/hosts")).expect("hosts"),
        "127.0.0.1 mine\n",
        "init's /etc/hosts stays in the guest"
    );
    let ro = katalite_captured_with(
        &[
            "run",
            "--rm",
            "--read-only",
            "--rootfs",
            &dir,
            "--",
            "sh",
            "-c",
            "echo no > /refused || echo REFUSED",
        ],
        &[],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&ro.stdout), "REFUSED\n");
    assert!(!root.path().join("refused").exists());
}
