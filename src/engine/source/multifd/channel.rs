//! One multifd channel's thread: takes jobs from its lane, writes each packet's header and
//! page data in one gathered `writev` straight from guest memory, and SYNC packets.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::compat::wire::multifd::{FLAG_NOCOMP, PACKET_HEADER_LEN, PAGES_PER_PACKET};
use crate::engine::source::error::MultifdError;
use crate::engine::source::mapped_ram::ChannelFile;
use crate::engine::source::multifd::{Job, Shared, HOLE};
use crate::engine::source::writer::PAGE;
use crate::memory::block::RamBlock;
use crate::memory::page::IoVecs;
use crate::transport::Channel;
use crate::wire::multifd::{encode_packet_header, PacketHeader};

/// The data of a hole sent as a normal page (`zero-page-detection=none`): never read
/// through the mapping, which would allocate the page.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

pub(super) fn spawn(
    id: u8,
    chan: Arc<Channel>,
    blocks: Vec<Arc<RamBlock>>,
    shared: Arc<Shared>,
    file: Option<ChannelFile>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("qmh-mfd-send-{id}"))
        .spawn(move || {
            // It only moves pages from guest memory to the socket it was handed.
            crate::sandbox::enter_thread(crate::sandbox::ThreadKind::ChannelMover);
            let _end = EndGuard {
                shared: shared.clone(),
                id,
                peer: chan.peer.clone(),
            };
            let mut s = Sender {
                id,
                chan,
                blocks,
                shared,
                header: PacketHeader {
                    flags: 0,
                    pages_alloc: 0,
                    normal_pages: 0,
                    zero_pages: 0,
                    next_packet_size: 0,
                    packet_num: 0,
                    ramblock: String::new(),
                    offsets: Vec::with_capacity(PAGES_PER_PACKET as usize),
                },
                buf: Vec::with_capacity(PACKET_HEADER_LEN),
                sent: 0,
                file,
            };
            s.run();
        })
}

struct Sender {
    id: u8,
    chan: Arc<Channel>,
    blocks: Vec<Arc<RamBlock>>,
    shared: Arc<Shared>,
    header: PacketHeader,
    buf: Vec<u8>,
    /// Bytes written on this channel.
    sent: u64,
    /// mapped-ram: pages go to their places in the file, without packets.
    file: Option<ChannelFile>,
}

/// Marks the lane ended when the thread returns, however it does (a panic included), so
/// that the pass thread never waits for a thread that is gone.
struct EndGuard {
    shared: Arc<Shared>,
    id: u8,
    peer: String,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let mut g = self.shared.lock();
        let id = usize::from(self.id);
        g.lanes[id].ended = true;
        g.lanes[id].busy = false;
        if !g.closing && !g.abort && g.error.is_none() {
            g.error = Some(MultifdError::Gone {
                id: self.id,
                peer: std::mem::take(&mut self.peer),
            });
        }
        self.shared.events.notify_all();
    }
}

impl Sender {
    fn run(&mut self) {
        let id = usize::from(self.id);
        loop {
            let job = {
                let mut g = self.shared.lock();
                loop {
                    if g.abort {
                        break None;
                    }
                    let lane = &mut g.lanes[id];
                    if let Some(j) = lane.queue.pop_front() {
                        lane.busy = true;
                        break Some(j);
                    }
                    if g.closing {
                        break None;
                    }
                    g.lanes[id].waiting = true;
                    g = self.shared.work[id]
                        .wait(g)
                        .unwrap_or_else(|e| e.into_inner());
                    g.lanes[id].waiting = false;
                }
            };
            let Some(job) = job else {
                return;
            };
            let sync = matches!(job, Job::Sync);
            let r = match job {
                Job::Pages { block, pages } => self.packet(block, pages),
                Job::Sync => self.sync_packet(),
            };
            let mut g = self.shared.lock();
            let lane = &mut g.lanes[id];
            lane.busy = false;
            match r {
                Ok(()) => {
                    if sync {
                        lane.synced += 1;
                    }
                    self.shared.notify_pass(&g);
                }
                Err(e) => {
                    // A cancel shuts the channels down (the mailbox holds them): the
                    // failed write is its consequence, not the migration's error.
                    if self.shared.cancel.is_cancelled() {
                        g.cancelled = true;
                    } else if g.error.is_none() && !g.cancelled {
                        g.error = Some(e);
                    }
                    // The others stop too: the migration has failed.
                    self.shared.abort_all(&mut g);
                    return;
                }
            }
        }
    }

