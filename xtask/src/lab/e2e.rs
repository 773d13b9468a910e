//! `cargo xtask lab e2e`: builds the static e2e test binary and the test rootfs trees, then
//! runs every test in one lab boot (booting L1 under TCG is the slow part).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{busybox, cache, cargo_musl, shell_quote, Paths};

/// Where L1 keeps the tests' writable copy of the rootfs trees.
const E2E_ROOTFS: &str = "/scratch/e2e-rootfs";

/// Builds the tests, prepares the rootfs trees and runs the tests in the lab (in the
/// Debian root with the container engines when `runtimes`).
pub fn run(paths: &Paths, test_args: &[String], runtimes: bool) -> Result<i32> {
    let tests = build_tests(paths)?;
    let host_busybox = Path::new(busybox::HOST_BUSYBOX);
    let rootfs = prepare_rootfs(&paths.cache, host_busybox, &busybox::applets(host_busybox)?)?;
    // The OCI layouts of the storage stories (cached; built once per machine).
    let images = crate::images::build(false).context("cannot build the test images")?;
    // `--rootfs DIR` boots the directory itself, writably, and the host's tree is shared
    // read-only with L1: the tests get a writable copy on L1's scratch disk.
    let mut command = format!(
        "rm -rf {E2E_ROOTFS} && cp -a {} {E2E_ROOTFS} && \
         KATALITE_E2E_ROOTFS={E2E_ROOTFS} KATALITE_E2E_IMAGES={} exec {} --test-threads=1",
        shell_quote(&paths.in_l1(&rootfs).to_string_lossy()),
        shell_quote(&paths.in_l1(&images).to_string_lossy()),
        shell_quote(&paths.in_l1(&tests).to_string_lossy()),
    );
    // The local test registry (`cargo xtask registry`), as the lab reaches the host.
    if let Ok(registry) = std::env::var("KATALITE_E2E_REGISTRY") {
        command = format!(
            "export KATALITE_E2E_REGISTRY={}; {command}",
            shell_quote(&registry)
        );
    }
    for arg in test_args {
        command.push(' ');
        command.push_str(&shell_quote(arg));
    }
    // Finding what a code path needs: katalite lets forbidden syscalls through and the
    // kernel logs them (audit type 1326); they are listed by thread name after the tests.
    if std::env::var_os("KATALITE_SECCOMP_LOG").is_some_and(|v| v == "1") {
        command = format!(
            "export KATALITE_SECCOMP_LOG=1; ({}); rc=$?; \
             echo 'seccomp: forbidden syscalls made (count, thread, number):'; \
             dmesg | grep -a 'type=1326' | grep -o 'comm=.* syscall=[0-9]*' \
             | sed 's/ exe=.* syscall=/ /' | sort | uniq -c; exit $rc",
            command.replacen(" exec ", " ", 1)
        );
    }
    super::boot(paths, &command, runtimes)
}

/// Builds `tests/e2e.rs` statically and returns its executable, found in cargo's JSON
/// messages (the file name carries a hash).
fn build_tests(paths: &Paths) -> Result<PathBuf> {
    let output = cargo_musl(paths, "test")
        .args(["--package", "katalite-tests", "--features", "e2e"])
        .args(["--test", "e2e", "--no-run"])
        .arg("--message-format=json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo test")?;
    if !output.status.success() {
        bail!("building the e2e tests failed ({})", output.status);
    }
    test_executable(&String::from_utf8_lossy(&output.stdout))
        .context("cargo reported no e2e test executable")
}

/// The `e2e` test executable named in cargo's `--message-format=json` output.
fn test_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| msg["target"]["name"] == "e2e" && msg["profile"]["test"] == true)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
}

/// Writes the test rootfs trees under `cache/rootfs/` (now `busybox/`, from the static
/// busybox at `busybox_bin` with `applets`) and returns that dir.
fn prepare_rootfs(cache: &Path, busybox_bin: &Path, applets: &[String]) -> Result<PathBuf> {
    let dir = cache.join("rootfs");
    let tree = dir.join("busybox");
    let key = cache::key(&[
        busybox_bin.to_string_lossy().as_bytes(),
        cache::file_version(busybox_bin)?.as_bytes(),
        format!("{BUSYBOX_FILES:?}{applets:?}").as_bytes(),
    ]);
    if cache::is_fresh(&tree, &key) {
        return Ok(dir);
    }
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    }
    busybox::install(&tree, busybox_bin, applets)?;
    for (path, content) in BUSYBOX_FILES {
        let path = tree.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))?;
    }
    for empty in ["proc", "sys", "dev", "root", "tmp"] {
        fs::create_dir_all(tree.join(empty))?;
    }
    // Sticky and world-writable, as every /tmp.
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    cache::mark(&tree, &key)?;
    Ok(dir)
}

/// Files of the busybox rootfs besides busybox itself: (path, content).
const BUSYBOX_FILES: &[(&str, &str)] = &[
    (
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hostname", "katalite\n"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_executable_is_read_from_cargo_json() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"katalite"},"profile":{"test":false},"executable":"/t/katalite"}
not json
{"reason":"compiler-artifact","target":{"name":"e2e"},"profile":{"test":true},"executable":"/t/deps/e2e-0123abcd"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(messages),
            Some(PathBuf::from("/t/deps/e2e-0123abcd"))
        );
        assert_eq!(test_executable(r#"{"reason":"build-finished"}"#), None);
    }

    #[test]
    fn the_busybox_rootfs_has_a_shell_and_users() {
        let cache = tempfile::tempdir().expect("temp dir");
        let fake = cache.path().join("fake-busybox");
        fs::write(&fake, "not really busybox").expect("write fake busybox");
        let applets = ["sh".to_owned(), "ls".to_owned()];
        let dir = prepare_rootfs(cache.path(), &fake, &applets).expect("rootfs");
        let tree = dir.join("busybox");
        assert!(tree.join("bin/busybox").is_file());
        assert_eq!(
            fs::read_link(tree.join("bin/sh")).expect("sh is an applet link"),
            Path::new("busybox")
        );
        let passwd = fs::read_to_string(tree.join("etc/passwd")).expect("passwd");
        assert!(passwd.starts_with("root:x:0:0:"));
        let tmp = fs::metadata(tree.join("tmp")).expect("tmp");
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
        assert!(tree.join("bin/ls").is_symlink());
        assert!(!tree.join("bin/mount").exists());
        assert_eq!(
            prepare_rootfs(cache.path(), &fake, &applets).expect("cached"),
            dir
        );
    }
}
