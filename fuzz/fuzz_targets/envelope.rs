//! Any bytes as a message payload, as a peer can publish them: decoding never panics and
//! never allocates beyond the payload's bounds, and whatever decodes survives a round trip
//! (encode, decode again: the same message).
#![no_main]

use fluidlet::wire::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Message::decode(data) {
        let bytes = msg.encode().expect("a decoded message encodes within the size limit");
        assert_eq!(Message::decode(&bytes), Ok(msg), "round trip changed the message");
    }
});
