//! Blob downloads through oci-client into the cache. Under the blob's lock, bytes append to
//! `tmp/<hex>.partial` while being hashed; an interrupted transfer (reset, short body, a
//! killed process) resumes with a Range request; only a complete, verified file is renamed
//! into place.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::ProgressBar;
use oci_client::client::{BlobResponse, SizedStream};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use sha2::{Digest as _, Sha256};

use super::http::{backoff, Stall};
use super::session::Session;
use super::RegistryError;
use crate::digest::Digest;
use crate::manifest::Descriptor;
use crate::store::{Store, StoreError};

/// How often a pull waiting for another process's download of the same blob looks again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// Makes sure the blob is in the cache, downloading it if needed; returns its path. A blob
/// announced over `max` bytes is refused before the request, and the body is cut off (and
/// its partial file removed) at the first byte past the announced size, so no caller can
/// write more than it capped.
pub(crate) async fn fetch(
    session: &Session,
    store: &Store,
    desc: &Descriptor,
    max: u64,
    bar: &ProgressBar,
) -> Result<PathBuf, RegistryError> {
    let digest = &desc.digest;
    if desc.size > max {
        return Err(RegistryError::TooLarge {
            url: blob_url(session, desc),
            max,
        });
    }
    let _lock = loop {
        if store.has_blob(digest) {
            bar.finish_with_message("cached");
            return Ok(store.blob_path(digest));
        }
        if let Some(lock) = store.try_lock_blob(digest)? {
            break lock;
        }
        bar.set_message("waiting for another pull");
        tokio::time::sleep(LOCK_POLL).await;
    };
    if store.has_blob(digest) {
        bar.finish_with_message("cached");
        return Ok(store.blob_path(digest));
    }
    let path = store.partial_path(digest);
    let io = |e| RegistryError::Store(crate::store::io_err(&path)(e));
    let mut partial = Partial::open(&path, desc.size).map_err(io)?;
    bar.set_position(partial.len);

    let mut attempt = 1;
    let mut refreshed = false;
    loop {
        match transfer(session, desc, &mut partial, bar).await {
            Ok(()) => break,
            Err(Failure::Unauthorized) if !refreshed => {
                refreshed = true;
                session.reauthenticate().await?;
            }
            Err(Failure::Transient(e)) if attempt < session.attempts => {
                attempt += 1;
                bar.set_message("retrying");
                tokio::time::sleep(backoff(attempt)).await;
                drop(e);
            }
            Err(failure) => {
                if failure.bad_content() {
                    let _ = fs::remove_file(&path);
                }
                return Err(failure.into_error(session, desc));
            }
        }
    }
    let actual = Digest::from_hasher(partial.hasher);
    if &actual != digest {
        let _ = fs::remove_file(&path);
        return Err(RegistryError::Store(StoreError::DigestMismatch {
            expected: digest.clone(),
            actual,
        }));
    }
    let dest = store.commit(&partial.file, &path, digest)?;
    bar.finish_with_message("done");
    Ok(dest)
}

/// A resumable download file and the running hash of what it holds.
struct Partial {
    path: PathBuf,
    file: File,
    hasher: Sha256,
    len: u64,
}

impl Partial {
    /// Opens (or resumes) the partial file, re-hashing what an earlier attempt left.
    fn open(path: &PathBuf, size: u64) -> std::io::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let mut hasher = Sha256::new();
        let mut len = file.metadata()?.len();
        if len > size {
            file.set_len(0)?;
            len = 0;
        }
        let mut buf = vec![0u8; 256 * 1024];
        let mut reader = (&file).take(len);
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        file.seek(SeekFrom::Start(len))?;
        Ok(Self {
            path: path.clone(),
            file,
            hasher,
            len,
        })
    }

    fn restart(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.hasher = Sha256::new();
        self.len = 0;
        Ok(())
    }
}

/// Why one transfer attempt ended early.
enum Failure {
    /// Worth another attempt (network trouble, 429/5xx, short body).
    Transient(RegistryError),
    /// The token expired or was refused.
    Unauthorized,
    /// The registry sent more bytes than the descriptor promises.
    Overlong,
    /// Anything else: report it.
    Fatal(RegistryError),
}

impl Failure {
    fn bad_content(&self) -> bool {
        matches!(self, Failure::Overlong)
    }

