//! Member names to safe paths: every name from a layer is normalized to components below
//! the image root before it touches the merged tree, so no entry can name anything else.

use crate::limits::{Budget, LimitError};

/// Longest single component the kernel accepts (NAME_MAX).
const MAX_COMPONENT: usize = 255;

/// Why a member name was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The name is empty.
    #[error("empty name")]
    Empty,
    /// The name contains a NUL byte.
    #[error("name contains a NUL byte")]
    Nul,
    /// The name is not UTF-8 (the archive writer keeps names as text).
    #[error("name is not UTF-8")]
    NotUtf8,
    /// The name starts with `/`.
    #[error("absolute name")]
    Absolute,
    /// `..` components climb above the image root.
    #[error("name escapes the image root")]
    Escapes,
    /// One component is longer than NAME_MAX.
    #[error("a name component exceeds {MAX_COMPONENT} bytes")]
    ComponentTooLong,
    /// A length or depth cap was hit.
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// Normalizes a member name to its components: `.` and empty components vanish, `..`
/// removes the previous component (as containerd's `filepath.Clean`), and anything
/// climbing above the root, absolute, empty, with NUL or too long or deep is an error.
/// The empty result is the root itself (`./` in a layer).
pub fn normalize(raw: &[u8], budget: &Budget) -> Result<Vec<String>, PathError> {
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    if raw.contains(&0) {
        return Err(PathError::Nul);
    }
    budget.check_name_length(raw.len())?;
    let text = std::str::from_utf8(raw).map_err(|_| PathError::NotUtf8)?;
    if text.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let mut parts: Vec<String> = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or(PathError::Escapes)?;
            }
            _ if part.len() > MAX_COMPONENT => return Err(PathError::ComponentTooLong),
            _ => parts.push(part.to_string()),
        }
    }
    budget.check_depth(parts.len())?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn norm(raw: &[u8]) -> Result<Vec<String>, PathError> {
        normalize(raw, &Budget::new(Limits::default()))
    }

    #[test]
    fn cleans_dots_and_slashes() {
        assert_eq!(
            norm(b"./usr//bin/./sh").expect("valid"),
            ["usr", "bin", "sh"]
        );
        assert_eq!(norm(b"etc/").expect("valid"), ["etc"]);
        assert_eq!(norm(b"a/b/../c").expect("valid"), ["a", "c"]);
        assert!(norm(b"./").expect("root").is_empty());
        assert!(norm(b".").expect("root").is_empty());
    }

    #[test]
    fn rejects_escapes_and_garbage() {
        assert!(matches!(norm(b""), Err(PathError::Empty)));
        assert!(matches!(norm(b"/etc/passwd"), Err(PathError::Absolute)));
        assert!(matches!(norm(b"../etc"), Err(PathError::Escapes)));
        assert!(matches!(norm(b"a/../../etc"), Err(PathError::Escapes)));
        assert!(matches!(norm(b"./.."), Err(PathError::Escapes)));
        assert!(matches!(norm(b"a\0b"), Err(PathError::Nul)));
        assert!(matches!(norm(b"a\xffb"), Err(PathError::NotUtf8)));
        let long_component = "x".repeat(MAX_COMPONENT + 1);
        assert!(matches!(
            norm(long_component.as_bytes()),
            Err(PathError::ComponentTooLong)
        ));
    }

    #[test]
    fn enforces_length_and_depth_limits() {
        let limits = Limits {
            name_length: 10,
            depth: 3,
            ..Limits::default()
        };
        let budget = Budget::new(limits);
        assert!(normalize(b"a/b/c", &budget).is_ok());
        assert!(matches!(
            normalize(b"a/b/c/d", &budget),
            Err(PathError::Limit(LimitError::Depth(3)))
        ));
        assert!(matches!(
            normalize(b"abcdefghijk", &budget),
            Err(PathError::Limit(LimitError::NameLength(10)))
        ));
    }
}
