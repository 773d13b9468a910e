//! Boots L1 under QEMU TCG (emulated AMD-V, so `kvm-amd` works inside) and follows its serial
//! console until the init reports the command's exit status, with a hard timeout.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::console::{Console, Ending};
use super::stall::StallWatch;

/// L1's kernel command line: serial console, little kernel chatter, and an L1 panic ends
/// QEMU (`panic=1` reboots, `-no-reboot` turns that into an exit). Spectre mitigations only
/// slow the emulator down. SysRq lets a timeout ask L1 what it is stuck on.
const CMDLINE: &str = "console=ttyS0 quiet loglevel=1 panic=1 mitigations=off sysrq_always_enabled";

/// How long L1 gets to print its backtraces after a timeout.
const BACKTRACE_GRACE: Duration = Duration::from_secs(15);

/// How long QEMU may take to power off after the command finished.
const POWEROFF_GRACE: Duration = Duration::from_secs(60);

/// L1's memory in MiB unless `LAB_MEM` or the run says otherwise.
pub const DEFAULT_MEM_MIB: u32 = 2048;

/// The size and time limit of the L1 machine.
pub struct Machine {
    /// Virtual CPUs (`LAB_SMP`, default 2).
    pub smp: u32,
    /// Memory in MiB (`LAB_MEM`, default [`DEFAULT_MEM_MIB`]; more with `--runtimes`).
    pub mem_mib: u32,
    /// Whole-run limit (`LAB_TIMEOUT` seconds, default 2400).
    pub timeout: Duration,
}

impl Machine {
    /// Reads `LAB_SMP`, `LAB_MEM` (default `default_mem_mib`) and `LAB_TIMEOUT`.
    pub fn from_env(default_mem_mib: u32) -> Result<Self> {
        Ok(Self {
            smp: env_number("LAB_SMP", 2)?,
            mem_mib: env_number("LAB_MEM", default_mem_mib)?,
            timeout: Duration::from_secs(env_number("LAB_TIMEOUT", 2400)?.into()),
        })
    }
}

pub fn env_number(name: &str, default: u32) -> Result<u32> {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("{name}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

/// What to boot.
pub struct Boot<'a> {
    /// L1 kernel (bzImage, or ELF with a PVH note).
    pub kernel: &'a Path,
    /// L1 initramfs (base plus the run's archive).
    pub initrd: &'a Path,
    /// The repository, shared read-only as 9p tag `src`.
    pub repo: &'a Path,
    /// The run's marker token (see `console.rs`).
    pub token: &'a str,
    /// Where QEMU's human monitor listens (a Unix socket path).
    pub monitor: &'a Path,
    /// A raw ext4 image L1 mounts at /scratch: katalite's cache and the tests' temporary
    /// files live on disk there instead of in L1's RAM.
    pub scratch: &'a Path,
    /// The container engines' tree (`lab run --runtimes`), shared read-only as 9p tag
    /// `runtimes`.
    pub runtimes: Option<&'a Path>,
}

/// How a boot ended.
pub enum Outcome {
    /// The command ran; `ready` is when it started, `finished` when it exited.
    Exited {
        /// The command's exit status.
        status: i32,
        /// Time from QEMU's start to the command's start (L1 boot).
        ready: Duration,
        /// Time from QEMU's start to the command's exit.
        finished: Duration,
    },
    /// The lab did not deliver a status; `diagnostics` holds L1's boot log and QEMU's stderr.
    Failed {
        /// One line: what went wrong.
        reason: String,
        /// What may explain it.
        diagnostics: String,
    },
}

/// QEMU's arguments for `boot` on `machine`.
pub fn arguments(machine: &Machine, boot: &Boot) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-accel",
        "tcg,thread=multi",
        "-smp",
        &machine.smp.to_string(),
        "-cpu",
        "EPYC",
        "-m",
        &machine.mem_mib.to_string(),
        "-nodefaults",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-append",
        CMDLINE,
        "-netdev",
        // Not QEMU's default 10.0.2.0/24, which is the plan of katalite's guests: inside
        // them the outer host must be an ordinary outside address (10.0.3.2), reached
        // through L1's gateway, not their own gateway 10.0.2.2.
        "user,id=n0,net=10.0.3.0/24",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.extend(["-kernel".into(), boot.kernel.into()]);
    args.extend(["-initrd".into(), boot.initrd.into()]);
    args.extend(["-virtfs".into(), virtfs(boot.repo, "src")]);
    args.extend(["-virtfs".into(), virtfs(Path::new("/"), "host")]);
    if let Some(runtimes) = boot.runtimes {
        args.extend(["-virtfs".into(), virtfs(runtimes, "runtimes")]);
    }
    // cache=unsafe: the image is thrown away with the run, so flushes need not reach disk.
    let scratch = boot.scratch.to_string_lossy().replace(',', ",,");
    let drive = format!("file={scratch},if=none,id=scratch,format=raw,cache=unsafe");
    args.extend(["-drive".into(), drive.into()]);
    args.extend(["-device".into(), "virtio-blk-pci,drive=scratch".into()]);
    let mut monitor = OsString::from("unix:");
    monitor.push(boot.monitor);
    monitor.push(",server=on,wait=off");
    args.extend(["-monitor".into(), monitor]);
    args
}

