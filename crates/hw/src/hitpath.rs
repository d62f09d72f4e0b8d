//! The SMMU's lock-free hit path: a translation that finds its stream context and its TLB
//! entry reads only atomics, takes no lock and writes no shared cache line.
//!
//! - [`HitTlb`] is the main TLB's lookup array: an 8-way set-associative array of
//!   seqlock-protected slots holding entries of the [`Tlb`](crate::tlb::Tlb) store (the
//!   fully-associative store with CLOCK replacement and the invalidation indexes, which
//!   stays the authority; a slow-path lookup the array cannot answer goes to it). Slots
//!   carry CLOCK reference bits, set by hits only when clear, which the store's CLOCK
//!   consults. Slots are keyed by the id of
//!   the store context the entry belongs to ([`Tlb::context_id`](crate::tlb::Tlb::context_id)):
//!   when the store drops a context whole (by VMID, by ASID, everything), its id retires
//!   and its slots can never match again, at no cost per entry; an entry the store drops
//!   alone (eviction, replacement, invalidation by address) leaves the array through the
//!   store's removal log. So the array never answers with an entry the store no longer
//!   holds, and invalidation stays proportional to what the store removes.
//! - [`CtxCache`] caches, per (StreamID, SubstreamID), what a hit needs from the STE and the
//!   CD: the context ids of its TLB tag and of the tag's global twin, TBI, the incoming-
//!   to-effective access map. Its slots carry the configuration generation they were
//!   filled under; any CFGI or translation-relevant register write bumps the generation,
//!   and a slot of an older one is a miss; so does every whole-context drop (a retired id
//!   must not be named by a current context). An id that went stale otherwise (its
//!   context emptied and was dropped) only makes the hit path miss; the slow path then
//!   refreshes the slot.
//! - [`IdCache`] gives slow-path lookups (stage 2 of table IPAs, say) the ids of recently
//!   used contexts under the same generation, so they too probe the array before the
//!   store's lock.
//!
//! Writers (inserts, removals, fills) hold the owner's writer lock; readers never lock. A
//! reader may miss an entry being written (it then takes the slow path, which is always
//! correct) but never sees a torn one: the seqlock protocol is the one of
//! `crossbeam_utils::atomic::SeqLock` (Release fence after the odd sequence number, Acquire
//! fence before re-reading it).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

use twinmmu_vmsa::{AccessKind, S1Controls, S1Perms, S2Perms};

use crate::ste::AttrOverride;
use crate::tlb::{Ctx, EntryPerms, TlbEntry, page_key};
use crate::xlate::{access_bit, allowed_mask, effective};

/// The atomic word of a [`SeqSlot`], with the orderings chosen by the slot's code, not by
/// the implementation: `AtomicU64` with std's fence in the SMMU, loom's in a test, so loom
/// checks the real protocol.
pub(crate) trait SeqWord: Send + Sync {
    fn new(v: u64) -> Self;
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, v: u64, order: Ordering);
    fn fence(order: Ordering);
}

impl SeqWord for AtomicU64 {
    #[inline(always)]
    fn new(v: u64) -> Self {
        AtomicU64::new(v)
    }
    #[inline(always)]
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    #[inline(always)]
    fn store(&self, v: u64, order: Ordering) {
        AtomicU64::store(self, v, order)
    }
    #[inline(always)]
    fn fence(order: Ordering) {
        fence(order)
    }
}

/// `N` words behind a sequence number: lock-free readers, one writer at a time.
pub(crate) struct SeqSlot<const N: usize, W: SeqWord = AtomicU64> {
    seq: W,
    w: [W; N],
}

impl<const N: usize, W: SeqWord> SeqSlot<N, W> {
    pub(crate) fn new() -> Self {
        SeqSlot {
            seq: W::new(0),
            w: std::array::from_fn(|_| W::new(0)),
        }
    }

