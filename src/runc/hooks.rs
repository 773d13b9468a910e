//! OCI hooks: each program runs with its own argv and environment, the container's state
//! JSON on stdin, and its timeout; a failing hook fails the step that runs it.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::bundle::Hook;

/// How long a hook without its own timeout may run.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(10);

/// Runs `hooks` in order with `state` (JSON) on stdin; the first failure is the error.
pub fn run(phase: &str, hooks: &[Hook], state: &[u8]) -> Result<()> {
    for hook in hooks {
        run_one(hook, state).with_context(|| format!("{phase} hook {}", hook.path.display()))?;
    }
    Ok(())
}

fn run_one(hook: &Hook, state: &[u8]) -> Result<()> {
    let mut command = Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        command.arg0(argv0).args(rest);
    }
    command.env_clear();
    for entry in &hook.env {
        if let Some((name, value)) = entry.split_once('=') {
            command.env(name, value);
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start it")?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state is not an error.
        let _ = stdin.write_all(state);
    }
    let timeout = hook.timeout.map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for it")? {
            if !status.success() {
                bail!("failed: {status}");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {} s", timeout.as_secs());
        }
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str, timeout: Option<u64>) -> Hook {
        Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["HOOK_VAR=x".into()],
            timeout,
        }
    }

    #[test]
    fn hooks_get_the_state_on_stdin_and_their_own_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let script = format!("cat > {0}; echo \"$HOOK_VAR$HOME\" >> {0}", out.display());
        run("prestart", &[shell(&script, None)], b"{\"id\":\"c\"}").expect("hook");
        let written = std::fs::read_to_string(&out).expect("out");
        assert_eq!(written, "{\"id\":\"c\"}x\n");
    }

    #[test]
    fn a_failing_or_slow_hook_is_an_error() {
        let error = run("poststart", &[shell("exit 3", None)], b"").expect_err("fails");
        assert!(format!("{error:#}").contains("exit status: 3"), "{error:#}");
        let error = run("prestart", &[shell("sleep 5", Some(0))], b"").expect_err("slow");
        assert!(format!("{error:#}").contains("timed out"), "{error:#}");
    }
}
