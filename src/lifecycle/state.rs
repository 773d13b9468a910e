//! Container state under the runtime dir: one `containers/<id>/state.json` per container,
//! written atomically (temp file, fsync, rename), found by id, name or unique id prefix.
//! Beside it `spec.json`, the [`ContainerSpec`] the container was made from: written once,
//! before `state.json` (so an entry that lists has its spec), the same atomic way; the
//! supervisor boots from it and `inspect` shows it.
//! Readers check the supervisor's pid *and* its start time, so an entry whose supervisor
//! died (or whose pid was reused) reads as exited, never as a ghost "running".

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::time::Timestamp;
use crate::spec::ContainerSpec;
use crate::volumes::ResolvedMount;

/// Overrides the runtime dir (tests give each run its own).
pub const RUNTIME_DIR_ENV: &str = "KATALITE_RUNTIME_DIR";
/// The runtime dir of root.
const SYSTEM_RUNTIME_DIR: &str = "/run/katalite";
/// Docker's status for a container whose VM was killed (128 + SIGKILL): what happens to the
/// VM when its supervisor dies, since the VM lives in that process.
pub const EXIT_KILLED: i32 = 137;

const STATE_FILE: &str = "state.json";
const SPEC_FILE: &str = "spec.json";
const LOG_FILE: &str = "container.log";
const CONTROL_SOCKET: &str = "control.sock";
const NAMES_LOCK: &str = "names.lock";
/// Hex digits of a full id (32 random bytes) and of the short form `ps` shows.
pub const ID_LEN: usize = 64;
pub const SHORT_ID_LEN: usize = 12;

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The entry exists; the VM has not started yet.
    Created,
    /// Its supervisor runs the VM.
    Running,
    /// The VM ended (see the exit code).
    Exited,
}

impl Status {
    /// Docker's lowercase word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Exited => "exited",
        }
    }
}

/// The katalite process that runs a container's VM, identified beyond its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Supervisor {
    /// Its process id.
    pub pid: i32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22): a reused
    /// pid has another.
    pub start_time: u64,
}

impl Supervisor {
    /// This process.
    pub fn current() -> Result<Self> {
        let pid = i32::try_from(std::process::id()).context("pid out of range")?;
        let start_time = start_time(pid).context("cannot read this process's start time")?;
        Ok(Self { pid, start_time })
    }

    /// The process `pid` as it is now, `None` if there is none.
    pub fn of(pid: i32) -> Option<Self> {
        start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// The start time of `pid`, or `None` if there is no such process.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of `/proc/<pid>/stat` (proc(5)), or `None` for a zombie (field 3 `Z` or `X`:
/// a supervisor killed while its parent does not reap it is dead all the same). The
/// command name (field 2) may hold spaces and parentheses: fields count after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X") | None) {
        return None;
    }
    fields.nth(22 - 4).and_then(|f| f.parse().ok())
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// 64 lowercase hex digits.
    pub id: String,
    /// `--name`, or empty.
    pub name: String,
    /// The image reference, or the `--rootfs` directory.
    pub image: String,
    /// The workload's argv: the command line's until the VM starts, then the one resolved
    /// against the image (entrypoint and command).
    pub command: Vec<String>,
    /// When the entry was made.
    pub created: Timestamp,
    /// As stored (see [`Container::load`] for the dead-supervisor correction).
    pub status: Status,
    /// Set once exited.
    pub exit_code: Option<i32>,
    /// When the VM started.
    pub started: Option<Timestamp>,
    /// When it ended.
    pub finished: Option<Timestamp>,
    /// Who runs the VM, once it runs.
    pub supervisor: Option<Supervisor>,
    /// Published ports as given (`8080:80/tcp`).
    pub ports: Vec<String>,
    /// The workload's output, Docker's json-file format.
    pub log_path: PathBuf,
    /// `--rm`: the entry goes when the container ends.
    pub auto_remove: bool,
    /// Its volumes, bind mounts and tmpfs mounts, resolved once by `run`.
    #[serde(default)]
    pub mounts: Vec<ResolvedMount>,
    /// Set when reading, never stored: the entry said running but its supervisor is gone,
    /// so the exit code is a guess.
    #[serde(skip)]
    pub lost: bool,
}

