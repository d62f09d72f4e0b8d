//! A VM's stage 2: guest RAM (memory slots backed by host frames) and the stage-2
//! translation tables over it (IPA → host PA), built with the vmsa builder in host memory.
//!
//! KVM's shape (arch/arm64/kvm/mmu.c, hyp/pgtable.c): the stage-2 tables exist from the
//! first use, memory slots say which host memory backs which IPAs, and mappings are made
//! from them (as the stage-2 fault handler does) and removed by unmap, with TLB maintenance
//! after every removal ([`crate::Vm::stage2_unmap`]). Mapping an IPA that was invalid needs
//! no maintenance: TLBs do not cache faults.
//!
//! The start level is the shallowest the IPA size allows (at most 16 concatenated tables),
//! which is KVM's choice (`stage2_pgtable_levels(ipa) = ARM64_HW_PGTABLE_LEVELS(ipa - 4)`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use twinmmu_hw::mem::OwnedWalkMem;
use twinmmu_hw::{FrameAllocator, PhysMem, Tlbi, TlbiOp, cmd::TlbiRange};
use twinmmu_vmsa::{
    BuildError, ConfigError, Fault, Features, Geometry, Granule, Memory, MemoryMut, S2LeafAttrs,
    S2Translation, Stage2Config, Stage2Params, TableBuilder, TableFormat, s2_start_level,
    walk_stage2,
};

/// A stage-2 or guest-RAM operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Stage2Error {
    /// The KVM's machine has no host memory ([`crate::Machine::with_memory`]).
    #[error("no host memory attached: VMs have no stage 2")]
    NoMemory,
    #[error("{what} {value:#x} is not a multiple of the {granule:#x}-byte stage-2 granule")]
    Misaligned {
        what: &'static str,
        value: u64,
        granule: u64,
    },
    #[error("IPA range {ipa:#x}+{size:#x} is outside the {ipa_bits}-bit IPA space")]
    OutOfRange { ipa: u64, size: u64, ipa_bits: u8 },
    #[error("IPA range {ipa:#x}+{size:#x} overlaps the guest RAM region at {other:#x}")]
    Overlap { ipa: u64, size: u64, other: u64 },
    #[error("IPA {ipa:#x} is not guest RAM")]
    NotRam { ipa: u64 },
    #[error("no guest RAM region starts at IPA {ipa:#x}")]
    NoSuchRegion { ipa: u64 },
    #[error("IPA {ipa:#x} is already mapped at stage 2")]
    AlreadyMapped { ipa: u64 },
    /// Host frames (for guest RAM or tables) ran out; nothing was changed.
    #[error("out of host memory")]
    OutOfMemory,
    /// Table memory ran out part-way through an unmap (splitting a block): `changes` were
    /// made and still need their TLB maintenance ([`crate::Vm::stage2_flush`]).
    #[error("out of table memory part-way through an unmap")]
    PartialUnmap { changes: Stage2Changes },
    /// A stage-2 walk of the IPA faults.
    #[error("stage-2 walk: {0}")]
    Fault(Fault),
    #[error("stage-2 configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("stage-2 tables: {0}")]
    Build(BuildError),
    #[error(transparent)]
    Dvm(#[from] twinmmu_hw::DvmError),
}

/// What a stage-2 unmap changed, for its TLB maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stage2Changes {
    /// The IPA range the unmap was asked for.
    pub ipa: u64,
    pub size: u64,
    /// The leaf entries that were valid in it before the unmap: IPA of the page or block,
    /// and its level.
    pub leaves: Vec<(u64, u8)>,
    /// IPA ranges whose tables were freed.
    pub tables: Vec<Range<u64>>,
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    ipa: u64,
    pa: u64,
    size: u64,
}

#[derive(Debug)]
struct Slot {
    size: u64,
    chunks: Vec<Chunk>,
}

