//! A mapping object (the kernel's `iopt_pages`): a range of a backing, pinned page by page on
//! demand and shared by every area created from it by COPY (iommufd.md §3.6, §4.6, §7: one pin
//! per backing page per mapping object).

use std::sync::Arc;

use parking_lot::Mutex;

use crate::backing::{Backing, BackingKind};
use crate::{Errno, PAGE_SIZE};

pub(crate) struct Pages {
    backing: Arc<dyn Backing>,
    /// Backing address of the first byte (`uptr` / file start).
    pub(crate) addr: u64,
    pub(crate) length: u64,
    pub(crate) writable: bool,
    pins: Mutex<PinTable>,
}

#[derive(Clone, Copy, Default)]
struct PinEntry {
    /// Users of the page (each area loaded in the domains counts once, plus access pins).
    users: u32,
    pa: u64,
}

/// Per-page pin state; empty until the first pin.
#[derive(Default)]
struct PinTable {
    pages: Vec<PinEntry>,
}

impl Pages {
    /// `iopt_alloc_user_pages`: `addr + length` must not overflow (EOVERFLOW), `length` is
    /// non-zero and at most SIZE_MAX - PAGE_SIZE (EINVAL).
    pub(crate) fn new(
        backing: Arc<dyn Backing>,
        addr: u64,
        length: u64,
        writable: bool,
    ) -> Result<Pages, Errno> {
        if addr.checked_add(length).is_none() {
            return Err(Errno::EOVERFLOW);
        }
        if length == 0 || length > u64::MAX - PAGE_SIZE {
            return Err(Errno::EINVAL);
        }
        Ok(Pages {
            backing,
            addr,
            length,
            writable,
            pins: Mutex::new(PinTable::default()),
        })
    }

    pub(crate) fn kind(&self) -> BackingKind {
        self.backing.kind()
    }

    /// Backing address of page index 0; byte offsets ("start_byte") count from here.
    pub(crate) fn base(&self) -> u64 {
        self.addr & !(PAGE_SIZE - 1)
    }

    pub(crate) fn npages(&self) -> u64 {
        let first = self.addr % PAGE_SIZE;
        (first + self.length).div_ceil(PAGE_SIZE)
    }

    /// Byte offset (from `base`) of the mapping's first byte.
    pub(crate) fn first_byte(&self) -> u64 {
        self.addr % PAGE_SIZE
    }

