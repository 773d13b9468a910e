//! `katalite install-runtime [--prefix DIR]`: the names the engines start katalite by,
//! as symbolic links to this binary in `PREFIX/bin`. Docker then takes
//! `"runtimes": {"katalite": {"path": "PREFIX/bin/katalite-runc"}}` in daemon.json,
//! podman `--runtime PREFIX/bin/katalite-runc`, and containerd finds
//! `containerd-shim-katalite-v2` on its PATH for `--runtime io.containerd.katalite.v2`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::PROGRAM;

/// `install-runtime`.
#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The links go to PREFIX/bin.
    #[arg(long, value_name = "PREFIX", default_value = "/usr/local")]
    pub prefix: PathBuf,
}

/// The names installed.
pub const LINKS: [&str; 2] = [PROGRAM, katalite_shim::PROGRAM];

/// Makes (or renews) the links; a file of that name that is not a link is left alone.
pub fn install(args: &InstallArgs) -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find katalite's own path")?;
    let exe =
        fs::canonicalize(&exe).with_context(|| format!("cannot resolve {}", exe.display()))?;
    let bin = args.prefix.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    for name in LINKS {
        let link = bin.join(name);
        install_link(&exe, &link)?;
        println!("{} -> {}", link.display(), exe.display());
    }
    Ok(0)
}

fn install_link(target: &Path, link: &Path) -> Result<()> {
    match fs::symlink_metadata(link) {
        Ok(meta) if meta.file_type().is_symlink() => {}
        Ok(_) => bail!(
            "{} exists and is not a link; not replacing it",
            link.display()
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("cannot inspect {}", link.display())),
    }
    // A link made beside it and renamed over it: the name never goes missing.
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    fs::rename(&tmp, link).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("cannot install {}", link.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_made_renewed_and_never_replace_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("katalite-runc");
        install_link(Path::new("/old/katalite"), &link).expect("make");
        install_link(Path::new("/new/katalite"), &link).expect("renew");
        assert_eq!(
            fs::read_link(&link).expect("link"),
            Path::new("/new/katalite")
        );
        let file = dir.path().join("plain");
        fs::write(&file, "x").expect("write");
        assert!(install_link(Path::new("/k"), &file).is_err());
        assert_eq!(fs::read_to_string(&file).expect("read"), "x");
    }
}
