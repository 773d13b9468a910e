//! Host prerequisites of the guest build: Debian packages (installed with apt-get when run as
//! root, otherwise the exact command is printed) and the musl Rust target for the init.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Packages the kernel and init builds run: compilers, Kconfig's parser generators, `bc`
/// for timeconst, libelf for objtool, OpenSSL headers for the sign/cert tools, musl-gcc for
/// C code in the static init.
pub const BUILD_PACKAGES: &[&str] = &[
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "build-essential",
    "musl-tools",
];

/// The target the static init is built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Installs whichever of `packages` is missing; as non-root, fails with the command to run.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let output = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(packages)
        .output()
        .context("cannot run dpkg-query")?;
    // dpkg-query exits non-zero when a package is unknown; the listing still names the rest.
    let missing = missing_packages(packages, &String::from_utf8_lossy(&output.stdout));
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    if !is_root()? {
        bail!("missing Debian packages; run as root:\n  apt-get update && {install}");
    }
    println!("build-guest: installing {}", missing.join(" "));
    apt_get(&["update"])?;
    let mut args = vec!["install", "-y"];
    args.extend(missing.iter().map(String::as_str));
    apt_get(&args)
}

/// Adds the musl target through rustup when the pinned toolchain lacks it.
pub fn ensure_musl_target(workspace: &Path) -> Result<()> {
    let output = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(workspace)
        .output()
        .context("cannot run rustup (needed for the musl target)")?;
    if String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.trim() == MUSL_TARGET)
    {
        return Ok(());
    }
    println!("build-guest: rustup target add {MUSL_TARGET}");
    super::run_command(
        Command::new("rustup")
            .args(["target", "add", MUSL_TARGET])
            .current_dir(workspace),
    )
}

/// The packages of `wanted` that the `${Package} ${Status}` listing does not show installed.
fn missing_packages(wanted: &[&str], listing: &str) -> Vec<String> {
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let package = words.next()?;
            // Status is "want flag state", e.g. "install ok installed".
            (words.nth(2) == Some("installed")).then_some(package)
        })
        .collect();
    wanted
        .iter()
        .filter(|package| !installed.contains(package))
        .map(|package| (*package).to_owned())
        .collect()
}

fn apt_get(args: &[&str]) -> Result<()> {
    super::run_command(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_root() -> Result<bool> {
    let output = Command::new("id")
        .arg("-u")
        .output()
        .context("cannot run id -u")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_installed_packages_count() {
        let listing = "flex install ok installed\nbison deinstall ok config-files\n\
                       bc install ok half-installed\n";
        assert_eq!(
            missing_packages(&["flex", "bison", "bc", "musl-tools"], listing),
            ["bison", "bc", "musl-tools"]
        );
        assert!(missing_packages(&["flex"], listing).is_empty());
    }
}
