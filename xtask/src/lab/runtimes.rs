//! `cargo xtask lab run --runtimes`: the container engines katalite plugs into (containerd,
//! Docker, podman) running in L1, for the tests of katalite's OCI runtime and shim.
//!
//! Nothing is installed on the host (apt would start its services there): the Debian
//! packages the host lacks (what `apt-get install -s` would install) are fetched with
//! `apt-get download` into the user cache (`lab/runtimes/debs/`) and unpacked, not
//! installed, into one tree (`lab/runtimes/root/`, rebuilt when the package set, the
//! kernel or our files change). L1 gets it as the 9p share `runtimes` and mounts an overlay
//! of it over the host's root (lower layers) with its upper layer on the scratch disk: a
//! Debian system with the engines, which `runtimes.sh` enters with `chroot` after starting
//! containerd and dockerd.
//!
//! Maintainer scripts do not run, so the tree carries what they would make that the
//! engines need: the `iptables` alternatives links. It also carries the engines'
//! configuration (`FILES`) and the kernel's module index (`depmod` over a `kernel` link to
//! the unpacked L1 kernel), so `modprobe` works in L1: the kernel runs it for
//! `request_module`, and dockerd and iptables run it themselves.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::kernel::L1Kernel;
use super::{cache, checked, packages};
use crate::user_cache;

/// What the engines need from Debian 12 besides the host's base system: containerd 1.6,
/// Docker 20.10 (`docker.io`, with `tini` as `docker-init`), podman 4.3 with its OCI
/// runtimes, monitor, configuration and network stack, and the tools dockerd runs
/// (`iptables`, `modprobe`). Recommends are left out (apparmor, needrestart, ...).
pub const PACKAGES: &[&str] = &[
    "containerd",
    "docker.io",
    "tini",
    "runc",
    "podman",
    "crun",
    "conmon",
    "golang-github-containers-common",
    "netavark",
    "aardvark-dns",
    "iptables",
    "kmod",
];

/// Docker's configuration: the containerd that `runtimes.sh` starts (dockerd would
/// otherwise start its own) and katalite as the runtime `katalite`.
pub const DAEMON_JSON: &str = r#"{
  "containerd": "/run/containerd/containerd.sock",
  "runtimes": {
    "katalite": {
      "path": "/usr/local/bin/katalite-runc"
    }
  }
}
"#;

/// podman's engine settings for a system without systemd: cgroups through cgroupfs,
/// events to a file (the defaults go through systemd and journald).
pub const CONTAINERS_CONF: &str = r#"[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
"#;

/// Files the tree carries besides the packages: (path in the tree, content).
pub const FILES: &[(&str, &str)] = &[
    ("etc/docker/daemon.json", DAEMON_JSON),
    ("etc/containers/containers.conf", CONTAINERS_CONF),
];

/// Modules L1 loads before starting the engines: overlayfs for the storage drivers, the
/// bridge network with veth pairs and its netfilter hooks, and the iptables-nft pieces
/// Docker's NAT, forwarding and `-p` rules use. Anything else is loaded on demand through
/// `modprobe`; loading these up front makes a missing one a clear setup error.
pub const MODULES: &[&str] = &[
    "overlay",
    "bridge",
    "br_netfilter",
    "veth",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_nat",
    "nf_conntrack",
    "xt_conntrack",
    "xt_MASQUERADE",
    "xt_addrtype",
    "xt_nat",
    "xt_tcpudp",
];

/// The `iptables` alternatives Debian's postinst would link (iptables-nft, the default):
/// (link in `usr/sbin`, target).
const IPTABLES_LINKS: &[(&str, &str)] = &[
    ("iptables", "xtables-nft-multi"),
    ("iptables-save", "xtables-nft-multi"),
    ("iptables-restore", "xtables-nft-multi"),
    ("ip6tables", "xtables-nft-multi"),
    ("ip6tables-save", "xtables-nft-multi"),
    ("ip6tables-restore", "xtables-nft-multi"),
];

/// Bump to rebuild every tree when how it is made changes.
const FORMAT: &str = "runtimes-1";

/// One package apt would unpack: `Inst NAME [OLD] (VERSION ... [ARCH])`.
#[derive(Debug, PartialEq, Eq)]
pub struct Deb {
    pub name: String,
    pub version: String,
    pub arch: String,
}

impl Deb {
    /// The file name apt gives the downloaded package (an epoch's `:` quoted as `%3a`).
    pub fn file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }
}

