//! The supervisor's side of `katalite exec`: a connection handed over by the control
//! socket with its `ExecConfig` becomes a session on a fresh channel stream. After one
//! reply line, the client's frames (stream 0 on the socket: Stdin, StdinClosed, Signal,
//! Resize) go to the guest on the session's stream; the router sends the guest's back.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use guest_init::channel::{Decoder, Message, MAX_PAYLOAD};
use guest_init::ExecConfig;

use super::router::Router;
use crate::stdio::ToGuest;

/// A key of the Exec request beside the [`ExecConfig`] (host-only, never sent to the
/// guest): the client's leaving kills the process. The runc front end's relay sets it,
/// because to the engine the relay is the process (containerd SIGKILLs an exec by pid);
/// `katalite exec` does not (a `docker exec` process outlives a client that detaches).
pub const KILL_ON_DETACH: &str = "KillOnDetach";

/// Serves exec connections for one VM.
#[derive(Clone)]
pub struct Server {
    router: Router,
    to_guest: ToGuest,
}

impl Server {
    /// Sessions routed by `router`, their frames sent through `to_guest`.
    pub fn new(router: Router, to_guest: ToGuest) -> Self {
        Self { router, to_guest }
    }

    /// Takes over `client` for the session `request` describes, on a
    /// `katalite-exec` thread of its own (the control socket keeps serving).
    pub fn accept(&self, client: UnixStream, request: serde_json::Value) {
        let server = self.clone();
        let spawned = std::thread::Builder::new()
            .name("katalite-exec".into())
            .stack_size(vmm::THREAD_STACK_BYTES)
            .spawn(move || server.serve(client, request));
        // Without a thread the client gets end of file and reports the failure.
        drop(spawned);
    }

    fn serve(&self, client: UnixStream, mut request: serde_json::Value) {
        let client = Arc::new(client);
        let kill_on_detach = request
            .as_object_mut()
            .and_then(|fields| fields.remove(KILL_ON_DETACH))
            .and_then(|value| value.as_bool())
            .unwrap_or(false);
        let (stream, config) = match self.open(&client, request) {
            Ok(opened) => opened,
            Err(err) => {
                let _ = reply(&client, Err(format!("{err:#}")));
                return;
            }
        };
        // The reply goes out before Exec, so no output of the session can overtake it. A
        // client that cannot be answered is gone: its session's output is dropped.
        if reply(&client, Ok(())).is_err() {
            self.router.forget(stream);
        }
        if !self.to_guest.send_on(stream, &Message::Exec(config)) {
            // The VM ended; the router's close already told the client.
            return;
        }
        if let Err(err) = relay(&client, |message| self.to_guest.send_on(stream, &message)) {
            eprintln!("katalite: exec session {stream}: {err:#}");
        }
        if kill_on_detach {
            // Before the stream is forgotten, so it cannot name a newer session yet; the
            // guest ignores it once the process has ended.
            self.to_guest
                .send_on(stream, &Message::Signal(libc::SIGKILL));
        }
        // The client left (or broke the protocol): its process reads end of file.
        self.router.forget(stream);
        self.to_guest.send_on(stream, &Message::StdinClosed);
    }

    /// Validates the request and registers the session: its stream and the `Exec` payload.
    fn open(&self, client: &Arc<UnixStream>, request: serde_json::Value) -> Result<(u32, Vec<u8>)> {
        let config: ExecConfig =
            serde_json::from_value(request).map_err(|e| anyhow!("invalid exec request: {e}"))?;
        if config.args.is_empty() {
            bail!("no command specified");
        }
        let json = serde_json::to_vec(&config)?;
        if json.len() > MAX_PAYLOAD {
            bail!("the exec request exceeds {MAX_PAYLOAD} bytes");
        }
        let stream = self
            .router
            .open(client.clone())
            .ok_or_else(|| anyhow!("the container is not running"))?;
        Ok((stream, json))
    }
}

/// The control socket's answer line: `{"Ok":null}` or `{"Error":"..."}`.
fn reply(mut client: &UnixStream, outcome: Result<(), String>) -> std::io::Result<()> {
    let value = match outcome {
        Ok(()) => serde_json::json!({ "Ok": null }),
        Err(message) => serde_json::json!({ "Error": message }),
    };
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    client.write_all(&line)
}

