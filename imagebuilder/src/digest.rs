//! Content digests (`sha256:<64 hex>`), the names of everything in the blob cache. Only
//! sha256 is accepted: it is what every registry and `docker save` produce, and refusing the
//! rest keeps a hostile manifest from choosing a weaker or unknown algorithm.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// Errors while parsing a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// Not `algorithm:hex`.
    #[error("invalid digest {0:?}")]
    Malformed(String),
    /// A well-formed digest with an algorithm we do not implement.
    #[error("unsupported digest algorithm in {0:?} (only sha256)")]
    Algorithm(String),
}

/// A sha256 content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>` (image-spec `descriptor.md`, "Digests").
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let malformed = || DigestError::Malformed(s.to_string());
        let (algorithm, hex) = s.split_once(':').ok_or_else(malformed)?;
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !algorithm_ok || hex.is_empty() {
            return Err(malformed());
        }
        if algorithm != "sha256" {
            return Err(DigestError::Algorithm(s.to_string()));
        }
        Self::from_hex(hex).ok_or_else(malformed)
    }

    /// Builds a digest from 64 lowercase hex characters.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| Self {
            hex: hex.to_string(),
        })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// Hashes everything `reader` yields; returns the digest and the byte count.
    pub fn of_reader(mut reader: impl Read) -> io::Result<(Self, u64)> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok((Self::from_hasher(hasher), total))
    }

    /// Finishes a running hash.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex characters (used as the file name in the cache).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex characters, as `docker images` shows IDs.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("abc"), FIPS 180-2 appendix B.1.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn hashes_known_vector() {
        assert_eq!(Digest::of(b"abc").hex(), ABC);
        let (d, n) = Digest::of_reader(&b"abc"[..]).expect("read from slice");
        assert_eq!((d.hex(), n), (ABC, 3));
        assert_eq!(Digest::of(b"abc").to_string(), format!("sha256:{ABC}"));
        assert_eq!(Digest::of(b"abc").short(), "ba7816bf8f01");
    }

    #[test]
    fn parses_and_rejects() {
        let d = Digest::parse(&format!("sha256:{ABC}")).expect("valid digest");
        assert_eq!(d.hex(), ABC);
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:abc",
            &format!("sha256:{}", ABC.to_uppercase()),
            &format!("sha256:{ABC}0"),
            &format!("SHA256:{ABC}"),
            &format!("sha256:{}g", &ABC[..63]),
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(DigestError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Digest::parse(&format!("sha512:{ABC}{ABC}")),
            Err(DigestError::Algorithm(_))
        ));
    }
}
