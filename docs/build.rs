//! Turns each guide chapter into a doctest source: every ```rust block that
//! is a fragment (no `fn main`) is compiled as the body of a hidden async
//! function whose parameters are what the chapter's prose assumes (a
//! transport, a pool, a handler). The blocks are compiled, not run
//! (`no_run`): they name brokers and databases. Blocks with their own
//! `fn main` run as they are.

use std::fs;
use std::path::Path;

/// The hidden lines around every fragment: `surety_guide::prelude` brings
/// the names, the chapter's parameters (`src/preamble/<chapter>.rs`) the
/// values.
const OPEN: &str =
    "# #![allow(unused)]\n# use surety_guide::prelude::*;\n# async fn __guide_example(\n";
const RETURNS: &str = "# ) -> Result<(), surety_guide::prelude::Error> {\n";
const CLOSE: &str = "# Ok(())\n# }\n";

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let guide = Path::new(&manifest).join("guide");
    println!("cargo:rerun-if-changed={}", guide.display());
    let Ok(entries) = fs::read_dir(&guide) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".md") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let text = fs::read_to_string(&path).expect("a readable chapter");
        let preamble = preamble_of(name);
        fs::write(Path::new(&out).join(name), transform(&text, &preamble))
            .expect("OUT_DIR is writable");
    }
}

/// The chapter's parameter lines, from `src/preamble/<chapter>.rs` if any.
fn preamble_of(chapter: &str) -> String {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let file = Path::new(&manifest)
        .join("src/preamble")
        .join(chapter.replace(".md", ".rs"));
    println!("cargo:rerun-if-changed={}", file.display());
    fs::read_to_string(file)
        .map(|text| {
            text.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("# {l}\n"))
                .collect()
        })
        .unwrap_or_default()
}

fn transform(text: &str, preamble: &str) -> String {
    let mut out = String::new();
    let mut block: Option<Vec<&str>> = None;
    for line in text.lines() {
        match &mut block {
            None if line.trim() == "```rust" => block = Some(Vec::new()),
            None => {
                out.push_str(line);
                out.push('\n');
            }
            Some(lines) if line.trim() == "```" => {
                let code = lines.join("\n");
                if code.contains("fn main(") {
                    out.push_str("```rust\n");
                    out.push_str(&code);
                    out.push('\n');
                } else {
                    out.push_str("```rust,no_run\n");
                    out.push_str(OPEN);
                    out.push_str(preamble);
                    out.push_str(RETURNS);
                    out.push_str(&code);
                    out.push('\n');
                    out.push_str(CLOSE);
                }
                out.push_str("```\n");
                block = None;
            }
            Some(lines) => lines.push(line),
        }
    }
    out
}