/// The fields of a new entry that the caller chooses.
#[derive(Debug, Clone, Default)]
pub struct NewContainer {
    /// `--name`, or empty.
    pub name: String,
    /// Image reference or rootfs directory.
    pub image: String,
    /// The command-line command.
    pub command: Vec<String>,
    /// Published ports as given.
    pub ports: Vec<String>,
    /// What the container is made from (its `spec.json`).
    pub spec: ContainerSpec,
    /// `--rm`.
    pub auto_remove: bool,
    /// The resolved mounts.
    pub mounts: Vec<ResolvedMount>,
}

/// The per-user directory holding every container's entry.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
}

impl Runtime {
    /// The runtime dir for this user, created 0700 if missing; refuses one owned by
    /// someone else (another user could otherwise plant entries or sockets).
    pub fn open() -> Result<Self> {
        let euid = rustix::process::geteuid().as_raw();
        let root = runtime_root(
            std::env::var_os(RUNTIME_DIR_ENV),
            euid,
            std::env::var_os("XDG_RUNTIME_DIR"),
        );
        Self::at(root, euid)
    }

    /// The runtime dir `root`, which must belong to `euid`.
    pub fn at(root: PathBuf, euid: u32) -> Result<Self> {
        private_dir(&root, euid)?;
        private_dir(&root.join("containers"), euid)?;
        Ok(Self { root })
    }

    fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// Every container, oldest first. Entries still being made or removed are skipped.
    pub fn list(&self) -> Result<Vec<Container>> {
        let dir = self.containers();
        let entries =
            fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        let mut all = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let name = entry.file_name();
            if !is_full_id(&name.to_string_lossy()) {
                continue;
            }
            if let Ok(container) = Container::load(entry.path()) {
                all.push(container);
            }
        }
        all.sort_by_key(|c| c.state.created);
        Ok(all)
    }

    /// The container `key` names: a full id, a name, or a unique id prefix (Docker's order).
    pub fn find(&self, key: &str) -> Result<Container> {
        let mut all = self.list()?;
        let index = pick(&all, key)?;
        Ok(all.swap_remove(index))
    }

    /// Makes a new entry (status created) with a fresh random id. The name is checked and
    /// the entry written under `names.lock`, so two runs cannot both take one name.
    pub fn create(&self, new: NewContainer) -> Result<Container> {
        let lock_path = self.root.join(NAMES_LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("cannot lock {}", lock_path.display()))?;
        if !new.name.is_empty() {
            if let Some(holder) = self.list()?.iter().find(|c| c.state.name == new.name) {
                bail!(
                    "the container name \"{}\" is already in use by {}",
                    new.name,
                    holder.short_id()
                );
            }
        }
        let spec = serde_json::to_vec_pretty(&new.spec)?;
        let id = random_id()?;
        let dir = self.containers().join(&id);
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let container = Container {
            state: State {
                id,
                name: new.name,
                image: new.image,
                command: new.command,
                created: Timestamp::now(),
                status: Status::Created,
                exit_code: None,
                started: None,
                finished: None,
                supervisor: None,
                ports: new.ports,
                log_path: dir.join(LOG_FILE),
                auto_remove: new.auto_remove,
                mounts: new.mounts,
                lost: false,
            },
            dir,
        };
        let spec_path = container.dir.join(SPEC_FILE);
        let written = write_atomically(&spec_path, &spec)
            .with_context(|| format!("cannot write {}", spec_path.display()))
            .and_then(|()| container.save());
        if let Err(err) = written {
            let _ = fs::remove_dir_all(&container.dir);
            return Err(err);
        }
        Ok(container)
    }
}

/// `$KATALITE_RUNTIME_DIR`; else `/run/katalite` for root; else `$XDG_RUNTIME_DIR/katalite`;
/// else `/tmp/katalite-<uid>`.
fn runtime_root(explicit: Option<OsString>, euid: u32, xdg: Option<OsString>) -> PathBuf {
    match (explicit, xdg) {
        (Some(dir), _) if !dir.is_empty() => PathBuf::from(dir),
        _ if euid == 0 => PathBuf::from(SYSTEM_RUNTIME_DIR),
        (_, Some(xdg)) if !xdg.is_empty() => PathBuf::from(xdg).join("katalite"),
        _ => PathBuf::from(format!("/tmp/katalite-{euid}")),
    }
}

