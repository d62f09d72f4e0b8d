//! The memory the walker reads descriptors from and the builder writes them to.

use std::cell::RefCell;

use rustc_hash::FxHashMap;

/// A physical access that the memory system could not complete: the walker turns it into an
/// External abort on the translation table walk (IHI0070 F_WALK_EABT), carrying the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("external abort at physical address {addr:#x}")]
pub struct MemError {
    pub addr: u64,
}

/// 8-byte little-endian reads of physical memory. `&self`: implementations that are shared
/// between threads use interior mutability.
pub trait Memory {
    /// Reads the naturally aligned 64-bit little-endian word at `pa`.
    fn read_u64(&self, pa: u64) -> Result<u64, MemError>;
}

/// 8-byte little-endian writes, for the table builder.
pub trait MemoryMut: Memory {
    /// Writes the naturally aligned 64-bit little-endian word at `pa`.
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), MemError>;

    /// Zeroes `[pa, pa + len)` (both 8-byte aligned); used for new tables. Override it with
    /// a bulk fill where the memory has one.
    fn zero(&self, pa: u64, len: u64) -> Result<(), MemError> {
        let mut a = pa;
        while a < pa.saturating_add(len) {
            self.write_u64(a, 0)?;
            a += 8;
        }
        Ok(())
    }
}

impl<T: Memory + ?Sized> Memory for &T {
    #[inline(always)]
    fn read_u64(&self, pa: u64) -> Result<u64, MemError> {
        (**self).read_u64(pa)
    }
}

impl<T: MemoryMut + ?Sized> MemoryMut for &T {
    #[inline(always)]
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), MemError> {
        (**self).write_u64(pa, value)
    }
    #[inline(always)]
    fn zero(&self, pa: u64, len: u64) -> Result<(), MemError> {
        (**self).zero(pa, len)
    }
}

const PAGE_SHIFT: u32 = 12;
const WORDS: usize = 512;

/// The numbers of the 4 KiB pages covering `[pa, pa + len)` (none when `len` is 0).
fn page_numbers(pa: u64, len: u64) -> std::ops::Range<u64> {
    let first = pa >> PAGE_SHIFT;
    match len.checked_sub(1) {
        Some(last) => first..(pa.saturating_add(last) >> PAGE_SHIFT) + 1,
        None => first..first,
    }
}

/// A sparse, deterministic physical memory for tests: 4 KiB pages that exist once written
/// (or explicitly added). Reading a page that does not exist is an external abort, so tests can
/// point a table at "no memory". Not thread-safe (the `hw` crate owns the shared memory).
#[derive(Default)]
pub struct SparseMemory {
    pages: RefCell<FxHashMap<u64, Box<[u64; WORDS]>>>,
}

impl SparseMemory {
    pub fn new() -> Self {
        SparseMemory::default()
    }

    /// Makes the 4 KiB pages covering `[pa, pa + len)` exist (zero-filled where new).
    pub fn add_range(&self, pa: u64, len: u64) {
        let mut pages = self.pages.borrow_mut();
        for pn in page_numbers(pa, len) {
            pages.entry(pn).or_insert_with(|| Box::new([0; WORDS]));
        }
    }

    /// Removes the 4 KiB pages covering `[pa, pa + len)`: reads there abort again.
    pub fn remove_range(&self, pa: u64, len: u64) {
        let mut pages = self.pages.borrow_mut();
        for pn in page_numbers(pa, len) {
            pages.remove(&pn);
        }
    }

    /// Copies `bytes` to `pa`, creating pages as needed.
    pub fn write_bytes(&self, pa: u64, bytes: &[u8]) {
        self.add_range(pa, bytes.len() as u64);
        let mut pages = self.pages.borrow_mut();
        for (i, b) in bytes.iter().enumerate() {
            let a = pa.wrapping_add(i as u64);
            if let Some(page) = pages.get_mut(&(a >> PAGE_SHIFT)) {
                let w = ((a >> 3) as usize) & (WORDS - 1);
                let sh = (a & 7) * 8;
                page[w] = (page[w] & !(0xFF << sh)) | ((*b as u64) << sh);
            }
        }
    }

    /// Number of 4 KiB pages that exist.
    pub fn page_count(&self) -> usize {
        self.pages.borrow().len()
    }

    /// Whether the page holding `pa` exists.
    pub fn is_backed(&self, pa: u64) -> bool {
        self.pages.borrow().contains_key(&(pa >> PAGE_SHIFT))
    }
}

impl Memory for SparseMemory {
    #[inline]
    fn read_u64(&self, pa: u64) -> Result<u64, MemError> {
        if pa & 7 != 0 {
            return Err(MemError { addr: pa });
        }
        let pages = self.pages.borrow();
        match pages.get(&(pa >> PAGE_SHIFT)) {
            Some(page) => Ok(page[((pa >> 3) as usize) & (WORDS - 1)]),
            None => Err(MemError { addr: pa }),
        }
    }
}

impl MemoryMut for SparseMemory {
    /// Writes create the page if needed (memory is "anywhere the test writes").
    #[inline]
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), MemError> {
        if pa & 7 != 0 {
            return Err(MemError { addr: pa });
        }
        let mut pages = self.pages.borrow_mut();
        let page = pages
            .entry(pa >> PAGE_SHIFT)
            .or_insert_with(|| Box::new([0; WORDS]));
        page[((pa >> 3) as usize) & (WORDS - 1)] = value;
        Ok(())
    }

    fn zero(&self, pa: u64, len: u64) -> Result<(), MemError> {
        if pa & 7 != 0 || len & 7 != 0 {
            return Err(MemError { addr: pa });
        }
        let end = pa.saturating_add(len);
        let mut pages = self.pages.borrow_mut();
        let mut a = pa;
        while a < end {
            let page = pages
                .entry(a >> PAGE_SHIFT)
                .or_insert_with(|| Box::new([0; WORDS]));
            let first = ((a >> 3) as usize) & (WORDS - 1);
            let page_end = ((a >> PAGE_SHIFT) + 1) << PAGE_SHIFT;
            let stop = end.min(page_end);
            let n = ((stop - a) >> 3) as usize;
            page[first..first + n].fill(0);
            a = stop;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unbacked_reads_abort_and_writes_back_pages() {
        let m = SparseMemory::new();
        assert_eq!(m.read_u64(0x1000), Err(MemError { addr: 0x1000 }));
        m.write_u64(0x1008, 0xdead_beef).unwrap();
        assert_eq!(m.read_u64(0x1008), Ok(0xdead_beef));
        assert_eq!(m.read_u64(0x1000), Ok(0));
        assert_eq!(m.read_u64(0x1004), Err(MemError { addr: 0x1004 }));
        m.remove_range(0x1000, 1);
        assert!(m.read_u64(0x1008).is_err());
    }

    #[test]
    fn bytes_are_little_endian() {
        let m = SparseMemory::new();
        m.write_bytes(0x2ffc, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(m.read_u64(0x3000), Ok(0x0c0b_0a09_0807_0605));
        assert_eq!(m.read_u64(0x2ff8), Ok(0x0403_0201_0000_0000));
        assert_eq!(m.page_count(), 2);
    }
}
