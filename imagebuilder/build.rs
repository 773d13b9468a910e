//! Packs Mozilla's CA roots (the `webpki-root-certs` bundle) for `tls_roots`: the DER
//! certificates, each behind its 4-byte little-endian length, as one zstd frame in
//! `$OUT_DIR/ca-roots.zst` (about 70 % of their 156 KB: the binary has an 8 MB budget), and
//! their uncompressed length in `KATALITE_CA_ROOTS_LEN`.

use std::error::Error;
use std::path::PathBuf;

/// Built once per build of this crate; decompressed only on hosts without a CA store.
const ZSTD_LEVEL: i32 = 19;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    let mut records = Vec::new();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let der: &[u8] = cert.as_ref();
        records.extend_from_slice(&u32::try_from(der.len())?.to_le_bytes());
        records.extend_from_slice(der);
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo set no OUT_DIR")?);
    std::fs::write(
        out.join("ca-roots.zst"),
        zstd::bulk::compress(&records, ZSTD_LEVEL)?,
    )?;
    println!("cargo::rustc-env=KATALITE_CA_ROOTS_LEN={}", records.len());
    Ok(())
}
