//! A processing element (PE): its translation context and its TLB (DDI0487 D8;
//! smmu_kvm.md §4.10–§4.11).
//!
//! The TLB is the SMMU's ([`crate::tlb`]): entries tagged by translation regime, VMID and
//! ASID (or global), of three kinds — stage 1 (VA → PA with stage 2 off), stage 2 (IPA →
//! PA, from stage-2-only accesses and from the stage-2 walks of a nested translation) and
//! combined (VA → PA through both stages, the size of the smaller). What a PE runs is its
//! [`PeContext`]:
//! - a guest, at EL1&0, tagged with VTTBR_EL2.VMID;
//! - an nVHE host kernel, also at EL1&0, with VMID 0 and stage 2 off;
//! - an nVHE hypervisor at EL2 (no ASID, no VMID);
//! - a VHE host at EL2&0 (HCR_EL2.{E2H,TGE} = {1,1}): ASID-tagged, and its `TLBI …E1IS`
//!   act on EL2&0.
//!
//! A PE applies `TLBI` messages from the DVM interconnect ([`crate::Dvm`]) with the scopes
//! of [`Tlbi::scope`] for a PE ([`TlbiRecipient::pe`]: no ASET, EL2 forms by ASID on EL2&0
//! with HCR_EL2.E2H); [`Pe::tlbi_local`] applies one to this PE alone (the non-shareable
//! form). A walk that started before an invalidation does not insert its result after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use twinmmu_vmsa::{
    Access, AccessKind, Fault, FaultKind, Features, S1Controls, S1Perms, S2Perms, Stage,
    Stage1Config, Stage2Config, WalkError, check_s1, check_s2, walk_stage1, walk_stage2,
};

use crate::dvm::{Tlbi, TlbiOp, TlbiRecipient};
use crate::interconnect::{Completion, DvmError, Inbox, TlbiInsn};
use crate::mem::{PhysMem, WalkMem};
use crate::tlb::{Ctx, Kind, OutputStage2, Tlb, TlbEntry, World};

/// The translation regime a PE runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Regime {
    /// EL1&0: a guest (tagged with VTTBR_EL2.VMID), or an nVHE host kernel (VMID 0).
    El1,
    /// EL2 of an nVHE hypervisor: no ASID; entries tagged VMID 0.
    El2,
    /// EL2&0 of a VHE host (HCR_EL2.{E2H,TGE} = {1,1}): ASID-tagged, VMID 0.
    El2E2h,
}

impl Regime {
    /// The TLB world of entries made in this regime.
    pub fn world(self) -> World {
        match self {
            Regime::El1 => World::NsEl1,
            Regime::El2 => World::El2,
            Regime::El2E2h => World::El2E2h,
        }
    }
}

impl std::fmt::Display for Regime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Regime::El1 => "EL1&0",
            Regime::El2 => "EL2",
            Regime::El2E2h => "EL2&0",
        })
    }
}

/// A PE's implementation choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeConfig {
    /// TLB capacity in entries (bounded; CLOCK replacement, never flush-all).
    pub tlb_capacity: usize,
    /// HCR_EL2.E2H: the host kernel runs at EL2 (VHE); EL2 TLBI forms then act on EL2&0.
    pub vhe: bool,
    /// FEAT_TLBIRANGE: the range forms (`TLBI RVAE1IS`, `RIPAS2E1IS`, …) exist.
    pub tlbi_range: bool,
    /// Translation features (PA size, granules) stage-1 and stage-2 configurations for this
    /// PE are validated against.
    pub features: Features,
}

impl Default for PeConfig {
    /// A 2048-entry TLB, VHE, FEAT_TLBIRANGE, 48-bit PAs and every granule.
    fn default() -> Self {
        PeConfig {
            tlb_capacity: 2048,
            vhe: true,
            tlbi_range: true,
            features: Features::default(),
        }
    }
}