    fn into_error(self, session: &Session, desc: &Descriptor) -> RegistryError {
        match self {
            Failure::Transient(e) | Failure::Fatal(e) => e,
            Failure::Unauthorized => RegistryError::Unauthorized {
                url: blob_url(session, desc),
            },
            Failure::Overlong => RegistryError::Overlong {
                digest: desc.digest.clone(),
                size: desc.size,
            },
        }
    }
}

fn blob_url(session: &Session, desc: &Descriptor) -> String {
    format!(
        "{}/v2/{}/blobs/{}",
        session.http.base, session.repository, desc.digest
    )
}

fn classify(session: &Session, desc: &Descriptor, e: OciDistributionError) -> Failure {
    let url = blob_url(session, desc);
    match &e {
        OciDistributionError::UnauthorizedError { .. } => Failure::Unauthorized,
        OciDistributionError::ServerError {
            code: 408 | 429 | 500 | 502 | 503 | 504,
            ..
        } => Failure::Transient(RegistryError::Blob { url, source: e }),
        OciDistributionError::RequestError(r) if !r.is_redirect() && !r.is_builder() => {
            Failure::Transient(RegistryError::Blob { url, source: e })
        }
        OciDistributionError::IoError(_) => {
            Failure::Transient(RegistryError::Blob { url, source: e })
        }
        _ => Failure::Fatal(RegistryError::Blob { url, source: e }),
    }
}

/// One GET of the blob (from the partial's end when resuming), streamed into the partial.
async fn transfer(
    session: &Session,
    desc: &Descriptor,
    partial: &mut Partial,
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let oci = session.oci();
    let reference = session.oci_reference(&desc.digest);
    let descriptor = OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.to_string(),
        size: i64::try_from(desc.size).unwrap_or(i64::MAX),
        // Foreign `urls` are never followed: content comes from the registry we chose.
        urls: None,
        annotations: None,
        artifact_type: None,
    };
    let path = partial.path.clone();
    let io = |e: std::io::Error| {
        Failure::Fatal(RegistryError::Store(StoreError::Io {
            path: path.clone(),
            source: e,
        }))
    };
    let stream: SizedStream = if partial.len > 0 {
        match oci
            .pull_blob_stream_partial(&reference, &descriptor, partial.len, None)
            .await
            .map_err(|e| classify(session, desc, e))?
        {
            BlobResponse::Partial(stream) => stream,
            // The registry ignored the Range header: start over.
            BlobResponse::Full(stream) => {
                partial.restart().map_err(io)?;
                bar.set_position(0);
                stream
            }
        }
    } else {
        oci.pull_blob_stream(&reference, &descriptor)
            .await
            .map_err(|e| classify(session, desc, e))?
    };
    if stream
        .content_length
        .is_some_and(|len| partial.len.saturating_add(len) > desc.size)
    {
        return Err(Failure::Overlong);
    }
    let mut stream = stream.stream;
    let mut stall = Stall::new(session.http.stall);
    let url = blob_url(session, desc);
    let stalled = || Failure::Transient(RegistryError::Stalled { url: url.clone() });
    loop {
        let next = tokio::time::timeout(session.http.stall, stream.next())
            .await
            .map_err(|_| stalled())?;
        let chunk = match next {
            None => break,
            // oci-client reports its own digest check at the end of the stream; with all
            // bytes here our own check below decides.
            Some(Err(_)) if partial.len == desc.size => break,
            Some(Err(e)) => {
                return Err(Failure::Transient(RegistryError::Transfer {
                    url: url.clone(),
                    source: e,
                }))
            }
            Some(Ok(chunk)) => chunk,
        };
        if partial.len + chunk.len() as u64 > desc.size {
            return Err(Failure::Overlong);
        }
        partial.file.write_all(&chunk).map_err(io)?;
        partial.hasher.update(&chunk);
        partial.len += chunk.len() as u64;
        bar.set_position(partial.len);
        if !stall.advance(chunk.len() as u64) {
            return Err(stalled());
        }
    }
    if partial.len < desc.size {
        return Err(Failure::Transient(RegistryError::Truncated {
            url,
            got: partial.len,
            size: desc.size,
        }));
    }
    Ok(())
}
