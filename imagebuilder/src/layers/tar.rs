//! A streaming reader of layer tar streams (POSIX ustar, GNU long names, PAX extended
//! headers). Our own rather than the `tar` crate's because that one buffers long names
//! and PAX headers of any declared size in memory; here every byte is budgeted first.

use std::io::{self, Read};

use super::xattr::{self, BadXattr, Xattr};
use crate::limits::{Budget, LimitError};

/// Tar's block size; headers and content padding align to it.
const BLOCK: u64 = 512;

/// One header block.
type Block = [u8; 512];

/// Largest PAX extended header we read (real ones are a few hundred bytes; xattrs can
/// make them a few KiB).
const MAX_PAX_HEADER: u64 = 1024 * 1024;

/// Why a tar stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The (decompressed) stream failed; decompressors report corruption this way.
    #[error("read tar stream")]
    Io(#[from] io::Error),
    /// The stream ended before the end-of-archive marker or inside an entry.
    #[error("tar stream is truncated")]
    Truncated,
    /// Non-zero bytes follow the end-of-archive marker.
    #[error("tar stream has trailing data after its end")]
    TrailingData,
    /// A header's checksum does not match its bytes.
    #[error("tar header checksum mismatch")]
    Checksum,
    /// A numeric header field is not octal or base-256, or out of range.
    #[error("tar header field {0} is malformed")]
    BadNumber(&'static str),
    /// An entry type we do not unpack (GNU sparse, multi-volume, vendor types...).
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    /// A PAX extended header is malformed.
    #[error("malformed PAX extended header")]
    BadPax,
    /// A PAX extended header is larger than we read.
    #[error("PAX extended header exceeds {MAX_PAX_HEADER} bytes")]
    PaxTooLarge,
    /// A member's extended attributes are malformed or larger than we keep.
    #[error(transparent)]
    BadXattr(#[from] BadXattr),
    /// A cap was hit.
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// What an entry is, from its typeflag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file (`0`, `\0`, contiguous `7`).
    File,
    /// Hard link to an earlier member (`1`).
    HardLink,
    /// Symbolic link (`2`).
    Symlink,
    /// Character or block device (`3`, `4`).
    Device,
    /// Directory (`5`).
    Directory,
    /// Named pipe (`6`).
    Fifo,
}

/// One member's metadata, with GNU and PAX extensions applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The member name as stored (not yet normalized).
    pub path: Vec<u8>,
    /// Link target of hard and symbolic links.
    pub link: Vec<u8>,
    /// The entry type.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time in seconds since the epoch.
    pub mtime: i64,
    /// Bytes of content that follow (zero for every type but files).
    pub size: u64,
    /// Extended attributes from PAX records, sorted by name, one per name.
    pub xattrs: Vec<Xattr>,
}

/// Overrides collected from GNU `L`/`K` and PAX `x` headers for the next member.
#[derive(Default)]
struct Extensions {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<i64>,
    xattrs: Vec<Xattr>,
}

/// Reads members one by one; the current member's content is read through `Read`.
pub struct TarReader<'b, R> {
    inner: R,
    budget: &'b mut Budget,
    remaining: u64,
    padding: u64,
    ended: bool,
}

impl<'b, R: Read> TarReader<'b, R> {
    /// Reads `inner`, charging every byte and header to `budget` before reading it.
    pub fn new(inner: R, budget: &'b mut Budget) -> Self {
        TarReader {
            inner,
            budget,
            remaining: 0,
            padding: 0,
            ended: false,
        }
    }

    /// The budget, for callers that charge their own costs.
    pub fn budget(&mut self) -> &mut Budget {
        self.budget
    }

