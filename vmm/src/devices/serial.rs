//! COM1: vm-superio's 16550A model on the port-I/O bus, its interrupt delivered through an
//! EventFd that KVM injects as SERIAL_IRQ (irqfd). The output is the guest kernel's log:
//! it is forwarded a line at a time, and the last few KiB are kept so that after a reset
//! the "Kernel panic - not syncing" line can be reported.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// How much of the log is kept for [`SerialPort::panic_line`].
pub const TAIL_SIZE: usize = 4096;
/// Forward buffered output once this much is pending even without a newline.
const FORWARD_THRESHOLD: usize = 4096;
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// Raises the serial interrupt by signalling the irqfd.
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Line-buffered forwarder that remembers the tail of what went through.
struct LogWriter {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    tail: VecDeque<u8>,
}

impl LogWriter {
    fn forward(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.flush());
        self.pending.clear();
        result
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            if self.tail.len() == TAIL_SIZE {
                self.tail.pop_front();
            }
            self.tail.push_back(byte);
        }
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= FORWARD_THRESHOLD {
            self.forward()?;
        }
        Ok(buf.len())
    }

    // The UART model flushes after every byte; forwarding per line keeps a boot log from
    // costing one host write per character.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's COM1.
pub struct SerialPort {
    uart: vm_superio::Serial<IrqLine, NoEvents, LogWriter>,
}

impl SerialPort {
    /// A UART raising `irq` and writing the guest's output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let writer = LogWriter {
            out,
            pending: Vec::new(),
            tail: VecDeque::with_capacity(TAIL_SIZE),
        };
        Self {
            uart: vm_superio::Serial::new(IrqLine(irq), writer),
        }
    }

    /// Forwards output still waiting for its newline (call when the VM has stopped).
    pub fn finish(&mut self) -> io::Result<()> {
        self.uart.writer_mut().forward()
    }

    /// The last "Kernel panic - not syncing: ..." line in the kept tail, if any.
    pub fn panic_line(&self) -> Option<String> {
        let (front, back) = self.uart.writer().tail.as_slices();
        find_panic(&[front, back].concat())
    }
}

fn find_panic(log: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(log);
    let start = text.rfind(PANIC_MARKER)?;
    let line = text[start..].lines().next()?;
    Some(line.trim_end().to_owned())
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The 8250 has byte-wide registers; wider accesses read as nothing.
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A failing host writer (closed pipe) must not stop the guest; the byte is
            // lost, as on a real UART with nothing attached.
            let _ = self.uart.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn port() -> (SerialPort, Shared, EventFd) {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let port = SerialPort::new(irq.try_clone().expect("clone"), Box::new(out.clone()));
        (port, out, irq)
    }

    fn type_text(port: &mut SerialPort, text: &str) {
        for byte in text.bytes() {
            port.write(0, &[byte]);
        }
    }

    #[test]
    fn output_is_forwarded_a_line_at_a_time() {
        let (mut port, out, _irq) = port();
        type_text(&mut port, "hello\nwor");
        assert_eq!(out.0.lock().expect("lock").concat(), b"hello\n");
        type_text(&mut port, "ld");
        port.finish().expect("finish");
        let writes = out.0.lock().expect("lock").clone();
        assert_eq!(writes, vec![b"hello\n".to_vec(), b"world".to_vec()]);
    }

    #[test]
    fn the_panic_line_is_found_in_the_tail() {
        let (mut port, _out, _irq) = port();
        type_text(&mut port, "[    1.0] boot\r\n");
        assert_eq!(port.panic_line(), None);
        type_text(
            &mut port,
            "[    2.0] Kernel panic - not syncing: sysrq triggered crash\r\n[    2.1] CPU: 0\r\n",
        );
        assert_eq!(
            port.panic_line().as_deref(),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
    }

    #[test]
    fn the_tail_is_bounded() {
        let (mut port, _out, _irq) = port();
        type_text(&mut port, "Kernel panic - not syncing: old\n");
        type_text(&mut port, &"x".repeat(TAIL_SIZE));
        assert_eq!(port.uart.writer().tail.len(), TAIL_SIZE);
        assert_eq!(port.panic_line(), None);
    }

    #[test]
    fn enabling_the_tx_interrupt_signals_the_irqfd() {
        let (mut port, _out, irq) = port();
        // IER bit 1: transmitter holding register empty interrupt.
        port.write(1, &[0x02]);
        assert_eq!(irq.read().expect("interrupt raised"), 1);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (mut port, out, _irq) = port();
        port.write(0, b"ab\n");
        port.finish().expect("finish");
        assert!(out.0.lock().expect("lock").is_empty());
        let mut data = [0xffu8; 2];
        port.read(5, &mut data);
        assert_eq!(data, [0, 0]);
    }
}
