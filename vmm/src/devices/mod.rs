//! Legacy port-I/O devices: the serial console, the i8042 reset line and the status port,
//! plus the stop request through which devices and vCPUs end the VM.

pub mod i8042;
pub mod serial;
pub mod status;
pub mod stop;

pub use i8042::I8042;
pub use serial::SerialPort;
pub use status::StatusPort;
pub use stop::{StopReason, VmStop};
