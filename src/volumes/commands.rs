//! `katalite volume create|ls|inspect|rm|prune`, Docker's volume commands for the local
//! driver. Like Docker's CLI, `inspect` and `rm` go on past a volume they cannot handle
//! and then exit 1.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::store::{Volume, VolumeStore};
use super::uses_volume;
use crate::lifecycle::state::{Container, Runtime};

/// Docker's CLI status for a failed command.
const EXIT_FAILED: u8 = 1;

/// `katalite volume COMMAND`.
#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: VolumeCommand,
}

/// The volume commands.
#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume (a random name when none is given) and print its name.
    Create {
        /// The name: [a-zA-Z0-9][a-zA-Z0-9_.-]+.
        name: Option<String>,
    },
    /// List volumes.
    #[command(alias = "list")]
    Ls {
        /// Only the names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show volumes as JSON.
    Inspect {
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes no container uses.
    #[command(alias = "remove")]
    Rm {
        /// Do not fail for a volume that does not exist.
        #[arg(short, long)]
        force: bool,
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove the anonymous volumes no container uses (`--all`: every unused volume).
    Prune {
        /// Remove unused named volumes too.
        #[arg(short, long)]
        all: bool,
        /// Do not ask for confirmation (katalite never asks).
        #[arg(short, long)]
        force: bool,
    },
}

/// Runs a volume command.
pub fn volume(args: &VolumeArgs) -> Result<u8> {
    let store = VolumeStore::open()?;
    match &args.command {
        VolumeCommand::Create { name } => {
            println!("{}", store.create(name.as_deref())?.name);
            Ok(0)
        }
        VolumeCommand::Ls { quiet } => {
            print!("{}", ls(&store.list()?, *quiet));
            Ok(0)
        }
        VolumeCommand::Inspect { names } => {
            let mut found = Vec::new();
            let status = for_each(names, |name| {
                found.push(inspect(&store.get(name)?));
                Ok(())
            });
            println!("{}", serde_json::to_string_pretty(&Value::Array(found))?);
            Ok(status)
        }
        VolumeCommand::Rm { force, names } => {
            // Held from reading the containers to the removals: a run that makes or uses a
            // volume holds it until its container is recorded.
            let _lock = store.lock()?;
            let containers = Runtime::open()?.list()?;
            Ok(for_each(names, |name| {
                rm(&store, &containers, name, *force)?;
                println!("{name}");
                Ok(())
            }))
        }
        VolumeCommand::Prune { all, force: _ } => {
            let _lock = store.lock()?;
            let containers = Runtime::open()?.list()?;
            let removed = prune(&store, &containers, *all)?;
            if !removed.is_empty() {
                println!("Deleted Volumes:");
                for name in &removed {
                    println!("{name}");
                }
            }
            Ok(0)
        }
    }
}

/// Runs `each` for every name, reporting failures on stderr; 1 if any failed.
fn for_each(names: &[String], mut each: impl FnMut(&str) -> Result<()>) -> u8 {
    let mut status = 0;
    for name in names {
        if let Err(err) = each(name) {
            eprintln!("katalite: {err:#}");
            status = EXIT_FAILED;
        }
    }
    status
}

/// Docker's `volume ls` table, or one name a line with `-q`.
fn ls(volumes: &[Volume], quiet: bool) -> String {
    let mut out = String::new();
    if !quiet {
        out.push_str("DRIVER    VOLUME NAME\n");
    }
    for volume in volumes {
        if quiet {
            out.push_str(&format!("{}\n", volume.name));
        } else {
            out.push_str(&format!("local     {}\n", volume.name));
        }
    }
    out
}

/// Docker's `volume inspect` object.
fn inspect(volume: &Volume) -> Value {
    json!({
        "CreatedAt": volume.created.to_rfc3339(),
        "Driver": "local",
        "Labels": {},
        "Mountpoint": volume.mountpoint,
        "Name": volume.name,
        "Options": {},
        "Scope": "local",
    })
}

/// The ids of the containers (of any status) that use the volume `name`.
fn users<'a>(containers: &'a [Container], name: &str) -> Vec<&'a str> {
    containers
        .iter()
        .filter(|c| uses_volume(&c.state.mounts, name))
        .map(|c| c.state.id.as_str())
        .collect()
}

