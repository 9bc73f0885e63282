//! Shared by the fuzz targets: runs one target of the library's `fuzzing` module on an
//! input and checks its peak heap against the target's input-proportional bound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use qemu_migration_helper::fuzzing;

/// Counts the heap the Rust code holds (libFuzzer's own C++ allocations are not counted).
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters move.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                CURRENT.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs target `name` on `data`; panics (a finding) when its invariants break or its peak
/// heap exceeds `fuzzing::heap_bound`.
pub fn run(name: &str, data: &[u8]) {
    let Some(t) = fuzzing::target(name) else {
        panic!("no fuzz target {name:?}");
    };
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    (t.run)(data);
    let used = PEAK.load(Relaxed).saturating_sub(base);
    let bound = fuzzing::heap_bound(t, data.len());
    assert!(
        used <= bound,
        "{name}: {used} heap bytes at peak for a {}-byte input (bound {bound})",
        data.len()
    );
}

/// `make-seeds FIXTURE_DIR OUT_DIR`: writes OUT_DIR/TARGET/NAME seed files, cut from every
/// `*.bin` stream in FIXTURE_DIR, plus the built-in seeds. A missing FIXTURE_DIR leaves the
/// built-in seeds only (said on stderr). Exits the process.
pub fn make_seeds() -> ! {
    let args: Vec<String> = std::env::args().collect();
    let [_, fixtures, out] = &args[..] else {
        eprintln!("usage: make-seeds FIXTURE_DIR OUT_DIR");
        std::process::exit(2)
    };
    let mut all = vec![(
        "builtin".to_string(),
        qemu_migration_helper::fuzzing::builtin_seeds(),
    )];
    match std::fs::read_dir(fixtures) {
        Ok(entries) => {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths
                .iter()
                .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            {
                let stem = p
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                match qemu_migration_helper::fuzzing::seeds_from_stream(&bytes) {
                    Ok(s) => all.push((stem, s)),
                    Err(e) => eprintln!("make-seeds: {}: {e}; no seeds from it", p.display()),
                }
            }
        }
        Err(e) => eprintln!("make-seeds: {fixtures}: {e}; built-in seeds only"),
    }
    let mut count = 0;
    for (origin, seeds) in &all {
        for (i, (target, bytes)) in seeds.iter().enumerate() {
            let dir = Path::new(out).join(target);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let path = dir.join(format!("{origin}-{i:03}"));
            std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            count += 1;
        }
    }
    eprintln!("make-seeds: {count} seeds in {out}");
    std::process::exit(0)
}
