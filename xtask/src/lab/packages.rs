//! Debian packages the lab needs on the host, installed on demand.
//!
//! Every machine is a fresh Debian, so the lab installs what it uses itself (as root) instead
//! of relying on anything set up by hand.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Host packages the lab uses: QEMU (TCG with emulated AMD-V), a static busybox for the L1
/// initramfs and the test rootfs, `cpio` to pack the initramfs, `kmod` for `modinfo` and
/// `e2fsprogs` for the scratch disk's `mkfs.ext4` (both on every Debian machine, checked
/// all the same).
pub const LAB_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "e2fsprogs",
];

/// Installs whichever of `packages` is missing (`apt-get update` once, then `apt-get install`).
pub fn ensure(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for package in packages {
        if !is_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        bail!("missing Debian packages; run as root: apt-get update && {install}");
    }
    eprintln!("lab: installing {}", missing.join(" "));
    apt_get(&["update"])?;
    let mut args = vec!["install", "-y"];
    args.extend(&missing);
    apt_get(&args)
}

/// Runs `apt-get ARGS` non-interactively, failing on a non-zero exit.
pub fn apt_get(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        // stdout belongs to the command run in the lab.
        .stdout(std::io::stderr())
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn is_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query")?;
    Ok(output.status.success() && is_installed_status(&String::from_utf8_lossy(&output.stdout)))
}

/// `dpkg-query -f '${Status}'` prints "want flag status", e.g. "install ok installed".
fn is_installed_status(status: &str) -> bool {
    status.split_whitespace().nth(2) == Some("installed")
}

fn is_root() -> bool {
    // `id -u` keeps xtask free of libc for one call.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_status_is_the_third_word() {
        assert!(is_installed_status("install ok installed"));
        assert!(!is_installed_status("deinstall ok config-files"));
        assert!(!is_installed_status("install ok half-installed"));
        assert!(!is_installed_status(""));
    }
}
