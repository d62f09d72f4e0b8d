//! Host memory behind IOAS mappings.
//!
//! A mapping records `(backing, address, length)`; nothing is touched until a domain is
//! attached or an access pins or reads (lazy pinning, iommufd.md §3.5 step 9). [`Backing`] is
//! the one trait every kind of host memory implements: the ABI layer adds user-VA and memfd
//! backings, the arm-smmu-v3 driver implements [`PhysMemory`] for the `hw` memory and reuses
//! [`PhysBacking`] unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use twinmmu_hw::{PhysMem, SparseMem};

use crate::{Errno, PAGE_SIZE};

/// A run of physically contiguous pinned pages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PhysRun {
    /// Physical address of the first page (page aligned).
    pub pa: u64,
    /// Number of PAGE_SIZE pages.
    pub npages: u64,
}

/// What kind of address a backing takes: a process's virtual addresses (IOMMU_IOAS_MAP) or
/// a file's offsets (IOMMU_IOAS_MAP_FILE). IOMMU_IOAS_CHANGE_PROCESS needs to know.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BackingKind {
    User,
    File,
}

/// Host memory that IOAS areas map. Addresses are in the backing's own space (a user VA, a
/// file offset, or a physical address).
///
/// The core pins each page once per mapping object however many domains and accesses use it
/// (iommufd.md §4.6), so a backing sees balanced `pin`/`unpin` calls.
pub trait Backing: Send + Sync {
    fn kind(&self) -> BackingKind {
        BackingKind::User
    }

    /// Pin `npages` pages from the page-aligned `addr`, for writing if `write`. Returns the
    /// physical pages in order as runs covering exactly `npages`. An address that is not
    /// backed, or a write pin of read-only memory, is EFAULT; a file range past its end EINVAL.
    fn pin(&self, addr: u64, npages: u64, write: bool) -> Result<Vec<PhysRun>, Errno>;

    /// Release pins taken by `pin` (same page granularity).
    fn unpin(&self, addr: u64, npages: u64);

    /// Copy from host memory at `addr` (used by accesses, which may read without pinning).
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// Copy into host memory at `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), Errno>;
}

/// Byte access to host physical memory: [`HwMemory`] over any `hw` memory, or `hw`'s
/// `SparseMem` itself.
pub trait PhysMemory: Send + Sync {
    /// Read `buf.len()` bytes at `pa`; EFAULT outside valid memory.
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Write `buf` at `pa`; EFAULT outside valid memory.
    fn write_phys(&self, pa: u64, buf: &[u8]) -> Result<(), Errno>;
}

impl<T: PhysMemory + ?Sized> PhysMemory for Arc<T> {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), Errno> {
        (**self).read_phys(pa, buf)
    }
    fn write_phys(&self, pa: u64, buf: &[u8]) -> Result<(), Errno> {
        (**self).write_phys(pa, buf)
    }
}

/// Host memory owned by the `hw` crate, as iommufd sees it: an access outside valid memory
/// is EFAULT.
#[derive(Clone)]
pub struct HwMemory(pub Arc<dyn PhysMem>);

impl PhysMemory for HwMemory {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.0.read(pa, buf).map_err(|_| Errno::EFAULT)
    }
    fn write_phys(&self, pa: u64, buf: &[u8]) -> Result<(), Errno> {
        self.0.write(pa, buf).map_err(|_| Errno::EFAULT)
    }
}

/// `hw`'s sparse memory directly (the mock driver and tests).
impl PhysMemory for SparseMem {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.read(pa, buf).map_err(|_| Errno::EFAULT)
    }
    fn write_phys(&self, pa: u64, buf: &[u8]) -> Result<(), Errno> {
        self.write(pa, buf).map_err(|_| Errno::EFAULT)
    }
}

/// A backing over the physical range `[base, base + len)` of host memory, addressed by plain
/// physical addresses (a mapping's "address" is the PA itself, so pinning is the identity).
///
/// It counts pins per page, which is what the selftest's MD_CHECK_REFS observes and what the
/// "context release leaves nothing pinned" checks read. Pages outside the range, or inside a
/// hole punched with [`PhysBacking::punch_hole`] (the model of an munmap), fail to pin with
/// EFAULT; a read-only backing refuses write pins with EFAULT.
pub struct PhysBacking<M: PhysMemory> {
    mem: M,
    base: u64,
    len: u64,
    writable: bool,
    state: Mutex<PinState>,
}

#[derive(Default)]
struct PinState {
    pins: HashMap<u64, u32>,
    holes: Vec<(u64, u64)>,
}

