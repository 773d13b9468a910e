//! What the fuzz targets share: the input formats they decode (one place, so that
//! `examples/seed_corpus.rs` writes seeds the targets read), the virtio driver that plays a
//! hostile guest against a device behind the real MMIO transport, and small oracles.

pub mod driver;
pub mod input;

/// Splits a `layer_merge` input into layers (at most three).
pub const LAYER_SEPARATOR: &[u8] = b"\n--katalite-layer--\n";

/// The names in a newc archive, in order; `None` if it is not one (a header cut short,
/// a size that is not hex, a missing trailer).
pub fn cpio_names(archive: &[u8]) -> Option<Vec<String>> {
    const HEADER: usize = 110;
    let hex = |field: &[u8]| {
        std::str::from_utf8(field)
            .ok()
            .and_then(|text| usize::from_str_radix(text, 16).ok())
    };
    // newc pads the header plus name, and the data, to 4 bytes.
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut names = Vec::new();
    let mut at = 0;
    loop {
        let header = archive.get(at..at + HEADER)?;
        if &header[..6] != b"070701" {
            return None;
        }
        // Fields are 8 hex digits after the magic: filesize is the 7th, namesize the 12th.
        let file_size = hex(&header[6 + 6 * 8..6 + 7 * 8])?;
        let name_size = hex(&header[6 + 11 * 8..6 + 12 * 8])?;
        let name = archive.get(at + HEADER..at + HEADER + name_size.checked_sub(1)?)?;
        let name = String::from_utf8_lossy(name).into_owned();
        at += pad(HEADER + name_size) + pad(file_size);
        if name == "TRAILER!!!" {
            return Some(names);
        }
        names.push(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_out_of_an_archive_we_write() {
        use imagebuilder::{CpioWriter, Entry, EntryKind};
        let mut writer = CpioWriter::new(Vec::new());
        writer
            .add(&Entry::new("etc", EntryKind::Directory, 0o755))
            .expect("dir");
        let file = Entry::new("etc/hostname", EntryKind::File { size: 5 }, 0o644);
        writer.add_file(&file, &mut &b"host\n"[..]).expect("file");
        let archive = writer.finish().expect("finish");
        assert_eq!(
            cpio_names(&archive).expect("parses"),
            ["etc", "etc/hostname"]
        );
        assert_eq!(cpio_names(&archive[..archive.len() - 200]), None);
    }
}
