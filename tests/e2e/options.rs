//! User stories for `katalite run`'s options: environment, working directory, user,
//! hostname, read-only root, entrypoint, CPUs; on the busybox tree and, where an image
//! config is involved, on the nginx image from the local test registry.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{katalite, katalite_busybox, Outcome};

/// A file in the lab's /tmp with `content`, named for this test process.
fn temp_file(name: &str, content: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    let path = format!("{dir}/katalite-e2e-{}-{nanos}-{name}", std::process::id());
    std::fs::write(&path, content).expect("write a temp file");
    path
}

#[test]
fn env_flags_env_files_and_host_values_reach_the_workload() {
    let env_file = temp_file(
        "env",
        "# comment\nFROM_FILE=file value\nBOTH=file\nTMPDIR\n",
    );
    let host_tmpdir = std::env::var("TMPDIR").expect("the lab sets TMPDIR");
    let run = katalite_busybox(
        &[
            "--env-file",
            &env_file,
            "-e",
            "BOTH=flag",
            "-e",
            "HOME",
            "-e",
            "X=a=b",
        ],
        &["sh", "-c", "echo \"$FROM_FILE|$BOTH|$TMPDIR|$HOME|$X\""],
    );
    let _ = std::fs::remove_file(&env_file);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let home = std::env::var("HOME").expect("the lab sets HOME");
    assert_eq!(
        run.stdout.trim_end(),
        format!("file value|flag|{host_tmpdir}|{home}|a=b"),
        "{}",
        run.describe()
    );
}

#[test]
fn workdir_is_created_and_entered() {
    let run = katalite_busybox(&["-w", "/srv/app"], &["pwd"]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "/srv/app\n", "{}", run.describe());
}

#[test]
fn user_by_name_by_uid_and_uid_gid() {
    let ids = |user: &str| -> Outcome {
        katalite_busybox(&["-u", user], &["sh", "-c", "echo $(id -u):$(id -g) $HOME"])
    };
    let run = ids("nobody");
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(
        run.stdout,
        "65534:65534 /nonexistent\n",
        "{}",
        run.describe()
    );
    // A uid without a passwd entry keeps gid 0 and gets HOME=/, as in Docker.
    let run = ids("1234");
    assert_eq!(run.stdout, "1234:0 /\n", "{}", run.describe());
    let run = ids("1234:5678");
    assert_eq!(run.stdout, "1234:5678 /\n", "{}", run.describe());
    let run = ids("nobody:root");
    assert_eq!(run.stdout, "65534:0 /nonexistent\n", "{}", run.describe());
}

#[test]
fn hostname_is_the_flag_else_the_name_else_a_container_id() {
    // --rm: a name stays taken by an exited container until it is removed, as in Docker.
    let run = katalite_busybox(&["--rm", "-h", "box", "--name", "web"], &["hostname"]);
    assert_eq!(run.stdout, "box\n", "{}", run.describe());
    let run = katalite_busybox(&["--rm", "--name", "web"], &["hostname"]);
    assert_eq!(run.stdout, "web\n", "{}", run.describe());
    let run = katalite_busybox(&[], &["hostname"]);
    let id = run.stdout.trim_end();
    assert_eq!(id.len(), 12, "{}", run.describe());
    assert!(
        id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        run.describe()
    );
}

#[test]
fn read_only_refuses_writes_to_the_root() {
    let run = katalite_busybox(&["--read-only"], &["sh", "-c", "touch /x && echo wrote"]);
    assert_ne!(run.status, Some(0), "{}", run.describe());
    assert!(!run.stdout.contains("wrote"), "{}", run.describe());
    let run = katalite_busybox(&[], &["sh", "-c", "touch /x && echo wrote"]);
    assert_eq!(run.stdout, "wrote\n", "{}", run.describe());
}

#[test]
fn fractional_cpus_round_up() {
    let run = katalite_busybox(&["--cpus", "1.5"], &["nproc"]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout.trim(), "2", "{}", run.describe());
}

#[test]
fn entrypoint_runs_with_the_command_as_its_arguments() {
    let run = katalite_busybox(&["--entrypoint", "echo"], &["from", "cmd"]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "from cmd\n", "{}", run.describe());
}

/// The nginx image (Debian's nginx; no `Entrypoint`, `Cmd ["nginx", "-g", "daemon off;"]`,
/// only `PATH` in `Env`, no `User`) from the local test registry, run with `options` and
/// `command`.
fn nginx(options: &[&str], command: &[&str]) -> Outcome {
    let registry = std::env::var("KATALITE_E2E_REGISTRY")
        .expect("KATALITE_E2E_REGISTRY must name the test registry: run `cargo xtask lab e2e`");
    let image = format!("{registry}/library/nginx");
    let mut args = vec!["run", "-q", "--insecure-registry", &registry];
    args.extend_from_slice(options);
    args.push(&image);
    args.extend_from_slice(command);
    katalite(&args)
}

#[test]
fn image_user_and_env_are_overridden_on_the_command_line() {
    let script = "echo $(id -un) $PATH";
    let run = nginx(&[], &["sh", "-c", script]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(
        run.stdout,
        "root /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        "{}",
        run.describe()
    );
    let run = nginx(
        &["-u", "www-data", "-e", "PATH=/usr/bin:/bin"],
        &["sh", "-c", script],
    );
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "www-data /usr/bin:/bin\n", "{}", run.describe());
}

#[test]
fn entrypoint_flag_drops_the_images_cmd() {
    // Docker: --entrypoint clears the image's CMD; only the command line gives arguments.
    let run = nginx(&["--entrypoint", "echo"], &[]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "\n", "{}", run.describe());
    let run = nginx(&["--entrypoint", "echo"], &["only", "these"]);
    assert_eq!(run.stdout, "only these\n", "{}", run.describe());
}
