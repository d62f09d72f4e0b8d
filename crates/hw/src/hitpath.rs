//! The SMMU's lock-free hit path: a translation that finds its stream context and its TLB
//! entry reads only atomics, takes no lock and writes no shared cache line.
//!
//! - [`HitTlb`] is the main TLB's lookup array: an 8-way set-associative array of
//!   seqlock-protected slots holding entries of the [`Tlb`](crate::tlb::Tlb) (the
//!   fully-associative store with CLOCK replacement and the invalidation indexes, which
//!   stays the authority). Every entry the store drops leaves the array first (the store's
//!   removal log), so the array never holds an entry the store does not; an entry the array
//!   lost to a set conflict is found in the store (under its lock) and put back.
//! - [`CtxCache`] caches, per (StreamID, SubstreamID), what a hit needs from the STE and the
//!   CD: the TLB tag, TBI, the PRIV/INST overrides. Its slots carry the configuration
//!   generation they were filled under; any CFGI or translation-relevant register write
//!   bumps the generation, and a slot of an older one is a miss.
//!
//! Writers (inserts, removals, fills) hold the owner's writer lock; readers never lock. A
//! reader may miss an entry being written (it then takes the slow path, which is always
//! correct) but never sees a torn one: the seqlock protocol is the one of
//! `crossbeam_utils::atomic::SeqLock` (Release fence after the odd sequence number, Acquire
//! fence before re-reading it).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

use twinmmu_vmsa::{S1Controls, S1Perms, S2Perms};

use twinmmu_vmsa::{Access, AccessKind};

use crate::ste::AttrOverride;
use crate::tlb::{Ctx, EntryPerms, TlbEntry};
use crate::xlate::{access_bit, effective, perms_allow};

/// `N` words behind a sequence number: lock-free readers, one writer at a time.
pub(crate) struct SeqSlot<const N: usize> {
    seq: AtomicU64,
    w: [AtomicU64; N],
}

impl<const N: usize> SeqSlot<N> {
    fn new() -> Self {
        SeqSlot {
            seq: AtomicU64::new(0),
            w: std::array::from_fn(|_| AtomicU64::new(0)),
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
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == s1).then_some(out)
    }

    /// Replaces the words. The caller is the only writer (it holds the writer lock).
    pub fn write(&self, v: [u64; N]) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (w, x) in self.w.iter().zip(v) {
            w.store(x, Ordering::Relaxed);
        }
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

const WAYS: usize = 8;
/// Marks an occupied slot (a context tag uses bits [37:0]).
const VALID: u64 = 1 << 63;

#[inline(always)]
fn mix(a: u64, b: u64) -> u64 {
    let mut h = (a ^ b.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 32;
    h = h.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^ (h >> 29)
}

#[inline(always)]
fn page(addr: u64, shift: u8) -> u64 {
    ((addr >> shift) << 6) | u64::from(shift)
}

fn pack_perms(p: &EntryPerms) -> u64 {
    let mut v = 0u64;
    if let Some((perms, ctl, level)) = p.s1 {
        v |= 1
            | (u64::from(perms.bits()) << 1)
            | (u64::from(ctl.wxn) << 9)
            | (u64::from(ctl.pan) << 10)
            | (u64::from(level & 0xf) << 11);
    }
    if let Some((perms, level, device)) = p.s2 {
        v |= (1 << 16)
            | (u64::from(perms.bits()) << 17)
            | (u64::from(level & 0xf) << 25)
            | (u64::from(device) << 29);
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
                    wxn: bit(9),
                    pan: bit(10),
                },
                ((v >> 11) & 0xf) as u8,
            )
        }),
        s2: bit(16).then(|| {
            (
                S2Perms::new(bit(17), bit(18), bit(19), bit(20)),
                ((v >> 25) & 0xf) as u8,
                bit(29),
            )
        }),
    }
}

/// The effective accesses (bit `kind * 2 + privileged`, as `access_bit`) the entry's
/// permissions allow.
fn allow_mask(p: &EntryPerms) -> u64 {
    let mut m = 0;
    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Execute] {
        for privileged in [false, true] {
            if perms_allow(p, Access::new(kind, privileged)).is_ok() {
                m |= u64::from(access_bit(kind, privileged));
            }
        }
    }
    m
}

/// Slot words: tag | VALID, in_base, out_base, ipa_base, meta = shift [7:0], tg_shift
/// [15:8], packed permissions [45:16], allowed effective accesses [53:48].
fn encode(e: &TlbEntry) -> [u64; 5] {
    [
        e.ctx.raw() | VALID,
        e.in_base,
        e.out_base,
        e.ipa_base,
        u64::from(e.shift)
            | (u64::from(e.tg_shift) << 8)
            | (pack_perms(&e.perms) << 16)
            | (allow_mask(&e.perms) << 48),
    ]
}