/// Creates `dir` 0700 if missing; an existing one must be a real directory owned by
/// `euid`, and is made 0700.
fn private_dir(dir: &Path, euid: u32) -> Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err).with_context(|| format!("cannot create {}", dir.display())),
    }
    let meta =
        fs::symlink_metadata(dir).with_context(|| format!("cannot stat {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("the runtime dir {} is not a directory", dir.display());
    }
    if meta.uid() != euid {
        bail!(
            "the runtime dir {} belongs to uid {}, not to this user ({euid})",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }
    Ok(())
}

/// 32 random bytes in lowercase hex, as Docker's ids.
fn random_id() -> Result<String> {
    let mut bytes = [0u8; ID_LEN / 2];
    getrandom::fill(&mut bytes).map_err(|e| anyhow!("cannot generate a container id: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn is_full_id(text: &str) -> bool {
    text.len() == ID_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The index of the container `key` names among `all`: full id, then name, then a unique
/// id prefix.
fn pick(all: &[Container], key: &str) -> Result<usize> {
    if key.is_empty() {
        bail!("no container named: an empty name");
    }
    if let Some(i) = all.iter().position(|c| c.state.id == key) {
        return Ok(i);
    }
    if let Some(i) = all.iter().position(|c| c.state.name == key) {
        return Ok(i);
    }
    let mut matches = all
        .iter()
        .enumerate()
        .filter(|(_, c)| c.state.id.starts_with(key));
    match (matches.next(), matches.next()) {
        (Some((i, _)), None) => Ok(i),
        (Some(_), Some(_)) => bail!("multiple containers match the id prefix \"{key}\""),
        _ => bail!("no such container: {key}"),
    }
}

/// One container's entry on disk.
#[derive(Debug, Clone)]
pub struct Container {
    dir: PathBuf,
    /// Its state as read (corrected when the supervisor is gone).
    pub state: State,
}

impl Container {
    /// Reads `dir/state.json`. A running entry whose supervisor is gone reads as exited
    /// with [`EXIT_KILLED`] and [`State::lost`] set.
    pub fn load(dir: PathBuf) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut state: State = serde_json::from_slice(&text)
            .with_context(|| format!("invalid container state {}", path.display()))?;
        if state.status == Status::Running
            && !state.supervisor.as_ref().is_some_and(Supervisor::alive)
        {
            state.status = Status::Exited;
            state.exit_code.get_or_insert(EXIT_KILLED);
            state.lost = true;
        }
        Ok(Self { dir, state })
    }

    /// The same entry read again.
    pub fn reload(&self) -> Result<Self> {
        Self::load(self.dir.clone())
    }

    /// The container's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first 12 hex digits of the id.
    pub fn short_id(&self) -> &str {
        &self.state.id[..SHORT_ID_LEN.min(self.state.id.len())]
    }

    /// The name, else the short id: how messages refer to it.
    pub fn display_name(&self) -> &str {
        if self.state.name.is_empty() {
            self.short_id()
        } else {
            &self.state.name
        }
    }

    /// The supervisor's control socket.
    pub fn control_path(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }

    /// Whether the VM runs now.
    pub fn is_running(&self) -> bool {
        self.state.status == Status::Running
    }

    /// The spec the container was made from.
    pub fn spec(&self) -> Result<ContainerSpec> {
        let path = self.dir.join(SPEC_FILE);
        let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("invalid container spec {}", path.display()))
    }

    /// Writes the state atomically: a reader sees the old file or the new one, never a
    /// torn one, even across a crash (the data is synced before the rename).
    pub fn save(&self) -> Result<()> {
        let path = self.dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&self.state)?;
        write_atomically(&path, &json).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Records that this process runs the VM from now on.
    pub fn mark_running(&mut self) -> Result<()> {
        self.state.supervisor = Some(Supervisor::current()?);
        self.state.status = Status::Running;
        self.state.started = Some(Timestamp::now());
        self.save()
    }

    /// Records how the VM ended.
    pub fn mark_exited(&mut self, code: i32) -> Result<()> {
        self.state.status = Status::Exited;
        self.state.exit_code = Some(code);
        self.state.finished = Some(Timestamp::now());
        self.save()
    }

    /// Deletes the entry with its logs.
    pub fn remove(&self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("cannot remove {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path`
/// and syncs the directory, so the rename itself survives a crash.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}-{serial}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> (tempfile::TempDir, Runtime) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let euid = rustix::process::geteuid().as_raw();
        let runtime = Runtime::at(tmp.path().join("rt"), euid).expect("runtime");
        (tmp, runtime)
    }

    fn named(name: &str) -> NewContainer {
        NewContainer {
            name: name.into(),
            image: "busybox".into(),
            ..NewContainer::default()
        }
    }

    #[test]
    fn the_runtime_dir_follows_the_rules() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            runtime_root(os("/x"), 0, os("/run/user/1")),
            PathBuf::from("/x")
        );
        assert_eq!(
            runtime_root(None, 0, os("/run/user/0")),
            PathBuf::from("/run/katalite")
        );
        assert_eq!(
            runtime_root(None, 1000, os("/run/user/1000")),
            PathBuf::from("/run/user/1000/katalite")
        );
        assert_eq!(
            runtime_root(os(""), 1000, None),
            PathBuf::from("/tmp/katalite-1000")
        );
    }

    #[test]
    fn the_runtime_dir_is_private_and_must_be_ours() {
        let (tmp, runtime) = runtime();
        let mode = fs::metadata(&runtime.root).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o700);
        let euid = rustix::process::geteuid().as_raw();
        let err = Runtime::at(tmp.path().join("rt"), euid + 1).expect_err("foreign owner");
        assert!(format!("{err:#}").contains("belongs to uid"), "{err:#}");
        fs::write(tmp.path().join("file"), "").expect("write");
        assert!(Runtime::at(tmp.path().join("file"), euid).is_err());
    }

    #[test]
    fn entries_are_found_by_id_name_and_unique_prefix() {
        let (_tmp, runtime) = runtime();
        let web = runtime.create(named("web")).expect("create");
        let other = runtime.create(named("")).expect("create");
        assert!(is_full_id(&web.state.id) && web.state.id != other.state.id);
        assert_eq!(web.state.status, Status::Created);
        let found = |key: &str| runtime.find(key).map(|c| c.state.id);
        assert_eq!(found(&web.state.id).expect("id"), web.state.id);
        assert_eq!(found("web").expect("name"), web.state.id);
        assert_eq!(found(web.short_id()).expect("prefix"), web.state.id);
        assert_eq!(found(&other.state.id[..5]).expect("prefix"), other.state.id);
        let err = found("zz").expect_err("unknown");
        assert_eq!(err.to_string(), "no such container: zz");
        assert!(found("").is_err());
    }

    #[test]
    fn an_ambiguous_prefix_is_an_error() {
        let (_tmp, runtime) = runtime();
        // 17 entries: two must share a first hex digit.
        let all: Vec<Container> = (0..17)
            .map(|_| runtime.create(named("")).expect("create"))
            .collect();
        let digit = all
            .iter()
            .map(|c| &c.state.id[..1])
            .find(|d| all.iter().filter(|c| c.state.id.starts_with(*d)).count() > 1)
            .expect("pigeonhole");
        let err = runtime.find(digit).expect_err("ambiguous");
        assert!(err.to_string().contains("multiple containers"), "{err}");
    }

    #[test]
    fn a_name_is_taken_once_until_removed() {
        let (_tmp, runtime) = runtime();
        let first = runtime.create(named("web")).expect("create");
        let err = runtime.create(named("web")).expect_err("taken");
        assert_eq!(
            err.to_string(),
            format!(
                "the container name \"web\" is already in use by {}",
                first.short_id()
            )
        );
        assert_eq!(runtime.list().expect("list").len(), 1, "no state left");
        first.remove().expect("remove");
        runtime.create(named("web")).expect("free again");
    }

    #[test]
    fn concurrent_creates_of_one_name_yield_one_entry() {
        let (_tmp, runtime) = runtime();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let runtime = runtime.clone();
                std::thread::spawn(move || runtime.create(named("same")).is_ok())
            })
            .collect();
        let created = threads
            .into_iter()
            .map(|t| t.join().expect("join"))
            .filter(|ok| *ok)
            .count();
        assert_eq!(created, 1);
        assert_eq!(runtime.list().expect("list").len(), 1);
    }

    #[test]
    fn state_survives_a_round_trip_and_saves_leave_no_temp_files() {
        let (_tmp, runtime) = runtime();
        let mut container = runtime.create(named("web")).expect("create");
        container.mark_running().expect("running");
        let read = container.reload().expect("reload");
        assert_eq!(read.state.status, Status::Running, "this process is alive");
        assert!(!read.state.lost);
        container.mark_exited(3).expect("exited");
        let read = container.reload().expect("reload");
        assert_eq!(
            (read.state.status, read.state.exit_code),
            (Status::Exited, Some(3))
        );
        assert!(read.state.finished.is_some() && read.state.started.is_some());
        let mut names: Vec<_> = fs::read_dir(container.dir())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [OsString::from(SPEC_FILE), OsString::from(STATE_FILE)]
        );
        assert_eq!(
            container.spec().expect("spec"),
            named("web").spec,
            "the spec is written once, beside the state"
        );
    }

    #[test]
    fn mounts_are_recorded_and_old_entries_have_none() {
        use crate::volumes::ResolvedSource;
        let (_tmp, runtime) = runtime();
        let mounts = vec![
            ResolvedMount {
                source: ResolvedSource::Volume {
                    name: "data".into(),
                    path: PathBuf::from("/v/data/_data"),
                    anonymous: true,
                },
                target: "/data".into(),
                read_only: true,
            },
            ResolvedMount {
                source: ResolvedSource::Tmpfs {
                    size_bytes: None,
                    mode: Some(0o1777),
                    exec: false,
                },
                target: "/run".into(),
                read_only: false,
            },
        ];
        let container = runtime
            .create(NewContainer {
                mounts: mounts.clone(),
                ..named("")
            })
            .expect("create");
        assert_eq!(container.reload().expect("reload").state.mounts, mounts);
        let path = container.dir().join(STATE_FILE);
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
        json.as_object_mut().expect("object").remove("mounts");
        fs::write(&path, json.to_string()).expect("write");
        assert!(container.reload().expect("reload").state.mounts.is_empty());
    }

    #[test]
    fn a_running_entry_with_a_dead_or_reused_pid_reads_as_exited() {
        let (_tmp, runtime) = runtime();
        let mut container = runtime.create(named("")).expect("create");
        container.mark_running().expect("running");
        let me = container.state.supervisor.clone().expect("supervisor");
        // Same pid, another start time: the pid was reused.
        container.state.supervisor = Some(Supervisor {
            start_time: me.start_time + 1,
            ..me
        });
        container.save().expect("save");
        let read = container.reload().expect("reload");
        assert_eq!(read.state.status, Status::Exited);
        assert_eq!(read.state.exit_code, Some(EXIT_KILLED));
        assert!(read.state.lost);
        // A pid that cannot exist (above pid_max's ceiling of 2^22).
        container.state.supervisor = Some(Supervisor {
            pid: 1 << 23,
            start_time: 1,
        });
        container.save().expect("save");
        assert!(container.reload().expect("reload").state.lost);
    }

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "42 (a) b (c) R 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time(&stat.replace(") R ", ") Z ")), None);
        assert_eq!(parse_start_time("garbage"), None);
        assert!(Supervisor::current().expect("me").alive());
    }

    #[test]
    fn torn_entries_are_skipped_not_fatal() {
        let (_tmp, runtime) = runtime();
        let container = runtime.create(named("ok")).expect("create");
        let half = runtime.containers().join("a".repeat(ID_LEN));
        fs::create_dir(&half).expect("mkdir");
        let listed = runtime.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state.id, container.state.id);
    }
}
