//! Host directories in the VM: `run -v`, `--mount` and `--tmpfs` (parsed in [`parse`]),
//! named volumes ([`store`], `katalite volume ...` in [`commands`]), and the two halves
//! of a run's mounts: the VMM's virtio-fs shares and init's `RunConfig.Mounts`.
//!
//! A run resolves its mounts once, before its container entry exists ([`resolve`]): host
//! paths made absolute and canonical (a missing `-v` directory is created, as Docker
//! does), named volumes made, anonymous ones named. The entry records the result, so a
//! detached supervisor boots exactly that, and `volume rm` sees which volumes are in use.

pub mod commands;
pub mod parse;
pub mod store;

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use guest_init::{MountConfig, MountKind, TmpfsMount, VirtioFsMount};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vmm::FsShareConfig;

use store::VolumeStore;

/// Most virtio-fs shares (bind mounts and volumes) one VM gets.
pub const MAX_SHARES: usize = 8;
/// Share tags are this and the share's index.
const TAG_PREFIX: &str = "katalite-vol";

/// A mount as a front end gives it (the command line's `-v`, `--mount`, `--tmpfs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// What is mounted.
    pub source: SpecSource,
    /// The container path, cleaned (absolute, no `.`, `..` or empty components).
    pub target: String,
    /// `:ro`, `readonly`.
    pub read_only: bool,
}

/// What a [`MountSpec`] mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecSource {
    /// A host directory (relative as typed; absolute in a [`crate::spec::ContainerSpec`]);
    /// `create`: make it when missing (`-v`), else it must exist (`--mount type=bind`).
    Bind {
        /// The host path.
        path: PathBuf,
        /// Create it if missing.
        create: bool,
    },
    /// A named volume, or an anonymous one (`None`).
    Volume(Option<String>),
    /// A tmpfs.
    Tmpfs(TmpfsMount),
}

/// A mount as the container's entry records it: host paths canonical, volumes named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedMount {
    /// What is mounted.
    pub source: ResolvedSource,
    /// The container path.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
}

/// What a [`ResolvedMount`] mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ResolvedSource {
    /// A host directory, canonical.
    Bind {
        /// The directory.
        path: PathBuf,
    },
    /// A named volume.
    Volume {
        /// Its name.
        name: String,
        /// Its `_data` directory.
        path: PathBuf,
        /// Made for this container (`-v /dst`), removed with it by `--rm`.
        anonymous: bool,
    },
    /// A tmpfs.
    Tmpfs {
        /// Size limit in bytes.
        size_bytes: Option<u64>,
        /// Mode of its root.
        mode: Option<u32>,
        /// Executable files allowed.
        exec: bool,
    },
}

impl ResolvedSource {
    /// The host directory shared with the VM, if this is a share.
    fn host_dir(&self) -> Option<&Path> {
        match self {
            Self::Bind { path } | Self::Volume { path, .. } => Some(path),
            Self::Tmpfs { .. } => None,
        }
    }
}

/// A run's resolved mounts, holding the volume store's lock (when volumes are used) until
/// dropped: keep it until the container's entry records the mounts.
#[derive(Debug, Default)]
pub struct Resolved {
    /// The mounts.
    pub mounts: Vec<ResolvedMount>,
    /// The volume store's lock, when a volume is used.
    pub lock: Option<File>,
}

/// Checks and resolves a container's mounts (see the module's doc) in the user's volume
/// store; on failure nothing made for the run is left but missing `-v` host directories
/// (Docker leaves those too).
pub fn resolve(specs: &[MountSpec]) -> Result<Resolved> {
    let specs: Vec<&MountSpec> = specs.iter().collect();
    resolve_in(&specs, VolumeStore::open)
}

/// [`resolve`] with the store `open_store` opens, when a volume is used.
fn resolve_in(
    specs: &[&MountSpec],
    open_store: impl Fn() -> Result<VolumeStore>,
) -> Result<Resolved> {
    check(specs)?;
    let mut store = None;
    let mut resolved = Resolved::default();
    for spec in specs {
        let source = match &spec.source {
            SpecSource::Volume(name) => {
                volume_source(name.as_deref(), &mut store, &mut resolved.lock, &open_store)
            }
            other => resolve_source(other),
        };
        match source {
            Ok(source) => resolved.mounts.push(ResolvedMount {
                source,
                target: spec.target.clone(),
                read_only: spec.read_only,
            }),
            Err(err) => {
                if let Some(store) = &store {
                    remove_anonymous_in(store, &resolved.mounts);
                }
                return Err(err);
            }
        }
    }
    Ok(resolved)
}

/// The volume `name` (anonymous if `None`), made if missing; the store is opened and
/// locked at the first volume.
fn volume_source(
    name: Option<&str>,
    store: &mut Option<VolumeStore>,
    lock: &mut Option<File>,
    open_store: &impl Fn() -> Result<VolumeStore>,
) -> Result<ResolvedSource> {
    let store = match store {
        Some(store) => store,
        None => {
            let opened = open_store()?;
            *lock = Some(opened.lock()?);
            store.insert(opened)
        }
    };
    let volume = store.create(name)?;
    Ok(ResolvedSource::Volume {
        name: volume.name,
        path: volume.mountpoint,
        anonymous: name.is_none(),
    })
}

/// A bind mount's or a tmpfs's resolved source.
fn resolve_source(source: &SpecSource) -> Result<ResolvedSource> {
    Ok(match source {
        SpecSource::Bind { path, create } => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                std::env::current_dir()
                    .context("cannot find the current directory")?
                    .join(path)
            };
            ResolvedSource::Bind {
                path: host_dir(&path, *create)?,
            }
        }
        SpecSource::Tmpfs(tmpfs) => ResolvedSource::Tmpfs {
            size_bytes: tmpfs.size_bytes,
            mode: tmpfs.mode,
            exec: tmpfs.exec,
        },
        SpecSource::Volume(_) => bail!("a volume is not a bind mount"),
    })
}

