//! The guest's PID 1: cargo builds `katalite-init` statically for musl (incremental, so it
//! always runs), we check it has no ELF interpreter, and copy it only when its bytes changed
//! so the mtime stays put and whatever embeds it does not rebuild for nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};

use super::elf;
use super::prereq::MUSL_TARGET;

/// Result of building and installing the init.
pub struct Report {
    /// Size of the installed binary.
    pub size: u64,
    /// False when the installed copy was already identical.
    pub copied: bool,
}

/// Builds the init with cargo and installs it at `out`.
pub fn build(workspace: &Path, out: &Path) -> Result<Report> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            // The workspace's `guest-init` profile: release, optimised for size.
            "--profile",
            "guest-init",
            "-p",
            "guest-init",
            "--bin",
            "katalite-init",
        ])
        .args([
            "--target",
            MUSL_TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo build for the init")?;
    ensure!(
        output.status.success(),
        "cargo build of katalite-init failed ({})",
        output.status
    );
    let built = executable_from_messages(&String::from_utf8_lossy(&output.stdout))
        .context("cargo reported no katalite-init executable")?;
    let image = fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    ensure!(
        elf::is_static(&image)?,
        "{} is dynamically linked (it has a PT_INTERP header)",
        built.display()
    );
    let copied = install_if_changed(&image, out)?;
    Ok(Report {
        size: u64::try_from(image.len())?,
        copied,
    })
}

/// The executable path of `katalite-init` from cargo's JSON messages (robust against
/// `CARGO_TARGET_DIR` and `build.target-dir`).
fn executable_from_messages(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "katalite-init")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
}

/// Writes `image` to `out` (through a temporary file and a rename) unless `out` already holds
/// exactly these bytes. Returns whether it wrote.
fn install_if_changed(image: &[u8], out: &Path) -> Result<bool> {
    if fs::read(out).is_ok_and(|current| current == image) {
        return Ok(false);
    }
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    fs::write(&partial, image).with_context(|| format!("cannot write {}", partial.display()))?;
    let mut permissions = fs::metadata(&partial)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    fs::set_permissions(&partial, permissions)?;
    fs::rename(&partial, out).with_context(|| format!("cannot move to {}", out.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_init_among_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"serde"},"executable":null}
not json at all
{"reason":"compiler-artifact","target":{"name":"katalite-init"},"executable":"/t/release/katalite-init"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(messages),
            Some(PathBuf::from("/t/release/katalite-init"))
        );
        assert_eq!(
            executable_from_messages(r#"{"reason":"build-finished"}"#),
            None
        );
    }

    #[test]
    fn installs_only_changed_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("katalite-init");
        assert!(install_if_changed(b"v1", &out).expect("first install"));
        let mtime = fs::metadata(&out)
            .and_then(|m| m.modified())
            .expect("mtime");
        assert!(!install_if_changed(b"v1", &out).expect("same bytes"));
        let after = fs::metadata(&out)
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(mtime, after);
        assert!(install_if_changed(b"v2", &out).expect("new bytes"));
        assert_eq!(fs::read(&out).expect("read"), b"v2");
    }
}
