//! `analyze` speed: `cargo bench --bench analyze`.
//!
//! Makes, in each directory (tmpfs and disk), two files of the same guest RAM (incompressible
//! pages, a quarter of them zero): a stream written by a helper (`migrate file:`) and a
//! mapped-ram file laid out as QEMU 10.0 lays it out (written here with the library's
//! codecs: every data page at its place, zero pages holes). Then times, in the same rounds,
//! `cp` of each file (page cache warm), `analyze FILE` and `analyze --extract-ram DIR FILE`
//! of each, and prints medians, the ratios to `cp` of the same file and the CPU seconds of
//! each command (user+sys of the child).
//!
//! Environment: QMH_BENCH_ANALYZE_SIZE (default 1G), QMH_BENCH_REPEAT (default 3),
//! QMH_BENCH_DIRS (default "/dev/shm,/var/tmp": tmpfs and disk; each needs about 5x the size
//! free).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_migration_helper::compat::wire::ram as flag;
use qemu_migration_helper::demo::parse_size;
use qemu_migration_helper::wire::{mapped_ram, ram, stream};
use serde_json::json;

use support::helper::{helper_bin, HelperVm};
use support::stats::{bench_requested, env_size, median, repeat};
use support::util::fill_mixed;

const PAGE: usize = 4096;

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Wall and CPU seconds of a command that must succeed.
fn time(cmd: &mut Command) -> (f64, f64) {
    let c0 = children_cpu();
    let t0 = Instant::now();
    let out = cmd.output().expect("run");
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (wall, children_cpu() - c0)
}

/// A mapped-ram file of `mem` (one block "pc.ram"), as QEMU 10.0 writes it to `file:`.
fn write_mapped(path: &Path, mem: &[u8]) {
    let len = mem.len() as u64;
    let mut head = Vec::new();
    stream::encode_header(&mut head);
    stream::encode_configuration_with(&mut head, "none", &["mapped-ram"]).unwrap();
    let sec = stream::SectionHeader {
        section_id: 2,
        idstr: "ram".into(),
        instance_id: 0,
        version_id: flag::VERSION,
    };
    stream::encode_section_start(&mut head, stream::SectionKind::Start, &sec).unwrap();
    let mut list = Vec::new();
    ram::encode_block_entries(
        &mut list,
        &[ram::BlockEntry {
            idstr: "pc.ram".into(),
            used_length: len,
            page_size: None,
        }],
    )
    .unwrap();
    head.extend_from_slice(&list);
    let h = mapped_ram::layout(head.len() as u64, len).unwrap();
    mapped_ram::encode_header(&mut head, &h);
    let f = File::create(path).unwrap();
    f.write_all_at(&head, 0).unwrap();
    let pages = mem.len() / PAGE;
    let mut words = vec![0u64; pages.div_ceil(64)];
    // Runs of data pages, one write each, as QEMU's pwritev of a run.
    let mut i = 0;
    while i < pages {
        if ram::is_zero_page(&mem[i * PAGE..(i + 1) * PAGE]) {
            i += 1;
            continue;
        }
        let s = i;
        while i < pages && !ram::is_zero_page(&mem[i * PAGE..(i + 1) * PAGE]) {
            words[i / 64] |= 1 << (i % 64);
            i += 1;
        }
        f.write_all_at(&mem[s * PAGE..i * PAGE], h.page_at((s * PAGE) as u64))
            .unwrap();
    }
    let mut bm = Vec::new();
    mapped_ram::encode_bitmap(&mut bm, &words);
    f.write_all_at(&bm, h.bitmap_offset).unwrap();
    let mut tail = Vec::new();
    ram::encode_eos(&mut tail);
    stream::encode_footer(&mut tail, 2);
    for k in [stream::SectionKind::Part, stream::SectionKind::End] {
        stream::encode_section_part(&mut tail, k, 2);
        ram::encode_eos(&mut tail);
        stream::encode_footer(&mut tail, 2);
    }
    stream::encode_eof(&mut tail);
    f.write_all_at(&tail, h.end(len).unwrap()).unwrap();
}