/// The packages an `apt-get install -s` (simulation) would unpack, in its order.
pub fn parse_simulation(text: &str) -> Result<Vec<Deb>> {
    let mut debs = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("Inst ") else {
            continue;
        };
        let parse = || -> Option<Deb> {
            let (name, rest) = rest.split_once(' ')?;
            // An upgrade names the installed version first: `[1:4.13-1]`.
            let rest = match rest.strip_prefix('[') {
                Some(old) => old.split_once("] ")?.1,
                None => rest,
            };
            // Anything after the parentheses (`[]`, the packages this step leaves broken
            // until later ones) is apt's bookkeeping.
            let inner = rest.strip_prefix('(')?.split_once(')')?.0;
            let version = inner.split_whitespace().next()?;
            let arch = inner.rsplit_once('[')?.1.strip_suffix(']')?;
            let safe = |word: &str| {
                !word.is_empty()
                    && word
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.:~_".contains(c))
            };
            (safe(name) && safe(version) && safe(arch)).then(|| Deb {
                name: name.to_owned(),
                version: version.to_owned(),
                arch: arch.to_owned(),
            })
        };
        debs.push(parse().with_context(|| format!("cannot parse apt's line {line:?}"))?);
    }
    Ok(debs)
}

/// Where the prepared tree is, on the host.
pub struct Runtimes {
    /// The root of the tree (the 9p share `runtimes`).
    pub root: PathBuf,
}

/// Downloads what the host lacks of [`PACKAGES`] and unpacks it with [`FILES`] and the
/// module index of `kernel` (seen in L1 at `kernel_in_l1`) into `lab/runtimes/root` under
/// `downloads`, unless that tree is fresh.
pub fn prepare(downloads: &Path, kernel: &L1Kernel, kernel_in_l1: &Path) -> Result<Runtimes> {
    let dir = downloads.join("runtimes");
    user_cache::private_dir(&dir)?;
    let archives = dir.join("debs");
    // Runs stopped by a signal leave their staged tree or download dir behind.
    cache::remove_abandoned(&dir, super::ABANDONED_AFTER);
    cache::remove_abandoned(&archives, super::ABANDONED_AFTER);
    let root = dir.join("root");
    let key_of = |debs: &[Deb]| {
        let names: Vec<String> = debs.iter().map(Deb::file_name).collect();
        cache::key(&[
            FORMAT.as_bytes(),
            names.join(" ").as_bytes(),
            format!("{FILES:?}{IPTABLES_LINKS:?}").as_bytes(),
            kernel.release.as_bytes(),
            kernel_in_l1.as_os_str().as_encoded_bytes(),
            host_merged_dirs().join(" ").as_bytes(),
        ])
    };
    let mut debs = simulate().context("cannot ask apt what the engines need")?;
    if cache::is_fresh(&root, &key_of(&debs)) {
        return Ok(Runtimes { root });
    }
    fs::create_dir_all(&archives)
        .with_context(|| format!("cannot create {}", archives.display()))?;
    if download(&archives, &debs).is_err() {
        // Stale package lists point at files the mirror no longer has.
        packages::apt_get(&["update"])?;
        debs = simulate()?;
        download(&archives, &debs)?;
    }
    let staged = user_cache::Staged::new(&root)?;
    for deb in &debs {
        checked(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(archives.join(deb.file_name()))
                .arg(staged.path()),
        )?;
    }
    for dir in host_merged_dirs() {
        merge_into_usr(staged.path(), &dir)?;
    }
    write_files(staged.path())?;
    link_iptables(staged.path())?;
    module_index(staged.path(), kernel, kernel_in_l1)?;
    let root = staged.commit()?;
    cache::mark(&root, &key_of(&debs))?;
    tidy(&archives, &debs);
    Ok(Runtimes { root })
}

