//! One virtio-blk request (virtio 1.2 §5.2.6) as the guest laid it out in a descriptor chain:
//! a 16-byte device-readable header, the data buffers, and a one-byte device-writable status.
//! Everything here comes from the guest, so the chain is checked whole before any byte of
//! the disk is touched: a request that passes [`parse`] can be served without further
//! bounds checks failing, and one that does not is answered without reading the file.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{MAX_REQUEST_BYTES, SECTOR_SIZE, SEG_MAX};
use crate::GuestMemory;

/// `struct virtio_blk_req` up to the data: type, reserved (ioprio), sector.
const HEADER_LEN: u32 = 16;
/// The status byte: VIRTIO_BLK_F_ZONED is not offered, so nothing else follows the data.
const STATUS_LEN: u32 = 1;

/// What the driver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// VIRTIO_BLK_T_IN: read from the disk into the data buffers.
    In,
    /// VIRTIO_BLK_T_OUT: write the data buffers to the disk.
    Out,
    /// VIRTIO_BLK_T_FLUSH: make earlier writes durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the device's identification string.
    GetId,
}

/// One guest buffer of a request's data, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
}

/// A well-formed request; its data segments are in the vector given to [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) kind: Kind,
    /// First 512-byte sector (for IN and OUT; the driver's value otherwise).
    pub(crate) sector: u64,
    /// Total bytes of the data segments.
    pub(crate) data_len: u32,
    /// Where the status byte goes.
    pub(crate) status: GuestAddress,
}

/// Why a chain is not a request this device serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// The last descriptor is not a one-byte, device-writable buffer inside guest memory,
    /// so there is nowhere to put an answer.
    #[error("no writable status byte")]
    NoStatus,
    /// The first descriptor is not a 16-byte, device-readable header.
    #[error("bad request header descriptor")]
    Header,
    /// The header lies outside guest memory.
    #[error("request header outside guest memory")]
    HeaderUnreadable,
    /// A request type this device does not implement (answered VIRTIO_BLK_S_UNSUPP).
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// More data segments than the SEG_MAX the device announces.
    #[error("more than {SEG_MAX} data segments")]
    TooManySegments,
    /// A data buffer the device would write is read-only, or the reverse.
    #[error("data buffer of the wrong direction")]
    WrongDirection,
    /// A data buffer reaches outside guest memory.
    #[error("data buffer outside guest memory")]
    OutsideMemory,
    /// A read or write without data.
    #[error("no data")]
    NoData,
    /// Data that is not whole sectors.
    #[error("{0} bytes of data is not a multiple of 512")]
    Unaligned(u64),
    /// More data than one request may carry.
    #[error("{0} bytes of data is more than a request may carry")]
    TooLarge(u64),
    /// The sectors lie (partly) beyond the end of the disk.
    #[error("sector {sector} + {len} bytes is beyond the end of the disk")]
    OutOfRange {
        /// First sector asked for.
        sector: u64,
        /// Bytes asked for.
        len: u64,
    },
}

/// A chain that is not served, and where its answer goes (none without a status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub(crate) status: Option<GuestAddress>,
    pub(crate) error: RequestError,
}

/// Checks the chain `descriptors` against a disk of `capacity` bytes and returns the
/// request, leaving its data segments in `segments` (cleared first; never more than
/// [`SEG_MAX`] entries, so its allocation stays bounded whatever the guest sends).
///
/// The descriptor iterator itself stops at the queue size (or the indirect table's), and
/// at invalid indexes, so walking to the last descriptor is bounded too.
pub(crate) fn parse(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemory,
    capacity: u64,
    segments: &mut Vec<Segment>,
) -> Result<Request, Rejected> {
    segments.clear();
    let mut header = None;
    let mut last: Option<Descriptor> = None;
    // Descriptors between the header and the last one, including those not kept.
    let mut data_count = 0usize;
    let mut directions_ok = (true, true); // (all device-writable, all device-readable)
    let mut outside = false;
    let mut data_len = 0u64;
    for desc in descriptors {
        if header.is_none() {
            header = Some(desc);
            continue;
        }
        let Some(data) = last.replace(desc) else {
            continue;
        };
        data_count += 1;
        directions_ok.0 &= data.is_write_only();
        directions_ok.1 &= !data.is_write_only();
        outside |= !in_memory(mem, data.addr(), data.len());
        data_len = data_len.saturating_add(u64::from(data.len()));
        if segments.len() < SEG_MAX {
            segments.push(Segment {
                addr: data.addr(),
                len: data.len(),
            });
        }
    }

    let status = last
        .filter(|d| d.is_write_only() && d.len() == STATUS_LEN && in_memory(mem, d.addr(), 1))
        .map(|d| d.addr());
    let reject = |error| Rejected { status, error };
    let Some(status) = status else {
        return Err(reject(RequestError::NoStatus));
    };
    let header = header
        .filter(|d| !d.is_write_only() && d.len() == HEADER_LEN)
        .ok_or(reject(RequestError::Header))?;
    let raw: [u8; 16] = mem
        .read_obj(header.addr())
        .map_err(|_| reject(RequestError::HeaderUnreadable))?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let kind = match request_type {
        VIRTIO_BLK_T_IN => Kind::In,
        VIRTIO_BLK_T_OUT => Kind::Out,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        other => return Err(reject(RequestError::Unsupported(other))),
    };
    let request = Request {
        kind,
        sector,
        data_len: 0,
        status,
    };
    // A flush carries no data (§5.2.6); whatever the driver attached is not looked at.
    if kind == Kind::Flush {
        segments.clear();
        return Ok(request);
    }

    if data_count > SEG_MAX {
        return Err(reject(RequestError::TooManySegments));
    }
    let device_writes = matches!(kind, Kind::In | Kind::GetId);
    let direction_ok = if device_writes {
        directions_ok.0
    } else {
        directions_ok.1
    };
    if !direction_ok {
        return Err(reject(RequestError::WrongDirection));
    }
    if outside {
        return Err(reject(RequestError::OutsideMemory));
    }
    if data_len == 0 {
        return Err(reject(RequestError::NoData));
    }
    if data_len > MAX_REQUEST_BYTES {
        return Err(reject(RequestError::TooLarge(data_len)));
    }
    // Bounded by MAX_REQUEST_BYTES just above.
    let data_len32 =
        u32::try_from(data_len).map_err(|_| reject(RequestError::TooLarge(data_len)))?;
    let request = Request {
        data_len: data_len32,
        ..request
    };
    if kind == Kind::GetId {
        return Ok(request);
    }
    if !data_len.is_multiple_of(SECTOR_SIZE) {
        return Err(reject(RequestError::Unaligned(data_len)));
    }
    let in_range = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(data_len))
        .is_some_and(|end| end <= capacity);
    if !in_range {
        return Err(reject(RequestError::OutOfRange {
            sector,
            len: data_len,
        }));
    }
    Ok(request)
}

/// Whether `len` bytes at `addr` are guest RAM (a length that does not fit usize is not).
fn in_memory(mem: &GuestMemory, addr: GuestAddress, len: u32) -> bool {
    usize::try_from(len).is_ok_and(|len| GuestMemoryBackend::check_range(mem, addr, len))
}