impl PeConfig {
    pub fn tlb_capacity(mut self, n: usize) -> Self {
        self.tlb_capacity = n.max(1);
        self
    }
    pub fn vhe(mut self, on: bool) -> Self {
        self.vhe = on;
        self
    }
    pub fn tlbi_range(mut self, on: bool) -> Self {
        self.tlbi_range = on;
        self
    }
    pub fn features(mut self, f: Features) -> Self {
        self.features = f;
        self
    }
}

/// What a PE runs: regime, VTTBR_EL2.VMID, the ASID and the translation tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeContext {
    pub regime: Regime,
    /// VTTBR_EL2.VMID: tags EL1&0 entries, and is the VMID of EL1 TLBIs.
    pub vmid: u16,
    /// The current ASID (TTBR0_ELx.ASID).
    pub asid: u16,
    /// Stage 1 of the regime (TTBRn/TCR); `None` = stage-1 MMU off (VA = IPA or PA).
    pub stage1: Option<Stage1Config>,
    /// HCR_EL2.VM: stage 2 applies to EL1&0.
    pub stage2_enabled: bool,
    /// VTTBR_EL2.BADDR and VTCR_EL2. With stage 2 enabled and no tables, every IPA is a
    /// stage-2 Translation fault.
    pub stage2: Option<Stage2Config>,
}

impl PeContext {
    /// The host: EL2&0 with VHE, else EL1&0 with VMID 0 and stage 2 off. No tables
    /// modelled (MMU off: addresses are physical).
    pub fn host(vhe: bool) -> Self {
        PeContext {
            regime: if vhe { Regime::El2E2h } else { Regime::El1 },
            vmid: 0,
            asid: 0,
            stage1: None,
            stage2_enabled: false,
            stage2: None,
        }
    }

    /// A guest at EL1&0 with VMID `vmid` and its stage 2; guest stage 1 off.
    pub fn guest(vmid: u16, stage2: Option<Stage2Config>) -> Self {
        PeContext {
            regime: Regime::El1,
            vmid,
            asid: 0,
            stage1: None,
            stage2_enabled: true,
            stage2,
        }
    }

    /// The same context with stage 1 `s1` (or off) and ASID `asid`.
    pub fn with_stage1(mut self, s1: Option<Stage1Config>, asid: u16) -> Self {
        self.stage1 = s1;
        self.asid = asid;
        self
    }

    fn stage2_applies(&self) -> bool {
        self.regime == Regime::El1 && self.stage2_enabled
    }
}

/// A successful PE translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeTranslation {
    pub pa: u64,
    /// Served by the TLB, with no walk.
    pub tlb_hit: bool,
    /// The kind of entry that translated it; `None` with every stage off.
    pub kind: Option<Kind>,
}

/// A translation fault, with the IPA for stage-2 faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{fault}{}", ipa.map(|a| format!(" (IPA {a:#x})")).unwrap_or_default())]
pub struct PeFault {
    pub fault: Fault,
    pub ipa: Option<u64>,
}

impl PeFault {
    fn s1(f: Fault) -> Self {
        PeFault {
            fault: f,
            ipa: None,
        }
    }
    fn s2(f: Fault, ipa: u64) -> Self {
        PeFault {
            fault: f,
            ipa: Some(ipa),
        }
    }
}

/// PE counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeStats {
    pub translations: u64,
    pub tlb_hits: u64,
    pub tlb_misses: u64,
    pub walks_s1: u64,
    pub walks_s2: u64,
    /// Walk results not inserted because an invalidation ran during the walk.
    pub inserts_dropped: u64,
    pub tlb_entries: u64,
    pub tlb_evictions: u64,
    /// DVM messages applied, and the entries they removed.
    pub dvm_applied: u64,
    pub dvm_removed: u64,
    /// Local (non-shareable) TLBIs, and the entries they removed.
    pub local_tlbis: u64,
    pub local_removed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    translations: AtomicU64,
    tlb_hits: AtomicU64,
    tlb_misses: AtomicU64,
    walks_s1: AtomicU64,
    walks_s2: AtomicU64,
    inserts_dropped: AtomicU64,
    local_tlbis: AtomicU64,
    local_removed: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds to a word only ever written under the TLB write lock.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Release);
}

