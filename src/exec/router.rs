//! Where the guest's frames for exec streams go: each session registers its client's
//! connection under a fresh stream id, and the demux hands it every Stdout, Stderr and
//! Exited frame of that stream, re-encoded on stream 0 (the client's only stream). A
//! stream stays known until its Exited frame, even after its client went away, so late
//! output is dropped rather than taken for a protocol violation.

use std::collections::HashMap;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{anyhow, bail, Result};
use guest_init::channel::{encode, Message};

/// Docker's status for an exec process that died with its container (128 + SIGKILL).
const EXIT_KILLED: i32 = 137;

/// The routes of the exec streams, shared by the demux and the session server.
#[derive(Clone, Default)]
pub struct Router {
    routes: Arc<Mutex<Routes>>,
}

#[derive(Default)]
struct Routes {
    /// The last stream id handed out; ids are never reused.
    last: u32,
    /// Open streams; `None` once the client went away.
    clients: HashMap<u32, Option<Arc<UnixStream>>>,
    /// The VM ended: no new sessions.
    closed: bool,
}

impl Router {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        // Plain maps updated one entry at a time: a panic cannot leave them torn.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session writing to `client`; returns its stream id, or `None` once the
    /// VM has ended (or every id is used up).
    pub fn open(&self, client: Arc<UnixStream>) -> Option<u32> {
        let mut routes = self.routes();
        if routes.closed {
            return None;
        }
        let stream = routes.last.checked_add(1)?;
        routes.last = stream;
        routes.clients.insert(stream, Some(client));
        Some(stream)
    }

    /// Hands a guest frame of exec `stream` to its client. An unknown stream or a kind the
    /// guest may not send is a protocol violation (the caller ends the VM).
    pub fn route(&self, stream: u32, message: &Message) -> Result<()> {
        let client = {
            let routes = self.routes();
            let Some(client) = routes.clients.get(&stream) else {
                bail!("a frame for unknown stream {stream}");
            };
            client.clone()
        };
        let last = match message {
            Message::Stdout(_) | Message::Stderr(_) => false,
            Message::Exited(_) => true,
            other => return Err(anyhow!("an exec stream got {}", kind(other))),
        };
        if let Some(client) = client {
            let mut frame = Vec::new();
            encode(0, message, &mut frame);
            // Blocks while the client does not read, as fd 1 does for the workload. A
            // client that went away only loses its own output.
            if (&*client).write_all(&frame).is_err() {
                self.forget(stream);
            }
        }
        if last {
            if let Some(Some(client)) = self.routes().clients.remove(&stream) {
                let _ = client.shutdown(Shutdown::Both);
            }
        }
        Ok(())
    }

    /// The client of `stream` went away: its output is dropped from now on.
    pub fn forget(&self, stream: u32) {
        if let Some(client) = self.routes().clients.get_mut(&stream) {
            *client = None;
        }
    }

    /// The VM ended: every open session's process died with it (Exited 137 to its
    /// client), and no new session starts.
    pub fn close(&self) {
        let clients: Vec<Arc<UnixStream>> = {
            let mut routes = self.routes();
            routes.closed = true;
            routes.clients.drain().filter_map(|(_, c)| c).collect()
        };
        let mut frame = Vec::new();
        encode(0, &Message::Exited(EXIT_KILLED), &mut frame);
        for client in clients {
            let _ = (&*client).write_all(&frame);
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

/// The name of a frame kind, for protocol errors.
fn kind(message: &Message) -> &'static str {
    match message {
        Message::Stdout(_) => "stdout",
        Message::Stderr(_) => "stderr",
        Message::Stdin(_) => "a stdin frame",
        Message::StdinClosed => "a stdin-closed frame",
        Message::Signal(_) => "a signal frame",
        Message::Resize { .. } => "a resize frame",
        Message::Ready => "a ready frame",
        Message::Exec(_) => "an exec frame",
        Message::Exited(_) => "exited",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_init::channel::{Decoder, Frame};
    use std::io::Read;

    fn client() -> (Arc<UnixStream>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        (Arc::new(ours), theirs)
    }

    fn received(mut from: UnixStream) -> Vec<Frame> {
        let mut bytes = Vec::new();
        from.read_to_end(&mut bytes).expect("read to the shutdown");
        let mut decoder = Decoder::new();
        decoder.feed(&bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame().expect("valid") {
            frames.push(frame);
        }
        frames
    }

    #[test]
    fn each_stream_reaches_its_own_client_on_stream_zero_until_exited() {
        let router = Router::default();
        let (a, a_end) = client();
        let (b, b_end) = client();
        let sa = router.open(a).expect("open");
        let sb = router.open(b).expect("open");
        assert_ne!(sa, sb);
        assert!(sa != 0 && sb != 0);
        router
            .route(sb, &Message::Stdout(b"to b".to_vec()))
            .expect("route");
        router
            .route(sa, &Message::Stderr(b"to a".to_vec()))
            .expect("route");
        router.route(sa, &Message::Exited(3)).expect("route");
        router.route(sb, &Message::Exited(0)).expect("route");
        let expect = |stream: u32, message: Message| Frame { stream, message };
        assert_eq!(
            received(a_end),
            [
                expect(0, Message::Stderr(b"to a".to_vec())),
                expect(0, Message::Exited(3))
            ]
        );
        assert_eq!(
            received(b_end),
            [
                expect(0, Message::Stdout(b"to b".to_vec())),
                expect(0, Message::Exited(0))
            ]
        );
        // Done streams and never-opened ones are unknown from now on.
        assert!(router.route(sa, &Message::Stdout(Vec::new())).is_err());
        assert!(router.route(99, &Message::Stdout(Vec::new())).is_err());
    }

    #[test]
    fn a_gone_client_loses_its_output_without_a_fault() {
        let router = Router::default();
        let (a, a_end) = client();
        let stream = router.open(a).expect("open");
        drop(a_end);
        router
            .route(stream, &Message::Stdout(b"lost".to_vec()))
            .expect("dropped");
        router
            .route(stream, &Message::Stdout(b"lost".to_vec()))
            .expect("dropped");
        router.route(stream, &Message::Exited(0)).expect("ends");
        let (b, _b_end) = client();
        let other = router.open(b).expect("open");
        router.forget(other);
        router
            .route(other, &Message::Stdout(b"x".to_vec()))
            .expect("dropped");
    }

    #[test]
    fn only_output_and_exited_may_come_from_the_guest() {
        let router = Router::default();
        for bad in [
            Message::Ready,
            Message::Stdin(Vec::new()),
            Message::Signal(1),
            Message::Exec(b"{}".to_vec()),
        ] {
            let (c, _end) = client();
            let stream = router.open(c).expect("open");
            assert!(router.route(stream, &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_vm_ending_kills_open_sessions_and_refuses_new_ones() {
        let router = Router::default();
        let (a, a_end) = client();
        router.open(a).expect("open");
        router.close();
        assert_eq!(
            received(a_end),
            [Frame {
                stream: 0,
                message: Message::Exited(137)
            }]
        );
        let (b, _b_end) = client();
        assert_eq!(router.open(b), None);
    }
}