    /// A consistent copy of the words, or `None` if a write overlapped the read.
    #[inline]
    pub fn read(&self) -> Option<[u64; N]> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 != 0 {
            return None;
        }
        let mut out = [0u64; N];
        for (o, w) in out.iter_mut().zip(&self.w) {
            *o = w.load(Ordering::Relaxed);
        }
        // Orders the data loads before the re-check: if any of them saw a write made
        // after the writer's Release fence, the re-check sees the odd (or newer) number.
        W::fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == s1).then_some(out)
    }

    /// Replaces the words. The caller is the only writer (it holds the writer lock).
    pub fn write(&self, v: [u64; N]) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // The odd number is visible before any new word (to a reader that fences).
        W::fence(Ordering::Release);
        for (w, x) in self.w.iter().zip(v) {
            w.store(x, Ordering::Relaxed);
        }
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

const WAYS: usize = 8;
/// Marks an occupied slot (ids are below 2^62).
const VALID: u64 = 1 << 63;
/// In the id cache: the context is lossy.
const LOSSY: u64 = 1 << 62;

#[inline(always)]
fn mix(a: u64, b: u64) -> u64 {
    // One folded 64x64 -> 128-bit multiply (the mixing step of foldhash/aHash): a short
    // dependency chain on the hit path, every output bit depending on every input bit.
    let p = u128::from(a ^ 0x243F_6A88_85A3_08D3) * u128::from(b ^ 0x1319_8A2E_0370_7344);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The way a key is placed in when it is free: lookups compare it first.
#[inline(always)]
fn preferred_way(fp: u32) -> usize {
    (fp >> 8) as usize % WAYS
}

fn pack_perms(p: &EntryPerms) -> u64 {
    let mut v = 0u64;
    if let Some((perms, ctl, level)) = p.s1 {
        v |= 1
            | (u64::from(perms.bits() & 0xf) << 1)
            | (u64::from(ctl.wxn) << 5)
            | (u64::from(ctl.pan) << 6)
            | (u64::from(level & 7) << 7);
    }
    if let Some((perms, level, device)) = p.s2 {
        v |= (1 << 10)
            | (u64::from(perms.bits() & 0xf) << 11)
            | (u64::from(level & 7) << 15)
            | (u64::from(device) << 18);
    }
    v
}

fn unpack_perms(v: u64) -> EntryPerms {
    let bit = |n: u32| v & (1 << n) != 0;
    EntryPerms {
        s1: bit(0).then(|| {
            (
                S1Perms::new(bit(1), bit(2), bit(3), bit(4)),
                S1Controls {
                    wxn: bit(5),
                    pan: bit(6),
                },
                ((v >> 7) & 7) as u8,
            )
        }),
        s2: bit(10).then(|| {
            (
                S2Perms::new(bit(11), bit(12), bit(13), bit(14)),
                ((v >> 15) & 7) as u8,
                bit(18),
            )
        }),
    }
}

/// Slot words: context id | VALID, input base, output base, IPA base, and shift [7:0],
/// granule shift [15:8], allowed effective accesses [21:16], packed permissions [42:24].
fn encode(id: u64, e: &TlbEntry) -> [u64; 5] {
    // The effective accesses the permissions allow (no override maps them).
    let allow = allowed_mask(&e.perms, AttrOverride::Incoming, AttrOverride::Incoming);
    [
        id | VALID,
        e.in_base,
        e.out_base,
        e.ipa_base,
        u64::from(e.shift)
            | (u64::from(e.tg_shift) << 8)
            | (u64::from(allow) << 16)
            | (pack_perms(&e.perms) << 24),
    ]
}

fn decode(ctx: Ctx, v: &[u64; 5]) -> TlbEntry {
    TlbEntry {
        ctx,
        in_base: v[1],
        shift: v[4] as u8,
        out_base: v[2],
        ipa_base: v[3],
        tg_shift: (v[4] >> 8) as u8,
        perms: unpack_perms(v[4] >> 24),
    }
}

/// What the hit path needs of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HitEntry {
    pub in_base: u64,
    pub out_base: u64,
    pub shift: u8,
    /// Effective accesses allowed (bit `kind * 2 + privileged`).
    pub allow: u8,
}

/// The main TLB's lock-free lookup array (see the module documentation).
pub(crate) struct HitTlb {
    /// Fingerprint of each slot's key (0 = empty), compared before a slot is read.
    fps: Box<[AtomicU32]>,
    slots: Box<[SeqSlot<5>]>,
    /// Per slot: hit since the store's CLOCK hand last asked. Set by hits only when clear
    /// (a read in the steady state: no cache line bounces between hitting threads).
    refs: Box<[AtomicBool]>,
    set_mask: usize,
    /// The block sizes (bit per shift) inserted: lookups probe these.
    sizes: AtomicU64,
    /// Writer-only round-robin victim choice within a full set.
    victim: AtomicU32,
}

