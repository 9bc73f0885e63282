//! Entry points of the coverage-guided fuzz targets in `tests/fuzz` (feature `fuzzing`).
//!
//! Each target takes arbitrary bytes, runs one of the pure decoders on them and panics when
//! an invariant breaks: a decode whose re-encoding differs from the bytes it took, a prefix
//! of a whole item that does not read as "need more bytes", a walk that disagrees with
//! itself, a split that loses bytes. A panic on the input itself is a bug too. The fuzz
//! crate adds what needs a global allocator (heap bounds, see [`heap_bound`]).
//!
//! Not a user API: it exists so the fuzz crate sees the decoders without making internals
//! `pub`. It is compiled into unit tests as well, which run every target on the seeds.

mod mapped;
mod seeds;
mod targets;

pub use mapped::{mapped_ram_file, page_content};
pub use seeds::{builtin_seeds, seeds_from_stream};

/// One fuzz target: its name (the binary and corpus directory in `tests/fuzz`) and entry.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Heap bytes the target may hold at its peak per input byte, on top of [`HEAP_BASE`].
    pub heap_per_byte: usize,
}

/// Heap every target may use whatever the input (buffers, error strings, small tables).
pub const HEAP_BASE: usize = 4 << 20;

/// The targets. Per-byte heap factors: the JSON-building decoders (control, vmstate,
/// analyze) hold a `serde_json::Value` tree, 72 bytes a node and vectors grown by doubling,
/// so up to ~150 bytes per input byte is expected; the binary decoders hold a few copies.
pub const TARGETS: &[Target] = &[
    Target {
        name: "stream",
        run: targets::stream,
        heap_per_byte: 256,
    },
    Target {
        name: "tokens",
        run: targets::tokens,
        heap_per_byte: 8,
    },
    Target {
        name: "ram",
        run: targets::ram,
        heap_per_byte: 8,
    },
    Target {
        name: "return_path",
        run: targets::return_path,
        heap_per_byte: 8,
    },
    Target {
        name: "multifd",
        run: targets::multifd,
        heap_per_byte: 8,
    },
    Target {
        name: "tls",
        run: targets::tls,
        heap_per_byte: 8,
    },
    Target {
        name: "vmstate",
        run: targets::vmstate,
        heap_per_byte: 256,
    },
    Target {
        name: "packaged",
        run: targets::packaged,
        heap_per_byte: 16,
    },
    Target {
        name: "control",
        run: targets::control,
        heap_per_byte: 256,
    },
    Target {
        name: "mapped_ram",
        run: mapped::codec,
        heap_per_byte: 16,
    },
    Target {
        name: "mapped_file",
        run: mapped::file,
        heap_per_byte: 256,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Most heap bytes `t` may hold at once for an input of `len` bytes.
pub fn heap_bound(t: &Target, len: usize) -> usize {
    HEAP_BASE.saturating_add(len.saturating_mul(t.heap_per_byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target on every seed (the fixtures' when present): the invariants hold on
    /// well-formed input, and the seed cutter gives every target something to start from.
    #[test]
    fn targets_accept_their_seeds() {
        let mut seeds = builtin_seeds();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/qemu-streams");
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "bin") {
                        let bytes = std::fs::read(&p).unwrap();
                        seeds.extend(seeds_from_stream(&bytes).unwrap());
                    }
                }
            }
            Err(e) if std::env::var("QMH_REQUIRE_FIXTURES").as_deref() == Ok("1") => {
                panic!("{}: {e} and QMH_REQUIRE_FIXTURES=1", dir.display())
            }
            Err(e) => eprintln!("SKIP fixture seeds: {}: {e}", dir.display()),
        }
        for t in TARGETS {
            let mine: Vec<_> = seeds.iter().filter(|(n, _)| *n == t.name).collect();
            assert!(!mine.is_empty(), "no seed for target {}", t.name);
            for (_, s) in mine {
                (t.run)(s);
            }
        }
    }

    /// Cut prefixes and flipped bytes of every built-in seed: no panic, no broken invariant.
    #[test]
    fn targets_survive_mutated_seeds() {
        for (name, s) in builtin_seeds() {
            let t = target(name).unwrap();
            for cut in 0..s.len() {
                (t.run)(&s[..cut]);
            }
            for i in 0..s.len() {
                let mut m = s.clone();
                m[i] ^= 0x41;
                (t.run)(&m);
            }
        }
    }
}