/// What can be refused before touching the host: duplicate targets, too many shares.
fn check(specs: &[&MountSpec]) -> Result<()> {
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|other| other.target == spec.target) {
            bail!("Duplicate mount point: {}", spec.target);
        }
    }
    let shares = specs
        .iter()
        .filter(|s| !matches!(s.source, SpecSource::Tmpfs(_)))
        .count();
    if shares > MAX_SHARES {
        bail!("too many volumes and bind mounts: {shares} (at most {MAX_SHARES} per container)");
    }
    Ok(())
}

/// The canonical form of the host directory `path`; created first when missing and
/// `create` (`-v`), refused when missing otherwise (`--mount type=bind`, as Docker).
fn host_dir(path: &Path, create: bool) -> Result<PathBuf> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) if meta.is_file() => {
            bail!("bind-mounting a file is not supported yet: {shown} (share its directory)")
        }
        Ok(_) => bail!("cannot bind-mount {shown}: not a directory"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && create => {
            std::fs::create_dir_all(path).with_context(|| format!("cannot create {shown}"))?;
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "invalid mount config for type \"bind\": bind source path does not exist: {shown}"
            )
        }
        Err(err) => return Err(err).with_context(|| format!("cannot use {shown}")),
    }
    path.canonicalize()
        .with_context(|| format!("cannot resolve {shown}"))
}

/// The VMM's shares and init's mounts for `mounts`: shares tagged `katalite-vol0`, `...1`
/// in order.
pub fn plan(mounts: &[ResolvedMount]) -> Result<(Vec<FsShareConfig>, Vec<MountConfig>)> {
    let mut shares = Vec::new();
    let mut guest = Vec::new();
    for mount in mounts {
        let kind = match (&mount.source, mount.source.host_dir()) {
            (_, Some(dir)) => {
                let tag = format!("{TAG_PREFIX}{}", shares.len());
                shares.push(FsShareConfig {
                    tag: tag.clone(),
                    root: dir.to_path_buf(),
                    read_only: mount.read_only,
                });
                MountKind::VirtioFs(VirtioFsMount { tag })
            }
            (
                ResolvedSource::Tmpfs {
                    size_bytes,
                    mode,
                    exec,
                },
                None,
            ) => MountKind::Tmpfs(TmpfsMount {
                size_bytes: *size_bytes,
                mode: *mode,
                exec: *exec,
            }),
            (_, None) => bail!("mount on {} has no source", mount.target),
        };
        let config = MountConfig {
            target: mount.target.clone(),
            read_only: mount.read_only,
            kind,
        };
        config
            .validate()
            .with_context(|| format!("cannot mount on {}", mount.target))?;
        guest.push(config);
    }
    if shares.len() > MAX_SHARES {
        bail!(
            "too many volumes and bind mounts: {} (at most {MAX_SHARES})",
            shares.len()
        );
    }
    Ok((shares, guest))
}

/// Removes the anonymous volumes among `mounts` (a `--rm` container's, or those of a run
/// that never started); failures are reported, not fatal.
pub fn remove_anonymous(mounts: &[ResolvedMount]) {
    if anonymous(mounts).next().is_none() {
        return;
    }
    match VolumeStore::open() {
        Ok(store) => remove_anonymous_in(&store, mounts),
        Err(err) => eprintln!("katalite: cannot remove the anonymous volumes: {err:#}"),
    }
}

fn remove_anonymous_in(store: &VolumeStore, mounts: &[ResolvedMount]) {
    for name in anonymous(mounts) {
        // Gone already is fine: a `run -d` supervisor that failed removes them before its
        // launcher does.
        if store.get(name).is_err() {
            continue;
        }
        if let Err(err) = store.remove(name) {
            eprintln!("katalite: cannot remove the anonymous volume {name}: {err:#}");
        }
    }
}

/// The names of the anonymous volumes among `mounts`.
fn anonymous(mounts: &[ResolvedMount]) -> impl Iterator<Item = &str> {
    mounts.iter().filter_map(|m| match &m.source {
        ResolvedSource::Volume {
            name,
            anonymous: true,
            ..
        } => Some(name.as_str()),
        _ => None,
    })
}

/// Whether `mounts` use the volume `name`.
pub fn uses_volume(mounts: &[ResolvedMount], name: &str) -> bool {
    mounts
        .iter()
        .any(|m| matches!(&m.source, ResolvedSource::Volume { name: n, .. } if n == name))
}

/// Docker's inspect `Mounts` array.
pub fn inspect(mounts: &[ResolvedMount]) -> Value {
    let entries: Vec<Value> = mounts
        .iter()
        .map(|m| {
            let (kind, name, source) = match &m.source {
                ResolvedSource::Bind { path } => ("bind", None, path.display().to_string()),
                ResolvedSource::Volume { name, path, .. } => {
                    ("volume", Some(name.as_str()), path.display().to_string())
                }
                ResolvedSource::Tmpfs { .. } => ("tmpfs", None, String::new()),
            };
            let mut entry = json!({
                "Type": kind,
                "Source": source,
                "Destination": m.target,
                "Mode": if m.read_only { "ro" } else { "" },
                "RW": !m.read_only,
                "Propagation": "",
            });
            if let Some(name) = name {
                entry["Name"] = json!(name);
                entry["Driver"] = json!("local");
            }
            entry
        })
        .collect();
    Value::Array(entries)
}

#[cfg(test)]
mod tests;
