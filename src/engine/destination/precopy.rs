//! The precopy sink: received pages go into the parent's memfds through the page writer,
//! zero pages cost nothing where the page is known to read as zero.

use std::sync::Arc;

use crate::engine::destination::place::{Page, PageData};
use crate::memory::block::RamBlock;
use crate::memory::page_writer::{PageBatch, PageWriteError, PageWriter};

pub(crate) struct PrecopySink {
    writer: PageWriter,
    /// Per block: pages known to read as zero (holes, not written since).
    known_zero: Vec<Vec<u64>>,
}

impl PrecopySink {
    pub(crate) fn new(blocks: &[Arc<RamBlock>], threads: usize) -> Self {
        PrecopySink {
            writer: PageWriter::new(threads),
            known_zero: blocks.iter().map(|b| b.hole_bitmap()).collect(),
        }
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
        let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        match page.data {
            PageData::Fill(fill) => {
                let known = self.known_zero[page.bi]
                    .get(w)
                    .is_some_and(|x| x & bit != 0);
                if !(known && fill == 0) {
                    // The page may be in the batch: write that first.
                    self.writer.write(std::mem::take(batch))?;
                    b.fill_page(page.offset, fill);
                }
            }
            PageData::Bytes(data) => {
                // A page that is not a hole exists already: the writer copies straight into
                // it instead of allocating.
                let mut present = true;
                if let Some(x) = self.known_zero[page.bi].get_mut(w) {
                    present = *x & bit == 0;
                    *x &= !bit;
                }
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
        if let Some(z) = self.known_zero[bi].get_mut(w) {
            *z |= mask;
        }
    }
}
