//! mapped-ram files (`wire::mapped_ram`): after each block's entry in the RAM block list, a
//! header naming where the block's bitmap and pages are in the file; the stream goes on
//! after the pages. Every offset is checked against the file (and the other blocks) before
//! it is used.

use crate::wire::mapped_ram::{self, Region};

use super::report::MappedStats;
use super::{AnalyzeError, Walker};

const PAGE: u64 = crate::compat::wire::TARGET_PAGE_SIZE as u64;

impl<'a> Walker<'a> {
    /// The mapped-ram header of block `bi`, whose entry was just read: its bitmap counted
    /// (and its pages extracted); the walk goes on after the block's pages.
    pub(super) fn mapped_block(&mut self, bi: usize) -> Result<(), AnalyzeError> {
        let h = self.next("a mapped-ram header", mapped_ram::decode_header)?;
        let Some(b) = self.report.blocks.get(bi) else {
            return Err(self.bad("mapped-ram header for no block"));
        };
        let (name, length) = (b.name.clone(), b.length);
        let r = mapped_ram::check(
            &h,
            &name,
            length,
            self.pos as u64,
            Some(self.buf.len() as u64),
            &self.mapped_regions,
        )
        .map_err(|e| self.wire(e))?;
        let bytes = self.region(r.bitmap)?;
        let pages = length / PAGE;
        let words = mapped_ram::decode_bitmap(bytes, pages).map_err(|e| self.wire(e))?;
        let data_pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        self.mapped_regions.push(r);
        if let Some(x) = &mut self.extract {
            x.mapped_block(bi, &h, &words, self.buf)?;
        }
        // Checked inside the file, so it fits a usize.
        self.region(r.pages)?;
        let end = r.pages.end as usize;
        if let Some(b) = self.report.blocks.get_mut(bi) {
            b.pages = pages;
            b.zero_pages = pages - data_pages.min(pages);
            b.mapped = Some(MappedStats {
                version: h.version,
                page_size: h.page_size,
                bitmap_offset: h.bitmap_offset,
                pages_offset: h.pages_offset,
                data_pages,
            });
        }
        self.pos = end;
        Ok(())
    }

    /// The bytes of a region [`mapped_ram::check`] accepted (so inside the file).
    fn region(&self, reg: Region) -> Result<&'a [u8], AnalyzeError> {
        usize::try_from(reg.start)
            .ok()
            .zip(usize::try_from(reg.end).ok())
            .and_then(|(s, e)| self.buf.get(s..e))
            .ok_or_else(|| self.bad("mapped-ram region outside the file"))
    }
}
