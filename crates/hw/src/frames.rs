//! Host physical frame allocation: the machine's page allocator.
//!
//! Everything that lives in host memory is carved from a [`FrameAllocator`]: the SMMU
//! driver's stream tables, CD tables, queues and stage-2 tables, KVM's guest RAM and guest
//! stage-2 tables. It is a binary buddy allocator over one physical range: blocks are powers
//! of two, naturally aligned (what translation tables, queues and stream tables require,
//! IHI0070 3.3, 6.2), and a freed block merges with its free buddy, so a long-running
//! scenario does not fragment into unusable pieces.
//!
//! Clones share one allocator (it is an `Arc` inside), so a driver and a KVM model can hand
//! the same allocator to many table builders.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use twinmmu_vmsa::{AllocError, PageAllocator};

/// The smallest block: 64 bytes, the size and alignment of one STE or CD.
pub const MIN_BLOCK_SHIFT: u32 = 6;

/// Why a frame allocator could not be created or a block not freed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame range {0:#x?} is empty or not aligned to {min} bytes", min = 1u64 << MIN_BLOCK_SHIFT)]
    BadRange(Range<u64>),
    #[error("block {pa:#x} of {size:#x} bytes was not allocated from this allocator")]
    NotAllocated { pa: u64, size: u64 },
}

#[derive(Debug)]
struct Buddy {
    range: Range<u64>,
    /// Free blocks by order (log2 of the size).
    free: Vec<BTreeSet<u64>>,
    /// Allocated blocks and their order, so a wrong `free` is an error, not corruption.
    live: std::collections::HashMap<u64, u32>,
    live_bytes: u64,
}

impl Buddy {
    fn insert_free(&mut self, mut pa: u64, mut order: u32) {
        // Merge with the buddy while it is free and the merged block stays in range.
        while (order as usize) + 1 < self.free.len() {
            let buddy = pa ^ (1u64 << order);
            let merged = pa & !(1u64 << order);
            let merged_end = merged.checked_add(1u64 << (order + 1));
            let in_range =
                merged >= self.range.start && merged_end.is_some_and(|e| e <= self.range.end);
            if !in_range || !self.free[order as usize].remove(&buddy) {
                break;
            }
            pa = merged;
            order += 1;
        }
        self.free[order as usize].insert(pa);
    }

    fn alloc(&mut self, order: u32) -> Option<u64> {
        // The lowest address among the smallest sufficient free blocks: deterministic.
        let from = (order as usize..self.free.len()).find(|&o| !self.free[o].is_empty())?;
        let pa = self.free[from].pop_first()?;
        // Split down to the requested order, returning the upper halves.
        for o in (order as usize..from).rev() {
            self.free[o].insert(pa + (1u64 << o));
        }
        self.live.insert(pa, order);
        self.live_bytes += 1u64 << order;
        Some(pa)
    }
}

/// A thread-safe binary buddy allocator over a physical address range.
#[derive(Debug, Clone)]
pub struct FrameAllocator {
    inner: Arc<Mutex<Buddy>>,
}

fn order_for(size: u64) -> Option<u32> {
    let size = size
        .max(1u64 << MIN_BLOCK_SHIFT)
        .checked_next_power_of_two()?;
    Some(size.trailing_zeros())
}

impl FrameAllocator {
    /// An allocator handing out blocks from `range` (both ends aligned to 64 bytes).
    pub fn new(range: Range<u64>) -> Result<Self, FrameError> {
        let align = (1u64 << MIN_BLOCK_SHIFT) - 1;
        if range.start >= range.end || range.start & align != 0 || range.end & align != 0 {
            return Err(FrameError::BadRange(range));
        }
        let mut buddy = Buddy {
            range: range.clone(),
            free: vec![BTreeSet::new(); 64],
            live: Default::default(),
            live_bytes: 0,
        };
        // Carve the range into maximal naturally aligned blocks.
        let mut pa = range.start;
        while pa < range.end {
            let align_order = if pa == 0 { 63 } else { pa.trailing_zeros() };
            let fit_order = 63 - (range.end - pa).leading_zeros();
            let order = align_order.min(fit_order);
            buddy.free[order as usize].insert(pa);
            pa += 1u64 << order;
        }
        Ok(FrameAllocator {
            inner: Arc::new(Mutex::new(buddy)),
        })
    }

    /// A block of at least `size` bytes (rounded up to a power of two, at least 64), aligned
    /// to its size. Contents are whatever was there before.
    pub fn alloc(&self, size: u64) -> Result<u64, AllocError> {
        let order = order_for(size).ok_or(AllocError)?;
        self.inner.lock().alloc(order).ok_or(AllocError)
    }

    /// Returns a block. `size` must be the size it was allocated with (after rounding).
    pub fn free(&self, pa: u64, size: u64) -> Result<(), FrameError> {
        let order = order_for(size).ok_or(FrameError::NotAllocated { pa, size })?;
        let mut b = self.inner.lock();
        if b.live.get(&pa) != Some(&order) {
            return Err(FrameError::NotAllocated { pa, size });
        }
        b.live.remove(&pa);
        b.live_bytes -= 1u64 << order;
        b.insert_free(pa, order);
        Ok(())
    }