impl HitTlb {
    /// An array of at least twice `capacity` slots (so set conflicts stay rare when the
    /// store is full), and at least 128.
    pub fn new(capacity: usize) -> Self {
        let n = (capacity.saturating_mul(2))
            .clamp(128, 1 << 22)
            .next_power_of_two();
        HitTlb {
            fps: (0..n).map(|_| AtomicU32::new(0)).collect(),
            slots: (0..n).map(|_| SeqSlot::new()).collect(),
            refs: (0..n).map(|_| AtomicBool::new(false)).collect(),
            set_mask: n / WAYS - 1,
            sizes: AtomicU64::new(0),
            victim: AtomicU32::new(0),
        }
    }

    #[inline(always)]
    fn locate(&self, id: u64, key: u64) -> (usize, u32) {
        let h = mix(id, key);
        ((h as usize & self.set_mask) * WAYS, (h >> 32) as u32 | 1)
    }

    #[inline(always)]
    fn probe(&self, id: u64, addr: u64, shift: u8) -> Option<[u64; 5]> {
        self.probe_at(id, addr, shift).map(|(_, v)| v)
    }

    #[inline(always)]
    fn probe_at(&self, id: u64, addr: u64, shift: u8) -> Option<(usize, [u64; 5])> {
        let (base, fp) = self.locate(id, page_key(addr, shift));
        // Inserts prefer the key's own way, so the first comparison usually decides.
        let first = preferred_way(fp);
        let way = if self.fps[base + first].load(Ordering::Acquire) == fp {
            first
        } else {
            let fps = &self.fps[base..base + WAYS];
            fps.iter().position(|f| f.load(Ordering::Acquire) == fp)?
        };
        let v = self.slots[base + way].read()?;
        (v[0] == id | VALID && v[4] as u8 == shift && v[1] == (addr >> shift) << shift)
            .then_some((base + way, v))
    }

    /// The entry covering `addr` of the context `ids[0]`, or of its global twin `ids[1]`
    /// (0 = none), probing each block size present, smallest first, the global twin first
    /// when `global_first` (which entry wins when both exist is the same CONSTRAINED choice
    /// either way).
    #[inline]
    pub fn probe_hit(&self, ids: [u64; 2], addr: u64, global_first: bool) -> Option<HitEntry> {
        let (first, second) = if global_first && ids[1] != 0 {
            (ids[1], ids[0])
        } else {
            (ids[0], ids[1])
        };
        let mut sizes = self.sizes.load(Ordering::Relaxed);
        while sizes != 0 {
            let shift = sizes.trailing_zeros() as u8;
            sizes &= sizes - 1;
            let (i, v) = match (first != 0)
                .then(|| self.probe_at(first, addr, shift))
                .flatten()
            {
                Some(x) => x,
                None => match (second != 0)
                    .then(|| self.probe_at(second, addr, shift))
                    .flatten()
                {
                    Some(x) => x,
                    None => continue,
                },
            };
            // CLOCK's reference bit, written only when clear.
            if !self.refs[i].load(Ordering::Relaxed) {
                self.refs[i].store(true, Ordering::Relaxed);
            }
            return Some(HitEntry {
                in_base: v[1],
                out_base: v[2],
                shift,
                allow: (v[4] >> 16) as u8 & 0x3f,
            });
        }
        None
    }

    /// The full entry covering `addr` of context `ids[0]` (tagged `ctxs[0]`) or of its
    /// global twin `ids[1]` (`ctxs[1]`; id 0 = none), for slow-path lookups.
    pub fn lookup(&self, ids: [u64; 2], ctxs: [Ctx; 2], addr: u64) -> Option<TlbEntry> {
        let mut sizes = self.sizes.load(Ordering::Relaxed);
        while sizes != 0 {
            let shift = sizes.trailing_zeros() as u8;
            sizes &= sizes - 1;
            for k in 0..2 {
                if ids[k] != 0
                    && let Some(v) = self.probe(ids[k], addr, shift)
                {
                    return Some(decode(ctxs[k], &v));
                }
            }
        }
        None
    }

