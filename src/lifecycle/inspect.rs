//! `katalite inspect`: a container as Docker's inspect JSON, as far as katalite has the
//! fields (Id, Name, State, Config, HostConfig, NetworkSettings.Ports).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::state::{State, Status};
use super::time::Timestamp;
use crate::spec::ContainerSpec;

/// What Docker shows for a time that has not happened.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// The inspect object of `state` made from `spec` (`None`: its spec is unreadable, so
/// only what the state records is shown).
pub fn inspect(state: &State, spec: Option<&ContainerSpec>) -> Value {
    let time = |t: Option<Timestamp>| t.map_or_else(|| NEVER.to_string(), |t| t.to_rfc3339());
    let running = state.status == Status::Running;
    let pid = match (&state.supervisor, running) {
        (Some(supervisor), true) => supervisor.pid,
        _ => 0,
    };
    let error = if state.lost {
        "the supervisor died without recording how the container ended"
    } else {
        ""
    };
    let (path, args) = state
        .command
        .split_first()
        .map_or((String::new(), Vec::new()), |(p, a)| {
            (p.clone(), a.to_vec())
        });
    json!({
        "Id": state.id,
        "Created": state.created.to_rfc3339(),
        "Path": path,
        "Args": args,
        "State": {
            "Status": state.status.as_str(),
            "Running": running,
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": false,
            "Pid": pid,
            "ExitCode": state.exit_code.unwrap_or(0),
            "Error": error,
            "StartedAt": time(state.started),
            "FinishedAt": time(state.finished),
        },
        "Image": state.image,
        "Name": format!("/{}", state.name),
        "LogPath": state.log_path,
        "Config": config(state, spec),
        "HostConfig": host_config(state, spec),
        "Mounts": crate::volumes::inspect(&state.mounts),
        "NetworkSettings": { "Ports": ports(spec) },
    })
}

/// `Config`, from the spec.
fn config(state: &State, spec: Option<&ContainerSpec>) -> Value {
    let Some(spec) = spec else {
        return json!({ "Image": state.image, "Cmd": state.command });
    };
    let process = &spec.process;
    let short_id = &state.id[..12.min(state.id.len())];
    json!({
        "Hostname": process.hostname.as_deref().unwrap_or(short_id),
        "User": process.user.as_deref().unwrap_or_default(),
        "Tty": spec.stdio.tty,
        "OpenStdin": spec.stdio.interactive,
        "Env": process.env,
        "Cmd": state.command,
        "Image": state.image,
        "WorkingDir": process.working_dir.as_deref().unwrap_or_default(),
        "Entrypoint": process.entrypoint,
        "StopTimeout": spec.stop_timeout_secs,
    })
}

fn host_config(state: &State, spec: Option<&ContainerSpec>) -> Value {
    json!({
        "AutoRemove": state.auto_remove,
        "NetworkMode": spec.map(|s| s.network.mode.to_string()),
        "NanoCpus": spec.map(|s| u64::from(s.resources.cpus) * 1_000_000_000),
        "Memory": spec.map(|s| s.resources.memory_mib << 20),
        "ReadonlyRootfs": spec.is_some_and(|s| s.root.read_only),
    })
}

/// `{"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}`.
fn ports(spec: Option<&ContainerSpec>) -> Value {
    let mut ports: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for mapping in spec.iter().flat_map(|s| &s.network.publish) {
        let key = format!("{}/{}", mapping.container_port, mapping.protocol);
        ports.entry(key).or_default().push(json!({
            "HostIp": mapping.host_ip.to_string(),
            "HostPort": mapping.host_port.to_string(),
        }));
    }
    json!(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::state::Supervisor;
    use crate::spec::{NetworkSpec, ProcessSpec, Resources, RootSpec};
    use std::path::PathBuf;

    fn state() -> State {
        State {
            id: "ab".repeat(32),
            name: "web".into(),
            image: "busybox".into(),
            command: vec!["sh".into(), "-c".into(), "exit 3".into()],
            created: Timestamp::now(),
            status: Status::Running,
            exit_code: None,
            started: Some(Timestamp::now()),
            finished: None,
            supervisor: Some(Supervisor {
                pid: 4242,
                start_time: 1,
            }),
            ports: Vec::new(),
            log_path: PathBuf::from("/run/x/container.log"),
            auto_remove: true,
            mounts: Vec::new(),
            lost: false,
        }
    }

    /// The spec `katalite run -d --name web -e A=1 -p 8080:80 -m 1g --read-only busybox
    /// sh -c 'exit 3'` makes.
    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: Some("web".into()),
            process: ProcessSpec {
                command: vec!["sh".into(), "-c".into(), "exit 3".into()],
                env: vec!["A=1".into()],
                hostname: Some("web".into()),
                ..ProcessSpec::default()
            },
            resources: Resources {
                cpus: 1,
                memory_mib: 1024,
            },
            network: NetworkSpec {
                publish: vec![crate::network::parse_publish("8080:80").expect("valid")],
                ..NetworkSpec::default()
            },
            root: RootSpec {
                read_only: true,
                ..RootSpec::default()
            },
            auto_remove: true,
            detach: true,
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn inspect_has_dockers_shape() {
        let spec = spec();
        let value = inspect(&state(), Some(&spec));
        assert_eq!(value["Id"], "ab".repeat(32));
        assert_eq!(value["Name"], "/web");
        assert_eq!(value["Path"], "sh");
        assert_eq!(value["Args"], json!(["-c", "exit 3"]));
        assert_eq!(value["State"]["Status"], "running");
        assert_eq!(value["State"]["Running"], true);
        assert_eq!(value["State"]["Pid"], 4242);
        assert_eq!(value["State"]["FinishedAt"], NEVER);
        assert_eq!(value["Config"]["Env"], json!(["A=1"]));
        assert_eq!(value["Config"]["Hostname"], "web");
        assert_eq!(value["HostConfig"]["AutoRemove"], true);
        assert_eq!(value["HostConfig"]["NetworkMode"], "user");
        assert_eq!(value["HostConfig"]["Memory"], 1u64 << 30);
        assert_eq!(value["HostConfig"]["ReadonlyRootfs"], true);
        assert_eq!(value["Config"]["StopTimeout"], 10);
        assert_eq!(value["Config"]["Entrypoint"], Value::Null);
        assert_eq!(value["Mounts"], json!([]));
        assert_eq!(
            value["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"],
            "8080"
        );
        assert!(Timestamp::parse(value["Created"].as_str().expect("text")).is_some());
    }

    #[test]
    fn an_exited_or_lost_container_has_no_pid() {
        let mut lost = state();
        lost.status = Status::Exited;
        lost.exit_code = Some(137);
        lost.lost = true;
        let value = inspect(&lost, None);
        assert_eq!(value["State"]["Pid"], 0);
        assert_eq!(value["State"]["ExitCode"], 137);
        assert_eq!(value["State"]["Running"], false);
        assert!(value["State"]["Error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()));
    }
}
