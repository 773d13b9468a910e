//! Points `include_bytes!` at the guest kernel and init that `cargo xtask build-guest` left in
//! `$KATALITE_GUEST_DIR` or `target/guest/`, so a release katalite needs only /dev/kvm.
//! The kernel embedded is `vmlinux.packed` (its loadable segments, compressed: a third of
//! the vmlinux), which must have been made from the `vmlinux` beside it; a guest directory
//! without one (a kernel with no PVH entry) embeds the vmlinux itself. The init is embedded
//! zstd-compressed (`$OUT_DIR/katalite-init.zst`, made here: 43 % of its bytes); katalite
//! decompresses it once per run, in about a millisecond.
//! It never builds them itself: nested cargo or make in a build script is slow and opaque.
//! It also writes `$OUT_DIR/version.txt`, what `katalite --version` prints after its own
//! version: the guest kernel's release (from its banner), a short hash of its resolved
//! config, the source it was built from (`vmlinux.stamp`), and the init's version (found in
//! the init binary) with a short hash of it, so a bug report says which guest ran.

use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rustc-check-cfg=cfg(katalite_embedded)");
    println!("cargo::rerun-if-env-changed=KATALITE_GUEST_DIR");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("no CARGO_MANIFEST_DIR")?);
    let (dir, default_dir) = match env::var_os("KATALITE_GUEST_DIR") {
        Some(dir) => (manifest.join(dir), false),
        None => (manifest.join("target").join("guest"), true),
    };
    let kernel = dir.join("vmlinux");
    let init = dir.join("katalite-init");
    let version_file =
        PathBuf::from(env::var_os("OUT_DIR").ok_or("no OUT_DIR")?).join("version.txt");
    if kernel.is_file() && init.is_file() {
        let (config, stamp) = (dir.join("vmlinux.config"), dir.join("vmlinux.stamp"));
        let packed = dir.join("vmlinux.packed");
        for path in [&kernel, &init, &config, &stamp, &packed] {
            println!("cargo::rerun-if-changed={}", path.display());
        }
        let version = embed(&kernel, &init)?;
        return Ok(fs::write(version_file, version)?);
    }
    fs::write(
        &version_file,
        format!(
            "{}\nguest: not embedded (built before `cargo xtask build-guest`)",
            env::var("CARGO_PKG_VERSION")?
        ),
    )?;
    if kernel.is_file() || init.is_file() {
        println!(
            "cargo::warning=only one of vmlinux and katalite-init is in {}: not embedding the \
             guest (run `cargo xtask build-guest`)",
            dir.display()
        );
    }
    // Cargo treats a missing rerun-if-changed path as changed on every build, which would
    // recompile katalite each time on a fresh clone. Watching the directory instead (the
    // default one is created empty) reruns this script exactly when files appear there.
    if default_dir {
        fs::create_dir_all(&dir)?;
    }
    if dir.is_dir() {
        println!("cargo::rerun-if-changed={}", dir.display());
    } else {
        println!(
            "cargo::warning=KATALITE_GUEST_DIR {} does not exist",
            dir.display()
        );
        for path in [&kernel, &init] {
            println!("cargo::rerun-if-changed={}", path.display());
        }
    }
    Ok(())
}

/// The init's compression: 725,552 bytes became 309,140 at level 19 (2026-12-06; 639,536 became
/// 279,747 once built with opt-level z, see the `guest-init` profile); the
/// decompression per run does not depend on the level.
const INIT_ZSTD_LEVEL: i32 = 19;

