//! `--extract-ram DIR`: each RAM block written to a file of the block's size, zero pages as
//! holes. Pages of an ordinary stream are gathered into runs of consecutive pages and
//! written with one `pwritev` each (iovecs pointing into the mapped stream file), so an
//! extraction costs about a plain copy of the stream; a mapped-ram file's runs are copied
//! file to file with `copy_file_range`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::compat::wire::TARGET_PAGE_SIZE;
use crate::wire::mapped_ram::{self, Header};

use super::AnalyzeError;

const PAGE: u64 = TARGET_PAGE_SIZE as u64;
/// Most iovecs in one `pwritev` (Linux's `IOV_MAX`).
const MAX_IOV: usize = 1024;
/// Most bytes in one `pwritev`: a few MiB amortise the call without long stalls.
const MAX_RUN: u64 = 8 << 20;
/// Chunk of the copy when `copy_file_range` is not available.
const COPY_CHUNK: u64 = 1 << 20;

static ZERO_PAGE: [u8; TARGET_PAGE_SIZE] = [0; TARGET_PAGE_SIZE];

struct Out {
    file: File,
    path: PathBuf,
    /// Ranges `[start, end)` already written with data (flushed runs), merged: a zero page
    /// sent later for one of them must overwrite it, any other zero page stays a hole.
    written: BTreeMap<u64, u64>,
}

/// Consecutive pages of one block not written yet.
struct Run<'a> {
    block: usize,
    start: u64,
    len: u64,
    iov: Vec<IoSlice<'a>>,
}

pub(super) struct Extract<'a> {
    dir: PathBuf,
    /// The stream file, for `copy_file_range` (None when analysing bytes in memory).
    src: Option<File>,
    blocks: Vec<Out>,
    run: Option<Run<'a>>,
    /// `copy_file_range` failed once as unsupported: copy through the mapping from then on.
    no_copy_range: bool,
}

impl<'a> Extract<'a> {
    pub(super) fn new(dir: &Path, src: Option<File>) -> Result<Self, AnalyzeError> {
        std::fs::create_dir_all(dir).map_err(|source| AnalyzeError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Extract {
            dir: dir.to_path_buf(),
            src,
            blocks: Vec::new(),
            run: None,
            no_copy_range: false,
        })
    }

    /// Creates the file of a block, `length` bytes of holes.
    pub(super) fn add_block(&mut self, name: &str, length: u64) -> Result<(), AnalyzeError> {
        // Block names may hold '/'; keep them as one file name.
        let name = name.replace('/', "_");
        let path = self.dir.join(if name.is_empty() {
            "unnamed".into()
        } else {
            name
        });
        let file = File::create(&path).map_err(|source| AnalyzeError::Write {
            path: path.clone(),
            source,
        })?;
        file.set_len(length).map_err(|source| AnalyzeError::Write {
            path: path.clone(),
            source,
        })?;
        self.blocks.push(Out {
            file,
            path,
            written: BTreeMap::new(),
        });
        Ok(())
    }

    fn err(&self, block: usize, source: std::io::Error) -> AnalyzeError {
        AnalyzeError::Write {
            path: self
                .blocks
                .get(block)
                .map_or_else(|| self.dir.clone(), |o| o.path.clone()),
            source,
        }
    }

    /// A data page of `block` at `offset` (checked inside the block by the caller).
    pub(super) fn page(
        &mut self,
        block: usize,
        offset: u64,
        data: &'a [u8],
    ) -> Result<(), AnalyzeError> {
        if let Some(r) = &mut self.run {
            if r.block == block
                && r.start + r.len == offset
                && r.iov.len() < MAX_IOV
                && r.len < MAX_RUN
            {
                r.len += data.len() as u64;
                r.iov.push(IoSlice::new(data));
                return Ok(());
            }
        }
        self.flush()?;
        let mut iov = Vec::with_capacity(MAX_IOV);
        iov.push(IoSlice::new(data));
        self.run = Some(Run {
            block,
            start: offset,
            len: data.len() as u64,
            iov,
        });
        Ok(())
    }

    /// A zero page: a hole, unless the page was written with data before (a page sent again
    /// after it became zero), then zeros overwrite it.
    pub(super) fn zero_page(&mut self, block: usize, offset: u64) -> Result<(), AnalyzeError> {
        let pending = self
            .run
            .as_ref()
            .is_some_and(|r| r.block == block && offset >= r.start && offset < r.start + r.len);
        let flushed = self.blocks.get(block).is_some_and(|o| {
            o.written
                .range(..=offset)
                .next_back()
                .is_some_and(|(_, &end)| end > offset)
        });
        if pending || flushed {
            self.page(block, offset, &ZERO_PAGE)?;
        }
        Ok(())
    }