/// Coalesced `[start, end)` ranges.
#[derive(Debug, Default)]
struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// The start of a range overlapping `[start, end)`, if any.
    fn overlap(&self, start: u64, end: u64) -> Option<u64> {
        self.0
            .range(..end)
            .next_back()
            .filter(|&(_, &e)| e > start)
            .map(|(&s, _)| s.max(start))
    }

    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.0.remove(&s);
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    fn remove(&mut self, start: u64, end: u64) {
        if let Some((&s, &e)) = self.0.range(..start).next_back()
            && e > start
        {
            self.0.insert(s, start);
            if e > end {
                self.0.insert(end, e);
            }
        }
        let inside: Vec<(u64, u64)> = self.0.range(start..end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            if e > end {
                self.0.insert(end, e);
            }
        }
    }
}

/// One VM's guest RAM and stage-2 tables.
pub(crate) struct Stage2 {
    builder: TableBuilder<OwnedWalkMem, FrameAllocator>,
    params: Stage2Params,
    config: Stage2Config,
    slots: BTreeMap<u64, Slot>,
    mapped: RangeSet,
}

/// MAX_TLBI_RANGE_PAGES: `__TLBI_RANGE_PAGES(31, 3)`, the most one range operation covers.
pub const MAX_TLBI_RANGE_PAGES: u64 = 32 << 16;

/// The TLBIs Linux's `__flush_tlb_range_op(ipas2e1is, …)` issues for `pages` granules from
/// `start` with FEAT_TLBIRANGE (arm64 tlbflush.h): a single page by `IPAS2E1IS`, the rest
/// as `RIPAS2E1IS` with SCALE from 3 down to 0, each covering `(NUM + 1) << (5·SCALE + 1)`
/// pages. The DVM message carries that range as `(num + 1) << scale` granules, so the
/// message's `scale` is the instruction's `5·SCALE + 1`. `pages` must not exceed
/// [`MAX_TLBI_RANGE_PAGES`].
pub fn s2_range_tlbis(vmid: u16, start: u64, pages: u64, tg_shift: u8) -> Vec<Tlbi> {
    let mut out = Vec::new();
    let mut addr = start;
    let mut left = pages.min(MAX_TLBI_RANGE_PAGES);
    let mut scale: i32 = 3;
    while left > 0 {
        if left == 1 {
            out.push(Tlbi::new(TlbiOp::Ipas2e1is, vmid).with_addr(addr));
            break;
        }
        if scale < 0 {
            // Unreachable for pages ≤ MAX_TLBI_RANGE_PAGES; finish page by page rather
            // than loop.
            out.push(Tlbi::new(TlbiOp::Ipas2e1is, vmid).with_addr(addr));
            addr = addr.saturating_add(1 << tg_shift);
            left -= 1;
            continue;
        }
        let shift = 5 * scale as u32 + 1;
        // __TLBI_RANGE_NUM: min(pages, __TLBI_RANGE_PAGES(31, scale)) >> shift, minus 1.
        let chunks = left.min(32 << shift) >> shift;
        if chunks > 0 {
            let n = chunks << shift;
            out.push(
                Tlbi::new(TlbiOp::Ripas2e1is, vmid)
                    .with_addr(addr)
                    .with_range(TlbiRange {
                        tg_shift,
                        num: (chunks - 1) as u8,
                        scale: shift as u8,
                        ttl: 0,
                    }),
            );
            addr = addr.saturating_add(n << tg_shift);
            left -= n;
        }
        scale -= 1;
    }
    out
}

