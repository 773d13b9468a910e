//! The initramfs parts a boot places back to back at the top of low RAM. They are owned by
//! the load and gone when it returns: a packed root archive is read from its file straight
//! into guest memory, and the small per-run archive is dropped once copied, so nothing the
//! size of an image stays in the host process for the VM's lifetime.

use std::fs::File;
use std::io::Seek;

use vm_memory::{Bytes, GuestAddress};

use super::boot::{initrd_addr, BootError, Initrd};
use crate::GuestMemory;

/// One archive of the initramfs.
#[derive(Debug)]
pub enum InitramfsPart {
    /// Bytes the caller built (the per-run archive with init and its config).
    Bytes(Vec<u8>),
    /// An archive file (a cached packed image), read into guest memory without a copy in
    /// the host's heap. Its length is taken when the load starts; a file that shrinks
    /// meanwhile fails the load.
    File(File),
}

impl InitramfsPart {
    /// Bytes this part occupies in guest memory before padding.
    fn len(&self) -> Result<u64, BootError> {
        match self {
            Self::Bytes(bytes) => Ok(bytes.len() as u64),
            Self::File(file) => file
                .metadata()
                .map(|meta| meta.len())
                .map_err(BootError::InitramfsRead),
        }
    }
}

impl From<Vec<u8>> for InitramfsPart {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Bytes(bytes)
    }
}

/// Places `parts` back to back, each padded to 4 bytes (the kernel's unpacker skips NULs
/// between archives), as high in low RAM as fits above `kernel_end`, and drops them.
pub(crate) fn write(
    mem: &GuestMemory,
    parts: Vec<InitramfsPart>,
    kernel_end: u64,
    low_ram_end: u64,
) -> Result<Option<Initrd>, BootError> {
    let lens = parts
        .iter()
        .map(InitramfsPart::len)
        .collect::<Result<Vec<u64>, _>>()?;
    let size = lens.iter().try_fold(0u64, |sum, len| {
        sum.checked_add(len.next_multiple_of(4))
            .ok_or(BootError::InitramfsTooLarge {
                size: u64::MAX,
                room: 0,
            })
    })?;
    if size == 0 {
        return Ok(None);
    }
    let addr = initrd_addr(size, kernel_end, low_ram_end)?;
    let mut at = addr;
    for (part, len) in parts.into_iter().zip(lens) {
        // Fresh anonymous memory is zero, so the padding needs no writing.
        match part {
            InitramfsPart::Bytes(bytes) => mem.write_slice(&bytes, GuestAddress(at)),
            InitramfsPart::File(mut file) => {
                let len = usize::try_from(len)
                    .map_err(|_| BootError::InitramfsTooLarge { size, room: 0 })?;
                file.rewind().map_err(BootError::InitramfsRead)?;
                mem.read_exact_volatile_from(GuestAddress(at), &mut file, len)
            }
        }
        .map_err(|source| BootError::Write {
            what: "initramfs",
            source,
        })?;
        at += len.next_multiple_of(4);
    }
    Ok(Some(Initrd { addr, size }))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::GuestMemoryMmap;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn memory(size: u64) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(size).expect("size"))])
            .expect("memory")
    }

    #[test]
    fn a_file_and_bytes_land_back_to_back_padded() {
        let mem = memory(64 * MIB);
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(b"abcde").expect("write");
        let parts = vec![InitramfsPart::File(file), b"xyz".to_vec().into()];
        let initrd = write(&mem, parts, 32 * MIB, 64 * MIB)
            .expect("write")
            .expect("initrd");
        assert_eq!(initrd.size, 12);
        let mut placed = [0u8; 12];
        mem.read_slice(&mut placed, GuestAddress(initrd.addr))
            .expect("read");
        assert_eq!(&placed, b"abcde\0\0\0xyz\0");
    }

    #[test]
    fn no_parts_no_initrd() {
        let mem = memory(64 * MIB);
        assert_eq!(
            write(&mem, Vec::new(), 32 * MIB, 64 * MIB).expect("ok"),
            None
        );
    }

    #[test]
    fn a_file_too_big_is_refused_before_reading() {
        let mem = memory(64 * MIB);
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(40 * MIB).expect("grow");
        assert!(matches!(
            write(&mem, vec![InitramfsPart::File(file)], 32 * MIB, 64 * MIB),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }
}
