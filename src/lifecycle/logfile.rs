//! The workload's output in Docker's json-file log format: one JSON object per line
//! (`{"log":"up\n","stream":"stdout","time":"...Z"}`), split at newlines, rotated at
//! [`MAX_LOG_BYTES`] to `container.log.1` (one old file kept) so a chatty server cannot
//! fill the disk; and the reader behind `katalite logs` (tail, follow across rotation).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::time::Timestamp;

/// Size at which the log is rotated.
pub const MAX_LOG_BYTES: u64 = 10 << 20;

/// One log line as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The bytes, newline included when there was one (invalid UTF-8 replaced).
    pub log: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// When katalite received it, RFC 3339 with nanoseconds.
    pub time: String,
}

/// Which output stream of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Its stdout (or terminal).
    Stdout,
    /// Its stderr.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// The path of the rotated log beside `path`.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// An entry as written: borrowed, so logging a chunk copies its bytes only into the line.
#[derive(Serialize)]
struct EntryRef<'a> {
    log: &'a str,
    stream: &'a str,
    time: &'a str,
}

/// Encoded lines kept between writes above this capacity are freed: a burst of binary
/// output (six bytes per escaped control byte) must not pin its buffer for the VM's life.
const KEPT_LINE_CAPACITY: usize = 1 << 20;

/// The writing side: appends entries, rotating when the next one would pass the limit.
#[derive(Debug)]
pub struct JsonLog {
    path: PathBuf,
    file: File,
    size: u64,
    limit: u64,
    /// The lines being encoded, reused between writes (output arrives in 64 KiB frames,
    /// and growing a fresh buffer to fit each was a large part of logging's cost).
    lines: Vec<u8>,
}

impl JsonLog {
    /// Appends to `path` (created 0600), rotating at [`MAX_LOG_BYTES`].
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::with_limit(path, MAX_LOG_BYTES)
    }

    fn with_limit(path: &Path, limit: u64) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            limit,
            lines: Vec::new(),
        })
    }

    /// [`write_at`](Self::write_at), received now.
    #[cfg(test)]
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        self.write_at(stream, Timestamp::now(), data)
    }

    /// Logs `data` from `stream`, received at `time`: one entry per line, and one for a
    /// trailing partial line. The entries of one call go out in one write (a burst of short
    /// lines must not cost a syscall each), split only where the log rotates.
    pub fn write_at(&mut self, stream: Stream, time: Timestamp, data: &[u8]) -> io::Result<()> {
        let time = time.to_rfc3339();
        let mut lines = std::mem::take(&mut self.lines);
        lines.clear();
        let written = self.encode_and_write(stream, data, &time, &mut lines);
        if lines.capacity() <= KEPT_LINE_CAPACITY {
            self.lines = lines;
        }
        written
    }

    fn encode_and_write(
        &mut self,
        stream: Stream,
        data: &[u8],
        time: &str,
        lines: &mut Vec<u8>,
    ) -> io::Result<()> {
        for piece in data.split_inclusive(|&b| b == b'\n') {
            let text = String::from_utf8_lossy(piece);
            let entry = EntryRef {
                log: &text,
                stream: stream.as_str(),
                time,
            };
            let start = lines.len();
            serde_json::to_writer(&mut *lines, &entry)?;
            lines.push(b'\n');
            let line_len = (lines.len() - start) as u64;
            let pending = start as u64;
            if self.size + pending > 0 && self.size + pending + line_len > self.limit {
                self.file.write_all(&lines[..start])?;
                self.size += pending;
                lines.drain(..start);
                if self.size > 0 {
                    self.rotate()?;
                }
            }
        }
        self.file.write_all(lines)?;
        self.size += lines.len() as u64;
        Ok(())
    }

    /// Moves the log to `.1` (replacing the older one) and starts an empty one.
    fn rotate(&mut self) -> io::Result<()> {
        fs::rename(&self.path, rotated(&self.path))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Reads a log from its start (the rotated file first) and then whatever is appended,
/// following the writer across rotations.
pub struct LogReader {
    path: PathBuf,
    /// The file being read and its inode; `None` while the log does not exist yet.
    current: Option<(File, u64)>,
    /// Bytes of an entry not yet complete.
    partial: Vec<u8>,
}

impl LogReader {
    /// A reader of the log at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            current: None,
            partial: Vec::new(),
        }
    }

    /// Every complete entry written so far (the first call includes `.1`).
    pub fn read_all(&mut self) -> io::Result<Vec<LogEntry>> {
        let mut entries = Vec::new();
        if self.current.is_none() {
            if let Ok(mut old) = File::open(rotated(&self.path)) {
                self.read_from(&mut old, &mut entries)?;
                // A partial last line of the old file is complete by definition.
                self.partial.clear();
            }
        }
        loop {
            let Some((mut file, inode)) = self.current.take().or_else(|| self.open()) else {
                return Ok(entries);
            };
            // Stat before reading: if the log was rotated by then, everything written to
            // this file was written before the stat, so one more read finishes it.
            let now = fs::metadata(&self.path).map(|m| m.ino()).ok();
            self.read_from(&mut file, &mut entries)?;
            if now.is_some_and(|ino| ino != inode) {
                self.partial.clear();
                continue;
            }
            self.current = Some((file, inode));
            return Ok(entries);
        }
    }

    fn open(&self) -> Option<(File, u64)> {
        let file = File::open(&self.path).ok()?;
        let inode = file.metadata().ok()?.ino();
        Some((file, inode))
    }

    fn read_from(&mut self, file: &mut File, entries: &mut Vec<LogEntry>) -> io::Result<()> {
        file.read_to_end(&mut self.partial)?;
        let complete = self
            .partial
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        for line in self.partial[..complete].split(|&b| b == b'\n') {
            // Anything unreadable (a torn line after a crash) is skipped, as Docker does.
            if let Ok(entry) = serde_json::from_slice(line) {
                entries.push(entry);
            }
        }
        self.partial.drain(..complete);
        Ok(())
    }
}