impl<M: PhysMemory> PhysBacking<M> {
    pub fn new(mem: M, base: u64, len: u64) -> Self {
        PhysBacking {
            mem,
            base,
            len,
            writable: true,
            state: Mutex::new(PinState::default()),
        }
    }

    /// A backing whose pages can only be pinned for reading (a read-only mapping).
    pub fn read_only(mem: M, base: u64, len: u64) -> Self {
        PhysBacking {
            writable: false,
            ..PhysBacking::new(mem, base, len)
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Make `[start, start + len)` unbacked: later pins there fail with EFAULT.
    pub fn punch_hole(&self, start: u64, len: u64) {
        self.state.lock().holes.push((start, len));
    }

    /// Long-term pins currently held on the page containing `addr`.
    pub fn pin_count(&self, addr: u64) -> u32 {
        self.state
            .lock()
            .pins
            .get(&(addr / PAGE_SIZE))
            .copied()
            .unwrap_or(0)
    }

    /// Total pins held over all pages.
    pub fn total_pins(&self) -> u64 {
        self.state.lock().pins.values().map(|&c| u64::from(c)).sum()
    }

    fn backed(&self, state: &PinState, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let Some(range_end) = self.base.checked_add(self.len) else {
            return false;
        };
        if addr < self.base || end > range_end {
            return false;
        }
        !state
            .holes
            .iter()
            .any(|&(s, l)| s < end && addr < s.saturating_add(l))
    }
}

impl<M: PhysMemory> Backing for PhysBacking<M> {
    fn pin(&self, addr: u64, npages: u64, write: bool) -> Result<Vec<PhysRun>, Errno> {
        let len = npages.checked_mul(PAGE_SIZE).ok_or(Errno::EFAULT)?;
        let mut state = self.state.lock();
        if !self.backed(&state, addr, len) || (write && !self.writable) {
            return Err(Errno::EFAULT);
        }
        for p in 0..npages {
            *state.pins.entry(addr / PAGE_SIZE + p).or_insert(0) += 1;
        }
        Ok(vec![PhysRun { pa: addr, npages }])
    }

    fn unpin(&self, addr: u64, npages: u64) {
        let mut state = self.state.lock();
        for p in 0..npages {
            let page = addr / PAGE_SIZE + p;
            if let Some(c) = state.pins.get_mut(&page) {
                *c -= 1;
                if *c == 0 {
                    state.pins.remove(&page);
                }
            }
        }
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if !self.backed(&self.state.lock(), addr, buf.len() as u64) {
            return Err(Errno::EFAULT);
        }
        self.mem.read_phys(addr, buf)
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
        if !self.backed(&self.state.lock(), addr, buf.len() as u64) || !self.writable {
            return Err(Errno::EFAULT);
        }
        self.mem.write_phys(addr, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_memory_reads_zero_and_bounds() {
        let m = SparseMem::with_range(0, 3 * PAGE_SIZE).unwrap();
        let mut b = [9u8; 8];
        m.read_phys(100, &mut b).unwrap();
        assert_eq!(b, [0; 8]);
        m.write_phys(PAGE_SIZE - 2, &[1, 2, 3, 4]).unwrap();
        m.read_phys(PAGE_SIZE - 2, &mut b[..4]).unwrap();
        assert_eq!(&b[..4], &[1, 2, 3, 4]);
        assert_eq!(m.write_phys(3 * PAGE_SIZE - 1, &[0, 0]), Err(Errno::EFAULT));
        assert_eq!(m.read_phys(u64::MAX, &mut b), Err(Errno::EFAULT));
    }

    #[test]
    fn phys_backing_pins_and_holes() {
        let b = PhysBacking::new(SparseMem::with_range(0, 1 << 20).unwrap(), 0x1000, 0x8000);
        assert_eq!(
            b.pin(0x2000, 2, true).unwrap(),
            vec![PhysRun {
                pa: 0x2000,
                npages: 2
            }]
        );
        assert_eq!(b.pin_count(0x2fff), 1);
        assert_eq!(b.total_pins(), 2);
        b.unpin(0x2000, 2);
        assert_eq!(b.total_pins(), 0);
        assert_eq!(b.pin(0x0, 1, false), Err(Errno::EFAULT));
        assert_eq!(b.pin(0x8000, 2, false), Err(Errno::EFAULT));
        b.punch_hole(0x4000, 0x1000);
        assert_eq!(b.pin(0x3000, 2, false), Err(Errno::EFAULT));
        let ro = PhysBacking::read_only(SparseMem::with_range(0, 1 << 20).unwrap(), 0, 0x4000);
        assert_eq!(ro.pin(0, 1, true), Err(Errno::EFAULT));
        assert!(ro.pin(0, 1, false).is_ok());
    }
}
