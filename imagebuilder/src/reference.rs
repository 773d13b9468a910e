//! Image references with Docker's normalization rules (distribution/reference:
//! `ParseNormalizedNamed`): `nginx` is `docker.io/library/nginx:latest`, a first component
//! with a `.` or `:` or equal to `localhost` is a registry, tags and `@sha256:` digests.

use std::fmt;

use crate::digest::{Digest, DigestError};

/// The registry of references that name none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag of references that give neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest `registry/repository` Docker accepts.
const NAME_MAX: usize = 255;
/// Longest tag (`[\w][\w.-]{0,127}`).
const TAG_MAX: usize = 128;

/// Why a reference was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Nothing was given.
    #[error("invalid reference format: empty image name")]
    Empty,
    /// A bare 64-hex string is an image ID, not a name.
    #[error("invalid repository name {0:?}: cannot specify 64-byte hexadecimal strings")]
    HexIdentifier(String),
    /// Repository names are lowercase.
    #[error("invalid reference format: repository name {0:?} must be lowercase")]
    Uppercase(String),
    /// Not `[registry/]path[:tag][@digest]`.
    #[error("invalid reference format: {0:?}")]
    Format(String),
    /// `registry/repository` is longer than 255 characters.
    #[error("invalid reference format: repository name must not be more than 255 characters")]
    NameTooLong,
    /// The tag has characters or a length Docker does not allow.
    #[error("invalid reference format: invalid tag {0:?}")]
    Tag(String),
    /// The digest is malformed or not sha256.
    #[error("invalid reference format: bad digest")]
    Digest(#[from] DigestError),
}

/// A normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalizes a reference the way `docker pull` does.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if Digest::from_hex(input).is_some() {
            return Err(ReferenceError::HexIdentifier(input.to_string()));
        }
        let format = || ReferenceError::Format(input.to_string());

        let (registry, remainder) = split_registry(input);
        let (name, digest) = match remainder.split_once('@') {
            Some((name, digest)) => (name, Some(Digest::parse(digest)?)),
            None => (remainder, None),
        };
        let (path, tag) = match name.split_once(':') {
            Some((path, tag)) => (path, Some(tag)),
            None => (name, None),
        };
        if path.to_lowercase() != path {
            return Err(ReferenceError::Uppercase(path.to_string()));
        }
        if !valid_registry(registry) || !path.split('/').all(valid_path_component) {
            return Err(format());
        }
        let path = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + path.len() > NAME_MAX {
            return Err(ReferenceError::NameTooLong);
        }
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(ReferenceError::Tag(tag.to_string()));
            }
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Self {
            registry: registry.to_string(),
            repository: path,
            tag,
            digest,
        })
    }

    /// The registry as written (`docker.io`, `localhost:5000`, `[::1]:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path (`library/nginx`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if pinned.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned (it wins
    /// over a tag, as in Docker), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Docker's `splitDockerDomain`: the first component is a registry only if it looks like a
/// host (a `.` or `:`, `localhost`, or uppercase letters, which a path cannot have).
fn split_registry(input: &str) -> (&str, &str) {
    match input.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.to_lowercase() != first =>
        {
            let registry = if first == "index.docker.io" {
                DEFAULT_REGISTRY
            } else {
                first
            };
            (registry, rest)
        }
        _ => (DEFAULT_REGISTRY, input),
    }
}