    /// The slot holding exactly `e`'s key under context `id`, if any (writer only).
    fn find(&self, id: u64, e: &TlbEntry) -> Option<usize> {
        let (base, fp) = self.locate(id, page_key(e.in_base, e.shift));
        let holds = |i: usize| {
            self.fps[i].load(Ordering::Relaxed) == fp
                && self.slots[i].read().is_some_and(|v| {
                    v[0] == id | VALID && v[1] == e.in_base && v[4] as u8 == e.shift
                })
        };
        let own = base + preferred_way(fp);
        if holds(own) {
            return Some(own);
        }
        (base..base + WAYS).find(|&i| i != own && holds(i))
    }

    /// Inserts or replaces `e` of context `id` (writer only). A full set gives up one of
    /// its slots: the store still holds that entry, and a slow-path lookup puts it back.
    /// Returns the context id of the entry given up, if any (the store then marks that
    /// context lossy: a miss here no longer proves a miss there).
    #[must_use]
    pub fn insert(&self, id: u64, e: &TlbEntry) -> Option<u64> {
        self.insert_as(id, e, true)
    }

    /// [`HitTlb::insert`] of an entry the store has just added (not replaced): the array
    /// cannot hold its key (it holds only entries of the store), so no search for it.
    #[must_use]
    pub fn insert_new(&self, id: u64, e: &TlbEntry) -> Option<u64> {
        self.insert_as(id, e, false)
    }

    #[inline]
    fn insert_as(&self, id: u64, e: &TlbEntry, may_exist: bool) -> Option<u64> {
        let (base, fp) = self.locate(id, page_key(e.in_base, e.shift));
        let own = base + preferred_way(fp);
        let found = if may_exist { self.find(id, e) } else { None };
        let mut dropped = None;
        let i = found.unwrap_or_else(|| {
            std::iter::once(own)
                .chain(base..base + WAYS)
                .find(|&i| self.fps[i].load(Ordering::Relaxed) == 0)
                .unwrap_or_else(|| {
                    let i = base + self.victim.fetch_add(1, Ordering::Relaxed) as usize % WAYS;
                    // The writer is the only one changing slots: this read is exact.
                    dropped = self.slots[i].read().map(|v| v[0] & !VALID);
                    i
                })
        });
        self.fps[i].store(0, Ordering::Release);
        self.slots[i].write(encode(id, e));
        if found.is_none() {
            self.refs[i].store(false, Ordering::Relaxed);
        }
        self.fps[i].store(fp, Ordering::Release);
        let bit = 1u64 << (e.shift & 63);
        // A read-modify-write only the first time a size appears.
        if self.sizes.load(Ordering::Relaxed) & bit == 0 {
            self.sizes.fetch_or(bit, Ordering::Release);
        }
        dropped
    }

    /// Whether `e` of context `id` was hit since the last call (and clears the bit); for
    /// the store's CLOCK (writer only).
    pub fn take_referenced(&self, id: u64, e: &TlbEntry) -> bool {
        self.find(id, e)
            .is_some_and(|i| self.refs[i].swap(false, Ordering::Relaxed))
    }

    /// Removes `e` of context `id` if present (writer only).
    pub fn remove(&self, id: u64, e: &TlbEntry) {
        if let Some(i) = self.find(id, e) {
            self.fps[i].store(0, Ordering::Release);
            self.slots[i].write([0; 5]);
        }
    }
}

/// The store ids of recently used TLB contexts, for slow-path lookups in the array: a
/// direct-mapped seqlock array of (context tag, id, configuration generation). Whole
/// context drops bump the generation, so an id read here under the current generation is
/// not retired (a translation racing with the drop is in flight, as on the hit path).
pub(crate) struct IdCache {
    slots: Box<[SeqSlot<3>]>,
    mask: usize,
}

impl IdCache {
    pub fn new(entries: usize) -> Self {
        let n = entries.clamp(64, 1 << 16).next_power_of_two();
        IdCache {
            slots: (0..n).map(|_| SeqSlot::new()).collect(),
            mask: n - 1,
        }
    }

