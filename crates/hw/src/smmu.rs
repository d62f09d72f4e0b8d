//! The SMMUv3 device: register file and MMIO protocols (IHI0070 chapter 6), the event and
//! PRI queues with their overflow and interrupt protocols (chapters 7–8), GERROR, the
//! configuration cache, the main TLB and statistics. Command processing lives in
//! `cmdq.rs`, translation in `xlate.rs`, the DVM port in `dvm.rs`, DMA ports with
//! micro-TLBs in `port.rs`.
//!
//! Locking (always taken in this order, never the reverse):
//! `regs` → `stalls` → `tcu` / `tlb` → `evtq` / `priq` → `irq`. Translation never takes
//! `regs`, so a command (holding `regs`) may re-run a stalled transaction.
//!
//! Visibility: every change that can make a cached translation stale (an invalidation, a
//! CR0/GBPA/STRTAB/CR2 write) is applied to the caches under their write locks and then
//! bumps `epoch` with Release ordering, before the command is consumed (CONS advances) or
//! the register write returns. A translation loads `epoch` with Acquire before it looks at
//! any cache, so once software observes a CMD_SYNC consumed, every later translation sees
//! the invalidation (see `port.rs` for the micro-TLB side of the argument).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxBuildHasher;

use crate::cd::CdConfig;
use crate::config::SmmuConfig;
use crate::event::Event;
use crate::mem::PhysMem;
use crate::regs::*;
use crate::ste::StreamConfig;
use crate::tlb::Tlb;

/// An MMIO access the register file does not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    #[error("{size}-byte access: SMMU registers take 32- and 64-bit accesses only")]
    Size { size: u8 },
    #[error("misaligned access at {offset:#x}")]
    Align { offset: u64 },
    #[error("offset {offset:#x} is outside the two register pages")]
    Range { offset: u64 },
}

/// Register state that is not a queue of the translation side.
#[derive(Debug, Clone, Default)]
pub(crate) struct Regs {
    pub cr0: u32,
    pub cr1: u32,
    pub cr2: u32,
    pub gbpa: u32,
    pub strtab_base: u64,
    pub strtab_base_cfg: u32,
    pub cmdq_base: u64,
    pub cmdq_prod: u32,
    pub cmdq_cons: u32,
    pub gmpam: u32,
    pub gbpmpam: u32,
}

/// An SMMU-written queue (event queue, PRI queue).
#[derive(Debug, Clone, Default)]
pub(crate) struct OutQueue {
    pub base: u64,
    pub prod: u32,
    pub cons: u32,
    pub enabled: bool,
}

/// Interrupt configuration: IRQ_CTRL and the three MSI register sets.
#[derive(Debug, Clone, Default)]
pub(crate) struct IrqState {
    pub irq_ctrl: u32,
    /// `[GERROR, EVENTQ, PRIQ]` × (CFG0 address, CFG1 data, CFG2 attributes).
    pub cfg0: [u64; 3],
    pub cfg1: [u32; 3],
    pub cfg2: [u32; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IrqSource {
    Gerror = 0,
    Eventq = 1,
    Priq = 2,
}

/// The register values translation depends on, copied out under the `tcu` lock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Live {
    pub cr0: Cr0,
    pub cr2: Cr2,
    pub gbpa: Gbpa,
    pub strtab_base: u64,
    pub strtab_cfg: StrtabBaseCfg,
}

/// A cached STE: what it decodes to, and a fingerprint of its 64 bytes without STE.CONT
/// (two STEs are "identical" for STE.CONT when all their other fields are, IHI0070 5.2).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedSte {
    pub cfg: StreamConfig,
    pub fp: u64,
    /// VMS.PARTID_MAP, when the STE enables the VMS (IHI0070 5.6.2: cached by StreamID).
    pub partid_map: Option<[u16; 32]>,
}

/// The configuration cache (STE by StreamID, CD by StreamID and CD index) and the live
/// register snapshot, behind one lock.
pub(crate) struct Tcu {
    pub live: Live,
    pub ste: HashMap<u32, CachedSte, FxBuildHasher>,
    /// STEs fetched with STE.CONT = n > 0, matched by every StreamID of their span:
    /// (n, StreamID >> n) → entry (IHI0070 5.2 CONT, 3.20.2).
    pub ste_spans: HashMap<(u8, u32), CachedSte, FxBuildHasher>,
    /// Bit n set while a span of 2^n StreamIDs is cached.
    pub span_sizes: u16,
    pub cd: HashMap<(u32, u32), CdConfig, FxBuildHasher>,
    /// Bumped by every CFGI; a fetch that started under an older generation does not insert.
    pub cfg_gen: u64,
}

impl Tcu {
    /// The VMS.PARTID_MAP cached with the STE of `sid` (own entry or span).
    pub fn partid_map(&self, sid: u32) -> Option<[u16; 32]> {
        let own = self.ste.get(&sid).and_then(|c| c.partid_map);
        own.or_else(|| {
            (0..16u8)
                .filter(|n| self.span_sizes & (1 << n) != 0)
                .find_map(|n| self.ste_spans.get(&(n, sid >> n)))
                .and_then(|c| c.partid_map)
        })
    }

    /// The cached configuration of `sid`: its own entry, else the entry of a contiguous
    /// span that covers it.
    #[inline]
    pub fn ste_get(&self, sid: u32) -> Option<StreamConfig> {
        match self.ste.get(&sid) {
            Some(c) => Some(c.cfg),
            None if self.span_sizes != 0 => self.span_get(sid),
            None => None,
        }
    }

    #[cold]
    fn span_get(&self, sid: u32) -> Option<StreamConfig> {
        let mut sizes = self.span_sizes;
        while sizes != 0 {
            let n = sizes.trailing_zeros() as u8;
            sizes &= sizes - 1;
            if let Some(c) = self.ste_spans.get(&(n, sid >> n)) {
                return Some(c.cfg);
            }
        }
        None
    }

