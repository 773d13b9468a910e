//! `katalite pull`, `katalite images`, `katalite rmi`, and the image resolution behind
//! `katalite run IMAGE`: argument types (clap) and thin glue over `imagebuilder`'s source
//! and store modules. The resolution takes the spec's [`FetchOptions`], never the flags.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use imagebuilder::config::RegistryConfig;
use imagebuilder::image::{Platform, PulledImage};
use imagebuilder::progress::Progress;
use imagebuilder::source::{self, ImageSource, PullOptions, PullPolicy};
use imagebuilder::store::{ImageRecord, Store};

use crate::spec::FetchOptions;

/// How images are fetched: platform, registry one-offs, progress.
#[derive(Args, Debug, Clone, Default)]
pub struct FetchArgs {
    /// Platform to pull from multi-platform images (default: this host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Registry configuration file (default: $XDG_CONFIG_HOME/katalite/registries.toml,
    /// for root /etc/katalite/registries.toml).
    #[arg(long, value_name = "FILE")]
    pub registries_config: Option<PathBuf>,

    /// Try MIRROR before REGISTRY (e.g. docker.io=http://127.0.0.1:5000); repeatable.
    #[arg(long = "registry-mirror", value_name = "REGISTRY=MIRROR")]
    pub mirrors: Vec<String>,

    /// Talk plain http to this registry; repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure: Vec<String>,

    /// Also trust this CA certificate (PEM) for registries; repeatable.
    #[arg(long = "registry-ca", value_name = "FILE")]
    pub ca: Vec<PathBuf>,

    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
}

impl FetchArgs {
    /// The flags as the engine takes them.
    pub fn options(&self) -> FetchOptions {
        FetchOptions {
            platform: self.platform.clone(),
            registries_config: self.registries_config.clone(),
            mirrors: self.mirrors.clone(),
            insecure: self.insecure.clone(),
            ca: self.ca.clone(),
            quiet: self.quiet,
        }
    }
}

/// `katalite pull IMAGE`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// A reference (`busybox`, `registry:5000/app:tag`, `...@sha256:...`), or
    /// `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:NAME]`.
    pub image: String,

    #[command(flatten)]
    pub fetch: FetchArgs,
}

