//! The host<->init channel's frame decoder, fed a hostile peer's bytes in arbitrary pieces:
//! it must never panic, must decode the same frames however the bytes are split, and
//! every frame it returns must survive an encode/decode round trip unchanged.

#![no_main]

use guest_init::channel::{encode, Decoder, Frame, MAX_PAYLOAD};
use guest_init::contract::ExecConfig;
use libfuzzer_sys::fuzz_target;

/// Decodes `bytes` fed in pieces of the sizes `split` cycles through (1..=256 bytes);
/// returns the frames up to the first error and whether there was one.
fn decode(bytes: &[u8], split: &[u8]) -> (Vec<Frame>, bool) {
    let mut decoder = Decoder::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut sizes = split.iter().cycle();
    while !rest.is_empty() {
        let size = sizes.next().map_or(rest.len(), |&s| usize::from(s) + 1);
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        decoder.feed(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
        // Whole frames are taken out as soon as they are complete: what stays is less
        // than one frame (header plus the largest payload).
        assert!(decoder.pending() < guest_init::channel::HEADER_LEN + MAX_PAYLOAD);
    }
    (frames, false)
}

fuzz_target!(|data: &[u8]| {
    // The first byte says how many of the next bytes drive the split; the rest is the stream.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (split, stream) = rest.split_at(usize::from(n % 16).min(rest.len()));
    let (whole, whole_failed) = decode(stream, &[]);
    let (pieces, pieces_failed) = decode(stream, split);
    assert_eq!(whole, pieces, "frames depend on how the bytes arrived");
    assert_eq!(whole_failed, pieces_failed);

    for frame in &whole {
        let mut bytes = Vec::new();
        encode(frame.stream, &frame.message, &mut bytes);
        let (again, failed) = decode(&bytes, &[]);
        assert!(!failed, "re-encoded {frame:?} does not decode");
        assert_eq!(again.as_slice(), std::slice::from_ref(frame));
        if let guest_init::channel::Message::Exec(config) = &frame.message {
            // What init does with an exec frame's payload.
            let _ = serde_json::from_slice::<ExecConfig>(config);
        }
    }
});
