//! The guest kernel and init compiled into katalite by `build.rs`, so a release binary needs
//! nothing but /dev/kvm. Absent when katalite was built before `cargo xtask build-guest`.
//!
//! The kernel is packed (`vmm::packed_kernel`): the vmlinux's loadable segments, one zstd
//! frame each, with no ELF file padding, so the binary carries about a third of the
//! vmlinux's bytes. The VMM decompresses it straight into guest memory at each boot.

/// The guest kernel: a packed kernel (`vmlinux.packed`, entered through PVH), or, when the
/// guest directory had none (a kernel without a PVH entry), the uncompressed x86_64
/// `vmlinux` ELF. The VMM tells them apart by their magic.
pub fn kernel() -> Option<&'static [u8]> {
    #[cfg(katalite_embedded)]
    return Some(KERNEL);
    #[cfg(not(katalite_embedded))]
    None
}

/// The guest's PID 1: the static `katalite-init` ELF packed into every initramfs. It is
/// embedded zstd-compressed (less than half its size) and decompressed here, once per run.
pub fn init() -> Option<std::io::Result<Vec<u8>>> {
    #[cfg(katalite_embedded)]
    return Some(zstd::bulk::decompress(INIT_ZST, INIT_LEN));
    #[cfg(not(katalite_embedded))]
    None
}

// Statics, not `include_bytes!` in the functions: the macro is a constant, and a constant
// is copied into every codegen unit that inlines its use, which once put the kernel into
// the binary twice. A static has one address.
#[cfg(katalite_embedded)]
static KERNEL: &[u8] = include_bytes!(env!("KATALITE_KERNEL_PATH"));
#[cfg(katalite_embedded)]
static INIT_ZST: &[u8] = include_bytes!(env!("KATALITE_INIT_ZST_PATH"));

/// Drops this process's mappings of the embedded kernel's (and compressed init's) pages
/// once the VM holds its own copies, so a running VM does not count them in its resident memory.
/// They stay in the page cache for the next start; a later read faults them back in.
pub fn release_pages() {
    #[cfg(katalite_embedded)]
    for image in [KERNEL, INIT_ZST] {
        release(image);
    }
}

/// `MADV_DONTNEED` on the whole pages inside `bytes`.
#[cfg(katalite_embedded)]
fn release(bytes: &'static [u8]) {
    const PAGE: usize = 4096;
    let start = (bytes.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (bytes.as_ptr() as usize + bytes.len()) & !(PAGE - 1);
    if end <= start {
        return;
    }
    // SAFETY: the range lies inside `bytes`, which `include_bytes!` placed in the binary's
    // read-only, file-backed private mapping: nothing ever writes it, so dropping this
    // process's page-table entries loses nothing (a later read maps the same file pages
    // again). Whole pages only, so no neighbouring data shares them. The result is
    // ignored: failing to release only leaves the pages resident.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

/// The init's size, uncompressed.
#[cfg(katalite_embedded)]
const INIT_LEN: usize = parse_len(env!("KATALITE_INIT_LEN"));

/// A decimal length at compile time (`str::parse` is not const).
#[cfg(katalite_embedded)]
const fn parse_len(text: &str) -> usize {
    let digits = text.as_bytes();
    let mut value = 0;
    let mut at = 0;
    while at < digits.len() {
        assert!(
            digits[at].is_ascii_digit(),
            "KATALITE_INIT_LEN is not a number"
        );
        value = value * 10 + (digits[at] - b'0') as usize;
        at += 1;
    }
    value
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
    fn the_build_script_reads_the_packed_header_as_vmm_writes_it() {
        // build.rs repeats these two (it cannot depend on vmm) to refuse a stale file.
        assert_eq!(&vmm::packed_kernel::MAGIC, b"KTLKERN\0");
        assert_eq!(vmm::packed_kernel::SOURCE_SHA256, 16..48);
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
    fn released_pages_read_back_the_same() {
        let sum = |bytes: &[u8]| {
            bytes
                .iter()
                .fold(0u64, |s, b| s.wrapping_mul(31) + u64::from(*b))
        };
        let before: Vec<u64> = kernel().into_iter().map(sum).collect();
        release_pages();
        let after: Vec<u64> = kernel().into_iter().map(sum).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn the_embedded_kernel_is_packed_or_elf_and_init_is_elf() {
        if let Some(kernel) = kernel() {
            if vmm::packed_kernel::is_packed(kernel) {
                let (header, _) = vmm::packed_kernel::Header::parse(kernel).expect("header");
                assert!(!header.segments.is_empty());
            } else {
                assert_eq!(kernel.get(..4), Some(&b"\x7fELF"[..]));
            }
        }
        if let Some(init) = init() {
            let init = init.expect("the embedded init decompresses");
            assert_eq!(init.get(..4), Some(&b"\x7fELF"[..]));
        }
        if let Some(version) = kernel_version() {
            assert!(
                version.starts_with(|c: char| c.is_ascii_digit()),
                "{version}"
            );
        }
    }
}
