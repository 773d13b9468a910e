//! `cargo xtask images`: OCI test images built from Debian packages, once, and cached
//! outside the repository: busybox (busybox-static) and a four-layer Debian nginx whose
//! later layers delete and replace files, so whiteouts, opaque directories, hard links
//! across layers and owners are exercised by real content.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod storage;

/// Bumped whenever a recipe changes, so cached images are rebuilt.
const RECIPE: &str = "3";

/// Debian packages the recipes run.
const TOOLS: &[&str] = &["umoci", "skopeo", "debootstrap", "busybox-static", "tar"];

/// PATH of both images (Docker's default).
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Fixed mtime of hand-made entries, so the busybox layer is reproducible.
const MTIME: u64 = 1_700_000_000;

/// Where the nginx test scenarios live in the image (see `scenario_layer`).
const SCENARIO: &str = "usr/share/katalite-test";

/// Options of `images`.
#[derive(clap::Args)]
#[command(
    after_help = "Images land in $KATALITE_TEST_IMAGES (default /var/tmp/katalite-images): \
    OCI layouts busybox/ and nginx/ (tag latest), plus busybox.docker.tar (docker-archive) and \
    busybox.oci.tar (oci-archive) for air-gapped tests. The Debian mirror is \
    $KATALITE_DEBIAN_MIRROR (default http://deb.debian.org/debian)."
)]
pub struct Args {
    /// Rebuild the images even when cached ones match the recipe.
    #[arg(long)]
    pub rebuild: bool,
}

/// Builds what is missing and prints where the images are.
pub fn run(args: &Args) -> Result<()> {
    let dir = build(args.rebuild)?;
    for name in ["busybox", "nginx", "caps", "large"] {
        println!("images: oci:{}:latest", dir.join(name).display());
    }
    for archive in ["busybox.docker.tar", "busybox.oci.tar"] {
        println!("images: {}", dir.join(archive).display());
    }
    Ok(())
}

/// The cache directory of the test images (outside the repository).
pub fn images_dir() -> PathBuf {
    std::env::var_os("KATALITE_TEST_IMAGES")
        .map_or_else(|| PathBuf::from("/var/tmp/katalite-images"), PathBuf::from)
}

/// Builds both images unless cached (fast when they are) and returns their directory.
pub fn build(rebuild: bool) -> Result<PathBuf> {
    let dir = images_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    ensure_packages(TOOLS)?;
    let fresh_busybox = cached(&dir, "busybox", rebuild, build_busybox)?;
    let fresh_nginx = cached(&dir, "nginx", rebuild, build_nginx)?;
    let busybox = dir.join("busybox");
    cached(&dir, "caps", rebuild || fresh_busybox, |layout, scratch| {
        storage::build_caps(&busybox, layout, scratch)
    })?;
    let nginx = dir.join("nginx");
    cached(&dir, "large", rebuild || fresh_nginx, |layout, scratch| {
        storage::build_large(&nginx, layout, scratch)
    })?;
    let layout = format!("oci:{}:latest", dir.join("busybox").display());
    // The same busybox as `docker save` and `skopeo copy oci-archive:` write it.
    for (file, transport, name) in [
        (
            "busybox.docker.tar",
            "docker-archive",
            ":library/busybox:latest",
        ),
        ("busybox.oci.tar", "oci-archive", ":latest"),
    ] {
        let path = dir.join(file);
        if fresh_busybox || !path.exists() {
            let temp = dir.join(format!(".{file}.tmp"));
            let _ = fs::remove_file(&temp);
            let dest = format!("{transport}:{}{name}", temp.display());
            exec(Command::new("skopeo").args(["copy", "--quiet", &layout, &dest]))?;
            fs::rename(&temp, &path)
                .with_context(|| format!("cannot rename to {}", path.display()))?;
        }
    }
    Ok(dir)
}

/// Runs `recipe` into a scratch directory and moves the layout into place, unless a
/// layout built by the current recipe is there. Returns whether it built.
fn cached(
    dir: &Path,
    name: &str,
    rebuild: bool,
    recipe: impl FnOnce(&Path, &Path) -> Result<()>,
) -> Result<bool> {
    let layout = dir.join(name);
    let stamp = dir.join(format!("{name}.recipe"));
    let current = fs::read_to_string(&stamp).is_ok_and(|text| text == RECIPE);
    if !rebuild && current && layout.join("index.json").exists() {
        println!("images: {name} is cached");
        return Ok(false);
    }
    let started = Instant::now();
    println!("images: building {name}");
    let scratch = tempfile::Builder::new()
        .prefix(&format!(".{name}-build-"))
        .tempdir_in(dir)
        .context("cannot create a scratch directory")?;
    let built = scratch.path().join("layout");
    recipe(&built, scratch.path()).with_context(|| format!("building the {name} image failed"))?;
    let _ = fs::remove_file(&stamp);
    if layout.exists() {
        fs::remove_dir_all(&layout)
            .with_context(|| format!("cannot remove {}", layout.display()))?;
    }
    fs::rename(&built, &layout).with_context(|| format!("cannot move {name} into place"))?;
    fs::write(&stamp, RECIPE).context("cannot write the recipe stamp")?;
    println!("images: built {name} in {:.0?}", started.elapsed());
    Ok(true)
}