/// A stage-2 lookup result.
#[derive(Debug, Clone, Copy)]
struct S2Hit {
    pa: u64,
    shift: u8,
    perms: S2Perms,
    level: u8,
}

/// Whether `op` may be executed at `regime` (DDI0487 C5.5: the `…E2` and stage-2/all-VMID
/// forms are EL2 instructions, UNDEFINED at EL1).
fn el1_allowed(op: TlbiOp) -> bool {
    use TlbiOp::*;
    matches!(
        op,
        Vmalle1is
            | Aside1is
            | Vae1is
            | Vale1is
            | Vaae1is
            | Vaale1is
            | Rvae1is
            | Rvale1is
            | Rvaae1is
            | Rvaale1is
    )
}

/// A processing element.
pub struct Pe {
    id: usize,
    cfg: PeConfig,
    mem: Arc<dyn PhysMem>,
    ctx: Mutex<PeContext>,
    tlb: RwLock<Tlb>,
    /// Bumped under the TLB write lock by every invalidation: a walk that started under an
    /// older value does not insert.
    tlb_gen: AtomicU64,
    pub(crate) inbox: Inbox,
    /// TLBIs this PE posted that its next DSB completes.
    pub(crate) outstanding: Mutex<Vec<Arc<Completion>>>,
    counters: Counters,
}

impl std::fmt::Debug for Pe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pe")
            .field("id", &self.id)
            .field("context", &*self.ctx.lock())
            .finish_non_exhaustive()
    }
}

