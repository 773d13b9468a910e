//! The L1 serial console: separates boot noise, the command's output and the init's markers.
//!
//! The lab's init prints `@@lab:TOKEN:start@@` before the command, `@@lab:TOKEN:exit:N@@`
//! after it and `@@lab:TOKEN:error:MSG@@` when it cannot set up; TOKEN is fresh per run so
//! output that merely quotes a marker (say, `cat /init`) is not taken for one.

use std::io::{self, Write};

/// A marker line printed by the lab's init.
#[derive(Debug, PartialEq, Eq)]
pub enum Marker {
    /// Setup is done; the command starts now.
    Start,
    /// The command exited with this status.
    Exit(i32),
    /// Setup failed; the init says why.
    Error(String),
}

/// Splits one console line into the text before a marker and the marker, if there is one.
///
/// The marker may follow output that did not end with a newline, so it is looked for
/// anywhere in the line. A malformed marker is treated as plain output.
pub fn parse_line<'a>(line: &'a str, token: &str) -> (&'a str, Option<Marker>) {
    let prefix = format!("@@lab:{token}:");
    let Some(at) = line.find(&prefix) else {
        return (line, None);
    };
    let body = &line[at + prefix.len()..];
    let Some(body) = body.strip_suffix("@@") else {
        return (line, None);
    };
    let marker = if body == "start" {
        Marker::Start
    } else if let Some(status) = body.strip_prefix("exit:") {
        match status.parse() {
            Ok(status) => Marker::Exit(status),
            Err(_) => return (line, None),
        }
    } else if let Some(message) = body.strip_prefix("error:") {
        Marker::Error(message.to_owned())
    } else {
        return (line, None);
    };
    (&line[..at], Some(marker))
}

/// How a lab run ended, as far as the console tells.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The command ran and exited with this status.
    Exited(i32),
    /// The init reported a setup error.
    SetupFailed(String),
}

/// Follows the console line by line: keeps the L1 boot log aside until the command starts,
/// then passes the command's output through.
pub struct Console<W> {
    token: String,
    out: W,
    started: bool,
    boot_log: Vec<String>,
}

impl<W: Write> Console<W> {
    /// A console for the run with `token`, writing the command's output to `out`.
    pub fn new(token: &str, out: W) -> Self {
        Self {
            token: token.to_owned(),
            out,
            started: false,
            boot_log: Vec::new(),
        }
    }

    /// Takes one raw console line (serial `\r\n` line ends allowed); returns the ending once
    /// a final marker arrives.
    pub fn feed(&mut self, raw: &[u8]) -> io::Result<Option<Ending>> {
        let text = String::from_utf8_lossy(raw);
        let line = text.trim_end_matches(['\r', '\n']);
        let (before, marker) = parse_line(line, &self.token);
        let ending = match marker {
            None => {
                self.emit(before, raw.ends_with(b"\n"))?;
                None
            }
            Some(marker) => {
                self.emit(before, false)?;
                match marker {
                    Marker::Start => {
                        self.started = true;
                        None
                    }
                    Marker::Exit(status) => Some(Ending::Exited(status)),
                    Marker::Error(message) => Some(Ending::SetupFailed(message)),
                }
            }
        };
        self.out.flush()?;
        Ok(ending)
    }

    /// Whether the command has started (the start marker was seen).
    pub fn started(&self) -> bool {
        self.started
    }

    /// What L1 printed before the command started (its kernel's and init's messages).
    pub fn boot_log(&self) -> &[String] {
        &self.boot_log
    }

    fn emit(&mut self, text: &str, newline: bool) -> io::Result<()> {
        if !self.started {
            if !text.is_empty() {
                self.boot_log.push(text.to_owned());
            }
            return Ok(());
        }
        self.out.write_all(text.as_bytes())?;
        if newline {
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_recognised_with_their_payload() {
        assert_eq!(
            parse_line("@@lab:t1:start@@", "t1"),
            ("", Some(Marker::Start))
        );
        assert_eq!(
            parse_line("@@lab:t1:exit:42@@", "t1"),
            ("", Some(Marker::Exit(42)))
        );
        assert_eq!(
            parse_line("@@lab:t1:error:insmod kvm failed@@", "t1"),
            ("", Some(Marker::Error("insmod kvm failed".into())))
        );
    }

    #[test]
    fn marker_after_unterminated_output_keeps_the_output() {
        assert_eq!(
            parse_line("no newline@@lab:t1:exit:0@@", "t1"),
            ("no newline", Some(Marker::Exit(0)))
        );
    }

    #[test]
    fn other_tokens_and_malformed_markers_are_output() {
        let quoted = "echo @@lab:old:exit:3@@";
        assert_eq!(parse_line(quoted, "t1"), (quoted, None));
        let bad_status = "@@lab:t1:exit:x@@";
        assert_eq!(parse_line(bad_status, "t1"), (bad_status, None));
        let unknown = "@@lab:t1:bogus@@";
        assert_eq!(parse_line(unknown, "t1"), (unknown, None));
        let unterminated = "@@lab:t1:exit:1";
        assert_eq!(parse_line(unterminated, "t1"), (unterminated, None));
    }

    #[test]
    fn boot_noise_is_held_back_and_command_output_passes_through() {
        let mut out = Vec::new();
        let mut console = Console::new("t1", &mut out);
        assert_eq!(console.feed(b"[    1.0] kernel noise\r\n").ok(), Some(None));
        assert!(!console.started());
        assert_eq!(console.feed(b"@@lab:t1:start@@\r\n").ok(), Some(None));
        assert!(console.started());
        assert_eq!(console.feed(b"hello\r\n").ok(), Some(None));
        assert_eq!(
            console.feed(b"partial@@lab:t1:exit:7@@\r\n").ok(),
            Some(Some(Ending::Exited(7)))
        );
        assert_eq!(console.boot_log(), ["[    1.0] kernel noise".to_owned()]);
        drop(console);
        assert_eq!(String::from_utf8_lossy(&out), "hello\npartial");
    }

    #[test]
    fn setup_error_ends_the_run() {
        let mut console = Console::new("t1", Vec::new());
        let ending = console.feed(b"@@lab:t1:error:/dev/kvm missing@@\r\n").ok();
        assert_eq!(
            ending,
            Some(Some(Ending::SetupFailed("/dev/kvm missing".into())))
        );
        assert!(!console.started());
    }
}
