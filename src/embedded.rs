//! The guest kernel and init compiled into katalite by `build.rs`, so a release binary needs
//! nothing but /dev/kvm. Absent when katalite was built before `cargo xtask build-guest`.

/// The guest kernel: an uncompressed x86_64 `vmlinux` ELF booted through its PVH entry note.
pub fn kernel() -> Option<&'static [u8]> {
    #[cfg(katalite_embedded)]
    return Some(include_bytes!(env!("KATALITE_KERNEL_PATH")));
    #[cfg(not(katalite_embedded))]
    None
}

/// The guest's PID 1: the static `katalite-init` ELF packed into every initramfs.
pub fn init() -> Option<&'static [u8]> {
    #[cfg(katalite_embedded)]
    return Some(include_bytes!(env!("KATALITE_INIT_PATH")));
    #[cfg(not(katalite_embedded))]
    None
}

/// The embedded kernel's release, e.g. `6.12.117`, read from its banner at build time.
#[cfg(test)]
fn kernel_version() -> Option<&'static str> {
    option_env!("KATALITE_KERNEL_VERSION")
}

/// What `katalite --version` prints after the name: katalite's version, then the embedded
/// guest kernel (release, short hash of its config, its source) and init (version, short
/// hash), or that no guest is embedded. Written by `build.rs`.
pub const VERSION: &str = include_str!(concat!(env!("OUT_DIR"), "/version.txt"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_and_init_come_together() {
        assert_eq!(kernel().is_some(), init().is_some());
        assert_eq!(kernel().is_some(), kernel_version().is_some());
    }

    #[test]
    fn the_version_names_the_embedded_guest() {
        let mut lines = VERSION.lines();
        assert_eq!(lines.next(), Some(env!("CARGO_PKG_VERSION")));
        match kernel_version() {
            Some(release) => {
                let kernel = lines.next().expect("kernel line");
                assert!(
                    kernel.starts_with(&format!("guest kernel {release} (config ")),
                    "{VERSION}"
                );
                let init = lines.next().expect("init line");
                let expected = format!("guest init {} (sha256 ", env!("CARGO_PKG_VERSION"));
                assert!(init.starts_with(&expected), "{VERSION}");
            }
            None => assert!(VERSION.contains("guest: not embedded"), "{VERSION}"),
        }
    }

    #[test]
    fn embedded_images_are_elf() {
        for image in [kernel(), init()].into_iter().flatten() {
            assert_eq!(image.get(..4), Some(&b"\x7fELF"[..]));
        }
        if let Some(version) = kernel_version() {
            assert!(
                version.starts_with(|c: char| c.is_ascii_digit()),
                "{version}"
            );
        }
    }
}
