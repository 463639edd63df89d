//! Prints the example messages of `docs/protocol.md` as hex dumps:
//! `cargo run -p fluidlet --example protocol_examples`.
//!
//! With `--corpus DIR` it writes the seed corpus of the fuzz targets instead (see
//! `fuzz/README.md`): `DIR/envelope/` (each example message), `DIR/bodies/` (a kind byte
//! followed by the body alone) and `DIR/config/` (the shipped example configs).

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, dir] = args.as_slice() {
        if flag == "--corpus" {
            if let Err(e) = write_corpus(Path::new(dir)) {
                eprintln!("protocol_examples: {e}");
                std::process::exit(1);
            }
            return;
        }
    }
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

fn write_corpus(dir: &Path) -> std::io::Result<()> {
    for sub in ["envelope", "bodies", "config"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let mut n = 0;
    for (name, msg) in fluidlet::wire::examples() {
        let file = name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        if let Ok(bytes) = msg.encode() {
            std::fs::write(dir.join("envelope").join(&file), bytes)?;
        }
        let mut body = vec![msg.body.kind() as u8];
        body.extend(msg.body.to_bytes());
        std::fs::write(dir.join("bodies").join(&file), body)?;
        n += 1;
    }
    let configs = [
        ("agent_toml", include_str!("../../packaging/agent.toml")),
        (
            "intent_toml",
            include_str!("../../docs/examples/intent.toml"),
        ),
    ];
    for (name, text) in configs {
        std::fs::write(dir.join("config").join(name), text)?;
    }
    println!(
        "{n} messages and {} configs written under {}",
        configs.len(),
        dir.display()
    );
    Ok(())
}