/// busybox: one hand-made layer of busybox-static, its applets as symlinks in /bin and the
/// /etc basics, like the official image.
fn build_busybox(layout: &Path, scratch: &Path) -> Result<()> {
    let busybox = package_file("busybox-static", "/bin/busybox")?;
    let list = output(Command::new(&busybox).arg("--list"))?;
    let layer = scratch.join("rootfs.tar");
    let mut tar = LayerTar::create(&layer)?;
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("var", 0o755),
        ("var/spool", 0o755),
        ("var/www", 0o755),
    ] {
        tar.dir(dir, mode)?;
    }
    let binary =
        fs::read(&busybox).with_context(|| format!("cannot read {}", busybox.display()))?;
    tar.file("bin/busybox", 0o755, (0, 0), &binary)?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        tar.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    tar.file("etc/passwd", 0o644, (0, 0), PASSWD.as_bytes())?;
    tar.file("etc/group", 0o644, (0, 0), GROUP.as_bytes())?;
    tar.finish()?;
    umoci(&["init", "--layout"], layout)?;
    umoci(&["new", "--image"], latest(layout))?;
    umoci_add_layer(
        layout,
        &layer,
        "busybox-static: /bin/busybox, applet symlinks, /etc basics",
    )?;
    umoci(
        &[
            "config",
            "--config.cmd",
            "sh",
            "--config.env",
            PATH_ENV,
            "--image",
        ],
        latest(layout),
    )
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
    bin:x:2:2:bin:/bin:/bin/false\n\
    sys:x:3:3:sys:/dev:/bin/false\n\
    www-data:x:33:33:www-data:/var/www:/bin/false\n\
    nobody:x:65534:65534:nobody:/home:/bin/false\n";

const GROUP: &str = "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nwww-data:x:33:\n\
    users:x:100:\nnogroup:x:65534:\n";

/// nginx: (1) `debootstrap --variant=minbase bookworm`; (2) Debian's nginx installed with
/// apt, then docs, man pages, locales and apt lists deleted as in Debian's slim images
/// (whiteouts of lower files); (3) tweaks
/// like the official image (logs to the console, content in /usr/share/nginx/html, a
/// directory replaced by a symlink, Debian's default site deleted); (4) a hand-made layer
/// with an opaque directory, file<->directory replacements and a hard link to a file of
/// layer 3 (see `scenario_layer`). Config like the official image.
fn build_nginx(layout: &Path, scratch: &Path) -> Result<()> {
    let rootfs = scratch.join("debootstrap");
    let mirror = std::env::var("KATALITE_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    exec(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&rootfs)
            .arg(&mirror),
    )?;
    // As Debian's official images: no downloaded packages or package lists in the base.
    chroot(&rootfs, "apt-get clean && rm -rf /var/lib/apt/lists/*")?;
    let base = scratch.join("base.tar");
    exec(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&base)
            .arg("."),
    )?;
    fs::remove_dir_all(&rootfs).context("cannot remove the debootstrap tree")?;
    umoci(&["init", "--layout"], layout)?;
    umoci(&["new", "--image"], latest(layout))?;
    umoci_add_layer(layout, &base, "debootstrap --variant=minbase bookworm")?;
    fs::remove_file(&base).context("cannot remove the base layer tar")?;

    let bundle = scratch.join("bundle");
    exec(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(latest(layout))
            .arg(&bundle),
    )?;
    let root = bundle.join("rootfs");
    // policy-rc.d (invoke-rc.d's hook) keeps the package scripts from starting nginx.
    chroot(
        &root,
        &format!("{POLICY} && {INSTALL_NGINX} && rm /usr/sbin/policy-rc.d"),
    )?;
    repack(
        layout,
        &bundle,
        "apt-get install nginx; docs, man pages, locales, apt lists removed",
    )?;
    chroot(&root, OFFICIAL_TWEAKS)?;
    repack(
        layout,
        &bundle,
        "logs to the console, html in /usr/share/nginx/html",
    )?;
    let layer = scratch.join("scenarios.tar");
    scenario_layer(&layer)?;
    umoci_add_layer(
        layout,
        &layer,
        "katalite packer scenarios (opaque dir, replacements, links)",
    )?;
    umoci(
        &[
            "config",
            "--config.cmd",
            "nginx",
            "--config.cmd",
            "-g",
            "--config.cmd",
            "daemon off;",
            "--config.exposedports",
            "80/tcp",
            "--config.env",
            PATH_ENV,
            "--config.stopsignal",
            "SIGQUIT",
            "--image",
        ],
        latest(layout),
    )?;
    umoci(&["gc", "--layout"], layout)
}

