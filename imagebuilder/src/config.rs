//! Registry configuration: `registries.toml` at the conventional place (root:
//! `/etc/katalite/registries.toml`, others: `$XDG_CONFIG_HOME/katalite/registries.toml`)
//! plus environment one-offs. Per registry: mirrors tried in order before the origin, plain
//! http for insecure registries, extra CA certificates, token hosts trusted with credentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::reference::DEFAULT_REGISTRY;

/// The API host behind `docker.io`.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Docker Hub's token service, a different host from its registry.
const DOCKER_HUB_AUTH: &str = "auth.docker.io";

/// Errors in the registry configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not valid TOML of our schema.
    #[error("parse {0}")]
    Parse(PathBuf, #[source] Box<toml::de::Error>),
    /// A registry or mirror is not `[http://|https://]host[:port]`.
    #[error("invalid registry address {0:?}")]
    Address(String),
    /// An environment one-off is malformed.
    #[error("invalid {0}: expected {1}")]
    Env(&'static str, &'static str),
}

/// Settings of one registry (a `[registries."host"]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryEntry {
    /// Mirrors tried in order before the registry itself: `host[:port]`, or with an explicit
    /// `http://` (plain) or `https://` scheme.
    pub mirrors: Vec<String>,
    /// Talk plain http to this registry (never with credentials).
    pub insecure: bool,
    /// Extra PEM CA certificates trusted for this registry.
    pub ca: Vec<PathBuf>,
    /// Token-service hosts (from `WWW-Authenticate: Bearer realm=`) other than the registry
    /// itself that may receive this registry's credentials.
    pub auth_hosts: Vec<String>,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Extra PEM CA certificates trusted for every registry.
    pub ca: Vec<PathBuf>,
    /// Per-registry settings keyed by the registry as references name it (`docker.io`,
    /// `localhost:5000`).
    pub registries: BTreeMap<String, RegistryEntry>,
    /// Give up on a connection that delivers nothing for this long.
    #[serde(rename = "stall_timeout_secs", deserialize_with = "secs::deserialize")]
    pub stall_timeout: Duration,
    /// Give up connecting after this long.
    #[serde(
        rename = "connect_timeout_secs",
        deserialize_with = "secs::deserialize"
    )]
    pub connect_timeout: Duration,
    /// Attempts per request on transient failures (429, 5xx, resets).
    pub attempts: u32,
    /// Longest `Retry-After` we honour; a registry asking for more fails the pull.
    #[serde(
        rename = "max_retry_after_secs",
        deserialize_with = "secs::deserialize"
    )]
    pub max_retry_after: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            ca: Vec::new(),
            registries: BTreeMap::new(),
            stall_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
            attempts: 4,
            max_retry_after: Duration::from_secs(60),
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

/// One place to fetch a registry's content from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` the HTTP requests go to.
    pub host: String,
    /// Plain http instead of https.
    pub plain_http: bool,
    /// A mirror rather than the origin (a failure falls through to the next endpoint).
    pub mirror: bool,
    /// Extra CA certificates for this endpoint (global ones included).
    pub ca: Vec<PathBuf>,
    /// Token hosts trusted with this endpoint's credentials.
    pub auth_hosts: Vec<String>,
    /// The key to look credentials up with in Docker's `config.json`.
    pub credential_key: String,
}

