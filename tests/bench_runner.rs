//! The lab half of `cargo xtask bench`: a small static program that runs inside L1, executes
//! the jobs of a plan written by xtask (ready-made argv lists), timestamps what the processes
//! print and when they exit, and prints one `@@bench:{json}` line per job. Beyond the network
//! job's HTTP checks and the memory search's bisection on exit statuses it interprets
//! nothing: marker parsing and statistics live in xtask, where they are unit-tested.

#[path = "bench_runner/net.rs"]
mod net;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Prefix of the result lines xtask looks for on the lab console.
const RESULT_PREFIX: &str = "@@bench:";

/// Output lines kept per sample (the probe lines come first; the rest is for diagnosis).
const MAX_LINES: usize = 40;

/// Characters kept per output line.
const MAX_LINE_CHARS: usize = 300;

/// Longest a single process may run before it is killed and its sample marked failed,
/// unless the job sets `timeout_s`.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(600);

/// How often exits are polled; small against boot times of seconds.
const POLL: Duration = Duration::from_millis(2);

/// Capacity of a counted stdout pipe. QEMU writes its chardevs non-blocking and drops
/// what a full pipe refuses on a console port (`virtconsole`), so the pipe must absorb
/// the moments this runner is not scheduled; every VMM gets the same pipe.
const COUNTED_PIPE_BYTES: usize = 1 << 20;

fn main() {
    if let Err(err) = run() {
        eprintln!("bench-runner: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: bench_runner PLAN.json")?;
    let text = std::fs::read(&path).with_context(|| format!("cannot read {path}"))?;
    let plan: Value = serde_json::from_slice(&text).context("invalid plan")?;
    let jobs = plan["jobs"].as_array().context("the plan has no jobs")?;
    for job in jobs {
        let id = job["id"].as_str().context("a job has no id")?;
        let samples = run_job(id, job).with_context(|| format!("job {id}"))?;
        println!("{RESULT_PREFIX}{}", json!({ "id": id, "samples": samples }));
    }
    Ok(())
}

/// Runs one job `warmup + repeat` times and returns the samples after the warm-up.
fn run_job(id: &str, job: &Value) -> Result<Vec<Value>> {
    let argv: Vec<String> = serde_json::from_value(job["argv"].clone()).context("bad argv")?;
    if argv.is_empty() {
        bail!("empty argv");
    }
    let warmup = job["warmup"].as_u64().unwrap_or(0);
    let repeat = job["repeat"].as_u64().unwrap_or(1);
    let timeout = job["timeout_s"]
        .as_u64()
        .map_or(PROCESS_TIMEOUT, Duration::from_secs);
    let mut samples = Vec::new();
    for round in 0..warmup + repeat {
        eprintln!("bench-runner: {id} {}/{}", round + 1, warmup + repeat);
        let sample = match job["kind"].as_str() {
            Some("timed") => timed(&argv, false, timeout)?,
            Some("throughput") => timed(&argv, true, timeout)?,
            Some("memory") => memory(
                &argv,
                job["trigger"]
                    .as_str()
                    .context("memory job without trigger")?,
                Duration::from_millis(job["settle_ms"].as_u64().unwrap_or(500)),
                timeout,
            )?,
            Some("parallel") => parallel(&argv, job["count"].as_u64().unwrap_or(1))?,
            Some("min_memory") => min_memory(&argv, &candidates(job)?, timeout)?,
            Some("network") => net::network(&argv, job)?,
            other => bail!("unknown job kind {other:?}"),
        };
        if round >= warmup {
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// Milliseconds since `start`, rounded to microseconds.
fn ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// One timestamped output line.
struct Line {
    at_ms: f64,
    text: String,
}

/// Forwards `stream` line by line, timestamped against `start`.
fn read_lines(stream: impl Read + Send + 'static, start: Instant, lines: Sender<Line>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let at_ms = ms(start);
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim_end_matches(['\r', '\n']);
            let text: String = text.chars().take(MAX_LINE_CHARS).collect();
            if lines.send(Line { at_ms, text }).is_err() {
                break;
            }
            buf.clear();
        }
    });
}

/// Byte count of a stream and when its first and last bytes arrived.
#[derive(Default)]
struct Volume {
    bytes: u64,
    first_ms: Option<f64>,
    last_ms: Option<f64>,
}

/// Counts `stream` to end of file, as a fast sink would.
fn count_bytes(mut stream: impl Read + Send + 'static, start: Instant) -> Receiver<Volume> {
    let (done, result) = mpsc::channel();
    thread::spawn(move || {
        let mut volume = Volume::default();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            let now = ms(start);
            volume.first_ms.get_or_insert(now);
            volume.last_ms = Some(now);
            volume.bytes += n as u64;
        }
        let _ = done.send(volume);
    });
    result
}

