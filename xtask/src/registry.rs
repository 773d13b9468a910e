//! `cargo xtask registry [start|stop]`: Debian's docker-registry serving the test images
//! (`cargo xtask images`) as library/busybox and library/nginx on 127.0.0.1:5000, and on
//! request a second instance with basic auth over TLS (a self-made CA) on 127.0.0.1:5443.
//! Both run in the background with their own config and storage outside the repository.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::images;

/// The user of the TLS instance.
const USER: &str = "katalite";

/// How long a registry may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `registry`.
#[derive(clap::Args)]
#[command(
    after_help = "The plain registry listens on http://127.0.0.1:5000 without auth. \
    With --tls-auth a second one listens on https://127.0.0.1:5443 with basic auth \
    (user `katalite`, a random password) and a certificate signed by a self-made CA; `start` \
    prints the CA path, user and password, which are also kept in \
    $KATALITE_REGISTRY_DIR/tls-auth/ (ca.crt, password). State, logs and storage live in \
    $KATALITE_REGISTRY_DIR (default /var/tmp/katalite-registry)."
)]
pub struct Args {
    /// What to do (default: start).
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Start the registry (if not running) and push the test images to it.
    Start {
        /// Also start the basic-auth-over-TLS instance on 127.0.0.1:5443 and push to it.
        #[arg(long)]
        tls_auth: bool,
    },
    /// Stop the registry.
    Stop {
        /// Also stop the TLS instance.
        #[arg(long)]
        tls_auth: bool,
    },
}

/// One registry process: its port and whether it uses TLS and basic auth.
struct Instance {
    name: &'static str,
    port: u16,
    tls: bool,
}

const PLAIN: Instance = Instance {
    name: "plain",
    port: 5000,
    tls: false,
};

const TLS_AUTH: Instance = Instance {
    name: "tls-auth",
    port: 5443,
    tls: true,
};

/// Runs `registry start` or `registry stop`.
pub fn run(args: &Args) -> Result<()> {
    match args.action {
        None => start(&[PLAIN]),
        Some(Action::Start { tls_auth: false }) => start(&[PLAIN]),
        Some(Action::Start { tls_auth: true }) => start(&[PLAIN, TLS_AUTH]),
        Some(Action::Stop { tls_auth }) => {
            stop(&PLAIN)?;
            if tls_auth {
                stop(&TLS_AUTH)?;
            }
            Ok(())
        }
    }
}

fn start(instances: &[Instance]) -> Result<()> {
    let mut packages = vec!["docker-registry", "skopeo"];
    if instances.iter().any(|i| i.tls) {
        packages.extend(["openssl", "apache2-utils"]);
    }
    images::ensure_packages(&packages)?;
    let images = images::build(false)?;
    for instance in instances {
        let dir = instance.dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let pid = match instance.pid()? {
            Some(pid) => {
                println!(
                    "registry: {} already running on port {}",
                    instance.name, instance.port
                );
                pid
            }
            None => {
                if instance.tls {
                    make_tls_material(&dir)?;
                }
                fs::write(dir.join("config.yml"), instance.config()?)
                    .context("cannot write the registry config")?;
                instance.spawn()?
            }
        };
        instance.wait_ready(pid)?;
        for name in ["busybox", "nginx"] {
            instance.push(&images.join(name), name)?;
        }
        instance.describe()?;
    }
    Ok(())
}

fn stop(instance: &Instance) -> Result<()> {
    let Some(pid) = instance.pid()? else {
        println!("registry: {} is not running", instance.name);
        return Ok(());
    };
    signal(pid, "TERM")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    if is_alive(pid) {
        signal(pid, "KILL")?;
    }
    let _ = fs::remove_file(instance.dir().join("registry.pid"));
    println!("registry: stopped {} (pid {pid})", instance.name);
    Ok(())
}

impl Instance {
    fn dir(&self) -> PathBuf {
        std::env::var_os("KATALITE_REGISTRY_DIR")
            .map_or_else(
                || PathBuf::from("/var/tmp/katalite-registry"),
                PathBuf::from,
            )
            .join(self.name)
    }

