//! User stories of the storage path: images boot from their EROFS disk image, so an image
//! larger than the guest's RAM runs, file capabilities survive from layer to workload, and
//! a corrupted cache block is refused and reported instead of executed. The images are OCI
//! layouts built by `cargo xtask images` (`KATALITE_E2E_IMAGES`, as L1 sees them).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{katalite, katalite_captured_with, Outcome};

/// `oci:DIR/NAME:latest` for one of the test images.
fn image(name: &str) -> String {
    let dir = std::env::var("KATALITE_E2E_IMAGES")
        .expect("KATALITE_E2E_IMAGES must name the test images: run `cargo xtask lab e2e`");
    let layout = Path::new(&dir).join(name);
    assert!(
        layout.join("index.json").is_file(),
        "missing test image {}",
        layout.display()
    );
    format!("oci:{}:latest", layout.display())
}

/// `katalite ARGS` with its image cache in `cache` (`KATALITE_CACHE_DIR`).
fn katalite_cached(cache: &Path, args: &[&str]) -> Outcome {
    let run = katalite_captured_with(args, &[("KATALITE_CACHE_DIR", cache.as_os_str())], None);
    Outcome {
        status: run.status,
        stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
    }
}

#[test]
fn an_image_over_1_gib_runs_in_256m_and_reads_byte_exact() {
    let large = image("large");
    let args = [
        "run",
        "-q",
        "--memory",
        "256m",
        &large,
        "sha256sum",
        "-c",
        "/data/random.bin.sha256",
    ];
    let run = katalite(&args);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(
        run.stdout.trim_end(),
        "/data/random.bin: OK",
        "{}",
        run.describe()
    );
}

#[test]
fn a_security_capability_xattr_in_a_layer_gives_a_non_root_workload_the_capability() {
    let caps = image("caps");
    let cap_eff = |program: &str| {
        let args = [
            "run",
            "-q",
            "-u",
            "1000:1000",
            &caps,
            program,
            "grep",
            "CapEff",
            "/proc/self/status",
        ];
        let run = katalite(&args);
        assert_eq!(run.status, Some(0), "{}", run.describe());
        run.stdout
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
            .unwrap_or_default()
    };
    // cap_net_bind_service (bit 10) from the file's xattr; nothing without it.
    assert_eq!(
        cap_eff("/usr/local/bin/busybox-netbind"),
        "0000000000000400"
    );
    assert_eq!(cap_eff("/bin/busybox"), "0000000000000000");
}

/// The only disk image in a private cache.
fn cached_disk_image(cache: &Path) -> PathBuf {
    let images: Vec<PathBuf> = fs::read_dir(cache.join("erofs"))
        .expect("the cache has an erofs directory")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension() == Some(OsStr::new("erofs")))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    images.into_iter().next().expect("one image")
}

#[test]
fn a_flipped_byte_in_the_cached_disk_image_fails_the_read_and_rmi_plus_pull_recovers() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let cache = scratch.path();
    let busybox = image("busybox");
    let check = ["run", "-q", &busybox, "sha256sum", "/bin/busybox"];
    let first = katalite_cached(cache, &check);
    assert_eq!(first.status, Some(0), "{}", first.describe());

    // The busybox binary is nearly all of the image: its middle is file content.
    let disk = cached_disk_image(cache);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .expect("open disk image");
    let middle = file.metadata().expect("stat").len() / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, middle).expect("read");
    file.write_all_at(&[byte[0] ^ 0x20], middle).expect("flip");
    drop(file);

    let corrupt = katalite_cached(cache, &check);
    assert_ne!(corrupt.status, Some(0), "{}", corrupt.describe());
    assert!(
        corrupt.stderr.contains("failed verification"),
        "{}",
        corrupt.describe()
    );
    assert!(
        !corrupt.stdout.contains(first.stdout.trim_end()),
        "{}",
        corrupt.describe()
    );

    let rmi = katalite_cached(cache, &["rmi", &busybox]);
    assert_eq!(rmi.status, Some(0), "{}", rmi.describe());
    let recovered = katalite_cached(cache, &check);
    assert_eq!(recovered.status, Some(0), "{}", recovered.describe());
    assert_eq!(recovered.stdout, first.stdout, "{}", recovered.describe());
}

#[test]
fn the_initramfs_path_refuses_an_image_bigger_than_memory_before_boot() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let big = scratch.path().join("rootfs");
    fs::create_dir(&big).expect("mkdir");
    fs::write(big.join("blob"), vec![7u8; 80 << 20]).expect("write");
    let dir = big.to_string_lossy();
    // `--rootfs` boots a directory over virtio-fs; the initramfs path packs it.
    let run = katalite(&[
        "run",
        "-q",
        "--memory",
        "128m",
        "--image-root",
        "initramfs",
        "--rootfs",
        &dir,
        "/blob",
    ]);
    assert_eq!(run.status, Some(125), "{}", run.describe());
    assert!(
        run.stderr.contains("more than --memory 128m"),
        "{}",
        run.describe()
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
}