    /// Writes the pending run with one `pwritev` (more only if the kernel writes less).
    pub(super) fn flush(&mut self) -> Result<(), AnalyzeError> {
        let Some(r) = self.run.take() else {
            return Ok(());
        };
        let Some(out) = self.blocks.get(r.block) else {
            return Ok(());
        };
        let off = libc::off_t::try_from(r.start)
            .map_err(|_| self.err(r.block, std::io::Error::other("offset past 2^63")))?;
        let n = loop {
            // SAFETY: IoSlice is ABI-compatible with iovec on Unix; the slices borrow the
            // mapped stream (or a static page) and outlive the call.
            let n = unsafe {
                libc::pwritev(
                    out.file.as_raw_fd(),
                    r.iov.as_ptr().cast::<libc::iovec>(),
                    r.iov.len() as libc::c_int,
                    off,
                )
            };
            if n >= 0 {
                break n as u64;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(self.err(r.block, e));
            }
        };
        // A short write (rare): the rest one slice at a time.
        let mut at = 0u64;
        for s in &r.iov {
            let l = s.len() as u64;
            if at + l > n {
                let skip = n.saturating_sub(at) as usize;
                out.file
                    .write_all_at(&s[skip..], r.start + at + skip as u64)
                    .map_err(|e| self.err(r.block, e))?;
            }
            at += l;
        }
        if let Some(out) = self.blocks.get_mut(r.block) {
            insert_range(&mut out.written, r.start, r.start + r.len);
        }
        Ok(())
    }

    /// Copies a mapped-ram block's pages with data (the bitmap's set runs, from a header
    /// already checked against the file) to its output file; the rest stays holes.
    pub(super) fn mapped_block(
        &mut self,
        block: usize,
        h: &Header,
        words: &[u64],
        file: &[u8],
    ) -> Result<(), AnalyzeError> {
        self.flush()?;
        for (first, count) in mapped_ram::runs(words) {
            let len = count * PAGE;
            let dst = first * PAGE;
            let src = h.page_at(dst);
            self.copy(block, src, dst, len, file)?;
        }
        Ok(())
    }

    /// `len` bytes from the stream file at `src` to the block's file at `dst`: in the kernel
    /// with `copy_file_range`, else from the mapping in 1 MiB writes.
    fn copy(
        &mut self,
        block: usize,
        src: u64,
        dst: u64,
        len: u64,
        file: &[u8],
    ) -> Result<(), AnalyzeError> {
        let Some(out) = self.blocks.get(block) else {
            return Ok(());
        };
        let mut done = 0u64;
        let mut unsupported = false;
        if let (Some(s), false) = (&self.src, self.no_copy_range) {
            while done < len {
                let (mut i, mut o) = (
                    libc::loff_t::try_from(src + done).unwrap_or(libc::loff_t::MAX),
                    libc::loff_t::try_from(dst + done).unwrap_or(libc::loff_t::MAX),
                );
                let want = usize::try_from(len - done)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                // SAFETY: plain syscall on two open fds; the offsets are our locals.
                let n = unsafe {
                    libc::copy_file_range(
                        s.as_raw_fd(),
                        &mut i,
                        out.file.as_raw_fd(),
                        &mut o,
                        want,
                        0,
                    )
                };
                if n > 0 {
                    done += n as u64;
                    continue;
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) if n < 0 => continue,
                    // Not across these file systems, not in this kernel or sandbox, or the
                    // source ended early (n == 0): copy through the mapping.
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                    | Some(libc::EPERM)
                        if n < 0 =>
                    {
                        unsupported = true;
                        break;
                    }
                    _ if n == 0 => break,
                    _ => return Err(self.err(block, e)),
                }
            }
        }
        self.no_copy_range |= unsupported;
        let Some(out) = self.blocks.get(block) else {
            return Ok(());
        };
        while done < len {
            let n = (len - done).min(COPY_CHUNK);
            let bytes = usize::try_from(src + done)
                .ok()
                .and_then(|a| Some(a..a.checked_add(usize::try_from(n).ok()?)?))
                .and_then(|r| file.get(r))
                .ok_or_else(|| {
                    self.err(
                        block,
                        std::io::Error::other("mapped-ram pages outside the file"),
                    )
                })?;
            out.file
                .write_all_at(bytes, dst + done)
                .map_err(|e| self.err(block, e))?;
            done += n;
        }
        Ok(())
    }
}

/// Adds `[start, end)` to a set of disjoint ranges, merging it with those it touches.
fn insert_range(set: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = set.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            set.remove(&s);
        }
    }
    while let Some((&s, &e)) = set.range(start..).next() {
        if s > end {
            break;
        }
        end = end.max(e);
        set.remove(&s);
    }
    set.insert(start, end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge() {
        let mut s = BTreeMap::new();
        insert_range(&mut s, 10, 20);
        insert_range(&mut s, 30, 40);
        insert_range(&mut s, 20, 25);
        assert_eq!(
            s.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>(),
            vec![(10, 25), (30, 40)]
        );
        insert_range(&mut s, 5, 35);
        assert_eq!(
            s.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>(),
            vec![(5, 40)]
        );
        insert_range(&mut s, 50, 60);
        insert_range(&mut s, 41, 42);
        assert_eq!(s.len(), 3);
    }
}
