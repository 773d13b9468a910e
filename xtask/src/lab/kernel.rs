//! The L1 kernel: Debian's current `linux-image-amd64`, downloaded and unpacked (not
//! installed) once per machine into the user cache (`lab/kernel/<package>/`, shared by
//! every clone), and the modules L1 loads from it in dependency order.
//!
//! Debian's kernel is used because it builds `kvm-amd` and boots under QEMU TCG, whose
//! emulated SVM gives L1 a real `/dev/kvm`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{bzimage, packages};

/// The modules L1 needs, named by what they provide; their dependencies come from `modinfo`.
/// PCI virtio transport, the network card, the 9p shares (`/src`, `/host`), the scratch disk
/// (virtio-blk, ext4) for katalite's cache and temporary files, KVM on AMD and TUN/TAP (the
/// e2e test of `--network tap:NAME`), and overlayfs, which mounts the Debian root of `lab
/// run --runtimes` (where `modprobe` comes from).
pub const L1_ROOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "virtio_blk",
    // ext4 asks the crypto API for crc32c at mount time; L1 has no modprobe to load it then.
    "crc32c_generic",
    "ext4",
    "kvm_amd",
    "tun",
    "overlay",
];

/// An unpacked L1 kernel package.
pub struct L1Kernel {
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// What QEMU boots: the unpacked `vmlinux` through its PVH entry when the kernel has
    /// one (seconds faster under TCG), else the bzImage `boot/vmlinuz-RELEASE`.
    pub image: PathBuf,
    /// `lib/modules/RELEASE` inside the unpacked package.
    pub modules: PathBuf,
}

/// Resolves the current kernel package and unpacks it under `cache` unless already there.
pub fn prepare(cache: &Path) -> Result<L1Kernel> {
    let package = current_package()?;
    let root = cache.join("kernel").join(&package);
    if !root.join(".complete").exists() {
        unpack(&package, &root).with_context(|| format!("cannot unpack {package}"))?;
    }
    let mut kernel = find_kernel(&root)?;
    match pvh_image(&root, &kernel) {
        Ok(Some(vmlinux)) => kernel.image = vmlinux,
        Ok(None) => {}
        Err(err) => eprintln!("lab: booting the compressed kernel: {err:#}"),
    }
    Ok(kernel)
}

/// The kernel's ELF `vmlinux`, unpacked once, if its config has a PVH entry.
fn pvh_image(root: &Path, kernel: &L1Kernel) -> Result<Option<PathBuf>> {
    let config = root.join("boot").join(format!("config-{}", kernel.release));
    let config =
        fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
    if !config.lines().any(|line| line == "CONFIG_PVH=y") {
        return Ok(None);
    }
    let vmlinux = root
        .join("boot")
        .join(format!("vmlinux-{}", kernel.release));
    if !vmlinux.exists() {
        let partial = vmlinux.with_extension("partial");
        bzimage::extract(&kernel.image, &partial)?;
        fs::rename(&partial, &vmlinux)?;
    }
    Ok(Some(vmlinux))
}

/// Asks apt which versioned image `linux-image-amd64` currently depends on, so the ABI
/// number is never hard-coded.
fn current_package() -> Result<String> {
    if let Some(package) = query_depends()? {
        return Ok(package);
    }
    // Fresh machines may have no package lists yet.
    packages::apt_get(&["update"])?;
    query_depends()?.context("apt-cache depends linux-image-amd64 names no kernel image")
}

fn query_depends() -> Result<Option<String>> {
    let output = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("cannot run apt-cache")?;
    Ok(parse_depends(&String::from_utf8_lossy(&output.stdout)))
}

/// Picks the versioned image out of `apt-cache depends linux-image-amd64`.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| {
            line.trim()
                .trim_start_matches('|')
                .strip_prefix("Depends: ")
        })
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-amd64"))
        .map(str::to_owned)
}

