//! The IOVA space of one IOAS (the kernel's `io_pagetable`): areas, reserved and allowed
//! ranges, alignment, automatic IOVA allocation, and keeping every attached paging domain in
//! step with the areas (iommufd.md §3.3–§3.8).
//!
//! Areas never overlap, so a `BTreeMap` keyed by first IOVA is an exact interval structure:
//! the lowest area meeting `[start, last]` is either the one starting at or below `start`
//! (if it reaches `start`) or the first starting inside the range, each O(log n). Reserved
//! ranges may overlap each other (a domain's aperture and a device's MSI window) but are few
//! (a handful per attached domain or device), so they are kept sorted in a vector.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::driver::PagingDomain;
use crate::pages::Pages;
use crate::{Errno, HPAGE_SIZE, IovaRange, ObjectId, PAGE_SIZE, Prot, ULONG_MAX};

/// Who reserved an IOVA range.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ResvOwner {
    /// The complement of a paging domain's aperture.
    Domain(ObjectId),
    /// A device's reserved region, while it is attached in this IOAS.
    Device(ObjectId),
    /// IOMMU_TEST_OP_ADD_RESERVED; lives as long as the IOAS.
    Test,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Reserved {
    pub(crate) start: u64,
    pub(crate) last: u64,
    pub(crate) owner: ResvOwner,
}

pub(crate) struct Area {
    pub(crate) iova: u64,
    pub(crate) last: u64,
    pub(crate) pages: Arc<Pages>,
    /// Offset of the area's first byte from `pages.base()`.
    pub(crate) start_byte: u64,
    pub(crate) prot: Prot,
    /// Pins by internal accesses (HW queues): the area cannot be unmapped.
    pub(crate) num_locks: u32,
    /// Pins by accesses (internal or external).
    pub(crate) num_accesses: u32,
    /// Set while an unmap waits for accesses to let go.
    pub(crate) prevent_access: bool,
    /// The area holds a pin on its pages because the IOAS has at least one domain.
    pub(crate) pinned: bool,
}

impl Area {
    pub(crate) fn length(&self) -> u64 {
        self.last - self.iova + 1
    }
    pub(crate) fn start_byte_at(&self, iova: u64) -> u64 {
        self.start_byte + (iova - self.iova)
    }
    pub(crate) fn page_offset(&self) -> u64 {
        self.start_byte % PAGE_SIZE
    }
    pub(crate) fn index_at(&self, iova: u64) -> u64 {
        self.start_byte_at(iova) / PAGE_SIZE
    }
    fn first_index(&self) -> u64 {
        self.start_byte / PAGE_SIZE
    }
    fn last_index(&self) -> u64 {
        (self.start_byte + self.length() - 1) / PAGE_SIZE
    }
}

/// A piece of a mapping object to place in the IOVA space (the kernel's `iopt_pages_list`).
#[derive(Clone)]
pub(crate) struct PagesElm {
    pub(crate) pages: Arc<Pages>,
    pub(crate) start_byte: u64,
    pub(crate) length: u64,
}

/// A segment of a contiguous walk: area key, first IOVA in it, last IOVA in it.
pub(crate) type ContigSeg = (u64, u64, u64);

pub(crate) enum UnmapStop {
    Err(Errno),
    /// An area with access pins: its accesses must be told to unmap, then retry.
    NotifyAccesses {
        iova: u64,
        length: u64,
    },
}

pub(crate) struct Iopt {
    pub(crate) areas: BTreeMap<u64, Area>,
    pub(crate) reserved: Vec<Reserved>,
    pub(crate) allowed: BTreeMap<u64, u64>,
    pub(crate) domains: Vec<(ObjectId, Arc<dyn PagingDomain>)>,
    /// Attached accesses and the alignment each forces (PAGE_SIZE if pin-capable, else 1).
    pub(crate) accesses: BTreeMap<ObjectId, u64>,
    pub(crate) disable_large_pages: bool,
    pub(crate) iova_alignment: u64,
}

