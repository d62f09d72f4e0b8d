//! Host physical memory.
//!
//! [`PhysMem`] is the one interface the SMMU uses to reach memory: byte-granular reads and
//! writes plus fast naturally aligned 8-byte accesses (descriptors, queue entries). It takes
//! `&self` and is `Send + Sync`, so DMA from many threads and command processing can share
//! one memory. An access outside valid memory returns [`MemError::Abort`]; the SMMU turns
//! that into the external abort of the context (F_STE_FETCH, F_CD_FETCH, F_WALK_EABT,
//! CERROR_ABT, GERROR.EVTQ_ABT_ERR, an MSI abort), never a panic.
//!
//! [`SparseMem`] is the deterministic implementation for simulations and tests: declared
//! valid ranges, 4 KiB pages allocated on first write (unwritten valid memory reads as
//! zero), lock-free reads and writes once a page exists. A process-memory implementation
//! (a physical address being the address of a page the emulator owns or has pinned) only
//! has to implement the trait; nothing in the SMMU depends on the representation.

use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed access: the address is not backed by memory (an external abort for the
/// requester).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    #[error("external abort: no memory at {addr:#x}")]
    Abort { addr: u64 },
}

/// Host physical memory as seen by a bus master (the SMMU's table walker, queue and MSI
/// writer, and the DMA it forwards).
pub trait PhysMem: Send + Sync {
    /// Reads `buf.len()` bytes at `pa`. All or nothing: on an abort `buf` is unspecified.
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Writes `buf` at `pa`. On an abort, the bytes before the failing page may have been
    /// written (like a burst that aborts part-way).
    fn write(&self, pa: u64, buf: &[u8]) -> Result<(), MemError>;

    /// A little-endian 8-byte read; `pa` need not be aligned but aligned reads are the fast
    /// path implementations optimise (descriptor fetches). Single-copy atomic when aligned.
    fn read_u64(&self, pa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(pa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A little-endian 8-byte write; single-copy atomic when aligned.
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), MemError> {
        self.write(pa, &value.to_le_bytes())
    }

    /// A little-endian 4-byte write (MSIs are 32-bit writes).
    fn write_u32(&self, pa: u64, value: u32) -> Result<(), MemError> {
        self.write(pa, &value.to_le_bytes())
    }

    /// Whether `[pa, pa + len)` is entirely valid memory.
    fn is_valid(&self, pa: u64, len: u64) -> bool;
}

impl<T: PhysMem + ?Sized> PhysMem for std::sync::Arc<T> {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(pa, buf)
    }
    fn write(&self, pa: u64, buf: &[u8]) -> Result<(), MemError> {
        (**self).write(pa, buf)
    }
    fn read_u64(&self, pa: u64) -> Result<u64, MemError> {
        (**self).read_u64(pa)
    }
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), MemError> {
        (**self).write_u64(pa, value)
    }
    fn write_u32(&self, pa: u64, value: u32) -> Result<(), MemError> {
        (**self).write_u32(pa, value)
    }
    fn is_valid(&self, pa: u64, len: u64) -> bool {
        (**self).is_valid(pa, len)
    }
}

const PAGE_SHIFT: u32 = 12;
const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
const WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Radix fan-out: 9 bits a level, like a translation table.
const FAN: usize = 512;
/// Physical addresses up to 52 bits (the largest OAS): 40 bits of page number,
/// split 13 + 9 + 9 + 9.
const MAX_PA_BITS: u32 = 52;
const TOP_BITS: u32 = MAX_PA_BITS - PAGE_SHIFT - 27;

type Page = [AtomicU64; WORDS];
type Leaf = [OnceLock<Box<Page>>; FAN];
type Mid = [OnceLock<Box<Leaf>>; FAN];
type Upper = [OnceLock<Box<Mid>>; FAN];

fn new_array<T: Default>() -> Box<[T; FAN]> {
    // Arrays of 512 pointers-with-state (8 KiB) are built on the stack, then boxed.
    Box::new(std::array::from_fn(|_| T::default()))
}

/// The radix-tree indexes of page number `pfn`: top, upper, middle, leaf.
#[inline]
fn radix(pfn: u64) -> (usize, usize, usize, usize) {
    (
        (pfn >> 27) as usize,
        ((pfn >> 18) & 511) as usize,
        ((pfn >> 9) & 511) as usize,
        (pfn & 511) as usize,
    )
}