impl Pe {
    /// A PE running the host context. A PE made here receives no broadcasts; those of a
    /// [`crate::Dvm`] do.
    pub fn new(id: usize, cfg: PeConfig, mem: Arc<dyn PhysMem>) -> Self {
        Pe {
            id,
            cfg,
            mem,
            ctx: Mutex::new(PeContext::host(cfg.vhe)),
            tlb: RwLock::new(Tlb::new(cfg.tlb_capacity)),
            tlb_gen: AtomicU64::new(0),
            inbox: Inbox::default(),
            outstanding: Mutex::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    pub fn id(&self) -> usize {
        self.id
    }

    pub fn config(&self) -> &PeConfig {
        &self.cfg
    }

    pub fn context(&self) -> PeContext {
        *self.ctx.lock()
    }

    /// Programs the context (VTTBR_EL2, TTBRn, TCR, HCR_EL2.VM, the regime). Entries of
    /// other contexts stay in the TLB, tagged with theirs.
    pub fn set_context(&self, ctx: PeContext) {
        *self.ctx.lock() = ctx;
    }

    /// The host context of this PE ([`PeContext::host`]).
    pub fn host_context(&self) -> PeContext {
        PeContext::host(self.cfg.vhe)
    }

    /// The DVM message `insn` becomes when this PE executes it now.
    pub(crate) fn tlbi_message(&self, insn: TlbiInsn) -> Result<Tlbi, DvmError> {
        use TlbiOp::*;
        let ctx = self.context();
        if insn.op.is_range() != insn.range.is_some() {
            return Err(DvmError::RangeOperand { op: insn.op });
        }
        if insn.op.is_range() && !self.cfg.tlbi_range {
            return Err(DvmError::Undefined {
                op: insn.op,
                regime: ctx.regime,
            });
        }
        if ctx.regime == Regime::El1 && !el1_allowed(insn.op) {
            return Err(DvmError::Undefined {
                op: insn.op,
                regime: ctx.regime,
            });
        }
        // With HCR_EL2.{E2H,TGE} = {1,1} the EL1 forms act on EL2&0 (DDI0487 D8.13):
        // by VA (one ASID or all), by ASID, and VMALLE1IS as every EL2&0 entry (ALLE2IS;
        // a VHE host has no EL2-only entries).
        let op = if ctx.regime == Regime::El2E2h {
            match insn.op {
                Vae1is => Vae2is,
                Vale1is => Vale2is,
                Rvae1is => Rvae2is,
                Rvale1is => Rvale2is,
                Vaae1is => Vaae2is,
                Vaale1is => Vaale2is,
                Rvaae1is => Rvaae2is,
                Rvaale1is => Rvaale2is,
                Aside1is => Aside2is,
                Vmalle1is => Alle2is,
                other => other,
            }
        } else {
            insn.op
        };
        let range = if op.is_range() { insn.range } else { None };
        Ok(Tlbi {
            op,
            vmid: ctx.vmid,
            asid: insn.asid,
            addr: insn.addr,
            range,
        })
    }

    /// Applies `t` to this PE's TLB alone — the non-shareable form of the same TLBI
    /// (`TLBI VMALLE1` for `Vmalle1is`, …), complete on return. Returns the entries removed.
    pub fn tlbi_local(&self, t: &Tlbi) -> usize {
        let scope = t.scope(TlbiRecipient::pe(self.cfg.vhe));
        let mut tlb = self.tlb.write();
        let n = tlb.invalidate(&scope);
        // Written only under the TLB write lock: a load and a store, no locked add.
        bump(&self.tlb_gen, 1);
        bump(&self.counters.local_tlbis, 1);
        bump(&self.counters.local_removed, n as u64);
        n
    }

    /// Applies every DVM message waiting in the inbox, in order, under the TLB write lock.
    pub(crate) fn drain(&self) {
        let mut tlb = self.tlb.write();
        let vhe = self.cfg.vhe;
        let applied = self.inbox.drain(|m| {
            let n = tlb.invalidate(&m.tlbi.scope(TlbiRecipient::pe(vhe)));
            m.done.pe_applied(n);
            (true, n)
        });
        if applied {
            bump(&self.tlb_gen, 1);
        }
    }

    /// Every TLB entry (tests and the oracle).
    pub fn tlb_entries(&self) -> Vec<TlbEntry> {
        self.tlb.read().entries()
    }

    pub fn tlb_len(&self) -> usize {
        self.tlb.read().len()
    }

    /// Inserts `e` as a walk would (tests and benchmarks that need a TLB in a given state).
    pub fn tlb_insert(&self, e: TlbEntry) {
        self.tlb.write().insert(e);
    }

    pub fn stats(&self) -> PeStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (tlb_entries, evictions) = {
            let t = self.tlb.read();
            (t.len() as u64, t.counters().evictions)
        };
        let (dvm, _) = self.inbox.stats();
        PeStats {
            translations: g(&c.translations),
            tlb_hits: g(&c.tlb_hits),
            tlb_misses: g(&c.tlb_misses),
            walks_s1: g(&c.walks_s1),
            walks_s2: g(&c.walks_s2),
            inserts_dropped: g(&c.inserts_dropped),
            tlb_entries,
            tlb_evictions: evictions,
            dvm_applied: dvm.received,
            dvm_removed: dvm.removed,
            local_tlbis: g(&c.local_tlbis),
            local_removed: g(&c.local_removed),
        }
    }

    fn insert(&self, e: TlbEntry, gen0: u64) {
        let mut t = self.tlb.write();
        // An invalidation since the walk started may have covered what it read.
        if self.tlb_gen.load(Ordering::Acquire) == gen0 {
            t.insert(e);
        } else {
            inc(&self.counters.inserts_dropped);
        }
    }

    /// Translates `va` for `access` in the current context, through the TLB: stage 1,
    /// stage 2 or both as the context enables them. Faults are not cached.
    pub fn translate(&self, va: u64, access: Access) -> Result<PeTranslation, PeFault> {
        inc(&self.counters.translations);
        let ctx = self.context();
        let s2 = ctx.stage2_applies().then_some(ctx.stage2);
        match (ctx.stage1, s2) {
            (None, None) => Ok(PeTranslation {
                pa: va,
                tlb_hit: false,
                kind: None,
            }),
            (None, Some(s2)) => {
                // Stage 1 off: the VA is the IPA.
                let (h, hit) = self.s2_lookup(ctx.vmid, s2.as_ref(), va)?;
                check_s2(h.perms, access).map_err(|_| {
                    PeFault::s2(
                        Fault::new(FaultKind::Permission, h.level, Stage::Stage2),
                        va,
                    )
                })?;
                Ok(PeTranslation {
                    pa: h.pa,
                    tlb_hit: hit,
                    kind: Some(Kind::S2),
                })
            }
            (Some(s1), s2) => self.s1_translate(&ctx, &s1, s2, va, access),
        }
    }

    /// The stage-2 entry for `ipa` of VMID `vmid`, from the TLB or a walk (inserted).
    /// Returns it with whether it was a hit. No permission check.
    fn s2_lookup(
        &self,
        vmid: u16,
        s2: Option<&Stage2Config>,
        ipa: u64,
    ) -> Result<(S2Hit, bool), PeFault> {
        let Some(s2) = s2 else {
            return Err(PeFault::s2(
                Fault::new(FaultKind::Translation, 0, Stage::Stage2),
                ipa,
            ));
        };
        let tag = Ctx::new(World::NsEl1, Kind::S2, vmid, None, false);
        if let Some(e) = self.tlb.read().lookup(tag, ipa) {
            inc(&self.counters.tlb_hits);
            let (perms, level, _) = e.perms.s2.unwrap_or((S2Perms::default(), 3, false));
            return Ok((
                S2Hit {
                    pa: e.output(ipa),
                    shift: e.shift,
                    perms,
                    level,
                },
                true,
            ));
        }
        inc(&self.counters.tlb_misses);
        inc(&self.counters.walks_s2);
        let gen0 = self.tlb_gen.load(Ordering::Acquire);
        let t = walk_stage2(s2, &WalkMem(&*self.mem), ipa).map_err(|f| PeFault::s2(f, ipa))?;
        let h = S2Hit {
            pa: t.output,
            shift: t.block_shift,
            perms: t.perms,
            level: t.level,
        };
        // The PE model does not track Device memory at stage 2.
        self.insert(TlbEntry::from_stage2(tag, &t, false), gen0);
        Ok((h, false))
    }

    fn s1_translate(
        &self,
        ctx: &PeContext,
        s1: &Stage1Config,
        s2: Option<Option<Stage2Config>>,
        va: u64,
        access: Access,
    ) -> Result<PeTranslation, PeFault> {
        // With TBI the top byte is ignored: entries are tagged with the canonical address
        // (as the SMMU's), so a TLBI by untagged VA finds them.
        let ttb = if (va >> 55) & 1 == 1 {
            twinmmu_vmsa::Ttb::Ttb1
        } else {
            twinmmu_vmsa::Ttb::Ttb0
        };
        let key_va = if s1.tbi(ttb) {
            (((va << 8) as i64) >> 8) as u64
        } else {
            va
        };
        let kind = if s2.is_some() { Kind::Nested } else { Kind::S1 };
        let world = ctx.regime.world();
        let (vmid, asid) = match ctx.regime {
            Regime::El1 => (ctx.vmid, Some(ctx.asid)),
            Regime::El2 => (0, None),
            Regime::El2E2h => (0, Some(ctx.asid)),
        };
        let tag = Ctx::new(world, kind, vmid, asid, false);
        let cached = self.tlb.read().lookup(tag, key_va);
        let (e, hit) = match cached {
            Some(e) => {
                inc(&self.counters.tlb_hits);
                (e, true)
            }
            None => {
                inc(&self.counters.tlb_misses);
                (
                    self.s1_walk(s1, s2, ctx.vmid, tag, (va, key_va), access)?,
                    false,
                )
            }
        };
        // Stage 1 permissions first, then stage 2 on the output IPA (DDI0487 fault
        // prioritisation; IHI0070 7.3.22 for the SMMU). A walk has checked stage 1
        // already, before translating the output IPA; a hit checks it here.
        if let Some((p, ctl, level)) = e.perms.s1
            && check_s1(p, access, ctl).is_err()
        {
            return Err(PeFault::s1(Fault::new(
                FaultKind::Permission,
                level,
                Stage::Stage1,
            )));
        }
        if let Some((p, level, _)) = e.perms.s2
            && check_s2(p, access).is_err()
        {
            let ipa = e.ipa_base | (key_va & (e.size() - 1));
            return Err(PeFault::s2(
                Fault::new(FaultKind::Permission, level, Stage::Stage2),
                ipa,
            ));
        }
        Ok(PeTranslation {
            pa: e.output(key_va),
            tlb_hit: hit,
            kind: Some(kind),
        })
    }

    /// Walks stage 1 (each table address through stage 2 when nested), checks the stage-1
    /// permissions for `access` when nested, then stage 2 of the output IPA; inserts the
    /// entry unless an invalidation ran meanwhile.
    fn s1_walk(
        &self,
        s1: &Stage1Config,
        s2: Option<Option<Stage2Config>>,
        vmid: u16,
        tag: Ctx,
        (va, key_va): (u64, u64),
        access: Access,
    ) -> Result<TlbEntry, PeFault> {
        inc(&self.counters.walks_s1);
        let gen0 = self.tlb_gen.load(Ordering::Acquire);
        let mem = WalkMem(&*self.mem);
        let t = match &s2 {
            None => walk_stage1(s1, &mem, &mut twinmmu_vmsa::Direct, va).map_err(|e| match e {
                WalkError::Fault(f) => PeFault::s1(f),
                WalkError::TableFetch { error, .. } => match error {},
            })?,
            Some(s2c) => {
                let mut hook = |ipa: u64, _level: u8| -> Result<u64, PeFault> {
                    // Each stage-1 table address is an IPA translated by stage 2; the walk
                    // reads it (a stage-2 fault here is on a stage-1 walk, S1PTW).
                    let (h, _) = self.s2_lookup(vmid, s2c.as_ref(), ipa)?;
                    check_s2(h.perms, Access::new(AccessKind::Read, true)).map_err(|_| {
                        PeFault::s2(
                            Fault::new(FaultKind::Permission, h.level, Stage::Stage2),
                            ipa,
                        )
                    })?;
                    Ok(h.pa)
                };
                walk_stage1(s1, &mem, &mut hook, va).map_err(|e| match e {
                    WalkError::Fault(f) => PeFault::s1(f),
                    WalkError::TableFetch { error, .. } => error,
                })?
            }
        };
        let perms: S1Perms = t.perms;
        let ctl: S1Controls = s1.controls();
        let s2_out = match &s2 {
            None => None,
            Some(s2c) => {
                // A stage-1 Permission fault is found on the final stage-1 descriptor,
                // before the output IPA is translated by stage 2, so it wins over any
                // stage-2 fault of that IPA (DDI0487 D8; IHI0070 7.3.22 likewise).
                if check_s1(perms, access, ctl).is_err() {
                    return Err(PeFault::s1(Fault::new(
                        FaultKind::Permission,
                        t.level,
                        Stage::Stage1,
                    )));
                }
                let (h, _) = self.s2_lookup(vmid, s2c.as_ref(), t.output)?;
                Some(OutputStage2 {
                    pa: h.pa,
                    shift: h.shift,
                    perms: h.perms,
                    level: h.level,
                    device: false,
                })
            }
        };
        // Global (nG = 0) entries are tagged with no ASID; combined ones are the size of
        // the smaller stage (as the SMMU's).
        let e = TlbEntry::from_stage1(tag, key_va, &t, (perms, ctl), s2_out);
        self.insert(e, gen0);
        Ok(e)
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Pe>();
}
