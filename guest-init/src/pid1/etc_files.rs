//! The guest's identity files. Docker bind-mounts its own /etc/hostname, /etc/hosts and
//! /etc/resolv.conf over the image's; we write ours in their place (the root is the
//! initramfs in RAM), leaving alone what is not a regular file, such as a symlink into /run.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use guest_init::NetworkConfig;

/// Hostnames the kernel accepts are at most this long (`__NEW_UTS_LEN`).
const MAX_HOSTNAME: usize = 64;

/// Failure to set up the identity files.
#[derive(Debug, thiserror::Error)]
pub enum EtcError {
    /// Writing one of the files failed.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The hostname is not one the kernel takes.
    #[error("invalid hostname {0:?}")]
    InvalidHostname(String),
    /// `sethostname` failed.
    #[error("cannot set the hostname")]
    SetHostname(#[source] nix::Error),
}

/// The hostname to use: the configured one, else 12 hex digits like a Docker container id.
pub fn choose_hostname(configured: &str) -> Result<String, EtcError> {
    if configured.is_empty() {
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
        let id: String = uuid
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(12)
            .collect();
        return Ok(if id.is_empty() { "katalite".into() } else { id });
    }
    if configured.len() > MAX_HOSTNAME || configured.contains(['\0', '/', '\n', ' ']) {
        return Err(EtcError::InvalidHostname(configured.into()));
    }
    Ok(configured.into())
}

/// Sets the kernel's hostname.
pub fn set_hostname(name: &str) -> Result<(), EtcError> {
    nix::unistd::sethostname(name).map_err(EtcError::SetHostname)
}

/// Docker's /etc/hosts: the hostname resolves to the container's address, or without a
/// network to 127.0.1.1 (Debian's convention for a host's own name).
pub fn hosts(hostname: &str, address: Option<Ipv4Addr>) -> String {
    let own = address.unwrap_or(Ipv4Addr::new(127, 0, 1, 1));
    format!(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         ff00::0\tip6-mcastprefix\n\
         ff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n\
         {own}\t{hostname}\n"
    )
}

/// Docker's /etc/resolv.conf for these resolvers (none without a network: nothing to ask).
pub fn resolv_conf(nameservers: &[Ipv4Addr]) -> String {
    nameservers
        .iter()
        .map(|ip| format!("nameserver {ip}\n"))
        .collect()
}

/// Writes hostname, hosts and resolv.conf under `root`/etc (creating /etc if needed). A
/// path that exists as anything but a regular file is left as the image made it.
pub fn write_all(
    root: &Path,
    hostname: &str,
    network: Option<&NetworkConfig>,
) -> Result<(), EtcError> {
    let etc = root.join("etc");
    let nameservers = network.map_or(&[][..], |net| &net.dns[..]);
    let files = [
        ("hostname", format!("{hostname}\n")),
        ("hosts", hosts(hostname, network.map(|net| net.address))),
        ("resolv.conf", resolv_conf(nameservers)),
    ];
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EtcError::Write { path, source }
    };
    if fs::symlink_metadata(&etc).is_err() {
        fs::create_dir(&etc).map_err(error(&etc))?;
        fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).map_err(error(&etc))?;
    }
    for (name, content) in files {
        let path = etc.join(name);
        match fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_file() => continue,
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(error(&path)(err)),
        }
        match fs::write(&path, content) {
            Ok(()) => {}
            // A read-only shared root (`--rootfs DIR --read-only`) without the file: the
            // directory is the host's and stays as it is.
            Err(err) if err.kind() == io::ErrorKind::ReadOnlyFilesystem => continue,
            Err(err) => return Err(error(&path)(err)),
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(error(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_has_localhost_and_the_hostname() {
        let text = hosts("box", None);
        assert!(text.starts_with("127.0.0.1\tlocalhost\n::1\tlocalhost"));
        assert!(text.ends_with("127.0.1.1\tbox\n"));
        assert_eq!(text.lines().count(), 7);
        let text = hosts("box", Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert!(text.ends_with("10.0.2.15\tbox\n"));
    }

    #[test]
    fn resolv_conf_lists_the_resolvers_in_order() {
        let servers = [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(192, 0, 2, 53)];
        assert_eq!(
            resolv_conf(&servers),
            "nameserver 10.0.2.3\nnameserver 192.0.2.53\n"
        );
        assert_eq!(resolv_conf(&[]), "");
    }

    #[test]
    fn hostnames_are_checked_or_generated() {
        assert_eq!(choose_hostname("web-1").expect("valid"), "web-1");
        assert!(choose_hostname(&"x".repeat(65)).is_err());
        assert!(choose_hostname("a/b").is_err());
        let generated = choose_hostname("").expect("generated");
        assert!(
            !generated.is_empty() && generated.len() <= 12,
            "{generated}"
        );
    }

    #[test]
    fn writes_missing_and_regular_files_but_not_symlinks() {
        let root = tempfile::tempdir().expect("tempdir");
        let network = NetworkConfig {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            ipv6: None,
        };
        write_all(root.path(), "box", Some(&network)).expect("fresh root without /etc");
        let etc = root.path().join("etc");
        assert_eq!(
            fs::read_to_string(etc.join("hostname")).expect("hostname"),
            "box\n"
        );
        assert_eq!(
            fs::read_to_string(etc.join("resolv.conf")).expect("resolv"),
            "nameserver 10.0.2.3\n"
        );

        fs::write(etc.join("hosts"), "old").expect("image's hosts");
        fs::remove_file(etc.join("resolv.conf")).expect("remove");
        fs::write(root.path().join("stub"), "nameserver 1.1.1.1\n").expect("stub");
        std::os::unix::fs::symlink("../stub", etc.join("resolv.conf")).expect("symlink");
        write_all(root.path(), "other", None).expect("second run");
        assert_eq!(
            fs::read_to_string(etc.join("hosts")).expect("hosts"),
            hosts("other", None)
        );
        assert_eq!(
            fs::read_to_string(etc.join("resolv.conf")).expect("through the link"),
            "nameserver 1.1.1.1\n"
        );
        let mode = fs::metadata(etc.join("hosts"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
