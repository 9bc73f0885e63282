//! `qemu-migration-helper demo`: plays the parent VMM end to end with two helpers.

use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde_json::json;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use crate::client::{ClientError, HelperClient, RamBlockSpec};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Guest RAM size (bytes, or with a K, M or G suffix).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Fraction of the guest's pages that are zero.
    #[arg(long, default_value_t = 0.5)]
    pub zero_fraction: f64,
    /// Seed for the guest's content.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The helper binary to spawn (default: this one).
    #[arg(long)]
    pub helper: Option<PathBuf>,
    /// Allocate the destination's guest memory before migrating, as a VMM that
    /// preallocates guest RAM does (otherwise each page is allocated as it arrives).
    #[arg(long)]
    pub prealloc: bool,
    /// The destination's `load-threads`: threads that write received pages into guest
    /// memory (default: the helper's default, 2)
    #[arg(long)]
    pub load_threads: Option<u64>,
}

/// CPU seconds (user and system, all threads) that process `pid` has used so far, from
/// /proc; 0 if it cannot be read.
pub fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count fields after it.
    // There, utime and stime (fields 14 and 15 of proc(5)'s stat) are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz.max(1) as f64
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0 && n % 4096 == 0)
        .ok_or_else(|| format!("{s:?} is not a positive size that is a multiple of 4 KiB"))
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Check(String),
}