    /// The next member, skipping whatever of the previous one's content was not read;
    /// `None` after the end-of-archive marker (the rest of the stream must be zeros).
    pub fn next_header(&mut self) -> Result<Option<Header>, TarError> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;
        let mut ext = Extensions::default();
        loop {
            let mut block: Block = [0; 512];
            if read_full(&mut self.inner, &mut block)? != block.len() {
                return Err(TarError::Truncated);
            }
            self.budget.charge_bytes(BLOCK)?;
            self.budget.charge_entry()?;
            if block.iter().all(|&b| b == 0) {
                self.drain_trailer()?;
                self.ended = true;
                return Ok(None);
            }
            verify_checksum(&block)?;
            let declared = unsigned(&block[124..136], "size")?;
            let typeflag = block[156];
            match typeflag {
                b'L' => {
                    let limit = self.budget.limits().name_length + 1;
                    let name = self.read_extension(declared, limit, LimitError::NameLength)?;
                    ext.path = Some(trim_nuls(name));
                    continue;
                }
                b'K' => {
                    let limit = self.budget.limits().name_length + 1;
                    let link = self.read_extension(declared, limit, LimitError::NameLength)?;
                    ext.link = Some(trim_nuls(link));
                    continue;
                }
                b'x' => {
                    let data = self.read_pax(declared)?;
                    parse_pax(&data, &mut ext)?;
                    continue;
                }
                // Global PAX headers carry archive-wide defaults (comments, charset); no
                // layer tool relies on them for names or owners, so they are read and ignored.
                b'g' => {
                    self.read_pax(declared)?;
                    continue;
                }
                _ => {}
            }
            return self.member(&block, typeflag, declared, ext).map(Some);
        }
    }

    fn member(
        &mut self,
        block: &Block,
        typeflag: u8,
        declared: u64,
        ext: Extensions,
    ) -> Result<Header, TarError> {
        let path = match ext.path {
            Some(path) => path,
            None => header_name(block),
        };
        let kind = match typeflag {
            // A pre-POSIX archive marks directories by a trailing slash only.
            0 if path.ends_with(b"/") => Kind::Directory,
            b'0' | 0 | b'7' => Kind::File,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' | b'4' => Kind::Device,
            b'5' => Kind::Directory,
            b'6' => Kind::Fifo,
            other => return Err(TarError::UnsupportedType(char::from(other))),
        };
        // As Go's archive/tar (which writes most layers) does: only regular files have
        // content; the size field of every other type is ignored.
        let size = if kind == Kind::File {
            ext.size.unwrap_or(declared)
        } else {
            0
        };
        if kind == Kind::File {
            self.budget.check_file_size(size)?;
        }
        self.budget.charge_bytes(size + pad(size))?;
        let mode = unsigned(&block[100..108], "mode")?;
        let header = Header {
            path,
            link: ext.link.unwrap_or_else(|| cstr(&block[157..257]).to_vec()),
            kind,
            mode: u32::try_from(mode & 0o7777).map_err(|_| TarError::BadNumber("mode"))?,
            uid: ext
                .uid
                .map_or_else(|| unsigned(&block[108..116], "uid"), Ok)?,
            gid: ext
                .gid
                .map_or_else(|| unsigned(&block[116..124], "gid"), Ok)?,
            mtime: ext
                .mtime
                .map_or_else(|| number(&block[136..148], "mtime"), Ok)?,
            size,
            xattrs: ext.xattrs,
        };
        self.remaining = size;
        self.padding = pad(size);
        Ok(header)
    }

    fn read_pax(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_PAX_HEADER {
            return Err(TarError::PaxTooLarge);
        }
        self.read_extension(size, MAX_PAX_HEADER, LimitError::NameLength)
    }

    /// Reads the content of an extension header of at most `max` bytes.
    fn read_extension(
        &mut self,
        size: u64,
        max: u64,
        too_big: fn(u64) -> LimitError,
    ) -> Result<Vec<u8>, TarError> {
        if size > max {
            return Err(too_big(max.saturating_sub(1)).into());
        }
        self.budget.charge_bytes(size + pad(size))?;
        let mut data = vec![0; usize::try_from(size).map_err(|_| TarError::PaxTooLarge)?];
        if read_full(&mut self.inner, &mut data)? != data.len() {
            return Err(TarError::Truncated);
        }
        self.skip(pad(size))?;
        Ok(data)
    }

    fn skip(&mut self, n: u64) -> Result<(), TarError> {
        let skipped = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if skipped != n {
            return Err(TarError::Truncated);
        }
        Ok(())
    }

    /// After the first zero block only zeros may follow (the second zero block and the
    /// record padding tar writers add); reading to the end also makes the decompressor
    /// check its trailer (gzip CRC, zstd checksum) and reject trailing garbage.
    fn drain_trailer(&mut self) -> Result<(), TarError> {
        let mut chunk = [0u8; 8192];
        loop {
            let n = match self.inner.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err.into()),
            };
            self.budget.charge_bytes(n as u64)?;
            if chunk[..n].iter().any(|&b| b != 0) {
                return Err(TarError::TrailingData);
            }
        }
    }
}