impl Default for Iopt {
    fn default() -> Self {
        Iopt {
            areas: BTreeMap::new(),
            reserved: Vec::new(),
            allowed: BTreeMap::new(),
            domains: Vec::new(),
            accesses: BTreeMap::new(),
            disable_large_pages: false,
            iova_alignment: 1,
        }
    }
}

/// `__alloc_iova_check_range`: align `start` up, or in the page offset, and check the fit.
fn check_range(start: u64, last: u64, length: u64, align: u64, page_offset: u64) -> Option<u64> {
    let aligned = start.checked_add(align - 1)?;
    let aligned = (aligned & !(align - 1)) | page_offset;
    if aligned >= last || last - aligned < length - 1 {
        return None;
    }
    Some(aligned)
}

/// Merge sorted, possibly overlapping intervals into used spans and call `hole` on every gap
/// inside `[first, last]`, stopping when it returns `Some`.
fn find_in_holes<I, F>(used: I, first: u64, last: u64, mut hole: F) -> Option<u64>
where
    I: Iterator<Item = (u64, u64)>,
    F: FnMut(u64, u64) -> Option<u64>,
{
    let mut cursor = Some(first);
    for (s, l) in used {
        let c = cursor?;
        if l < c {
            continue;
        }
        if s > last {
            break;
        }
        if s > c
            && let Some(v) = hole(c, s - 1)
        {
            return Some(v);
        }
        cursor = l.checked_add(1);
    }
    match cursor {
        Some(c) if c <= last => hole(c, last),
        _ => None,
    }
}

impl Iopt {
    /// Key of the lowest area meeting `[start, last]`.
    pub(crate) fn area_first(&self, start: u64, last: u64) -> Option<u64> {
        if let Some((&k, a)) = self.areas.range(..=start).next_back()
            && a.last >= start
        {
            return Some(k);
        }
        if start >= last {
            return None;
        }
        self.areas.range(start + 1..=last).next().map(|(&k, _)| k)
    }

    fn areas_in(&self, start: u64, last: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        // The first area may start below `start`, so the range runs from its key.
        self.area_first(start, last)
            .filter(|&from| from <= last)
            .into_iter()
            .flat_map(move |from| self.areas.range(from..=last))
            .map(|(_, a)| (a.iova, a.last))
    }

    pub(crate) fn reserved_intersects(&self, start: u64, last: u64) -> bool {
        self.reserved
            .iter()
            .any(|r| r.start <= last && start <= r.last)
    }

    pub(crate) fn allowed_intersects(&self, start: u64, last: u64) -> bool {
        if let Some((_, &l)) = self.allowed.range(..=start).next_back()
            && l >= start
        {
            return true;
        }
        start < last && self.allowed.range(start + 1..=last).next().is_some()
    }

    /// `iopt_reserve_iova`: EADDRINUSE if an area or an allowed range meets it.
    pub(crate) fn reserve(&mut self, start: u64, last: u64, owner: ResvOwner) -> Result<(), Errno> {
        if self.area_first(start, last).is_some() || self.allowed_intersects(start, last) {
            return Err(Errno::EADDRINUSE);
        }
        let at = self.reserved.partition_point(|r| r.start <= start);
        self.reserved.insert(at, Reserved { start, last, owner });
        Ok(())
    }

    pub(crate) fn remove_reserved(&mut self, owner: ResvOwner) {
        self.reserved.retain(|r| r.owner != owner);
    }