impl RegistryConfig {
    /// Where the configuration file lives for this user.
    pub fn default_path() -> Option<PathBuf> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(path) = var("KATALITE_REGISTRIES_CONFIG") {
            return Some(PathBuf::from(path));
        }
        if crate::store::effective_uid() == 0 {
            return Some(PathBuf::from("/etc/katalite/registries.toml"));
        }
        var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|dir| dir.join("katalite/registries.toml"))
    }

    /// Reads the default file if it exists, then applies the environment one-offs.
    pub fn load_default() -> Result<Self, ConfigError> {
        let mut config = match Self::default_path() {
            Some(path) if path.exists() => Self::load(&path)?,
            _ => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Reads one file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Self::from_toml(&text, path)
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse(origin.to_path_buf(), Box::new(e)))?;
        let mut config = Self {
            registries: BTreeMap::new(),
            ..raw.clone()
        };
        for (name, entry) in raw.registries {
            let key = canonical_registry(&name)?;
            for mirror in &entry.mirrors {
                parse_address(mirror)?;
            }
            config.registries.entry(key).or_default().merge(entry);
        }
        Ok(config)
    }

    /// Applies `KATALITE_REGISTRY_MIRRORS` (`registry=mirror,...`, mirrors before those of
    /// the file), `KATALITE_INSECURE_REGISTRIES` (`host,...`) and `KATALITE_REGISTRY_CA`
    /// (`path:path`). `get` reads a variable (the process environment in practice).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        const MIRRORS: &str = "KATALITE_REGISTRY_MIRRORS";
        if let Some(value) = get(MIRRORS) {
            let mut mirrors = Vec::new();
            for pair in value.split(',').filter(|p| !p.trim().is_empty()) {
                let (registry, mirror) = pair
                    .split_once('=')
                    .ok_or(ConfigError::Env(MIRRORS, "registry=mirror,..."))?;
                mirrors.push((registry.trim(), mirror.trim()));
            }
            for (registry, mirror) in mirrors.into_iter().rev() {
                self.add_mirror(registry, mirror, true)?;
            }
        }
        if let Some(value) = get("KATALITE_INSECURE_REGISTRIES") {
            for host in value.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                self.add_insecure(host)?;
            }
        }
        if let Some(value) = get("KATALITE_REGISTRY_CA") {
            self.ca.extend(
                value
                    .split(':')
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from),
            );
        }
        Ok(())
    }

    /// Adds a mirror for `registry`, first in line or last.
    pub fn add_mirror(
        &mut self,
        registry: &str,
        mirror: &str,
        first: bool,
    ) -> Result<(), ConfigError> {
        parse_address(mirror)?;
        let mirrors = &mut self
            .registries
            .entry(canonical_registry(registry)?)
            .or_default()
            .mirrors;
        if first {
            mirrors.insert(0, mirror.to_string());
        } else {
            mirrors.push(mirror.to_string());
        }
        Ok(())
    }

    /// Marks a registry (or mirror host) as plain http.
    pub fn add_insecure(&mut self, registry: &str) -> Result<(), ConfigError> {
        self.registries
            .entry(canonical_registry(registry)?)
            .or_default()
            .insecure = true;
        Ok(())
    }

    /// Where to fetch `registry`'s content from, in order: its mirrors, then itself.
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, ConfigError> {
        let key = canonical_registry(registry)?;
        let entry = self.registries.get(&key).cloned().unwrap_or_default();
        let mut out = Vec::new();
        for mirror in &entry.mirrors {
            let (scheme, host) = parse_address(mirror)?;
            out.push(self.endpoint(&host, scheme, true));
        }
        let origin = if key == DEFAULT_REGISTRY {
            DOCKER_HUB_API.to_string()
        } else {
            key
        };
        out.push(self.endpoint(&origin, None, false));
        Ok(out)
    }

    fn endpoint(&self, host: &str, scheme: Option<bool>, mirror: bool) -> Endpoint {
        let key = canonical_registry(host).unwrap_or_else(|_| host.to_string());
        let entry = self.registries.get(&key).cloned().unwrap_or_default();
        let mut ca = self.ca.clone();
        ca.extend(entry.ca);
        let mut auth_hosts = entry.auth_hosts;
        let credential_key = if key == DEFAULT_REGISTRY {
            auth_hosts.push(DOCKER_HUB_AUTH.to_string());
            "https://index.docker.io/v1/".to_string()
        } else {
            host.to_string()
        };
        Endpoint {
            host: if key == DEFAULT_REGISTRY {
                DOCKER_HUB_API.to_string()
            } else {
                host.to_string()
            },
            plain_http: scheme.unwrap_or(entry.insecure),
            mirror,
            ca,
            auth_hosts,
            credential_key,
        }
    }
}

impl RegistryEntry {
    fn merge(&mut self, other: Self) {
        self.mirrors.extend(other.mirrors);
        self.insecure |= other.insecure;
        self.ca.extend(other.ca);
        self.auth_hosts.extend(other.auth_hosts);
    }
}

/// Docker Hub answers to several names; they share one table.
fn canonical_registry(name: &str) -> Result<String, ConfigError> {
    let name = name.trim().trim_end_matches('/');
    if !crate::reference::valid_registry(name) {
        return Err(ConfigError::Address(name.to_string()));
    }
    Ok(match name {
        "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_string(),
        other => other.to_string(),
    })
}