const POLICY: &str = "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d \
    && chmod 755 /usr/sbin/policy-rc.d";

const INSTALL_NGINX: &str = "apt-get update -q \
    && apt-get install -q -y --no-install-recommends nginx \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/info/* \
        /usr/share/locale/*";

/// What the official nginx image does differently from Debian's package, plus files the
/// scenario layer deletes or replaces.
const OFFICIAL_TWEAKS: &str = "set -e
ln -sf /dev/stdout /var/log/nginx/access.log
ln -sf /dev/stderr /var/log/nginx/error.log
rm /etc/nginx/sites-enabled/default
mkdir -p /usr/share/nginx/html
printf '<!DOCTYPE html>\\n<title>Welcome to nginx!</title>\\n<h1>Welcome to nginx!</h1>\\n' \
    > /usr/share/nginx/html/index.html
rm -rf /var/www/html
ln -s /usr/share/nginx/html /var/www/html
t=/usr/share/katalite-test
mkdir -p $t/was-dir $t/opaque
echo inner > $t/was-dir/inner
echo file > $t/was-file
echo old > $t/opaque/old
echo target > $t/hardlink-target
echo gone > $t/gone";

const DEFAULT_CONF: &str = "server {
    listen 80;
    listen [::]:80;
    server_name localhost;
    location / {
        root /usr/share/nginx/html;
        index index.html;
    }
}
";

/// Layer 4, made by hand so each packer rule has a witness in a real image. After the
/// merge, under /usr/share/katalite-test: `was-dir` is a file, `was-file` a directory
/// holding `inside`, `opaque` holds only `new`, `hardlink` shares its inode with
/// `hardlink-target` (layer 3), `gone` does not exist, `fifo` is a named pipe, `setuid` has
/// mode 4755 and `owned` belongs to 101:101. nginx serves /usr/share/nginx/html on port 80.
fn scenario_layer(path: &Path) -> Result<()> {
    let mut tar = LayerTar::create(path)?;
    let at = |name: &str| format!("{SCENARIO}/{name}");
    tar.dir("etc/nginx/conf.d", 0o755)?;
    tar.file(
        "etc/nginx/conf.d/default.conf",
        0o644,
        (0, 0),
        DEFAULT_CONF.as_bytes(),
    )?;
    tar.dir(SCENARIO, 0o755)?;
    tar.file(&at("was-dir"), 0o644, (0, 0), b"now a file\n")?;
    tar.dir(&at("was-file"), 0o755)?;
    tar.file(&at("was-file/inside"), 0o644, (0, 0), b"inside\n")?;
    tar.dir(&at("opaque"), 0o755)?;
    tar.file(&at("opaque/.wh..wh..opq"), 0o644, (0, 0), b"")?;
    tar.file(&at("opaque/new"), 0o644, (0, 0), b"new\n")?;
    tar.hard_link(&at("hardlink"), &at("hardlink-target"))?;
    tar.file(&at(".wh.gone"), 0o644, (0, 0), b"")?;
    tar.fifo(&at("fifo"), 0o644)?;
    tar.file(&at("setuid"), 0o4755, (0, 0), b"#!/bin/sh\nid -u\n")?;
    tar.file(&at("owned"), 0o640, (101, 101), b"owned by 101:101\n")?;
    tar.finish()
}

/// A layer tar written with the `tar` crate; entries are owned by root unless said.
struct LayerTar(tar::Builder<File>);

