//! A sequential image writer that hashes every 4 KiB block as it passes: the image is
//! never read back, and the block list (32 bytes of SHA-256 per block, in order) is
//! streamed to its own sink, so memory does not grow with the image.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

use super::format::{BLOCK, BLOCK_SIZE};

/// Zeros for padding.
static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// Writes the image to `inner` and each block's SHA-256 to `hashes`.
pub struct BlockSink<W, H> {
    inner: W,
    hashes: H,
    /// Bytes written so far.
    pos: u64,
    /// Hash of the current, partly written block.
    block: Sha256,
    /// Bytes of the current block written so far.
    filled: usize,
}

impl<W: Write, H: Write> BlockSink<W, H> {
    /// A sink at offset 0.
    pub fn new(inner: W, hashes: H) -> Self {
        BlockSink {
            inner,
            hashes,
            pos: 0,
            block: Sha256::new(),
            filled: 0,
        }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Writes zeros up to `offset`; the layout never goes backwards, so an offset behind
    /// the position is a bug reported as an error rather than a corrupt image.
    pub fn pad_to(&mut self, offset: u64) -> io::Result<()> {
        if offset < self.pos {
            return Err(io::Error::other(format!(
                "layout error: offset {offset} is behind the write position {}",
                self.pos
            )));
        }
        while self.pos < offset {
            let n = usize::try_from(offset - self.pos).map_or(BLOCK, |n| n.min(BLOCK));
            self.write_all(&ZEROS[..n])?;
        }
        Ok(())
    }

    /// Pads to the next block boundary.
    pub fn pad_block(&mut self) -> io::Result<()> {
        self.pad_to(self.pos.next_multiple_of(BLOCK_SIZE))
    }

    /// Flushes both sinks and returns them; the image must end on a block boundary.
    pub fn finish(mut self) -> io::Result<(W, H)> {
        if self.filled != 0 {
            return Err(io::Error::other("image does not end on a block boundary"));
        }
        self.inner.flush()?;
        self.hashes.flush()?;
        Ok((self.inner, self.hashes))
    }

    fn hash(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let room = BLOCK - self.filled;
            let n = room.min(buf.len());
            self.block.update(&buf[..n]);
            self.pos += n as u64;
            self.filled += n;
            buf = &buf[n..];
            if self.filled == BLOCK {
                self.filled = 0;
                let digest = self.block.finalize_reset();
                self.hashes.write_all(&digest)?;
            }
        }
        Ok(())
    }
}

impl<W: Write, H: Write> Write for BlockSink<W, H> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(buf)?;
        self.hash(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        self.hashes.flush()
    }
}

#[cfg(test)]
// Test data generators on 64-bit hosts.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn every_block_is_hashed_in_order_whatever_the_write_sizes() {
        let data: Vec<u8> = (0..3 * BLOCK_SIZE as usize)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut sink = BlockSink::new(Vec::new(), Vec::new());
        for chunk in data[..5000].chunks(333) {
            sink.write_all(chunk).expect("write");
        }
        sink.write_all(&data[5000..]).expect("write");
        assert!(sink.pad_to(10).is_err(), "never backwards");
        let (image, hashes) = sink.finish().expect("aligned");
        assert_eq!(image, data);
        let want: Vec<u8> = data
            .chunks(BLOCK_SIZE as usize)
            .flat_map(|block| Sha256::digest(block).to_vec())
            .collect();
        assert_eq!(hashes, want);
        let mut sink = BlockSink::new(Vec::new(), Vec::new());
        sink.write_all(b"x").expect("write");
        assert!(sink.finish().is_err(), "unaligned end");
    }
}
