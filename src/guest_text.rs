//! Text the guest wrote, made safe for a host terminal: a hostile guest could otherwise
//! send escape sequences (retitle the window, rewrite earlier lines, hide text) or forge
//! katalite's own messages. Control characters and the Unicode format characters that
//! reorder text appear as escapes, and such lines are marked as the guest's.

use std::fmt::Write as _;
use std::io::{self, Write};

/// How katalite marks a line the guest wrote when it passes it on.
pub const GUEST_MARK: &str = "guest: ";

/// `bytes` as printable text: invalid UTF-8 as U+FFFD, tabs kept, other control characters
/// (C0, DEL, C1) as `\xNN`, and bidirectional overrides and zero-width marks as `\u{NNNN}`.
pub fn escape(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let code = u32::from(c);
        if c == '\t' {
            out.push(c);
        } else if c.is_control() {
            let _ = write!(out, "\\x{code:02x}");
        } else if is_reordering(code) {
            let _ = write!(out, "\\u{{{code:04x}}}");
        } else {
            out.push(c);
        }
    }
    out
}

/// Format characters that change how surrounding text is shown (Trojan Source, CVE-2021-42574).
fn is_reordering(code: u32) -> bool {
    matches!(code, 0x200b..=0x200f | 0x202a..=0x202e | 0x2066..=0x2069 | 0xfeff)
}

/// Longest line kept; the rest of a longer one is dropped.
const MAX_LINE: usize = 4096;

/// A writer that passes guest output on line by line, escaped (`--kernel-log`).
pub struct EscapedLines<W: Write> {
    out: W,
    line: Vec<u8>,
}

impl<W: Write> EscapedLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            line: Vec::new(),
        }
    }
}

impl<W: Write> Write for EscapedLines<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            if byte == b'\n' {
                writeln!(self.out, "{}", escape(&self.line))?;
                self.line.clear();
            } else if self.line.len() < MAX_LINE && byte != b'\r' {
                self.line.push(byte);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_reordering_characters_are_shown_not_obeyed() {
        assert_eq!(escape(b"plain text\tok"), "plain text\tok");
        assert_eq!(escape(b"\x1b]0;owned\x07"), "\\x1b]0;owned\\x07");
        assert_eq!(escape(b"a\rb\x7f"), "a\\x0db\\x7f");
        assert_eq!(escape("x\u{202e}y\u{9b}".as_bytes()), "x\\u{202e}y\\x9b");
        assert_eq!(escape(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
    }

    #[test]
    fn lines_are_escaped_as_they_complete() {
        let mut out = EscapedLines::new(Vec::new());
        out.write_all(b"[ 0.1] ok\r\n\x1b[2Jwiped").expect("write");
        assert_eq!(out.out, b"[ 0.1] ok\n");
        out.write_all(b"\n").expect("write");
        assert_eq!(out.out, b"[ 0.1] ok\n\\x1b[2Jwiped\n");
    }
}
