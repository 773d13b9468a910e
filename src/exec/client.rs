//! The `katalite exec` command: finds the running container, asks its supervisor for a
//! session over the control socket, then speaks channel frames on that connection (stream
//! 0): the host's stdin (`-i`), signals and terminal sizes go out, the process's output
//! comes back on fd 1 and fd 2, and its Exited frame becomes katalite's exit code.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use guest_init::channel::{encode, Decoder, Message};
use guest_init::ExecConfig;

use crate::lifecycle::control::{self, ControlReply, ControlRequest};
use crate::lifecycle::state::Runtime;
use crate::{signals, stdio, terminal};

/// Docker's CLI status for errors it reports itself (no such container, not running).
const EXIT_CLI_ERROR: u8 = 1;
/// After a forwarded SIGINT/SIGTERM, how long before the process gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const SIGKILL: i32 = 9;

/// `katalite exec [OPTIONS] CONTAINER COMMAND [ARG...]`
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open and forward it to the process.
    #[arg(short = 'i', long)]
    pub interactive: bool,

    /// Give the process a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,

    /// Start the process and return at once, without its output or exit code.
    #[arg(short = 'd', long)]
    pub detach: bool,

    /// Set an environment variable (NAME=VALUE), or pass the host's value (NAME).
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,

    /// Working directory inside the container (default: the container's).
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// User to run as: name, uid, uid:gid or name:group (default: the container's).
    #[arg(short = 'u', long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,

    /// The container: its name, id, or a unique id prefix.
    #[arg(value_name = "CONTAINER")]
    pub container: String,

    /// The command and its arguments.
    #[arg(value_name = "COMMAND", required = true, trailing_var_arg = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Runs the exec session and returns the exit code `katalite` should exit with.
pub fn exec(args: &ExecArgs) -> Result<u8> {
    if args.tty && args.interactive && !terminal::stdin_is_terminal() {
        eprintln!("katalite: the input device is not a TTY");
        return Ok(EXIT_CLI_ERROR);
    }
    let container = match Runtime::open().and_then(|runtime| runtime.find(&args.container)) {
        Ok(container) => container,
        Err(err) => {
            eprintln!("katalite: {err:#}");
            return Ok(EXIT_CLI_ERROR);
        }
    };
    if !container.is_running() {
        eprintln!("katalite: container {} is not running", args.container);
        return Ok(EXIT_CLI_ERROR);
    }
    let config = exec_config(args, |name| std::env::var(name).ok(), terminal::size());
    let (connection, reader) = open(&container.control_path(), &config, false)?;
    if args.detach {
        return Ok(0);
    }
    attach(args.tty, args.interactive, connection, reader)
}

/// The session's config from the command line: `-e NAME` takes the host's value (and is
/// dropped without one), as with `run`; with `-t` the terminal's size goes along.
fn exec_config(
    args: &ExecArgs,
    host: impl Fn(&str) -> Option<String>,
    size: Option<(u16, u16)>,
) -> ExecConfig {
    let env = args
        .env
        .iter()
        .filter_map(|entry| match entry.split_once('=') {
            Some(_) => Some(entry.clone()),
            None => host(entry).map(|value| format!("{entry}={value}")),
        })
        .collect();
    ExecConfig {
        args: args.command.clone(),
        env,
        working_dir: args.workdir.clone().unwrap_or_default(),
        user: args.user.clone().unwrap_or_default(),
        tty: args.tty,
        open_stdin: args.interactive && !args.detach,
        console_size: size.filter(|_| args.tty).map(|(rows, cols)| [rows, cols]),
    }
}

/// Sends the Exec request to the supervisor at `socket` and reads its reply line; returns
/// the connection (for writing) and a reader positioned at the session's first frame.
/// With `kill_on_detach` the process is killed when this connection closes first.
pub(crate) fn open(
    socket: &Path,
    config: &ExecConfig,
    kill_on_detach: bool,
) -> Result<(UnixStream, BufReader<UnixStream>)> {
    let mut connection = control::connect(socket)
        .with_context(|| format!("cannot reach the supervisor at {}", socket.display()))?;
    let mut request = serde_json::to_value(config)?;
    if let Some(fields) = request.as_object_mut().filter(|_| kill_on_detach) {
        fields.insert(super::server::KILL_ON_DETACH.into(), true.into());
    }
    let mut line = serde_json::to_vec(&ControlRequest::Exec(request))?;
    line.push(b'\n');
    connection
        .write_all(&line)
        .context("cannot send the exec request")?;
    let mut reader = BufReader::new(connection.try_clone()?);
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .context("no reply from the supervisor")?;
    match serde_json::from_str::<ControlReply>(&reply) {
        Ok(ControlReply::Ok(())) => Ok((connection, reader)),
        Ok(ControlReply::Error(message)) => bail!("{message}"),
        Err(err) => Err(anyhow!("invalid reply from the supervisor: {err}")),
    }
}

/// Relays the session: stdin (with `-i`, the terminal raw with `-it`), signals and
/// resizes out; output in until the Exited frame, whose status is returned.
pub(crate) fn attach(
    tty: bool,
    interactive: bool,
    connection: UnixStream,
    reader: BufReader<UnixStream>,
) -> Result<u8> {
    let connection = Arc::new(Mutex::new(connection));
    let send = move |message: Message| {
        let mut frame = Vec::new();
        encode(0, &message, &mut frame);
        let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
        connection.write_all(&frame).is_ok()
    };
    let kill = {
        let send = send.clone();
        move || {
            send(Message::Signal(SIGKILL));
        }
    };
    let forwarder = signals::Forwarder::start(tty, STOP_TIMEOUT, None, send.clone(), kill)
        .context("cannot catch signals")?;
    let raw = if tty && interactive {
        Some(terminal::RawMode::enter(io::stdin()).context("cannot put the terminal in raw mode")?)
    } else {
        None
    };
    if interactive {
        stdio::pump_stdin_with(send).context("cannot start the stdin thread")?;
    }
    let status = receive(reader, &mut io::stdout(), &mut io::stderr());
    drop(raw);
    forwarder.stop();
    match status? {
        // Docker's statuses are 0..=255; anything else comes from a broken guest.
        Some(code) => Ok(u8::try_from(code).unwrap_or(u8::MAX)),
        None => bail!("the container's supervisor ended the exec session without a status"),
    }
}

