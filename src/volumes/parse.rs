//! The value syntax of `run -v`, `--mount` and `--tmpfs`, with Docker's rules and, where
//! Docker has one, its error message. Pure parsing: host paths are checked and volumes made
//! later (`resolve`), once, before the container exists.

use std::path::PathBuf;

use guest_init::TmpfsMount;

use super::{MountSpec, SpecSource};
use crate::volumes::store::is_volume_name;

/// `-v, --volume [SRC:]DST[:OPTS]`: SRC is a host directory (absolute, or relative starting
/// with `.`), or a volume name; DST alone is an anonymous volume. OPTS: `ro`/`rw`, and
/// Docker's `z`, `Z` and `nocopy`, which change nothing here.
pub fn parse_volume(text: &str) -> Result<MountSpec, String> {
    let invalid = || format!("invalid volume specification: '{text}'");
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => (None, *target, None),
        // `/dst:ro` would be an anonymous volume with a mode, which Docker refuses.
        [_, second] if is_mode(second) => return Err(invalid()),
        [source, target] => (Some(*source), *target, None),
        [source, target, mode] => (Some(*source), *target, Some(*mode)),
        _ => return Err(invalid()),
    };
    if target.is_empty() || source.is_some_and(str::is_empty) {
        return Err(invalid());
    }
    let read_only = match mode {
        None => false,
        Some(mode) => parse_mode(mode)?,
    };
    let source = match source {
        None => SpecSource::Volume(None),
        Some(path) if is_host_path(path) => SpecSource::Bind {
            path: PathBuf::from(path),
            create: true,
        },
        Some(name) => SpecSource::Volume(Some(volume_name(name)?)),
    };
    Ok(MountSpec {
        source,
        target: clean_target(target)?,
        read_only,
    })
}

/// `--mount type=bind|volume|tmpfs,source=...,target=...[,readonly][,tmpfs-size=...]...`
/// (Docker's keys; the type defaults to volume). Like Docker's, the value is one CSV
/// record: `"src=/a,b",dst=/c` names the directory `/a,b`.
pub fn parse_mount(text: &str) -> Result<MountSpec, String> {
    let mut kind = "volume";
    let mut source = None;
    let mut target = None;
    let mut read_only = false;
    let mut tmpfs = TmpfsMount::default();
    let mut tmpfs_option = None;
    let fields = csv_fields(text)?;
    for field in &fields {
        let field = field.as_str();
        let (key, value) = match field.split_once('=') {
            Some((key, value)) => (key.trim().to_ascii_lowercase(), Some(value)),
            None => (field.trim().to_ascii_lowercase(), None),
        };
        let required =
            || value.ok_or_else(|| format!("invalid field '{field}' must be a key=value pair"));
        match key.as_str() {
            "type" => kind = required()?,
            "source" | "src" => source = Some(required()?),
            "target" | "destination" | "dst" => target = Some(required()?),
            "readonly" | "ro" => read_only = parse_bool(&key, value)?,
            "volume-nocopy" | "consistency" => {}
            "tmpfs-size" => {
                tmpfs.size_bytes = Some(parse_size(required()?)?);
                tmpfs_option = Some(key);
            }
            "tmpfs-mode" => {
                tmpfs.mode = Some(parse_tmpfs_mode(required()?)?);
                tmpfs_option = Some(key);
            }
            "volume-driver" if value == Some("local") => {}
            "bind-propagation" | "volume-driver" | "volume-opt" | "volume-label"
            | "volume-subpath" | "bind-recursive" | "bind-nonrecursive" | "tmpfs-options" => {
                return Err(format!("the mount option '{key}' is not supported"));
            }
            _ => return Err(format!("unexpected key '{key}' in '{field}'")),
        }
    }
    let target = target.ok_or("target is required")?;
    let source = source.filter(|s| !s.is_empty());
    let mount_error = |why: &str| format!("invalid mount config for type \"{kind}\": {why}");
    if let (Some(option), false) = (&tmpfs_option, kind == "tmpfs") {
        return Err(format!("cannot mix '{option}' with mount type '{kind}'"));
    }
    let source = match kind {
        "bind" => SpecSource::Bind {
            path: PathBuf::from(
                source.ok_or_else(|| mount_error("field Source must not be empty"))?,
            ),
            create: false,
        },
        "volume" => SpecSource::Volume(source.map(volume_name).transpose()?),
        "tmpfs" if source.is_some() => return Err(mount_error("field Source must be empty")),
        "tmpfs" => SpecSource::Tmpfs(tmpfs),
        other => {
            return Err(format!(
                "invalid mount type '{other}' (bind, volume or tmpfs)"
            ))
        }
    };
    Ok(MountSpec {
        source,
        target: clean_target(target)?,
        read_only,
    })
}