/// `apt-get install -s`: the packages apt would unpack for [`PACKAGES`] on this host (none
/// for what is installed already); `apt-get update` first when the lists lack a package.
fn simulate() -> Result<Vec<Deb>> {
    let query = || -> Result<std::process::Output> {
        Command::new("apt-get")
            .args(["install", "-s", "--no-install-recommends"])
            .args(PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("cannot run apt-get")
    };
    let mut output = query()?;
    if !output.status.success() {
        packages::apt_get(&["update"])?;
        output = query()?;
    }
    if !output.status.success() {
        bail!(
            "apt-get install -s {} failed ({}): {}",
            PACKAGES.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_simulation(&String::from_utf8_lossy(&output.stdout))
}

/// `apt-get download NAME=VERSION` of the `debs` that `archives` lacks. Like the kernel's
/// download, it needs neither root nor apt's locks (the host's apt may be busy), and
/// each file appears whole: apt writes into a temporary dir, then the files move over.
fn download(archives: &Path, debs: &[Deb]) -> Result<()> {
    let missing: Vec<String> = debs
        .iter()
        .filter(|deb| !archives.join(deb.file_name()).is_file())
        .map(|deb| format!("{}={}", deb.name, deb.version))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "lab: downloading the container engines ({} packages)",
        missing.len()
    );
    let work = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(archives)
        .context("cannot create a download dir")?;
    checked(
        Command::new("apt-get")
            // Root's downloads into a dir `_apt` cannot write would warn about the sandbox.
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .args(&missing)
            .current_dir(work.path()),
    )?;
    for deb in debs {
        let name = deb.file_name();
        let file = work.path().join(&name);
        if file.is_file() {
            fs::rename(&file, archives.join(&name))
                .with_context(|| format!("cannot move {name} into the cache"))?;
        } else if !archives.join(&name).is_file() {
            bail!("apt-get download left no {name}");
        }
    }
    Ok(())
}

/// The top-level dirs that are links into `usr/` on the host (merged /usr, as on every
/// Debian 12): a package's `sbin/` must land in `usr/sbin/`, or the tree's real `sbin/`
/// dir would hide the host's in the overlay.
fn host_merged_dirs() -> Vec<String> {
    ["bin", "sbin", "lib", "lib32", "lib64", "libx32"]
        .iter()
        .filter(|dir| {
            fs::read_link(Path::new("/").join(dir))
                .is_ok_and(|target| target == Path::new("usr").join(dir))
        })
        .map(|dir| (*dir).to_owned())
        .collect()
}

/// Moves the contents of `root/dir` into `root/usr/dir` and removes `root/dir`.
pub fn merge_into_usr(root: &Path, dir: &str) -> Result<()> {
    let from = root.join(dir);
    if fs::symlink_metadata(&from).is_err() {
        return Ok(());
    }
    move_tree(&from, &root.join("usr").join(dir))
}

fn move_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let is_dir = entry.file_type()?.is_dir();
        if is_dir && fs::symlink_metadata(&target).is_ok_and(|meta| meta.is_dir()) {
            move_tree(&entry.path(), &target)?;
        } else {
            fs::rename(entry.path(), &target)
                .with_context(|| format!("cannot move {}", entry.path().display()))?;
        }
    }
    fs::remove_dir(from).with_context(|| format!("cannot remove {}", from.display()))
}