    /// Entries of the configuration cache.
    pub fn len(&self) -> usize {
        self.ste.len() + self.ste_spans.len() + self.cd.len()
    }

    /// Whether caching an STE with fingerprint `fp` for the span of 2^`n` StreamIDs
    /// holding `sid` would make a lookup match two non-identical entries (IHI0070 3.20.2).
    pub fn span_conflicts(&self, sid: u32, n: u8, fp: u64) -> bool {
        let lo = u64::from(sid >> n) << n;
        let hi = lo + (1u64 << n);
        let inside = |s: u64| s >= lo && s < hi;
        self.ste
            .iter()
            .any(|(s, c)| inside(u64::from(*s)) && c.fp != fp)
            || self.ste_spans.iter().any(|(&(m, b), c)| {
                let (l, h) = (u64::from(b) << m, (u64::from(b) + 1) << m);
                l < hi && lo < h && c.fp != fp
            })
    }

    /// Drops every cached STE (own or span) of a StreamID `sel` selects, and the CDs
    /// cached through them. A span goes when any of its StreamIDs is selected.
    pub fn drop_stes(&mut self, sel: impl Fn(u32) -> bool) {
        self.ste.retain(|sid, _| !sel(*sid));
        self.ste_spans.retain(|&(n, b), _| {
            let lo = u64::from(b) << n;
            !(lo..lo + (1u64 << n)).any(|s| sel(s as u32))
        });
        self.span_sizes = self.ste_spans.keys().fold(0, |m, &(n, _)| m | (1 << n));
        self.cd.retain(|k, _| !sel(k.0));
    }
}

/// A statistics counter sharded per thread: each of the first 16 threads that count owns a
/// cache line and bumps it with a plain load and store (no read-modify-write, no line
/// bouncing between translating threads); later threads share lines with `fetch_add`.
/// `Relaxed`: statistics only, never used for synchronisation.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    shards: [crossbeam_utils::CachePadded<AtomicU64>; SHARDS],
}

const SHARDS: usize = 16;

#[inline]
fn shard() -> (usize, bool) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // A const-initialised thread-local (no lazy-initialisation state on each access):
    // the thread's ordinal + 1, 0 until the first count.
    thread_local! {
        static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    let mut n = SHARD.get();
    if n == 0 {
        n = NEXT.fetch_add(1, Ordering::Relaxed) as usize + 1;
        SHARD.set(n);
    }
    ((n - 1) % SHARDS, n - 1 < SHARDS)
}