/// The fields of one CSV record (RFC 4180, as Go's `encoding/csv` reads it): a field
/// starting with `"` runs to the next lone `"`, with `""` standing for a quote.
fn csv_fields(text: &str) -> Result<Vec<String>, String> {
    let bad = || format!("invalid CSV in '{text}'");
    let mut fields = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err(bad()),
                }
            }
            if !matches!(chars.peek(), None | Some(',')) {
                return Err(bad());
            }
        } else {
            while let Some(&c) = chars.peek() {
                match c {
                    ',' => break,
                    '"' => return Err(bad()),
                    _ => field.push(c),
                }
                chars.next();
            }
        }
        fields.push(field);
        if chars.next().is_none() {
            return Ok(fields);
        }
    }
}

/// `--tmpfs PATH[:OPTIONS]`: OPTIONS are comma separated `size=64m`, `mode=1777`, `ro`,
/// `rw`, `exec`, `noexec`, and `nosuid`/`nodev` (always on, as in Docker).
pub fn parse_tmpfs(text: &str) -> Result<MountSpec, String> {
    let (target, options) = text.split_once(':').unwrap_or((text, ""));
    let mut tmpfs = TmpfsMount::default();
    let mut read_only = false;
    for option in options.split(',').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some(("size", size)) => tmpfs.size_bytes = Some(parse_size(size)?),
            Some(("mode", mode)) => tmpfs.mode = Some(parse_tmpfs_mode(mode)?),
            None if option == "ro" => read_only = true,
            None if option == "rw" => read_only = false,
            None if option == "exec" => tmpfs.exec = true,
            None if option == "noexec" => tmpfs.exec = false,
            None if matches!(option, "nosuid" | "nodev") => {}
            _ => return Err(format!("unsupported tmpfs option '{option}'")),
        }
    }
    Ok(MountSpec {
        source: SpecSource::Tmpfs(tmpfs),
        target: clean_target(target)?,
        read_only,
    })
}

/// Whether a `-v` source names a host path rather than a volume (Docker takes a source
/// starting with `/` as a path; its CLI also resolves those starting with `.`).
fn is_host_path(source: &str) -> bool {
    source.starts_with('/') || source.starts_with('.')
}

fn volume_name(name: &str) -> Result<String, String> {
    if is_volume_name(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "\"{name}\" includes invalid characters for a local volume name, only \
             \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host \
             directory, use absolute path"
        ))
    }
}

fn is_mode(text: &str) -> bool {
    parse_mode(text).is_ok()
}

/// `-v`'s third field: comma-separated `ro`/`rw` (one of them at most), `z`, `Z`, `nocopy`.
fn parse_mode(text: &str) -> Result<bool, String> {
    let invalid = || format!("invalid mode: {text}");
    let mut access = None;
    for option in text.split(',') {
        match option {
            "ro" | "rw" if access.is_some() => return Err(invalid()),
            "ro" => access = Some(true),
            "rw" => access = Some(false),
            "z" | "Z" | "nocopy" => {}
            _ => return Err(invalid()),
        }
    }
    Ok(access.unwrap_or(false))
}

