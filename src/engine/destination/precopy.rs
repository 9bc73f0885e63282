//! The precopy sink: received pages go into the parent's memfds through the page writer,
//! zero pages cost nothing where the page is known to read as zero.

use std::sync::Arc;

use crate::engine::destination::bitmap::AtomicBitmap;
use crate::engine::destination::place::{Page, PageData};
use crate::memory::block::RamBlock;
use crate::memory::page_writer::{PageBatch, PageWriteError, PageWriter};

/// Per block: pages known to read as zero (holes when the migration started, not written
/// since). Shared by the main channel's sink and the multifd receivers, so that a page
/// written on either is no longer taken for a hole by the other.
pub(crate) type KnownZero = Arc<Vec<AtomicBitmap>>;

pub(crate) struct PrecopySink {
    writer: PageWriter,
    known_zero: KnownZero,
}

impl PrecopySink {
    pub(crate) fn new(blocks: &[Arc<RamBlock>], threads: usize) -> Self {
        PrecopySink {
            writer: PageWriter::new(threads),
            known_zero: Arc::new(
                blocks
                    .iter()
                    .map(|b| AtomicBitmap::from_words(b.hole_bitmap()))
                    .collect(),
            ),
        }
    }

    /// The known-zero pages, for the multifd receivers.
    pub(crate) fn known_zero(&self) -> KnownZero {
        self.known_zero.clone()
    }

    /// Places a page: a page of bytes is queued in `batch` (it borrows the reader's
    /// buffer, and is written by `write` before the buffer may change), a fill is written
    /// at once, after the pages queued before it.
    pub(crate) fn place<'buf>(
        &mut self,
        blocks: &[Arc<RamBlock>],
        page: &Page<'buf>,
        batch: &mut PageBatch<'buf>,
    ) -> Result<(), PageWriteError> {
        let b = &blocks[page.bi];
        let i = page.index();
        let known = &self.known_zero[page.bi];
        match page.data {
            PageData::Fill(fill) => {
                if !(fill == 0 && known.get(i)) {
                    // The page may be in the batch: write that first.
                    self.writer.write(std::mem::take(batch))?;
                    b.fill_page(page.offset, fill);
                }
            }
            PageData::Bytes(data) => {
                // A page that is not a hole exists already: the writer copies straight into
                // it instead of allocating.
                let present = !known.take(i);
                batch.queue(b, page.offset, data, present);
            }
        }
        Ok(())
    }

    /// Writes a batch; the buffer it borrowed may change after this.
    pub(crate) fn write(&mut self, batch: PageBatch<'_>) -> Result<(), PageWriteError> {
        self.writer.write(batch)
    }

    /// Discarded pages (holes punched) read as zero again.
    pub(crate) fn discarded(&mut self, bi: usize, w: usize, mask: u64) {
        if let Some(z) = self.known_zero.get(bi) {
            z.set_mask(w, mask);
        }
    }
}