    #[inline(always)]
    fn slot(&self, ctx: Ctx) -> &SeqSlot<3> {
        &self.slots[mix(ctx.raw(), 0x1d5) as usize & self.mask]
    }

    /// The id of `ctx` recorded under `generation`.
    #[inline]
    pub fn lookup(&self, ctx: Ctx, generation: u64) -> Option<u64> {
        self.lookup_state(ctx, generation).map(|(id, _)| id)
    }

    /// The id of `ctx` recorded under `generation`, and whether the lookup array may lack
    /// some of its entries (lossy; see [`crate::tlb::Tlb::mark_lossy`]). For a context
    /// that is not lossy, a miss in the array is a miss in the store.
    #[inline]
    pub fn lookup_state(&self, ctx: Ctx, generation: u64) -> Option<(u64, bool)> {
        let v = self.slot(ctx).read()?;
        (v[0] == ctx.raw() | VALID && v[2] == generation)
            .then_some((v[1] & !LOSSY, v[1] & LOSSY != 0))
    }

    /// Records `ctx`'s id (writer only: the store's lock holder).
    pub fn fill(&self, ctx: Ctx, id: u64, lossy: bool, generation: u64) {
        let w = id | if lossy { LOSSY } else { 0 };
        self.slot(ctx).write([ctx.raw() | VALID, w, generation]);
    }
}

/// What a hit needs of a stream's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HitCtx {
    /// The store context ids of its TLB tag and of the tag's global twin (0 = none yet).
    pub ids: [u64; 2],
    /// Stage 1 translates (the input is a VA, TBI may apply); otherwise stage 2 only.
    pub s1: bool,
    /// CD.TBI0 / CD.TBI1.
    pub tbi: [bool; 2],
    /// For each incoming access (index `kind * 2 + privileged`), the effective access bit
    /// after STE.PRIVCFG/INSTCFG (and the EL2 privilege rule), as entries record them.
    pub effective: [u8; 6],
    /// The last translation used a global entry: probe the global twin first.
    pub global_first: bool,
}

/// The address the TLB keys stage-1 input `va` by: with TBI (`tbi`: CD.TBI0 and CD.TBI1,
/// VA\[55\] selecting) the top byte is ignored, VA\[55\] sign-extended, so tagged and
/// untagged accesses share entries and a TLBI by untagged VA finds them.
#[inline(always)]
pub(crate) fn tbi_key(va: u64, tbi: [bool; 2]) -> u64 {
    if tbi[((va >> 55) & 1) as usize] {
        (((va << 8) as i64) >> 8) as u64
    } else {
        va
    }
}

impl HitCtx {
    /// The address the TLB keys `va` by ([`tbi_key`] for stage 1).
    #[inline(always)]
    pub fn key(&self, va: u64) -> u64 {
        if self.s1 { tbi_key(va, self.tbi) } else { va }
    }

    pub fn new(
        ids: [u64; 2],
        s1: bool,
        tbi: [bool; 2],
        (privcfg, instcfg): (AttrOverride, AttrOverride),
        global_first: bool,
    ) -> Self {
        let mut eff = [0u8; 6];
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Execute] {
            for privileged in [false, true] {
                let a = effective(kind, privileged, privcfg, instcfg);
                eff[access_bit(kind, privileged).trailing_zeros() as usize] =
                    access_bit(a.kind, a.privileged);
            }
        }
        HitCtx {
            ids,
            s1,
            tbi,
            effective: eff,
            global_first,
        }
    }
}

/// The per-(StreamID, SubstreamID) context cache (see the module documentation).
pub(crate) struct CtxCache {
    slots: Box<[SeqSlot<5>]>,
    mask: usize,
}

impl CtxCache {
    pub fn new(entries: usize) -> Self {
        let n = entries.clamp(64, 1 << 20).next_power_of_two();
        CtxCache {
            slots: (0..n).map(|_| SeqSlot::new()).collect(),
            mask: n - 1,
        }
    }

    #[inline(always)]
    fn key(sid: u32, ssid: Option<u32>) -> u64 {
        u64::from(sid) | (ssid.map_or(0, |s| u64::from(s) + 1) << 32)
    }

    #[inline(always)]
    fn slot(&self, key: u64) -> &SeqSlot<5> {
        &self.slots[mix(key, 0x5ca1_ab1e) as usize & self.mask]
    }

