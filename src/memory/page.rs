//! Handles on guest memory. The parent's vCPUs (and the page writers, and the kernel on
//! the parent's behalf) write guest RAM while the helper reads it, so the helper never
//! holds a `&[u8]` or `&mut [u8]` into it: Rust would be entitled to assume that nothing
//! changes such memory. Instead every access goes through vm-memory's [`VolatileSlice`],
//! whose lifetime ties the handle to its [`RamBlock`](crate::memory::block::RamBlock)'s
//! mapping. The copies stay `memcpy`s (vm-memory copies more than 8 bytes with
//! `copy_nonoverlapping`); only the zero check reads word by word, with volatile loads.

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::compat::wire::TARGET_PAGE_SIZE;

/// One target page of the process's own (a received page in a read buffer, say).
pub(crate) type Page = [u8; TARGET_PAGE_SIZE];

/// One target page (4 KiB) of guest memory, borrowed from its block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuestPage<'a> {
    slice: VolatileSlice<'a>,
}

impl<'a> GuestPage<'a> {
    /// `slice` must be exactly one target page (checked by the only caller, `RamBlock`).
    pub(crate) fn new(slice: VolatileSlice<'a>) -> Self {
        debug_assert_eq!(slice.len(), TARGET_PAGE_SIZE);
        GuestPage { slice }
    }

    /// Copies the page into `buf` (as much as fits); returns the bytes copied.
    #[cfg(test)]
    pub(crate) fn copy_to(&self, buf: &mut [u8]) -> usize {
        self.slice.copy_to(buf)
    }

    /// Copies `data` into the page (as much as fits).
    pub(crate) fn copy_from(&self, data: &[u8]) {
        self.slice.copy_from(data)
    }

    /// Sets every byte of the page to `byte`.
    pub(crate) fn fill(&self, byte: u8) {
        fill(&self.slice, byte)
    }

    /// Whether the page reads as all zero right now (a vCPU may change it the next moment:
    /// the parent then sets the page's dirty bit, and it is sent again).
    #[inline]
    pub(crate) fn is_zero(&self) -> bool {
        is_zero(&self.slice)
    }

    /// The page as an iovec, for a gathered write straight from guest memory (see
    /// [`IoVecs`]).
    pub(crate) fn iovec(&self) -> libc::iovec {
        iovec(&self.slice)
    }

    /// The page as an iovec the kernel may write (a scattered read into guest memory).
    fn iovec_mut(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: self.slice.len(),
        }
    }
}

/// Consecutive target pages of one block, borrowed from it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuestRange<'a> {
    slice: VolatileSlice<'a>,
}

impl<'a> GuestRange<'a> {
    /// `slice` must be a whole number of target pages (checked by `RamBlock`).
    pub(crate) fn new(slice: VolatileSlice<'a>) -> Self {
        debug_assert_eq!(slice.len() % TARGET_PAGE_SIZE, 0);
        GuestRange { slice }
    }

    /// The number of target pages in the range.
    pub(crate) fn pages(&self) -> usize {
        self.slice.len() / TARGET_PAGE_SIZE
    }

