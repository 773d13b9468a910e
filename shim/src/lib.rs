//! `containerd-shim-katalite-v2`: containerd's runtime `io.containerd.katalite.v2`. The
//! katalite binary answers to that name (argv[0]); containerd starts it once per task
//! (`start`), talks to the daemon it leaves behind over ttrpc (the `containerd.task.v2.Task`
//! service of containerd 1.6, which containerd 2 still accepts), and runs it again as
//! `delete` to clean up after it.
//!
//! The shim drives `katalite-runc`, as containerd's runc shim drives runc: the bundle's
//! `config.json` becomes katalite's container spec there, so this crate never sees OCI
//! types or the VMM. The protocol, from containerd's sources: docs/containerd-shim-v2.md.

mod events;
mod flags;
mod launch;
mod messages;
mod mounts;
mod proto;
mod runc;
mod service;
mod stats;
mod stdio;
mod terminal;
mod ttrpc;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

/// The name containerd starts the binary by for `io.containerd.katalite.v2`.
pub const PROGRAM: &str = "containerd-shim-katalite-v2";

/// Whether `args` (argv[0] included) start the daemon, which receives its listening socket
/// from `start` as descriptor 3 and must keep it.
pub fn is_daemon(args: &[OsString]) -> bool {
    flags::Flags::parse(args).is_ok_and(|flags| flags.action.is_none() && !flags.version)
}

/// Runs the shim with `args` (argv[0] included).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let flags = match flags::Flags::parse(&args) {
        Ok(flags) => flags,
        Err(err) => {
            eprintln!("{PROGRAM}: {err}");
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("{PROGRAM}:\n  Version: {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_deref() {
        Some("start") => launch::start(&flags),
        Some("delete") => launch::delete(&flags),
        None => launch::serve(&flags),
        Some(other) => Err(launch::Error::Action(other.to_owned())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // containerd shows this output in the failed call's error.
            let _ = writeln!(std::io::stderr(), "{PROGRAM}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A line to the daemon's stderr, which is containerd's `log` FIFO: never blocks (the FIFO
/// has no reader while containerd restarts) and never fails the caller.
fn log(message: &str) {
    let line = format!("time=\"{}\" level=warning msg={message:?}\n", unix_now());
    // SAFETY: writes a valid buffer of its own length to fd 2; errors are ignored.
    unsafe {
        libc::write(2, line.as_ptr().cast(), line.len());
    }
}

fn unix_now() -> String {
    let now = messages::Timestamp::now();
    format!("{}.{:09}", now.seconds, now.nanos)
}