fn decode(v: &[u64; 5]) -> TlbEntry {
    TlbEntry {
        ctx: Ctx::from_raw(v[0] & !VALID),
        in_base: v[1],
        shift: v[4] as u8,
        out_base: v[2],
        ipa_base: v[3],
        tg_shift: (v[4] >> 8) as u8,
        perms: unpack_perms((v[4] >> 16) & 0xffff_ffff),
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
    /// Fingerprint of each slot's key (0 = empty), scanned before a slot is read.
    fps: Box<[AtomicU32]>,
    slots: Box<[SeqSlot<5>]>,
    set_mask: usize,
    /// The block sizes (bit per shift) inserted: lookups probe these.
    sizes: AtomicU64,
    /// Per set: it gave up an entry the store still holds (a set conflict), so a miss in
    /// it is not a miss in the store.
    overflowed: Box<[AtomicBool]>,
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
            set_mask: n / WAYS - 1,
            sizes: AtomicU64::new(0),
            overflowed: (0..n / WAYS).map(|_| AtomicBool::new(false)).collect(),
            victim: AtomicU32::new(0),
        }
    }

    #[inline(always)]
    fn locate(&self, ctx: u64, key: u64) -> (usize, u32) {
        let h = mix(ctx, key);
        ((h as usize & self.set_mask) * WAYS, (h >> 32) as u32 | 1)
    }

    /// Whether a miss of [`HitTlb::lookup`] for (ctx, addr) is also a miss of the store:
    /// none of the sets it probes ever gave up an entry to a conflict.
    pub fn miss_is_definitive(&self, ctx: Ctx, addr: u64) -> bool {
        let tags = [
            Some(ctx.raw()),
            ctx.asid().is_some().then(|| ctx.global().raw()),
        ];
        let mut sizes = self.sizes.load(Ordering::Acquire);
        while sizes != 0 {
            let shift = sizes.trailing_zeros() as u8;
            sizes &= sizes - 1;
            for raw in tags.into_iter().flatten() {
                let (base, _) = self.locate(raw, page(addr, shift));
                if self.overflowed[base / WAYS].load(Ordering::Acquire) {
                    return false;
                }
            }
        }
        true
    }

    /// The entry of `ctx` covering `addr`, probing each block size present, smallest
    /// first; for an ASID-tagged context, at each size its global twin too (a global entry
    /// matches any ASID, IHI0070 3.17.1).
    #[inline]
    pub fn lookup(&self, ctx: Ctx, addr: u64) -> Option<TlbEntry> {
        let raw = ctx.raw();
        let global = ctx.asid().is_some().then(|| ctx.global().raw());
        let mut sizes = self.sizes.load(Ordering::Relaxed);
        while sizes != 0 {
            let shift = sizes.trailing_zeros() as u8;
            sizes &= sizes - 1;
            if let Some(e) = self.probe(raw, addr, shift) {
                return Some(e);
            }
            if let Some(g) = global
                && let Some(e) = self.probe(g, addr, shift)
            {
                return Some(e);
            }
        }
        None
    }

    #[inline(always)]
    fn probe(&self, raw: u64, addr: u64, shift: u8) -> Option<TlbEntry> {
        self.probe_words(raw, addr, shift).map(|v| decode(&v))
    }

    #[inline(always)]
    fn probe_words(&self, raw: u64, addr: u64, shift: u8) -> Option<[u64; 5]> {
        let (base, fp) = self.locate(raw, page(addr, shift));
        let fps = &self.fps[base..base + WAYS];
        let way = fps.iter().position(|f| f.load(Ordering::Acquire) == fp)?;
        let v = self.slots[base + way].read()?;
        (v[0] == raw | VALID && v[4] as u8 == shift && v[1] == (addr >> shift) << shift)
            .then_some(v)
    }

    /// [`HitTlb::lookup`] for the hit path: no decoding, and the global twin probed first
    /// at each size when `global_first` (which entry wins when both exist is the same
    /// CONSTRAINED choice either way).
    #[inline]
    pub fn probe_hit(&self, ctx: Ctx, addr: u64, global_first: bool) -> Option<HitEntry> {
        let own = ctx.raw();
        let twin = ctx.asid().is_some().then(|| ctx.global().raw());
        let (first, second) = match (twin, global_first) {
            (Some(g), true) => (g, Some(own)),
            (g, _) => (own, g),
        };
        let mut sizes = self.sizes.load(Ordering::Relaxed);
        while sizes != 0 {
            let shift = sizes.trailing_zeros() as u8;
            sizes &= sizes - 1;
            let v = match self.probe_words(first, addr, shift) {
                Some(v) => v,
                None => match second {
                    Some(r) => match self.probe_words(r, addr, shift) {
                        Some(v) => v,
                        None => continue,
                    },
                    None => continue,
                },
            };
            return Some(HitEntry {
                in_base: v[1],
                out_base: v[2],
                shift,
                allow: (v[4] >> 48) as u8 & 0x3f,
            });
        }
        None
    }

    /// The slot holding exactly `e`'s key, if any (writer only).
    fn find(&self, e: &TlbEntry) -> Option<usize> {
        let raw = e.ctx.raw() | VALID;
        let (base, fp) = self.locate(e.ctx.raw(), page(e.in_base, e.shift));
        (base..base + WAYS).find(|&i| {
            self.fps[i].load(Ordering::Relaxed) == fp
                && self.slots[i]
                    .read()
                    .is_some_and(|v| v[0] == raw && v[1] == e.in_base && v[4] as u8 == e.shift)
        })
    }

    /// Inserts or replaces `e` (writer only). A full set gives up one of its slots.
    pub fn insert(&self, e: &TlbEntry) {
        let (base, fp) = self.locate(e.ctx.raw(), page(e.in_base, e.shift));
        let i = self.find(e).unwrap_or_else(|| {
            (base..base + WAYS)
                .find(|&i| self.fps[i].load(Ordering::Relaxed) == 0)
                .unwrap_or_else(|| {
                    self.overflowed[base / WAYS].store(true, Ordering::Release);
                    base + self.victim.fetch_add(1, Ordering::Relaxed) as usize % WAYS
                })
        });
        self.fps[i].store(0, Ordering::Release);
        self.slots[i].write(encode(e));
        self.fps[i].store(fp, Ordering::Release);
        self.sizes
            .fetch_or(1u64 << (e.shift & 63), Ordering::Release);
    }

    /// Removes `e` if present (writer only).
    pub fn remove(&self, e: &TlbEntry) {
        if let Some(i) = self.find(e) {
            self.fps[i].store(0, Ordering::Release);
            self.slots[i].write([0; 5]);
        }
    }
}