    /// The range this allocator manages.
    pub fn range(&self) -> Range<u64> {
        self.inner.lock().range.clone()
    }

    /// Bytes currently allocated (after rounding): tests use it to prove nothing leaked.
    pub fn live_bytes(&self) -> u64 {
        self.inner.lock().live_bytes
    }

    /// Blocks currently allocated.
    pub fn live_blocks(&self) -> usize {
        self.inner.lock().live.len()
    }
}

/// The vmsa table builder takes table pages from here.
impl PageAllocator for FrameAllocator {
    fn alloc(&mut self, size: u64) -> Result<u64, AllocError> {
        FrameAllocator::alloc(self, size)
    }

    fn free(&mut self, pa: u64, size: u64) {
        // The builder only frees what it allocated; a mismatch is a builder bug that must
        // not corrupt the allocator, so it is refused (and visible in `live_bytes`).
        let _ = FrameAllocator::free(self, pa, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_to_their_size_and_lowest_first() {
        let f = FrameAllocator::new(0x4000_0000..0x4010_0000).unwrap();
        let a = f.alloc(0x1000).unwrap();
        let b = f.alloc(0x1000).unwrap();
        let c = f.alloc(0x1_0000).unwrap();
        let d = f.alloc(100).unwrap();
        assert_eq!(a, 0x4000_0000);
        assert_eq!(b, 0x4000_1000);
        assert_eq!(c % 0x1_0000, 0);
        assert_eq!(d % 128, 0, "100 bytes round up to a 128-byte block");
        assert_eq!(f.live_bytes(), 0x2000 + 0x1_0000 + 128);
    }

    #[test]
    fn freeing_everything_merges_back_to_the_whole_range() {
        let f = FrameAllocator::new(0x10_0000..0x20_0000).unwrap();
        let blocks: Vec<_> = (0..256).map(|_| f.alloc(0x1000).unwrap()).collect();
        assert!(f.alloc(0x1000).is_err(), "1 MiB holds exactly 256 pages");
        for (i, pa) in blocks.iter().enumerate().rev() {
            if i % 2 == 0 {
                f.free(*pa, 0x1000).unwrap();
            }
        }
        for (i, pa) in blocks.iter().enumerate() {
            if i % 2 == 1 {
                f.free(*pa, 0x1000).unwrap();
            }
        }
        assert_eq!(f.live_bytes(), 0);
        assert_eq!(f.alloc(0x10_0000).unwrap(), 0x10_0000, "fully merged");
    }

    #[test]
    fn unaligned_ranges_are_carved_into_aligned_blocks() {
        // 0x3000..0x9000: blocks 0x3000 (4K), 0x4000 (16K), 0x8000 (4K).
        let f = FrameAllocator::new(0x3000..0x9000).unwrap();
        assert_eq!(f.alloc(0x4000).unwrap(), 0x4000);
        assert!(f.alloc(0x4000).is_err());
        assert_eq!(f.alloc(0x1000).unwrap(), 0x3000);
        assert_eq!(f.alloc(0x1000).unwrap(), 0x8000);
        // Freeing 0x3000 must not merge across the range start.
        f.free(0x3000, 0x1000).unwrap();
        assert_eq!(f.alloc(0x2000), Err(AllocError));
    }

    #[test]
    fn bad_frees_and_ranges_are_errors() {
        assert!(FrameAllocator::new(0x1000..0x1000).is_err());
        assert!(FrameAllocator::new(0x1001..0x2000).is_err());
        let f = FrameAllocator::new(0..0x10000).unwrap();
        let a = f.alloc(0x1000).unwrap();
        assert!(matches!(
            f.free(a, 0x2000),
            Err(FrameError::NotAllocated { .. })
        ));
        assert!(matches!(
            f.free(a + 0x40, 0x40),
            Err(FrameError::NotAllocated { .. })
        ));
        f.free(a, 0x1000).unwrap();
        assert!(f.free(a, 0x1000).is_err(), "double free is refused");
        assert_eq!(f.alloc(u64::MAX), Err(AllocError));
    }

    #[test]
    fn serves_the_vmsa_builder() {
        use twinmmu_vmsa::{Granule, PaSize, S1LeafAttrs, TableBuilder, TableFormat};
        let mem = crate::SparseMem::with_range(0x4000_0000, 0x100_0000).unwrap();
        let frames = FrameAllocator::new(0x4000_0000..0x4100_0000).unwrap();
        let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
        let mem_ref = crate::mem::WalkMem(&mem);
        let mut b = TableBuilder::new(fmt, &mem_ref, frames.clone()).unwrap();
        b.map(0x1234_5000, 0x8000_0000, 0x1000, S1LeafAttrs::rw().bits())
            .unwrap();
        assert_eq!(frames.live_blocks(), 4, "root + L1 + L2 + L3");
        b.unmap(0x1234_5000, 0x1000).unwrap();
        assert_eq!(frames.live_blocks(), 1, "only the root is left");
    }
}
