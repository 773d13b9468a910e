//! virtio-fs (our FUSE server) behind the virtio-mmio transport, driven by a hostile driver
//! program (see `katalite_fuzz::driver`) whose chains carry FUSE requests. Each run shares
//! a fresh directory beside a sentinel the guest must never reach; the first byte picks a
//! read-only or writable share.

#![no_main]

use std::path::Path;
use std::sync::Once;

use katalite_fuzz::driver::Driver;
use libfuzzer_sys::fuzz_target;
use vmm::virtio::fuzzing::fs;

const SENTINEL: &[u8] = b"outside the share\n";
/// Largest file the guest may make: a FALLOCATE or WRITE far out fails with EFBIG rather
/// than filling the host's disk.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Caps file sizes for this process (and ignores SIGXFSZ, so the cap is an error for the
/// guest's request rather than the end of the fuzzer).
fn cap_file_size() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let limit = libc::rlimit {
            rlim_cur: MAX_FILE_BYTES,
            rlim_max: MAX_FILE_BYTES,
        };
        // SAFETY: setrlimit reads the struct we pass; signal changes only SIGXFSZ's
        // disposition to "ignore", which needs no handler code.
        let failed = unsafe {
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
                || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
        };
        assert!(!failed, "cannot cap file sizes");
    });
}

/// The share's starting contents: a file, a directory, and a symlink pointing out of it
/// at the sentinel.
fn populate(share: &Path) {
    std::fs::write(share.join("file"), b"hello\n").expect("file");
    std::fs::create_dir(share.join("dir")).expect("dir");
    std::fs::write(share.join("dir/inner"), b"").expect("inner");
    std::os::unix::fs::symlink("../outside", share.join("escape")).expect("symlink");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, program)) = data.split_first() else {
        return;
    };
    cap_file_size();
    let sandbox = tempfile::Builder::new()
        .prefix("katalite-fuzz-fs")
        .tempdir()
        .expect("sandbox");
    let share = sandbox.path().join("share");
    let outside = sandbox.path().join("outside");
    std::fs::create_dir(&share).expect("share");
    std::fs::write(&outside, SENTINEL).expect("sentinel");
    populate(&share);

    let device = fs(&share, mode & 1 == 1).expect("share opens");
    let mut driver = Driver::new(device);
    driver.run(program, |_, _| {});
    drop(driver);

    // Nothing beside the share changed.
    assert_eq!(std::fs::read(&outside).ok().as_deref(), Some(SENTINEL));
    let mut names: Vec<_> = std::fs::read_dir(sandbox.path())
        .expect("sandbox")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outside", "share"],
        "the guest made files outside its share"
    );
});
