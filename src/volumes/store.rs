//! Named volumes: host directories katalite keeps for containers, Docker's way, as
//! `<data dir>/volumes/NAME/_data` with the volume's metadata in `NAME/volume.json`. The
//! data dir is `$KATALITE_DATA_DIR`, else `/var/lib/katalite` for root (where the image
//! cache of root lives too), else `$XDG_DATA_HOME/katalite`, else
//! `~/.local/share/katalite`. A volume appears whole or not at all (made in a temporary
//! directory, then renamed), and goes the same way (renamed away, then deleted).

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lifecycle::time::Timestamp;

/// Overrides the data dir (tests give each run its own).
pub const DATA_DIR_ENV: &str = "KATALITE_DATA_DIR";
/// The data dir of root.
const SYSTEM_DATA_DIR: &str = "/var/lib/katalite";
/// The directory inside a volume that containers see.
const DATA: &str = "_data";
const METADATA: &str = "volume.json";
const LOCK: &str = ".lock";
/// Hex digits of an anonymous volume's name (32 random bytes, as Docker's).
const ANONYMOUS_NAME_LEN: usize = 64;
/// Longest volume name: a file name.
const MAX_NAME_LEN: usize = 255;

/// Docker's rule for volume names, `[a-zA-Z0-9][a-zA-Z0-9_.-]+` (so never `/`, `.` or
/// `..`), and short enough to be a file name.
pub fn is_volume_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What `volume.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Metadata {
    created_at: Timestamp,
}

/// One volume.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Its name.
    pub name: String,
    /// The host directory containers see (`.../NAME/_data`).
    pub mountpoint: PathBuf,
    /// When it was made.
    pub created: Timestamp,
}

/// The `volumes` directory of the data dir.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    dir: PathBuf,
}

impl VolumeStore {
    /// The volumes of this user (see the module's doc for where), created 0700 if missing.
    pub fn open() -> Result<Self> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let root = data_root(
            var(DATA_DIR_ENV),
            rustix::process::geteuid().as_raw(),
            var("XDG_DATA_HOME"),
            var("HOME"),
        )?;
        Self::at(root.join("volumes"))
    }

    /// The volumes in `dir`, created 0700 if missing.
    pub fn at(dir: PathBuf) -> Result<Self> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Holds the store's lock until dropped: volume removal takes it, and so does `run`
    /// from making its volumes until its container records them, so a volume cannot go
    /// while a container is about to use it.
    pub fn lock(&self) -> Result<File> {
        let path = self.dir.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.lock()
            .with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(file)
    }

    /// The volume `name`, made if missing (so `volume create NAME` twice is fine, as in
    /// Docker); `None` makes an anonymous volume with a random 64-hex name.
    pub fn create(&self, name: Option<&str>) -> Result<Volume> {
        let name = match name {
            Some(name) if !is_volume_name(name) => {
                bail!("invalid volume name \"{name}\": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
            }
            Some(name) => name.to_string(),
            None => random_hex(ANONYMOUS_NAME_LEN / 2)?,
        };
        if let Ok(volume) = self.get(&name) {
            return Ok(volume);
        }
        let tmp = self.dir.join(format!(".tmp-{}", random_hex(8)?));
        let made = self.fill(&tmp).and_then(|()| {
            fs::rename(&tmp, self.dir.join(&name))
                .with_context(|| format!("cannot create volume {name}"))
        });
        if let Err(err) = made {
            let _ = fs::remove_dir_all(&tmp);
            // Made by someone else meanwhile: theirs is as good.
            return self.get(&name).map_err(|_| err);
        }
        self.get(&name)
    }

    /// Lays out a new volume in `dir`.
    fn fill(&self, dir: &Path) -> Result<()> {
        let context = || format!("cannot create {}", dir.display());
        DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(context)?;
        DirBuilder::new()
            .mode(0o755)
            .create(dir.join(DATA))
            .with_context(context)?;
        let metadata = Metadata {
            created_at: Timestamp::now(),
        };
        fs::write(dir.join(METADATA), serde_json::to_vec(&metadata)?).with_context(context)
    }

    /// The volume `name`.
    pub fn get(&self, name: &str) -> Result<Volume> {
        if !is_volume_name(name) {
            bail!("no such volume: {name}");
        }
        let dir = self.dir.join(name);
        let mountpoint = dir.join(DATA);
        match fs::symlink_metadata(&mountpoint) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!(
                "volume {name} is damaged: {} is not a directory",
                mountpoint.display()
            ),
            Err(err) if err.kind() == io::ErrorKind::NotFound => bail!("no such volume: {name}"),
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read {}", mountpoint.display()))
            }
        }
        let metadata_path = dir.join(METADATA);
        let created = fs::read(&metadata_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Metadata>(&bytes).ok())
            .map(|m| m.created_at)
            .ok_or_else(|| anyhow!("cannot read {}", metadata_path.display()))?;
        Ok(Volume {
            name: name.to_string(),
            mountpoint,
            created,
        })
    }

    /// Every volume, by name. Half-made or half-removed ones are skipped.
    pub fn list(&self) -> Result<Vec<Volume>> {
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("cannot read {}", self.dir.display()))?;
        let mut all = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", self.dir.display()))?;
            if let Some(volume) = entry.file_name().to_str().and_then(|n| self.get(n).ok()) {
                all.push(volume);
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Deletes the volume `name` and its data. The caller checks that no container uses it.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.get(name)?;
        let doomed = self.dir.join(format!(".rm-{}", random_hex(8)?));
        fs::rename(self.dir.join(name), &doomed).map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => anyhow!("no such volume: {name}"),
            _ => anyhow!(err).context(format!("cannot remove volume {name}")),
        })?;
        fs::remove_dir_all(&doomed)
            .with_context(|| format!("cannot delete {} (volume {name})", doomed.display()))
    }
}

/// `$KATALITE_DATA_DIR`; else `/var/lib/katalite` for root; else `$XDG_DATA_HOME/katalite`;
/// else `$HOME/.local/share/katalite`.
fn data_root(
    explicit: Option<OsString>,
    euid: u32,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf> {
    match (explicit, xdg, home) {
        (Some(dir), _, _) => Ok(PathBuf::from(dir)),
        _ if euid == 0 => Ok(PathBuf::from(SYSTEM_DATA_DIR)),
        (_, Some(xdg), _) => Ok(PathBuf::from(xdg).join("katalite")),
        (_, _, Some(home)) => Ok(PathBuf::from(home).join(".local/share/katalite")),
        _ => bail!("cannot find a data directory: set HOME, XDG_DATA_HOME or {DATA_DIR_ENV}"),
    }
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow!("cannot generate a volume name: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, VolumeStore) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::at(tmp.path().join("volumes")).expect("store");
        (tmp, store)
    }

    #[test]
    fn names_follow_dockers_rule() {
        for good in ["ab", "data", "my_vol.v2-3", "0x", &"a".repeat(255)] {
            assert!(is_volume_name(good), "{good}");
        }
        for bad in [
            "",
            "a",
            ".x",
            "..",
            "-x",
            "a/b",
            "a b",
            "vé",
            &"a".repeat(256),
        ] {
            assert!(!is_volume_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_data_dir_follows_the_rules() {
        let os = |s: &str| Some(OsString::from(s));
        let root = |e, u, x, h| data_root(e, u, x, h).expect("a dir");
        assert_eq!(root(os("/x"), 0, None, None), PathBuf::from("/x"));
        assert_eq!(
            root(None, 0, os("/d"), os("/h")),
            PathBuf::from("/var/lib/katalite")
        );
        assert_eq!(
            root(None, 1000, os("/d"), os("/h")),
            PathBuf::from("/d/katalite")
        );
        assert_eq!(
            root(None, 1000, None, os("/h")),
            PathBuf::from("/h/.local/share/katalite")
        );
        assert!(data_root(None, 1000, None, None).is_err());
    }

    #[test]
    fn volumes_are_created_listed_and_removed() {
        let (_tmp, store) = store();
        let data = store.create(Some("data")).expect("create");
        assert_eq!(data.name, "data");
        assert!(data.mountpoint.ends_with("volumes/data/_data") && data.mountpoint.is_dir());
        fs::write(data.mountpoint.join("kept"), "x").expect("write");
        let again = store.create(Some("data")).expect("create twice");
        assert!(again.mountpoint.join("kept").exists(), "the same volume");
        let anonymous = store.create(None).expect("anonymous");
        assert_eq!(anonymous.name.len(), 64);
        assert!(anonymous.name.bytes().all(|b| b.is_ascii_hexdigit()));
        let names: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        let mut want = vec![anonymous.name.clone(), "data".to_string()];
        want.sort();
        assert_eq!(names, want);
        store.remove("data").expect("remove");
        assert!(!data.mountpoint.exists());
        let err = store.remove("data").expect_err("gone");
        assert_eq!(err.to_string(), "no such volume: data");
        assert_eq!(
            store.get("../x").expect_err("bad").to_string(),
            "no such volume: ../x"
        );
        let err = store.create(Some("../escape")).expect_err("bad name");
        assert!(err.to_string().starts_with("invalid volume name"), "{err}");
        // Only the anonymous volume and the lock-free layout are left: no temp dirs.
        let left: Vec<OsString> = fs::read_dir(&store.dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, [OsString::from(&anonymous.name)]);
    }

    #[test]
    fn half_made_volumes_are_not_listed() {
        let (_tmp, store) = store();
        fs::create_dir_all(store.dir.join(".tmp-1234/_data")).expect("mkdir");
        fs::create_dir_all(store.dir.join("nodata")).expect("mkdir");
        store.create(Some("real")).expect("create");
        let names: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["real"]);
    }
}
