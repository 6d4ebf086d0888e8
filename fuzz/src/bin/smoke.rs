//! The fuzz targets' checks without libFuzzer (stable toolchain, no instrumentation): a seeded,
//! bounded mutation loop over the seed corpora, with a dictionary of tokens that matter to the
//! parsers. Not coverage-guided, so weaker than `cargo fuzz run`, but deterministic: the same
//! `--seed` gives the same inputs.
//!
//! ```text
//! cargo run --release --manifest-path fuzz/Cargo.toml --bin smoke -- \
//!     [all|TARGET...] [--seconds S] [--iterations N] [--seed X]
//! ```
//! Every target runs until its time or iteration budget is spent (default 20 s each). A panic
//! writes the input to `fuzz/artifacts/<target>/smoke-crash-<n>` and the run exits 1.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Check = fn(&[u8]);

const TARGETS: &[(&str, Check)] = &[
    (
        "authorization_header",
        tokenwarden_fuzz::authorization_header,
    ),
    ("token_response", tokenwarden_fuzz::token_response),
    ("proxy_confine", tokenwarden_fuzz::proxy_confine),
    (
        "connector_definition",
        tokenwarden_fuzz::connector_definition,
    ),
];

/// Pieces the mutator inserts: separators, encodings, numbers at the edges, JSON fragments.
const DICTIONARY: &[&str] = &[
    ",",
    " ",
    "\t",
    "\n",
    "\r",
    "\0",
    "User ",
    "Organization ",
    "Element ",
    "user",
    "ELEMENT",
    "/",
    "//",
    "\\",
    "..",
    ".",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%00",
    "%",
    "%%",
    "%+f",
    ";",
    "..;",
    "?",
    "#",
    "@",
    ":",
    "http://",
    "https://",
    "file://",
    "//evil.test",
    "127.0.0.1",
    "169.254.169.254",
    "[::1]",
    "\u{ff0e}",
    "\u{2025}",
    "é",
    "\u{feff}",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "\":",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e17",
    "1e308",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "0.5",
    "\"access_token\":\"a\"",
    "\"expires_in\":",
    "\"refresh_token_expires_in\":",
    "\"error\":",
    "\"ok\":false",
    "{}",
    "&",
    "=",
    "access_token=",
    "error=",
    "application/json",
    "text/html",
    "<title>",
    "</title>",
    "{sandbox}",
    "{tenant}",
    "{",
    "\"keepAliveSeconds\":",
    "\"bufferSeconds\":",
    "\"refreshTokenIdleTtlSeconds\":",
];

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(6) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = rng.next() as u8;
            }
            2 | 3 => {
                let word = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
                let at = rng.below(len + 1);
                input.splice(at..at, word.iter().copied());
            }
            4 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(16)).min(len);
                input.drain(from..to);
            }
            5 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(32)).min(len);
                let piece = input[from..to].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, piece);
            }
            6 if !seeds.is_empty() => {
                // Splice: our head, another seed's tail.
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => {
                let at = rng.below(len);
                let byte = input[at];
                let count = 1 + rng.below(64);
                input.splice(at..at, std::iter::repeat_n(byte, count));
            }
            _ => {
                let digits = rng.next().to_string();
                let at = rng.below(len + 1);
                input.splice(at..at, digits.bytes());
            }
        }
    }
    input.truncate(64 * 1024);
}

fn load_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .iter()
        .filter(|path| path.is_file())
        .filter_map(|path| std::fs::read(path).ok())
        .collect()
}

fn main() {
    let mut chosen: Vec<String> = Vec::new();
    let mut seconds = 20u64;
    let mut iterations = u64::MAX;
    let mut seed = 0x7e57_5eedu64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--seconds" => seconds = value("--seconds"),
            "--iterations" => iterations = value("--iterations"),
            "--seed" => seed = value("--seed").max(1),
            "all" => {}
            name => chosen.push(name.to_string()),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Findings are reported, not printed as panics with their (possibly huge) inputs.
    std::panic::set_hook(Box::new(|info| {
        let message = info.payload_as_str().unwrap_or("(no message)");
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("  panic at {place}: {message}");
    }));

    let mut failed = false;
    for (name, check) in TARGETS {
        if !chosen.is_empty() && !chosen.iter().any(|c| c == name) {
            continue;
        }
        let seeds = load_seeds(&root.join("corpus").join(name));
        assert!(!seeds.is_empty(), "no seeds in fuzz/corpus/{name}");
        let mut rng = Rng(seed);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut executions = 0u64;
        let mut crashes = 0u64;
        // The seeds themselves first, then mutations of them.
        let mut queue: Vec<Vec<u8>> = seeds.clone();
        while executions < iterations
            && (executions < seeds.len() as u64 || Instant::now() < deadline)
        {
            let input = if let Some(input) = queue.pop() {
                input
            } else {
                let mut input = seeds[rng.below(seeds.len())].clone();
                mutate(&mut rng, &seeds, &mut input);
                input
            };
            executions += 1;
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                crashes += 1;
                let dir = root.join("artifacts").join(name);
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(format!("smoke-crash-{crashes}"));
                let _ = std::fs::write(&path, &input);
                eprintln!("  {name}: input written to {}", path.display());
                if crashes >= 10 {
                    break;
                }
            }
        }
        println!("{name}: {executions} executions, {crashes} crashes (seed {seed})");
        failed |= crashes > 0;
    }
    std::process::exit(if failed { 1 } else { 0 });
}