    /// Take one user on pages `[first, last]`, pinning in the backing those that had none.
    pub(crate) fn pin(&self, first: u64, last: u64) -> Result<(), Errno> {
        let mut t = self.pins.lock();
        if t.pages.is_empty() {
            let n = usize::try_from(self.npages()).map_err(|_| Errno::ENOMEM)?;
            t.pages = vec![PinEntry::default(); n];
        }
        if first > last || last >= t.pages.len() as u64 {
            // Callers pass indexes inside the mapping; anything else is refused, not indexed.
            return Err(Errno::EFAULT);
        }
        // Pin each run of currently unpinned pages; undo this call's pins on failure.
        let mut done: Vec<(u64, u64)> = Vec::new();
        let mut p = first;
        while p <= last {
            if t.pages[p as usize].users != 0 {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < last && t.pages[q as usize + 1].users == 0 {
                q += 1;
            }
            let n = q - p + 1;
            match self
                .backing
                .pin(self.base() + p * PAGE_SIZE, n, self.writable)
            {
                Ok(runs) => {
                    let mut idx = p;
                    for run in runs {
                        for k in 0..run.npages {
                            if idx <= q {
                                t.pages[idx as usize].pa = run.pa + k * PAGE_SIZE;
                                idx += 1;
                            }
                        }
                    }
                    if idx != q + 1 {
                        self.backing.unpin(self.base() + p * PAGE_SIZE, n);
                        self.undo(&done);
                        return Err(Errno::EFAULT);
                    }
                    if p != first || q != last {
                        // Only a call that pins in several runs needs an undo list.
                        done.push((p, n));
                    }
                }
                Err(e) => {
                    self.undo(&done);
                    return Err(e);
                }
            }
            p = q + 1;
        }
        for e in &mut t.pages[first as usize..=last as usize] {
            e.users += 1;
        }
        Ok(())
    }

    fn undo(&self, done: &[(u64, u64)]) {
        for &(p, n) in done {
            self.backing.unpin(self.base() + p * PAGE_SIZE, n);
        }
    }

    /// Drop one user on pages `[first, last]`, unpinning those that reach zero.
    pub(crate) fn unpin(&self, first: u64, last: u64) {
        let mut t = self.pins.lock();
        if first > last || last >= t.pages.len() as u64 {
            return;
        }
        let mut p = first;
        while p <= last {
            let u = &mut t.pages[p as usize].users;
            *u = u.saturating_sub(1);
            if *u != 0 {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < last && t.pages[q as usize + 1].users == 1 {
                q += 1;
                t.pages[q as usize].users = 0;
            }
            self.backing.unpin(self.base() + p * PAGE_SIZE, q - p + 1);
            p = q + 1;
        }
    }

    /// Physical address of pinned page `idx`.
    pub(crate) fn pa(&self, idx: u64) -> Option<u64> {
        let t = self.pins.lock();
        let e = t.pages.get(usize::try_from(idx).ok()?)?;
        (e.users != 0).then_some(e.pa)
    }

    /// Call `f(byte offset from base, pa, len)` for each physically contiguous run covering
    /// `[start_byte, start_byte + len)` (all its pages pinned), stopping at the first error.
    pub(crate) fn for_each_run(
        &self,
        start_byte: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<(), Errno>,
    ) -> Result<(), Errno> {
        let t = self.pins.lock();
        let mut cur: Option<(u64, u64, u64)> = None;
        let mut off = start_byte;
        let end = start_byte + len;
        while off < end {
            let idx = (off / PAGE_SIZE) as usize;
            let in_page = off % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(end - off);
            let pa = t.pages.get(idx).map_or(0, |e| e.pa) + in_page;
            match cur.as_mut() {
                Some(c) if c.1 + c.2 == pa => c.2 += n,
                _ => {
                    if let Some((o, p, l)) = cur.take() {
                        f(o, p, l)?;
                    }
                    cur = Some((off, pa, n));
                }
            }
            off += n;
        }
        match cur {
            Some((o, p, l)) => f(o, p, l),
            None => Ok(()),
        }
    }

    /// Copy between the backing and `buf` at byte offset `start_byte` (from `base`).
    pub(crate) fn rw(&self, start_byte: u64, buf: &mut [u8], write: bool) -> Result<(), Errno> {
        let addr = self.base() + start_byte;
        if write {
            self.backing.write(addr, buf)
        } else {
            self.backing.read(addr, buf)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::PhysBacking;
    use twinmmu_hw::SparseMem;

    fn pages(addr: u64, len: u64) -> (Arc<PhysBacking<SparseMem>>, Pages) {
        let b = Arc::new(PhysBacking::new(
            SparseMem::with_range(0, 1 << 24).unwrap(),
            0,
            1 << 24,
        ));
        let p = Pages::new(Arc::clone(&b) as Arc<dyn Backing>, addr, len, true).unwrap();
        (b, p)
    }

    #[test]
    fn overlapping_users_pin_each_page_once() {
        let (b, p) = pages(0x10_0000, 8 * PAGE_SIZE);
        p.pin(0, 3).unwrap();
        p.pin(2, 5).unwrap();
        for i in 0..6 {
            assert_eq!(b.pin_count(0x10_0000 + i * PAGE_SIZE), 1, "page {i}");
        }
        assert_eq!(b.pin_count(0x10_0000 + 6 * PAGE_SIZE), 0);
        p.unpin(0, 3);
        assert_eq!(
            b.total_pins(),
            4,
            "pages 2..=5 still held by the second user"
        );
        assert_eq!(p.pa(2), Some(0x10_2000));
        assert_eq!(p.pa(0), None);
        p.unpin(2, 5);
        assert_eq!(b.total_pins(), 0);
        // Out-of-range indexes are refused, not indexed.
        assert_eq!(p.pin(7, 8), Err(Errno::EFAULT));
        assert_eq!(p.pin(3, 2), Err(Errno::EFAULT));
        p.unpin(7, 100);
    }

    #[test]
    fn a_failed_pin_undoes_its_earlier_runs() {
        let (b, p) = pages(0x20_0000, 8 * PAGE_SIZE);
        p.pin(2, 2).unwrap();
        b.punch_hole(0x20_0000 + 5 * PAGE_SIZE, PAGE_SIZE);
        // Runs [0,1] and [3,7]: the second fails, the first is unpinned again.
        assert_eq!(p.pin(0, 7), Err(Errno::EFAULT));
        assert_eq!(b.total_pins(), 1);
    }

    #[test]
    fn runs_merge_contiguous_pages_and_keep_sub_page_offsets() {
        let (_, p) = pages(0x30_0800, 3 * PAGE_SIZE);
        assert_eq!(p.npages(), 4);
        assert_eq!(p.first_byte(), 0x800);
        p.pin(0, 3).unwrap();
        let mut runs = Vec::new();
        p.for_each_run(0x800, 3 * PAGE_SIZE, |o, pa, l| {
            runs.push((o, pa, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, vec![(0x800, 0x30_0800, 3 * PAGE_SIZE)]);
        p.unpin(0, 3);
    }

    #[test]
    fn creation_checks() {
        let b: Arc<dyn Backing> = Arc::new(PhysBacking::new(
            SparseMem::with_range(0, 4096).unwrap(),
            0,
            4096,
        ));
        assert_eq!(
            Pages::new(Arc::clone(&b), u64::MAX, 2, true).err(),
            Some(Errno::EOVERFLOW)
        );
        assert_eq!(
            Pages::new(Arc::clone(&b), 0, 0, true).err(),
            Some(Errno::EINVAL)
        );
        assert_eq!(
            Pages::new(b, 0, u64::MAX - PAGE_SIZE + 1, true).err(),
            Some(Errno::EINVAL)
        );
    }
}
