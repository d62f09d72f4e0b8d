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
        if t.pages.is_empty() {
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
