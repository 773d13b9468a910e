//! The protobuf wire format, as much of it as the task API uses: varints and
//! length-delimited fields. Hand-written because the messages are few and fixed, and a
//! generated-code crate (prost, protobuf) would cost more of the binary's 8 MB budget than
//! the whole shim.

use thiserror::Error;

/// A message that is not valid protobuf.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ends inside a field.
    #[error("truncated protobuf message")]
    Truncated,
    /// A varint longer than 10 bytes.
    #[error("overlong varint")]
    Varint,
    /// Wire types 3 and 4 (groups) and 6, 7 do not occur in proto3.
    #[error("unsupported wire type {0}")]
    WireType(u64),
    /// A string field that is not UTF-8.
    #[error("string field is not UTF-8")]
    Utf8,
}

/// One field's value as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// Wire type 0: int32/int64/uint32/uint64/bool/enum.
    Varint(u64),
    /// Wire type 2: string/bytes/message/packed.
    Bytes(&'a [u8]),
    /// Wire types 1 and 5, kept only to be skipped.
    Fixed,
}

impl<'a> Value<'a> {
    /// The field as a string; other wire types (a newer peer's) read as empty.
    pub fn string(self) -> Result<String, DecodeError> {
        match self {
            Value::Bytes(bytes) => std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| DecodeError::Utf8),
            _ => Ok(String::new()),
        }
    }

    /// The field as an unsigned integer (0 for another wire type).
    pub fn uint(self) -> u64 {
        match self {
            Value::Varint(value) => value,
            _ => 0,
        }
    }

    /// The field as a 32-bit unsigned integer, truncated as protobuf does.
    pub fn u32(self) -> u32 {
        // protobuf's own rule for uint32 fields: the low 32 bits.
        u32::try_from(self.uint() & u64::from(u32::MAX)).unwrap_or(0)
    }

    /// The field's bytes (empty for another wire type).
    pub fn bytes(self) -> &'a [u8] {
        match self {
            Value::Bytes(bytes) => bytes,
            _ => &[],
        }
    }
}

/// Calls `each(field number, value)` for every field of `buf`, in order.
pub fn fields<'a>(
    buf: &'a [u8],
    mut each: impl FnMut(u32, Value<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let field = u32::try_from(key >> 3).map_err(|_| DecodeError::Truncated)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(buf, &mut pos)?),
            1 => {
                pos = skip(buf, pos, 8)?;
                Value::Fixed
            }
            2 => {
                let len =
                    usize::try_from(varint(buf, &mut pos)?).map_err(|_| DecodeError::Truncated)?;
                let start = pos;
                pos = skip(buf, pos, len)?;
                Value::Bytes(&buf[start..pos])
            }
            5 => {
                pos = skip(buf, pos, 4)?;
                Value::Fixed
            }
            other => return Err(DecodeError::WireType(other)),
        };
        each(field, value)?;
    }
    Ok(())
}

fn skip(buf: &[u8], pos: usize, len: usize) -> Result<usize, DecodeError> {
    pos.checked_add(len)
        .filter(|end| *end <= buf.len())
        .ok_or(DecodeError::Truncated)
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in 0..10 {
        let byte = *buf.get(*pos).ok_or(DecodeError::Truncated)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (shift * 7);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::Varint)
}

fn low_byte(value: u64) -> u8 {
    u8::try_from(value & 0x7f).unwrap_or(0)
}

/// Builds one message; proto3 leaves zero scalars and empty strings out.
#[derive(Default, Debug)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    fn raw_varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.buf.push(low_byte(value) | 0x80);
            value >>= 7;
        }
        self.buf.push(low_byte(value));
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.raw_varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// A varint field (unsigned, bool, enum), left out when zero.
    pub fn uint(&mut self, field: u32, value: u64) -> &mut Self {
        if value != 0 {
            self.key(field, 0);
            self.raw_varint(value);
        }
        self
    }

    /// A signed varint field (int32/int64: two's complement in 10 bytes when negative).
    pub fn int(&mut self, field: u32, value: i64) -> &mut Self {
        self.uint(field, value as u64)
    }

    /// A bool field.
    pub fn bool(&mut self, field: u32, value: bool) -> &mut Self {
        self.uint(field, u64::from(value))
    }

    /// A string or bytes field, left out when empty.
    pub fn bytes(&mut self, field: u32, value: &[u8]) -> &mut Self {
        if !value.is_empty() {
            self.message(field, value);
        }
        self
    }

    /// A string field, left out when empty.
    pub fn string(&mut self, field: u32, value: &str) -> &mut Self {
        self.bytes(field, value.as_bytes())
    }

    /// A message field, written even when empty (its presence can matter).
    pub fn message(&mut self, field: u32, value: &[u8]) -> &mut Self {
        self.key(field, 2);
        self.raw_varint(value.len() as u64);
        self.buf.extend_from_slice(value);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(buf: &[u8]) -> Result<Vec<(u32, Value<'_>)>, DecodeError> {
        let mut out = Vec::new();
        fields(buf, |field, value| {
            out.push((field, value));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn fields_round_trip() {
        let mut encoder = Encoder::new();
        encoder
            .uint(1, 1234)
            .string(2, "task")
            .uint(3, 0)
            .string(4, "")
            .int(5, -1)
            .message(6, &[])
            .bool(7, true);
        let buf = encoder.finish();
        let got = collect(&buf).expect("decode");
        assert_eq!(
            got,
            vec![
                (1, Value::Varint(1234)),
                (2, Value::Bytes(b"task")),
                (5, Value::Varint(u64::MAX)),
                (6, Value::Bytes(b"")),
                (7, Value::Varint(1)),
            ]
        );
        assert_eq!(got[0].1.u32(), 1234);
        assert_eq!(got[1].1.string().expect("utf8"), "task");
    }

    #[test]
    fn the_connect_reply_of_the_reference_encodes_as_containerd_does() {
        let mut encoder = Encoder::new();
        encoder.uint(1, 1234).uint(2, 1240);
        assert_eq!(encoder.finish(), [0x08, 0xd2, 0x09, 0x10, 0xd8, 0x09]);
    }

    #[test]
    fn hostile_input_is_an_error_never_a_panic() {
        assert_eq!(collect(&[0x0a, 0x05, b'a']), Err(DecodeError::Truncated));
        assert_eq!(collect(&[0x08]), Err(DecodeError::Truncated));
        assert_eq!(
            collect(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Varint)
        );
        assert_eq!(collect(&[0x0b]), Err(DecodeError::WireType(3)));
        assert_eq!(
            collect(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(DecodeError::Truncated)
        );
        assert!(
            matches!(collect(&[0x09, 1, 2, 3, 4, 5, 6, 7, 8]), Ok(v) if v == vec![(1, Value::Fixed)])
        );
        assert_eq!(Value::Bytes(&[0xff]).string(), Err(DecodeError::Utf8));
    }
}
