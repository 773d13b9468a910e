//! User stories for `-t`: a session driven through a pseudo-terminal the test opens, as a
//! person at a terminal would drive `katalite run -it`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcgetattr, tcsetwinsize, LocalModes, Winsize};

use super::{rootfs, RUN_TIMEOUT};

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// `katalite run -it` (or any katalite command) with a pseudo-terminal as its stdin, stdout
/// and stderr; the test holds the master side, like a terminal emulator.
pub(super) struct Session {
    child: Child,
    master: std::fs::File,
    slave: Option<OwnedFd>,
    screen: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Session {
    /// `katalite run -it --rootfs <busybox> -- COMMAND` on a `rows`×`cols` terminal.
    fn start(rows: u16, cols: u16, command: &[&str]) -> Self {
        let mut katalite = Command::new("katalite");
        katalite
            .args(["run", "-it", "--rootfs", &rootfs("busybox"), "--"])
            .args(command);
        Self::spawn(rows, cols, katalite)
    }

    /// Spawns `katalite` (arguments and environment already set) on a `rows`×`cols`
    /// terminal.
    pub(super) fn spawn(rows: u16, cols: u16, mut katalite: Command) -> Self {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        tcsetwinsize(&master, winsize(rows, cols)).expect("set the size");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_string_lossy().as_ref())
            .expect("open the pty slave")
            .into();
        let stdio = || Stdio::from(slave.try_clone().expect("dup the slave"));
        let child = katalite
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .expect("katalite is on PATH");
        let master = std::fs::File::from(master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let mut master = master.try_clone().expect("dup the master");
            let screen = screen.clone();
            // Reads until the last slave descriptor closes (EIO).
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = master.read(&mut buf) {
                    screen.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
            })
        };
        Self {
            child,
            master,
            slave: Some(slave),
            screen,
            reader: Some(reader),
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().expect("lock")).into_owned()
    }

    pub(super) fn wait_for(&mut self, text: &str) {
        let started = Instant::now();
        while !self.screen().contains(text) {
            if started.elapsed() > RUN_TIMEOUT {
                let _ = self.child.kill();
                panic!("{text:?} never appeared; screen:\n{}", self.screen());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn type_bytes(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("type");
    }

    /// Whether the host terminal is back in canonical mode with echo and signals.
    fn host_terminal_restored(&self) -> bool {
        let slave = self.slave.as_ref().expect("slave open");
        let modes = tcgetattr(slave).expect("tcgetattr").local_modes;
        modes.contains(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG)
    }

    /// Waits for katalite to exit; returns its status and the whole screen.
    pub(super) fn finish(mut self) -> (Option<i32>, String, bool) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for katalite") {
                break status;
            }
            if started.elapsed() > RUN_TIMEOUT {
                let _ = self.child.kill();
                panic!("katalite did not exit; screen:\n{}", self.screen());
            }
            thread::sleep(Duration::from_millis(20));
        };
        let restored = self.host_terminal_restored();
        drop(self.slave.take());
        if let Some(reader) = self.reader.take() {
            reader.join().expect("screen reader");
        }
        (status.code(), self.screen(), restored)
    }
}

#[test]
fn a_terminal_session_has_a_tty_of_the_hosts_size() {
    let session = Session::start(33, 101, &["sh", "-c", "tty; stty size"]);
    let (status, screen, restored) = session.finish();
    assert_eq!(status, Some(0), "{screen}");
    assert!(screen.contains("/dev/pts/"), "{screen}");
    // The guest terminal turns newlines into CR LF, as any terminal does.
    assert!(screen.contains("33 101\r\n"), "{screen}");
    assert!(restored, "the host terminal was left in raw mode");
}

#[test]
fn typed_input_is_echoed_and_read_by_the_workload() {
    let mut session = Session::start(24, 80, &["sh", "-c", "echo ready; read x; echo got:$x"]);
    session.wait_for("ready");
    session.type_bytes(b"hello\r");
    let (status, screen, restored) = session.finish();
    assert_eq!(status, Some(0), "{screen}");
    // Echo comes from the guest's terminal: the host one is raw.
    assert!(screen.contains("hello\r\n"), "{screen}");
    assert!(screen.contains("got:hello"), "{screen}");
    assert!(restored);
}

#[test]
fn ctrl_c_reaches_the_workload_through_its_terminal() {
    let mut session = Session::start(24, 80, &["sh", "-c", "echo ready; sleep 1000"]);
    session.wait_for("ready");
    session.type_bytes(b"\x03");
    let (status, screen, restored) = session.finish();
    assert_eq!(status, Some(128 + 2), "{screen}");
    assert!(restored);
}

#[test]
fn resizing_the_host_terminal_resizes_the_guests() {
    let script = "echo ready; read x; stty size";
    let mut session = Session::start(24, 80, &["sh", "-c", script]);
    session.wait_for("ready");
    tcsetwinsize(&session.master, winsize(40, 120)).expect("resize");
    // A terminal emulator's kernel sends SIGWINCH to the foreground process group; katalite
    // is not a session leader here, so the test sends it.
    kill_process(Pid::from_child(&session.child), Signal::WINCH).expect("SIGWINCH");
    thread::sleep(Duration::from_secs(1));
    session.type_bytes(b"\r");
    let (status, screen, _) = session.finish();
    assert_eq!(status, Some(0), "{screen}");
    assert!(screen.contains("40 120\r\n"), "{screen}");
}
