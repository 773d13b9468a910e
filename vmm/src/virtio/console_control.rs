//! The control queues of the virtio-console device (virtio 1.2 §5.3.6.2), which exist
//! because it offers VIRTIO_CONSOLE_F_MULTIPORT: through them the host announces port 0 as
//! a *generic* port named [`PORT_NAME`], which Linux makes the char device
//! `/dev/vport<dev>p0` (drivers/char/virtio_console.c). Its `write()` queues up to 32 KiB
//! per buffer without waiting for the host, where the hvc console (the port the device
//! would be without the feature, or after a CONSOLE_PORT message, which is never sent)
//! copies at most a page per call and spins until the host has taken it.
//!
//! The handshake, Linux's side in parentheses: (probe fills the control receiveq, sends
//! DEVICE_READY) → PORT_ADD 0 → (the port's receiveq0 is filled, PORT_READY 0) →
//! PORT_NAME and PORT_OPEN 0 = 1 (host connected: until then the port's writes block and
//! its reads return 0) → (PORT_OPEN 0 = 1 when init opens the device, 0 when it closes).
//!
//! Every message comes from the guest: one of the wrong length, for another port or with
//! an event the guest may not send is ignored and counted, and what the host queues in
//! reply is bounded by [`MAX_REPLIES`].

use std::collections::VecDeque;
use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::{drain_queue, DeviceError};
use crate::GuestMemory;

/// Index of the control receiveq (host to guest, §5.3.2).
pub(crate) const CONTROL_RECEIVE_QUEUE: u32 = 2;
/// Index of the control transmitq (guest to host).
pub(crate) const CONTROL_TRANSMIT_QUEUE: u32 = 3;
/// The name port 0 is given (its sysfs `name`, what init looks for).
pub const PORT_NAME: &str = "katalite.channel";
/// Size of `struct virtio_console_control`: id u32, event u16, value u16, little-endian.
pub(crate) const CONTROL_LEN: usize = 8;
/// Most replies waiting for control receive buffers. A driver setting one port up needs
/// three (PORT_ADD, PORT_NAME, PORT_OPEN); more only pile up for a guest that keeps asking
/// without posting buffers, and are dropped.
const MAX_REPLIES: usize = 16;
/// The one port; max_nr_ports is 1.
const PORT: u32 = 0;

// Control events (include/uapi/linux/virtio_console.h).
pub(crate) const DEVICE_READY: u16 = 0;
pub(crate) const PORT_ADD: u16 = 1;
pub(crate) const PORT_READY: u16 = 3;
pub(crate) const PORT_OPEN: u16 = 6;
pub(crate) const PORT_NAME_EVENT: u16 = 7;

/// One control message, without the data some events append (a port's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ControlMessage {
    pub(crate) id: u32,
    pub(crate) event: u16,
    pub(crate) value: u16,
}

impl ControlMessage {
    /// The message in `bytes`, which must be exactly one (Linux sends nothing else).
    pub(crate) fn parse(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; CONTROL_LEN] = bytes.try_into().ok()?;
        Some(Self {
            id: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            event: u16::from_le_bytes([bytes[4], bytes[5]]),
            value: u16::from_le_bytes([bytes[6], bytes[7]]),
        })
    }

    /// The message's bytes followed by `data`.
    pub(crate) fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(CONTROL_LEN + data.len());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.event.to_le_bytes());
        out.extend_from_slice(&self.value.to_le_bytes());
        out.extend_from_slice(data);
        out
    }
}

/// The host side of the control protocol for port 0.
#[derive(Debug, Default)]
pub(crate) struct Control {
    /// Messages for the guest, each written whole into one control receive buffer.
    replies: VecDeque<Vec<u8>>,
    /// The guest has the port open (its last PORT_OPEN said 1): only then does the port
    /// keep what arrives on receiveq0 (a closed generic port discards it, `in_intr`).
    guest_open: bool,
    /// Messages ignored: malformed, for another port, or events only the host sends.
    ignored: u64,
    /// Replies dropped: queue full, or a receive buffer too small for the message.
    dropped: u64,
}

impl Control {
    /// Whether the guest has the port open.
    pub(crate) fn guest_open(&self) -> bool {
        self.guest_open
    }

    /// Messages from the guest ignored so far.
    #[cfg(test)]
    pub(crate) fn ignored(&self) -> u64 {
        self.ignored
    }

