//! One authenticated conversation with one endpoint about one repository: our own HTTP
//! client for the ping, token and (size-capped) manifest requests, and an oci-client
//! `Client` primed with the result for blob transfers.

use std::sync::{Mutex, PoisonError};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::token_cache::RegistryTokenType;
use oci_client::RegistryOperation;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{RequestBuilder, StatusCode};

use super::auth::{self, Auth, Credentials};
use super::http::{self, Http};
use super::RegistryError;
use crate::config::{Endpoint, RegistryConfig};
use crate::digest::Digest;
use crate::manifest::{self, MAX_MANIFEST_SIZE};

/// A manifest as fetched: its bytes, the `Content-Type` the registry gave, its digest.
pub(crate) struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
    pub digest: Digest,
}

pub(crate) struct Session {
    pub endpoint: Endpoint,
    pub repository: String,
    pub http: Http,
    pub attempts: u32,
    config: RegistryConfig,
    credentials: Credentials,
    certificates: Vec<Certificate>,
    state: Mutex<(Auth, oci_client::Client)>,
}

impl Session {
    /// Pings the endpoint, authenticates for pulling `repository`, primes oci-client.
    pub async fn connect(
        endpoint: &Endpoint,
        repository: &str,
        config: &RegistryConfig,
    ) -> Result<Self, RegistryError> {
        let http = Http::new(endpoint, config)?;
        let mut certificates = Vec::new();
        for path in &endpoint.ca {
            for data in http::pem_certificates(&http::read_ca(path)?, path)? {
                certificates.push(Certificate {
                    encoding: CertificateEncoding::Pem,
                    data,
                });
            }
        }
        let credentials = auth::credentials(endpoint)?;
        let auth = auth::authenticate(&http, endpoint, repository, &credentials).await?;
        let oci = oci_client(endpoint, repository, config, &certificates, &auth).await?;
        Ok(Self {
            endpoint: endpoint.clone(),
            repository: repository.to_string(),
            http,
            attempts: config.attempts.max(1),
            config: config.clone(),
            credentials,
            certificates,
            state: Mutex::new((auth, oci)),
        })
    }

    /// The oci-client handle with the current credentials.
    pub fn oci(&self) -> oci_client::Client {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }

    fn auth(&self) -> Auth {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Fetches a fresh token after a 401 (tokens expire, often after 5 minutes).
    pub async fn reauthenticate(&self) -> Result<(), RegistryError> {
        let auth = auth::authenticate(
            &self.http,
            &self.endpoint,
            &self.repository,
            &self.credentials,
        )
        .await?;
        let oci = oci_client(
            &self.endpoint,
            &self.repository,
            &self.config,
            &self.certificates,
            &auth,
        )
        .await?;
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = (auth, oci);
        Ok(())
    }

    /// The reference oci-client addresses a blob of this repository by.
    pub fn oci_reference(&self, digest: &Digest) -> oci_client::Reference {
        oci_client::Reference::with_digest(
            self.endpoint.host.clone(),
            self.repository.clone(),
            digest.to_string(),
        )
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match self.auth() {
            Auth::Anonymous => request,
            Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
            Auth::Bearer(token) => request.bearer_auth(token),
        }
    }

    /// Fetches a manifest by tag or digest, at most [`MAX_MANIFEST_SIZE`] bytes. With
    /// `pinned`, the bytes must hash to it; a `Docker-Content-Digest` header must agree too.
    pub async fn manifest(
        &self,
        reference: &str,
        pinned: Option<&Digest>,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = format!(
            "{}/v2/{}/manifests/{}",
            self.http.base, self.repository, reference
        );
        let mut refreshed = false;
        let response = loop {
            let response = self
                .http
                .send(&url, |c| {
                    self.authorize(c.get(&url))
                        .header(ACCEPT, HeaderValue::from_static(manifest::ACCEPT))
                })
                .await?;
            match response.status() {
                StatusCode::OK => break response,
                StatusCode::UNAUTHORIZED if !refreshed => {
                    refreshed = true;
                    self.reauthenticate().await?;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(RegistryError::Unauthorized { url })
                }
                StatusCode::NOT_FOUND => return Err(RegistryError::NotFound { url }),
                status => {
                    return Err(RegistryError::Status {
                        url,
                        status: status.as_u16(),
                    })
                }
            }
        };
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header(CONTENT_TYPE);
        let claimed = header(reqwest::header::HeaderName::from_static(
            "docker-content-digest",
        ));
        let bytes = self.http.body(response, MAX_MANIFEST_SIZE, &url).await?;
        let digest = Digest::of(&bytes);
        let expected = match (pinned, claimed.as_deref().map(Digest::parse)) {
            (Some(pinned), _) => Some(pinned.clone()),
            (None, Some(Ok(claimed))) => Some(claimed),
            (None, _) => None,
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    url,
                    expected,
                    actual: digest,
                });
            }
        }
        Ok(FetchedManifest {
            bytes,
            content_type,
            digest,
        })
    }
}

/// An oci-client `Client` that sends exactly what [`auth::authenticate`] obtained. A bearer
/// token is handed over as such (oci-client then never runs its own token flow, which would
/// send credentials to any realm); basic credentials go straight into its token cache.
async fn oci_client(
    endpoint: &Endpoint,
    repository: &str,
    config: &RegistryConfig,
    certificates: &[Certificate],
    auth: &Auth,
) -> Result<oci_client::Client, RegistryError> {
    http::ensure_crypto_provider();
    let client_config = ClientConfig {
        protocol: if endpoint.plain_http {
            ClientProtocol::HttpsExcept(vec![endpoint.host.clone()])
        } else {
            ClientProtocol::Https
        },
        extra_root_certificates: certificates.to_vec(),
        read_timeout: Some(config.stall_timeout),
        connect_timeout: Some(config.connect_timeout),
        user_agent: http::USER_AGENT,
        platform_resolver: None,
        ..ClientConfig::default()
    };
    let client = oci_client::Client::try_from(client_config).map_err(RegistryError::Oci)?;
    let host = &endpoint.host;
    match auth {
        Auth::Anonymous => {}
        Auth::Bearer(token) => {
            client
                .store_auth_if_needed(host, &RegistryAuth::Bearer(token.clone()))
                .await
        }
        Auth::Basic(user, password) => {
            let reference = oci_client::Reference::with_tag(
                host.clone(),
                repository.to_string(),
                "latest".into(),
            );
            client
                .tokens
                .insert(
                    &reference,
                    RegistryOperation::Pull,
                    RegistryTokenType::Basic(user.clone(), password.clone()),
                )
                .await;
            client
                .store_auth_if_needed(host, &RegistryAuth::Basic(user.clone(), password.clone()))
                .await;
        }
    }
    Ok(client)
}