impl Stage2 {
    /// An empty stage 2 for `ipa_bits` of IPA with `granule`, validated against `features`.
    pub(crate) fn new(
        mem: Arc<dyn PhysMem>,
        frames: FrameAllocator,
        granule: Granule,
        ipa_bits: u8,
        features: &Features,
    ) -> Result<Stage2, Stage2Error> {
        let bad = || ConfigError::S2TszOutOfRange {
            t0sz: 64u8.saturating_sub(ipa_bits),
            min: 16,
            max: 39,
        };
        let level = (0..=3u8)
            .rev()
            .find(|&l| Geometry::stage2(granule, ipa_bits, l).is_some())
            .ok_or_else(bad)?;
        let sl0 = (0..4u8)
            .find(|&s| s2_start_level(granule, s, features) == Some(level))
            .ok_or(ConfigError::S2InvalidSl0 { sl0: 0, granule })?;
        let fmt = TableFormat::stage2(granule, ipa_bits, level, features.oas).ok_or_else(bad)?;
        let builder = TableBuilder::new(fmt, OwnedWalkMem(mem), frames).map_err(|e| match e {
            BuildError::OutOfMemory { .. } => Stage2Error::OutOfMemory,
            e => Stage2Error::Build(e),
        })?;
        let params = Stage2Params {
            s2ttb: builder.root(),
            s2t0sz: 64 - ipa_bits,
            s2sl0: sl0,
            s2tg: granule.s2tg(),
            s2ps: features.oas.encoding(),
            ..Default::default()
        };
        let config = match Stage2Config::new(&params, features) {
            Ok(c) => c,
            Err(e) => {
                let _ = builder.destroy();
                return Err(e.into());
            }
        };
        Ok(Stage2 {
            builder,
            params,
            config,
            slots: BTreeMap::new(),
            mapped: RangeSet::default(),
        })
    }

    pub(crate) fn params(&self) -> Stage2Params {
        self.params
    }

    pub(crate) fn config(&self) -> Stage2Config {
        self.config
    }

    pub(crate) fn granule(&self) -> Granule {
        self.config.geometry().granule()
    }

    fn ipa_bits(&self) -> u8 {
        self.config.geometry().ia_bits()
    }

    /// The host frames guest RAM and tables come from (the builder's allocator).
    fn frames(&self) -> &FrameAllocator {
        self.builder.allocator()
    }

    /// Checks `[ipa, ipa + size)` is granule-aligned, non-empty and inside the IPA space;
    /// returns its end.
    fn check(&self, ipa: u64, size: u64) -> Result<u64, Stage2Error> {
        let g = self.granule().size();
        for (what, value) in [("IPA", ipa), ("size", size)] {
            if value % g != 0 {
                return Err(Stage2Error::Misaligned {
                    what,
                    value,
                    granule: g,
                });
            }
        }
        let out = Stage2Error::OutOfRange {
            ipa,
            size,
            ipa_bits: self.ipa_bits(),
        };
        match ipa.checked_add(size) {
            Some(end) if size > 0 && (end - 1) >> self.ipa_bits() == 0 => Ok(end),
            _ => Err(out),
        }
    }

    /// A memory slot: `size` bytes of guest RAM at `ipa`, backed by host frames in
    /// naturally aligned power-of-two chunks (so stage 2 can use blocks), not mapped yet.
    pub(crate) fn add_ram(&mut self, ipa: u64, size: u64) -> Result<(), Stage2Error> {
        let end = self.check(ipa, size)?;
        if let Some((&s, slot)) = self.slots.range(..end).next_back()
            && s + slot.size > ipa
        {
            return Err(Stage2Error::Overlap {
                ipa,
                size,
                other: s,
            });
        }
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut a = ipa;
        while a < end {
            let align = if a == 0 {
                1u64 << 63
            } else {
                1u64 << a.trailing_zeros()
            };
            let left = end - a;
            let fit = 1u64 << (63 - left.leading_zeros());
            let c = align.min(fit).min(1 << 30);
            match self.frames().alloc(c) {
                Ok(pa) => chunks.push(Chunk {
                    ipa: a,
                    pa,
                    size: c,
                }),
                Err(_) => {
                    for ch in &chunks {
                        let _ = self.frames().free(ch.pa, ch.size);
                    }
                    return Err(Stage2Error::OutOfMemory);
                }
            }
            a += c;
        }
        self.slots.insert(ipa, Slot { size, chunks });
        Ok(())
    }