impl<R: Read> Read for TarReader<'_, R> {
    /// Reads the current member's content; a stream that ends early is an error, never
    /// a short file.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "layer ends inside a file",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// The bytes of a NUL-terminated header field.
fn cstr(field: &[u8]) -> &[u8] {
    field
        .iter()
        .position(|&b| b == 0)
        .map_or(field, |end| &field[..end])
}

fn trim_nuls(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// The member name; POSIX ustar (magic `ustar\0`) splits long names into prefix and name,
/// while GNU tar (magic `ustar `) uses those bytes for other fields.
fn header_name(block: &Block) -> Vec<u8> {
    let name = cstr(&block[0..100]);
    let prefix = cstr(&block[345..500]);
    if &block[257..263] == b"ustar\0" && !prefix.is_empty() {
        let mut path = prefix.to_vec();
        path.push(b'/');
        path.extend_from_slice(name);
        path
    } else {
        name.to_vec()
    }
}

/// The header sum with the checksum field counted as spaces; old writers summed signed
/// bytes, so either sum is accepted (as GNU tar and Go do).
fn verify_checksum(block: &Block) -> Result<(), TarError> {
    let stored = unsigned(&block[148..156], "checksum")?;
    let (mut unsigned_sum, mut signed_sum) = (0u64, 0i64);
    for (i, &byte) in block.iter().enumerate() {
        let byte = if (148..156).contains(&i) { b' ' } else { byte };
        unsigned_sum += u64::from(byte);
        signed_sum += i64::from(byte as i8);
    }
    if stored == unsigned_sum || i64::try_from(stored) == Ok(signed_sum) {
        Ok(())
    } else {
        Err(TarError::Checksum)
    }
}

fn unsigned(field: &[u8], name: &'static str) -> Result<u64, TarError> {
    u64::try_from(number(field, name)?).map_err(|_| TarError::BadNumber(name))
}

/// Parses a numeric field: octal text padded with spaces or NULs, or GNU base-256 (high
/// bit of the first byte set; two's complement when the next bit is set too).
fn number(field: &[u8], name: &'static str) -> Result<i64, TarError> {
    let bad = || TarError::BadNumber(name);
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            let invert = if first & 0x40 != 0 { 0xff } else { 0 };
            let mut value: u64 = 0;
            for (i, &byte) in field.iter().enumerate() {
                let byte = if i == 0 {
                    (byte ^ invert) & 0x7f
                } else {
                    byte ^ invert
                };
                if value >> 56 != 0 {
                    return Err(bad());
                }
                value = value << 8 | u64::from(byte);
            }
            let value = i64::try_from(value).map_err(|_| bad())?;
            return Ok(if invert == 0xff { !value } else { value });
        }
    }
    let text = trim_field(field);
    if text.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(text).map_err(|_| bad())?;
    i64::from_str_radix(text, 8)
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(bad)
}

fn trim_field(field: &[u8]) -> &[u8] {
    let is_pad = |b: &u8| *b == b' ' || *b == 0;
    let start = field.iter().position(|b| !is_pad(b)).unwrap_or(field.len());
    let end = field
        .iter()
        .rposition(|b| !is_pad(b))
        .map_or(start, |e| e + 1);
    &field[start..end]
}