    /// The range's `i`th page.
    pub(crate) fn page(&self, i: usize) -> Option<GuestPage<'a>> {
        let off = i.checked_mul(TARGET_PAGE_SIZE)?;
        self.slice
            .subslice(off, TARGET_PAGE_SIZE)
            .ok()
            .map(GuestPage::new)
    }

    /// Copies `pages` into consecutive pages of the range; false, with nothing copied,
    /// when their number differs from the range's.
    pub(crate) fn copy_pages_from(&self, pages: &[&Page]) -> bool {
        if pages.len() != self.pages() {
            return false;
        }
        for (i, p) in pages.iter().enumerate() {
            if let Some(dst) = self.page(i) {
                dst.copy_from(&p[..]);
            }
        }
        true
    }

    /// Maps the range's pages into this process's page tables for writing, allocating those
    /// that are holes, with one `madvise(MADV_POPULATE_WRITE)`: cheaper than a page fault
    /// per page in the copy that follows. Only a hint: a kernel without it leaves the
    /// faults to the copy.
    pub(crate) fn populate_write(&self) {
        let guard = self.slice.ptr_guard_mut();
        // SAFETY: madvise only changes how the kernel backs the range, which lies inside
        // the block's shared mapping (the slice was bounds checked when it was made);
        // MADV_POPULATE_WRITE writes nothing the guest could see (it faults pages in).
        unsafe {
            libc::madvise(
                guard.as_ptr().cast(),
                self.slice.len(),
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
}

fn fill<B: BitmapSlice>(slice: &VolatileSlice<'_, B>, byte: u8) {
    let guard = slice.ptr_guard_mut();
    // SAFETY: the pointer is valid for `slice.len()` bytes of writes while `slice`'s
    // borrow of the mapping lasts; no Rust reference to guest memory exists to be
    // invalidated (all access goes through volatile slices).
    unsafe { std::ptr::write_bytes(guard.as_ptr(), byte, slice.len()) };
}

fn iovec<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> libc::iovec {
    libc::iovec {
        iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
        iov_len: slice.len(),
    }
}

/// Bytes read between two checks for a non-zero one, so that a random page is rejected
/// after its first chunk.
const ZERO_CHUNK: usize = 256;

/// Whether `slice` reads as all zero. Reads with volatile loads of aligned words (16 bytes
/// with SSE2, 8 elsewhere), OR-ed a chunk at a time: about as fast as the compiler's
/// vectorised loop over a `&[u8]`. Stray bytes at either end of an unaligned slice are
/// read one by one (a page of guest RAM is always aligned).
#[inline]
pub(crate) fn is_zero<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> bool {
    let guard = slice.ptr_guard();
    let (ptr, len) = (guard.as_ptr(), slice.len());
    let head = ptr.align_offset(WORD).min(len);
    let body = (len - head) / WORD * WORD;
    // SAFETY: every byte read below is at an offset < len, and the slice is valid for
    // reads of `len` bytes while its borrow lasts; the loads are volatile reads of plain
    // integers (any bit pattern is valid) from memory that others may write; `ptr + head`
    // is WORD-aligned, and `body` is a multiple of WORD.
    unsafe {
        for i in (0..head).chain(head + body..len) {
            if std::ptr::read_volatile(ptr.add(i)) != 0 {
                return false;
            }
        }
        aligned_is_zero(ptr.add(head), body)
    }
}

#[cfg(target_arch = "x86_64")]
const WORD: usize = 16;
#[cfg(not(target_arch = "x86_64"))]
const WORD: usize = 8;

/// # Safety
/// `p` is WORD-aligned and valid for volatile reads of `len` bytes, a multiple of WORD.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn aligned_is_zero(p: *const u8, len: usize) -> bool {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
    };
    const PER_CHUNK: usize = ZERO_CHUNK / WORD;
    let w = p.cast::<__m128i>();
    let n = len / WORD;
    let mut i = 0;
    while i < n {
        let k = PER_CHUNK.min(n - i);
        // SAFETY: words i..i+k lie in the range the caller vouches for, aligned; SSE2 is
        // part of every x86_64 CPU. A full chunk is a fixed count of loads, which the
        // compiler unrolls (volatile loads are kept, one each, in order).
        let zero = unsafe {
            let mut acc = [_mm_setzero_si128(); 4];
            if k == PER_CHUNK {
                for j in 0..PER_CHUNK {
                    let v = std::ptr::read_volatile(w.add(i + j));
                    acc[j % 4] = _mm_or_si128(acc[j % 4], v);
                }
            } else {
                for j in 0..k {
                    acc[0] = _mm_or_si128(acc[0], std::ptr::read_volatile(w.add(i + j)));
                }
            }
            let acc = _mm_or_si128(_mm_or_si128(acc[0], acc[1]), _mm_or_si128(acc[2], acc[3]));
            _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) == 0xffff
        };
        if !zero {
            return false;
        }
        i += k;
    }
    true
}

