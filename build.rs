//! Points `include_bytes!` at the guest kernel and init that `cargo xtask build-guest` left in
//! `$KATALITE_GUEST_DIR` or `target/guest/`, so a release katalite needs only /dev/kvm.
//! It never builds them itself: nested cargo or make in a build script is slow and opaque.

use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

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
    if kernel.is_file() && init.is_file() {
        for path in [&kernel, &init] {
            println!("cargo::rerun-if-changed={}", path.display());
        }
        return embed(&kernel, &init);
    }
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

fn embed(kernel: &Path, init: &Path) -> Result<(), Box<dyn Error>> {
    let kernel = kernel.canonicalize()?;
    let init = init.canonicalize()?;
    println!("cargo::rustc-cfg=katalite_embedded");
    println!("cargo::rustc-env=KATALITE_KERNEL_PATH={}", kernel.display());
    println!("cargo::rustc-env=KATALITE_INIT_PATH={}", init.display());
    if let Some(version) = kernel_version(&fs::read(&kernel)?) {
        println!("cargo::rustc-env=KATALITE_KERNEL_VERSION={version}");
    }
    Ok(())
}

/// The release from the kernel's `linux_banner` ("Linux version 6.12.117 (user@host) ...").
fn kernel_version(image: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let start = image.windows(BANNER.len()).position(|w| w == BANNER)? + BANNER.len();
    let rest = image.get(start..)?;
    let end = rest.iter().position(|b| !b.is_ascii_graphic())?;
    let version = std::str::from_utf8(&rest[..end]).ok()?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| version.to_owned())
}
