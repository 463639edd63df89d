//! Every body decoder directly: the first byte picks the kind (1 to 12), the rest is the
//! body, wrapped in a well-formed envelope so the fuzzer does not spend its time on the
//! envelope. Round trip as in `envelope`.
#![no_main]

use fluidlet::model::Id;
use fluidlet::wire::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let kind = u16::from(kind % 12) + 1;
    let sender = Id::new("fuzz").expect("a valid id");
    let payload = Message::envelope(kind, 1, &sender, body);
    if let Ok(msg) = Message::decode(&payload) {
        assert_eq!(msg.body.kind() as u16, kind);
        let bytes = msg.encode().expect("a decoded message encodes within the size limit");
        assert_eq!(Message::decode(&bytes), Ok(msg), "round trip changed the message");
    }
});