/// The index in its page of the 8-byte word holding `pa`.
#[inline]
fn word_index(pa: u64) -> usize {
    ((pa & (PAGE_SIZE - 1)) >> 3) as usize
}

fn new_page() -> Box<Page> {
    Box::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

/// Sparse, deterministic, thread-safe host memory with declared valid ranges.
///
/// Pages live in a four-level radix tree of `OnceLock`s: a lookup is four dependent loads
/// with no lock, and a page is created exactly once even when two writers race. Contents
/// are stored as little-endian `AtomicU64` words so aligned 8-byte accesses are single-copy
/// atomic and concurrent byte writes to one word never tear each other.
pub struct SparseMem {
    ranges: Vec<Range<u64>>,
    top: Box<[OnceLock<Box<Upper>>]>,
}

impl std::fmt::Debug for SparseMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseMem")
            .field("ranges", &self.ranges)
            .finish_non_exhaustive()
    }
}

/// Why a memory map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemMapError {
    #[error("range {start:#x}..{end:#x} is empty, unaligned to 4 KiB or beyond 52 bits")]
    BadRange { start: u64, end: u64 },
    #[error("ranges {0:#x}.. and {1:#x}.. overlap")]
    Overlap(u64, u64),
}

impl SparseMem {
    /// Memory valid over `ranges` (each 4 KiB aligned, below 2^52, non-overlapping).
    pub fn new(ranges: &[Range<u64>]) -> Result<Self, MemMapError> {
        let mut sorted: Vec<Range<u64>> = ranges.to_vec();
        sorted.sort_by_key(|r| r.start);
        for r in &sorted {
            if r.start >= r.end
                || !r.start.is_multiple_of(PAGE_SIZE)
                || !r.end.is_multiple_of(PAGE_SIZE)
                || r.end > (1u64 << MAX_PA_BITS)
            {
                return Err(MemMapError::BadRange {
                    start: r.start,
                    end: r.end,
                });
            }
        }
        for w in sorted.windows(2) {
            if w[0].end > w[1].start {
                return Err(MemMapError::Overlap(w[0].start, w[1].start));
            }
        }
        let top: Vec<OnceLock<Box<Upper>>> =
            (0..(1usize << TOP_BITS)).map(|_| OnceLock::new()).collect();
        Ok(SparseMem {
            ranges: sorted,
            top: top.into_boxed_slice(),
        })
    }

    /// Memory valid over the one range `[base, base + len)`.
    pub fn with_range(base: u64, len: u64) -> Result<Self, MemMapError> {
        let end = base.checked_add(len).ok_or(MemMapError::BadRange {
            start: base,
            end: u64::MAX,
        })?;
        Self::new(std::slice::from_ref(&(base..end)))
    }

    /// The declared valid ranges, sorted.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    fn valid_page(&self, pa: u64) -> bool {
        self.ranges.iter().any(|r| r.start <= pa && pa < r.end)
    }

    /// The page holding `pa` if it exists; `None` if valid but never written.
    fn page(&self, pfn: u64) -> Option<&Page> {
        let (t, u, m, l) = radix(pfn);
        let upper = self.top.get(t)?.get()?;
        let mid = upper[u].get()?;
        let leaf = mid[m].get()?;
        leaf[l].get().map(|b| &**b)
    }

    fn page_or_create(&self, pfn: u64) -> Option<&Page> {
        let (t, u, m, l) = radix(pfn);
        let upper = self.top.get(t)?.get_or_init(new_array);
        let mid = upper[u].get_or_init(new_array);
        let leaf = mid[m].get_or_init(new_array);
        Some(&**leaf[l].get_or_init(new_page))
    }

    fn check(&self, pa: u64, len: u64) -> Result<(), MemError> {
        if len == 0 {
            return Ok(());
        }
        let end = pa.checked_add(len).ok_or(MemError::Abort { addr: pa })?;
        // Every page touched must be inside a valid range; ranges are page-aligned so
        // checking each page start suffices.
        let mut p = pa & !(PAGE_SIZE - 1);
        while p < end {
            if !self.valid_page(p) {
                return Err(MemError::Abort { addr: p.max(pa) });
            }
            p += PAGE_SIZE;
        }
        Ok(())
    }

    /// The 8-byte word holding `pa` (valid memory never written reads as zero).
    #[inline]
    fn load_word(&self, pa: u64) -> u64 {
        self.page(pa >> PAGE_SHIFT)
            .map_or(0, |page| page[word_index(pa)].load(Ordering::Relaxed))
    }

    fn read_byte(&self, pa: u64) -> u8 {
        (self.load_word(pa) >> ((pa & 7) * 8)) as u8
    }

    fn write_byte(&self, page: &Page, pa: u64, v: u8) {
        let word = &page[word_index(pa)];
        let shift = (pa & 7) * 8;
        let mask = !(0xffu64 << shift);
        // Read-modify-write of one byte lane: fetch_update keeps concurrent writers to other
        // bytes of the same word intact.
        let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some((old & mask) | (u64::from(v) << shift))
        });
    }
}