/// Writes the session's Stdout and Stderr frames to `out` and `err` until its Exited
/// frame (`Some(status)`) or the end of the connection (`None`).
fn receive(mut from: impl Read, out: &mut impl Write, err: &mut impl Write) -> Result<Option<i32>> {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = decoder.next_frame()? {
            // A closed stdout (`| head`) only loses output, as with `docker exec`.
            let _ = match frame.message {
                Message::Stdout(data) => out.write_all(&data).and_then(|()| out.flush()),
                Message::Stderr(data) => err.write_all(&data).and_then(|()| err.flush()),
                Message::Exited(status) => return Ok(Some(status)),
                other => bail!("the supervisor sent an unexpected {other:?} frame"),
            };
        }
        match from.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(argv: &[&str]) -> ExecArgs {
        let cli = crate::cli::Cli::try_parse_from(["katalite", "exec"].iter().chain(argv))
            .expect("valid arguments");
        match cli.command {
            crate::cli::Command::Exec(exec) => exec,
            _ => panic!("not an exec"),
        }
    }

    #[test]
    fn the_command_line_becomes_an_exec_config() {
        let host = |name: &str| (name == "HOSTVAR").then(|| "h".to_string());
        let parsed = args(&[
            "-it",
            "-e",
            "A=1",
            "-e",
            "HOSTVAR",
            "-e",
            "MISSING",
            "-w",
            "/tmp",
            "-u",
            "1:2",
            "web",
            "sh",
            "-c",
            "echo -n hi",
        ]);
        let config = exec_config(&parsed, host, Some((24, 80)));
        assert_eq!(config.args, ["sh", "-c", "echo -n hi"]);
        assert_eq!(config.env, ["A=1", "HOSTVAR=h"]);
        assert_eq!(
            (config.working_dir.as_str(), config.user.as_str()),
            ("/tmp", "1:2")
        );
        assert!(config.tty && config.open_stdin);
        assert_eq!(config.console_size, Some([24, 80]));
        assert_eq!(parsed.container, "web");

        let config = exec_config(&args(&["web", "ls", "-l"]), host, Some((24, 80)));
        assert_eq!(config.args, ["ls", "-l"]);
        assert!(!config.tty && !config.open_stdin && config.console_size.is_none());
        assert!(config.working_dir.is_empty() && config.user.is_empty());
        let config = exec_config(&args(&["-d", "-i", "web", "true"]), host, None);
        assert!(!config.open_stdin, "nobody feeds a detached session");
    }

    #[test]
    fn a_command_is_required() {
        assert!(crate::cli::Cli::try_parse_from(["katalite", "exec", "web"]).is_err());
    }

    #[test]
    fn output_goes_to_its_stream_until_exited() {
        let mut bytes = Vec::new();
        for message in [
            Message::Stdout(b"out ".to_vec()),
            Message::Stderr(b"err".to_vec()),
            Message::Stdout(b"more".to_vec()),
            Message::Exited(3),
            Message::Stdout(b"never".to_vec()),
        ] {
            encode(0, &message, &mut bytes);
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = receive(&bytes[..], &mut out, &mut err).expect("valid");
        assert_eq!(status, Some(3));
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"out more"[..], &b"err"[..])
        );
        // The connection ending first is no status at all.
        let status = receive(&bytes[..9], &mut Vec::new(), &mut Vec::new()).expect("valid");
        assert_eq!(status, None);
        let mut ready = Vec::new();
        encode(0, &Message::Ready, &mut ready);
        assert!(receive(&ready[..], &mut Vec::new(), &mut Vec::new()).is_err());
    }

    #[test]
    fn the_request_is_one_line_and_errors_come_back_as_messages() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Longer than sun_path, as under a user's XDG_RUNTIME_DIR.
        let dir = tmp.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let socket = dir.join("control.sock");
        let listener = {
            // Bound from inside the directory: the long path does not fit sun_path.
            let dir_fd = std::fs::File::open(&dir).expect("open dir");
            let short = format!("/proc/self/fd/{}/control.sock", {
                use std::os::fd::AsRawFd;
                dir_fd.as_raw_fd()
            });
            std::os::unix::net::UnixListener::bind(short).expect("bind")
        };
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(stream.try_clone().expect("clone"))
                .read_line(&mut line)
                .expect("request");
            stream
                .write_all(b"{\"Error\":\"the container is not running\"}\n")
                .expect("reply");
            line
        });
        let config = ExecConfig {
            args: vec!["true".into()],
            ..ExecConfig::default()
        };
        let err = open(&socket, &config, true).expect_err("refused");
        assert_eq!(err.to_string(), "the container is not running");
        let line = server.join().expect("server");
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line}"
        );
        let sent: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(sent["Exec"]["Args"], serde_json::json!(["true"]));
        assert_eq!(sent["Exec"]["Tty"], false);
        assert_eq!(sent["Exec"][super::super::server::KILL_ON_DETACH], true);
    }
}
