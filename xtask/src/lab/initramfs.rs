//! The L1 initramfs: a cached base archive (busybox, modules, `/init`) plus a tiny per-run
//! archive appended to it with the command.
//!
//! The kernel unpacks concatenated cpio archives in order (Documentation/driver-api/
//! early-userspace/buffer-format.rst), so a run never rebuilds the base. Both stay
//! uncompressed: decompressing under TCG costs more than copying.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{bail, Context, Result};
use tempfile::NamedTempFile;

use super::kernel::{self, L1Kernel, L1_ROOT_MODULES};
use super::{busybox, cache};

/// The lab's PID 1.
const INIT_SCRIPT: &str = include_str!("init.sh");

/// What the init sources to start the container engines (`lab run --runtimes`).
const RUNTIMES_SCRIPT: &str = include_str!("runtimes.sh");

/// Directories the init script mounts on or writes to.
const DIRS: &[&str] = &[
    "dev", "proc", "sys", "tmp", "run", "src", "host", "etc", "root", "runtimes",
];

/// Returns the base archive for `kernel`, building it into `cache` when stale.
pub fn base(cache: &Path, kernel: &L1Kernel) -> Result<PathBuf> {
    let archive = cache.join(format!("l1-{}.cpio", kernel.release));
    let key = cache::key(&[
        INIT_SCRIPT.as_bytes(),
        RUNTIMES_SCRIPT.as_bytes(),
        kernel.release.as_bytes(),
        L1_ROOT_MODULES.join(",").as_bytes(),
        cache::file_version(Path::new(busybox::HOST_BUSYBOX))?.as_bytes(),
    ]);
    if cache::is_fresh(&archive, &key) {
        return Ok(archive);
    }
    let staging = tempfile::tempdir_in(cache).context("cannot create a staging dir")?;
    populate(staging.path(), kernel)?;
    let bytes = pack(staging.path())?;
    let mut file = NamedTempFile::new_in(cache).context("cannot create the archive")?;
    file.write_all(&bytes)?;
    file.persist(&archive)
        .with_context(|| format!("cannot write {}", archive.display()))?;
    cache::mark(&archive, &key)?;
    Ok(archive)
}

fn populate(root: &Path, kernel: &L1Kernel) -> Result<()> {
    let host_busybox = Path::new(busybox::HOST_BUSYBOX);
    busybox::install(root, host_busybox, &busybox::applets(host_busybox)?)?;
    for dir in DIRS {
        fs::create_dir_all(root.join(dir))?;
    }
    write_executable(&root.join("init"), INIT_SCRIPT)?;
    fs::create_dir_all(root.join("lab"))?;
    write_executable(&root.join("lab/runtimes.sh"), RUNTIMES_SCRIPT)?;

    let target = root.join("lib/modules");
    fs::create_dir_all(&target)?;
    let index = kernel::module_index(&kernel.modules)?;
    let builtin = kernel::builtin_modules(&kernel.modules)?;
    let order = kernel::load_order(L1_ROOT_MODULES, &builtin, |name| {
        let source = index
            .get(name)
            .with_context(|| format!("module {name} is not in kernel {}", kernel.release))?;
        let file = target.join(format!("{name}.ko"));
        decompress(source, &file)?;
        modinfo_depends(&file)
    })?;
    fs::write(target.join("order"), order.join("\n") + "\n")?;
    Ok(())
}

/// Copies a module file, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz`: busybox `insmod` may
/// lack the decompressors.
fn decompress(source: &Path, target: &Path) -> Result<()> {
    let name = source.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        fs::copy(source, target).with_context(|| format!("cannot copy {name}"))?;
        return Ok(());
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(source)
        .output()
        .with_context(|| format!("cannot run {tool} (needed for {name})"))?;
    if !output.status.success() {
        bail!("{tool} -dc {name} failed ({})", output.status);
    }
    fs::write(target, output.stdout).with_context(|| format!("cannot write {}", target.display()))
}

fn modinfo_depends(module: &Path) -> Result<Vec<String>> {
    let output = Command::new("modinfo")
        .args(["-F", "depends"])
        .arg(module)
        .output()
        .context("cannot run modinfo")?;
    if !output.status.success() {
        bail!("modinfo {} failed ({})", module.display(), output.status);
    }
    Ok(kernel::parse_modinfo_depends(&String::from_utf8_lossy(
        &output.stdout,
    )))
}

/// Writes `base` followed by a small archive holding `files` (path inside L1, content),
/// into a temporary file in `dir` that is removed when dropped.
pub fn with_files(dir: &Path, base: &Path, files: &[(&str, &str)]) -> Result<NamedTempFile> {
    let staging = tempfile::tempdir_in(dir).context("cannot create a staging dir")?;
    for (path, content) in files {
        let path = staging.path().join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        write_executable(&path, content)?;
    }
    let extra = pack(staging.path())?;
    let mut out = NamedTempFile::new_in(dir).context("cannot create the run's initramfs")?;
    let mut base =
        fs::File::open(base).with_context(|| format!("cannot open {}", base.display()))?;
    io::copy(&mut base, &mut out).context("cannot copy the base initramfs")?;
    out.write_all(&extra)?;
    out.flush()?;
    Ok(out)
}

fn write_executable(path: &Path, content: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Packs the tree at `root` as a `newc` cpio archive with root ownership (what the kernel
/// unpacks), using GNU cpio.
fn pack(root: &Path) -> Result<Vec<u8>> {
    let list = relative_paths(root)?.join("\n") + "\n";
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cpio")?;
    let mut stdin = child.stdin.take().context("cpio has no stdin")?;
    let writer = thread::spawn(move || stdin.write_all(list.as_bytes()));
    let output = child.wait_with_output().context("cpio failed")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("cpio input thread panicked"))?
        .context("cannot feed cpio")?;
    if !output.status.success() {
        bail!("cpio failed ({})", output.status);
    }
    Ok(output.stdout)
}

/// Every path under `root`, relative to it, parents before children, sorted for
/// reproducible archives.
fn relative_paths(root: &Path) -> Result<Vec<String>> {
    let mut paths = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        let mut entries = Vec::new();
        for entry in fs::read_dir(root.join(&dir))? {
            let entry = entry?;
            let path = dir.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                dirs.push(path.clone());
            }
            entries.push(path.to_string_lossy().into_owned());
        }
        entries.sort();
        paths.extend(entries);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_listed_before_their_children() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir_all(dir.path().join("lab/sub")).expect("mkdir");
        fs::write(dir.path().join("lab/sub/cmd.sh"), "true").expect("write");
        fs::write(dir.path().join("init"), "").expect("write");
        let paths = relative_paths(dir.path()).expect("walk");
        assert_eq!(paths, ["init", "lab", "lab/sub", "lab/sub/cmd.sh"]);
    }

    #[test]
    fn appended_files_follow_the_base_archive() {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path().join("base.cpio");
        fs::write(&base, b"BASE").expect("write base");
        let file = with_files(dir.path(), &base, &[("lab/cmd.sh", "echo hi\n")])
            .expect("cpio (a lab package) packs the run's files");
        let bytes = fs::read(file.path()).expect("read archive");
        assert!(
            bytes.starts_with(b"BASE070701"),
            "newc header after the base"
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("lab/cmd.sh") && text.contains("echo hi\n"));
        assert!(text.contains("TRAILER!!!"));
    }
}
