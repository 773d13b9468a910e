//! The exit-status port: the guest's init writes one 32-bit word (the host<->init contract
//! encodes it) with a 4-byte `out`, and the VM ends with that word. Narrower writes are
//! ignored, so a stray byte-sized `out` cannot end the VM with a forged status.

use std::sync::Arc;

use super::stop::{StopReason, VmStop};
use crate::bus::BusDevice;

/// The status register at layout::STATUS_PORT.
pub struct StatusPort {
    stop: Arc<VmStop>,
}

impl StatusPort {
    /// A port whose 32-bit writes stop the VM through `stop`.
    pub fn new(stop: Arc<VmStop>) -> Self {
        Self { stop }
    }
}

impl BusDevice for StatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Ok(word)) = (offset, <[u8; 4]>::try_from(data)) {
            self.stop
                .request(StopReason::Status(u32::from_le_bytes(word)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_32_bit_write_records_the_word() {
        let stop = Arc::new(VmStop::new());
        let mut port = StatusPort::new(stop.clone());
        port.write(0, &0x0000_012a_u32.to_le_bytes());
        port.write(0, &7u32.to_le_bytes());
        assert_eq!(stop.wait(), StopReason::Status(0x12a));
    }

    #[test]
    fn narrow_or_misaligned_writes_are_ignored() {
        let stop = Arc::new(VmStop::new());
        let mut port = StatusPort::new(stop.clone());
        port.write(0, &[1]);
        port.write(0, &[1, 0]);
        port.write(1, &[1, 0, 0]);
        assert!(!stop.is_requested());
    }
}
