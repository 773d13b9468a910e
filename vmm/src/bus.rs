//! Address-range dispatch for vCPU exits: one bus for port I/O, one for MMIO. The vCPU loop
//! hands every access to a bus; only devices know what their registers mean.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the base it was inserted at.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; unset bytes read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A device range is empty or overlaps one already inserted.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Base address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let overlap = || BusError::Overlap { base, len };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(overlap)?;
        if let Some((prev_base, prev)) = self.ranges.range(..end).next_back() {
            if prev_base + prev.len > base {
                return Err(overlap());
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, &range.device))
    }

    /// Dispatches a read; returns false (and leaves `data` untouched) if nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

// A device whose lock was poisoned panicked mid-access; its state is still the best we
// have, and the VM is being torn down anyway by the panicking thread's exit.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).expect("small test offsets"));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let device = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x3f8, 8).expect("insert");
        assert!(bus.write(0x3fb, &[7]));
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x3f7, &[1]));
        assert_eq!(device.lock().expect("lock").0, vec![(3, vec![7])]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let device: SharedDevice = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x100, 0x10).expect("insert");
        assert!(bus.insert(device.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(device.clone(), 0xf8, 0x10).is_err());
        assert!(bus.insert(device.clone(), 0x200, 0).is_err());
        assert!(bus.insert(device, 0x110, 0x10).is_ok());
    }
}