    /// Replies dropped so far.
    #[cfg(test)]
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Replies waiting for receive buffers.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.replies.len()
    }

    /// Takes the guest's control messages from the control transmitq; each buffer is used
    /// with length 0 (only read). Replies wait for [`Self::receive`].
    pub(crate) fn transmit(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        drain_queue(queue, mem, |chain| {
            match read_message(chain, mem) {
                Some(message) => self.handle(message),
                None => self.ignored += 1,
            }
            Ok(0)
        })
    }

    /// Writes waiting replies into the guest's control receive buffers, one per buffer, in
    /// order. Buffers stay available while there is nothing to say.
    pub(crate) fn receive(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        for _ in 0..queue.size() {
            if self.replies.is_empty() {
                break;
            }
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let reply = self.replies.pop_front().unwrap_or_default();
            let len = match write_reply(chain, mem, &reply) {
                Some(len) => len,
                None => {
                    self.dropped += 1;
                    0
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used)
    }

    /// Acts on one message from the guest.
    pub(crate) fn handle(&mut self, message: ControlMessage) {
        let ControlMessage { id, event, value } = message;
        match (event, value) {
            // Sent with the id VIRTIO_CONSOLE_BAD_ID by Linux; any id is taken. A new
            // driver (after a reset) starts from scratch.
            (DEVICE_READY, 1) => {
                self.replies.clear();
                self.guest_open = false;
                self.reply(PORT_ADD, 1, &[]);
            }
            (PORT_READY, 1) if id == PORT => {
                self.reply(PORT_NAME_EVENT, 1, PORT_NAME.as_bytes());
                // The host end is always connected: the console's output is taken (or
                // held back by the writer's backpressure) from the start.
                self.reply(PORT_OPEN, 1, &[]);
            }
            (PORT_OPEN, 0 | 1) if id == PORT => self.guest_open = value == 1,
            // DEVICE_READY or PORT_READY 0 report a failure in the guest, which then has
            // no channel; nothing to answer.
            (DEVICE_READY | PORT_READY, 0) => {}
            _ => self.ignored += 1,
        }
    }

    fn reply(&mut self, event: u16, value: u16, data: &[u8]) {
        if self.replies.len() >= MAX_REPLIES {
            self.dropped += 1;
            return;
        }
        let message = ControlMessage {
            id: PORT,
            event,
            value,
        };
        self.replies.push_back(message.encode(data));
    }
}

/// The control message in `chain`'s device-readable bytes, if they are exactly one.
fn read_message(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Option<ControlMessage> {
    let mut reader = chain.reader(mem).ok()?;
    if reader.available_bytes() != CONTROL_LEN {
        return None;
    }
    let mut bytes = [0u8; CONTROL_LEN];
    reader.read_exact(&mut bytes).ok()?;
    ControlMessage::parse(&bytes)
}

/// Writes `reply` into `chain`'s device-writable part and returns its length; `None` when
/// it does not fit whole (Linux posts page-sized buffers, so only a broken guest sees it).
fn write_reply(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    reply: &[u8],
) -> Option<u32> {
    let mut writer = chain.writer(mem).ok()?;
    if writer.available_bytes() < reply.len() {
        return None;
    }
    writer.write_all(reply).ok()?;
    u32::try_from(reply.len()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_only_exact_lengths_parse() {
        let message = ControlMessage {
            id: 0xffff_ffff,
            event: PORT_OPEN,
            value: 1,
        };
        let bytes = message.encode(&[]);
        assert_eq!(bytes, [0xff, 0xff, 0xff, 0xff, 6, 0, 1, 0]);
        assert_eq!(ControlMessage::parse(&bytes), Some(message));
        assert_eq!(ControlMessage::parse(&bytes[..7]), None);
        assert_eq!(ControlMessage::parse(&[0; 9]), None);
        assert_eq!(
            ControlMessage {
                id: 0,
                event: PORT_NAME_EVENT,
                value: 1
            }
            .encode(b"ab")
            .len(),
            10
        );
    }

    #[test]
    fn the_handshake_names_and_opens_port_zero_and_tracks_the_guest() {
        let mut control = Control::default();
        let ready = |event, value| ControlMessage {
            id: PORT,
            event,
            value,
        };
        control.handle(ControlMessage {
            id: u32::MAX,
            event: DEVICE_READY,
            value: 1,
        });
        control.handle(ready(PORT_READY, 1));
        let replies: Vec<_> = control.replies.drain(..).collect();
        assert_eq!(replies[0], ready(PORT_ADD, 1).encode(&[]));
        assert_eq!(
            replies[1],
            ready(PORT_NAME_EVENT, 1).encode(b"katalite.channel")
        );
        assert_eq!(replies[2], ready(PORT_OPEN, 1).encode(&[]));
        assert_eq!(replies.len(), 3);
        assert!(!control.guest_open());
        control.handle(ready(PORT_OPEN, 1));
        assert!(control.guest_open());
        control.handle(ready(PORT_OPEN, 0));
        assert!(!control.guest_open());
        assert_eq!(control.ignored, 0);
    }

    #[test]
    fn hostile_messages_are_ignored_and_replies_stay_bounded() {
        let mut control = Control::default();
        for (id, event, value) in [
            (1, PORT_READY, 1),
            (7, PORT_OPEN, 1),
            (PORT, PORT_OPEN, 2),
            (PORT, PORT_ADD, 1),
            (PORT, 4, 1),
            (PORT, PORT_NAME_EVENT, 1),
            (PORT, 0xffff, 0xffff),
            (PORT, DEVICE_READY, 7),
        ] {
            control.handle(ControlMessage { id, event, value });
        }
        assert_eq!(control.ignored, 8);
        assert!(!control.guest_open());
        assert!(control.replies.is_empty());
        for _ in 0..1000 {
            control.handle(ControlMessage {
                id: PORT,
                event: PORT_READY,
                value: 1,
            });
        }
        assert_eq!(control.replies.len(), MAX_REPLIES);
        assert_eq!(control.dropped, 2000 - MAX_REPLIES as u64);
    }
}
