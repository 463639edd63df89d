//! Prints the example messages of `docs/protocol.md` as hex dumps:
//! `cargo run -p fluidlet --example protocol_examples`.

fn main() {
    for (name, msg) in fluidlet::wire::examples() {
        match msg.encode() {
            Ok(bytes) => {
                println!("{name}, {} bytes:\n", bytes.len());
                println!(
                    "<!-- example: {name} -->\n```text\n{}```\n",
                    fluidlet::wire::hex_dump(&bytes)
                );
            }
            Err(e) => eprintln!("{name}: {e}"),
        }
    }
}
