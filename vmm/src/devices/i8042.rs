//! Just enough of the i8042 keyboard controller for a guest to reboot: writing 0xFE
//! ("pulse reset line") to the command port ends the VM, which is how Linux restarts with
//! `reboot=k`. Reads return 0 (no data, input buffer empty) so probes and the reboot
//! path's wait loops finish at once.

use std::sync::Arc;

use super::stop::{StopReason, VmStop};
use crate::bus::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0": the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 stub at ports 0x60..=0x64.
pub struct I8042 {
    stop: Arc<VmStop>,
}

impl I8042 {
    /// A controller whose reset command stops the VM through `stop`.
    pub fn new(stop: Arc<VmStop>) -> Self {
        Self { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.stop.request(StopReason::Reset {
                triple_fault: false,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reset() {
        let stop = Arc::new(VmStop::new());
        let mut i8042 = I8042::new(stop.clone());
        i8042.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(
            stop.wait(),
            StopReason::Reset {
                triple_fault: false
            }
        );
    }

    #[test]
    fn other_writes_do_nothing_and_reads_are_zero() {
        let stop = Arc::new(VmStop::new());
        let mut i8042 = I8042::new(stop.clone());
        i8042.write(0, &[0xfe]); // data port, not the command port
        i8042.write(COMMAND_OFFSET, &[0xd1]);
        i8042.write(COMMAND_OFFSET, &[]);
        assert!(!stop.is_requested());
        let mut status = [0xffu8];
        i8042.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