    /// A packet of `pages` of block `block`: zero pages detected (`multifd`) and listed
    /// after the normal ones, in QEMU's order (`multifd_send_zero_page_detect` swaps each
    /// zero page with the last unchecked one); holes are zero pages unread.
    fn packet(&mut self, block: usize, mut pages: Vec<u64>) -> Result<(), MultifdError> {
        let b = self
            .blocks
            .get(block)
            .cloned()
            .ok_or_else(|| MultifdError::OutsideBlock {
                id: self.id,
                peer: self.chan.peer.clone(),
                block: format!("#{block}"),
                offset: 0,
            })?;
        if let Some(&bad) = pages.iter().find(|&&e| b.guest_page(e & !HOLE).is_none()) {
            return Err(MultifdError::OutsideBlock {
                id: self.id,
                peer: self.chan.peer.clone(),
                block: b.id.clone(),
                offset: bad & !HOLE,
            });
        }
        let normal = if self.shared.detect_zero {
            partition_zero(&mut pages, |e| {
                e & HOLE != 0 || b.guest_page(e).is_none_or(|p| p.is_zero())
            })
        } else {
            pages.len()
        };
        if let Some(f) = &self.file {
            let (data, zero) = pages.split_at_mut(normal);
            let len = f
                .write_packet(&b, block, data, zero, HOLE)
                .map_err(|source| MultifdError::File {
                    id: self.id,
                    source,
                })?;
            self.written(Ok(()), len)?;
            let s = &self.shared;
            s.normal.fetch_add(normal as u64, Ordering::Relaxed);
            s.zero.fetch_add(zero.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let h = &mut self.header;
        h.flags = FLAG_NOCOMP;
        h.pages_alloc = PAGES_PER_PACKET;
        h.normal_pages = normal as u32;
        h.zero_pages = (pages.len() - normal) as u32;
        h.next_packet_size = (normal * PAGE) as u32;
        h.packet_num = self.shared.packet_num.fetch_add(1, Ordering::Relaxed);
        h.ramblock.clear();
        h.ramblock.push_str(&b.id);
        h.offsets.clear();
        h.offsets.extend(pages.iter().map(|&e| e & !HOLE));
        self.buf.clear();
        encode_packet_header(&mut self.buf, h).map_err(|source| MultifdError::Wire {
            id: self.id,
            peer: self.chan.peer.clone(),
            source,
        })?;
        let mut iov = IoVecs::with_capacity(1 + normal);
        iov.push_bytes(&self.buf);
        for &e in &pages[..normal] {
            if e & HOLE != 0 {
                iov.push_bytes(&ZERO_PAGE);
            } else if let Some(p) = b.guest_page(e) {
                // Checked above: every page is inside the block.
                iov.push_page(p);
            }
        }
        let len = (PACKET_HEADER_LEN + normal * PAGE) as u64;
        let r = self.chan.write_all_iovecs(&mut iov);
        drop(iov);
        self.written(r, len)?;
        let s = &self.shared;
        s.normal.fetch_add(normal as u64, Ordering::Relaxed);
        s.zero
            .fetch_add((pages.len() - normal) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// QEMU 10.0's SYNC packet: flags SYNC, no pages, no block, nothing after it.
    /// Under mapped-ram nothing: a SYNC is only a fence (everything queued before it is
    /// written once the lane reaches it).
    fn sync_packet(&mut self) -> Result<(), MultifdError> {
        if self.file.is_some() {
            return Ok(());
        }
        let h = &mut self.header;
        *h = PacketHeader::sync(self.shared.packet_num.fetch_add(1, Ordering::Relaxed));
        self.buf.clear();
        encode_packet_header(&mut self.buf, h).map_err(|source| MultifdError::Wire {
            id: self.id,
            peer: self.chan.peer.clone(),
            source,
        })?;
        let r = self.chan.write_all(&self.buf);
        self.written(r, PACKET_HEADER_LEN as u64)
    }

    fn written(&mut self, r: std::io::Result<()>, len: u64) -> Result<(), MultifdError> {
        r.map_err(|source| MultifdError::Io {
            id: self.id,
            peer: self.chan.peer.clone(),
            sent: self.sent,
            source,
        })?;
        self.sent += len;
        self.shared.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

/// Moves the entries `is_zero` says are zero to the end, as QEMU does (each zero one is
/// swapped with the last unchecked one); returns how many are not.
pub(super) fn partition_zero(entries: &mut [u64], is_zero: impl Fn(u64) -> bool) -> usize {
    let (mut i, mut end) = (0, entries.len());
    while i < end {
        if is_zero(entries[i]) {
            end -= 1;
            entries.swap(i, end);
        } else {
            i += 1;
        }
    }
    i
}
