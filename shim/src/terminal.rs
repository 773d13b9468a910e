//! Terminals: katalite-runc sends the pseudo-terminal's master over a console socket (runc's
//! protocol, SCM_RIGHTS); the shim copies the client's stdin FIFO into it and its output to
//! the stdout FIFO, and applies `ResizePty`.

use std::fs::{self, File};
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// Where console sockets are made (short enough for a socket path, katalite's own).
const DIR: &str = "/run/containerd/katalite";
const POLL: Duration = Duration::from_millis(10);

/// A listening console socket, removed when dropped.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// A new socket.
    pub fn new() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        fs::create_dir_all(DIR)?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("{DIR}/console-{}-{n}.sock", std::process::id()));
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(Self { path, listener })
    }

    /// The path to pass as `--console-socket`.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The master `child` sends; None if it exits without sending one.
    pub fn receive(&self, child: &mut Child) -> io::Result<Option<File>> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    return receive_fd(&stream).map(Some);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if child.try_wait()?.is_some() {
                        return Ok(None);
                    }
                    thread::sleep(POLL);
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn receive_fd(stream: &std::os::unix::net::UnixStream) -> io::Result<File> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut name = [0u8; 256];
    rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut name)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let fd = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    fd.map(File::from).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no terminal on the console socket",
        )
    })
}

/// A process's terminal, being copied.
pub struct Console {
    master: File,
    output_done: std::sync::Mutex<Receiver<()>>,
}

impl Console {
    /// Copies `stdin` into `master` and `master` out to `stdout` on threads of their own.
    pub fn start(master: File, stdin: Option<File>, stdout: Option<File>) -> io::Result<Self> {
        if let Some(mut stdin) = stdin {
            let mut input = master.try_clone()?;
            thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || io::copy(&mut stdin, &mut input))?;
        }
        let (done, output_done) = mpsc::channel();
        let mut output = master.try_clone()?;
        thread::Builder::new().stack_size(64 << 10).spawn(move || {
            // Ends with EIO once the process and everything holding the slave are gone.
            match stdout {
                Some(mut stdout) => drop(io::copy(&mut output, &mut stdout)),
                None => drop(io::copy(&mut output, &mut io::sink())),
            }
            let _ = done.send(());
        })?;
        Ok(Self {
            master,
            output_done: std::sync::Mutex::new(output_done),
        })
    }

    /// Waits up to `timeout` for the output to be drained after the process exited.
    pub fn drain(&self, timeout: Duration) {
        if let Ok(done) = self.output_done.lock() {
            let _ = done.recv_timeout(timeout);
        }
    }

    /// Sets the window size (`width` columns by `height` rows).
    pub fn resize(&self, width: u16, height: u16) -> io::Result<()> {
        let size = rustix::termios::Winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&self.master, size).map_err(io::Error::from)
    }
}
