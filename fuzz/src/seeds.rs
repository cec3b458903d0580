//! The generated part of the seed corpora: binary seeds built with chime's own
//! encoders (item bodies, protobuf messages), so they stay reproducible. They are
//! committed as `fuzz/corpus/<target>/gen-*.bin`; `chime-fuzz --write-seeds`
//! rewrites them, and a test fails when the committed files differ from what this
//! module builds. Text seeds (cron expressions, JSON jobs, config values) are written
//! by hand and live next to them.

use std::path::Path;

use chime_shared::queue::Layout;
use chime_shared::queue::codec::encode_body;

use crate::targets::{item_codec, proto, worker_session};

/// One generated seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// Target (corpus directory).
    pub target: &'static str,
    /// File name, `gen-<what>.bin`.
    pub file: String,
    /// Contents.
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, what: &str, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        file: format!("gen-{what}.bin"),
        bytes,
    }
}

/// Every generated seed.
pub fn generated() -> Vec<Seed> {
    let mut out = Vec::new();
    for (what, body) in item_codec::seed_bodies() {
        out.push(seed(
            "item_codec",
            &format!("body-{what}"),
            encode_body(&body),
        ));
    }
    let layouts = [
        ("initial", Layout::initial(16)),
        (
            "resizing",
            Layout {
                epoch: 3,
                count: 8,
                revision: 41,
                draining: vec![(1, 4), (2, 16)],
            },
        ),
    ];
    for (what, l) in layouts {
        // Serializing a plain struct of integers cannot fail.
        let json = serde_json::to_vec(&l).unwrap_or_default();
        out.push(seed("item_codec", &format!("layout-{what}"), json));
    }
    out.push(seed("item_codec", "attempts", b"3".to_vec()));
    out.push(seed(
        "item_codec",
        "member",
        b"item-42\x01170\x012".to_vec(),
    ));
    for (what, bytes) in proto::seed_messages() {
        out.push(seed("proto", &what, bytes));
    }
    for (what, bytes) in worker_session::seed_sessions() {
        out.push(seed("worker_session", what, bytes));
    }
    out
}

/// Writes every generated seed under `corpus` and removes `gen-*` files no longer
/// generated; answers how many files were written.
pub fn write(corpus: &Path) -> std::io::Result<usize> {
    let seeds = generated();
    let mut dirs: Vec<&str> = seeds.iter().map(|s| s.target).collect();
    dirs.dedup();
    for target in &dirs {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let known = seeds.iter().any(|s| s.target == *target && s.file == name);
            if name.starts_with("gen-") && !known {
                std::fs::remove_file(&path)?;
            }
        }
    }
    for s in &seeds {
        std::fs::write(corpus.join(s.target).join(&s.file), &s.bytes)?;
    }
    Ok(seeds.len())
}
