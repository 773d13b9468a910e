//! The runc-style state of one container under the caller's `--root`: `ROOT/ID/` holds
//! `state.json` (who its init is, where its bundle is, its hooks), `spec.json` (the
//! container the init boots) and, until `start`, the `exec.fifo` the init waits on.
//!
//! The status is derived, as runc derives it: no live init is `stopped`, a live init
//! still waiting on its FIFO is `created`, otherwise `running`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::bundle::Hook;
use crate::lifecycle::state::{write_atomically, Supervisor};
use crate::lifecycle::time::Timestamp;

/// The runtime-spec version katalite reports.
pub const OCI_VERSION: &str = "1.1.0";
/// Where containers live without `--root` (runc's is /run/runc).
pub const DEFAULT_ROOT: &str = "/run/katalite-runc";
const STATE_FILE: &str = "state.json";
const SPEC_FILE: &str = "spec.json";
const EXEC_FIFO: &str = "exec.fifo";

/// What `state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuncState {
    /// The engine's container id.
    pub id: String,
    /// The bundle directory (absolute).
    pub bundle: PathBuf,
    /// The root filesystem (absolute).
    pub rootfs: PathBuf,
    /// When `create` made it.
    pub created: Timestamp,
    /// The process whose pid the engine was given; `None` until it is spawned.
    pub init: Option<Supervisor>,
    /// `start` has let the init boot.
    pub started: bool,
    /// The bundle's annotations.
    pub annotations: BTreeMap<String, String>,
    /// Hooks run after `start`.
    pub poststart: Vec<Hook>,
    /// Hooks run by `delete`.
    pub poststop: Vec<Hook>,
}

/// runc's three states (`paused` is never reported: katalite cannot pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Made; the workload waits for `start`.
    Created,
    /// Started and not ended.
    Running,
    /// Ended (or never spawned).
    Stopped,
}

impl Status {
    /// runc's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

/// The `state` output and the hooks' stdin: runtime-spec's state, with runc's extras.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateReport<'a> {
    oci_version: &'static str,
    id: &'a str,
    pid: i32,
    status: &'static str,
    bundle: &'a Path,
    rootfs: &'a Path,
    created: String,
    owner: &'static str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// One container's directory under the root.
pub struct Entry {
    dir: PathBuf,
    /// Its recorded state.
    pub state: RuncState,
}

/// Refuses ids that could leave the root directory (runc's rule: `[\w+.-]+`).
pub fn check_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+.-".contains(&b));
    if !valid {
        bail!("invalid container id format: {id:?}");
    }
    Ok(())
}

/// Makes `ROOT/ID` for a new container; fails if the id is taken.
pub fn create_dir(root: &Path, id: &str) -> Result<PathBuf> {
    check_id(id)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .with_context(|| format!("cannot create {}", root.display()))?;
    let dir = root.join(id);
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            bail!("container with id exists: {id}")
        }
        Err(err) => Err(err).with_context(|| format!("cannot create {}", dir.display())),
    }
}

impl Entry {
    /// Opens `ROOT/ID`.
    pub fn load(root: &Path, id: &str) -> Result<Self> {
        check_id(id)?;
        let dir = root.join(id);
        let bytes = match fs::read(dir.join(STATE_FILE)) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                bail!("container does not exist: {id}")
            }
            Err(err) => return Err(err).with_context(|| format!("cannot read state of {id}")),
        };
        let state = serde_json::from_slice(&bytes)
            .with_context(|| format!("invalid state of container {id}"))?;
        Ok(Self { dir, state })
    }

    /// A new entry in `dir` (from [`create_dir`]).
    pub fn new(dir: PathBuf, state: RuncState) -> Self {
        Self { dir, state }
    }

    /// Writes `state.json`.
    pub fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec(&self.state)?;
        write_atomically(&self.dir.join(STATE_FILE), &bytes)
            .with_context(|| format!("cannot write state of {}", self.state.id))
    }

    /// `spec.json`, the container the init boots.
    pub fn spec_path(&self) -> PathBuf {
        self.dir.join(SPEC_FILE)
    }

    /// The FIFO the init waits on until `start`.
    pub fn exec_fifo(&self) -> PathBuf {
        self.dir.join(EXEC_FIFO)
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The init's pid while it lives, else 0 (as runc reports a stopped container).
    pub fn live_pid(&self) -> i32 {
        match &self.state.init {
            Some(init) if init.alive() => init.pid,
            _ => 0,
        }
    }

    /// The status, as runc derives it.
    pub fn status(&self) -> Status {
        if self.live_pid() == 0 {
            Status::Stopped
        } else if self.state.started {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// What `state` prints and hooks read.
    pub fn report(&self) -> StateReport<'_> {
        StateReport {
            oci_version: OCI_VERSION,
            id: &self.state.id,
            pid: self.live_pid(),
            status: self.status().as_str(),
            bundle: &self.state.bundle,
            rootfs: &self.state.rootfs,
            created: self.state.created.to_rfc3339(),
            owner: "",
            annotations: &self.state.annotations,
        }
    }

    /// Removes the directory.
    pub fn remove(self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("cannot remove {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str) -> RuncState {
        RuncState {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: Timestamp::now(),
            init: None,
            started: false,
            annotations: BTreeMap::new(),
            poststart: Vec::new(),
            poststop: Vec::new(),
        }
    }

    #[test]
    fn ids_cannot_leave_the_root() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\0b"] {
            assert!(check_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["c1", "0123abcdef", "my_ctr.v2+x-1"] {
            check_id(good).expect(good);
        }
    }

    #[test]
    fn an_id_is_taken_once_and_its_state_reads_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = create_dir(root.path(), "c1").expect("create");
        let error = create_dir(root.path(), "c1").expect_err("taken");
        assert_eq!(error.to_string(), "container with id exists: c1");
        Entry::new(dir, state("c1")).save().expect("save");
        let entry = Entry::load(root.path(), "c1").expect("load");
        assert_eq!(entry.state.bundle, Path::new("/b"));
        let error = Entry::load(root.path(), "c2").err().expect("absent");
        assert_eq!(error.to_string(), "container does not exist: c2");
    }

    #[test]
    fn status_follows_the_init() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut entry = Entry::new(root.path().join("c"), state("c"));
        assert_eq!(entry.status(), Status::Stopped);
        entry.state.init = Some(Supervisor::current().expect("self"));
        assert_eq!(entry.status(), Status::Created);
        entry.state.started = true;
        assert_eq!(entry.status(), Status::Running);
        let report = serde_json::to_value(entry.report()).expect("json");
        assert_eq!(report["status"], "running");
        assert_eq!(report["pid"], i64::from(std::process::id()));
        assert_eq!(report["ociVersion"], OCI_VERSION);
        assert!(report.get("annotations").is_none());
    }
}