fn write_files(root: &Path) -> Result<()> {
    for (path, content) in FILES {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Links `iptables` and friends when the tree brought `xtables-nft-multi` (the host had no
/// iptables, so no alternatives either).
pub fn link_iptables(root: &Path) -> Result<()> {
    let sbin = root.join("usr/sbin");
    if !sbin.join("xtables-nft-multi").exists() {
        return Ok(());
    }
    for (link, target) in IPTABLES_LINKS {
        let link = sbin.join(link);
        if fs::symlink_metadata(&link).is_err() {
            symlink(target, &link).with_context(|| format!("cannot link {}", link.display()))?;
        }
    }
    Ok(())
}

/// `usr/lib/modules/RELEASE`: a `kernel` link to the unpacked kernel's modules as L1 sees
/// them (`/host/...`, which `runtimes.sh` binds into the Debian root) and the index
/// `depmod` makes of them, so `modprobe` resolves names, aliases and dependencies.
fn module_index(root: &Path, kernel: &L1Kernel, kernel_in_l1: &Path) -> Result<()> {
    let base = root.join("usr");
    let modules = base.join("lib/modules").join(&kernel.release);
    fs::create_dir_all(&modules)?;
    for name in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let source = kernel.modules.join(name);
        if source.exists() {
            fs::copy(&source, modules.join(name))
                .with_context(|| format!("cannot copy {}", source.display()))?;
        }
    }
    // depmod reads the modules through a link to the host's copy...
    let kernel_dir = modules.join("kernel");
    symlink(kernel.modules.join("kernel"), &kernel_dir)?;
    checked(
        Command::new("depmod")
            .arg("-b")
            .arg(&base)
            .arg(&kernel.release),
    )?;
    // ...and L1 through the same files in the /host share.
    fs::remove_file(&kernel_dir)?;
    symlink(kernel_in_l1.join("kernel"), &kernel_dir)?;
    Ok(())
}

/// Deletes the downloaded packages the current set no longer uses. Best effort.
fn tidy(archives: &Path, debs: &[Deb]) {
    let names: Vec<String> = debs.iter().map(Deb::file_name).collect();
    let Ok(entries) = fs::read_dir(archives) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".deb") && !names.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `apt-get install -s --no-install-recommends` printed on a Debian 12 host that
    /// had iptables, netavark and containers-common but no engine.
    const SIMULATION: &str = "\
NOTE: This is only a simulation!
The following NEW packages will be installed:
  conmon containerd crun docker.io libsubid4 libyajl2 podman runc tini
Inst login [1:4.13+dfsg1-1+deb12u1] (1:4.13+dfsg1-1+deb12u2 Debian:12.15/oldstable [amd64])
Inst runc (1.1.5+ds1-1+deb12u1 Debian:12.15/oldstable, Debian-Security:12/oldstable-security [amd64])
Inst containerd (1.6.20~ds1-1+deb12u3 Debian:12.15/oldstable [amd64])
Inst docker.io (20.10.24+dfsg1-1+deb12u1+b6 Debian:12.15/oldstable [amd64])
Inst dmsetup (2:1.02.185-2 Debian:12.15/oldstable [amd64]) []
Conf runc (1.1.5+ds1-1+deb12u1 Debian:12.15/oldstable [amd64])
";

    #[test]
    fn the_packages_come_from_apts_simulation() {
        let debs = parse_simulation(SIMULATION).expect("parses");
        let names: Vec<String> = debs.iter().map(Deb::file_name).collect();
        assert_eq!(
            names,
            [
                "login_1%3a4.13+dfsg1-1+deb12u2_amd64.deb",
                "runc_1.1.5+ds1-1+deb12u1_amd64.deb",
                "containerd_1.6.20~ds1-1+deb12u3_amd64.deb",
                "docker.io_20.10.24+dfsg1-1+deb12u1+b6_amd64.deb",
                "dmsetup_2%3a1.02.185-2_amd64.deb",
            ]
        );
        assert!(parse_simulation("Reading package lists...\n")
            .expect("nothing to install")
            .is_empty());
        assert!(parse_simulation("Inst broken\n").is_err());
        assert!(parse_simulation("Inst ../x (1.0 Debian [amd64])\n").is_err());
    }

    #[test]
    fn docker_knows_the_katalite_runtime_and_our_containerd() {
        let config: serde_json::Value = serde_json::from_str(DAEMON_JSON).expect("JSON");
        assert_eq!(
            config["runtimes"]["katalite"]["path"],
            "/usr/local/bin/katalite-runc"
        );
        assert_eq!(config["containerd"], "/run/containerd/containerd.sock");
        let conf: toml::Table = CONTAINERS_CONF.parse().expect("TOML");
        assert_eq!(conf["engine"]["cgroup_manager"].as_str(), Some("cgroupfs"));
        assert!(FILES.iter().all(|(path, _)| !path.starts_with('/')));
    }

    #[test]
    fn preloaded_modules_are_module_names() {
        for (at, module) in MODULES.iter().enumerate() {
            assert!(
                !module.contains('-') && !module.ends_with(".ko"),
                "{module}"
            );
            assert!(!MODULES[..at].contains(module), "{module} twice");
        }
        assert!(MODULES.contains(&"br_netfilter") && MODULES.contains(&"veth"));
        // overlay also mounts the Debian root, before modprobe is there to load it.
        assert!(super::super::kernel::L1_ROOT_MODULES.contains(&"overlay"));
    }

    #[test]
    fn unmerged_dirs_move_into_usr() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        for path in ["sbin/xtables-nft-multi", "usr/sbin/dockerd", "lib/x/a.so"] {
            let path = root.join(path);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, path.to_string_lossy().as_bytes()).expect("write");
        }
        fs::create_dir_all(root.join("usr/lib/x")).expect("mkdir");
        symlink("a.so", root.join("lib/x/b.so")).expect("link");
        for dir in ["sbin", "lib", "bin"] {
            merge_into_usr(root, dir).expect("merge");
        }
        assert!(!root.join("sbin").exists() && !root.join("lib").exists());
        assert!(root.join("usr/sbin/xtables-nft-multi").is_file());
        assert!(root.join("usr/sbin/dockerd").is_file());
        assert!(root.join("usr/lib/x/a.so").is_file());
        assert_eq!(
            fs::read_link(root.join("usr/lib/x/b.so")).expect("link moved"),
            Path::new("a.so")
        );
        assert!(!root.join("usr/bin").exists());
    }

    #[test]
    fn iptables_is_linked_only_when_the_tree_has_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sbin = dir.path().join("usr/sbin");
        fs::create_dir_all(&sbin).expect("mkdir");
        link_iptables(dir.path()).expect("nothing to link");
        assert!(fs::symlink_metadata(sbin.join("iptables")).is_err());
        fs::write(sbin.join("xtables-nft-multi"), "").expect("write");
        link_iptables(dir.path()).expect("links");
        link_iptables(dir.path()).expect("again");
        assert_eq!(
            fs::read_link(sbin.join("iptables")).expect("iptables"),
            Path::new("xtables-nft-multi")
        );
        assert!(sbin.join("ip6tables-restore").exists());
    }
}
