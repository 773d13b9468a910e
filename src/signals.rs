//! Signals sent to `katalite run` become Signal frames for the workload, as `docker run`
//! proxies them; SIGWINCH becomes a Resize frame with `-t`. A second SIGTERM/SIGINT, or
//! the stop timeout after the first, gives up on the guest: katalite ends the VM itself
//! (exit 137, as Docker reports a killed container).

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use guest_init::channel::Message;

use crate::confine::{self, Role};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::{Handle, Signals};

use crate::terminal;

/// The signals forwarded to the workload (Docker forwards these and more; these are the
/// ones people send).
pub const FORWARDED: [i32; 6] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// What to do about one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Pass it to the workload.
    Forward,
    /// Pass it to the workload and start the stop timeout.
    ForwardAndArm,
    /// The user insists: end the VM now.
    Kill,
}

/// Which signal asks for what: the first SIGTERM or SIGINT is forwarded and arms the
/// timeout; the next one kills. Every other signal is only forwarded.
#[derive(Debug, Default)]
struct Policy {
    stopping: bool,
}

impl Policy {
    fn on(&mut self, signal: i32) -> Action {
        if signal != SIGTERM && signal != SIGINT {
            return Action::Forward;
        }
        if std::mem::replace(&mut self.stopping, true) {
            Action::Kill
        } else {
            Action::ForwardAndArm
        }
    }
}

/// The running forwarder: a `katalite-signals` thread reading the signals and a
/// `katalite-signal-send` thread that sends the messages, so a guest that is not ready or
/// not reading never delays a hard stop.
pub struct Forwarder {
    handle: Handle,
    threads: Vec<JoinHandle<()>>,
}

impl Forwarder {
    /// Catches [`FORWARDED`] (and SIGWINCH when `tty`) from now on. Messages, `first`
    /// ahead of them, go to `send` (which may block; false: the VM is gone); `kill` ends
    /// the VM, after `timeout` or on a second SIGTERM/SIGINT.
    pub fn start(
        tty: bool,
        timeout: Duration,
        first: Option<Message>,
        send: impl FnMut(Message) -> bool + Send + 'static,
        kill: impl Fn() + Send + Sync + Clone + 'static,
    ) -> io::Result<Self> {
        let mut signals = Signals::new(FORWARDED)?;
        if tty {
            signals.add_signal(SIGWINCH)?;
        }
        let handle = signals.handle();
        let (messages, queued) = mpsc::channel::<Message>();
        if let Some(message) = first {
            // The receiver is alive: it is only dropped with the sending thread below.
            let _ = messages.send(message);
        }
        let sender = std::thread::Builder::new()
            .name("katalite-signal-send".into())
            .stack_size(vmm::THREAD_STACK_BYTES)
            .spawn(move || {
                confine::enter(Role::Signals);
                send_all(&queued, send);
            })?;
        let reader = std::thread::Builder::new()
            .name("katalite-signals".into())
            .stack_size(vmm::THREAD_STACK_BYTES)
            .spawn(move || {
                confine::enter(Role::Signals);
                let mut policy = Policy::default();
                for signal in signals.forever() {
                    if signal == SIGWINCH {
                        if let Some((rows, cols)) = terminal::size() {
                            let _ = messages.send(Message::Resize { rows, cols });
                        }
                        continue;
                    }
                    match policy.on(signal) {
                        Action::Forward => {
                            let _ = messages.send(Message::Signal(signal));
                        }
                        Action::ForwardAndArm => {
                            let _ = messages.send(Message::Signal(signal));
                            arm(timeout, kill.clone());
                        }
                        Action::Kill => kill(),
                    }
                }
            });
        let reader = match reader {
            Ok(reader) => reader,
            Err(err) => {
                handle.close();
                return Err(err);
            }
        };
        Ok(Self {
            handle,
            threads: vec![reader, sender],
        })
    }