/// Types magic SysRq keys on L1's PS/2 keyboard through the QEMU monitor: `9` raises the
/// console log level so the dumps reach the serial console, `w` lists blocked tasks, `l`
/// shows every CPU's backtrace. A timed-out run then leaves evidence of where L1 hung.
/// Interrupts may be off in a hung L1, so the vCPU registers (RIP, CR3) come along too:
/// match RIP against L1's `/proc/kallsyms` (no KASLR under PVH boot).
fn request_backtraces(monitor: &Path) -> io::Result<Vec<String>> {
    let mut socket = UnixStream::connect(monitor)?;
    for key in ["9", "w", "l"] {
        writeln!(socket, "sendkey alt-sysrq-{key}")?;
        // Let the key's handler run before the next one.
        thread::sleep(Duration::from_millis(500));
    }
    writeln!(socket, "info registers -a")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reply = Vec::new();
    // The monitor never closes the connection; the read timeout ends the reply.
    let _ = socket.read_to_end(&mut reply);
    Ok(vcpu_summary(&String::from_utf8_lossy(&reply)))
}

/// The lines of `info registers -a` that locate each vCPU: its number, RIP and flags, CR3.
fn vcpu_summary(reply: &str) -> Vec<String> {
    reply
        .lines()
        .map(str::trim)
        .filter(|line| {
            line.starts_with("CPU#") || line.starts_with("RIP=") || line.starts_with("CR0=")
        })
        .map(str::to_owned)
        .collect()
}

/// A read-only 9p export; `multidevs=remap` keeps inode numbers unique when the export
/// spans several host file systems (always the case for `/`).
fn virtfs(path: &Path, tag: &str) -> OsString {
    // QEMU option values escape a comma by doubling it.
    let path = path.to_string_lossy().replace(',', ",,");
    format!("local,path={path},mount_tag={tag},security_model=none,readonly=on,multidevs=remap")
        .into()
}

/// Boots L1, streams the command's output to stdout and waits for the exit marker.
pub fn run(machine: &Machine, boot: &Boot) -> Result<Outcome> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(arguments(machine, boot))
        // L1's serial console input: only the stall watch types on it.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let serial = child.stdin.take().context("qemu has no stdin")?;
    let _stall_watch = StallWatch::start(child.id(), boot.monitor.to_path_buf(), serial);
    let stdout = child.stdout.take().context("qemu has no stdout")?;
    let mut stderr = child.stderr.take().context("qemu has no stderr")?;
    let (lines, received) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if lines.send(line).is_err() => break,
                Ok(_) => {}
            }
        }
    });
    let errors = thread::spawn(move || {
        let mut text = Vec::new();
        // Whatever was read before an error is still worth showing.
        let _ = stderr.read_to_end(&mut text);
        text
    });

    let mut console = Console::new(boot.token, io::stdout().lock());
    let mut ready = None;
    let mut deadline = started + machine.timeout;
    let mut backtraces_requested = false;
    let ending = loop {
        match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let ending = console.feed(&line).context("cannot write the output")?;
                if ready.is_none() && console.started() {
                    ready = Some(started.elapsed());
                }
                if let Some(ending) = ending {
                    break Ok(ending);
                }
            }
            Err(RecvTimeoutError::Timeout) if !backtraces_requested => {
                backtraces_requested = true;
                deadline = Instant::now() + BACKTRACE_GRACE;
                match request_backtraces(boot.monitor) {
                    Ok(vcpus) => eprintln!("lab: L1 vCPUs at the timeout:\n{}", vcpus.join("\n")),
                    Err(err) => eprintln!("lab: cannot ask L1 for backtraces: {err}"),
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                break Err(format!(
                    "lab timed out after {} s",
                    machine.timeout.as_secs()
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                break Err(if console.started() {
                    format!("L1 died while the command ran (qemu: {status})")
                } else {
                    format!("lab failed to start: L1 stopped before running the command (qemu: {status})")
                });
            }
        }
    };
    let finished = started.elapsed();
    // After a final marker L1 is powering off; otherwise there is nothing left to wait for.
    stop(
        &mut child,
        if ending.is_ok() {
            POWEROFF_GRACE
        } else {
            Duration::ZERO
        },
    );
    let boot_log = console.boot_log().join("\n");
    let stderr = String::from_utf8_lossy(&errors.join().unwrap_or_default())
        .lines()
        // `-cpu EPYC` names features TCG lacks; QEMU warns per vCPU, harmlessly.
        .filter(|line| !line.contains("TCG doesn't support requested feature"))
        .collect::<Vec<_>>()
        .join("\n");
    let diagnostics = format!("L1 console before the command:\n{boot_log}\nqemu stderr:\n{stderr}");
    Ok(match ending {
        Ok(Ending::Exited(status)) => Outcome::Exited {
            status,
            ready: ready.unwrap_or(finished),
            finished,
        },
        Ok(Ending::SetupFailed(message)) => Outcome::Failed {
            reason: format!("lab failed to start: {message}"),
            diagnostics,
        },
        Err(reason) => Outcome::Failed {
            reason,
            diagnostics,
        },
    })
}