/// A container path as Docker cleans it (`filepath.Clean`): absolute, `.` and empty
/// components dropped, `..` applied; `/` itself is refused.
pub fn clean_target(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!(
            "invalid mount path: '{text}' mount path must be absolute"
        ));
    }
    if text.contains('\0') {
        return Err(format!("invalid mount path: {text:?}"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for component in text.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return Err("invalid specification: destination can't be '/'".into());
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Go's `strconv.ParseBool`, a missing value meaning true (`readonly` alone).
fn parse_bool(key: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(format!("invalid value for {key}: {other}")),
    }
}

/// A tmpfs size: bytes, or with `k`, `m`, `g` or `t` (powers of 1024, optionally followed
/// by `b` or `ib`, any case).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size: '{text}'");
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let unit = unit.to_ascii_lowercase();
    let mut rest = unit.as_str();
    let mut shift = 0;
    if let Some(power) = rest.chars().next().and_then(|c| "kmgt".find(c)) {
        shift = 10 * (power + 1);
        rest = &rest[1..];
        rest = rest.strip_prefix('i').unwrap_or(rest);
    }
    if !matches!(rest, "" | "b") {
        return Err(invalid());
    }
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size too large: '{text}'"))
}

/// A tmpfs mode in octal, at most 7777.
fn parse_tmpfs_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o7777 && !text.starts_with('+') => Ok(mode),
        _ => Err(format!("invalid tmpfs mode '{text}' (octal, at most 7777)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(path: &str, create: bool) -> SpecSource {
        SpecSource::Bind {
            path: PathBuf::from(path),
            create,
        }
    }

    fn spec(source: SpecSource, target: &str, read_only: bool) -> MountSpec {
        MountSpec {
            source,
            target: target.into(),
            read_only,
        }
    }

    #[test]
    fn volume_flags_follow_docker() {
        let cases = [
            ("/host:/ctr", spec(bind("/host", true), "/ctr", false)),
            ("/host:/ctr:ro", spec(bind("/host", true), "/ctr", true)),
            ("/host:/ctr:rw,z", spec(bind("/host", true), "/ctr", false)),
            ("./rel:/ctr/", spec(bind("./rel", true), "/ctr", false)),
            (".:/x//y/../z", spec(bind(".", true), "/x/z", false)),
            (
                "data:/var/lib/data:Z,ro",
                spec(
                    SpecSource::Volume(Some("data".into())),
                    "/var/lib/data",
                    true,
                ),
            ),
            ("/anon", spec(SpecSource::Volume(None), "/anon", false)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_volume(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_volume_flags_get_one_line_errors() {
        let cases = [
            ("/ctr:ro", "invalid volume specification: '/ctr:ro'"),
            ("a:b:c:d", "invalid volume specification: 'a:b:c:d'"),
            (":/ctr", "invalid volume specification: ':/ctr'"),
            ("/host:", "invalid volume specification: '/host:'"),
            ("/host:/ctr:rx", "invalid mode: rx"),
            ("/host:/ctr:ro,rw", "invalid mode: ro,rw"),
            (
                "/host:ctr",
                "invalid mount path: 'ctr' mount path must be absolute",
            ),
            ("/host:/", "invalid specification: destination can't be '/'"),
            (
                "/host:/a/..",
                "invalid specification: destination can't be '/'",
            ),
            (
                "ctr",
                "invalid mount path: 'ctr' mount path must be absolute",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_volume(text), Err(want.to_string()), "{text}");
        }
        for name in ["a", "-x", "my vol", "a/b", "_x"] {
            let err = parse_volume(&format!("{name}:/ctr")).expect_err(name);
            assert!(
                err.contains("invalid characters for a local volume name"),
                "{err}"
            );
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn mount_flags_follow_docker() {
        let cases = [
            (
                "type=bind,source=/h,target=/c",
                spec(bind("/h", false), "/c", false),
            ),
            (
                "type=bind,src=rel,dst=/c,readonly",
                spec(bind("rel", false), "/c", true),
            ),
            (
                "type=bind,src=/h,destination=/c,ro=false",
                spec(bind("/h", false), "/c", false),
            ),
            (
                "source=vol,target=/c,ro=1,volume-nocopy",
                spec(SpecSource::Volume(Some("vol".into())), "/c", true),
            ),
            (
                "type=volume,target=/c",
                spec(SpecSource::Volume(None), "/c", false),
            ),
            (
                "type=tmpfs,destination=/run,tmpfs-size=64m,tmpfs-mode=1770",
                spec(
                    SpecSource::Tmpfs(TmpfsMount {
                        size_bytes: Some(64 << 20),
                        mode: Some(0o1770),
                        exec: false,
                    }),
                    "/run",
                    false,
                ),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_mount(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_mount_flags_get_one_line_errors() {
        let cases = [
            ("type=bind,source=/h", "target is required"),
            (
                "type=bind,target=/c",
                "invalid mount config for type \"bind\": field Source must not be empty",
            ),
            (
                "type=tmpfs,source=x,target=/c",
                "invalid mount config for type \"tmpfs\": field Source must be empty",
            ),
            (
                "type=bind,source=/h,target=/c,tmpfs-size=1m",
                "cannot mix 'tmpfs-size' with mount type 'bind'",
            ),
            (
                "type=nfs,target=/c",
                "invalid mount type 'nfs' (bind, volume or tmpfs)",
            ),
            (
                "type=bind,src=/h,target=/c,color=red",
                "unexpected key 'color' in 'color=red'",
            ),
            (
                "type=bind,src=/h,target=/c,readonly=maybe",
                "invalid value for readonly: maybe",
            ),
            (
                "type,target=/c",
                "invalid field 'type' must be a key=value pair",
            ),
            (
                "type=tmpfs,target=/c,tmpfs-mode=9",
                "invalid tmpfs mode '9' (octal, at most 7777)",
            ),
            (
                "type=tmpfs,target=/c,tmpfs-size=lots",
                "invalid size: 'lots'",
            ),
            (
                "type=volume,target=c",
                "invalid mount path: 'c' mount path must be absolute",
            ),
            (
                "type=bind,src=/h,target=/c,bind-propagation=shared",
                "the mount option 'bind-propagation' is not supported",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_mount(text), Err(want.to_string()), "{text}");
        }
    }

    #[test]
    fn mount_values_are_csv() {
        assert_eq!(
            csv_fields(r#"a,"b,c",d"#),
            Ok(vec!["a".into(), "b,c".into(), "d".into()])
        );
        assert_eq!(
            csv_fields(r#""x""y",,"#),
            Ok(vec![r#"x"y"#.into(), String::new(), String::new()])
        );
        for bad in [r#""open"#, r#"a"b"#, r#""a"b"#] {
            assert_eq!(csv_fields(bad), Err(format!("invalid CSV in '{bad}'")));
        }
        assert_eq!(
            parse_mount(r#"type=bind,"src=/a,b",dst=/c"#),
            Ok(spec(bind("/a,b", false), "/c", false))
        );
    }

    #[test]
    fn tmpfs_flags_take_size_mode_and_access() {
        let tmpfs = |size_bytes, mode, exec| {
            SpecSource::Tmpfs(TmpfsMount {
                size_bytes,
                mode,
                exec,
            })
        };
        let cases = [
            ("/run", spec(tmpfs(None, None, false), "/run", false)),
            ("/run:", spec(tmpfs(None, None, false), "/run", false)),
            (
                "/run:size=64m,mode=1777",
                spec(tmpfs(Some(64 << 20), Some(0o1777), false), "/run", false),
            ),
            (
                "/x:ro,exec,nosuid,nodev,size=4096",
                spec(tmpfs(Some(4096), None, true), "/x", true),
            ),
            (
                "/x:size=1g,rw",
                spec(tmpfs(Some(1 << 30), None, false), "/x", false),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_tmpfs(text), Ok(want), "{text}");
        }
        assert_eq!(
            parse_tmpfs("/x:uid=1000"),
            Err("unsupported tmpfs option 'uid=1000'".into())
        );
        assert_eq!(
            parse_tmpfs("/x:mode=8"),
            Err("invalid tmpfs mode '8' (octal, at most 7777)".into())
        );
        assert!(parse_tmpfs("x").is_err() && parse_tmpfs("/").is_err());
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("1tb"), Ok(1 << 40));
        for bad in ["", "m", "1x", "1.5m", "-1", "1mm", " 1m"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_size("99999999999t"),
            Err("size too large: '99999999999t'".into())
        );
    }
}