    /// docker-registry's YAML config; paths are written as JSON strings, which YAML reads
    /// as double-quoted scalars.
    fn config(&self) -> Result<String> {
        let dir = self.dir();
        let quoted =
            |name: &str| serde_json::to_string(&dir.join(name)).context("path is not UTF-8");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
            quoted("storage")?,
            self.port
        );
        if self.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    \
                 realm: katalite-test\n    path: {}\n",
                quoted("server.crt")?,
                quoted("server.key")?,
                quoted("htpasswd")?
            ));
        }
        Ok(config)
    }

    /// The pid of our running registry, if its pid file names a live docker-registry.
    fn pid(&self) -> Result<Option<u32>> {
        let Ok(text) = fs::read_to_string(self.dir().join("registry.pid")) else {
            return Ok(None);
        };
        let pid: u32 = text.trim().parse().context("corrupt registry.pid")?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains("docker-registry");
        Ok(ours.then_some(pid))
    }

    fn spawn(&self) -> Result<u32> {
        let dir = self.dir();
        let log =
            File::create(dir.join("registry.log")).context("cannot create the registry log")?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cannot share the log file")?)
            .stderr(log)
            // Its own process group: a Ctrl-C to xtask must not stop the registry.
            .process_group(0)
            .spawn()
            .context("cannot start docker-registry")?;
        fs::write(dir.join("registry.pid"), child.id().to_string())
            .context("cannot write registry.pid")?;
        println!(
            "registry: started {} (pid {}) on port {}",
            self.name,
            child.id(),
            self.port
        );
        Ok(child.id())
    }

    /// Waits until the port accepts connections, and for plain HTTP until `/v2/` answers
    /// 200 (distribution's API version check). Liveness is checked by pid alone: right
    /// after exec, /proc/PID/cmdline can still read empty.
    fn wait_ready(&self, pid: u32) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !is_alive(pid) {
                bail!(
                    "{} exited; see {}",
                    self.name,
                    self.dir().join("registry.log").display()
                );
            }
            if self.answers() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not answer within {READY_TIMEOUT:?}", self.name);
            }
            sleep(Duration::from_millis(200));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls {
            return true;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = [0u8; 12];
        stream
            .write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .and_then(|()| stream.read_exact(&mut reply))
            .is_ok_and(|()| reply.ends_with(b" 200"))
    }

    fn push(&self, layout: &Path, name: &str) -> Result<()> {
        let source = format!("oci:{}:latest", layout.display());
        let dest = format!("docker://127.0.0.1:{}/library/{name}:latest", self.port);
        let mut command = Command::new("skopeo");
        command.args(["copy", "--quiet"]);
        if self.tls {
            let password =
                fs::read_to_string(self.dir().join("password")).context("no password")?;
            command
                .arg("--dest-cert-dir")
                .arg(self.dir().join("certs.d"))
                .arg(format!("--dest-creds={USER}:{}", password.trim()));
        } else {
            command.arg("--dest-tls-verify=false");
        }
        let status = command
            .arg(&source)
            .arg(&dest)
            .status()
            .context("cannot run skopeo")?;
        if !status.success() {
            bail!("skopeo copy {source} {dest} failed ({status})");
        }
        println!("registry: pushed {dest}");
        Ok(())
    }

    fn describe(&self) -> Result<()> {
        if !self.tls {
            println!("registry: http://127.0.0.1:{} (no auth)", self.port);
            return Ok(());
        }
        let dir = self.dir();
        let password = fs::read_to_string(dir.join("password")).context("no password")?;
        println!("registry: https://127.0.0.1:{} (basic auth)", self.port);
        println!("registry:   CA       {}", dir.join("ca.crt").display());
        println!("registry:   user     {USER}");
        println!("registry:   password {}", password.trim());
        Ok(())
    }
}

/// A CA, a server certificate for 127.0.0.1 and localhost signed by it, and an htpasswd
/// file (bcrypt, which docker-registry requires) for a random password; made once.
fn make_tls_material(dir: &Path) -> Result<()> {
    if dir.join("server.crt").exists() && dir.join("htpasswd").exists() {
        return Ok(());
    }
    let openssl = |args: &[&str]| -> Result<()> {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run openssl")?;
        if !status.success() {
            bail!("openssl {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    fs::write(dir.join("server.ext"), SERVER_EXTENSIONS).context("cannot write server.ext")?;
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=katalite test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-out",
        "server.crt",
        "-extfile",
        "server.ext",
    ])?;
    let certs = dir.join("certs.d");
    fs::create_dir_all(&certs).context("cannot create certs.d")?;
    fs::copy(dir.join("ca.crt"), certs.join("ca.crt")).context("cannot copy the CA")?;
    let password = random_hex(16)?;
    let htpasswd = Command::new("htpasswd")
        .args(["-B", "-b", "-n", USER, &password])
        .output()
        .context("cannot run htpasswd")?;
    if !htpasswd.status.success() {
        bail!("htpasswd failed ({})", htpasswd.status);
    }
    fs::write(dir.join("htpasswd"), &htpasswd.stdout).context("cannot write htpasswd")?;
    let password_file = dir.join("password");
    fs::write(&password_file, format!("{password}\n")).context("cannot write the password")?;
    fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600))
        .context("cannot restrict the password file")?;
    Ok(())
}

/// X.509 v3 extensions of the server certificate (rustls/webpki needs the SAN).
const SERVER_EXTENSIONS: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
";

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("cannot run kill")?;
    if !status.success() && is_alive(pid) {
        bail!("kill -{name} {pid} failed ({status})");
    }
    Ok(())
}

fn is_alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state field (after the command in parentheses) is Z.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_config_binds_localhost_without_auth() {
        let config = PLAIN.config().expect("config");
        assert!(config.contains("addr: 127.0.0.1:5000\n"));
        assert!(!config.contains("auth:") && !config.contains("tls:"));
        assert!(config.contains("rootdirectory: \"/") && config.contains("/plain/storage\""));
    }

    #[test]
    fn tls_config_has_certificate_and_htpasswd() {
        let config = TLS_AUTH.config().expect("config");
        assert!(config.contains("addr: 127.0.0.1:5443\n"));
        for needle in [
            "tls:\n    certificate: \"",
            "server.key\"",
            "htpasswd:\n",
            "/tls-auth/htpasswd\"",
        ] {
            assert!(config.contains(needle), "missing {needle:?} in\n{config}");
        }
    }

    #[test]
    fn liveness_reads_proc() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX));
    }
}