/// Passes the client's frames to `send` until the client closes (or `send` refuses: the
/// VM ended). Only the kinds a client may send are accepted, on stream 0.
fn relay(mut client: &UnixStream, mut send: impl FnMut(Message) -> bool) -> Result<()> {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            // Reset by a client killed mid-session: the same as its leaving.
            Err(_) => return Ok(()),
        };
        decoder.feed(&buf[..n]);
        while let Some(frame) = decoder.next_frame()? {
            if frame.stream != 0 {
                bail!("the client sent a frame for stream {}", frame.stream);
            }
            match frame.message {
                message @ (Message::Stdin(_)
                | Message::StdinClosed
                | Message::Signal(_)
                | Message::Resize { .. }) => {
                    if !send(message) {
                        return Ok(());
                    }
                }
                other => bail!("the client sent a frame only the guest may send: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_init::channel::encode;
    use std::io::{BufRead, BufReader};

    fn frames(messages: &[Message]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for message in messages {
            encode(0, message, &mut bytes);
        }
        bytes
    }

    #[test]
    fn client_frames_pass_through_in_order_until_the_client_leaves() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let sent = [
            Message::Stdin(b"abc".to_vec()),
            Message::Resize { rows: 2, cols: 3 },
            Message::Signal(2),
            Message::StdinClosed,
        ];
        theirs.write_all(&frames(&sent)).expect("write");
        drop(theirs);
        let mut got = Vec::new();
        relay(&ours, |m| {
            got.push(m);
            true
        })
        .expect("clean end");
        assert_eq!(got, sent);
    }

    #[test]
    fn guest_kinds_or_other_streams_from_the_client_end_the_session() {
        for bad in [
            Message::Stdout(b"x".to_vec()),
            Message::Exited(0),
            Message::Exec(b"{}".to_vec()),
        ] {
            let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
            theirs
                .write_all(&frames(std::slice::from_ref(&bad)))
                .expect("write");
            assert!(relay(&ours, |_| true).is_err(), "{bad:?}");
        }
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let mut bytes = Vec::new();
        encode(4, &Message::StdinClosed, &mut bytes);
        theirs.write_all(&bytes).expect("write");
        assert!(relay(&ours, |_| true).is_err());
    }

    #[test]
    fn a_refused_send_ends_the_relay() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        theirs
            .write_all(&frames(&[Message::Signal(1), Message::Signal(2)]))
            .expect("write");
        let mut calls = 0;
        relay(&ours, |_| {
            calls += 1;
            false
        })
        .expect("clean end");
        assert_eq!(calls, 1);
    }

    #[test]
    fn bad_requests_are_answered_with_an_error_line() {
        let server = Server::new(Router::default(), ToGuest::new(vmm::ConsoleInput::new()));
        for (request, error) in [
            (serde_json::json!({"Args": []}), "no command specified"),
            (serde_json::json!({"Cmd": ["x"]}), "invalid exec request"),
        ] {
            let (ours, theirs) = UnixStream::pair().expect("socketpair");
            server.accept(ours, request);
            let mut line = String::new();
            BufReader::new(theirs).read_line(&mut line).expect("reply");
            assert!(
                line.starts_with("{\"Error\":") && line.contains(error),
                "{line}"
            );
        }
    }

    #[test]
    fn a_session_gets_a_stream_and_its_exec_frame_waits_for_ready() {
        let router = Router::default();
        let input = vmm::ConsoleInput::new();
        let to_guest = ToGuest::new(input.clone());
        let server = Server::new(router.clone(), to_guest.clone());
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        server.accept(ours, serde_json::json!({"Args": ["echo", "hi"]}));
        let mut reader = BufReader::new(theirs.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("reply");
        assert_eq!(line, "{\"Ok\":null}\n");
        // The guest's frames for the session's stream reach the client.
        router
            .route(1, &Message::Stdout(b"hi\n".to_vec()))
            .expect("stream 1 is the session");
        router.route(1, &Message::Exited(0)).expect("exited");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).expect("read");
        let mut decoder = Decoder::new();
        decoder.feed(&rest);
        let first = decoder.next_frame().expect("valid").expect("a frame");
        assert_eq!(first.message, Message::Stdout(b"hi\n".to_vec()));
        to_guest.close();
    }
}