    /// `iopt_check_iova` for a fixed IOVA.
    pub(crate) fn check_iova(&self, iova: u64, length: u64) -> Result<(), Errno> {
        if iova & (self.iova_alignment - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
        if self.reserved_intersects(iova, last) {
            return Err(Errno::EINVAL);
        }
        if self.area_first(iova, last).is_some() {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    /// `iopt_alloc_iova` (iommufd.md §3.5.1): lowest fit in the allowed ranges (or
    /// [PAGE_SIZE, ULONG_MAX - PAGE_SIZE]) among the holes of reserved ∪ areas.
    pub(crate) fn alloc_iova(&self, addr: u64, length: u64) -> Result<u64, Errno> {
        let page_offset = addr % PAGE_SIZE;
        if length == 0 || length >= ULONG_MAX / 2 {
            return Err(Errno::EOVERFLOW);
        }
        let pow = length.next_power_of_two();
        let mut align = if addr == 0 {
            pow
        } else {
            pow.min(1u64 << addr.trailing_zeros())
        };
        if align >= HPAGE_SIZE {
            align = HPAGE_SIZE;
        }
        if align < self.iova_alignment {
            return Err(Errno::EINVAL);
        }
        let (win_first, win_last) = (PAGE_SIZE, ULONG_MAX - PAGE_SIZE);
        let mut allowed: Vec<(u64, u64)> = Vec::new();
        if self.allowed.is_empty() {
            allowed.push((win_first, win_last));
        } else {
            // The used spans of the allowed set (adjacent ranges merge), clipped to the window.
            let mut cur: Option<(u64, u64)> = None;
            for (&s, &l) in &self.allowed {
                match cur {
                    Some((cs, cl)) if cl.checked_add(1).is_none_or(|n| s <= n) => {
                        cur = Some((cs, cl.max(l)));
                    }
                    _ => {
                        if let Some(c) = cur {
                            allowed.push(c);
                        }
                        cur = Some((s, l));
                    }
                }
            }
            if let Some(c) = cur {
                allowed.push(c);
            }
            allowed = allowed
                .into_iter()
                .filter(|&(s, l)| l >= win_first && s <= win_last)
                .map(|(s, l)| (s.max(win_first), l.min(win_last)))
                .collect();
        }
        for (s, l) in allowed {
            if check_range(s, l, length, align, page_offset).is_none() {
                continue;
            }
            let resv = self
                .reserved
                .iter()
                .filter(|r| r.last >= s && r.start <= l)
                .map(|r| (r.start, r.last));
            let used = merge_sorted(resv, self.areas_in(s, l));
            if let Some(iova) = find_in_holes(used, s, l, |hs, hl| {
                check_range(hs, hl, length, align, page_offset)
            }) {
                return Ok(iova);
            }
        }
        Err(Errno::ENOSPC)
    }

    /// The holes of the reserved set over [0, ULONG_MAX] (IOVA_RANGES).
    pub(crate) fn reserved_holes(&self) -> Vec<IovaRange> {
        let mut out = Vec::new();
        find_in_holes(
            self.reserved.iter().map(|r| (r.start, r.last)),
            0,
            u64::MAX,
            |s, l| {
                out.push(IovaRange::new(s, l));
                None
            },
        );
        out
    }

    /// `iopt_check_iova_alignment`: every area's IOVA, length and sub-page offset.
    fn check_alignment(&self, align: u64) -> Result<(), Errno> {
        for a in self.areas.values() {
            if a.iova % align != 0 || a.length() % align != 0 || a.page_offset() % align != 0 {
                return Err(Errno::EADDRINUSE);
            }
        }
        Ok(())
    }

    fn domain_align(d: &Arc<dyn PagingDomain>) -> u64 {
        let bm = d.pgsize_bitmap();
        if bm == 0 {
            PAGE_SIZE
        } else {
            1u64 << bm.trailing_zeros()
        }
    }

    /// `iopt_calculate_iova_alignment`.
    pub(crate) fn calculate_alignment(&mut self) -> Result<(), Errno> {
        let mut align = if self.disable_large_pages {
            PAGE_SIZE
        } else {
            1
        };
        for (_, d) in &self.domains {
            align = align.max(Self::domain_align(d));
        }
        for &a in self.accesses.values() {
            align = align.max(a);
        }
        if align > self.iova_alignment {
            self.check_alignment(align)?;
        }
        self.iova_alignment = align;
        Ok(())
    }

    /// Walk the areas covering `[iova, last]` without a gap (`iopt_for_each_contig_area`);
    /// ENOENT if they do not cover it all.
    pub(crate) fn contig(&self, iova: u64, last: u64) -> Result<Vec<ContigSeg>, Errno> {
        let mut out = Vec::new();
        let mut cur = iova;
        loop {
            let Some((&k, a)) = self.areas.range(..=cur).next_back() else {
                return Err(Errno::ENOENT);
            };
            if a.last < cur {
                return Err(Errno::ENOENT);
            }
            let seg_last = a.last.min(last);
            out.push((k, cur, seg_last));
            if a.last >= last {
                return Ok(out);
            }
            cur = a.last + 1;
        }
    }

    /// `iopt_get_pages` (COPY source): the pieces behind `[iova, iova + length)`.
    pub(crate) fn get_pages(&self, iova: u64, length: u64) -> Result<Vec<PagesElm>, Errno> {
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
        let segs = self.contig(iova, last)?;
        Ok(segs
            .into_iter()
            .map(|(k, cur, l)| {
                let a = &self.areas[&k];
                PagesElm {
                    pages: Arc::clone(&a.pages),
                    start_byte: a.start_byte_at(cur),
                    length: l - cur + 1,
                }
            })
            .collect())
    }

    fn map_area_into(&self, d: &Arc<dyn PagingDomain>, a: &Area) -> Result<(), Errno> {
        map_area_into(self.disable_large_pages, d, a)
    }
}

type Domains = [(ObjectId, Arc<dyn PagingDomain>)];

fn map_area_into(
    disable_large_pages: bool,
    d: &Arc<dyn PagingDomain>,
    a: &Area,
) -> Result<(), Errno> {
    let mut mapped = 0u64;
    let res = a
        .pages
        .for_each_run(a.start_byte, a.length(), |off, pa, len| {
            let iova = a.iova + (off - a.start_byte);
            if disable_large_pages {
                // batch_iommu_map_small: one PAGE_SIZE piece at a time.
                let mut done = 0u64;
                while done < len {
                    let i = iova + done;
                    let n = (PAGE_SIZE - i % PAGE_SIZE).min(len - done);
                    d.map(i, pa + done, n, a.prot)?;
                    done += n;
                    mapped += n;
                }
            } else {
                d.map(iova, pa, len, a.prot)?;
                mapped += len;
            }
            Ok(())
        });
    if res.is_err() && mapped != 0 {
        d.unmap(a.iova, mapped);
    }
    res
}

/// Pin an area and map it into every domain (nothing happens with no domain: lazy).
fn fill_area(domains: &Domains, disable_large_pages: bool, a: &mut Area) -> Result<(), Errno> {
    if domains.is_empty() {
        return Ok(());
    }
    a.pages.pin(a.first_index(), a.last_index())?;
    a.pinned = true;
    for (i, (_, d)) in domains.iter().enumerate() {
        if let Err(e) = map_area_into(disable_large_pages, d, a) {
            for (_, prev) in &domains[..i] {
                prev.unmap(a.iova, a.length());
            }
            a.pages.unpin(a.first_index(), a.last_index());
            a.pinned = false;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmap an area from every domain and drop its domain pin.
fn unfill_area(domains: &Domains, a: &mut Area) {
    for (_, d) in domains {
        d.unmap(a.iova, a.length());
    }
    if a.pinned {
        a.pages.unpin(a.first_index(), a.last_index());
        a.pinned = false;
    }
}

impl Iopt {
    /// `iopt_insert_area`.
    fn insert_area(&mut self, elm: &PagesElm, iova: u64, prot: Prot) -> Result<u64, Errno> {
        if prot.write && !elm.pages.writable {
            return Err(Errno::EPERM);
        }
        let page_offset = elm.start_byte % PAGE_SIZE;
        if page_offset & (self.iova_alignment - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(elm.length - 1).ok_or(Errno::EOVERFLOW)?;
        elm.start_byte
            .checked_add(elm.length - 1)
            .ok_or(Errno::EOVERFLOW)?;
        self.areas.insert(
            iova,
            Area {
                iova,
                last,
                pages: Arc::clone(&elm.pages),
                start_byte: elm.start_byte,
                prot,
                num_locks: 0,
                num_accesses: 0,
                prevent_access: false,
                pinned: false,
            },
        );
        Ok(last)
    }

    /// `iopt_map_pages`: place `elms` (total `length`) at a fixed or automatic IOVA, then load
    /// every domain. On any failure nothing stays inserted.
    pub(crate) fn map_pages(
        &mut self,
        elms: &[PagesElm],
        length: u64,
        fixed: Option<u64>,
        prot: Prot,
    ) -> Result<u64, Errno> {
        if length & (self.iova_alignment - 1) != 0 || length == 0 {
            return Err(Errno::EINVAL);
        }
        let iova = match fixed {
            Some(iova) => {
                self.check_iova(iova, length)?;
                iova
            }
            None => {
                let first = elms.first().ok_or(Errno::EINVAL)?;
                let addr = first.pages.base().wrapping_add(first.start_byte);
                self.alloc_iova(addr, length)?
            }
        };
        if let [elm] = elms {
            // The common single-piece map, without bookkeeping allocations.
            self.insert_area(elm, iova, prot)?;
            let (areas, domains) = (&mut self.areas, &self.domains);
            if let Some(a) = areas.get_mut(&iova)
                && let Err(e) = fill_area(domains, self.disable_large_pages, a)
            {
                self.areas.remove(&iova);
                return Err(e);
            }
            return Ok(iova);
        }
        let mut inserted: Vec<u64> = Vec::with_capacity(elms.len());
        let mut at = iova;
        for elm in elms {
            match self.insert_area(elm, at, prot) {
                Ok(last) => {
                    inserted.push(at);
                    at = last.wrapping_add(1);
                }
                Err(e) => {
                    for k in inserted {
                        self.areas.remove(&k);
                    }
                    return Err(e);
                }
            }
        }
        let (areas, domains) = (&mut self.areas, &self.domains);
        for (i, &k) in inserted.iter().enumerate() {
            let Some(a) = areas.get_mut(&k) else {
                continue;
            };
            if let Err(e) = fill_area(domains, self.disable_large_pages, a) {
                for &done in &inserted[..i] {
                    if let Some(mut a) = self.areas.remove(&done) {
                        unfill_area(&self.domains, &mut a);
                    }
                }
                for &k in &inserted[i..] {
                    self.areas.remove(&k);
                }
                return Err(e);
            }
        }
        Ok(iova)
    }

    /// One pass of `iopt_unmap_iova_range` over `[start, last]`.
    pub(crate) fn unmap_range(
        &mut self,
        start: u64,
        last: u64,
        unmapped: &mut u64,
    ) -> Result<(), UnmapStop> {
        while let Some(k) = self.area_first(start, last) {
            let a = &self.areas[&k];
            if a.num_locks != 0 {
                return Err(UnmapStop::Err(Errno::EBUSY));
            }
            if a.iova < start || a.last > last {
                return Err(UnmapStop::Err(Errno::ENOENT));
            }
            if a.num_accesses != 0 {
                let (iova, length) = (a.iova, a.length());
                if let Some(a) = self.areas.get_mut(&k) {
                    a.prevent_access = true;
                }
                return Err(UnmapStop::NotifyAccesses { iova, length });
            }
            if let Some(mut a) = self.areas.remove(&k) {
                unfill_area(&self.domains, &mut a);
                *unmapped += a.length();
            }
        }
        if *unmapped != 0 {
            Ok(())
        } else {
            Err(UnmapStop::Err(Errno::ENOENT))
        }
    }

    /// `iopt_table_add_domain`.
    pub(crate) fn add_domain(
        &mut self,
        id: ObjectId,
        d: Arc<dyn PagingDomain>,
    ) -> Result<(), Errno> {
        let new_align = Self::domain_align(&d).max(self.iova_alignment);
        if new_align > PAGE_SIZE {
            return Err(Errno::EINVAL);
        }
        if new_align != self.iova_alignment {
            self.check_alignment(new_align)?;
        }
        let ap = d.aperture();
        let owner = ResvOwner::Domain(id);
        if ap.start != 0
            && let Err(e) = self.reserve(0, ap.start - 1, owner)
        {
            self.remove_reserved(owner);
            return Err(e);
        }
        if ap.last != u64::MAX
            && let Err(e) = self.reserve(ap.last + 1, u64::MAX, owner)
        {
            self.remove_reserved(owner);
            return Err(e);
        }
        let first = self.domains.is_empty();
        let keys: Vec<u64> = self.areas.keys().copied().collect();
        for (i, &k) in keys.iter().enumerate() {
            let res = {
                let a = self.areas.get_mut(&k).ok_or(Errno::ENOENT)?;
                let r = if first {
                    a.pages
                        .pin(a.first_index(), a.last_index())
                        .map(|_| a.pinned = true)
                } else {
                    Ok(())
                };
                r.and_then(|_| {
                    let a = &self.areas[&k];
                    self.map_area_into(&d, a)
                })
            };
            if let Err(e) = res {
                if let Some(a) = self.areas.get_mut(&k)
                    && first
                    && a.pinned
                {
                    a.pages.unpin(a.first_index(), a.last_index());
                    a.pinned = false;
                }
                for &pk in &keys[..i] {
                    if let Some(a) = self.areas.get_mut(&pk) {
                        d.unmap(a.iova, a.length());
                        if first && a.pinned {
                            a.pages.unpin(a.first_index(), a.last_index());
                            a.pinned = false;
                        }
                    }
                }
                self.remove_reserved(owner);
                return Err(e);
            }
        }
        self.iova_alignment = new_align;
        self.domains.push((id, d));
        Ok(())
    }

    /// `iopt_table_remove_domain`.
    pub(crate) fn remove_domain(&mut self, id: ObjectId) {
        let Some(pos) = self.domains.iter().position(|(i, _)| *i == id) else {
            return;
        };
        let (_, d) = self.domains.remove(pos);
        let last_domain = self.domains.is_empty();
        for a in self.areas.values_mut() {
            d.unmap(a.iova, a.length());
            if last_domain && a.pinned {
                a.pages.unpin(a.first_index(), a.last_index());
                a.pinned = false;
            }
        }
        self.remove_reserved(ResvOwner::Domain(id));
        // Alignment can only go down here, which never fails.
        let _ = self.calculate_alignment();
    }

    /// Pin `[first_index, last_index]` of area `k` for an access.
    pub(crate) fn area_pin_access(
        &mut self,
        k: u64,
        iova: u64,
        last: u64,
        lock: bool,
    ) -> Result<Vec<u64>, Errno> {
        let a = self.areas.get_mut(&k).ok_or(Errno::ENOENT)?;
        let (fi, li) = (a.index_at(iova), a.index_at(last));
        a.pages.pin(fi, li)?;
        a.num_accesses += 1;
        if lock {
            a.num_locks += 1;
        }
        Ok((fi..=li).filter_map(|i| a.pages.pa(i)).collect())
    }

    pub(crate) fn area_unpin_access(&mut self, k: u64, iova: u64, last: u64, lock: bool) {
        if let Some(a) = self.areas.get_mut(&k) {
            let (fi, li) = (a.index_at(iova), a.index_at(last));
            a.pages.unpin(fi, li);
            a.num_accesses = a.num_accesses.saturating_sub(1);
            if lock {
                a.num_locks = a.num_locks.saturating_sub(1);
            }
        }
    }
}

/// Merge two sorted interval streams by start.
fn merge_sorted<A, B>(a: A, b: B) -> impl Iterator<Item = (u64, u64)>
where
    A: Iterator<Item = (u64, u64)>,
    B: Iterator<Item = (u64, u64)>,
{
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) => {
            if x.0 <= y.0 {
                a.next()
            } else {
                b.next()
            }
        }
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_between_overlapping_spans() {
        let mut holes = Vec::new();
        find_in_holes(
            [(5, 10), (7, 8), (12, 20), (30, u64::MAX)].into_iter(),
            0,
            u64::MAX,
            |s, l| {
                holes.push((s, l));
                None
            },
        );
        assert_eq!(holes, vec![(0, 4), (11, 11), (21, 29)]);
    }

    #[test]
    fn check_range_needs_room_for_the_whole_length() {
        assert_eq!(check_range(0x1000, 0x2fff, 0x1000, 0x1000, 0), Some(0x1000));
        assert_eq!(check_range(0x1001, 0x2fff, 0x1000, 0x1000, 0), Some(0x2000));
        assert_eq!(check_range(0x1001, 0x2ffe, 0x1000, 0x1000, 0), None);
        assert_eq!(check_range(u64::MAX - 3, u64::MAX, 2, 16, 0), None);
    }
}