    /// The slot starting at `ipa`: its size.
    pub(crate) fn slot_size(&self, ipa: u64) -> Result<u64, Stage2Error> {
        self.slots
            .get(&ipa)
            .map(|s| s.size)
            .ok_or(Stage2Error::NoSuchRegion { ipa })
    }

    /// Removes the slot at `ipa` and frees its frames. The caller has unmapped it and
    /// completed the TLB maintenance.
    pub(crate) fn remove_slot(&mut self, ipa: u64) {
        if let Some(slot) = self.slots.remove(&ipa) {
            for ch in &slot.chunks {
                let _ = self.frames().free(ch.pa, ch.size);
            }
        }
    }

    fn chunk(&self, ipa: u64) -> Option<Chunk> {
        let (&start, slot) = self.slots.range(..=ipa).next_back()?;
        if ipa >= start + slot.size {
            return None;
        }
        slot.chunks
            .iter()
            .copied()
            .find(|c| ipa >= c.ipa && ipa - c.ipa < c.size)
    }

    /// The host PA backing `ipa`, mapped at stage 2 or not.
    pub(crate) fn ram_pa(&self, ipa: u64) -> Option<u64> {
        self.chunk(ipa).map(|c| c.pa + (ipa - c.ipa))
    }

    /// The chunks of every slot, for a guest-memory view.
    pub(crate) fn chunks(&self) -> Vec<(u64, u64, u64)> {
        self.slots
            .values()
            .flat_map(|s| s.chunks.iter().map(|c| (c.ipa, c.pa, c.size)))
            .collect()
    }

    /// Maps `[ipa, ipa + size)` read/write/executable Normal memory onto the RAM backing
    /// it. Every granule must be guest RAM and unmapped; then nothing is changed on error
    /// except when table memory runs out part-way (what was mapped stays mapped).
    pub(crate) fn map(&mut self, ipa: u64, size: u64) -> Result<(), Stage2Error> {
        let end = self.check(ipa, size)?;
        let mut pieces = Vec::new();
        let mut a = ipa;
        while a < end {
            let c = self.chunk(a).ok_or(Stage2Error::NotRam { ipa: a })?;
            let piece_end = end.min(c.ipa + c.size);
            pieces.push((a, c.pa + (a - c.ipa), piece_end - a));
            a = piece_end;
        }
        if let Some(at) = self.mapped.overlap(ipa, end) {
            return Err(Stage2Error::AlreadyMapped { ipa: at });
        }
        let attrs = S2LeafAttrs::rw().bits();
        for (a, pa, len) in pieces {
            self.builder.map(a, pa, len, attrs).map_err(|e| match e {
                BuildError::OutOfMemory { .. } => Stage2Error::OutOfMemory,
                BuildError::AlreadyMapped { iova } => Stage2Error::AlreadyMapped { ipa: iova },
                e => Stage2Error::Build(e),
            })?;
            self.mapped.insert(a, a + len);
        }
        Ok(())
    }

    /// The valid leaf entries overlapping `[ipa, end)`, from a walk of the tables.
    fn leaves(&self, ipa: u64, end: u64) -> Vec<(u64, u8)> {
        let mut out = Vec::new();
        let mut a = ipa;
        while a < end {
            let next = match walk_stage2(&self.config, self.builder.memory(), a) {
                Ok(t) => {
                    out.push((t.input_base(), t.level));
                    t.input_base().checked_add(t.block_size())
                }
                // Invalid at this level: the whole region that entry covers is unmapped.
                Err(f) => {
                    let shift = self.granule().level_shift(f.level.min(3));
                    ((a >> shift) + 1).checked_mul(1 << shift)
                }
            };
            match next {
                Some(n) if n > a => a = n,
                _ => break,
            }
        }
        out
    }