impl PhysMem for SparseMem {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.check(pa, buf.len() as u64)?;
        let mut i = 0usize;
        while i < buf.len() {
            let a = pa + i as u64;
            if a.is_multiple_of(8) && buf.len() - i >= 8 {
                buf[i..i + 8].copy_from_slice(&self.load_word(a).to_le_bytes());
                i += 8;
            } else {
                buf[i] = self.read_byte(a);
                i += 1;
            }
        }
        Ok(())
    }

    fn write(&self, pa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.check(pa, buf.len() as u64)?;
        let mut i = 0usize;
        while i < buf.len() {
            let a = pa + i as u64;
            let page = self
                .page_or_create(a >> PAGE_SHIFT)
                .ok_or(MemError::Abort { addr: a })?;
            if a.is_multiple_of(8) && buf.len() - i >= 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[i..i + 8]);
                page[word_index(a)].store(u64::from_le_bytes(b), Ordering::Relaxed);
                i += 8;
            } else {
                self.write_byte(page, a, buf[i]);
                i += 1;
            }
        }
        Ok(())
    }

    fn read_u64(&self, pa: u64) -> Result<u64, MemError> {
        if pa.is_multiple_of(8) {
            if !self.valid_page(pa) {
                return Err(MemError::Abort { addr: pa });
            }
            return Ok(self.load_word(pa));
        }
        let mut b = [0u8; 8];
        self.read(pa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_u64(&self, pa: u64, value: u64) -> Result<(), MemError> {
        if pa.is_multiple_of(8) {
            if !self.valid_page(pa) {
                return Err(MemError::Abort { addr: pa });
            }
            let page = self
                .page_or_create(pa >> PAGE_SHIFT)
                .ok_or(MemError::Abort { addr: pa })?;
            page[word_index(pa)].store(value, Ordering::Relaxed);
            return Ok(());
        }
        self.write(pa, &value.to_le_bytes())
    }

    fn is_valid(&self, pa: u64, len: u64) -> bool {
        self.check(pa, len).is_ok()
    }
}

/// An abort as vmsa's walker reports it (F_WALK_EABT with the address).
impl From<MemError> for twinmmu_vmsa::MemError {
    #[inline]
    fn from(MemError::Abort { addr }: MemError) -> Self {
        twinmmu_vmsa::MemError { addr }
    }
}

/// The SMMU's memory as vmsa's walker sees it: aligned 8-byte descriptor reads through
/// [`PhysMem`], every abort reported with its address.
pub struct WalkMem<'a>(pub &'a dyn PhysMem);

impl twinmmu_vmsa::Memory for WalkMem<'_> {
    #[inline]
    fn read_u64(&self, pa: u64) -> Result<u64, twinmmu_vmsa::MemError> {
        Ok(self.0.read_u64(pa)?)
    }
}

impl twinmmu_vmsa::MemoryMut for WalkMem<'_> {
    #[inline]
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), twinmmu_vmsa::MemError> {
        Ok(self.0.write_u64(pa, value)?)
    }

    fn zero(&self, pa: u64, len: u64) -> Result<(), twinmmu_vmsa::MemError> {
        Ok(zero_range(self.0, pa, len)?)
    }
}

/// [`WalkMem`] owning its memory, for a table builder that keeps it (KVM's stage 2, the
/// driver's page tables).
#[derive(Clone)]
pub struct OwnedWalkMem(pub std::sync::Arc<dyn PhysMem>);

impl twinmmu_vmsa::Memory for OwnedWalkMem {
    #[inline]
    fn read_u64(&self, pa: u64) -> Result<u64, twinmmu_vmsa::MemError> {
        WalkMem(&*self.0).read_u64(pa)
    }
}