impl LayerTar {
    fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(LayerTar(tar::Builder::new(file)))
    }

    /// A PAX extended header for the next entry (`path`), e.g. `SCHILY.xattr.NAME` records.
    fn pax(&mut self, path: &str, records: &[(&str, &[u8])]) -> Result<()> {
        let mut data = Vec::new();
        for (key, value) in records {
            // "LEN key=value\n", LEN counting itself: try lengths until the digits fit.
            let body = key.len() + value.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut header = Self::header(tar::EntryType::XHeader, 0o644, (0, 0));
        header.set_size(data.len() as u64);
        let name = format!("PaxHeaders/{}", path.rsplit('/').next().unwrap_or(path));
        self.append(&mut header, &name, data.as_slice())
    }

    fn header(kind: tar::EntryType, mode: u32, (uid, gid): (u64, u64)) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(MTIME);
        header.set_size(0);
        header
    }

    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut header = Self::header(tar::EntryType::Directory, mode, (0, 0));
        self.append(&mut header, path, &b""[..])
    }

    fn file(&mut self, path: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> Result<()> {
        let mut header = Self::header(tar::EntryType::Regular, mode, owner);
        header.set_size(data.len() as u64);
        self.append(&mut header, path, data)
    }

    fn fifo(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut header = Self::header(tar::EntryType::Fifo, mode, (0, 0));
        self.append(&mut header, path, &b""[..])
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, (0, 0));
        self.0
            .append_link(&mut header, path, target)
            .with_context(|| format!("cannot add {path} to the layer"))
    }

    fn hard_link(&mut self, path: &str, target: &str) -> Result<()> {
        let mut header = Self::header(tar::EntryType::Link, 0o644, (0, 0));
        self.0
            .append_link(&mut header, path, target)
            .with_context(|| format!("cannot add {path} to the layer"))
    }

    fn append(&mut self, header: &mut tar::Header, path: &str, data: impl io::Read) -> Result<()> {
        self.0
            .append_data(header, path, data)
            .with_context(|| format!("cannot add {path} to the layer"))
    }

    fn finish(self) -> Result<()> {
        let mut file = self.0.into_inner().context("cannot finish the layer tar")?;
        file.flush().context("cannot write the layer tar")
    }
}

/// Runs `umoci ARGS TARGET` (a layout path, or `latest(layout)` for its image).
fn umoci(args: &[&str], target: impl AsRef<std::ffi::OsStr>) -> Result<()> {
    exec(Command::new("umoci").args(args).arg(target))
}

/// `LAYOUT:latest`, the image the recipes build.
fn latest(layout: &Path) -> String {
    format!("{}:latest", layout.display())
}

fn umoci_add_layer(layout: &Path, layer: &Path, comment: &str) -> Result<()> {
    exec(
        Command::new("umoci")
            .args(["raw", "add-layer", "--history.comment", comment, "--image"])
            .arg(latest(layout))
            .arg(layer),
    )
}

/// Adds the changes made in `bundle`'s rootfs as a new layer (umoci diffs the tree, so
/// deleted lower files become whiteouts).
fn repack(layout: &Path, bundle: &Path, comment: &str) -> Result<()> {
    exec(
        Command::new("umoci")
            .args([
                "repack",
                "--refresh-bundle",
                "--history.comment",
                comment,
                "--image",
            ])
            .arg(latest(layout))
            .arg(bundle),
    )
}

fn chroot(root: &Path, script: &str) -> Result<()> {
    exec(
        Command::new("chroot")
            .arg(root)
            .args(["/bin/sh", "-c", script])
            .env_clear()
            .env("PATH", &PATH_ENV["PATH=".len()..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C"),
    )
}

/// The path of `suffix` among the files of an installed package.
fn package_file(package: &str, suffix: &str) -> Result<PathBuf> {
    output(Command::new("dpkg").args(["-L", package]))?
        .lines()
        .find(|line| line.ends_with(suffix))
        .map(PathBuf::from)
        .with_context(|| format!("{package} has no file ending in {suffix}"))
}

fn exec(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed ({})", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}

/// Installs whichever of `packages` is missing (as root with apt-get; otherwise fails
/// with the command to run).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let listing = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .output()
        .context("cannot run dpkg-query")?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let installed = |package: &str| {
        listing
            .lines()
            .any(|line| line.starts_with(&format!("{package} ")) && line.ends_with(" installed"))
    };
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    if output(Command::new("id").arg("-u"))?.trim() != "0" {
        bail!("missing Debian packages; run as root:\n  apt-get update && {install}");
    }
    println!("images: installing {}", missing.join(" "));
    for args in [&["update", "-q"][..], &["install", "-q", "-y"]] {
        let mut command = Command::new("apt-get");
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if args[0] == "install" {
            command.args(&missing);
        }
        exec(&mut command)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_layer_holds_every_packer_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("layer.tar");
        scenario_layer(&path).expect("layer");
        let mut archive = tar::Archive::new(File::open(&path).expect("open"));
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let name = entry.path().expect("path").display().to_string();
            seen.push((name, entry.header().entry_type()));
        }
        let has = |name: &str, kind: tar::EntryType| {
            seen.iter()
                .any(|(n, k)| n.trim_end_matches('/') == format!("{SCENARIO}/{name}") && *k == kind)
        };
        assert!(has("opaque/.wh..wh..opq", tar::EntryType::Regular));
        assert!(has(".wh.gone", tar::EntryType::Regular));
        assert!(has("hardlink", tar::EntryType::Link));
        assert!(has("was-file", tar::EntryType::Directory));
        assert!(has("was-dir", tar::EntryType::Regular));
        assert!(has("fifo", tar::EntryType::Fifo));
    }
}