/// # Safety
/// `p` is WORD-aligned and valid for volatile reads of `len` bytes, a multiple of WORD.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
unsafe fn aligned_is_zero(p: *const u8, len: usize) -> bool {
    let w = p.cast::<u64>();
    let (n, per_chunk) = (len / WORD, ZERO_CHUNK / WORD);
    let mut i = 0;
    while i < n {
        let end = (i + per_chunk).min(n);
        let mut acc = 0u64;
        while i < end {
            // SAFETY: i < n words of the range the caller vouches for, aligned.
            acc |= unsafe { std::ptr::read_volatile(w.add(i)) };
            i += 1;
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

/// A list of buffers for one gathered write (`writev`): bytes of the process's own and
/// pages of guest memory, all borrowed for `'a`, so that none can be freed or unmapped
/// before the list is written or dropped; or, for one scattered read (`readv`), pages of
/// guest memory only. Building it is safe; only [`IoVecs::writev`] and [`IoVecs::readv`]
/// hand the pointers to the kernel.
#[derive(Default)]
pub(crate) struct IoVecs<'a> {
    iov: Vec<libc::iovec>,
    /// The first iovec not (fully) transferred yet.
    done: usize,
    /// Some buffer is the process's own bytes, borrowed shared: the kernel must not write
    /// them, so [`IoVecs::readv`] refuses the list.
    shared: bool,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> IoVecs<'a> {
    /// The kernel takes at most this many iovecs per call (IOV_MAX on Linux).
    pub(crate) const MAX_PER_CALL: usize = 1024;

    pub(crate) fn with_capacity(n: usize) -> Self {
        IoVecs {
            iov: Vec::with_capacity(n),
            done: 0,
            shared: false,
            _borrow: PhantomData,
        }
    }

    /// Appends pages of the process's own.
    pub(crate) fn push_pages(&mut self, pages: &[&'a Page]) {
        self.shared = true;
        self.iov.extend(pages.iter().map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        }));
    }

    /// Appends bytes of the process's own.
    pub(crate) fn push_bytes(&mut self, b: &'a [u8]) {
        if !b.is_empty() {
            self.shared = true;
            self.iov.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
    }

    /// Appends a page of guest memory.
    pub(crate) fn push_page(&mut self, p: GuestPage<'a>) {
        self.iov.push(p.iovec());
    }

    /// Appends a page of guest memory that a [`IoVecs::readv`] is to fill.
    pub(crate) fn push_page_to_fill(&mut self, p: GuestPage<'a>) {
        self.iov.push(p.iovec_mut());
    }

    /// Nothing (more) to write or read.
    pub(crate) fn is_empty(&self) -> bool {
        self.done == self.iov.len()
    }

    /// Bytes not transferred yet.
    pub(crate) fn remaining(&self) -> usize {
        self.iov[self.done..].iter().map(|v| v.iov_len).sum()
    }

    /// Empties the list, keeping its allocation.
    pub(crate) fn clear(&mut self) {
        self.iov.clear();
        self.done = 0;
        self.shared = false;
    }

    /// One `readv(2)` from `fd` into the next (up to [`IoVecs::MAX_PER_CALL`]) pages; what
    /// it filled is dropped from the front of the list. 0 means end of file. Errors are the
    /// syscall's, EINTR and EAGAIN included. Refused (InvalidInput) when the list holds
    /// bytes of the process's own, which are borrowed shared.
    pub(crate) fn readv(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<usize> {
        if self.shared {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a scattered read into shared buffers",
            ));
        }
        // SAFETY: see `syscall`; every iovec is a guest page pushed with
        // `push_page_to_fill` (checked just above), taken with the slice's mutable pointer
        // guard: guest memory is only ever accessed volatilely, so the kernel writing it
        // invalidates no Rust reference.
        self.syscall(|iov, n| unsafe { libc::readv(fd.as_raw_fd(), iov, n) })
    }

    /// Like [`IoVecs::readv`], with `preadv(2)` at byte `offset` of the file (mapped-ram
    /// pages read from their fixed places). 0 means end of file.
    pub(crate) fn preadv(&mut self, fd: BorrowedFd<'_>, offset: i64) -> std::io::Result<usize> {
        if self.shared {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a scattered read into shared buffers",
            ));
        }
        // SAFETY: as `readv`: every iovec is a guest page pushed with `push_page_to_fill`,
        // which the kernel may write.
        self.syscall(|iov, n| unsafe { libc::preadv(fd.as_raw_fd(), iov, n, offset) })
    }

    /// One `writev(2)` of the next (up to [`IoVecs::MAX_PER_CALL`]) buffers to `fd`; what
    /// it wrote is dropped from the front of the list. Errors are the syscall's, EINTR and
    /// EAGAIN included: the caller decides whether to retry or wait.
    pub(crate) fn writev(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<usize> {
        // SAFETY: see `syscall`; writev reads `n` iovecs and the memory they point at.
        self.syscall(|iov, n| unsafe { libc::writev(fd.as_raw_fd(), iov, n) })
    }

    /// Like [`IoVecs::writev`], with `pwritev(2)` at byte `offset` of the file.
    pub(crate) fn pwritev(&mut self, fd: BorrowedFd<'_>, offset: i64) -> std::io::Result<usize> {
        // SAFETY: see `syscall`; pwritev reads `n` iovecs and the memory they point at.
        self.syscall(|iov, n| unsafe { libc::pwritev(fd.as_raw_fd(), iov, n, offset) })
    }

    /// Runs a gathered write (or scattered read) over the next buffers and drops what it
    /// transferred. `write` gets at most [`IoVecs::MAX_PER_CALL`] iovecs, each pointing at
    /// memory borrowed for 'a (own bytes, or a guest mapping its block's borrow keeps
    /// mapped), valid for reads of its length for as long as `self` lives (and for
    /// writes, where `readv` allows the call).
    fn syscall(
        &mut self,
        write: impl FnOnce(*const libc::iovec, libc::c_int) -> isize,
    ) -> std::io::Result<usize> {
        let rest = &self.iov[self.done..];
        if rest.is_empty() {
            return Ok(0);
        }
        let n = rest.len().min(Self::MAX_PER_CALL);
        let w = write(rest.as_ptr(), n as libc::c_int);
        if w < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.advance(w as usize);
        Ok(w as usize)
    }

    /// Copies the next bytes of the list (own bytes and guest pages) into `dst`, as many as
    /// fit, and drops them from the front: a TLS record's plaintext. Returns the count.
    pub(crate) fn copy_out(&mut self, dst: &mut [u8]) -> usize {
        let mut got = 0;
        while got < dst.len() && self.done < self.iov.len() {
            let v = self.iov[self.done];
            let n = v.iov_len.min(dst.len() - got);
            // SAFETY: every iovec points at memory borrowed for 'a and valid for reads of
            // its length (own bytes, or a guest mapping its block's borrow keeps mapped; see
            // `syscall`); `dst` is the caller's own buffer, which guest memory never
            // overlaps. Guest memory is read with a plain copy, as vm-memory's volatile
            // slices copy it: no Rust reference to it is made.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, dst[got..].as_mut_ptr(), n)
            };
            got += n;
            self.advance(n);
        }
        got
    }

    /// Copies `src` into the next pages of the list and drops them from the front (a TLS
    /// record's plaintext into guest memory); returns the count. Refused (InvalidInput), as
    /// [`IoVecs::readv`], when the list holds bytes of the process's own.
    pub(crate) fn fill_from(&mut self, src: &[u8]) -> std::io::Result<usize> {
        if self.shared {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a scattered read into shared buffers",
            ));
        }
        let mut put = 0;
        while put < src.len() && self.done < self.iov.len() {
            let v = self.iov[self.done];
            let n = v.iov_len.min(src.len() - put);
            // SAFETY: every iovec is a guest page pushed with `push_page_to_fill` (checked
            // above: no shared bytes), valid for writes of its length while 'a lasts, taken
            // with the slice's mutable pointer guard; guest memory is only accessed through
            // raw pointers and volatile slices, so the copy invalidates no Rust reference,
            // and `src` (the process's own buffer) cannot overlap it.
            unsafe { std::ptr::copy_nonoverlapping(src[put..].as_ptr(), v.iov_base as *mut u8, n) };
            put += n;
            self.advance(n);
        }
        Ok(put)
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.done < self.iov.len() {
            let v = &mut self.iov[self.done];
            let take = n.min(v.iov_len);
            v.iov_len -= take;
            // Stays inside (or one past the end of) the same buffer; wrapping_add keeps the
            // arithmetic free of `unsafe`: the result is only handed to the kernel.
            v.iov_base = (v.iov_base as *mut u8).wrapping_add(take).cast();
            n -= take;
            if v.iov_len == 0 {
                self.done += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(buf: &mut [u8]) -> VolatileSlice<'_> {
        VolatileSlice::from(buf)
    }

    #[test]
    fn zero_check_at_every_position_and_alignment() {
        let mut buf = vec![0u8; TARGET_PAGE_SIZE + 16];
        for start in [0usize, 1, 3, 8, 13] {
            for len in [0usize, 1, 7, 9, 255, 256, 257, 4096] {
                let s = owned(&mut buf[start..start + len]);
                assert!(is_zero(&s), "start {start} len {len}");
                for at in [0, len / 2, len.saturating_sub(1)] {
                    if len == 0 {
                        continue;
                    }
                    buf[start + at] = 1;
                    assert!(!is_zero(&owned(&mut buf[start..start + len])));
                    buf[start + at] = 0;
                }
            }
        }
    }

    #[test]
    fn page_copies_fill_and_append() {
        let mut mem = vec![0u8; 2 * TARGET_PAGE_SIZE];
        let r = GuestRange::new(owned(&mut mem));
        assert_eq!(r.pages(), 2);
        let p = r.page(1).expect("page 1");
        assert!(p.is_zero());
        p.copy_from(&[5u8; TARGET_PAGE_SIZE]);
        assert!(!p.is_zero());
        let mut out = [0u8; TARGET_PAGE_SIZE];
        assert_eq!(p.copy_to(&mut out), TARGET_PAGE_SIZE);
        assert!(out.iter().all(|&b| b == 5));
        p.fill(0);
        assert!(p.is_zero());
        assert!(r.page(2).is_none());
        let (a, b) = ([1u8; TARGET_PAGE_SIZE], [2u8; TARGET_PAGE_SIZE]);
        assert!(r.copy_pages_from(&[&a, &b]));
        assert!(!r.copy_pages_from(&[&a]));
        let mut back = [0u8; TARGET_PAGE_SIZE];
        r.page(1).expect("page").copy_to(&mut back);
        assert_eq!(back, b);
    }

    #[test]
    fn gathered_writes_resume_where_the_kernel_stopped() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let mut mem = vec![7u8; TARGET_PAGE_SIZE];
        let page = GuestPage::new(owned(&mut mem));
        let head = [1u8, 2, 3];
        let mut v = IoVecs::with_capacity(4);
        v.push_bytes(&head);
        v.push_page(page);
        v.push_bytes(&[]);
        v.advance(2);
        let mut n = 0;
        while !v.is_empty() {
            n += v.writev(std::os::fd::AsFd::as_fd(&a)).expect("writev");
        }
        assert_eq!(n, 1 + TARGET_PAGE_SIZE);
        let mut got = vec![0u8; n];
        std::io::Read::read_exact(&mut &b, &mut got).expect("read");
        assert_eq!(got[0], 3);
        assert!(got[1..].iter().all(|&x| x == 7));
    }

    #[test]
    fn scattered_reads_fill_guest_pages_and_refuse_shared_buffers() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let mut mem = vec![0u8; 2 * TARGET_PAGE_SIZE];
        let r = GuestRange::new(owned(&mut mem));
        let mut v = IoVecs::with_capacity(2);
        v.push_page_to_fill(r.page(1).expect("page 1"));
        v.push_page_to_fill(r.page(0).expect("page 0"));
        assert_eq!(v.remaining(), 2 * TARGET_PAGE_SIZE);
        let mut data = vec![1u8; TARGET_PAGE_SIZE];
        data.extend_from_slice(&[2u8; TARGET_PAGE_SIZE]);
        std::io::Write::write_all(&mut &a, &data[..100]).expect("write");
        // A short read: the rest goes where the first one stopped.
        assert_eq!(v.readv(std::os::fd::AsFd::as_fd(&b)).expect("readv"), 100);
        assert_eq!(v.remaining(), 2 * TARGET_PAGE_SIZE - 100);
        std::io::Write::write_all(&mut &a, &data[100..]).expect("write");
        while !v.is_empty() {
            v.readv(std::os::fd::AsFd::as_fd(&b)).expect("readv");
        }
        let mut out = [0u8; TARGET_PAGE_SIZE];
        r.page(1).expect("page").copy_to(&mut out);
        assert!(out.iter().all(|&x| x == 1));
        r.page(0).expect("page").copy_to(&mut out);
        assert!(out.iter().all(|&x| x == 2));
        // The process's own bytes are borrowed shared: never read into.
        let own = [0u8; 8];
        v.clear();
        v.push_bytes(&own);
        let e = v.readv(std::os::fd::AsFd::as_fd(&b)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        v.clear();
        assert!(v.is_empty() && v.remaining() == 0);
    }

    #[test]
    fn record_copies_cross_buffers_and_refuse_shared_ones() {
        let mut mem = vec![0u8; 2 * TARGET_PAGE_SIZE];
        mem[..TARGET_PAGE_SIZE].fill(1);
        mem[TARGET_PAGE_SIZE..].fill(2);
        let r = GuestRange::new(owned(&mut mem));
        let head = *b"hdr";
        let mut v = IoVecs::with_capacity(3);
        v.push_bytes(&head);
        v.push_page(r.page(1).expect("page 1"));
        v.push_page(r.page(0).expect("page 0"));
        // Out in pieces that do not line up with the buffers.
        let mut out = vec![0u8; 5000];
        assert_eq!(v.copy_out(&mut out), 5000);
        assert_eq!(&out[..3], b"hdr");
        assert!(out[3..3 + TARGET_PAGE_SIZE].iter().all(|&x| x == 2));
        assert!(out[3 + TARGET_PAGE_SIZE..].iter().all(|&x| x == 1));
        assert_eq!(v.remaining(), 3 + 2 * TARGET_PAGE_SIZE - 5000);
        let mut rest = vec![0u8; 8192];
        assert_eq!(v.copy_out(&mut rest), 3 + 2 * TARGET_PAGE_SIZE - 5000);
        assert!(v.is_empty());
        // The list has shared bytes: never written into.
        let mut v = IoVecs::with_capacity(1);
        v.push_bytes(&head);
        let e = v.fill_from(b"xyz").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        // Into pages, across their boundary, a piece at a time.
        let mut v = IoVecs::with_capacity(2);
        v.push_page_to_fill(r.page(0).expect("page 0"));
        v.push_page_to_fill(r.page(1).expect("page 1"));
        let data = vec![9u8; 3000];
        for _ in 0..2 {
            assert_eq!(v.fill_from(&data).expect("fill"), 3000);
        }
        assert_eq!(
            v.fill_from(&data).expect("fill"),
            2 * TARGET_PAGE_SIZE - 6000
        );
        assert!(v.is_empty());
        let mut page = [0u8; TARGET_PAGE_SIZE];
        r.page(1).expect("page").copy_to(&mut page);
        assert!(page.iter().all(|&x| x == 9), "both pages filled");
    }

    /// Not a timed test: prints what copying pages in costs through the range handle next
    /// to a plain `copy_nonoverlapping` loop
    /// (`cargo test --profile ci --lib page_copy_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn page_copy_cost() {
        let pages = 16 << 8; // 16 MiB
        let src: Vec<Page> = (0..pages).map(|i| [i as u8; TARGET_PAGE_SIZE]).collect();
        let refs: Vec<&Page> = src.iter().collect();
        let mut mem = vec![1u8; pages * TARGET_PAGE_SIZE];
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..10 {
                let dst = mem.as_mut_ptr();
                for (i, p) in refs.iter().enumerate() {
                    // SAFETY: page i of `mem`, which is pages * TARGET_PAGE_SIZE long.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            p.as_ptr(),
                            dst.add(i * TARGET_PAGE_SIZE),
                            TARGET_PAGE_SIZE,
                        )
                    };
                }
                std::hint::black_box(&mut mem);
            }
            let raw = t.elapsed().as_nanos() as f64 / (10 * pages) as f64;
            let r = GuestRange::new(owned(&mut mem));
            let t = std::time::Instant::now();
            for _ in 0..10 {
                assert!(r.copy_pages_from(std::hint::black_box(&refs)));
            }
            let vol = t.elapsed().as_nanos() as f64 / (10 * pages) as f64;
            eprintln!("page copy-in: raw {raw:.0} ns/page, GuestRange {vol:.0} ns/page");
        }
    }

    /// Not a timed test: prints what the zero check costs per page next to a plain
    /// slice check (`cargo test --profile ci --lib zero_check_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn zero_check_cost() {
        // In memory (64 MiB, as a migration reads it) and in cache (64 KiB, many times).
        for (size, rounds) in [(64usize << 20, 10usize), (64 << 10, 10_000)] {
            let mut mem = vec![0u8; size];
            let pages = mem.len() / TARGET_PAGE_SIZE;
            // Fault the memory in first, so that neither loop pays for that.
            mem.iter_mut()
                .step_by(TARGET_PAGE_SIZE)
                .for_each(|b| *b = 0);
            let t = std::time::Instant::now();
            let mut n = 0;
            for _ in 0..rounds {
                for p in mem.chunks(TARGET_PAGE_SIZE) {
                    n += crate::wire::ram::is_zero_page(std::hint::black_box(p)) as usize;
                }
            }
            let slice_ns = t.elapsed().as_nanos() as f64 / (rounds * pages) as f64;
            let r = GuestRange::new(owned(&mut mem));
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                for i in 0..pages {
                    n += r.page(std::hint::black_box(i)).is_some_and(|p| p.is_zero()) as usize;
                }
            }
            let vol_ns = t.elapsed().as_nanos() as f64 / (rounds * pages) as f64;
            assert_eq!(n, 2 * rounds * pages);
            eprintln!(
                "zero page check over {} KiB: &[u8] {slice_ns:.0} ns/page, volatile {vol_ns:.0} ns/page",
                size >> 10
            );
        }
    }
}