fn spawn(argv: &[String], stdout: Stdio, stderr: Stdio) -> Result<(Child, Instant)> {
    let start = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", argv[0]))?;
    Ok((child, start))
}

/// Waits for `child` until `deadline`, killing it then; returns its status (None if killed).
fn wait(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait().context("cannot wait")? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

fn code(status: Option<ExitStatus>) -> Value {
    status
        .and_then(|s| s.code())
        .map_or(Value::Null, Value::from)
}

/// Runs `argv` once: every output line timestamped (or, with `count_stdout`, stdout only
/// counted), and the exit time, all in ms since just before the spawn.
fn timed(argv: &[String], count_stdout: bool, timeout: Duration) -> Result<Value> {
    let (mut child, start) = spawn(argv, Stdio::piped(), Stdio::piped())?;
    let (sender, lines) = mpsc::channel();
    let stdout = child.stdout.take().context("no stdout")?;
    let volume = if count_stdout {
        // Best effort: a smaller pipe only makes a dropping VMM fail its byte count.
        let _ = rustix::pipe::fcntl_setpipe_size(&stdout, COUNTED_PIPE_BYTES);
        Some(count_bytes(stdout, start))
    } else {
        read_lines(stdout, start, sender.clone());
        None
    };
    read_lines(child.stderr.take().context("no stderr")?, start, sender);
    let status = wait(&mut child, start + timeout)?;
    let exit_ms = ms(start);
    // The readers end at end of file, which follows the exit (no grandchildren hold pipes).
    let lines: Vec<Value> = lines
        .iter()
        .take(MAX_LINES)
        .map(|line| json!([line.at_ms, line.text]))
        .collect();
    let mut sample = json!({ "status": code(status), "exit_ms": exit_ms, "lines": lines });
    if let Some(volume) = volume {
        let volume = volume.recv().unwrap_or_default();
        sample["stdout_bytes"] = volume.bytes.into();
        sample["first_byte_ms"] = volume.first_ms.into();
        sample["last_byte_ms"] = volume.last_ms.into();
    }
    Ok(sample)
}

/// Runs `argv` and, `settle` after a stderr line containing `trigger`, reads the process's
/// `/proc/PID/status` (its `Vm*` and `Rss*` lines) and the size and resident size of every mapping
/// in `/proc/PID/smaps` (kB each).
fn memory(argv: &[String], trigger: &str, settle: Duration, timeout: Duration) -> Result<Value> {
    let (mut child, start) = spawn(argv, Stdio::null(), Stdio::piped())?;
    let (sender, lines) = mpsc::channel();
    read_lines(child.stderr.take().context("no stderr")?, start, sender);
    let deadline = start + timeout;
    let triggered = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.text.contains(trigger) => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    let mut sample = json!({ "triggered": triggered });
    if triggered {
        thread::sleep(settle);
        let proc = format!("/proc/{}", child.id());
        let status = std::fs::read_to_string(format!("{proc}/status")).unwrap_or_default();
        let vm: Vec<&str> = status
            .lines()
            .filter(|l| l.starts_with("Vm") || l.starts_with("Rss"))
            .collect();
        let smaps = std::fs::read_to_string(format!("{proc}/smaps")).unwrap_or_default();
        sample["proc_status"] = vm.join("\n").into();
        sample["mappings"] = mappings(&smaps).into();
    }
    sample["status"] = code(wait(&mut child, deadline)?);
    Ok(sample)
}

/// `[size_kb, rss_kb, start_kb]` of each mapping, from the `Size:` and `Rss:` fields of
/// smaps and the start address of its header line (in KiB: mappings are page-aligned, and
/// the number stays exact in JSON). The start lets xtask join the pieces of guest RAM that
/// another mapping split (the kernel's segments are mapped over it from a file).
fn mappings(smaps: &str) -> Vec<Value> {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.strip_prefix(name)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    // A header line: `start-end perms offset dev inode [path]`.
    let start_kb = |line: &str| -> Option<u64> {
        let (start, rest) = line.split_once('-')?;
        rest.split_once(' ')?;
        u64::from_str_radix(start, 16).ok().map(|at| at / 1024)
    };
    let mut out = Vec::new();
    let (mut start, mut size) = (None, None);
    for line in smaps.lines() {
        if let Some(kb) = field(line, "Size:") {
            size = Some(kb);
        } else if let Some(rss) = field(line, "Rss:") {
            if let (Some(kb), Some(at)) = (size.take(), start) {
                out.push(json!([kb, rss, at]));
            }
        } else if let Some(at) = start_kb(line) {
            start = Some(at);
        }
    }
    out
}

/// A `min_memory` job's `candidates_mib`, ascending and not empty.
fn candidates(job: &Value) -> Result<Vec<u64>> {
    let list: Vec<u64> = serde_json::from_value(job["candidates_mib"].clone())
        .context("min_memory job without candidates_mib")?;
    if list.is_empty() || list.windows(2).any(|w| w[0] >= w[1]) {
        bail!("candidates_mib must be ascending and not empty: {list:?}");
    }
    Ok(list)
}

/// Finds the smallest of `candidates` (MiB, ascending) with which `argv` exits 0, each
/// `{memory}` in it replaced by the size: the largest first (if it fails, so would all, as
/// more memory never hurts), then bisection. Every try is a `timed` sample plus its
/// `memory_mib`, in order; xtask picks the answer.
fn min_memory(argv: &[String], candidates: &[u64], timeout: Duration) -> Result<Value> {
    let mut attempts = Vec::new();
    let mut passes = |mib: u64| -> Result<bool> {
        let argv: Vec<String> = argv
            .iter()
            .map(|arg| arg.replace("{memory}", &mib.to_string()))
            .collect();
        let mut sample = timed(&argv, false, timeout)?;
        let passed = sample["status"] == 0;
        sample["memory_mib"] = mib.into();
        attempts.push(sample);
        Ok(passed)
    };
    let (mut low, mut high) = (0, candidates.len() - 1);
    if passes(candidates[high])? {
        // candidates[high] passes; find the first that does in [low, high].
        while low < high {
            let mid = (low + high) / 2;
            if passes(candidates[mid])? {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
    }
    Ok(json!({ "attempts": attempts }))
}

/// Starts `count` copies of `argv` at once and returns each status, the stderr of those
/// that failed, and the wall time until the last one exited.
fn parallel(argv: &[String], count: u64) -> Result<Value> {
    let start = Instant::now();
    let mut children = Vec::new();
    let mut outputs = Vec::new();
    for _ in 0..count {
        let (mut child, _) = spawn(argv, Stdio::null(), Stdio::piped())?;
        let (sender, lines) = mpsc::channel();
        read_lines(child.stderr.take().context("no stderr")?, start, sender);
        children.push(Some(child));
        outputs.push(lines);
    }
    let deadline = start + PROCESS_TIMEOUT;
    let mut statuses = vec![Value::Null; children.len()];
    // Why a VM without an exit code ended: a signal (the OOM killer's SIGKILL) or the timeout.
    let mut endings = vec![String::new(); children.len()];
    while children.iter().any(Option::is_some) {
        for ((slot, status), ending) in children.iter_mut().zip(&mut statuses).zip(&mut endings) {
            let Some(child) = slot else { continue };
            if let Some(exited) = child.try_wait().context("cannot wait")? {
                *status = code(Some(exited));
                if let Some(signal) = exited.signal() {
                    *ending = format!("killed by signal {signal}");
                }
                *slot = None;
            } else if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                *ending = format!("still running after {} s", PROCESS_TIMEOUT.as_secs());
                *slot = None;
            }
        }
        thread::sleep(POLL);
    }
    let wall_ms = ms(start);
    let failures: Vec<Value> = statuses
        .iter()
        .zip(outputs)
        .zip(endings)
        .filter(|((status, _), _)| status.as_i64() != Some(0))
        .map(|((status, lines), ending)| {
            let mut text: Vec<String> = lines.iter().take(MAX_LINES).map(|l| l.text).collect();
            text.push(if ending.is_empty() {
                format!("exit status {status}")
            } else {
                ending
            });
            Value::from(text.join("\n"))
        })
        .collect();
    Ok(json!({ "statuses": statuses, "wall_ms": wall_ms, "failures": failures }))
}