/// `[http://|https://]host[:port]` → (Some(plain) when a scheme was given, host).
fn parse_address(address: &str) -> Result<(Option<bool>, String), ConfigError> {
    let bad = || ConfigError::Address(address.to_string());
    let (scheme, rest) = match address.split_once("://") {
        Some(("http", rest)) => (Some(true), rest),
        Some(("https", rest)) => (Some(false), rest),
        Some(_) => return Err(bad()),
        None => (None, address),
    };
    let host = rest.trim_end_matches('/');
    if !crate::reference::valid_registry(host) {
        return Err(bad());
    }
    Ok((scheme, host.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RegistryConfig, ConfigError> {
        RegistryConfig::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn parses_full_file() {
        let config = parse(
            r#"
            ca = ["/etc/ssl/extra.pem"]
            stall_timeout_secs = 5
            attempts = 2
            [registries."docker.io"]
            mirrors = ["http://127.0.0.1:5000", "mirror.example.com"]
            [registries."mirror.example.com"]
            ca = ["/etc/mirror-ca.pem"]
            [registries."localhost:5001"]
            insecure = true
            [registries."reg.example.com:5443"]
            auth_hosts = ["auth.example.com"]
            "#,
        )
        .expect("valid");
        assert_eq!(config.stall_timeout, Duration::from_secs(5));
        assert_eq!(config.attempts, 2);
        assert_eq!(
            config.connect_timeout,
            Duration::from_secs(15),
            "default kept"
        );

        let hub = config.endpoints("docker.io").expect("endpoints");
        let hosts: Vec<_> = hub
            .iter()
            .map(|e| (e.host.as_str(), e.plain_http, e.mirror))
            .collect();
        assert_eq!(
            hosts,
            [
                ("127.0.0.1:5000", true, true),
                ("mirror.example.com", false, true),
                ("registry-1.docker.io", false, false),
            ]
        );
        assert_eq!(
            hub[1].ca,
            [
                PathBuf::from("/etc/ssl/extra.pem"),
                "/etc/mirror-ca.pem".into()
            ]
        );
        assert_eq!(hub[2].credential_key, "https://index.docker.io/v1/");
        assert_eq!(hub[2].auth_hosts, ["auth.docker.io"]);
        assert!(
            hub[0].auth_hosts.is_empty(),
            "a mirror does not trust Hub's token host"
        );

        let local = config.endpoints("localhost:5001").expect("endpoints");
        assert_eq!(local.len(), 1);
        assert!(local[0].plain_http);
        assert_eq!(local[0].credential_key, "localhost:5001");
        let other = config.endpoints("reg.example.com:5443").expect("endpoints");
        assert_eq!(other[0].auth_hosts, ["auth.example.com"]);
        assert!(!other[0].plain_http);
    }

    #[test]
    fn docker_hub_aliases_share_a_table() {
        let config =
            parse("[registries.\"index.docker.io\"]\nmirrors = [\"m.example\"]\n").expect("valid");
        assert_eq!(config.endpoints("docker.io").expect("endpoints").len(), 2);
    }

    #[test]
    fn rejects_typos_and_bad_addresses() {
        assert!(matches!(
            parse("[registries.\"a.io\"]\nmirror = []\n"),
            Err(ConfigError::Parse(..))
        ));
        assert!(matches!(
            parse("unknown = 1\n"),
            Err(ConfigError::Parse(..))
        ));
        assert!(matches!(
            parse("attempts = \"x\"\n"),
            Err(ConfigError::Parse(..))
        ));
        assert!(matches!(
            parse("[registries.\"a.io\"]\nmirrors = [\"ftp://m\"]\n"),
            Err(ConfigError::Address(_))
        ));
        assert!(matches!(
            parse("[registries.\"a.io\"]\nmirrors = [\"http://m/path\"]\n"),
            Err(ConfigError::Address(_))
        ));
        assert!(matches!(
            parse("[registries.\"bad host\"]\n"),
            Err(ConfigError::Address(_))
        ));
    }

    #[test]
    fn environment_one_offs() {
        let mut config =
            parse("[registries.\"docker.io\"]\nmirrors = [\"file.example\"]\n").expect("valid");
        let env = |name: &str| match name {
            "KATALITE_REGISTRY_MIRRORS" => {
                Some("docker.io=http://127.0.0.1:5000, docker.io=b.example".into())
            }
            "KATALITE_INSECURE_REGISTRIES" => Some("plain.example:80".into()),
            "KATALITE_REGISTRY_CA" => Some("/a.pem:/b.pem".into()),
            _ => None,
        };
        config.apply_env(env).expect("valid env");
        let hosts: Vec<_> = config
            .endpoints("docker.io")
            .expect("endpoints")
            .into_iter()
            .map(|e| e.host)
            .collect();
        assert_eq!(
            hosts,
            [
                "127.0.0.1:5000",
                "b.example",
                "file.example",
                "registry-1.docker.io"
            ]
        );
        assert!(config.endpoints("plain.example:80").expect("endpoints")[0].plain_http);
        assert_eq!(config.ca, [PathBuf::from("/a.pem"), "/b.pem".into()]);

        let bad =
            |name: &str| (name == "KATALITE_REGISTRY_MIRRORS").then(|| "nomirror".to_string());
        assert!(matches!(config.apply_env(bad), Err(ConfigError::Env(..))));
    }
}
