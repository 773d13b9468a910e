//! CA roots for hosts without a CA store (a minimal edge system, an initramfs such as the
//! lab's). rustls' platform verifier refuses to build any HTTP client there — even one for
//! a plain-http mirror, and oci-client builds a default client internally — so katalite
//! writes Mozilla's roots (the maintained `webpki-root-certs` bundle) as a PEM file in its
//! own directory and points `SSL_CERT_FILE` at it. Hosts with a CA store are left alone.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use base64::Engine;

/// Where Linux distributions keep their CA bundle.
const SYSTEM_CA_FILES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// True when the host has a CA store the platform verifier can load.
pub fn host_has_ca_store() -> bool {
    std::env::var_os("SSL_CERT_FILE").is_some()
        || std::env::var_os("SSL_CERT_DIR").is_some()
        || SYSTEM_CA_FILES.iter().any(|f| Path::new(f).is_file())
}

/// On a host without a CA store, writes the bundled roots to `dir/ca-roots.pem` (atomically,
/// unless it already holds them) and sets `SSL_CERT_FILE` to it; returns the path, or
/// `None` when the host has a store.
/// Must run before other threads start: it changes the process environment.
pub fn provide_if_missing(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    if host_has_ca_store() {
        return Ok(None);
    }
    let path = write_bundle(dir)?;
    std::env::set_var("SSL_CERT_FILE", &path);
    Ok(Some(path))
}

/// Writes the bundled roots to `dir/ca-roots.pem` unless it holds them already. Written
/// once per bundle: a rewrite and fsync on every `katalite run` cost a start more than the
/// rest of its cache lookup.
fn write_bundle(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = dir.join("ca-roots.pem");
    let bundle = bundle_pem()?;
    if std::fs::read(&path).ok().as_deref() != Some(bundle.as_slice()) {
        let mut temp = tempfile::NamedTempFile::new_in(dir)?;
        temp.write_all(&bundle)?;
        temp.as_file().sync_all()?;
        temp.persist(&path).map_err(|e| e.error)?;
    }
    Ok(path)
}

/// Mozilla's roots as `build.rs` packed them: zstd-compressed records of a 4-byte
/// little-endian length and a DER certificate.
static PACKED_ROOTS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ca-roots.zst"));
/// Their uncompressed length.
const ROOTS_LEN: &str = env!("KATALITE_CA_ROOTS_LEN");

/// The bundled roots as one PEM document.
fn bundle_pem() -> std::io::Result<Vec<u8>> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let len = ROOTS_LEN
        .parse()
        .map_err(|_| invalid("bad length of the bundled CA roots"))?;
    let records = zstd::bulk::decompress(PACKED_ROOTS, len)?;
    let mut pem = Vec::new();
    let mut rest = records.as_slice();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| invalid("truncated bundled CA roots"))?;
        let len = usize::try_from(u32::from_le_bytes(*len))
            .map_err(|_| invalid("bad bundled CA root"))?;
        let (cert, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| invalid("truncated bundled CA roots"))?;
        rest = tail;
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert);
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in encoded.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_file_is_written_once_and_repaired_when_it_differs() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        let path = write_bundle(&tls).expect("write");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bundle_pem().expect("bundle")
        );
        let inode = std::fs::metadata(&path).expect("stat").ino();
        assert_eq!(write_bundle(&tls).expect("again"), path);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").ino(),
            inode,
            "rewritten"
        );
        std::fs::write(&path, b"spoiled").expect("spoil");
        write_bundle(&tls).expect("repair");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bundle_pem().expect("bundle")
        );
    }

    #[test]
    fn bundle_is_pem_that_reqwest_accepts() {
        let pem = bundle_pem().expect("bundle");
        let certs = reqwest::Certificate::from_pem_bundle(&pem).expect("valid PEM");
        assert!(certs.len() > 50, "Mozilla's store has well over 50 roots");
    }

    #[test]
    fn the_packed_bundle_holds_every_root_of_the_crate() {
        let pem = String::from_utf8(bundle_pem().expect("bundle")).expect("ascii");
        let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS;
        assert_eq!(
            pem.matches("-----BEGIN CERTIFICATE-----").count(),
            roots.len()
        );
        for cert in roots {
            let encoded = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
            let first_line = &encoded[..64.min(encoded.len())];
            assert!(pem.contains(first_line), "a root is missing");
        }
    }
}
