//! Legacy port-I/O devices: the serial console, the i8042 reset line and the status port.
