#![no_main]

// Any byte string either decodes, asks for more, or is refused: never a panic, and a frame
// that decodes re-encodes to the bytes it came from.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = blockferry_proto::decode(data) {
        assert_eq!(frame.to_bytes(), data[..used]);
    }
});