/// Points the crate at the guest files and returns the text of `katalite --version`.
fn embed(kernel: &Path, init: &Path) -> Result<String, Box<dyn Error>> {
    let packed = kernel.with_file_name("vmlinux.packed");
    let kernel = kernel.canonicalize()?;
    let init = init.canonicalize()?;
    let image = fs::read(&kernel)?;
    let embedded = match packed_kernel(&packed, &image)? {
        Some(packed) => packed.canonicalize()?,
        None => kernel.clone(),
    };
    println!("cargo::rustc-cfg=katalite_embedded");
    println!(
        "cargo::rustc-env=KATALITE_KERNEL_PATH={}",
        embedded.display()
    );
    let init_image = fs::read(&init)?;
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
    let compressed = out.join("katalite-init.zst");
    fs::write(
        &compressed,
        zstd::bulk::compress(&init_image, INIT_ZSTD_LEVEL)?,
    )?;
    println!(
        "cargo::rustc-env=KATALITE_INIT_ZST_PATH={}",
        compressed.display()
    );
    println!("cargo::rustc-env=KATALITE_INIT_LEN={}", init_image.len());
    let release = kernel_version(&image);
    if let Some(version) = &release {
        println!("cargo::rustc-env=KATALITE_KERNEL_VERSION={version}");
    }
    let dir = kernel.parent().ok_or("the kernel has no directory")?;
    let config = match fs::read(dir.join("vmlinux.config")) {
        Ok(text) => format!("config {}", short_sha256(&text)),
        Err(_) => "config unknown".to_owned(),
    };
    let source = fs::read_to_string(dir.join("vmlinux.stamp"))
        .ok()
        .and_then(|stamp| describe_source(&stamp))
        .unwrap_or_else(|| format!("vmlinux sha256 {}", short_sha256(&image)));
    let init_version = marked_version(&init_image, b"katalite-init version ")
        .unwrap_or_else(|| "of unknown version".to_owned());
    Ok(format!(
        "{}\nguest kernel {} ({config}; {source})\nguest init {init_version} (sha256 {})",
        env::var("CARGO_PKG_VERSION")?,
        release.as_deref().unwrap_or("of unknown version"),
        short_sha256(&init_image)
    ))
}

/// `packed` (`vmlinux.packed`), after checking it was made from `image` (the vmlinux's
/// bytes); `None`, with a warning, when there is none.
fn packed_kernel(packed: &Path, image: &[u8]) -> Result<Option<PathBuf>, Box<dyn Error>> {
    // vmm::packed_kernel's header: the magic, and where it keeps the source's SHA-256 (this
    // script cannot depend on vmm; its embedded test parses the header for real).
    const MAGIC: &[u8] = b"KTLKERN\0";
    const SOURCE_SHA256: std::ops::Range<usize> = 16..48;
    let header = match fs::read(packed) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "cargo::warning=no {}: embedding the uncompressed vmlinux (run `cargo xtask \
                 build-guest` to pack it)",
                packed.display()
            );
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    let made_from = header.get(SOURCE_SHA256);
    if !header.starts_with(MAGIC) || made_from != Some(&Sha256::digest(image)[..]) {
        return Err(format!(
            "{} was not made from the vmlinux beside it: run `cargo xtask build-guest`",
            packed.display()
        )
        .into());
    }
    Ok(Some(packed.to_path_buf()))
}

/// The source line of `vmlinux.stamp` (TOML written by `cargo xtask build-guest`): Debian's
/// package and version, or the user's tree. Only the plain `name = "value"` lines it writes
/// are read, and only printable values are used.
fn describe_source(stamp: &str) -> Option<String> {
    let field = |name: &str| {
        stamp.lines().find_map(|line| {
            let (key, value) = line.split_once(" = ")?;
            let value = value.strip_prefix('"')?.strip_suffix('"')?;
            let plain = value
                .chars()
                .all(|c| (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ');
            (key.trim() == name && plain && value.len() <= 200).then(|| value.to_owned())
        })
    };
    match field("kind")?.as_str() {
        "debian" => Some(format!(
            "Debian {} {}",
            field("package")?,
            field("debian_version")?
        )),
        "tree" => Some(format!("tree {}", field("path")?)),
        _ => None,
    }
}

/// The first 12 hex digits of `data`'s sha256.
fn short_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The version following `marker` in `image` (digits first, up to the first byte that is
/// not printable).
fn marked_version(image: &[u8], marker: &[u8]) -> Option<String> {
    let start = image.windows(marker.len()).position(|w| w == marker)? + marker.len();
    let rest = image.get(start..)?;
    let end = rest.iter().position(|b| !b.is_ascii_graphic())?;
    let version = std::str::from_utf8(&rest[..end]).ok()?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| version.to_owned())
}

/// The release from the kernel's `linux_banner` ("Linux version 6.12.117 (user@host) ...").
fn kernel_version(image: &[u8]) -> Option<String> {
    marked_version(image, b"Linux version ")
}