/// `katalite images`.
#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Print only the references.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `katalite rmi IMAGE...`.
#[derive(Args, Debug)]
pub struct RmiArgs {
    /// References as `katalite images` lists them (short forms like `busybox` work).
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// `katalite pull`: always contacts the source (blobs already cached are not fetched).
pub fn pull(args: &PullArgs) -> Result<()> {
    let store = open_store()?;
    let image = resolve(
        &store,
        &args.image,
        PullPolicy::Always,
        &args.fetch.options(),
    )?;
    println!("{} {}", image.reference, image.manifest_digest);
    Ok(())
}

/// Resolves the image of `katalite run IMAGE` under `--pull POLICY`. The caller packs it
/// with `imagebuilder::pack::packed_initramfs(&image, store.root(), ..)` and should hold
/// `store.hold()` meanwhile so a concurrent `rmi` cannot delete the layers being packed.
pub fn resolve(
    store: &Store,
    image: &str,
    policy: PullPolicy,
    fetch: &FetchOptions,
) -> Result<PulledImage> {
    resolve_verified(store, image, policy, fetch, true)
}

/// [`resolve`], re-hashing the cached layers only when `verify_cached_layers` (a caller
/// that will not read the layers, e.g. because their disk image is cached, skips it).
pub fn resolve_verified(
    store: &Store,
    image: &str,
    policy: PullPolicy,
    fetch: &FetchOptions,
    verify_cached_layers: bool,
) -> Result<PulledImage> {
    let source = ImageSource::parse(image).context("invalid image")?;
    let platform = match &fetch.platform {
        Some(p) => Platform::parse(p).context("invalid --platform")?,
        None => Platform::host(),
    };
    let opts = PullOptions {
        policy,
        platform,
        registries: registry_config(fetch)?,
        progress: Progress::stderr(fetch.quiet),
        verify_cached_layers,
        ..PullOptions::default()
    };
    source::pull(&source, store, &opts).with_context(|| format!("cannot get image {source}"))
}

/// Opens the image cache at its default place (`$KATALITE_CACHE_DIR`, root:
/// `/var/lib/katalite`, else `$XDG_CACHE_HOME/katalite`).
pub fn open_store() -> Result<Store> {
    let root = Store::default_root().context("no cache directory")?;
    // Before any thread exists: this may set SSL_CERT_FILE for hosts without a CA store.
    imagebuilder::tls_roots::provide_if_missing(&root.join("tls"))
        .context("cannot write the bundled CA roots")?;
    Store::open(&root).with_context(|| format!("cannot open the image cache {}", root.display()))
}

/// The registry configuration: the file, then the environment, then the flags.
fn registry_config(fetch: &FetchOptions) -> Result<RegistryConfig> {
    let mut config = match &fetch.registries_config {
        Some(path) => {
            let mut config = RegistryConfig::load(path)?;
            config.apply_env(|name| std::env::var(name).ok())?;
            config
        }
        None => RegistryConfig::load_default()?,
    };
    // Flags come first in line, in the order given.
    for mirror in fetch.mirrors.iter().rev() {
        let Some((registry, url)) = mirror.split_once('=') else {
            bail!("--registry-mirror {mirror:?}: expected REGISTRY=MIRROR");
        };
        config.add_mirror(registry, url, true)?;
    }
    for host in &fetch.insecure {
        config.add_insecure(host)?;
    }
    config.ca.extend(fetch.ca.iter().cloned());
    Ok(config)
}

/// `katalite images`: references, manifest digests, sizes, age, and the disk usage.
pub fn images(args: &ImagesArgs) -> Result<()> {
    let store = open_store()?;
    let records = store.images().context("cannot read the image index")?;
    if args.quiet {
        for record in &records {
            println!("{}", record.reference);
        }
        return Ok(());
    }
    let width = records
        .iter()
        .map(|r| r.reference.len())
        .max()
        .unwrap_or(0)
        .max(9);
    println!(
        "{:<width$}  {:<12}  {:>9}  PULLED",
        "REFERENCE", "DIGEST", "SIZE"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for record in &records {
        println!(
            "{:<width$}  {:<12}  {:>9}  {}",
            record.reference,
            short_digest(record),
            human_size(record.size()),
            age(now.saturating_sub(record.pulled_at)),
        );
    }
    let usage = store.disk_usage().context("cannot measure the cache")?;
    println!(
        "Disk usage: {} in {}",
        human_size(usage),
        store.root().display()
    );
    Ok(())
}

/// `katalite rmi`: forgets the references, then deletes what no image needs any more.
pub fn rmi(args: &RmiArgs) -> Result<()> {
    let store = open_store()?;
    let records = store.images().context("cannot read the image index")?;
    for name in &args.images {
        let key = record_key(&records, name).with_context(|| format!("no such image: {name}"))?;
        store.remove_image(&key)?;
        println!("Untagged: {key}");
    }
    let report = store.gc().context("cannot clean the cache")?;
    println!(
        "Deleted {} blobs and {} packed images, freed {}",
        report.blobs_removed,
        report.packed_removed,
        human_size(report.bytes_freed)
    );
    Ok(())
}

/// The index key `name` refers to: exactly, as a normalized source, or as a digest prefix.
fn record_key(records: &[ImageRecord], name: &str) -> Option<String> {
    if let Some(r) = records.iter().find(|r| r.reference == name) {
        return Some(r.reference.clone());
    }
    if let Ok(source) = ImageSource::parse(name) {
        let key = source.key();
        if records.iter().any(|r| r.reference == key) {
            return Some(key);
        }
    }
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    let mut by_digest = records
        .iter()
        .filter(|r| hex.len() >= 4 && r.manifest_digest[7..].starts_with(hex));
    match (by_digest.next(), by_digest.next()) {
        (Some(only), None) => Some(only.reference.clone()),
        _ => None,
    }
}

fn short_digest(record: &ImageRecord) -> &str {
    record
        .manifest_digest
        .strip_prefix("sha256:")
        .and_then(|h| h.get(..12))
        .unwrap_or(&record.manifest_digest)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn age(secs: u64) -> String {
    match secs {
        0..60 => "just now".to_string(),
        60..3600 => format!("{} minutes ago", secs / 60),
        3600..86400 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reference: &str, hex: char) -> ImageRecord {
        ImageRecord {
            reference: reference.into(),
            manifest_digest: format!("sha256:{}", hex.to_string().repeat(64)),
            manifest_size: 1,
            manifest_media_type: String::new(),
            config_digest: String::new(),
            config_size: 1,
            layers: Vec::new(),
            pulled_at: 0,
        }
    }

    #[test]
    fn rmi_names_resolve_like_docker() {
        let records = [
            record("docker.io/library/busybox:latest", 'a'),
            record("localhost:5000/app:v1", 'b'),
        ];
        let key = |n| record_key(&records, n);
        assert_eq!(
            key("busybox").as_deref(),
            Some("docker.io/library/busybox:latest")
        );
        assert_eq!(
            key("docker.io/library/busybox:latest").as_deref(),
            Some("docker.io/library/busybox:latest")
        );
        assert_eq!(
            key("localhost:5000/app:v1").as_deref(),
            Some("localhost:5000/app:v1")
        );
        assert_eq!(key("bbbb").as_deref(), Some("localhost:5000/app:v1"));
        assert_eq!(
            key("sha256:aaaa").as_deref(),
            Some("docker.io/library/busybox:latest")
        );
        assert_eq!(key("abc"), None, "too short a digest prefix");
        assert_eq!(key("nginx"), None);
    }

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_500), "1.5 KB");
        assert_eq!(human_size(58_400_000), "58.4 MB");
        assert_eq!(age(5), "just now");
        assert_eq!(age(120), "2 minutes ago");
        assert_eq!(age(7200), "2 hours ago");
        assert_eq!(age(3 * 86400), "3 days ago");
    }

    #[test]
    fn flags_extend_the_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("registries.toml");
        std::fs::write(
            &file,
            "[registries.\"docker.io\"]\nmirrors = [\"file.example\"]\n",
        )
        .expect("write");
        let fetch = FetchArgs {
            registries_config: Some(file),
            mirrors: vec!["docker.io=http://127.0.0.1:5000".into()],
            insecure: vec!["plain.example:80".into()],
            ca: vec!["/ca.pem".into()],
            ..FetchArgs::default()
        };
        let config = registry_config(&fetch.options()).expect("valid");
        let hosts: Vec<String> = config
            .endpoints("docker.io")
            .expect("endpoints")
            .into_iter()
            .map(|e| e.host)
            .collect();
        assert_eq!(hosts[..2], ["127.0.0.1:5000", "file.example"]);
        assert!(config.endpoints("plain.example:80").expect("endpoints")[0].plain_http);
        assert!(config.ca.contains(&PathBuf::from("/ca.pem")));
        let bad = FetchArgs {
            mirrors: vec!["nomirror".into()],
            ..FetchArgs::default()
        };
        assert!(registry_config(&bad.options()).is_err());
    }
}
