//! Events to containerd: a thread forwards them, in the order they were queued, over
//! ttrpc to `$TTRPC_ADDRESS` (`containerd.services.events.ttrpc.v1.Events/Forward`), so a
//! slow or restarting containerd never holds up the task service.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use crate::messages::{any, Event, Timestamp};
use crate::proto::Encoder;
use crate::ttrpc;

const SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";
/// containerd's own publisher tries an event this many times, a second longer each time.
const ATTEMPTS: u64 = 5;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

enum Message {
    Event(Event),
    Flush(Sender<()>),
}

/// The queue to the forwarding thread.
#[derive(Clone)]
pub struct Publisher {
    queue: Sender<Message>,
}

impl Publisher {
    /// Starts the thread; `address` is containerd's ttrpc socket, `namespace` the task's.
    pub fn start(address: Option<String>, namespace: String) -> Self {
        let (queue, receiver) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("events".into())
            .stack_size(256 << 10)
            .spawn(move || forward(address, &namespace, &receiver));
        if let Err(err) = spawned {
            crate::log(&format!("cannot start the event thread: {err}"));
        }
        Self { queue }
    }

    /// Queues `event`.
    pub fn publish(&self, event: Event) {
        let _ = self.queue.send(Message::Event(event));
    }

    /// Waits up to `timeout` for the events queued so far to be sent.
    pub fn flush(&self, timeout: Duration) {
        let (done, wait) = mpsc::channel();
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

fn forward(address: Option<String>, namespace: &str, queue: &Receiver<Message>) {
    let mut connection: Option<(UnixStream, u32)> = None;
    for message in queue {
        let event = match message {
            Message::Event(event) => event,
            Message::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let Some(address) = &address else {
            continue;
        };
        let request = forward_request(namespace, &event);
        for attempt in 1..=ATTEMPTS {
            match send(&mut connection, address, &request) {
                Ok(()) => break,
                Err(err) => {
                    connection = None;
                    if attempt == ATTEMPTS {
                        crate::log(&format!("event {event:?} dropped: {err}"));
                    } else {
                        thread::sleep(Duration::from_secs(attempt));
                    }
                }
            }
        }
    }
}

fn send(
    connection: &mut Option<(UnixStream, u32)>,
    address: &str,
    request: &[u8],
) -> std::io::Result<()> {
    if connection.is_none() {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        stream.set_write_timeout(Some(CALL_TIMEOUT))?;
        *connection = Some((stream, 1));
    }
    let Some((stream, next_id)) = connection else {
        return Ok(());
    };
    let id = *next_id;
    *next_id = next_id.wrapping_add(2);
    match ttrpc::call(stream, id, SERVICE, "Forward", request)? {
        Ok(_) => Ok(()),
        Err(status) => Err(std::io::Error::other(status.message)),
    }
}

/// `ForwardRequest{envelope: Envelope{timestamp, namespace, topic, event}}`.
fn forward_request(namespace: &str, event: &Event) -> Vec<u8> {
    let (topic, type_url, value) = event.encode();
    let mut envelope = Encoder::new();
    envelope
        .message(1, &Timestamp::now().encode())
        .string(2, namespace)
        .string(3, topic)
        .message(4, &any(type_url, &value));
    let mut request = Encoder::new();
    request.message(1, &envelope.finish());
    request.finish()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::proto::fields;
    use crate::ttrpc::{Handler, Reply};

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Handler for Recorder {
        fn call(self: Arc<Self>, service: &str, method: &str, payload: &[u8]) -> Reply {
            assert_eq!((service, method), (SERVICE, "Forward"));
            let mut topic = String::new();
            fields(payload, |_, envelope| {
                fields(envelope.bytes(), |field, value| {
                    if field == 3 {
                        topic = value.string()?;
                    }
                    Ok(())
                })
            })?;
            self.0.lock().expect("lock").push(topic);
            Ok(Vec::new())
        }
    }

    #[test]
    fn events_reach_the_socket_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("containerd.sock.ttrpc");
        let listener = UnixListener::bind(&path).expect("bind");
        let recorder = Arc::new(Recorder::default());
        let server = Arc::clone(&recorder);
        thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let _ = ttrpc::serve(stream, server);
        });
        let publisher =
            Publisher::start(Some(format!("unix://{}", path.display())), "default".into());
        publisher.publish(Event::Start {
            id: "c1".into(),
            pid: 7,
        });
        publisher.publish(Event::ExecAdded {
            id: "c1".into(),
            exec_id: "e1".into(),
        });
        publisher.flush(Duration::from_secs(10));
        assert_eq!(
            *recorder.0.lock().expect("lock"),
            ["/tasks/start", "/tasks/exec-added"]
        );
    }
}