impl Counter {
    #[inline]
    pub fn inc(&self) {
        let (i, owned) = shard();
        self.inc_at(i, owned);
    }
    #[inline]
    fn inc_at(&self, i: usize, owned: bool) {
        let a = &self.shards[i];
        if owned {
            a.store(a.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        } else {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub fn get(&self) -> u64 {
        self.shards.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
}

/// Event counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub translations: Counter,
    /// Translations served by the hit path (each also a configuration and TLB hit).
    pub fast_hits: Counter,
    pub tlb_hits: Counter,
    pub tlb_misses: Counter,
    pub cfg_hits: Counter,
    pub cfg_misses: Counter,
    pub walks_s1: Counter,
    pub walks_s2: Counter,
    /// `[stage 1 levels 0..4, stage 2 levels 0..4]`.
    pub desc_reads: [Counter; 8],
    pub ste_fetches: Counter,
    pub cd_fetches: Counter,
    pub vms_fetches: Counter,
    pub commands: Counter,
    pub command_errors: Counter,
    pub syncs: Counter,
    pub broadcasts: Counter,
    pub faults: Counter,
    pub aborts: Counter,
    pub stalls: Counter,
    pub events: Counter,
    pub events_lost: Counter,
    pub pri_requests: Counter,
    /// Interrupts signalled: `[GERROR, EVENTQ, PRIQ, CMD_SYNC MSI, SEV]`.
    pub irqs: [Counter; 5],
}

impl Counters {
    /// A translation served by the hit path: one counter, which [`Smmu::stats`] adds to
    /// translations, configuration-cache hits and main-TLB hits.
    #[inline]
    pub fn count_hit(&self) {
        self.fast_hits.inc();
    }
}

#[inline]
pub(crate) fn inc(c: &Counter) {
    c.inc();
}

/// A snapshot of the SMMU's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmmuStats {
    pub translations: u64,
    /// Main-TLB hits and misses (micro-TLB hits are counted separately).
    pub tlb_hits: u64,
    pub tlb_misses: u64,
    pub utlb_hits: u64,
    pub cfg_hits: u64,
    pub cfg_misses: u64,
    pub walks_s1: u64,
    pub walks_s2: u64,
    /// Descriptor reads per level: `[stage][level]`.
    pub desc_reads: [[u64; 4]; 2],
    pub ste_fetches: u64,
    pub cd_fetches: u64,
    /// VMS fetches (IHI0070 5.6), each with an STE fetch that enabled it.
    pub vms_fetches: u64,
    pub tlb_entries: u64,
    pub tlb_inserts: u64,
    pub tlb_evictions: u64,
    pub invalidations: u64,
    pub entries_removed: u64,
    pub commands: u64,
    pub command_errors: u64,
    pub syncs: u64,
    pub broadcasts: u64,
    pub faults: u64,
    pub aborts: u64,
    pub stalls: u64,
    pub events: u64,
    pub events_lost: u64,
    pub pri_requests: u64,
    pub irq_gerror: u64,
    pub irq_eventq: u64,
    pub irq_priq: u64,
    pub irq_sync: u64,
    pub sev: u64,
}

impl SmmuStats {
    /// `key=value` pairs, as `twinmmu qtest`'s `stats` prints them.
    pub fn pairs(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = vec![
            ("translations".into(), self.translations),
            ("utlb_hits".into(), self.utlb_hits),
            ("tlb_hits".into(), self.tlb_hits),
            ("tlb_misses".into(), self.tlb_misses),
            ("cfg_hits".into(), self.cfg_hits),
            ("cfg_misses".into(), self.cfg_misses),
            ("walks_s1".into(), self.walks_s1),
            ("walks_s2".into(), self.walks_s2),
        ];
        for (s, stage) in self.desc_reads.iter().enumerate() {
            for (l, n) in stage.iter().enumerate() {
                v.push((format!("reads_s{}_l{}", s + 1, l), *n));
            }
        }
        v.extend([
            ("ste_fetches".into(), self.ste_fetches),
            ("cd_fetches".into(), self.cd_fetches),
            ("vms_fetches".into(), self.vms_fetches),
            ("tlb_entries".into(), self.tlb_entries),
            ("tlb_inserts".into(), self.tlb_inserts),
            ("tlb_evictions".into(), self.tlb_evictions),
            ("invalidations".into(), self.invalidations),
            ("entries_removed".into(), self.entries_removed),
            ("commands".into(), self.commands),
            ("command_errors".into(), self.command_errors),
            ("syncs".into(), self.syncs),
            ("broadcasts".into(), self.broadcasts),
            ("faults".into(), self.faults),
            ("aborts".into(), self.aborts),
            ("stalls".into(), self.stalls),
            ("events".into(), self.events),
            ("events_lost".into(), self.events_lost),
            ("pri_requests".into(), self.pri_requests),
            ("irq_gerror".into(), self.irq_gerror),
            ("irq_eventq".into(), self.irq_eventq),
            ("irq_priq".into(), self.irq_priq),
            ("irq_sync".into(), self.irq_sync),
            ("sev".into(), self.sev),
        ]);
        v
    }
}

/// An ATS endpoint's answer to an invalidation request (for CMD_ATC_INV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtcResponse {
    Completed,
    /// The completion never arrives: the next CMD_SYNC raises CERROR_ATC_INV_SYNC.
    Timeout,
}

/// A device's ATC as the SMMU's ATS port sees it.
pub trait AtsEndpoint: Send + Sync {
    fn invalidate(&self, ssid: Option<u32>, addr: u64, size_log2_pages: u8) -> AtcResponse;
}

/// An Arm SMMUv3 (Non-secure programming interface).
pub struct Smmu {
    pub(crate) cfg: SmmuConfig,
    pub(crate) mem: Arc<dyn PhysMem>,
    pub(crate) regs: Mutex<Regs>,
    pub(crate) evtq: Mutex<OutQueue>,
    pub(crate) priq: Mutex<OutQueue>,
    pub(crate) irq: Mutex<IrqState>,
    pub(crate) gerror: AtomicU32,
    pub(crate) gerrorn: AtomicU32,
    pub(crate) tcu: RwLock<Tcu>,
    /// The main TLB's store (authority, CLOCK, invalidation indexes); writers and slow-path
    /// lookups lock it.
    pub(crate) tlb: Mutex<Tlb>,
    /// The main TLB's lock-free lookup array over the store's entries (written under the
    /// `tlb` lock).
    pub(crate) hit: crate::hitpath::HitTlb,
    /// Per-(SID, SSID) hit contexts (written under `ctx_fill`), valid for one `ctx_gen`.
    pub(crate) ctxs: crate::hitpath::CtxCache,
    /// Store ids of recently used TLB contexts (written under the `tlb` lock).
    pub(crate) ids: crate::hitpath::IdCache,
    pub(crate) ctx_fill: Mutex<()>,
    /// Bumped (Release) by every CFGI and translation-relevant register write, before the
    /// epoch: a hit context filled under an older generation is not used.
    pub(crate) ctx_gen: AtomicU64,
    /// Bumped (Release) after every change that may make a cached translation stale.
    pub(crate) epoch: AtomicU64,
    /// Bumped under the TLB write lock by every invalidation; a walk that started under an
    /// older generation does not insert its result.
    pub(crate) tlb_gen: AtomicU64,
    pub(crate) stalls: Mutex<crate::xlate::StallTable>,
    pub(crate) counters: Counters,
    pub(crate) port_counters: Mutex<Vec<std::sync::Weak<AtomicU64>>>,
    pub(crate) ats: RwLock<HashMap<u32, Arc<dyn AtsEndpoint>, FxBuildHasher>>,
    /// An ATC invalidation since the last successful CMD_SYNC timed out.
    pub(crate) atc_failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Smmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smmu")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// IIDR: implementer Arm (0x43B), product 0x483 in the style of an MMU-600.
const IIDR: u32 = 0x43B | (0x483 << 20);
/// PIDR0..4, CIDR0..3 (IHI0070 6.3.170; CoreSight component identification).
const PIDR: [(u64, u32); 9] = [
    (off::PIDR4, 0x04),
    (off::PIDR0, 0x83),
    (off::PIDR1, 0xB4),
    (off::PIDR2, 0x1B),
    (off::PIDR3, 0x00),
    (off::CIDR0, 0x0D),
    (off::CIDR1, 0xF0),
    (off::CIDR2, 0x05),
    (off::CIDR3, 0xB1),
];

/// Queue pointer arithmetic (IHI0070 3.5.1; smmu_kvm.md §4.6): `log2` index bits plus a
/// wrap bit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QPtr {
    pub log2: u32,
}

impl QPtr {
    pub fn mask(self) -> u32 {
        (1u32 << (self.log2 + 1)) - 1
    }
    pub fn idx(self, p: u32) -> u32 {
        p & ((1u32 << self.log2) - 1)
    }
    pub fn empty(self, prod: u32, cons: u32) -> bool {
        (prod & self.mask()) == (cons & self.mask())
    }
    pub fn full(self, prod: u32, cons: u32) -> bool {
        self.idx(prod) == self.idx(cons) && ((prod ^ cons) >> self.log2) & 1 == 1
    }
    /// Increments the index and wrap, preserving the register's flag bits above them.
    pub fn inc(self, p: u32) -> u32 {
        (p & !self.mask()) | (p.wrapping_add(1) & self.mask())
    }
}

impl Smmu {
    /// A new SMMU in its reset state, reaching `mem`.
    pub fn new(
        cfg: SmmuConfig,
        mem: Arc<dyn PhysMem>,
    ) -> Result<Arc<Self>, crate::config::ConfigError> {
        cfg.validate()?;
        // GBPA resets with SHCFG = 0b01 (use incoming) and ABORT = 0 (QEMU: 0x1000).
        let gbpa = Gbpa::new().with_shcfg(1);
        let live = Live {
            gbpa,
            ..Live::default()
        };
        Ok(Arc::new(Smmu {
            tlb: Mutex::new({
                let mut t = Tlb::new(cfg.tlb_capacity);
                t.set_removal_log(true);
                t
            }),
            hit: crate::hitpath::HitTlb::new(cfg.tlb_capacity),
            ctxs: crate::hitpath::CtxCache::new(cfg.cfg_cache_capacity),
            ids: crate::hitpath::IdCache::new(4096),
            ctx_fill: Mutex::new(()),
            ctx_gen: AtomicU64::new(0),
            cfg,
            mem,
            regs: Mutex::new(Regs {
                gbpa: gbpa.into_bits(),
                ..Regs::default()
            }),
            evtq: Mutex::new(OutQueue::default()),
            priq: Mutex::new(OutQueue::default()),
            irq: Mutex::new(IrqState::default()),
            gerror: AtomicU32::new(0),
            gerrorn: AtomicU32::new(0),
            tcu: RwLock::new(Tcu {
                live,
                ste: HashMap::default(),
                ste_spans: HashMap::default(),
                span_sizes: 0,
                cd: HashMap::default(),
                cfg_gen: 0,
            }),
            epoch: AtomicU64::new(1),
            tlb_gen: AtomicU64::new(0),
            stalls: Mutex::new(crate::xlate::StallTable::default()),
            counters: Counters::default(),
            port_counters: Mutex::new(Vec::new()),
            ats: RwLock::new(HashMap::default()),
            atc_failed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    pub fn config(&self) -> &SmmuConfig {
        &self.cfg
    }

    pub fn memory(&self) -> &Arc<dyn PhysMem> {
        &self.mem
    }

    /// Connects the ATC of the device behind `sid` (CMD_ATC_INV reaches it).
    pub fn attach_ats_endpoint(&self, sid: u32, ep: Arc<dyn AtsEndpoint>) {
        self.ats.write().insert(sid, ep);
    }

    /// A configuration change (CFGI, or a register translation depends on): hit contexts
    /// filled before it are stale. Callers then bump the epoch.
    pub(crate) fn config_changed(&self) {
        self.ctx_gen.fetch_add(1, Ordering::Release);
    }

    /// Marks every cached translation possibly stale for the micro-TLBs.
    pub(crate) fn bump_epoch(&self) {
        crate::port::publish_epoch(&self.epoch);
    }

    // ---------------------------------------------------------------- MMIO

    /// Reads a register: `size` is 4 or 8, `offset` from the base of page 0.
    pub fn mmio_read(&self, offset: u64, size: u8) -> Result<u64, MmioError> {
        check_access(offset, size)?;
        if size == 8 {
            if is_reg64(offset) {
                return Ok(self.read64(offset));
            }
            let lo = u64::from(self.read32(offset));
            let hi = u64::from(self.read32(offset + 4));
            return Ok(lo | (hi << 32));
        }
        if let Some(r64) = reg64_of(offset) {
            let v = self.read64(r64);
            return Ok(if offset == r64 {
                v & 0xffff_ffff
            } else {
                v >> 32
            });
        }
        Ok(u64::from(self.read32(offset)))
    }

    /// Writes a register. Side effects (command consumption on CMDQ_PROD or GERRORN,
    /// acknowledgement of CR0 and IRQ_CTRL) are complete when this returns.
    pub fn mmio_write(&self, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        check_access(offset, size)?;
        if size == 8 {
            if is_reg64(offset) {
                self.write64(offset, value);
            } else {
                self.write32(offset, value as u32);
                self.write32(offset + 4, (value >> 32) as u32);
            }
            return Ok(());
        }
        if let Some(r64) = reg64_of(offset) {
            // A 32-bit half of a 64-bit register: merge with the other half.
            let old = self.read64(r64);
            let v = if offset == r64 {
                (old & !0xffff_ffff) | (value & 0xffff_ffff)
            } else {
                (old & 0xffff_ffff) | (value << 32)
            };
            self.write64(r64, v);
            return Ok(());
        }
        self.write32(offset, value as u32);
        Ok(())
    }

    fn read32(&self, offset: u64) -> u32 {
        let o = canonical(offset);
        match o {
            off::IDR0 => self.cfg.idr0().into_bits(),
            off::IDR1 => self.cfg.idr1().into_bits(),
            off::IDR2 | off::IDR4 => 0,
            off::IDR3 => self.cfg.idr3().into_bits(),
            off::IDR5 => self.cfg.idr5().into_bits(),
            off::IIDR => IIDR,
            off::AIDR => u32::from(self.cfg.arch_minor & 0xf),
            // CR0ACK and IRQ_CTRLACK follow at once: the model completes updates before
            // the write returns (IHI0070 6.3.10).
            off::CR0 | off::CR0ACK => self.regs.lock().cr0,
            off::CR1 => self.regs.lock().cr1,
            off::CR2 => self.regs.lock().cr2,
            off::STATUSR => 0,
            off::GBPA => self.regs.lock().gbpa,
            off::AGBPA => 0,
            // MPAM registers: RES0 without IDR3.MPAM (IHI0070 6.3.41–43).
            off::MPAMIDR => self.cfg.mpamidr(),
            off::GMPAM if self.cfg.mpam => self.regs.lock().gmpam,
            off::GBPMPAM if self.cfg.mpam => self.regs.lock().gbpmpam,
            off::IRQ_CTRL | off::IRQ_CTRLACK => self.irq.lock().irq_ctrl,
            off::GERROR => self.gerror.load(Ordering::Acquire),
            off::GERRORN => self.gerrorn.load(Ordering::Acquire),
            off::GERROR_IRQ_CFG1 => self.irq.lock().cfg1[0],
            off::GERROR_IRQ_CFG2 => self.irq.lock().cfg2[0],
            off::STRTAB_BASE_CFG => self.regs.lock().strtab_base_cfg,
            off::CMDQ_PROD => self.regs.lock().cmdq_prod,
            off::CMDQ_CONS => self.regs.lock().cmdq_cons,
            off::EVENTQ_PROD => self.evtq.lock().prod,
            off::EVENTQ_CONS => self.evtq.lock().cons,
            off::EVENTQ_IRQ_CFG1 => self.irq.lock().cfg1[1],
            off::EVENTQ_IRQ_CFG2 => self.irq.lock().cfg2[1],
            off::PRIQ_PROD => self.priq.lock().prod,
            off::PRIQ_CONS => self.priq.lock().cons,
            off::PRIQ_IRQ_CFG1 => self.irq.lock().cfg1[2],
            off::PRIQ_IRQ_CFG2 => self.irq.lock().cfg2[2],
            other => PIDR
                .iter()
                .find(|(o, _)| *o == other)
                .map(|(_, v)| *v)
                // Reserved and unimplemented locations read as zero.
                .unwrap_or(0),
        }
    }

    fn read64(&self, offset: u64) -> u64 {
        match canonical(offset) {
            off::GERROR_IRQ_CFG0 => self.irq.lock().cfg0[0],
            off::STRTAB_BASE => self.regs.lock().strtab_base,
            off::CMDQ_BASE => self.regs.lock().cmdq_base,
            off::EVENTQ_BASE => self.evtq.lock().base,
            off::EVENTQ_IRQ_CFG0 => self.irq.lock().cfg0[1],
            off::PRIQ_BASE => self.priq.lock().base,
            off::PRIQ_IRQ_CFG0 => self.irq.lock().cfg0[2],
            _ => 0,
        }
    }

    fn write64(&self, offset: u64, v: u64) {
        // IRQ_CFG0: ADDR[51:2]; other bits RES0.
        let cfg0 = IrqCfg0::new()
            .with_addr(IrqCfg0::from_bits(v).addr())
            .into_bits();
        match canonical(offset) {
            off::GERROR_IRQ_CFG0 => self.irq.lock().cfg0[0] = cfg0,
            off::EVENTQ_IRQ_CFG0 => self.irq.lock().cfg0[1] = cfg0,
            off::PRIQ_IRQ_CFG0 => self.irq.lock().cfg0[2] = cfg0,
            off::STRTAB_BASE => {
                let mut r = self.regs.lock();
                // STRTAB_BASE is writable only while SMMUEN = 0 (IHI0070 6.3.24).
                if !Cr0::from_bits(r.cr0).smmuen() {
                    let b = StrtabBase::from_bits(v);
                    r.strtab_base = StrtabBase::new()
                        .with_addr(b.addr())
                        .with_ra(b.ra())
                        .into_bits();
                    self.refresh_live(&r);
                }
            }
            off::CMDQ_BASE => {
                let mut r = self.regs.lock();
                if !Cr0::from_bits(r.cr0).cmdqen() {
                    r.cmdq_base = mask_qbase(v);
                }
            }
            off::EVENTQ_BASE => {
                let mut q = self.evtq.lock();
                if !q.enabled {
                    q.base = mask_qbase(v);
                }
            }
            off::PRIQ_BASE => {
                let mut q = self.priq.lock();
                if !q.enabled {
                    q.base = mask_qbase(v);
                }
            }
            _ => {}
        }
    }

    fn write32(&self, offset: u64, v: u32) {
        match canonical(offset) {
            off::CR0 => self.write_cr0(v),
            off::CR1 => self.regs.lock().cr1 = v & 0xfff,
            off::CR2 => {
                let mut r = self.regs.lock();
                let old = r.cr2;
                r.cr2 = v & 0x7;
                // E2H needs IDR0.HYP.
                if !self.cfg.hyp {
                    r.cr2 &= !1;
                }
                if (old ^ r.cr2) & 1 != 0 {
                    // CDs of EL2 streams decode differently under E2H (IHI0070 3.17.5 lets
                    // a configuration cache hold E2H; this one drops what depends on it).
                    let mut t = self.tcu.write();
                    t.cd.clear();
                    t.cfg_gen += 1;
                }
                self.refresh_live(&r);
            }
            off::GBPA => {
                // A write takes effect only with UPDATE = 1; the update completes at once and
                // UPDATE reads as 0 again (IHI0070 6.3.14).
                let g = Gbpa::from_bits(v);
                if g.update() {
                    let mut r = self.regs.lock();
                    r.gbpa = g.with_update(false).into_bits() & 0x001F_3F1F;
                    self.refresh_live(&r);
                }
            }
            // Update protocol as GBPA's: only a write with Update = 1 takes effect; it
            // completes at once (IHI0070 6.3.42, 6.3.43). PARTID/PMG bits above the
            // implemented widths are RES0.
            off::GMPAM | off::GBPMPAM if self.cfg.mpam && v & (1 << 31) != 0 => {
                let width = |max: u32| (1u32 << (32 - max.leading_zeros())) - 1;
                let keep = width(u32::from(self.cfg.mpam_partid_max))
                    | (width(u32::from(self.cfg.mpam_pmg_max)) << 16);
                let mut r = self.regs.lock();
                if canonical(offset) == off::GMPAM {
                    r.gmpam = v & keep;
                } else {
                    r.gbpmpam = v & keep;
                }
            }
            off::IRQ_CTRL => self.irq.lock().irq_ctrl = v & 0x7,
            off::GERRORN => {
                self.gerrorn.store(v & GERROR_MASK, Ordering::Release);
                // Acknowledging CMDQ_ERR restarts command processing at CONS (IHI0070 7.1).
                {
                    let mut r = self.regs.lock();
                    self.process_cmdq(&mut r);
                }
                // Acknowledging EVENTQ_ABT_ERR makes the event queue writable again.
                self.retry_unrecorded_stalls();
            }
            off::GERROR_IRQ_CFG1 => self.irq.lock().cfg1[0] = v,
            off::GERROR_IRQ_CFG2 => self.irq.lock().cfg2[0] = v & 0x3f,
            off::STRTAB_BASE_CFG => {
                let mut r = self.regs.lock();
                if !Cr0::from_bits(r.cr0).smmuen() {
                    let c = StrtabBaseCfg::from_bits(v);
                    r.strtab_base_cfg = StrtabBaseCfg::new()
                        .with_log2size(c.log2size())
                        .with_split(c.split())
                        .with_fmt(c.fmt())
                        .into_bits();
                    self.refresh_live(&r);
                }
            }
            off::CMDQ_PROD => {
                let mut r = self.regs.lock();
                let log2 = self.cmdq_log2(&r);
                r.cmdq_prod = v & QPtr { log2 }.mask();
                self.process_cmdq(&mut r);
            }
            off::CMDQ_CONS => {
                let mut r = self.regs.lock();
                // Writable only while CMDQEN = 0 (IHI0070 6.3.28).
                if !Cr0::from_bits(r.cr0).cmdqen() {
                    let log2 = self.cmdq_log2(&r);
                    r.cmdq_cons = (v & QPtr { log2 }.mask()) | (v & (0x7f << 24));
                }
            }
            off::EVENTQ_PROD => {
                // SMMU-owned; software may write it only while the queue is disabled.
                let mut q = self.evtq.lock();
                if !q.enabled {
                    let log2 = qlog2(q.base, self.cfg.eventqs);
                    q.prod = (v & QPtr { log2 }.mask()) | (v & (1 << 31));
                }
            }
            off::EVENTQ_CONS => {
                {
                    let mut q = self.evtq.lock();
                    let log2 = qlog2(q.base, self.cfg.eventqs);
                    q.cons = (v & QPtr { log2 }.mask()) | (v & (1 << 31));
                }
                // Space freed: stalls waiting for a record slot retry (IHI0070 7.2.1).
                self.retry_unrecorded_stalls();
            }
            off::EVENTQ_IRQ_CFG1 => self.irq.lock().cfg1[1] = v,
            off::EVENTQ_IRQ_CFG2 => self.irq.lock().cfg2[1] = v & 0x3f,
            off::PRIQ_PROD => {
                let mut q = self.priq.lock();
                if !q.enabled {
                    let log2 = qlog2(q.base, self.cfg.priqs);
                    q.prod = (v & QPtr { log2 }.mask()) | (v & (1 << 31));
                }
            }
            off::PRIQ_CONS => {
                let mut q = self.priq.lock();
                let log2 = qlog2(q.base, self.cfg.priqs);
                q.cons = (v & QPtr { log2 }.mask()) | (v & (1 << 31));
            }
            off::PRIQ_IRQ_CFG1 => self.irq.lock().cfg1[2] = v,
            off::PRIQ_IRQ_CFG2 => self.irq.lock().cfg2[2] = v & 0x3f,
            // IDRs, ACK registers, GERROR, STATUSR and reserved locations: writes ignored.
            _ => {}
        }
    }

    fn write_cr0(&self, v: u32) {
        self.write_cr0_locked(v);
        // EVENTQEN may have made the event queue writable (IHI0070 7.2.1).
        self.retry_unrecorded_stalls();
    }

    fn write_cr0_locked(&self, v: u32) {
        let mut r = self.regs.lock();
        let mut new = Cr0::from_bits(v & CR0_MASK);
        if !self.cfg.pri {
            new.set_priqen(false);
        }
        if !self.cfg.ats {
            new.set_atschk(false);
        }
        // VMW needs IDR0.VMW, which this model does not implement.
        new.set_vmw(0);
        let old = Cr0::from_bits(r.cr0);
        r.cr0 = new.into_bits();
        self.evtq.lock().enabled = new.eventqen();
        self.priq.lock().enabled = new.priqen();
        if old.smmuen() && !new.smmuen() {
            // SMMUEN 1 → 0 terminates every stalled transaction (IHI0070 6.3.9.6).
            self.terminate_all_stalls();
        }
        self.refresh_live(&r);
        if new.cmdqen() && !old.cmdqen() {
            self.process_cmdq(&mut r);
        }
    }

    /// Copies the translation-relevant registers into the `tcu` snapshot and invalidates
    /// every micro-TLB (the registers decide bypass, abort and the stream table).
    pub(crate) fn refresh_live(&self, r: &Regs) {
        {
            let mut t = self.tcu.write();
            t.live = Live {
                cr0: Cr0::from_bits(r.cr0),
                cr2: Cr2::from_bits(r.cr2),
                gbpa: Gbpa::from_bits(r.gbpa),
                strtab_base: r.strtab_base,
                strtab_cfg: StrtabBaseCfg::from_bits(r.strtab_base_cfg),
            };
        }
        self.config_changed();
        self.bump_epoch();
    }

    pub(crate) fn cmdq_log2(&self, r: &Regs) -> u32 {
        qlog2(r.cmdq_base, self.cfg.cmdqs)
    }

    // ---------------------------------------------------------------- GERROR and IRQs

    /// Activates a global error: GERROR bit N is toggled so it differs from GERRORN
    /// (IHI0070 7.5); a no-op if that error is already active.
    pub(crate) fn raise_gerror(&self, bit: u32) {
        if self.gerror_active(bit) {
            return;
        }
        self.gerror.fetch_xor(bit, Ordering::AcqRel);
        let irqen = IrqCtrl::from_bits(self.irq.lock().irq_ctrl).gerror_irqen();
        if irqen {
            self.signal_irq(IrqSource::Gerror);
        }
    }

    pub(crate) fn gerror_active(&self, bit: u32) -> bool {
        (self.gerror.load(Ordering::Acquire) ^ self.gerrorn.load(Ordering::Acquire)) & bit != 0
    }

    /// Signals an interrupt: an MSI write of CFG1 to CFG0 when MSIs are implemented and
    /// CFG0 is non-zero, otherwise the wired line (counted).
    pub(crate) fn signal_irq(&self, src: IrqSource) {
        let (addr, data) = {
            let irq = self.irq.lock();
            let i = src as usize;
            (irq.cfg0[i], irq.cfg1[i])
        };
        inc(&self.counters.irqs[src as usize]);
        if self.cfg.msi && addr != 0 && self.mem.write_u32(addr, data).is_err() {
            let bit = match src {
                IrqSource::Gerror => Gerror::new().with_msi_gerror_abt_err(true),
                IrqSource::Eventq => Gerror::new().with_msi_eventq_abt_err(true),
                IrqSource::Priq => Gerror::new().with_msi_priq_abt_err(true),
            }
            .into_bits();
            // An aborted GERROR MSI does not signal again (no loop).
            if src == IrqSource::Gerror {
                if !self.gerror_active(bit) {
                    self.gerror.fetch_xor(bit, Ordering::AcqRel);
                }
            } else {
                self.raise_gerror(bit);
            }
        }
    }

    // ---------------------------------------------------------------- event queue

    /// Writes an event record if the event queue is writable (IHI0070 7.2.1); on a full
    /// queue, the record is lost and EVENTQ_PROD.OVFLG toggled (7.4). Returns whether the
    /// record was written.
    pub(crate) fn record_event(&self, e: &Event) -> bool {
        let abt = Gerror::new().with_eventq_abt_err(true).into_bits();
        let Some(was_empty) = self.push_out(&self.evtq, self.cfg.eventqs, &e.encode(), abt) else {
            inc(&self.counters.events_lost);
            return false;
        };
        inc(&self.counters.events);
        if was_empty && IrqCtrl::from_bits(self.irq.lock().irq_ctrl).eventq_irqen() {
            self.signal_irq(IrqSource::Eventq);
        }
        true
    }

    /// Writes `words` as the entry at PROD of an SMMU-written queue (`max`: its IDR1 size
    /// limit; the entry size is the words' size) if the queue is writable: enabled and
    /// without its GERROR `abt` error active. A full queue toggles PROD.OVFLG to differ
    /// from CONS.OVACKFLG, unless it already does (IHI0070 7.4); an abort while writing
    /// raises `abt` and PROD does not advance (7.2.2). Returns whether the queue was empty
    /// before a written entry, `None` if nothing was written.
    fn push_out(&self, q: &Mutex<OutQueue>, max: u8, words: &[u64], abt: u32) -> Option<bool> {
        let mut q = q.lock();
        if !q.enabled || self.gerror_active(abt) {
            return None;
        }
        let qp = QPtr {
            log2: qlog2(q.base, max),
        };
        if qp.full(q.prod, q.cons) {
            if (q.prod ^ q.cons) & (1 << 31) == 0 {
                q.prod ^= 1 << 31;
            }
            return None;
        }
        let was_empty = qp.empty(q.prod, q.cons);
        let size = 8 * words.len() as u64;
        let addr = (QueueBase::from_bits(q.base).addr() << 5) + u64::from(qp.idx(q.prod)) * size;
        for (i, w) in words.iter().enumerate() {
            if self.mem.write_u64(addr + 8 * i as u64, *w).is_err() {
                drop(q);
                self.raise_gerror(abt);
                return None;
            }
        }
        q.prod = qp.inc(q.prod);
        Some(was_empty)
    }

    /// Writes the record of a stalling fault if the queue is writable. A full queue does
    /// not lose it (no overflow: the transaction waits, IHI0070 7.2.1); an abort while
    /// writing does (7.2.2). Returns whether the record was written.
    pub(crate) fn record_stall_event(&self, e: &Event) -> bool {
        if !self.eventq_writable() {
            return false;
        }
        self.record_event(e)
    }

    /// Whether a record could be written now (stall decisions need it).
    pub(crate) fn eventq_writable(&self) -> bool {
        let q = self.evtq.lock();
        let qp = QPtr {
            log2: qlog2(q.base, self.cfg.eventqs),
        };
        q.enabled
            && !qp.full(q.prod, q.cons)
            && !self.gerror_active(Gerror::new().with_eventq_abt_err(true).into_bits())
    }

    // ---------------------------------------------------------------- PRI queue

    /// A PCIe page request from the endpoint behind `sid` (IHI0070 chapter 8): written to
    /// the PRI queue when IDR0.PRI and CR0.PRIQEN; on overflow PRIQ_PROD.OVFLG toggles.
    /// Returns whether the request was queued.
    #[allow(clippy::too_many_arguments)]
    pub fn page_request(
        &self,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        prgindex: u16,
        last: bool,
        read: bool,
        write: bool,
        exec: bool,
        privileged: bool,
    ) -> bool {
        if !self.cfg.pri {
            return false;
        }
        // PRI queue entry (Linux arm-smmu-v3.h PRIQ_0/1): SID[31:0], SSID[51:32], PRIV 58,
        // EXEC 59, READ 60, WRITE 61, LAST 62, SSV 63; PRGIndex[8:0], Addr[63:12].
        let w0 = u64::from(sid)
            | (u64::from(ssid.unwrap_or(0) & 0xf_ffff) << 32)
            | (u64::from(privileged) << 58)
            | (u64::from(exec) << 59)
            | (u64::from(read) << 60)
            | (u64::from(write) << 61)
            | (u64::from(last) << 62)
            | (u64::from(ssid.is_some()) << 63);
        let w1 = u64::from(prgindex & 0x1ff) | (addr & !0xfff);
        let abt = Gerror::new().with_priq_abt_err(true).into_bits();
        let Some(was_empty) = self.push_out(&self.priq, self.cfg.priqs, &[w0, w1], abt) else {
            return false;
        };
        inc(&self.counters.pri_requests);
        if was_empty && IrqCtrl::from_bits(self.irq.lock().irq_ctrl).priq_irqen() {
            self.signal_irq(IrqSource::Priq);
        }
        true
    }

    // ---------------------------------------------------------------- statistics

    pub(crate) fn register_port_counter(&self, c: &Arc<AtomicU64>) {
        let mut v = self.port_counters.lock();
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(c));
    }

    pub fn stats(&self) -> SmmuStats {
        let c = &self.counters;
        let g = |a: &Counter| a.get();
        let (tlb_entries, tc) = {
            let t = self.tlb.lock();
            (t.len() as u64, t.counters())
        };
        let utlb_hits = self
            .port_counters
            .lock()
            .iter()
            .filter_map(|w| w.upgrade())
            .map(|a| a.load(Ordering::Relaxed))
            .sum();
        let mut desc_reads = [[0u64; 4]; 2];
        for (i, r) in c.desc_reads.iter().enumerate() {
            desc_reads[i / 4][i % 4] = g(r);
        }
        SmmuStats {
            translations: g(&c.translations) + g(&c.fast_hits),
            tlb_hits: g(&c.tlb_hits) + g(&c.fast_hits),
            tlb_misses: g(&c.tlb_misses),
            utlb_hits,
            cfg_hits: g(&c.cfg_hits) + g(&c.fast_hits),
            cfg_misses: g(&c.cfg_misses),
            walks_s1: g(&c.walks_s1),
            walks_s2: g(&c.walks_s2),
            desc_reads,
            ste_fetches: g(&c.ste_fetches),
            cd_fetches: g(&c.cd_fetches),
            vms_fetches: g(&c.vms_fetches),
            tlb_entries,
            tlb_inserts: tc.inserts,
            tlb_evictions: tc.evictions,
            invalidations: tc.invalidations,
            entries_removed: tc.removed,
            commands: g(&c.commands),
            command_errors: g(&c.command_errors),
            syncs: g(&c.syncs),
            broadcasts: g(&c.broadcasts),
            faults: g(&c.faults),
            aborts: g(&c.aborts),
            stalls: g(&c.stalls),
            events: g(&c.events),
            events_lost: g(&c.events_lost),
            pri_requests: g(&c.pri_requests),
            irq_gerror: g(&c.irqs[0]),
            irq_eventq: g(&c.irqs[1]),
            irq_priq: g(&c.irqs[2]),
            irq_sync: g(&c.irqs[3]),
            sev: g(&c.irqs[4]),
        }
    }

    /// The VMS.PARTID_MAP the configuration cache holds for `sid` (fetched with its STE
    /// when the STE enables the VMS), for tests and tools: the model has no MPAM
    /// consumers, so the mapped PARTIDs are not otherwise observable.
    pub fn cached_partid_map(&self, sid: u32) -> Option<[u16; 32]> {
        self.tcu.read().partid_map(sid)
    }

    /// Every entry of the main TLB (tests and the oracle).
    pub fn tlb_entries(&self) -> Vec<crate::tlb::TlbEntry> {
        self.tlb.lock().entries()
    }
}

/// Queue size in log2 entries: LOG2SIZE capped to the IDR1 maximum.
pub(crate) fn qlog2(base: u64, max: u8) -> u32 {
    u32::from(QueueBase::from_bits(base).log2size().min(max))
}

fn mask_qbase(v: u64) -> u64 {
    let b = QueueBase::from_bits(v);
    QueueBase::new()
        .with_log2size(b.log2size())
        .with_addr(b.addr())
        .with_ra_wa(b.ra_wa())
        .into_bits()
}

/// Page-1 EVENTQ/PRIQ PROD and CONS live at page 1 + 0xA8..; like QEMU, page 1 is treated
/// as an alias of page 0 (CONSTRAINED UNPREDICTABLE in IHI0070 6.2, allowed).
fn canonical(offset: u64) -> u64 {
    offset & (PAGE1 - 1)
}

fn check_access(offset: u64, size: u8) -> Result<(), MmioError> {
    if size != 4 && size != 8 {
        return Err(MmioError::Size { size });
    }
    if !offset.is_multiple_of(u64::from(size)) {
        return Err(MmioError::Align { offset });
    }
    if offset >= MMIO_SIZE {
        return Err(MmioError::Range { offset });
    }
    Ok(())
}

fn is_reg64(offset: u64) -> bool {
    matches!(
        canonical(offset),
        off::GERROR_IRQ_CFG0
            | off::STRTAB_BASE
            | off::CMDQ_BASE
            | off::EVENTQ_BASE
            | off::EVENTQ_IRQ_CFG0
            | off::PRIQ_BASE
            | off::PRIQ_IRQ_CFG0
    )
}

fn reg64_of(offset: u64) -> Option<u64> {
    let o = offset & !7;
    is_reg64(o).then_some(o)
}