/// Lets L1 power off by itself for `grace`, then kills QEMU.
fn stop(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => thread::sleep(Duration::from_millis(50)),
        }
    }
    // Killing an already exited child fails harmlessly.
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_summary_keeps_where_each_cpu_is() {
        let reply = "(qemu) info registers -a\r\n\r\nCPU#0\r\nRAX=0 RBX=1\r\n\
                     RIP=ffffffff81a5267b RFL=00000046 [---Z-P-] CPL=0\r\n\
                     CR0=80050033 CR2=0 CR3=000000000903e000 CR4=003506f0\r\n\
                     YMM00=0\r\n\r\nCPU#1\r\nRIP=ffffffff81c00ba0 RFL=00000046\r\n";
        assert_eq!(
            vcpu_summary(reply),
            [
                "CPU#0",
                "RIP=ffffffff81a5267b RFL=00000046 [---Z-P-] CPL=0",
                "CR0=80050033 CR2=0 CR3=000000000903e000 CR4=003506f0",
                "CPU#1",
                "RIP=ffffffff81c00ba0 RFL=00000046",
            ]
        );
    }

    fn machine() -> Machine {
        Machine {
            smp: 3,
            mem_mib: 1024,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn arguments_size_the_machine_and_share_both_trees() {
        let boot = Boot {
            kernel: Path::new("/k/vmlinuz"),
            initrd: Path::new("/k/l1.cpio"),
            repo: Path::new("/work/a,b"),
            token: "t",
            monitor: Path::new("/tmp/m.sock"),
            scratch: Path::new("/tmp/s,1.img"),
            runtimes: None,
        };
        let args: Vec<String> = arguments(&machine(), &boot)
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| -> Vec<&str> {
            args.windows(2)
                .filter(|pair| pair[0] == flag)
                .map(|pair| pair[1].as_str())
                .collect()
        };
        assert_eq!(after("-smp"), ["3"]);
        assert_eq!(after("-m"), ["1024"]);
        assert_eq!(after("-cpu"), ["EPYC"]);
        assert_eq!(after("-kernel"), ["/k/vmlinuz"]);
        assert_eq!(after("-initrd"), ["/k/l1.cpio"]);
        let shares = after("-virtfs");
        assert_eq!(shares.len(), 2);
        assert!(shares[0].starts_with("local,path=/work/a,,b,mount_tag=src,"));
        assert!(shares[1].starts_with("local,path=/,mount_tag=host,"));
        assert!(shares.iter().all(|share| share.contains("readonly=on")));
        assert_eq!(after("-monitor"), ["unix:/tmp/m.sock,server=on,wait=off"]);
        assert_eq!(
            after("-drive"),
            ["file=/tmp/s,,1.img,if=none,id=scratch,format=raw,cache=unsafe"]
        );
        assert_eq!(after("-device")[1], "virtio-blk-pci,drive=scratch");
        let engines = Boot {
            runtimes: Some(Path::new("/c/runtimes/root")),
            ..boot
        };
        let args: Vec<String> = arguments(&machine(), &engines)
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let shares: Vec<&String> = args
            .iter()
            .filter(|arg| arg.contains("mount_tag="))
            .collect();
        assert_eq!(shares.len(), 3);
        assert!(shares[2].starts_with("local,path=/c/runtimes/root,mount_tag=runtimes,"));
        assert!(shares[2].contains("readonly=on"));
    }
}
