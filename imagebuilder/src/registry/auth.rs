//! Registry authentication (distribution "token authentication" spec): ping `/v2/`, parse
//! `WWW-Authenticate`, fetch a bearer token. Done here rather than in oci-client so that
//! credentials go only to the registry itself or a token host it is trusted with, over https.

use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use super::http::Http;
use super::RegistryError;
use crate::config::Endpoint;

/// Largest token response we read.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;

/// Credentials from Docker's `config.json` (directly or through a helper).
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credentials {
    None,
    UserPassword(String, String),
    /// An OAuth2 refresh token (`identitytoken`), exchanged at the token endpoint.
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::UserPassword(..) => "UserPassword(<redacted>)",
            Self::IdentityToken(_) => "IdentityToken(<redacted>)",
        })
    }
}

/// How requests to the endpoint authenticate.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Auth {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Anonymous => "Anonymous",
            Self::Basic(..) => "Basic(<redacted>)",
            Self::Bearer(_) => "Bearer(<redacted>)",
        })
    }
}

/// A parsed `WWW-Authenticate` challenge (RFC 9110 §11.6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

/// Looks up credentials for an endpoint; never for plain http (they would travel in clear).
pub(crate) fn credentials(endpoint: &Endpoint) -> Result<Credentials, RegistryError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    if endpoint.plain_http {
        return Ok(Credentials::None);
    }
    match docker_credential::get_credential(&endpoint.credential_key) {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(Credentials::UserPassword(user, password))
        }
        Ok(DockerCredential::IdentityToken(token)) => Ok(Credentials::IdentityToken(token)),
        // A missing config.json is reported as a read error by the crate.
        Err(E::NoCredentialConfigured | E::ConfigNotFound) => Ok(Credentials::None),
        Err(E::ConfigReadError) if !docker_config_exists() => Ok(Credentials::None),
        Err(e) => Err(RegistryError::Credentials(e)),
    }
}

fn docker_config_exists() -> bool {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".docker")));
    dir.is_some_and(|d| d.join("config.json").exists())
}

/// Pings the endpoint and obtains what its challenge asks for, pull-scoped to `repository`.
pub(crate) async fn authenticate(
    http: &Http,
    endpoint: &Endpoint,
    repository: &str,
    credentials: &Credentials,
) -> Result<Auth, RegistryError> {
    let url = format!("{}/v2/", http.base);
    let response = http.send(&url, |c| c.get(&url)).await?;
    match response.status() {
        s if s.is_success() => return Ok(Auth::Anonymous),
        StatusCode::UNAUTHORIZED => {}
        s => {
            return Err(RegistryError::Status {
                url,
                status: s.as_u16(),
            })
        }
    }
    let header = response
        .headers()
        .get(WWW_AUTHENTICATE)
        .ok_or_else(|| RegistryError::Challenge(String::new()))?
        .to_str()
        .map_err(|_| RegistryError::Challenge("<not text>".into()))?
        .to_string();
    match parse_challenge(&header)? {
        Challenge::Basic => match credentials {
            Credentials::UserPassword(user, password) if !endpoint.plain_http => {
                Ok(Auth::Basic(user.clone(), password.clone()))
            }
            _ => Ok(Auth::Anonymous),
        },
        Challenge::Bearer { realm, service } => {
            let trusted = may_receive_credentials(&realm, endpoint);
            let credentials = if trusted {
                credentials
            } else {
                &Credentials::None
            };
            let token = fetch_token(http, &realm, service.as_deref(), repository, credentials)
                .await
                .map_err(|e| match e {
                    RegistryError::Status { url, status } if !trusted => {
                        RegistryError::TokenWithheld { url, status }
                    }
                    other => other,
                })?;
            Ok(Auth::Bearer(token))
        }
    }
}

/// Credentials go to a token realm only over https and only on the registry's own host or a
/// host configured (or, for Docker Hub, known) to serve its tokens.
pub(crate) fn may_receive_credentials(realm: &Url, endpoint: &Endpoint) -> bool {
    if realm.scheme() != "https" {
        return false;
    }
    let Some(host) = realm.host_str() else {
        return false;
    };
    let realm_authority = match realm.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    realm_authority.eq_ignore_ascii_case(&endpoint.host)
        || endpoint
            .auth_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&realm_authority))
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
}

async fn fetch_token(
    http: &Http,
    realm: &Url,
    service: Option<&str>,
    repository: &str,
    credentials: &Credentials,
) -> Result<String, RegistryError> {
    let scope = format!("repository:{repository}:pull");
    let url = realm.to_string();
    let response = http
        .send(&url, |client| {
            let mut query = vec![("scope", scope.as_str())];
            if let Some(service) = service {
                query.push(("service", service));
            }
            match credentials {
                Credentials::None => client.get(realm.clone()).query(&query),
                Credentials::UserPassword(user, password) => client
                    .get(realm.clone())
                    .query(&query)
                    .basic_auth(user, Some(password)),
                // OAuth2 refresh-token grant (distribution docs, "oauth.md").
                Credentials::IdentityToken(token) => {
                    let mut form = vec![
                        ("grant_type", "refresh_token"),
                        ("refresh_token", token.as_str()),
                        ("client_id", "katalite"),
                        ("scope", scope.as_str()),
                    ];
                    if let Some(service) = service {
                        form.push(("service", service));
                    }
                    let body = form
                        .iter()
                        .map(|(k, v)| format!("{k}={}", form_encode(v)))
                        .collect::<Vec<_>>()
                        .join("&");
                    client
                        .post(realm.clone())
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(body)
                }
            }
        })
        .await?;
    let status = response.status();
    if !status.is_success() {
        return Err(RegistryError::Status {
            url,
            status: status.as_u16(),
        });
    }
    let body = http.body(response, MAX_TOKEN_RESPONSE, &url).await?;
    let parsed: TokenResponse =
        serde_json::from_slice(&body).map_err(|source| RegistryError::TokenResponse {
            url: url.clone(),
            source,
        })?;
    parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or(RegistryError::EmptyToken { url })
}

fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Parses `Basic realm="x"` or `Bearer realm="https://…",service="…",scope="…"`. Anything
/// else (unknown scheme, missing or relative realm, broken quoting) is an error.
pub(crate) fn parse_challenge(header: &str) -> Result<Challenge, RegistryError> {
    let bad = || RegistryError::Challenge(header.to_string());
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(params).ok_or_else(bad)?;
    let get = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Ok(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(bad());
    }
    let realm = get("realm").ok_or_else(bad)?;
    // Registry hosts are ASCII (or punycode): the ASCII-only IDNA back end we pin refuses
    // anything else anyway, and in debug builds it asserts on the way.
    if !realm.is_ascii() || !plain_url_text(&realm) {
        return Err(bad());
    }
    let realm = Url::parse(&realm).map_err(|_| bad())?;
    if !matches!(realm.scheme(), "http" | "https") || realm.host_str().is_none() {
        return Err(bad());
    }
    Ok(Challenge::Bearer {
        realm,
        service: get("service"),
    })
}

/// A realm is a URL as a registry writes it: no whitespace or control characters (which
/// the URL parser silently drops) and no percent-escapes. An escape that lands in the host
/// (the parser also takes `https:/host` and `https:\\host`) decodes to bytes that reach the
/// IDNA back end un-normalised, where its debug assertions fire; no registry's token
/// endpoint needs one.
fn plain_url_text(url: &str) -> bool {
    !url.chars()
        .any(|c| c.is_ascii_control() || c.is_ascii_whitespace() || c == '%')
}

/// `key=value` or `key="quoted \" value"` pairs separated by commas.
fn parse_params(input: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = input.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            if !(c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return None;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                if c == '"' {
                    return None;
                }
                value.push(c);
                chars.next();
            }
        }
        match chars.peek() {
            None | Some(',') => {}
            Some(c) if c.is_whitespace() => {}
            Some(_) => return None,
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(host: &str, auth_hosts: &[&str]) -> Endpoint {
        Endpoint {
            host: host.into(),
            plain_http: false,
            mirror: false,
            ca: vec![],
            auth_hosts: auth_hosts.iter().map(|h| h.to_string()).collect(),
            credential_key: host.into(),
        }
    }

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .expect("valid");
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: Url::parse("https://auth.docker.io/token").expect("url"),
                service: Some("registry.docker.io".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#).expect("valid"),
            Challenge::Basic
        );
        let c =
            parse_challenge(r#"bearer realm=https://r.example/t, service="a\"b""#).expect("valid");
        assert!(matches!(c, Challenge::Bearer { service: Some(s), .. } if s == "a\"b"));
    }

    #[test]
    fn rejects_malformed_challenges() {
        for bad in [
            "",
            "Bearer",
            "Bearer service=\"x\"",
            "Bearer realm=\"/relative\"",
            "Bearer realm=\"ftp://x/t\"",
            "Bearer realm=\"https://x/t",
            "Bearer realm=\"https://x/t\"junk",
            "Bearer =\"https://x/t\"",
            "Bearer realm",
            "Negotiate abc",
            "Bearer realm=\"https://x/t\",se rvice=\"y\"",
            // Found by the oci_manifest fuzz target: a non-ASCII host with capitals.
            "Bearer realm=\"https://aunh.exOO\u{192}$IOOl\"",
            // Found by CI's fuzzing: a percent-escape split by a tab (which the URL parser
            // drops) decodes to a non-ASCII host byte.
            "Bearer realm=\"https://ah.m64DD%\tDDDep\x7fsit/bzll\"",
            "Bearer realm=\"https://ah.m64DD%DDDD/bzll\"",
            "Bearer realm=\"https://reg istry/token\"",
            "Bearer realm=\"https:/lEE,S%EEEHEE%SShost:48/x\"",
        ] {
            assert!(
                matches!(parse_challenge(bad), Err(RegistryError::Challenge(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn credentials_only_go_to_trusted_https_realms() {
        let url = |s: &str| Url::parse(s).expect("url");
        let reg = endpoint("reg.example:5443", &["auth.example"]);
        assert!(may_receive_credentials(
            &url("https://reg.example:5443/token"),
            &reg
        ));
        assert!(may_receive_credentials(
            &url("https://auth.example/token"),
            &reg
        ));
        assert!(
            !may_receive_credentials(&url("http://reg.example:5443/token"), &reg),
            "plain http"
        );
        assert!(
            !may_receive_credentials(&url("https://reg.example/token"), &reg),
            "other port"
        );
        assert!(!may_receive_credentials(
            &url("https://evil.example/token"),
            &reg
        ));
        assert!(!may_receive_credentials(
            &url("https://auth.example.evil/token"),
            &reg
        ));
    }

    #[test]
    fn form_encoding_escapes_reserved_bytes() {
        assert_eq!(form_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