/// Parses PAX records (`"<len> <key>=<value>\n"`, POSIX pax "extended header") into `ext`.
fn parse_pax(mut data: &[u8], ext: &mut Extensions) -> Result<(), TarError> {
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or(TarError::BadPax)?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or(TarError::BadPax)?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(TarError::BadPax);
        }
        let record = &data[space + 1..len - 1];
        data = &data[len..];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TarError::BadPax)?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        // An empty value deletes the override (POSIX pax: "zero length ... shall delete").
        let set = !value.is_empty();
        match key {
            b"path" => ext.path = set.then(|| value.to_vec()),
            b"linkpath" => ext.link = set.then(|| value.to_vec()),
            b"size" => ext.size = set.then(|| pax_unsigned(value)).transpose()?,
            b"uid" => ext.uid = set.then(|| pax_unsigned(value)).transpose()?,
            b"gid" => ext.gid = set.then(|| pax_unsigned(value)).transpose()?,
            b"mtime" => ext.mtime = set.then(|| pax_seconds(value)).transpose()?,
            _ if key.starts_with(b"GNU.sparse.") => return Err(TarError::UnsupportedType('S')),
            _ => {
                xattr::pax_record(key, value, &mut ext.xattrs)?;
            }
        }
    }
    Ok(())
}

fn pax_unsigned(value: &[u8]) -> Result<u64, TarError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(TarError::BadPax)
}