    /// The context of (sid, ssid) if it was filled under configuration generation `gen`.
    #[inline]
    pub fn lookup(&self, sid: u32, ssid: Option<u32>, generation: u64) -> Option<HitCtx> {
        let key = Self::key(sid, ssid);
        let v = self.slot(key).read()?;
        if v[0] != key || v[1] != generation || v[4] & VALID == 0 {
            return None;
        }
        let f = v[4];
        Some(HitCtx {
            ids: [v[2], v[3]],
            s1: f & 1 != 0,
            tbi: [f & 2 != 0, f & 4 != 0],
            global_first: f & 8 != 0,
            effective: std::array::from_fn(|i| (f >> (8 + 8 * i)) as u8),
        })
    }

    /// Records the context of (sid, ssid) resolved under generation `gen` (writer only).
    pub fn fill(&self, sid: u32, ssid: Option<u32>, generation: u64, c: &HitCtx) {
        let key = Self::key(sid, ssid);
        let f = c
            .effective
            .iter()
            .enumerate()
            .fold(0u64, |f, (i, b)| f | (u64::from(*b) << (8 + 8 * i)))
            | u64::from(c.s1)
            | (u64::from(c.tbi[0]) << 1)
            | (u64::from(c.tbi[1]) << 2)
            | (u64::from(c.global_first) << 3)
            | VALID;
        self.slot(key)
            .write([key, generation, c.ids[0], c.ids[1], f]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlb::{Kind, World};

    fn entry(ctx: Ctx, va: u64, shift: u8, perms: EntryPerms) -> TlbEntry {
        TlbEntry {
            ctx,
            in_base: va,
            shift,
            out_base: 0x4000_0000 + va,
            ipa_base: 0x8000_0000 + va,
            tg_shift: 14,
            perms,
        }
    }

    fn rw() -> EntryPerms {
        EntryPerms {
            s1: Some((
                S1Perms::new(false, true, false, false),
                S1Controls::default(),
                3,
            )),
            s2: None,
        }
    }

    #[test]
    fn entries_round_trip_through_the_slot_words() {
        let perms = EntryPerms {
            s1: Some((
                S1Perms::new(true, false, true, false),
                S1Controls {
                    wxn: true,
                    pan: false,
                },
                2,
            )),
            s2: Some((S2Perms::new(true, false, false, true), 3, true)),
        };
        for p in [perms, EntryPerms { s1: None, s2: None }, rw()] {
            let c = Ctx::new(World::El2E2h, Kind::Nested, 0xfffe, Some(0xabcd), true);
            let e = entry(c, 0x7f_ffe0_0000, 21, p);
            assert_eq!(decode(c, &encode(5, &e)), e);
        }
        let t = HitTlb::new(16);
        let c = Ctx::new(World::NsEl1, Kind::S2, 3, None, false);
        let e = entry(c, 0x20_0000, 21, perms);
        let _ = t.insert(4, &e);
        let g = Ctx::new(World::NsEl1, Kind::S2, 3, Some(1), false);
        assert_eq!(t.lookup([0, 4], [g, c], 0x21_0000), Some(e));
        assert_eq!(t.lookup([4, 0], [c, g], 0x40_0000), None);
    }

    #[test]
    fn id_cache_keys_and_generations() {
        let ids = IdCache::new(64);
        let c = Ctx::new(World::NsEl1, Kind::S1, 1, Some(2), false);
        ids.fill(c, 17, false, 3);
        assert_eq!(ids.lookup(c, 3), Some(17));
        assert_eq!(ids.lookup_state(c, 3), Some((17, false)));
        ids.fill(c, 17, true, 3);
        assert_eq!(ids.lookup_state(c, 3), Some((17, true)));
        assert_eq!(ids.lookup(c, 4), None);
        assert_eq!(ids.lookup(c.global(), 3), None);
    }

    #[test]
    fn lookup_insert_remove_and_sizes() {
        let t = HitTlb::new(16);
        let c = Ctx::new(World::NsEl1, Kind::S1, 1, Some(2), false);
        let small = entry(c, 0x1000, 12, rw());
        let big = entry(c, 0x20_0000, 21, rw());
        let _ = t.insert(7, &small);
        let _ = t.insert(7, &big);
        let hit = |id, a| t.probe_hit([id, 0], a, false).map(|h| h.out_base);
        assert_eq!(hit(7, 0x1fff), Some(small.out_base));
        assert_eq!(hit(7, 0x3f_f000), Some(big.out_base));
        assert_eq!(hit(7, 0x2000), None);
        assert_eq!(hit(8, 0x1000), None, "another context id");
        // The global twin answers when the own context does not.
        assert_eq!(
            t.probe_hit([9, 7], 0x1000, false).map(|h| h.out_base),
            Some(small.out_base)
        );
        // Read and write, privileged or not; never execute (el0 set: PXN implied).
        let a = t.probe_hit([7, 0], 0x1000, false).unwrap().allow;
        assert_eq!(a & 0b1111, 0b1111);
        t.remove(7, &small);
        assert_eq!(hit(7, 0x1000), None);
        assert_eq!(hit(7, 0x20_0000), Some(big.out_base));
    }

    #[test]
    fn a_full_set_gives_up_a_slot_and_never_returns_a_wrong_entry() {
        let t = HitTlb::new(16);
        let c = Ctx::new(World::NsEl1, Kind::S2, 7, None, false);
        let es: Vec<_> = (0..4096u64).map(|i| entry(c, i << 12, 12, rw())).collect();
        for e in &es {
            let _ = t.insert(3, e);
        }
        let mut found = 0;
        for e in &es {
            if let Some(x) = t.probe_hit([3, 0], e.in_base + 5, false) {
                assert_eq!((x.in_base, x.out_base), (e.in_base, e.out_base));
                found += 1;
            }
        }
        assert_eq!(found, t.slots.len(), "every slot holds one entry");
    }

    #[test]
    fn ctx_cache_keys_generations_and_ssids() {
        let cc = CtxCache::new(64);
        let h = HitCtx::new(
            [12, 13],
            true,
            [true, false],
            (AttrOverride::Force(true), AttrOverride::Force(false)),
            true,
        );
        // PRIVCFG forces privileged, INSTCFG forces data: an unprivileged instruction
        // fetch (index 4) is checked as a privileged read (bit 1).
        assert_eq!(h.effective[4], 1 << 1);
        assert_eq!(h.effective[2], 1 << 3, "writes stay writes");
        cc.fill(5, None, 7, &h);
        assert_eq!(cc.lookup(5, None, 7), Some(h));
        assert_eq!(cc.lookup(5, None, 8), None, "a newer generation");
        assert_eq!(cc.lookup(5, Some(0), 7), None, "SSID 0 is not 'no SSID'");
        cc.fill(5, Some(0), 7, &HitCtx { s1: false, ..h });
        assert_eq!(cc.lookup(5, Some(0), 7).map(|c| c.s1), Some(false));
    }
}

/// Loom model of [`SeqSlot`], the hit path's only synchronisation: the real `read` and
/// `write` with loom's atomics and fences. A reader racing two writes must see the initial
/// words, either write's words, or nothing; never a mix. Mutations tried: dropping the
/// writer's Release fence, and the reader's Acquire fence — loom finds a torn read for each.
#[cfg(test)]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    struct LoomWord(loom::sync::atomic::AtomicU64);

    impl SeqWord for LoomWord {
        fn new(v: u64) -> Self {
            LoomWord(loom::sync::atomic::AtomicU64::new(v))
        }
        fn load(&self, order: Ordering) -> u64 {
            self.0.load(order)
        }
        fn store(&self, v: u64, order: Ordering) {
            self.0.store(v, order)
        }
        fn fence(order: Ordering) {
            loom::sync::atomic::fence(order)
        }
    }

    #[test]
    fn a_reader_never_sees_a_torn_slot() {
        loom::model(|| {
            let slot = Arc::new(SeqSlot::<2, LoomWord>::new());
            let writer = {
                let slot = slot.clone();
                thread::spawn(move || {
                    slot.write([1, 1]);
                    slot.write([2, 2]);
                })
            };
            if let Some([a, b]) = slot.read() {
                assert_eq!(a, b, "torn read");
            }
            writer.join().unwrap();
            assert_eq!(slot.read(), Some([2, 2]));
        });
    }
}
