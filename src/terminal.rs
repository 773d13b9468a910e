//! The host terminal with `-t`: raw mode for the session, as `docker run -it` sets it
//! (cfmakeraw: keys such as Ctrl-C pass to the guest's terminal as bytes), restored on every
//! way out (the guard's drop, the hard-stop path, a panic), and the window size the guest's
//! terminal mirrors.

use std::io::{self, IsTerminal};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, Once};

use rustix::termios::{isatty, tcgetattr, tcgetwinsize, tcsetattr, OptionalActions, Termios};

/// A terminal's settings before raw mode, with its own handle so any thread can put them
/// back (settings belong to the terminal, not to a descriptor).
struct Saved {
    tty: OwnedFd,
    termios: Termios,
}

/// What [`restore`] puts back; `None` while no raw mode is active.
static SAVED: Mutex<Option<Saved>> = Mutex::new(None);

fn saved() -> MutexGuard<'static, Option<Saved>> {
    // The guarded value is replaced whole; a panic elsewhere cannot leave it torn.
    SAVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Raw mode on a terminal for as long as the guard lives. One at a time per process.
#[derive(Debug)]
pub struct RawMode(());

impl RawMode {
    /// Puts the terminal `fd` in raw mode; dropping the guard (or [`restore`]) undoes it.
    pub fn enter(fd: impl AsFd) -> io::Result<Self> {
        let tty = fd.as_fd().try_clone_to_owned()?;
        let termios = tcgetattr(&tty)?;
        let mut raw = termios.clone();
        raw.make_raw();
        install_panic_hook();
        let mut slot = saved();
        tcsetattr(&tty, OptionalActions::Now, &raw)?;
        *slot = Some(Saved { tty, termios });
        Ok(Self(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Gives the terminal back its settings from before [`RawMode::enter`]; does nothing when
/// none is in raw mode. Safe to call from any thread, any number of times.
pub fn restore() {
    if let Some(saved) = saved().take() {
        // Nothing better to do if the terminal is gone.
        let _ = tcsetattr(&saved.tty, OptionalActions::Now, &saved.termios);
    }
}

/// Restores the terminal before a panic's message is printed (a release build then aborts,
/// skipping every destructor, the guard's included).
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A panic while the lock is held must not deadlock here.
            if let Ok(mut slot) = SAVED.try_lock() {
                if let Some(saved) = slot.take() {
                    let _ = tcsetattr(&saved.tty, OptionalActions::Now, &saved.termios);
                }
            }
            previous(info);
        }));
    });
}

/// Whether katalite's stdin is a terminal (`-it` needs one, as with Docker).
pub fn stdin_is_terminal() -> bool {
    io::stdin().is_terminal()
}

/// The host terminal's size as (rows, columns): stdout's, as Docker takes it, else stdin's.
pub fn size() -> Option<(u16, u16)> {
    size_of(io::stdout()).or_else(|| size_of(io::stdin()))
}

/// The size of the terminal `fd`, `None` when it is not a terminal.
fn size_of(fd: impl AsFd) -> Option<(u16, u16)> {
    if !isatty(&fd) {
        return None;
    }
    tcgetwinsize(&fd).ok().map(|w| (w.ws_row, w.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use rustix::termios::{tcsetwinsize, LocalModes, Winsize};

    /// A pseudo-terminal pair: (master, slave).
    fn pty() -> (OwnedFd, OwnedFd) {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_string_lossy().as_ref())
            .expect("open the slave");
        (master, slave.into())
    }

    #[test]
    fn raw_mode_is_undone_by_the_guard_and_by_restore() {
        let (_master, slave) = pty();
        let canonical = |fd: &OwnedFd| {
            tcgetattr(fd)
                .expect("tcgetattr")
                .local_modes
                .contains(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG)
        };
        assert!(canonical(&slave));

        let guard = RawMode::enter(&slave).expect("raw");
        assert!(!canonical(&slave));
        drop(guard);
        assert!(canonical(&slave));

        // The hard-stop path restores while the guard still lives; the guard then finds
        // nothing left to do.
        let guard = RawMode::enter(&slave).expect("raw");
        restore();
        assert!(canonical(&slave));
        drop(guard);
        assert!(canonical(&slave));
    }

    #[test]
    fn size_is_read_from_the_terminal() {
        let (master, slave) = pty();
        let size = Winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        tcsetwinsize(&master, size).expect("set size");
        assert_eq!(size_of(&slave), Some((33, 101)));
        let file = tempfile::tempfile().expect("temp file");
        assert_eq!(size_of(&file), None);
        assert!(RawMode::enter(&file).is_err(), "a file has no raw mode");
    }
}