/// `host[:port]` where host is DNS labels or a bracketed IPv6 address.
pub(crate) fn valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("ipv6", port),
                None => return false,
            },
        }
    } else {
        match registry.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (registry, "0"),
        }
    };
    let label_ok = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    host.split('.').all(label_ok) && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= TAG_MAX
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn normalized(input: &str) -> String {
        match Reference::parse(input) {
            Ok(r) => r.to_string(),
            Err(e) => panic!("{input:?} rejected: {e}"),
        }
    }

    #[test]
    fn docker_normalization_table() {
        let cases = [
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/library/nginx", "docker.io/library/nginx:latest"),
            ("user/app", "docker.io/user/app:latest"),
            ("user/app/sub:v1", "docker.io/user/app/sub:v1"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app:dev", "localhost:5000/app:dev"),
            (
                "127.0.0.1:5000/library/busybox",
                "127.0.0.1:5000/library/busybox:latest",
            ),
            ("[::1]:5000/busybox", "[::1]:5000/busybox:latest"),
            ("quay.io/coreos/etcd:v3.5", "quay.io/coreos/etcd:v3.5"),
            (
                "ghcr.io/a-b/c_d.e__f---g",
                "ghcr.io/a-b/c_d.e__f---g:latest",
            ),
            ("Registry/app", "Registry/app:latest"),
            ("localhost:5000", "docker.io/library/localhost:5000"),
            ("app:Tag_1.2-x", "docker.io/library/app:Tag_1.2-x"),
        ];
        for (input, want) in cases {
            assert_eq!(normalized(input), want, "{input}");
        }
    }

    #[test]
    fn digests_pin_and_win_over_tags() {
        let r = Reference::parse(&format!("busybox@sha256:{HEX}")).expect("valid");
        assert_eq!(r.tag(), None);
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/busybox@sha256:{HEX}")
        );

        let r = Reference::parse(&format!("busybox:1.36@sha256:{HEX}")).expect("valid");
        assert_eq!(r.tag(), Some("1.36"));
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));

        let r = Reference::parse("busybox").expect("valid");
        assert_eq!(r.manifest_reference(), "latest");
        assert_eq!(
            (r.registry(), r.repository()),
            ("docker.io", "library/busybox")
        );
    }

    #[test]
    fn malformed_references_are_rejected_with_reasons() {
        use ReferenceError as E;
        let long = "a".repeat(250);
        type Check = fn(&ReferenceError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (String::new(), |e| matches!(e, E::Empty)),
            (HEX.to_string(), |e| matches!(e, E::HexIdentifier(_))),
            ("Nginx".into(), |e| matches!(e, E::Uppercase(_))),
            ("docker.io/Library/nginx".into(), |e| {
                matches!(e, E::Uppercase(_))
            }),
            ("nginx:".into(), |e| matches!(e, E::Tag(_))),
            ("nginx:-bad".into(), |e| matches!(e, E::Tag(_))),
            (format!("nginx:{}", "t".repeat(129)), |e| {
                matches!(e, E::Tag(_))
            }),
            ("nginx@sha256:abc".into(), |e| matches!(e, E::Digest(_))),
            (format!("nginx@md5:{HEX}"), |e| matches!(e, E::Digest(_))),
            (format!("nginx@sha256:{}", HEX.to_uppercase()), |e| {
                matches!(e, E::Digest(_))
            }),
            ("a//b".into(), |e| matches!(e, E::Format(_))),
            ("/nginx".into(), |e| matches!(e, E::Format(_))),
            ("nginx/".into(), |e| matches!(e, E::Format(_))),
            ("ngi nx".into(), |e| matches!(e, E::Format(_))),
            ("-nginx".into(), |e| matches!(e, E::Format(_))),
            ("nginx-".into(), |e| matches!(e, E::Format(_))),
            ("a..b".into(), |e| matches!(e, E::Format(_))),
            ("a___b".into(), |e| matches!(e, E::Format(_))),
            ("a.-b".into(), |e| matches!(e, E::Format(_))),
            ("host:port/app".into(), |e| matches!(e, E::Format(_))),
            ("-host.io/app".into(), |e| matches!(e, E::Format(_))),
            ("[zz]:5000/app".into(), |e| matches!(e, E::Format(_))),
            ("reg.io:/app".into(), |e| matches!(e, E::Format(_))),
            (format!("example.com/{long}"), |e| {
                matches!(e, E::NameTooLong)
            }),
        ];
        for (input, check) in cases {
            match Reference::parse(&input) {
                Ok(r) => panic!("{input:?} accepted as {r}"),
                Err(e) => assert!(check(&e), "{input:?}: unexpected error {e:?}"),
            }
        }
    }

    #[test]
    fn name_length_limit_counts_the_registry() {
        let path = "a".repeat(255 - "example.com/".len());
        assert!(Reference::parse(&format!("example.com/{path}")).is_ok());
        assert_eq!(
            Reference::parse(&format!("example.com/{path}a")),
            Err(ReferenceError::NameTooLong)
        );
    }
}