/// The last `n` of `entries` (all with `None`).
pub fn tail(entries: &[LogEntry], n: Option<usize>) -> &[LogEntry] {
    match n {
        Some(n) => &entries[entries.len().saturating_sub(n)..],
        None => entries,
    }
}

/// Writes an entry's text to `out` (stdout entries) or `err`, prefixed with its time
/// when `timestamps`.
pub fn print(
    entry: &LogEntry,
    timestamps: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> io::Result<()> {
    let to: &mut dyn Write = if entry.stream == "stderr" { err } else { out };
    if timestamps {
        write!(to, "{} ", entry.time)?;
    }
    to.write_all(entry.log.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    #[test]
    fn entries_are_dockers_json_file_lines() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("container.log");
        let mut log = JsonLog::open(&path).expect("open");
        log.write(Stream::Stdout, b"up\ntwo\npart").expect("write");
        log.write(Stream::Stderr, b"oops\n").expect("write");
        let lines = lines(&path);
        let logs: Vec<_> = lines
            .iter()
            .map(|l| l["log"].as_str().expect("log"))
            .collect();
        assert_eq!(logs, ["up\n", "two\n", "part", "oops\n"]);
        assert_eq!(lines[3]["stream"], "stderr");
        assert_eq!(lines[0]["stream"], "stdout");
        let time = lines[0]["time"].as_str().expect("time");
        assert!(Timestamp::parse(time).is_some(), "{time}");
        let mode = fs::metadata(&path).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_log_rotates_and_keeps_one_old_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("container.log");
        let mut log = JsonLog::with_limit(&path, 300).expect("open");
        for i in 0..40 {
            log.write(Stream::Stdout, format!("line {i}\n").as_bytes())
                .expect("write");
        }
        assert!(fs::metadata(&path).expect("stat").len() <= 300);
        assert!(fs::metadata(rotated(&path)).expect("stat").len() <= 300);
        assert!(!tmp.path().join("container.log.2").exists());
        let entries = LogReader::new(&path).read_all().expect("read");
        let last = entries.last().expect("entries");
        assert_eq!(last.log, "line 39\n");
        // Consecutive lines survive, ending with the newest; the oldest are gone.
        assert!(entries.len() < 40 && entries.len() > 2);
        let first: usize = entries[0].log[5..].trim().parse().expect("number");
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(entry.log, format!("line {}\n", first + i));
        }
    }

    #[test]
    fn the_reader_follows_appends_partial_lines_and_rotation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("container.log");
        let mut reader = LogReader::new(&path);
        assert!(reader.read_all().expect("no log yet").is_empty());
        let mut log = JsonLog::with_limit(&path, 200).expect("open");
        log.write(Stream::Stdout, b"a\n").expect("write");
        assert_eq!(reader.read_all().expect("read").len(), 1);
        // Half an entry is held back until its newline arrives.
        let mut raw = open_append(&path).expect("open");
        raw.write_all(br#"{"log":"b\n","stream":"stdout","#)
            .expect("write");
        assert!(reader.read_all().expect("read").is_empty());
        raw.write_all(b"\"time\":\"2024-01-01T00:00:00.000000000Z\"}\n")
            .expect("write");
        let got = reader.read_all().expect("read");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].log, "b\n");
        drop(raw);
        let mut log = JsonLog::with_limit(&path, 200).expect("reopen");
        let mut written = 0;
        let mut read = 0;
        for i in 0..20 {
            log.write(Stream::Stderr, format!("x{i}\n").as_bytes())
                .expect("write");
            written += 1;
            if i % 2 == 0 {
                read += reader.read_all().expect("read").len();
            }
        }
        read += reader.read_all().expect("read").len();
        assert_eq!(read, written, "every entry read once across rotations");
    }

    #[test]
    fn tail_and_print_split_the_streams() {
        let entry = |log: &str, stream: &str| LogEntry {
            log: log.into(),
            stream: stream.into(),
            time: "2024-01-01T00:00:00.000000001Z".into(),
        };
        let entries = [
            entry("1\n", "stdout"),
            entry("2\n", "stderr"),
            entry("3\n", "stdout"),
        ];
        assert_eq!(tail(&entries, Some(2)), &entries[1..]);
        assert_eq!(tail(&entries, Some(0)), &[]);
        assert_eq!(tail(&entries, Some(9)).len(), 3);
        assert_eq!(tail(&entries, None).len(), 3);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for e in &entries {
            print(e, false, &mut out, &mut err).expect("print");
        }
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"1\n3\n"[..], &b"2\n"[..])
        );
        let mut out = Vec::new();
        print(&entries[0], true, &mut out, &mut Vec::new()).expect("print");
        assert_eq!(out, b"2024-01-01T00:00:00.000000001Z 1\n");
    }
}