    /// Unmaps `[ipa, ipa + size)` (splitting blocks that straddle its ends) and says what
    /// changed. No TLB maintenance: the caller's.
    pub(crate) fn unmap(&mut self, ipa: u64, size: u64) -> Result<Stage2Changes, Stage2Error> {
        let end = self.check(ipa, size)?;
        let leaves = self.leaves(ipa, end);
        let result = self.builder.unmap(ipa, size);
        self.mapped.remove(ipa, end);
        match result {
            Ok(ch) => Ok(Stage2Changes {
                ipa,
                size,
                leaves,
                tables: ch.tables,
            }),
            Err(BuildError::OutOfMemory { changes }) => {
                // What was unmapped before the failure still needs maintenance; what is
                // still mapped goes back into the mapped set.
                for (base, level) in self.leaves(ipa, end) {
                    let size = 1u64 << self.granule().level_shift(level);
                    self.mapped
                        .insert(base.max(ipa), base.saturating_add(size).min(end));
                }
                Err(Stage2Error::PartialUnmap {
                    changes: Stage2Changes {
                        ipa,
                        size,
                        leaves,
                        tables: changes.tables,
                    },
                })
            }
            Err(e) => Err(Stage2Error::Build(e)),
        }
    }

    /// A TLB-less walk of `ipa`: the reference translation.
    pub(crate) fn walk(&self, ipa: u64) -> Result<S2Translation, Stage2Error> {
        walk_stage2(&self.config, self.builder.memory(), ipa).map_err(Stage2Error::Fault)
    }

    /// Frees every table and every RAM frame.
    pub(crate) fn destroy(self) {
        for slot in self.slots.values() {
            for ch in &slot.chunks {
                let _ = self.frames().free(ch.pa, ch.size);
            }
        }
        let _ = self.builder.destroy();
    }
}

/// Guest RAM by IPA, through the memory slots (not through stage 2): what the VMM and KVM
/// use to read and write guest memory (`kvm_read_guest`), and what a guest model builds
/// its own stage-1 tables in. A snapshot of the slots at the time it was taken.
#[derive(Clone)]
pub struct GuestMemory {
    mem: Arc<dyn PhysMem>,
    /// (IPA, host PA, size), sorted by IPA.
    chunks: Vec<(u64, u64, u64)>,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl GuestMemory {
    pub(crate) fn new(mem: Arc<dyn PhysMem>, mut chunks: Vec<(u64, u64, u64)>) -> Self {
        chunks.sort_unstable();
        GuestMemory { mem, chunks }
    }

    /// The host PA of `ipa`, if it is guest RAM.
    pub fn pa(&self, ipa: u64) -> Option<u64> {
        let i = self.chunks.partition_point(|&(s, _, _)| s <= ipa);
        let &(s, pa, size) = self.chunks.get(i.checked_sub(1)?)?;
        (ipa - s < size).then(|| pa + (ipa - s))
    }

    /// Reads `buf.len()` bytes of guest RAM at `ipa` (may span slots).
    pub fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), Stage2Error> {
        self.for_each_page(ipa, buf.len(), |pa, range| {
            self.mem.read(pa, &mut buf[range]).is_ok()
        })
    }

    /// Writes `buf` to guest RAM at `ipa` (may span slots).
    pub fn write(&self, ipa: u64, buf: &[u8]) -> Result<(), Stage2Error> {
        self.for_each_page(ipa, buf.len(), |pa, range| {
            self.mem.write(pa, &buf[range]).is_ok()
        })
    }

    /// Walks `[ipa, ipa + len)` one host page at a time (slots need not be contiguous in
    /// host memory), calling `access(pa, range within the buffer)`; the first IPA that is
    /// not RAM, or whose access fails, is the error.
    fn for_each_page(
        &self,
        ipa: u64,
        len: usize,
        mut access: impl FnMut(u64, Range<usize>) -> bool,
    ) -> Result<(), Stage2Error> {
        let mut done = 0usize;
        while done < len {
            let a = ipa
                .checked_add(done as u64)
                .ok_or(Stage2Error::NotRam { ipa })?;
            let pa = self.pa(a).ok_or(Stage2Error::NotRam { ipa: a })?;
            let n = (len - done).min((0x1000 - (a & 0xfff)) as usize);
            if !access(pa, done..done + n) {
                return Err(Stage2Error::NotRam { ipa: a });
            }
            done += n;
        }
        Ok(())
    }
}