fn os(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> DemoError {
    move |e| DemoError::Os {
        what,
        source: e.into(),
    }
}

/// A guest-memory memfd and the parent's own mapping of it.
struct Guest {
    fd: OwnedFd,
    region: MmapRegion,
}

impl Guest {
    fn new(name: &std::ffi::CStr, len: u64) -> Result<Self, DemoError> {
        let fd = memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC).map_err(os("memfd_create"))?;
        nix::unistd::ftruncate(&fd, len as i64).map_err(os("ftruncate"))?;
        let file = std::fs::File::from(fd.try_clone().map_err(|source| DemoError::Os {
            what: "dup",
            source,
        })?);
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| DemoError::Os {
            what: "mmap",
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Guest { fd, region })
    }

    /// Allocates and maps every page (zeroed), as a VMM that preallocates guest RAM does.
    fn populate(&self) -> Result<(), DemoError> {
        // SAFETY: advice on the whole of our own mapping, which lives as long as self;
        // populating changes no byte of it.
        let r = unsafe {
            libc::madvise(
                self.region.as_ptr().cast(),
                self.region.size(),
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(DemoError::Os {
                what: "madvise(MADV_POPULATE_WRITE)",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The guest's memory as bytes.
    ///
    /// # Safety
    /// No other process (no helper) may write the memory while the slice lives.
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `size()` bytes and lives as long as self; nothing else
        // writes it meanwhile (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.region.as_ptr(), self.region.size()) }
    }

    /// The guest's memory as bytes to fill.
    ///
    /// # Safety
    /// No other process (no helper) may access the memory while the slice lives.
    unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; &mut self makes this the process's only view.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr(), self.region.size()) }
    }
}

/// Fills pages with either zeros or pseudo-random bytes (xorshift: fast and incompressible).
pub(crate) fn fill_guest(mem: &mut [u8], zero_fraction: f64, seed: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let threshold = (zero_fraction.clamp(0.0, 1.0) * u32::MAX as f64) as u64;
    let mut zeros = 0;
    for page in mem.chunks_mut(4096) {
        if (next() & 0xffff_ffff) < threshold {
            page.fill(0);
            zeros += 1;
        } else {
            for w in page.chunks_mut(8) {
                w.copy_from_slice(&next().to_le_bytes()[..w.len()]);
            }
        }
    }
    zeros
}

struct Progress {
    tty: bool,
    last: Instant,
}

impl Progress {
    fn show(&mut self, v: &serde_json::Value) {
        let total = v["ram"]["total"].as_u64().unwrap_or(0).max(1);
        let remaining = v["ram"]["remaining"].as_u64().unwrap_or(total);
        let done = total.saturating_sub(remaining) as f64 / total as f64;
        let status = v["status"].as_str().unwrap_or("?");
        let mbps = v["ram"]["mbps"].as_f64().unwrap_or(0.0);
        if self.tty {
            let width = 40;
            let fill = (done * width as f64) as usize;
            eprint!(
                "\r  [{}{}] {:5.1}% {:<16} {:8.1} Mbit/s",
                "#".repeat(fill),
                " ".repeat(width - fill),
                done * 100.0,
                status,
                mbps
            );
            let _ = std::io::stderr().flush();
        } else if self.last.elapsed() >= Duration::from_secs(1) {
            eprintln!("  progress: {:.1}% {status}", done * 100.0);
            self.last = Instant::now();
        }
    }
}

pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    let bin = match &args.helper {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|source| DemoError::Os {
            what: "current_exe",
            source,
        })?,
    };
    let size = args.size;
    println!(
        "demo: guest of {} MiB, {:.0}% zero pages",
        size >> 20,
        args.zero_fraction * 100.0
    );
    let mut src_mem = Guest::new(c"demo-src-ram", size)?;
    let dst_mem = Guest::new(c"demo-dst-ram", size)?;
    if args.prealloc {
        let t = Instant::now();
        dst_mem.populate()?;
        println!(
            "demo: preallocated the destination guest in {:.2} s",
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    // SAFETY: no helper exists yet; the memfd is close-on-exec and handed over later.
    let zeros = fill_guest(
        unsafe { src_mem.bytes_mut() },
        args.zero_fraction,
        args.seed,
    );
    println!(
        "demo: filled the source guest in {:.2} s ({zeros} zero pages of {})",
        t.elapsed().as_secs_f64(),
        size / 4096
    );

    let (mut src, mut src_child) = HelperClient::spawn(&bin, &[])?;
    let (mut dst, mut dst_child) = HelperClient::spawn(&bin, &[])?;
    let result = (|| -> Result<f64, DemoError> {
        for (h, g) in [(&mut src, &src_mem), (&mut dst, &dst_mem)] {
            h.getfd("guest-ram", g.fd.as_fd())?;
            h.ram_block_add(&RamBlockSpec {
                id: "pc.ram".into(),
                fdname: "guest-ram".into(),
                offset: 0,
                size,
                ..Default::default()
            })?;
        }
        if args.prealloc {
            // Both helpers map the pages that exist already in the background after
            // ram-block-add; a VMM's set-up usually leaves them the time, so let them finish
            // (as QEMU's prealloc finishes before it accepts a migration).
            let t = Instant::now();
            for h in [&mut src, &mut dst] {
                // Bounded: it is only an optimisation, never worth hanging the demo for.
                while !h.query_ram_blocks()?[0]["mapped-ahead"]
                    .as_bool()
                    .unwrap_or(true)
                    && t.elapsed() < Duration::from_secs(60)
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            println!(
                "demo: the helpers mapped the guests' pages ahead in {:.2} s",
                t.elapsed().as_secs_f64()
            );
        }
        let (a, b) = UnixStream::pair().map_err(|source| DemoError::Os {
            what: "socketpair",
            source,
        })?;
        dst.getfd("mig", b.as_fd())?;
        src.getfd("mig", a.as_fd())?;
        drop((a, b));
        src.set_parameters(json!({"max-bandwidth": 0u64}))?;
        if let Some(n) = args.load_threads {
            dst.set_parameters(json!({ "load-threads": n }))?;
        }
        dst.migrate_incoming("fd:mig")?;
        let pids = [src_child.id(), dst_child.id()];
        let cpu0 = pids.map(process_cpu_secs);
        let t0 = Instant::now();
        src.migrate("fd:mig")?;
        let mut progress = Progress {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
        };
        loop {
            let v = src.query_migrate()?;
            progress.show(&v);
            match v["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    return Err(DemoError::Check(format!(
                        "source migration {}: {}",
                        v["status"],
                        v["error-desc"].as_str().unwrap_or("")
                    )))
                }
                // Short: the poll's delay is part of the time printed.
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
            if t0.elapsed() > Duration::from_secs(600) {
                return Err(DemoError::Check(
                    "the migration took more than 10 minutes".into(),
                ));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        if progress.tty {
            eprintln!();
        }
        dst.wait_for_status(&["completed"], Duration::from_secs(60))?;
        let v = src.query_migrate()?;
        println!(
            "demo: migrated {} MiB in {:.2} s: {:.0} MB/s of guest RAM ({} pages sent, {} zero pages, {} bytes on the wire)",
            size >> 20,
            secs,
            size as f64 / secs / 1e6,
            v["ram"]["normal"],
            v["ram"]["duplicate"],
            v["ram"]["transferred"],
        );
        let cpu = [0, 1].map(|i| process_cpu_secs(pids[i]) - cpu0[i]);
        println!(
            "demo: the helpers used {:.2} s of CPU (source {:.2} s, destination {:.2} s)",
            cpu[0] + cpu[1],
            cpu[0],
            cpu[1]
        );
        Ok(secs)
    })();
    let _ = src.quit();
    let _ = dst.quit();
    let _ = src_child.wait();
    let _ = dst_child.wait();
    result?;
    let t = Instant::now();
    // SAFETY: both helpers have exited (waited for above): nothing else maps the memfds.
    let (a, b) = unsafe { (src_mem.bytes(), dst_mem.bytes()) };
    if a != b {
        let page = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        return Err(DemoError::Check(format!(
            "destination differs from the source at page {page}"
        )));
    }
    println!(
        "demo: destination verified byte for byte ({} MiB compared in {:.2} s)",
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("1000").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn fill_is_mixed() {
        let mut m = vec![1u8; 4096 * 1000];
        let z = fill_guest(&mut m, 0.5, 3);
        assert!(z > 400 && z < 600, "{z}");
        assert_eq!(
            m.chunks(4096).filter(|p| p.iter().all(|&b| b == 0)).count() as u64,
            z
        );
    }
}
