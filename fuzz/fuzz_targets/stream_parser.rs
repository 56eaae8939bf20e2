//! Drives the main-stream decoder over arbitrary bytes, as a whole and as a
//! byte stream arriving in chunks: it must not panic, must never claim more
//! bytes than it was given, must make progress on every item, and must see
//! the same events and the same outcome however the bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd_wire::WireError;
use multifd_wire::stream::{Decoded, Decoder, Event, check_tail};

/// How a run ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Input exhausted while the decoder wanted more.
    NeedMore,
    /// The rest of the input, from this offset, is opaque device state.
    DeviceTail(usize),
    /// The decoder refused the input.
    Error(WireError),
}

/// Feeds `data` to a fresh decoder, `chunk` more bytes each time it asks
/// for more (`usize::MAX`: everything at once).
fn run(data: &[u8], chunk: usize) -> (Vec<Event<'_>>, End) {
    let mut dec = Decoder::new();
    let mut events = Vec::new();
    let mut pos = 0;
    let mut avail = chunk.min(data.len());
    loop {
        let buf = &data[pos..pos + avail];
        match dec.decode(buf) {
            Ok(Decoded::NeedMore { at_least }) => {
                assert!(
                    at_least > buf.len(),
                    "NeedMore although {at_least} <= {}",
                    buf.len()
                );
                if pos + avail == data.len() {
                    return (events, End::NeedMore);
                }
                avail = avail.saturating_add(chunk).min(data.len() - pos);
            }
            Ok(Decoded::Item { event, consumed }) => {
                assert!(consumed <= buf.len());
                if event == Event::DeviceTail {
                    assert_eq!(consumed, 0);
                    assert_eq!(dec.decode(buf), Err(WireError::DecoderFinished));
                    return (events, End::DeviceTail(pos));
                }
                assert!(consumed > 0, "no progress on {event:?}");
                pos += consumed;
                avail -= consumed;
                events.push(event);
            }
            Err(e) => return (events, End::Error(e)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = run(data, usize::MAX);
    if let End::DeviceTail(at) = whole.1 {
        let _ = check_tail(&data[at..]);
    }
    let _ = check_tail(data);
    // Byte by byte is the strictest split but quadratic-ish under the
    // sanitizers; keep it to small inputs.
    let byte_by_byte = if data.len() <= 2048 { 1 } else { data.len() };
    for chunk in [
        byte_by_byte,
        1 + data.len() % 61,
        1 + (data.len() / 61) % 509,
    ] {
        assert_eq!(run(data, chunk), whole, "chunk size {chunk}");
    }
});