/// What a hit needs of a stream's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HitCtx {
    /// The TLB tag its lookups use.
    pub tag: Ctx,
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

impl HitCtx {
    pub fn new(
        tag: Ctx,
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
            tag,
            s1,
            tbi,
            effective: eff,
            global_first,
        }
    }
}

/// The per-(StreamID, SubstreamID) context cache (see the module documentation).
pub(crate) struct CtxCache {
    slots: Box<[SeqSlot<4>]>,
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
    fn slot(&self, key: u64) -> &SeqSlot<4> {
        &self.slots[mix(key, 0x5ca1_ab1e) as usize & self.mask]
    }

    /// The context of (sid, ssid) if it was filled under configuration generation `gen`.
    #[inline]
    pub fn lookup(&self, sid: u32, ssid: Option<u32>, generation: u64) -> Option<HitCtx> {
        let key = Self::key(sid, ssid);
        let v = self.slot(key).read()?;
        if v[0] != key || v[1] != generation || v[2] & VALID == 0 {
            return None;
        }
        let f = v[3];
        Some(HitCtx {
            tag: Ctx::from_raw(v[2] & !VALID),
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
            | (u64::from(c.global_first) << 3);
        self.slot(key)
            .write([key, generation, c.tag.raw() | VALID, f]);
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
        for p in [perms, EntryPerms { s1: None, s2: None }] {
            let c = Ctx::new(World::El2E2h, Kind::Nested, 0xfffe, Some(0xabcd), true);
            let e = entry(c, 0x7f_ffe0_0000, 21, p);
            assert_eq!(decode(&encode(&e)), e);
        }
    }

    #[test]
    fn lookup_insert_remove_and_sizes() {
        let t = HitTlb::new(16);
        let c = Ctx::new(World::NsEl1, Kind::S1, 1, Some(2), false);
        let p = EntryPerms { s1: None, s2: None };
        let small = entry(c, 0x1000, 12, p);
        let big = entry(c, 0x20_0000, 21, p);
        t.insert(&small);
        t.insert(&big);
        assert_eq!(t.lookup(c, 0x1fff), Some(small));
        assert_eq!(t.lookup(c, 0x3f_f000), Some(big));
        assert_eq!(t.lookup(c, 0x2000), None);
        assert_eq!(t.lookup(c.global(), 0x1000), None, "another tag");
        t.remove(&small);
        assert_eq!(t.lookup(c, 0x1000), None);
        assert_eq!(t.lookup(c, 0x20_0000), Some(big));
    }

    #[test]
    fn a_full_set_gives_up_a_slot_and_never_returns_a_wrong_entry() {
        let t = HitTlb::new(16);
        let c = Ctx::new(World::NsEl1, Kind::S2, 7, None, false);
        let p = EntryPerms { s1: None, s2: None };
        let es: Vec<_> = (0..4096u64).map(|i| entry(c, i << 12, 12, p)).collect();
        for e in &es {
            t.insert(e);
        }
        let mut found = 0;
        for e in &es {
            if let Some(x) = t.lookup(c, e.in_base + 5) {
                assert_eq!(&x, e);
                found += 1;
            }
        }
        assert_eq!(found, t.slots.len(), "every slot holds one entry");
        let missing = es
            .iter()
            .find(|e| t.lookup(c, e.in_base).is_none())
            .unwrap();
        assert!(!t.miss_is_definitive(c, missing.in_base));
        let fresh = HitTlb::new(16);
        fresh.insert(&es[0]);
        assert!(fresh.miss_is_definitive(c, es[1].in_base));
    }

    #[test]
    fn ctx_cache_keys_generations_and_ssids() {
        let cc = CtxCache::new(64);
        let h = HitCtx::new(
            Ctx::new(World::NsEl1, Kind::Nested, 3, Some(9), false),
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
