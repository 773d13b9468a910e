//! Installs the host's static busybox (Debian's `busybox-static`) into a root filesystem
//! tree, with a symlink per applet, for the L1 initramfs and for the e2e test rootfs.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where `busybox-static` puts its statically linked binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Copies the static busybox at `source` (normally [`HOST_BUSYBOX`]) to `root/bin/busybox`
/// and links each of `applets` (see [`applets`]) next to it.
pub fn install(root: &Path, source: &Path, applets: &[String]) -> Result<()> {
    let bin = root.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    fs::copy(source, bin.join("busybox"))
        .with_context(|| format!("cannot copy {}", source.display()))?;
    for applet in applets {
        let link = bin.join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink("busybox", &link).with_context(|| format!("cannot link {}", link.display()))?;
        }
    }
    Ok(())
}

/// The applets `busybox --list` names.
pub fn applets(busybox: &Path) -> Result<Vec<String>> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run {} --list", busybox.display()))?;
    if !output.status.success() {
        bail!("busybox --list failed ({})", output.status);
    }
    Ok(parse_applets(&String::from_utf8_lossy(&output.stdout)))
}

/// One applet name per line; anything that could escape `bin/` is dropped.
fn parse_applets(list: &str) -> Vec<String> {
    list.lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/') && *name != "." && *name != "..")
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_names_stay_inside_bin() {
        assert_eq!(
            parse_applets("[\nsh\n\n../x\nmount\n..\n"),
            ["[", "sh", "mount"]
        );
    }
}
