//! Extended attributes of tar members, from PAX records: `SCHILY.xattr.NAME=VALUE` (GNU
//! tar, star, Go's archive/tar as Docker and BuildKit use it) and
//! `LIBARCHIVE.xattr.%ESCAPED=BASE64` (bsdtar). Untrusted: capped per member.

use base64::Engine as _;

/// Bytes of all extended attributes of one member together (names and values): Linux's
/// XATTR_SIZE_MAX for one value, which no real image comes near for a whole entry.
pub const MAX_XATTR_BYTES: usize = 64 * 1024;

/// Longest attribute name (Linux's XATTR_NAME_MAX).
pub const MAX_XATTR_NAME: usize = 255;

/// A member's extended attributes are malformed or larger than we keep.
#[derive(Debug, thiserror::Error)]
#[error("extended attributes exceed {MAX_XATTR_BYTES} bytes, or a name is empty, longer than {MAX_XATTR_NAME} bytes or malformed")]
pub struct BadXattr;

/// One extended attribute as the layer stores it: full name (`security.capability`) and
/// raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    /// Full name including its namespace prefix.
    pub name: Box<[u8]>,
    /// Raw value (may be empty).
    pub value: Box<[u8]>,
}

/// Applies one PAX record to `xattrs` if it is an xattr record; other keys are ignored.
pub fn pax_record(key: &[u8], value: &[u8], xattrs: &mut Vec<Xattr>) -> Result<(), BadXattr> {
    if let Some(name) = key.strip_prefix(SCHILY_XATTR) {
        add(xattrs, name.into(), value.into())
    } else if let Some(name) = key.strip_prefix(LIBARCHIVE_XATTR) {
        // libarchive: the name is %-escaped and the value base64 (its
        // archive_write_set_format_pax.c), so names with `=` or binary values survive.
        let name = percent_decode(name)?;
        let value = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| BadXattr)?;
        add(xattrs, name.into(), value.into())
    } else {
        Ok(())
    }
}

/// PAX key prefix of xattrs as GNU tar, Go's archive/tar (Docker, BuildKit) and star
/// write them: the rest of the key is the name, the value is raw bytes.
const SCHILY_XATTR: &[u8] = b"SCHILY.xattr.";

/// PAX key prefix of xattrs as libarchive (bsdtar) writes them.
const LIBARCHIVE_XATTR: &[u8] = b"LIBARCHIVE.xattr.";

/// Adds or replaces (a later record for the same name wins, as for every PAX key) one
/// attribute, keeping the list sorted and within [`MAX_XATTR_BYTES`].
fn add(xattrs: &mut Vec<Xattr>, name: Box<[u8]>, value: Box<[u8]>) -> Result<(), BadXattr> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains(&0) {
        return Err(BadXattr);
    }
    let xattr = Xattr { name, value };
    match xattrs.binary_search_by(|x| x.name.cmp(&xattr.name)) {
        Ok(i) => xattrs[i] = xattr,
        Err(i) => xattrs.insert(i, xattr),
    }
    let total: usize = xattrs.iter().map(|x| x.name.len() + x.value.len()).sum();
    if total > MAX_XATTR_BYTES {
        return Err(BadXattr);
    }
    Ok(())
}

/// Decodes `%XX` escapes.
fn percent_decode(text: &[u8]) -> Result<Vec<u8>, BadXattr> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or(BadXattr)?;
            let hex = std::str::from_utf8(hex).map_err(|_| BadXattr)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| BadXattr)?);
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    Ok(out)
}