    /// Stops catching signals and joins the threads. Call it once `send` refuses (the VM
    /// has ended), so the sending thread is not blocked in it.
    pub fn stop(self) {
        self.handle.close();
        for thread in self.threads {
            // A panicked thread already reported itself; the run is over either way.
            let _ = thread.join();
        }
    }
}

/// Sends each message until the forwarder ends or the VM refuses input.
fn send_all(queued: &mpsc::Receiver<Message>, mut send: impl FnMut(Message) -> bool) {
    while let Ok(message) = queued.recv() {
        if !send(message) {
            return;
        }
    }
}

/// Calls `kill` after `timeout` on a `katalite-stop-timer` thread (never joined: the
/// process ends with the VM).
fn arm(timeout: Duration, kill: impl Fn() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("katalite-stop-timer".into())
        .stack_size(vmm::THREAD_STACK_BYTES)
        .spawn(move || {
            std::thread::sleep(timeout);
            kill();
        });
    // Without a timer only a second signal stops a guest that ignores the first.
    if spawned.is_err() {
        eprintln!("katalite: cannot start the stop timer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    #[test]
    fn the_second_term_or_int_kills_and_others_only_forward() {
        let mut policy = Policy::default();
        assert_eq!(policy.on(SIGUSR1), Action::Forward);
        assert_eq!(policy.on(SIGHUP), Action::Forward);
        assert_eq!(policy.on(SIGTERM), Action::ForwardAndArm);
        assert_eq!(policy.on(SIGQUIT), Action::Forward);
        assert_eq!(policy.on(SIGINT), Action::Kill);
        assert_eq!(policy.on(SIGTERM), Action::Kill);
        let mut policy = Policy::default();
        assert_eq!(policy.on(SIGINT), Action::ForwardAndArm);
    }

    /// Raises the test-only signals through the real handlers: SIGUSR1/SIGUSR2 are not
    /// used by the test harness, and once a handler is installed they cannot kill it.
    #[test]
    fn raised_signals_arrive_as_frames_in_order() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let kills = Arc::new(AtomicUsize::new(0));
        let forwarder = {
            let sent = sent.clone();
            let kills = kills.clone();
            Forwarder::start(
                false,
                Duration::from_secs(60),
                Some(Message::Resize { rows: 2, cols: 3 }),
                move |message| {
                    sent.lock().expect("lock").push(message);
                    true
                },
                move || {
                    kills.fetch_add(1, Ordering::SeqCst);
                },
            )
            .expect("start")
        };
        let expected = [
            Message::Resize { rows: 2, cols: 3 },
            Message::Signal(SIGUSR1),
            Message::Signal(SIGUSR2),
        ];
        let started = Instant::now();
        for (count, signal) in [SIGUSR1, SIGUSR2].into_iter().enumerate() {
            signal_hook::low_level::raise(signal).expect("raise");
            while sent.lock().expect("lock").len() <= count + 1 {
                assert!(started.elapsed() < Duration::from_secs(10), "no frame");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        forwarder.stop();
        assert_eq!(*sent.lock().expect("lock"), expected);
        assert_eq!(kills.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_timer_kills_after_the_timeout() {
        let (fired, fire) = mpsc::channel();
        let started = Instant::now();
        arm(Duration::from_millis(50), move || {
            let _ = fired.send(Instant::now());
        });
        let at = fire.recv_timeout(Duration::from_secs(10)).expect("fired");
        assert!(at - started >= Duration::from_millis(50));
    }

    #[test]
    fn sending_stops_when_the_vm_refuses() {
        let (messages, queued) = mpsc::channel();
        messages.send(Message::Signal(SIGTERM)).expect("queue");
        messages.send(Message::Signal(SIGHUP)).expect("queue");
        let mut calls = Vec::new();
        send_all(&queued, |message| {
            calls.push(message);
            false
        });
        assert_eq!(calls, [Message::Signal(SIGTERM)]);
    }
}
