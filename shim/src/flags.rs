//! The shim's command line, which containerd writes in Go's `flag` syntax: single-dash
//! flags (`-id x`, `-id=x`, `--id x`), all before the action word (`start`, `delete`, or
//! none for the daemon). Unknown flags are ignored (a newer containerd may add some) and
//! unknown actions refused.

use std::ffi::OsString;
use std::path::PathBuf;

use thiserror::Error;

/// A command line the shim cannot act on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FlagError {
    /// A flag that needs a value came last.
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    /// Not UTF-8.
    #[error("argument is not UTF-8: {0:?}")]
    NotUtf8(OsString),
}

/// The flags containerd passes (runtime/v2/shim/shim.go).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flags {
    /// `-namespace`: the containerd namespace.
    pub namespace: String,
    /// `-id`: the task id.
    pub id: String,
    /// `-address`: containerd's GRPC socket path.
    pub address: String,
    /// `-publish-binary`: containerd's executable.
    pub publish_binary: String,
    /// `-bundle` (delete only; `start` runs in the bundle).
    pub bundle: Option<PathBuf>,
    /// `-socket`: where the daemon listens instead of fd 3.
    pub socket: Option<PathBuf>,
    /// `-debug`.
    pub debug: bool,
    /// `-v`.
    pub version: bool,
    /// `start`, `delete` or none.
    pub action: Option<String>,
}

const BOOLS: [&str; 2] = ["debug", "v"];

impl Flags {
    /// Parses `args` (argv[0] first).
    pub fn parse(args: &[OsString]) -> Result<Self, FlagError> {
        let mut flags = Flags {
            namespace: "default".into(),
            address: "/run/containerd/containerd.sock".into(),
            ..Flags::default()
        };
        let mut args = args.iter().skip(1).map(|arg| {
            arg.to_str()
                .map(str::to_owned)
                .ok_or_else(|| FlagError::NotUtf8(arg.clone()))
        });
        while let Some(arg) = args.next() {
            let arg = arg?;
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                // Go stops at the first non-flag: the action.
                flags.action = Some(arg);
                break;
            };
            if flag.is_empty() {
                flags.action = args.next().transpose()?;
                break;
            }
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            if BOOLS.contains(&name) {
                let on = inline
                    .as_deref()
                    .is_none_or(|value| value == "true" || value == "1");
                match name {
                    "debug" => flags.debug = on,
                    _ => flags.version = on,
                }
                continue;
            }
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .transpose()?
                    .ok_or_else(|| FlagError::MissingValue(name.to_owned()))?,
            };
            match name {
                "namespace" => flags.namespace = value,
                "id" => flags.id = value,
                "address" => flags.address = value,
                "publish-binary" => flags.publish_binary = value,
                "bundle" => flags.bundle = Some(value.into()),
                "socket" => flags.socket = Some(value.into()),
                _ => {}
            }
        }
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, FlagError> {
        let args: Vec<OsString> = std::iter::once("shim")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        Flags::parse(&args)
    }

    #[test]
    fn containerds_start_and_delete_lines_parse() {
        let flags = parse(&[
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c1",
            "-debug",
            "start",
        ])
        .expect("start");
        assert_eq!(flags.namespace, "k8s.io");
        assert_eq!(flags.id, "c1");
        assert!(flags.debug);
        assert_eq!(flags.action.as_deref(), Some("start"));
        let flags = parse(&["--id=c2", "-bundle", "/b", "-future", "x", "delete"]).expect("delete");
        assert_eq!(flags.id, "c2");
        assert_eq!(flags.bundle.as_deref(), Some("/b".as_ref()));
        assert_eq!(flags.action.as_deref(), Some("delete"));
        let flags = parse(&["-id", "c3", "-debug=false"]).expect("daemon");
        assert!(!flags.debug && flags.action.is_none());
        assert_eq!(flags.namespace, "default");
        assert_eq!(parse(&["-id"]), Err(FlagError::MissingValue("id".into())));
        // A task may be called "start": only the action word decides.
        let daemon: Vec<OsString> = ["shim", "-id", "start", "-namespace", "delete"]
            .map(OsString::from)
            .to_vec();
        assert!(crate::is_daemon(&daemon));
        let start: Vec<OsString> = ["shim", "-id", "c1", "start"].map(OsString::from).to_vec();
        assert!(!crate::is_daemon(&start));
    }
}