struct Rounds {
    name: &'static str,
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

fn rounds(name: &'static str) -> Rounds {
    Rounds {
        name,
        wall: Vec::new(),
        cpu: Vec::new(),
    }
}

fn bench_dir(base: &Path, size: u64, repeat: usize) {
    let dir = base.join(format!("qmh-analyze-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let stream_file = dir.join("stream.bin");
    let mapped_file = dir.join("mapped.bin");
    let zeros;
    {
        // The sandbox allows files under /tmp and /dev/shm only: allow the bench's directory.
        let d = dir.display().to_string();
        let mut src =
            HelperVm::spawn_with_args(&["--log-level", "warn", "--sandbox-allow-path", &d]);
        src.add_block("pc.ram", size, false);
        zeros = fill_mixed(&mut src.blocks[0].mem.map(), 3, 0.25);
        write_mapped(&mapped_file, &src.blocks[0].mem.map());
        src.client
            .set_parameters(json!({"max-bandwidth": 0}))
            .expect("params");
        src.client
            .migrate(&format!("file:{}", stream_file.display()))
            .expect("migrate");
        src.wait(&["completed"], Duration::from_secs(600));
    }
    println!(
        "\n{}: {} MiB of RAM ({zeros} zero pages of {}), {repeat} rounds",
        base.display(),
        size >> 20,
        size / PAGE as u64
    );
    for f in [&stream_file, &mapped_file] {
        let _ = time(
            Command::new("cat")
                .arg(f)
                .stdout(std::process::Stdio::null()),
        );
    }
    let mut all = [
        rounds("cp stream"),
        rounds("analyze stream"),
        rounds("analyze --extract-ram stream"),
        rounds("cp mapped-ram"),
        rounds("analyze mapped-ram"),
        rounds("analyze --extract-ram mapped-ram"),
    ];
    let out = dir.join("ram");
    let copy = dir.join("copy.bin");
    for r in 0..repeat {
        for (i, file) in [(0, &stream_file), (3, &mapped_file)] {
            let (w, c) = time(Command::new("cp").arg(file).arg(&copy));
            let _ = std::fs::remove_file(&copy);
            all[i].wall.push(w);
            all[i].cpu.push(c);
            let (w, c) = time(
                Command::new(helper_bin())
                    .arg("analyze")
                    .arg(file)
                    .stdout(std::process::Stdio::null()),
            );
            all[i + 1].wall.push(w);
            all[i + 1].cpu.push(c);
            let (w, c) = time(
                Command::new(helper_bin())
                    .arg("analyze")
                    .arg("--extract-ram")
                    .arg(&out)
                    .arg(file)
                    .stdout(std::process::Stdio::null()),
            );
            let _ = std::fs::remove_dir_all(&out);
            all[i + 2].wall.push(w);
            all[i + 2].cpu.push(c);
        }
        println!(
            "  round {r}: {}",
            all.iter()
                .map(|x| format!("{} {:.3} s", x.name, x.wall[r]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    for (i, x) in all.iter().enumerate() {
        let (w, c) = (median(&x.wall), median(&x.cpu));
        let cp = median(&all[i / 3 * 3].wall);
        print!("  {:<34} {w:7.3} s  {c:6.3} CPU s", x.name);
        match i % 3 {
            0 => println!("  {:.0} MB/s", size as f64 / w / 1e6),
            1 => println!("  {:.3} s per GiB of RAM", w / gib),
            _ => println!("  {:.2}x the copy (target <= 1.5x)", w / cp),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    if !bench_requested("analyze") {
        return;
    }
    let size = env_size("QMH_BENCH_ANALYZE_SIZE", "1G", parse_size);
    let repeat = repeat();
    let dirs = std::env::var("QMH_BENCH_DIRS").unwrap_or_else(|_| "/dev/shm,/var/tmp".into());
    println!(
        "analyze benchmark: `analyze` and `--extract-ram` against `cp` of the same file \
         (load: {})",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for d in dirs.split(',').filter(|d| !d.is_empty()) {
        bench_dir(&PathBuf::from(d), size, repeat);
    }
}
