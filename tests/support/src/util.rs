//! Small helpers shared by the interop tests and benchmarks: page patterns, memory
//! comparison, `file:` URIs, JSON integers, unique names and a self-removing temporary
//! directory (no `tempfile` crate).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Target page size used by QEMU's RAM migration on x86_64.
pub const PAGE_SIZE: usize = 4096;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Fills `buf` page by page (4 KiB; a short last page is treated the same way): each page
/// is all zeros with probability `zero_fraction`, otherwise random bytes. Deterministic for
/// a given `seed`. Returns the number of zero pages written.
pub fn fill_mixed(buf: &mut [u8], seed: u64, zero_fraction: f64) -> usize {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut zero_pages = 0;
    for page in buf.chunks_mut(PAGE_SIZE) {
        if rng.gen_bool(zero_fraction.clamp(0.0, 1.0)) {
            page.fill(0);
            zero_pages += 1;
        } else {
            rng.fill_bytes(page);
            // A random page that happens to be all zeros is astronomically unlikely; make
            // sure the count is exact anyway.
            if page.iter().all(|&b| b == 0) {
                page[0] = 1;
            }
        }
    }
    zero_pages
}

/// The `file:` URI of a migration stream that starts at `offset` in `path` (`file:PATH`
/// at 0, else `file:PATH,offset=N`).
pub fn file_uri(path: &Path, offset: u64) -> String {
    match offset {
        0 => format!("file:{}", path.display()),
        o => format!("file:{},offset={o}", path.display()),
    }
}

/// The integer at `path` in a JSON reply (`["ram", "normal"]`); panics naming it if it is
/// missing or not one.
pub fn u64_at(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{} is not an integer in {v}", path.join(".")))
}

/// A seed for tests: `QMH_SEED` when set (to reproduce a failure), else derived from the
/// clock. Printed so a failing run can be repeated.
pub fn test_seed(what: &str) -> u64 {
    let seed = match std::env::var("QMH_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("QMH_SEED={s:?} is not a u64")),
        Err(_) => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
        }
    };
    eprintln!("{what}: seed {seed} (set QMH_SEED={seed} to repeat)");
    seed
}

/// Compares two memory images byte for byte. On mismatch panics naming the first differing
/// page (index, byte offset, and the first differing bytes) and how many pages differ.
pub fn assert_same_memory(a: &[u8], b: &[u8], what: &str) {
    if let Err(e) = compare_memory(a, b) {
        panic!("{what}: {e}");
    }
}

/// `assert_same_memory` without the panic: the description of the difference.
pub fn compare_memory(a: &[u8], b: &[u8]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!(
            "memory sizes differ ({} vs {} bytes)",
            a.len(),
            b.len()
        ));
    }
    // Fast path: big chunks compared with memcmp.
    const CHUNK: usize = 1 << 20;
    let first_bad_chunk = a
        .chunks(CHUNK)
        .zip(b.chunks(CHUNK))
        .position(|(x, y)| x != y);
    let Some(first_bad_chunk) = first_bad_chunk else {
        return Ok(());
    };
    let start = first_bad_chunk * CHUNK;
    let mut first: Option<(usize, usize)> = None; // (page index, byte offset)
    let mut differing = 0usize;
    let mut zero_on_b = 0usize;
    for (i, (x, y)) in a[start..]
        .chunks(PAGE_SIZE)
        .zip(b[start..].chunks(PAGE_SIZE))
        .enumerate()
    {
        if x != y {
            let page = start / PAGE_SIZE + i;
            differing += 1;
            if y.iter().all(|&v| v == 0) {
                zero_on_b += 1;
            }
            if first.is_none() {
                let off = x.iter().zip(y).position(|(p, q)| p != q).unwrap();
                first = Some((page, page * PAGE_SIZE + off));
            }
        }
    }
    let (page, offset) = first.unwrap();
    let end = (offset + 16).min(a.len());
    Err(format!(
        "memory differs: first differing page {page} (byte offset {offset:#x}; \
         expected {:02x?}, got {:02x?}); {differing} of {} pages differ \
         ({zero_on_b} of them all-zero on the second side)",
        &a[offset..end],
        &b[offset..end],
        a.len().div_ceil(PAGE_SIZE),
    ))
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name unique across processes and threads running at the same time:
/// `<prefix>-<pid>-<counter>-<clock bits>`.
pub fn unique_name(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{prefix}-{}-{n}-{t:08x}", std::process::id())
}

/// A directory under `std::env::temp_dir()`, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Peak resident memory (VmHWM) of a live process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The next value of a xorshift64 generator whose state is `x` (not zero): cheap enough to
/// pick a random page between two timed touches. Deterministic for a given start.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}