fn unpack(package: &str, root: &Path) -> Result<()> {
    let parent = root.parent().context("kernel cache path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let work = tempfile::tempdir_in(parent).context("cannot create a download dir")?;
    eprintln!("lab: downloading {package}");
    if download(package, work.path()).is_err() {
        // Stale package lists point at files the mirror no longer has.
        packages::apt_get(&["update"])?;
        download(package, work.path())?;
    }
    let deb = fs::read_dir(work.path())?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("apt-get download left no .deb")?;
    let tree = work.path().join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    fs::write(tree.join(".complete"), package)?;
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    fs::rename(&tree, root).with_context(|| format!("cannot move the kernel to {}", root.display()))
}

fn download(package: &str, dir: &Path) -> Result<()> {
    // Root's downloads into a dir `_apt` cannot write would warn about the sandbox.
    run(Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
        .current_dir(dir))
}

fn run(command: &mut Command) -> Result<()> {
    // stdout belongs to the command run in the lab.
    let status = command
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn find_kernel(root: &Path) -> Result<L1Kernel> {
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("cannot read {}", boot.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("vmlinuz-"))
        .context("vmlinuz has no release in its name")?
        .to_owned();
    let modules = root.join("lib/modules").join(&release);
    if !modules.is_dir() {
        bail!("{} is missing", modules.display());
    }
    Ok(L1Kernel {
        release,
        image: vmlinuz,
        modules,
    })
}

/// The kernel's module files by module name (`kvm-amd.ko.xz` → `kvm_amd`).
pub fn module_index(modules: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut dirs = vec![modules.join("kernel")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(module_name)
            {
                index.insert(name, path);
            }
        }
    }
    Ok(index)
}

/// Modules compiled into the kernel (`modules.builtin`), which need no loading.
pub fn builtin_modules(modules: &Path) -> Result<BTreeSet<String>> {
    let list = modules.join("modules.builtin");
    let text =
        fs::read_to_string(&list).with_context(|| format!("cannot read {}", list.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .filter_map(module_name)
        .collect())
}

/// The module name of a module file name; the kernel treats `-` and `_` alike.
pub fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// Orders `roots` and their dependencies so that every module comes after the modules it
/// needs, as `insmod` (which, unlike `modprobe`, loads no dependencies) requires.
///
/// `depends` returns a module's direct dependencies (what `modinfo -F depends` prints);
/// `builtin` modules are left out.
pub fn load_order(
    roots: &[&str],
    builtin: &BTreeSet<String>,
    mut depends: impl FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        builtin: &BTreeSet<String>,
        depends: &mut dyn FnMut(&str) -> Result<Vec<String>>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if builtin.contains(&name) || order.contains(&name) {
            return Ok(());
        }
        if path.contains(&name) {
            bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
        }
        path.push(name.clone());
        for dep in depends(&name)? {
            visit(&dep, builtin, depends, path, order)?;
        }
        path.pop();
        order.push(name);
        Ok(())
    }

    let mut order = Vec::new();
    for root in roots {
        visit(root, builtin, &mut depends, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// Parses `modinfo -F depends` output: comma-separated names, possibly empty.
pub fn parse_modinfo_depends(text: &str) -> Vec<String> {
    text.trim()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `modinfo -F depends` printed for Debian's 6.1.0-56-amd64 modules.
    fn debian_depends(name: &str) -> Result<Vec<String>> {
        let deps = match name {
            "virtio_pci" => "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
            "virtio_net" => "virtio_ring,virtio,net_failover",
            "net_failover" => "failover",
            "9pnet_virtio" => "virtio,9pnet,virtio_ring",
            "9p" => "9pnet,fscache,netfs",
            "fscache" => "netfs",
            "kvm_amd" => "kvm,ccp",
            "kvm" => "irqbypass",
            "tun" => "",
            "virtio_blk" => "virtio,virtio_ring",
            "ext4" => "jbd2,mbcache,crc16",
            "virtio_ring"
            | "virtio"
            | "virtio_pci_modern_dev"
            | "virtio_pci_legacy_dev"
            | "failover"
            | "9pnet"
            | "netfs"
            | "ccp"
            | "irqbypass"
            | "crc32c_generic"
            | "jbd2"
            | "mbcache"
            | "crc16"
            | "overlay" => "",
            other => bail!("unknown module {other}"),
        };
        Ok(parse_modinfo_depends(deps))
    }

    #[test]
    fn every_module_follows_its_dependencies_once() {
        let order = load_order(L1_ROOT_MODULES, &BTreeSet::new(), debian_depends)
            .expect("the Debian module graph is acyclic");
        let position = |name: &str| order.iter().position(|m| m == name);
        for module in &order {
            let here = position(module).expect("listed");
            for dep in debian_depends(module).expect("known module") {
                assert!(
                    position(&dep).expect("dependency listed") < here,
                    "{dep} before {module}"
                );
            }
            assert_eq!(order.iter().filter(|m| *m == module).count(), 1);
        }
        assert_eq!(order.len(), 25);
        assert_eq!(order.last().map(String::as_str), Some("overlay"));
    }

    #[test]
    fn builtin_modules_are_skipped() {
        let builtin: BTreeSet<String> = ["virtio".to_owned(), "virtio_ring".to_owned()].into();
        let order = load_order(&["virtio_pci"], &builtin, debian_depends).expect("acyclic");
        assert_eq!(
            order,
            [
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci"
            ]
        );
    }

    #[test]
    fn cycles_and_unknown_modules_are_errors() {
        let cyclic = |name: &str| -> Result<Vec<String>> {
            Ok(vec![if name == "a" { "b" } else { "a" }.to_owned()])
        };
        let err = load_order(&["a"], &BTreeSet::new(), cyclic).expect_err("cycle");
        assert!(err.to_string().contains("a -> b -> a"), "{err}");
        assert!(load_order(&["nope"], &BTreeSet::new(), debian_depends).is_err());
    }

    #[test]
    fn module_names_come_from_file_names() {
        assert_eq!(module_name("kvm-amd.ko").as_deref(), Some("kvm_amd"));
        assert_eq!(module_name("9p.ko.xz").as_deref(), Some("9p"));
        assert_eq!(
            module_name("virtio_net.ko.zst").as_deref(),
            Some("virtio_net")
        );
        assert_eq!(module_name("modules.order"), None);
    }

    #[test]
    fn the_versioned_image_is_read_from_apt_cache() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let alternatives =
            "linux-image-amd64\n  Recommends: firmware\n |Depends: linux-image-6.12.9-amd64\n";
        assert_eq!(
            parse_depends(alternatives).as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(
            parse_depends("linux-image-amd64\n  Depends: linux-base\n"),
            None
        );
        assert_eq!(parse_depends(""), None);
    }

    #[test]
    fn modinfo_depends_may_be_empty() {
        assert!(parse_modinfo_depends("\n").is_empty());
        assert_eq!(parse_modinfo_depends("kvm,ccp\n"), ["kvm", "ccp"]);
    }
}
