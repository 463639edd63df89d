//! Any text as the agent's TOML config: refused with an error or accepted, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = fluidlet::Config::from_toml(text);
    }
});