impl twinmmu_vmsa::MemoryMut for OwnedWalkMem {
    #[inline]
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), twinmmu_vmsa::MemError> {
        WalkMem(&*self.0).write_u64(pa, value)
    }

    fn zero(&self, pa: u64, len: u64) -> Result<(), twinmmu_vmsa::MemError> {
        WalkMem(&*self.0).zero(pa, len)
    }
}

/// Zeroes `[pa, pa + len)` in page-sized writes (new tables, queues, CD and stream tables).
pub fn zero_range(mem: &dyn PhysMem, pa: u64, len: u64) -> Result<(), MemError> {
    const CHUNK: usize = 4096;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let mut a = pa;
    let end = pa.saturating_add(len);
    while a < end {
        let n = ((end - a) as usize).min(CHUNK);
        mem.write(a, &ZEROS[..n])?;
        a += n as u64;
    }
    Ok(())
}

impl twinmmu_vmsa::Memory for SparseMem {
    #[inline]
    fn read_u64(&self, pa: u64) -> Result<u64, twinmmu_vmsa::MemError> {
        Ok(PhysMem::read_u64(self, pa)?)
    }
}

impl twinmmu_vmsa::MemoryMut for SparseMem {
    #[inline]
    fn write_u64(&self, pa: u64, value: u64) -> Result<(), twinmmu_vmsa::MemError> {
        Ok(PhysMem::write_u64(self, pa, value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn unwritten_memory_reads_zero_and_outside_aborts() {
        let m = SparseMem::new(&[0x4000_0000..0x4010_0000]).unwrap();
        assert_eq!(m.read_u64(0x4000_0000).unwrap(), 0);
        assert_eq!(
            m.read_u64(0x3fff_fff8),
            Err(MemError::Abort { addr: 0x3fff_fff8 })
        );
        assert_eq!(
            m.write_u64(0x4010_0000, 1),
            Err(MemError::Abort { addr: 0x4010_0000 })
        );
        // A read straddling the end of the range aborts as a whole.
        let mut b = [0u8; 16];
        assert!(m.read(0x400f_fff8, &mut b).is_err());
        assert!(!m.is_valid(0x400f_fff8, 16));
        assert!(m.is_valid(0x400f_fff0, 16));
    }

    #[test]
    fn bytes_and_words_agree_little_endian() {
        let m = SparseMem::new(&[0x1000..0x3000]).unwrap();
        m.write(0x1ffd, &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut b = [0u8; 6];
        m.read(0x1ffd, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6]);
        assert_eq!(m.read_u64(0x1ff8).unwrap(), 0x0302_0100_0000_0000);
        m.write_u64(0x2000, 0x1122_3344_5566_7788).unwrap();
        m.read(0x2000, &mut b).unwrap();
        assert_eq!(b, [0x88, 0x77, 0x66, 0x55, 0x44, 0x33]);
        // Unaligned 8-byte access goes through the byte path.
        assert_eq!(m.read_u64(0x1fff).unwrap() & 0xff, 3);
    }

    #[test]
    fn rejects_bad_maps() {
        assert!(SparseMem::new(&[0x1000..0x1000]).is_err());
        assert!(SparseMem::new(&[0x1001..0x2000]).is_err());
        assert!(SparseMem::new(&[0x1000..0x3000, 0x2000..0x4000]).is_err());
        assert!(SparseMem::new(&[0..(1u64 << 53)]).is_err());
    }

    #[test]
    fn concurrent_byte_writes_to_one_word_do_not_tear() {
        let m = Arc::new(SparseMem::new(&[0..0x1000]).unwrap());
        let handles: Vec<_> = (0..8u8)
            .map(|lane| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for v in 0..200u8 {
                        m.write(u64::from(lane), &[v.wrapping_add(lane)]).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut b = [0u8; 8];
        m.read(0, &mut b).unwrap();
        for lane in 0..8u8 {
            assert_eq!(b[lane as usize], 199u8.wrapping_add(lane));
        }
    }

    #[test]
    fn high_addresses_work() {
        let top = 1u64 << 52;
        let m = SparseMem::new(&[top - 0x2000..top]).unwrap();
        m.write_u64(top - 8, 7).unwrap();
        assert_eq!(m.read_u64(top - 8).unwrap(), 7);
    }
}
