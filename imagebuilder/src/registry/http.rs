//! HTTP plumbing shared by the registry code: one reqwest client per endpoint (rustls with
//! the `ring` provider, extra CAs, bounded redirects that drop credentials across hosts),
//! retries that honour `Retry-After`, capped bodies, and a stall guard against slow drips.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};

use super::RegistryError;
use crate::config::{Endpoint, RegistryConfig};

/// A transfer must deliver at least this much per stall window (like curl's
/// `--speed-limit`), or it is abandoned: per-read timeouts alone never end a slow drip.
const MIN_BYTES_PER_WINDOW: u64 = 16 * 1024;
/// Redirects followed per request; reqwest also strips `Authorization` whenever the host,
/// port or scheme changes.
const MAX_REDIRECTS: usize = 5;
pub(crate) const USER_AGENT: &str = concat!("katalite/", env!("CARGO_PKG_VERSION"));

/// The HTTP side of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    pub client: reqwest::Client,
    /// `http://host` or `https://host`.
    pub base: String,
    pub stall: Duration,
    attempts: u32,
    max_retry_after: Duration,
}

impl Http {
    pub fn new(endpoint: &Endpoint, config: &RegistryConfig) -> Result<Self, RegistryError> {
        ensure_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.stall_timeout)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS));
        for path in &endpoint.ca {
            let pem = read_ca(path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                RegistryError::Certificate {
                    path: path.clone(),
                    source: Box::new(source),
                }
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(RegistryError::Client)?;
        let scheme = if endpoint.plain_http { "http" } else { "https" };
        Ok(Self {
            client,
            base: format!("{scheme}://{}", endpoint.host),
            stall: config.stall_timeout,
            attempts: config.attempts.max(1),
            max_retry_after: config.max_retry_after,
        })
    }

    /// Sends the request `build` makes, again on connection failures, 429 and 5xx (waiting
    /// as `Retry-After` says, within limits). Any other response goes back to the caller.
    pub async fn send(
        &self,
        url: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut attempt = 1;
        loop {
            let sent = tokio::time::timeout(self.stall * 2, build(&self.client).send()).await;
            let wait = match sent {
                Ok(Ok(response)) if !retryable(response.status()) => return Ok(response),
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let asked = retry_after(response.headers());
                    if asked.is_some_and(|d| d > self.max_retry_after) {
                        return Err(RegistryError::RetryAfter {
                            url: url.to_string(),
                            secs: asked.unwrap_or_default().as_secs(),
                        });
                    }
                    if attempt >= self.attempts {
                        return Err(RegistryError::Status {
                            url: url.to_string(),
                            status,
                        });
                    }
                    asked.unwrap_or_else(|| backoff(attempt))
                }
                // A refused connection or unknown host will not heal within a backoff: fail
                // now, so the next mirror (or the origin) gets its turn quickly.
                Ok(Err(e))
                    if e.is_redirect()
                        || e.is_builder()
                        || e.is_connect()
                        || attempt >= self.attempts =>
                {
                    return Err(RegistryError::Http {
                        url: url.to_string(),
                        source: e,
                    })
                }
                Ok(Err(_)) => backoff(attempt),
                Err(_) if attempt >= self.attempts => {
                    return Err(RegistryError::Stalled {
                        url: url.to_string(),
                    })
                }
                Err(_) => backoff(attempt),
            };
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Reads a whole body of at most `max` bytes, under the stall guard.
    pub async fn body(
        &self,
        mut response: Response,
        max: u64,
        url: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let too_large = || RegistryError::TooLarge {
            url: url.to_string(),
            max,
        };
        if response.content_length().is_some_and(|len| len > max) {
            return Err(too_large());
        }
        let mut out = Vec::new();
        let mut stall = Stall::new(self.stall);
        loop {
            let chunk = tokio::time::timeout(self.stall, response.chunk())
                .await
                .map_err(|_| RegistryError::Stalled {
                    url: url.to_string(),
                })?
                .map_err(|source| RegistryError::Http {
                    url: url.to_string(),
                    source,
                })?;
            let Some(chunk) = chunk else { break };
            if out.len() as u64 + chunk.len() as u64 > max {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
            if !stall.advance(chunk.len() as u64) {
                return Err(RegistryError::Stalled {
                    url: url.to_string(),
                });
            }
        }
        Ok(out)
    }
}

/// reqwest needs a process-wide rustls provider when built without its default one; `ring`
/// is pure Rust + asm, so the static musl binary carries no C crypto library.
pub(crate) fn ensure_crypto_provider() {
    // Err only means another provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn read_ca(path: &PathBuf) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|source| RegistryError::CertificateFile {
        path: path.clone(),
        source,
    })
}

/// Splits a PEM bundle into single-certificate PEM documents (oci-client takes them one by
/// one).
pub(crate) fn pem_certificates(pem: &[u8], path: &Path) -> Result<Vec<Vec<u8>>, RegistryError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(format!("{}\n", &rest[start..end]).into_bytes());
        rest = &rest[end..];
    }
    if out.is_empty() {
        return Err(RegistryError::NoCertificate(path.to_path_buf()));
    }
    Ok(out)
}

fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// `Retry-After` as delta-seconds (RFC 9110 §10.2.3); an HTTP-date falls back to our own
/// backoff.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64 << attempt.min(6))
}

/// Detects transfers that trickle: fewer than [`MIN_BYTES_PER_WINDOW`] in a window.
pub(crate) struct Stall {
    window: Duration,
    start: Instant,
    bytes: u64,
}

impl Stall {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `n` more bytes; false when the window closed with too little progress.
    pub fn advance(&mut self, n: u64) -> bool {
        self.bytes += n;
        if self.start.elapsed() < self.window {
            return true;
        }
        let ok = self.bytes >= MIN_BYTES_PER_WINDOW;
        self.start = Instant::now();
        self.bytes = 0;
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_only() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "3".parse().expect("header"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("header"),
        );
        assert_eq!(retry_after(&headers), None);
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retryable(StatusCode::NOT_FOUND));
        assert!(!retryable(StatusCode::UNAUTHORIZED));
    }

    #[test]
    fn stall_guard_trips_on_trickle_only() {
        let mut fast = Stall::new(Duration::from_millis(20));
        assert!(fast.advance(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            fast.advance(MIN_BYTES_PER_WINDOW),
            "enough bytes in the window"
        );
        let mut slow = Stall::new(Duration::from_millis(20));
        assert!(slow.advance(10));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!slow.advance(10), "a trickle trips the guard");
    }

    #[test]
    fn splits_pem_bundles() {
        let one = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        let bundle = format!("# comment\n{one}\n{one}\n");
        let certs = pem_certificates(bundle.as_bytes(), Path::new("b.pem")).expect("two certs");
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0], format!("{one}\n").into_bytes());
        assert!(matches!(
            pem_certificates(b"junk", Path::new("j.pem")),
            Err(RegistryError::NoCertificate(_))
        ));
    }
}
