//! `katalite inspect`: a container as Docker's inspect JSON, as far as katalite has the
//! fields (Id, Name, State, Config, HostConfig, NetworkSettings.Ports).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::state::{State, Status};
use super::supervise::parse_run_args;
use super::time::Timestamp;

/// What Docker shows for a time that has not happened.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// The inspect object of `state`.
pub fn inspect(state: &State) -> Value {
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
        "Config": config(state),
        "HostConfig": host_config(state),
        "Mounts": crate::volumes::inspect(&state.mounts),
        "NetworkSettings": { "Ports": ports(state) },
    })
}

/// `Config`, from the recorded run arguments.
fn config(state: &State) -> Value {
    let Ok(args) = parse_run_args(&state.run_args) else {
        return json!({ "Image": state.image, "Cmd": state.command });
    };
    json!({
        "Hostname": args.hostname.or(args.name).unwrap_or_else(|| state.id[..12.min(state.id.len())].to_string()),
        "User": args.user.unwrap_or_default(),
        "Tty": args.tty,
        "OpenStdin": args.interactive,
        "Env": args.env,
        "Cmd": state.command,
        "Image": state.image,
        "WorkingDir": args.workdir.unwrap_or_default(),
        "Entrypoint": args.entrypoint.map(|e| vec![e]),
        "StopTimeout": args.stop_timeout,
    })
}

fn host_config(state: &State) -> Value {
    let args = parse_run_args(&state.run_args).ok();
    json!({
        "AutoRemove": state.auto_remove,
        "NetworkMode": args.as_ref().map(|a| a.network.to_string()),
        "NanoCpus": args.as_ref().map(|a| u64::from(a.cpus) * 1_000_000_000),
        "Memory": args.as_ref().map(|a| a.memory << 20),
        "ReadonlyRootfs": args.as_ref().is_some_and(|a| a.read_only),
    })
}

/// `{"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}`.
fn ports(state: &State) -> Value {
    let mut ports: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    if let Ok(args) = parse_run_args(&state.run_args) {
        for mapping in &args.publish {
            let key = format!("{}/{}", mapping.container_port, mapping.protocol);
            ports.entry(key).or_default().push(json!({
                "HostIp": mapping.host_ip.to_string(),
                "HostPort": mapping.host_port.to_string(),
            }));
        }
    }
    json!(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::state::Supervisor;
    use std::path::PathBuf;

    fn state(run_args: &[&str]) -> State {
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
            run_args: run_args.iter().map(|s| s.to_string()).collect(),
            auto_remove: true,
            mounts: Vec::new(),
            lost: false,
        }
    }

    #[test]
    fn inspect_has_dockers_shape() {
        let value = inspect(&state(&[
            "-d", "--name", "web", "-e", "A=1", "-p", "8080:80", "busybox", "sh", "-c", "exit 3",
        ]));
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
        assert_eq!(value["Mounts"], json!([]));
        assert_eq!(
            value["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"],
            "8080"
        );
        assert!(Timestamp::parse(value["Created"].as_str().expect("text")).is_some());
    }

    #[test]
    fn an_exited_or_lost_container_has_no_pid() {
        let mut lost = state(&["busybox"]);
        lost.status = Status::Exited;
        lost.exit_code = Some(137);
        lost.lost = true;
        let value = inspect(&lost);
        assert_eq!(value["State"]["Pid"], 0);
        assert_eq!(value["State"]["ExitCode"], 137);
        assert_eq!(value["State"]["Running"], false);
        assert!(value["State"]["Error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()));
    }
}