impl Memory for GuestMemory {
    fn read_u64(&self, ipa: u64) -> Result<u64, twinmmu_vmsa::MemError> {
        let pa = self.pa(ipa).ok_or(twinmmu_vmsa::MemError { addr: ipa })?;
        self.mem
            .read_u64(pa)
            .map_err(|_| twinmmu_vmsa::MemError { addr: ipa })
    }
}

impl MemoryMut for GuestMemory {
    fn write_u64(&self, ipa: u64, value: u64) -> Result<(), twinmmu_vmsa::MemError> {
        let pa = self.pa(ipa).ok_or(twinmmu_vmsa::MemError { addr: ipa })?;
        self.mem
            .write_u64(pa, value)
            .map_err(|_| twinmmu_vmsa::MemError { addr: ipa })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages covered by a message, in its encoding.
    fn pages(t: &Tlbi) -> u64 {
        match t.range {
            Some(r) => (u64::from(r.num) + 1) << r.scale,
            None => 1,
        }
    }

    #[test]
    fn range_tlbis_cover_exactly_the_range_like_linux() {
        for n in [
            1u64,
            2,
            3,
            5,
            64,
            65,
            66,
            1000,
            4097,
            (1 << 21) - 1,
            1 << 21,
        ] {
            let ts = s2_range_tlbis(7, 0x8000_0000, n, 12);
            let mut at = 0x8000_0000u64;
            for t in &ts {
                assert_eq!(t.addr, at, "contiguous, in order ({n} pages)");
                assert_eq!(t.vmid, 7);
                if let Some(r) = t.range {
                    assert_eq!(t.op, TlbiOp::Ripas2e1is);
                    assert!(r.num < 32);
                    // The instruction's SCALE is (scale - 1) / 5, in 0..=3.
                    assert_eq!((r.scale - 1) % 5, 0);
                    assert!((r.scale - 1) / 5 <= 3);
                } else {
                    assert_eq!(t.op, TlbiOp::Ipas2e1is);
                }
                at += pages(t) << 12;
            }
            assert_eq!(at - 0x8000_0000, n << 12, "{n} pages covered");
            assert!(ts.len() <= 5, "{n} pages: {} operations", ts.len());
        }
        // One page is a plain IPAS2E1IS; 2^21 pages one RIPAS2E1IS with SCALE 3, NUM 31.
        assert_eq!(
            s2_range_tlbis(1, 0, 1, 12),
            vec![Tlbi::new(TlbiOp::Ipas2e1is, 1)]
        );
        let big = s2_range_tlbis(1, 0, 1 << 21, 12);
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].range.map(|r| (r.num, r.scale)), Some((31, 16)));
        // 3 pages: 2 by range (SCALE 0, NUM 0), then 1.
        let three = s2_range_tlbis(1, 0, 3, 12);
        assert_eq!(three.len(), 2);
        assert_eq!(three[0].range.map(|r| (r.num, r.scale)), Some((0, 1)));
        assert_eq!(three[1].op, TlbiOp::Ipas2e1is);
    }

    #[test]
    fn range_set_coalesces_and_splits() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(20, 30);
        r.insert(40, 50);
        assert_eq!(
            r.0.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>(),
            [(10, 30), (40, 50)]
        );
        assert_eq!(r.overlap(0, 10), None);
        assert_eq!(r.overlap(0, 11), Some(10));
        assert_eq!(r.overlap(29, 35), Some(29));
        assert_eq!(r.overlap(30, 40), None);
        r.remove(15, 45);
        assert_eq!(
            r.0.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>(),
            [(10, 15), (45, 50)]
        );
        r.insert(0, 100);
        assert_eq!(r.0.len(), 1);
        r.remove(20, 30);
        assert_eq!(
            r.0.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>(),
            [(0, 20), (30, 100)]
        );
    }
}