/// Removes the volume `name` unless a container uses it (Docker's message); `force`
/// ignores a missing volume. The caller holds the store's lock.
fn rm(store: &VolumeStore, containers: &[Container], name: &str, force: bool) -> Result<()> {
    if let Err(err) = store.get(name) {
        return if force { Ok(()) } else { Err(err) };
    }
    let users = users(containers, name);
    if !users.is_empty() {
        bail!("remove {name}: volume is in use - [{}]", users.join(", "));
    }
    store.remove(name)
}

/// Removes the unused anonymous volumes (every unused one with `all`); their names. The
/// caller holds the store's lock.
fn prune(store: &VolumeStore, containers: &[Container], all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for volume in store.list()? {
        let anonymous =
            volume.name.len() == 64 && volume.name.bytes().all(|b| b.is_ascii_hexdigit());
        if (all || anonymous) && users(containers, &volume.name).is_empty() {
            store.remove(&volume.name)?;
            removed.push(volume.name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::state::NewContainer;
    use crate::volumes::{ResolvedMount, ResolvedSource};

    fn using(runtime: &Runtime, volume: &Volume) -> Container {
        runtime
            .create(NewContainer {
                image: "busybox".into(),
                mounts: vec![ResolvedMount {
                    source: ResolvedSource::Volume {
                        name: volume.name.clone(),
                        path: volume.mountpoint.clone(),
                        anonymous: false,
                    },
                    target: "/data".into(),
                    read_only: false,
                }],
                ..NewContainer::default()
            })
            .expect("container")
    }

    #[test]
    fn a_volume_in_use_is_not_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::at(tmp.path().join("volumes")).expect("store");
        let euid = rustix::process::geteuid().as_raw();
        let runtime = Runtime::at(tmp.path().join("rt"), euid).expect("runtime");
        let data = store.create(Some("data")).expect("create");
        let container = using(&runtime, &data);
        let containers = runtime.list().expect("list");
        let err = rm(&store, &containers, "data", false).expect_err("in use");
        assert_eq!(
            err.to_string(),
            format!("remove data: volume is in use - [{}]", container.state.id)
        );
        assert!(
            rm(&store, &containers, "data", true).is_err(),
            "-f does not help"
        );
        assert!(prune(&store, &containers, true).expect("prune").is_empty());
        container.remove().expect("remove the container");
        let containers = runtime.list().expect("list");
        rm(&store, &containers, "data", false).expect("unused now");
        assert_eq!(
            rm(&store, &containers, "data", false)
                .expect_err("gone")
                .to_string(),
            "no such volume: data"
        );
        rm(&store, &containers, "data", true).expect("-f ignores a missing volume");
    }

    #[test]
    fn prune_takes_anonymous_volumes_unless_all() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::at(tmp.path().join("volumes")).expect("store");
        let named = store.create(Some("keep")).expect("create");
        let anonymous = store.create(None).expect("create");
        assert_eq!(prune(&store, &[], false).expect("prune"), [anonymous.name]);
        assert_eq!(prune(&store, &[], true).expect("prune"), [named.name]);
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn ls_and_inspect_have_dockers_shape() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::at(tmp.path().join("volumes")).expect("store");
        store.create(Some("b1")).expect("create");
        store.create(Some("a1")).expect("create");
        let volumes = store.list().expect("list");
        assert_eq!(
            ls(&volumes, false),
            "DRIVER    VOLUME NAME\nlocal     a1\nlocal     b1\n"
        );
        assert_eq!(ls(&volumes, true), "a1\nb1\n");
        let value = inspect(&volumes[0]);
        assert_eq!(value["Name"], "a1");
        assert_eq!(value["Driver"], "local");
        assert_eq!(value["Scope"], "local");
        assert_eq!(value["Labels"], json!({}));
        assert!(value["Mountpoint"]
            .as_str()
            .is_some_and(|p| p.ends_with("volumes/a1/_data")));
        assert!(value["CreatedAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
}