/// PAX times are decimal seconds with an optional fraction; the fraction is dropped.
fn pax_seconds(value: &[u8]) -> Result<i64, TarError> {
    let whole = value.split(|&b| b == b'.').next().unwrap_or(value);
    std::str::from_utf8(whole)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(TarError::BadPax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn gnu(path: &str, kind: ::tar::EntryType, size: u64) -> ::tar::Header {
        let mut header = ::tar::Header::new_gnu();
        header.set_path(path).expect("path");
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        header
    }

    fn pax_header(records: &[(&str, &[u8])]) -> (::tar::Header, Vec<u8>) {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
            // The length counts its own digits.
            let mut len = body.len() + 1;
            while len.to_string().len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.extend_from_slice(&body);
        }
        let mut header = ::tar::Header::new_ustar();
        header.set_path("PaxHeaders/x").expect("path");
        header.set_entry_type(::tar::EntryType::XHeader);
        header.set_size(data.len() as u64);
        header.set_cksum();
        (header, data)
    }

    fn finish(builder: ::tar::Builder<Vec<u8>>) -> Vec<u8> {
        builder.into_inner().expect("finish tar")
    }

    /// Every member with its content, or the first error.
    fn read_all(bytes: &[u8], limits: Limits) -> Result<Vec<(Header, Vec<u8>)>, TarError> {
        let mut budget = Budget::new(limits);
        let mut reader = TarReader::new(bytes, &mut budget);
        let mut out = Vec::new();
        while let Some(header) = reader.next_header()? {
            let mut content = Vec::new();
            reader.read_to_end(&mut content)?;
            out.push((header, content));
        }
        Ok(out)
    }

    fn sample() -> Vec<u8> {
        let mut builder = ::tar::Builder::new(Vec::new());
        builder
            .append(&gnu("etc/", ::tar::EntryType::Directory, 0), &b""[..])
            .expect("dir");
        let long = format!("usr/{}/file", "n".repeat(150));
        let mut header = gnu("x", ::tar::EntryType::Regular, 5);
        header.set_uid(3_000_000_000);
        header.set_gid(7);
        header.set_mode(0o4755);
        builder
            .append_data(&mut header, &long, &b"hello"[..])
            .expect("long name");
        let mut link = gnu("x", ::tar::EntryType::Symlink, 0);
        builder
            .append_link(&mut link, "etc/link", "n".repeat(200))
            .expect("long link");
        finish(builder)
    }

    #[test]
    fn reads_gnu_long_names_and_base256_ids() {
        let members = read_all(&sample(), Limits::default()).expect("valid archive");
        assert_eq!(members.len(), 3);
        assert_eq!(members[0].0.kind, Kind::Directory);
        let (file, content) = &members[1];
        assert_eq!(
            file.path,
            format!("usr/{}/file", "n".repeat(150)).as_bytes()
        );
        assert_eq!((file.uid, file.gid, file.mode), (3_000_000_000, 7, 0o4755));
        assert_eq!(content, b"hello");
        assert_eq!(members[2].0.kind, Kind::Symlink);
        assert_eq!(members[2].0.link, "n".repeat(200).as_bytes());
    }

    #[test]
    fn pax_records_override_the_header_and_count_xattrs() {
        let mut builder = ::tar::Builder::new(Vec::new());
        let (pax, data) = pax_header(&[
            ("path", b"very/long/pax/name"),
            ("uid", b"5000000000"),
            ("mtime", b"1700000000.25"),
            ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
        ]);
        builder.append(&pax, &data[..]).expect("pax");
        builder
            .append(&gnu("short", ::tar::EntryType::Regular, 2), &b"hi"[..])
            .expect("file");
        let members = read_all(&finish(builder), Limits::default()).expect("valid");
        let (header, content) = &members[0];
        assert_eq!(header.path, b"very/long/pax/name");
        assert_eq!(header.uid, 5_000_000_000);
        assert_eq!(header.mtime, 1_700_000_000);
        assert_eq!(
            header.xattrs,
            [Xattr {
                name: (*b"security.capability").into(),
                value: (*b"\x01\x00\x00\x02").into(),
            }]
        );
        assert_eq!(content, b"hi");
    }

    #[test]
    fn xattrs_of_both_pax_dialects_are_kept_sorted_and_capped() {
        let mut builder = ::tar::Builder::new(Vec::new());
        let (pax, data) = pax_header(&[
            ("SCHILY.xattr.user.z", b"binary\n\0="),
            ("SCHILY.xattr.user.empty", b""),
            ("LIBARCHIVE.xattr.user.a%3Db", b"aGk="),
            ("SCHILY.xattr.user.z", b"last wins"),
        ]);
        builder.append(&pax, &data[..]).expect("pax");
        builder
            .append(&gnu("f", ::tar::EntryType::Regular, 0), &b""[..])
            .expect("file");
        let members = read_all(&finish(builder), Limits::default()).expect("valid");
        let got: Vec<(&[u8], &[u8])> = members[0]
            .0
            .xattrs
            .iter()
            .map(|x| (&*x.name, &*x.value))
            .collect();
        let want: [(&[u8], &[u8]); 3] = [
            (b"user.a=b", b"hi"),
            (b"user.empty", b""),
            (b"user.z", b"last wins"),
        ];
        assert_eq!(got, want);
        for records in [
            vec![("SCHILY.xattr.user.big", vec![b'v'; xattr::MAX_XATTR_BYTES])],
            vec![("SCHILY.xattr.", b"x".to_vec())],
            vec![("LIBARCHIVE.xattr.user.x", b"not base64!".to_vec())],
            vec![("LIBARCHIVE.xattr.user.%zz", b"aGk=".to_vec())],
        ] {
            let records: Vec<(&str, &[u8])> =
                records.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            let mut builder = ::tar::Builder::new(Vec::new());
            let (pax, data) = pax_header(&records);
            builder.append(&pax, &data[..]).expect("pax");
            builder
                .append(&gnu("f", ::tar::EntryType::Regular, 0), &b""[..])
                .expect("file");
            let got = read_all(&finish(builder), Limits::default());
            assert!(matches!(got, Err(TarError::BadXattr(_))), "{records:?}");
        }
    }

    #[test]
    fn unread_content_is_skipped() {
        let bytes = sample();
        let mut budget = Budget::new(Limits::default());
        let mut reader = TarReader::new(&bytes[..], &mut budget);
        let mut kinds = Vec::new();
        while let Some(header) = reader.next_header().expect("valid") {
            kinds.push(header.kind);
        }
        assert_eq!(kinds, [Kind::Directory, Kind::File, Kind::Symlink]);
    }

    #[test]
    fn header_only_types_carry_no_content() {
        // Go's archive/tar ignores the size of links, directories, devices and fifos;
        // so do we, or the two would disagree on where the next header starts.
        let mut builder = ::tar::Builder::new(Vec::new());
        let mut dir = gnu("d/", ::tar::EntryType::Directory, 0);
        dir.set_size(1024);
        dir.set_cksum();
        builder.append(&dir, &b""[..]).expect("dir");
        builder
            .append(&gnu("f", ::tar::EntryType::Regular, 1), &b"x"[..])
            .expect("file");
        let members = read_all(&finish(builder), Limits::default()).expect("valid");
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].0.size, 0);
        assert_eq!(members[1].1, b"x");
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let bytes = sample();
        let end = bytes.len() - 1024;
        for cut in [0, 100, 512, 700, 1024, 1536, end - 512, end] {
            let got = read_all(&bytes[..cut], Limits::default());
            assert!(
                matches!(got, Err(TarError::Truncated) | Err(TarError::Io(_))),
                "cut at {cut}: {got:?}"
            );
        }
    }

    #[test]
    fn only_zeros_may_follow_the_end() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[0; 4096]);
        assert!(read_all(&bytes, Limits::default()).is_ok());
        bytes.extend_from_slice(b"garbage");
        assert!(matches!(
            read_all(&bytes, Limits::default()),
            Err(TarError::TrailingData)
        ));
    }

    #[test]
    fn corrupt_headers_are_errors() {
        let mut bytes = sample();
        bytes[0] ^= 1;
        assert!(matches!(
            read_all(&bytes, Limits::default()),
            Err(TarError::Checksum)
        ));
        let mut builder = ::tar::Builder::new(Vec::new());
        builder
            .append(&gnu("s", ::tar::EntryType::GNUSparse, 0), &b""[..])
            .expect("sparse");
        assert!(matches!(
            read_all(&finish(builder), Limits::default()),
            Err(TarError::UnsupportedType('S'))
        ));
        let mut builder = ::tar::Builder::new(Vec::new());
        let (pax, mut data) = pax_header(&[("uid", b"12")]);
        data[0] = b'7';
        builder.append(&pax, &data[..]).expect("pax");
        let got = read_all(&finish(builder), Limits::default());
        assert!(matches!(got, Err(TarError::BadPax)), "{got:?}");
    }

    #[test]
    fn numbers_parse_octal_and_base256() {
        assert_eq!(number(b"0000755\0", "mode").expect("octal"), 0o755);
        assert_eq!(number(b"  17 \0", "mode").expect("padded"), 0o17);
        assert_eq!(number(b"\0\0\0\0", "mode").expect("empty"), 0);
        assert_eq!(number(&[0x80, 0, 0, 1, 0], "size").expect("base-256"), 256);
        assert_eq!(number(&[0xff; 8], "mtime").expect("negative"), -1);
        assert!(number(b"0008", "mode").is_err());
        assert!(number(&[0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0], "size").is_err());
    }

    #[test]
    fn limits_stop_reading_before_the_content() {
        let small = |limits: Limits| read_all(&sample(), limits);
        let tight = Limits {
            name_length: 100,
            ..Limits::default()
        };
        assert!(matches!(
            small(tight),
            Err(TarError::Limit(LimitError::NameLength(100)))
        ));
        let tight = Limits {
            file_size: 4,
            ..Limits::default()
        };
        assert!(matches!(
            small(tight),
            Err(TarError::Limit(LimitError::FileSize(4)))
        ));
        let tight = Limits {
            entries: 2,
            ..Limits::default()
        };
        assert!(matches!(
            small(tight),
            Err(TarError::Limit(LimitError::Entries(2)))
        ));
        // A header promising 1 TiB is refused before a byte of it is read.
        let mut builder = ::tar::Builder::new(Vec::new());
        let header = gnu("big", ::tar::EntryType::Regular, 1 << 40);
        builder.append(&header, &b""[..]).expect("header only");
        let bytes = builder.get_ref().clone();
        let got = read_all(&bytes, Limits::default());
        assert!(matches!(got, Err(TarError::Limit(LimitError::FileSize(_)))));
        let roomy_file = Limits {
            file_size: u64::MAX,
            ..Limits::default()
        };
        let got = read_all(&bytes, roomy_file);
        assert!(matches!(
            got,
            Err(TarError::Limit(LimitError::TotalSize(_)))
        ));
        let (pax, _) = pax_header(&[]);
        let mut huge_pax = pax.clone();
        huge_pax.set_size(MAX_PAX_HEADER + 1);
        huge_pax.set_cksum();
        let mut bytes = huge_pax.as_bytes().to_vec();
        bytes.resize(bytes.len() + 4096, b'1');
        assert!(matches!(
            read_all(&bytes, Limits::default()),
            Err(TarError::PaxTooLarge)
        ));
    }
}
