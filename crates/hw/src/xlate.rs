//! Translation of one transaction (IHI0070 3.3, chapter 15; smmu_kvm.md §4.10): GBPA when
//! SMMUEN = 0, the stream table (linear and 2-level), STE checks, substream selection
//! (S1DSS), CD fetch (through stage 2 when nested, CLASS = CD), the stage-1 walk with every
//! table address through stage 2 when nested (CLASS = TT, S2PTW), stage 2 on the output
//! (CLASS = IN), permissions S1 ∩ S2 with the STE PRIV/INST overrides, and the fault rules:
//! recording (CD.R, STE.S2R), stall (CD.S, STE.S2S, S1STALLD, STALL_MODEL) and termination
//! (abort, or RAZ/WI per CD.A and TERM_MODEL).
//!
//! Stalls. A transaction that stalls returns [`Outcome::Stalled`] with its STAG at once
//! (the device port is not blocked) and is parked in the stall table together with what
//! remained to do (translate only, read N bytes, write these bytes). CMD_RESUME with retry
//! re-runs it from the start, as though it had just arrived (IHI0070 4.7.1), and stores the
//! result; CMD_RESUME with terminate, CMD_STALL_TERM and SMMUEN → 0 store a termination.
//! The device collects the result with [`Smmu::stall_result`]. A fault that stalls while
//! the event queue cannot take its record (disabled, full, or after an abort) stays stalled
//! without a record (a full queue does not overflow for it) and is retried as though it had
//! just arrived when the queue becomes writable again: a CONS write, EVENTQEN set, or
//! EVENTQ_ABT_ERR acknowledged (IHI0070 3.12.2, 7.2.1). At most IDR5.STALL_MAX transactions
//! stall at once; beyond that a stalling fault terminates.

use std::sync::atomic::Ordering;

use hashbrown::HashMap;
use rustc_hash::FxBuildHasher;
use twinmmu_vmsa::{
    Access, AccessKind, FaultKind, S1Perms, S2Perms, Stage, WalkError, check_s1, check_s2,
    walk_stage1, walk_stage2_with,
};

use crate::cd::{ContextDescriptor, L1Cd, decode_cd};
use crate::config::StallModel;
use crate::event::{Event, EventType, FaultClass};
use crate::hitpath::{HitCtx, tbi_key};
use crate::mem::WalkMem;
use crate::regs::StrtabBase;
use crate::smmu::{Live, Smmu, inc};
use crate::ste::{
    AttrOverride, L1Std, S1Ctx, S1Dss, S2Config, Ste, StreamConfig, StreamWorld, decode_ste,
};
use crate::tlb::{Ctx, EntryPerms, Kind, OutputStage2, Tlb, TlbEntry, World};

/// One transaction at the SMMU's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transaction {
    pub sid: u32,
    pub ssid: Option<u32>,
    pub addr: u64,
    pub kind: AccessKind,
    /// Incoming PnU (before the STE override).
    pub privileged: bool,
}

impl Transaction {
    pub fn new(sid: u32, ssid: Option<u32>, addr: u64, kind: AccessKind, privileged: bool) -> Self {
        Transaction {
            sid,
            ssid,
            addr,
            kind,
            privileged,
        }
    }
}

/// How a terminated transaction completes towards the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// An abort (bus error) is returned.
    Abort,
    /// Reads return zero, writes are ignored, and the device sees success.
    RazWi,
}

/// The result of presenting one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Translated {
        pa: u64,
    },
    /// Terminated because of a fault or configuration error `event` (recorded in the event
    /// queue or not).
    Fault {
        event: EventType,
        recorded: bool,
        termination: Termination,
    },
    /// Terminated with no event: GBPA.ABORT, or STE.Config = abort.
    Abort,
    /// Stalled with a recorded event carrying `stag`.
    Stalled {
        stag: u16,
        event: EventType,
    },
}

/// Why a DMA did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    #[error("{} fault{}", event.name(), if *recorded { " (recorded)" } else { "" })]
    Fault {
        event: EventType,
        recorded: bool,
        termination: Termination,
    },
    #[error("aborted by the SMMU configuration")]
    Abort,
    #[error("stalled (STAG {stag}) after {done} bytes")]
    Stalled {
        stag: u16,
        event: EventType,
        done: usize,
    },
    #[error("external abort from memory at {pa:#x}")]
    BusError { pa: u64 },
}

impl DmaError {
    /// What a DMA reports for a transaction that did not translate (`o`, from
    /// [`Smmu::fail`]) after `done` bytes.
    pub(crate) fn of(o: Outcome, done: usize) -> DmaError {
        match o {
            Outcome::Fault {
                event,
                recorded,
                termination,
            } => DmaError::Fault {
                event,
                recorded,
                termination,
            },
            Outcome::Stalled { stag, event } => DmaError::Stalled { stag, event, done },
            // The fault rules never translate.
            Outcome::Abort | Outcome::Translated { .. } => DmaError::Abort,
        }
    }
}

/// What a resumed or terminated stalled transaction finally did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StallResult {
    Translated(u64),
    Read(Vec<u8>),
    Written,
    Failed(DmaError),
}

#[derive(Debug, Clone)]
pub(crate) enum PendingOp {
    Translate,
    Read { len: usize },
    Write { data: Vec<u8> },
}

#[derive(Debug, Clone)]
pub(crate) struct Stalled {
    pub txn: Transaction,
    pub op: PendingOp,
    /// The fault that stalled it (reported again if it is terminated).
    pub event: EventType,
    /// Its record reached the event queue. An unrecorded stall waits for the queue to
    /// become writable and is then retried (IHI0070 7.2.1); software has not seen its
    /// STAG, so CMD_RESUME does not reach it.
    pub recorded: bool,
}

/// Stalled transactions by (StreamID, STAG), and finished ones waiting for the device.
#[derive(Debug, Default)]
pub(crate) struct StallTable {
    next: u16,
    pub pending: HashMap<(u32, u16), Stalled, FxBuildHasher>,
    pub done: HashMap<(u32, u16), StallResult, FxBuildHasher>,
}

/// A fault before the recording rules are applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct XFault {
    pub event: EventType,
    pub s2: bool,
    pub class: FaultClass,
    pub ipa: u64,
    pub fetch_addr: u64,
    pub ttrnw: bool,
    /// CD index for C_BAD_SUBSTREAMID (its SubstreamID field).
    pub ssid_override: Option<u32>,
    /// Recording, stall and termination as the configuration decides.
    pub record: bool,
    pub may_stall: bool,
    pub termination: Termination,
}

impl XFault {
    pub(crate) fn config(event: EventType) -> Self {
        XFault {
            event,
            s2: false,
            class: FaultClass::In,
            ipa: 0,
            fetch_addr: 0,
            ttrnw: false,
            ssid_override: None,
            record: true,
            may_stall: false,
            termination: Termination::Abort,
        }
    }
    fn fetch(event: EventType, pa: u64) -> Self {
        XFault {
            fetch_addr: pa,
            ..Self::config(event)
        }
    }
}

pub(crate) enum Fail {
    /// Terminated with no event.
    Silent,
    Fault(XFault),
}

/// What the micro-TLB may cache after a successful translation: the page or block, and
/// which (kind, privilege) combinations of *incoming* attributes it permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fill {
    pub in_base: u64,
    pub shift: u8,
    pub out_base: u64,
    /// Bit `kind * 2 + privileged` (kind: 0 read, 1 write, 2 execute).
    pub allowed: u8,
}

pub(crate) struct Resolved {
    pub pa: u64,
    pub fill: Option<Fill>,
}

impl Resolved {
    /// `addr` output unchanged (GBPA or STE bypass, both stages bypassed): its 4 KiB page
    /// for every access.
    fn identity(addr: u64) -> Self {
        Resolved {
            pa: addr,
            fill: Some(Fill {
                in_base: addr & !0xfff,
                shift: 12,
                out_base: addr & !0xfff,
                allowed: 0x3f,
            }),
        }
    }
}

pub(crate) fn access_bit(kind: AccessKind, privileged: bool) -> u8 {
    let k = match kind {
        AccessKind::Read => 0,
        AccessKind::Write => 1,
        AccessKind::Execute => 2,
    };
    1 << (k * 2 + u8::from(privileged))
}

/// The access after the STE's PRIVCFG/INSTCFG overrides (IHI0070 13.1). Writes are never
/// instruction accesses.
pub(crate) fn effective(
    kind: AccessKind,
    privileged: bool,
    privcfg: AttrOverride,
    instcfg: AttrOverride,
) -> Access {
    let p = privcfg.apply(privileged);
    let k = match kind {
        AccessKind::Write => AccessKind::Write,
        _ => {
            if instcfg.apply(kind == AccessKind::Execute) {
                AccessKind::Execute
            } else {
                AccessKind::Read
            }
        }
    };
    Access::new(k, p)
}

pub(crate) fn perms_allow(p: &EntryPerms, a: Access) -> Result<(), Stage> {
    if let Some((s1, ctl, _)) = p.s1
        && check_s1(s1, a, ctl).is_err()
    {
        return Err(Stage::Stage1);
    }
    if let Some((s2, _, _)) = p.s2
        && check_s2(s2, a).is_err()
    {
        return Err(Stage::Stage2);
    }
    Ok(())
}

/// The incoming accesses (bit `kind * 2 + privileged`) whose effective access after the
/// STE overrides `p` allows.
pub(crate) fn allowed_mask(p: &EntryPerms, privcfg: AttrOverride, instcfg: AttrOverride) -> u8 {
    let mut m = 0;
    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Execute] {
        for privileged in [false, true] {
            if perms_allow(p, effective(kind, privileged, privcfg, instcfg)).is_ok() {
                m |= access_bit(kind, privileged);
            }
        }
    }
    m
}

fn event_of(kind: FaultKind) -> EventType {
    match kind {
        FaultKind::Translation => EventType::FTranslation,
        FaultKind::AccessFlag => EventType::FAccess,
        FaultKind::Permission => EventType::FPermission,
        FaultKind::AddressSize => EventType::FAddrSize,
        FaultKind::ExternalAbort { .. } => EventType::FWalkEabt,
    }
}

/// A stage-2 result, from the TLB or a walk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct S2Hit {
    pub pa: u64,
    pub in_base: u64,
    pub shift: u8,
    pub out_base: u64,
    pub perms: S2Perms,
    pub level: u8,
    pub device: bool,
}

impl S2Hit {
    /// What stage-2 entry `e` says of `ipa`.
    fn of(e: &TlbEntry, ipa: u64) -> S2Hit {
        let (perms, level, device) = e.perms.s2.unwrap_or((S2Perms::default(), 3, false));
        S2Hit {
            pa: e.output(ipa),
            in_base: e.in_base,
            shift: e.shift,
            out_base: e.out_base,
            perms,
            level,
            device,
        }
    }
}

/// The world a stream's stage 1 translates in: STRW = EL2 is EL2&0 (two VA ranges and an
/// ASID) when CR2.E2H is set (IHI0070 5.2 STRW, 3.17.5, 6.3.12).
fn stream_world(w: StreamWorld, live: &Live) -> StreamWorld {
    match w {
        StreamWorld::NsEl1 => StreamWorld::NsEl1,
        StreamWorld::El2 | StreamWorld::El2E2h if live.cr2.e2h() => StreamWorld::El2E2h,
        StreamWorld::El2 | StreamWorld::El2E2h => StreamWorld::El2,
    }
}

/// The TLB world of a stream's stage-1 translations ([`stream_world`]).
pub(crate) fn tlb_world(w: StreamWorld, live: &Live) -> World {
    match stream_world(w, live) {
        StreamWorld::NsEl1 => World::NsEl1,
        StreamWorld::El2 => World::El2,
        StreamWorld::El2E2h => World::El2E2h,
    }
}

/// Stage-1 context of a stream after CD selection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct S1Sel {
    pub cd: crate::cd::CdConfig,
    pub world: World,
    pub stalld: bool,
}

impl Smmu {
    /// Presents one transaction and translates it without moving data (the `dma` command of
    /// `twinmmu qtest`, and ATS-style translation).
    #[inline]
    pub fn translate(&self, txn: Transaction) -> Outcome {
        match self.resolve(&txn, false) {
            Ok(r) => Outcome::Translated { pa: r.pa },
            Err(f) => self.fail_translate(&txn, f),
        }
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn fail_translate(&self, txn: &Transaction, f: Fail) -> Outcome {
        self.fail(txn, f, PendingOp::Translate)
    }

    /// Reads `buf.len()` bytes at IOVA `iova` as a data read of `sid`/`ssid`.
    pub fn dma_read(
        &self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        buf: &mut [u8],
        privileged: bool,
    ) -> Result<(), DmaError> {
        let resolve = |txn: &Transaction| self.resolve(txn, false).map(|r| r.pa);
        self.dma_read_via(sid, ssid, iova, buf, privileged, AccessKind::Read, resolve)
    }

    /// Writes `data` at IOVA `iova` as a data write of `sid`/`ssid`.
    pub fn dma_write(
        &self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        data: &[u8],
        privileged: bool,
    ) -> Result<(), DmaError> {
        let resolve = |txn: &Transaction| self.resolve(txn, false).map(|r| r.pa);
        self.dma_write_via(sid, ssid, iova, data, privileged, resolve)
    }

    /// A read of `buf.len()` bytes at `iova` as transactions of `kind`, split at 4 KiB (the
    /// smallest page a translation can have), each translated by `resolve`: the SMMU's flow,
    /// or a DMA port's micro-TLB in front of it. A failed chunk goes through the fault rules
    /// with what remained to read; RAZ/WI zeroes it.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn dma_read_via(
        &self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        buf: &mut [u8],
        privileged: bool,
        kind: AccessKind,
        mut resolve: impl FnMut(&Transaction) -> Result<u64, Fail>,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < buf.len() {
            let a = iova.wrapping_add(done as u64);
            let chunk = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - done);
            let txn = Transaction::new(sid, ssid, a, kind, privileged);
            match resolve(&txn) {
                Ok(pa) => self
                    .mem
                    .read(pa, &mut buf[done..done + chunk])
                    .map_err(|_| DmaError::BusError { pa })?,
                Err(f) => {
                    let op = PendingOp::Read {
                        len: buf.len() - done,
                    };
                    let e = DmaError::of(self.fail(&txn, f, op), done);
                    if let DmaError::Fault {
                        termination: Termination::RazWi,
                        ..
                    } = e
                    {
                        buf[done..].fill(0);
                    }
                    return Err(e);
                }
            }
            done += chunk;
        }
        Ok(())
    }

    /// [`Smmu::dma_read_via`] for a write of `data`.
    #[inline(always)]
    pub(crate) fn dma_write_via(
        &self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        data: &[u8],
        privileged: bool,
        mut resolve: impl FnMut(&Transaction) -> Result<u64, Fail>,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < data.len() {
            let a = iova.wrapping_add(done as u64);
            let chunk = ((0x1000 - (a & 0xfff)) as usize).min(data.len() - done);
            let txn = Transaction::new(sid, ssid, a, AccessKind::Write, privileged);
            match resolve(&txn) {
                Ok(pa) => self
                    .mem
                    .write(pa, &data[done..done + chunk])
                    .map_err(|_| DmaError::BusError { pa })?,
                Err(f) => {
                    let op = PendingOp::Write {
                        data: data[done..].to_vec(),
                    };
                    return Err(DmaError::of(self.fail(&txn, f, op), done));
                }
            }
            done += chunk;
        }
        Ok(())
    }

    /// The result of a stalled transaction once CMD_RESUME, CMD_STALL_TERM or SMMUEN = 0 has
    /// dealt with it (taken: a second call returns `None`).
    pub fn stall_result(&self, sid: u32, stag: u16) -> Option<StallResult> {
        self.stalls.lock().done.remove(&(sid, stag))
    }

    /// Whether (sid, stag) is still stalled.
    pub fn is_stalled(&self, sid: u32, stag: u16) -> bool {
        self.stalls.lock().pending.contains_key(&(sid, stag))
    }

    /// Applies the recording, stall and termination rules to a failed translation.
    pub(crate) fn fail(&self, txn: &Transaction, f: Fail, op: PendingOp) -> Outcome {
        self.fail_as(txn, f, op, None)
    }

    /// [`Smmu::fail`] for a transaction that already holds `stag` (a stalled one being
    /// retried once the event queue became writable).
    fn fail_as(&self, txn: &Transaction, f: Fail, op: PendingOp, stag: Option<u16>) -> Outcome {
        let x = match f {
            Fail::Silent => {
                inc(&self.counters.aborts);
                return Outcome::Abort;
            }
            Fail::Fault(x) => x,
        };
        inc(&self.counters.faults);
        // The access attributes reported are the post-override ones; they are recomputed
        // here from the transaction (the STE is cached, so this is cheap and never fails
        // differently from the translation that just ran).
        let (pnu, ind) = if x.event == EventType::FUut {
            // F_UUT reports the incoming attributes, not the post-override ones (IHI0070
            // 7.3.2).
            (txn.privileged, txn.kind == AccessKind::Execute)
        } else {
            self.reported_attrs(txn)
        };
        let mut ev = Event {
            event_type: x.event,
            sid: txn.sid,
            ssid: x.ssid_override.or(txn.ssid),
            stall: None,
            pnu,
            ind,
            rnw: txn.kind != AccessKind::Write,
            s2: x.s2,
            class: x.class,
            ttrnw: x.ttrnw,
            input_addr: txn.addr,
            ipa: x.ipa,
            fetch_addr: x.fetch_addr,
            detail: crate::event::EventDetail::None,
        };
        let stall = x.may_stall && !matches!(self.cfg.stall_model, StallModel::TerminateOnly);
        if stall {
            let mut st = self.stalls.lock();
            // STALL_MAX transactions at most (IDR5); beyond that, terminate.
            if stag.is_some() || st.pending.len() < usize::from(self.cfg.idr5().stall_max()) {
                let stag = stag.unwrap_or_else(|| {
                    let mut stag = st.next;
                    while st.pending.contains_key(&(txn.sid, stag))
                        || st.done.contains_key(&(txn.sid, stag))
                    {
                        stag = stag.wrapping_add(1);
                    }
                    st.next = stag.wrapping_add(1);
                    stag
                });
                ev.stall = Some(stag);
                // IHI0070 3.12.2, 7.2.1: the record of a stall is never discarded. If the
                // queue is not writable (disabled, full, or after an abort) the transaction
                // stays stalled without a record, and is retried as though it had just
                // arrived once the queue is writable again.
                let recorded = self.record_stall_event(&ev);
                st.pending.insert(
                    (txn.sid, stag),
                    Stalled {
                        txn: *txn,
                        op,
                        event: x.event,
                        recorded,
                    },
                );
                if recorded {
                    inc(&self.counters.stalls);
                }
                return Outcome::Stalled {
                    stag,
                    event: x.event,
                };
            }
        }
        let recorded = (x.record || stall) && self.record_event(&ev);
        Outcome::Fault {
            event: x.event,
            recorded,
            termination: x.termination,
        }
    }

    fn reported_attrs(&self, txn: &Transaction) -> (bool, bool) {
        let ste = self.tcu.read().ste_get(txn.sid);
        let (privcfg, instcfg) = match ste {
            Some(StreamConfig::Translate {
                privcfg, instcfg, ..
            })
            | Some(StreamConfig::Bypass { privcfg, instcfg }) => (privcfg, instcfg),
            _ => (AttrOverride::Incoming, AttrOverride::Incoming),
        };
        let a = effective(txn.kind, txn.privileged, privcfg, instcfg);
        (a.privileged, a.kind == AccessKind::Execute)
    }

    /// Re-runs a stalled transaction (CMD_RESUME retry) or terminates it.
    pub(crate) fn resume(&self, sid: u32, stag: u16, retry: bool, abort: bool) {
        // No such stalled transaction, or one whose record software has not seen: no
        // effect (IHI0070 4.7.1).
        let s = match self.stalls.lock().pending.entry((sid, stag)) {
            hashbrown::hash_map::Entry::Occupied(e) if e.get().recorded => e.remove(),
            _ => return,
        };
        let result = if retry {
            self.run_op(&s)
        } else {
            terminated(
                &s.op,
                s.event,
                s.recorded,
                if abort {
                    Termination::Abort
                } else {
                    Termination::RazWi
                },
            )
        };
        self.stalls.lock().done.insert((sid, stag), result);
    }

    fn run_op(&self, s: &Stalled) -> StallResult {
        let t = s.txn;
        match &s.op {
            PendingOp::Translate => match self.translate(t) {
                Outcome::Translated { pa } => StallResult::Translated(pa),
                o => StallResult::Failed(DmaError::of(o, 0)),
            },
            PendingOp::Read { len } => {
                let mut buf = vec![0u8; *len];
                let resolve = |txn: &Transaction| self.resolve(txn, false).map(|r| r.pa);
                match self.dma_read_via(
                    t.sid,
                    t.ssid,
                    t.addr,
                    &mut buf,
                    t.privileged,
                    t.kind,
                    resolve,
                ) {
                    Ok(()) => StallResult::Read(buf),
                    Err(e) => StallResult::Failed(e),
                }
            }
            PendingOp::Write { data } => {
                match self.dma_write(t.sid, t.ssid, t.addr, data, t.privileged) {
                    Ok(()) => StallResult::Written,
                    Err(e) => StallResult::Failed(e),
                }
            }
        }
    }

    /// Retries the stalled transactions whose record could not be written, now that the
    /// event queue may be writable (IHI0070 3.12.2, 7.2.1): each is handled as though it
    /// had just arrived, keeping its STAG. It may translate (its result goes to the
    /// device, and no record is written), stall again (its record is written now, or it
    /// keeps waiting), or fault and terminate under the configuration in force.
    pub(crate) fn retry_unrecorded_stalls(&self) {
        let waiting: Vec<((u32, u16), Stalled)> = self
            .stalls
            .lock()
            .pending
            .extract_if(|_, s| !s.recorded)
            .collect();
        for ((sid, stag), s) in waiting {
            if !self.eventq_writable() {
                // Still not writable: keep waiting (no retry).
                self.stalls.lock().pending.insert((sid, stag), s);
                continue;
            }
            let result = match self.resolve(&s.txn, false) {
                Ok(_) => self.run_op(&s),
                Err(f) => match self.fail_as(&s.txn, f, s.op.clone(), Some(stag)) {
                    // Stalled again under the same STAG (recorded, or waiting again).
                    Outcome::Stalled { .. } => continue,
                    Outcome::Fault {
                        event,
                        recorded,
                        termination,
                    } => terminated(&s.op, event, recorded, termination),
                    Outcome::Abort => StallResult::Failed(DmaError::Abort),
                    Outcome::Translated { pa } => StallResult::Translated(pa),
                },
            };
            self.stalls.lock().done.insert((sid, stag), result);
        }
    }

    /// CMD_STALL_TERM: every stalled transaction of `sid` terminates with an abort.
    pub(crate) fn stall_term(&self, sid: u32) {
        let st = &mut *self.stalls.lock();
        for (k, s) in st.pending.extract_if(|k, _| k.0 == sid) {
            let r = terminated(&s.op, s.event, s.recorded, Termination::Abort);
            st.done.insert(k, r);
        }
    }

    pub(crate) fn terminate_all_stalls(&self) {
        let st = &mut *self.stalls.lock();
        for (k, s) in st.pending.drain() {
            let r = terminated(&s.op, s.event, s.recorded, Termination::Abort);
            st.done.insert(k, r);
        }
    }

    // ------------------------------------------------------------------ the flow

    /// The translation flow; `Err` carries the fault before the recording rules.
    #[inline]
    pub(crate) fn resolve(&self, txn: &Transaction, want_fill: bool) -> Result<Resolved, Fail> {
        // Acquire pairs with the Release of `config_changed`: a context filled before the
        // last configuration change carries an older generation and is not used.
        let generation = self.ctx_gen.load(Ordering::Acquire);
        let known = self.ctxs.lookup(txn.sid, txn.ssid, generation);
        let mut array_missed = false;
        if let Some(c) = &known {
            match self.resolve_hit(txn, c, want_fill) {
                Ok(r) => return Ok(r),
                Err(m) => array_missed = m,
            }
        }
        self.resolve_slow(
            txn,
            want_fill,
            Slow {
                generation,
                known,
                array_missed,
            },
        )
    }

    /// The hit path: the stream's hit context, one main-TLB probe (per block size present,
    /// and the global twin), the permission check. An `Err` sends the transaction down the
    /// slow path, which decides everything else (faults included) from scratch:
    /// `Err(true)` when the array holds no entry for it, `Err(false)` when one denies the
    /// access.
    #[inline]
    fn resolve_hit(
        &self,
        txn: &Transaction,
        c: &HitCtx,
        want_fill: bool,
    ) -> Result<Resolved, bool> {
        let va = txn.addr;
        let e = self
            .hit
            .probe_hit(c.ids, c.key(va), c.global_first)
            .ok_or(true)?;
        // The entry's permissions were evaluated for each effective access when it was
        // inserted; the context maps the incoming attributes to the effective access.
        let incoming = access_bit(txn.kind, txn.privileged).trailing_zeros() as usize;
        if e.allow & c.effective[incoming] == 0 {
            return Err(false);
        }
        self.counters.count_hit();
        Ok(Resolved {
            pa: e.out_base | (va & ((1u64 << e.shift) - 1)),
            fill: want_fill.then(|| Fill {
                in_base: e.in_base,
                shift: e.shift,
                out_base: e.out_base,
                allowed: (0..6)
                    .filter(|&j| e.allow & c.effective[j] != 0)
                    .fold(0, |m, j| m | (1 << j)),
            }),
        })
    }

    /// Marks the main-TLB entry that translates `addr` of `sid`/`ssid` referenced for CLOCK,
    /// as a hit would,
    /// without translating or counting: for a micro-TLB that serves the page on its own
    /// ([`crate::DmaPort`]). Through the hit path only; if that cannot find the entry,
    /// nothing is marked (CLOCK is an approximation, and the next refill marks it).
    #[cold]
    #[inline(never)]
    pub(crate) fn touch(&self, sid: u32, ssid: Option<u32>, addr: u64) {
        let generation = self.ctx_gen.load(Ordering::Acquire);
        if let Some(c) = self.ctxs.lookup(sid, ssid, generation) {
            // The probe sets the entry's reference bit when it is clear.
            let _ = self.hit.probe_hit(c.ids, c.key(addr), c.global_first);
        }
    }

    /// Records a stream's hit context (with the current store ids of `tag` and of its
    /// global twin), unless it is already there or another thread is filling one (it is
    /// only a cache).
    fn fill_ctx(
        &self,
        txn: &Transaction,
        slow: &Slow,
        tag: Ctx,
        global_first: bool,
        make: impl FnOnce([u64; 2]) -> HitCtx,
    ) {
        let twin = tag.asid().is_some().then(|| tag.global());
        // The ids as the id cache knows them under this translation's generation (a stale
        // generation makes the filled context stale too), else from the store.
        let cached = (
            self.ids.lookup(tag, slow.generation),
            twin.map_or(Some(0), |g| self.ids.lookup(g, slow.generation)),
        );
        let ids = match cached {
            (Some(a), Some(b)) => [a, b],
            _ => {
                let t = self.tlb.lock();
                [
                    t.context_id(tag).unwrap_or(0),
                    twin.and_then(|g| t.context_id(g)).unwrap_or(0),
                ]
            }
        };
        // A context known under this generation was made from the same configuration: the
        // same TBI and access map; only its ids and the probe-order hint can differ.
        if slow
            .known
            .is_some_and(|k| k.ids == ids && k.global_first == global_first)
        {
            return;
        }
        let c = make(ids);
        if let Some(_g) = self.ctx_fill.try_lock() {
            self.ctxs.fill(txn.sid, txn.ssid, slow.generation, &c);
        }
    }

    /// Everything but a hit: out of line, so the hit path stays a small leaf.
    #[inline(never)]
    fn resolve_slow(
        &self,
        txn: &Transaction,
        want_fill: bool,
        slow: Slow,
    ) -> Result<Resolved, Fail> {
        inc(&self.counters.translations);
        // One read of the configuration cache: the live registers, the STE and, when the
        // stream selects a CD, that CD.
        let (live, ste, cd0) = {
            let t = self.tcu.read();
            let ste = t.ste_get(txn.sid);
            let cd0 = match &ste {
                Some(StreamConfig::Translate { s1: Some(s1), .. }) => match self.select_cd(txn, s1)
                {
                    Ok(Some(idx)) => t.cd.get(&(txn.sid, idx)).copied().map(|c| (idx, c)),
                    _ => None,
                },
                _ => None,
            };
            (t.live, ste, cd0)
        };
        if !live.cr0.smmuen() {
            // IHI0070 6.3.14: GBPA decides; no event.
            let g = live.gbpa;
            if g.abort() {
                return Err(Fail::Silent);
            }
            return Ok(Resolved::identity(txn.addr));
        }
        let ste = match ste {
            Some(s) => {
                inc(&self.counters.cfg_hits);
                s
            }
            None => {
                inc(&self.counters.cfg_misses);
                self.fetch_ste(&live, txn.sid)?
            }
        };
        let (s1ctx, s2, vmid, privcfg, instcfg) = match ste {
            StreamConfig::Abort => return Err(Fail::Silent),
            StreamConfig::Bypass { .. } => {
                if txn.ssid.is_some() {
                    // SubstreamID with stage 1 disabled (IHI0070 7.3.9).
                    return Err(Fail::Fault(XFault::config(EventType::CBadSubstreamid)));
                }
                return Ok(Resolved::identity(txn.addr));
            }
            StreamConfig::Translate {
                s1,
                s2,
                vmid,
                privcfg,
                instcfg,
                ..
            } => (s1, s2, vmid, privcfg, instcfg),
        };
        let access = effective(txn.kind, txn.privileged, privcfg, instcfg);

        // Substream selection (IHI0070 5.2 S1DSS, S1CDMax; 7.3.7, 7.3.9).
        let sel = match s1ctx {
            None => {
                if txn.ssid.is_some() {
                    return Err(Fail::Fault(XFault::config(EventType::CBadSubstreamid)));
                }
                None
            }
            Some(s1) => match self.select_cd(txn, &s1)? {
                None => None,
                Some(idx) => {
                    let cd = match cd0 {
                        Some((i, cd)) if i == idx => {
                            inc(&self.counters.cfg_hits);
                            cd
                        }
                        _ => self.cd_config(txn, &live, &s1, s2.as_ref(), idx)?,
                    };
                    Some(S1Sel {
                        cd,
                        world: tlb_world(s1.world, &live),
                        stalld: s1.stalld,
                    })
                }
            },
        };

        match (sel, s2) {
            (None, None) => {
                // Stage 1 bypassed (S1DSS = bypass) and stage 2 bypassed: the output must
                // fit the implemented address size (IHI0070 7.3.14).
                if txn.addr >> self.cfg.oas_bits != 0 {
                    return Err(Fail::Fault(XFault {
                        class: FaultClass::In,
                        ..XFault::config(EventType::FAddrSize)
                    }));
                }
                Ok(Resolved::identity(txn.addr))
            }
            (None, Some(s2)) => {
                if txn.addr >> self.cfg.oas_bits != 0 {
                    return Err(Fail::Fault(XFault::config(EventType::FAddrSize)));
                }
                let h = self.s2_translate(&s2, txn.addr, access, FaultClass::In, None)?;
                self.fill_ctx(
                    txn,
                    &slow,
                    Ctx::new(World::NsEl1, Kind::S2, s2.vmid, None, false),
                    false,
                    |ids| HitCtx::new(ids, false, [false; 2], (privcfg, instcfg), false),
                );
                let perms = EntryPerms {
                    s1: None,
                    s2: Some((h.perms, h.level, h.device)),
                };
                Ok(Resolved {
                    pa: h.pa,
                    fill: want_fill.then(|| Fill {
                        in_base: h.in_base,
                        shift: h.shift,
                        out_base: h.out_base,
                        allowed: allowed_mask(&perms, privcfg, instcfg),
                    }),
                })
            }
            (Some(sel), s2) => {
                // IHI0070 13.4.1: an EL2 (non-E2H) stage 1 ignores AP[1] and checks every
                // access as privileged, whatever PRIV and STE.PRIVCFG say.
                let (access, privcfg) = if sel.world == World::El2 {
                    (Access::new(access.kind, true), AttrOverride::Force(true))
                } else {
                    (access, privcfg)
                };
                let tag = s1_tag(&sel, s2.is_some(), vmid);
                let (r, global) = self.s1_translate(
                    txn,
                    &sel,
                    s2.as_ref(),
                    tag,
                    access,
                    (privcfg, instcfg),
                    want_fill,
                    slow.known.filter(|_| slow.array_missed).map(|c| c.ids),
                )?;
                let tbi = [
                    sel.cd.walk.tbi(twinmmu_vmsa::Ttb::Ttb0),
                    sel.cd.walk.tbi(twinmmu_vmsa::Ttb::Ttb1),
                ];
                // Probe the global twin first if this translation used a global entry (an
                // ordering hint only).
                self.fill_ctx(txn, &slow, tag, global, |ids| {
                    HitCtx::new(ids, true, tbi, (privcfg, instcfg), global)
                });
                Ok(r)
            }
        }
    }

    /// Which CD a transaction uses, or `None` for S1DSS bypass.
    pub(crate) fn select_cd(&self, txn: &Transaction, s1: &S1Ctx) -> Result<Option<u32>, Fail> {
        if s1.cdmax == 0 {
            if txn.ssid.is_some() {
                return Err(Fail::Fault(XFault::config(EventType::CBadSubstreamid)));
            }
            return Ok(Some(0));
        }
        match txn.ssid {
            None => match s1.dss {
                S1Dss::Terminate => Err(Fail::Fault(XFault::config(EventType::FStreamDisabled))),
                S1Dss::Bypass => Ok(None),
                S1Dss::Substream0 => Ok(Some(0)),
            },
            Some(s) => {
                if u64::from(s) >> s1.cdmax != 0 {
                    return Err(Fail::Fault(XFault::config(EventType::CBadSubstreamid)));
                }
                if s == 0 && s1.dss == S1Dss::Substream0 {
                    // CD 0 is reserved for non-substream traffic (IHI0070 7.3.7).
                    return Err(Fail::Fault(XFault::config(EventType::FStreamDisabled)));
                }
                Ok(Some(s))
            }
        }
    }

    /// Locates, reads and validates the STE of `sid` (IHI0070 3.3.1, 5.1, 5.2), and caches
    /// it unless a CFGI happened meanwhile.
    pub(crate) fn fetch_ste(&self, live: &Live, sid: u32) -> Result<StreamConfig, Fail> {
        let gen0 = self.tcu.read().cfg_gen;
        inc(&self.counters.ste_fetches);
        let cfg = live.strtab_cfg;
        let base = StrtabBase::from_bits(live.strtab_base).addr() << 6;
        let bad_sid = || {
            Fail::Fault(XFault {
                record: live.cr2.recinvsid(),
                ..XFault::config(EventType::CBadStreamid)
            })
        };
        let log2size = u32::from(cfg.log2size()).min(u32::from(self.cfg.sidsize));
        if u64::from(sid) >> log2size != 0 {
            return Err(bad_sid());
        }
        let ste_addr = if cfg.fmt() == 1 && self.cfg.st_level_2lvl {
            // SPLIT is 6, 8 or 10; reserved values behave as the next lower valid one.
            let split = match cfg.split() {
                0..=7 => 6,
                8 | 9 => 8,
                _ => 10,
            };
            let l1_addr = base + (u64::from(sid) >> split) * 8;
            let l1 = L1Std::from_bits(
                self.mem
                    .read_u64(l1_addr)
                    .map_err(|_| Fail::Fault(XFault::fetch(EventType::FSteFetch, l1_addr)))?,
            );
            let span = u32::from(l1.span());
            // Span 0, reserved (12..31) or beyond SPLIT + 1: no valid STE (IHI0070 5.1.1).
            if span == 0 || span > 11 || span > split + 1 {
                return Err(bad_sid());
            }
            let idx = u64::from(sid) & ((1u64 << split) - 1);
            // A StreamID beyond the span is C_BAD_STREAMID (IHI0070 7.3.3 case 2d); QEMU
            // reports C_BAD_STE here.
            if idx >> (span - 1) != 0 {
                return Err(bad_sid());
            }
            let l2 = (l1.l2ptr() << 6) & !((64u64 << (span - 1)) - 1);
            l2 + idx * 64
        } else {
            base + u64::from(sid) * 64
        };
        let d = self.read_struct(ste_addr, EventType::FSteFetch)?;
        let ste = Ste::from_dwords(d);
        let sc = decode_ste(&ste, &self.cfg)
            .map_err(|_| Fail::Fault(XFault::config(EventType::CBadSte)))?;
        // The VMS, when the STE enables it (IHI0070 5.6.1): its PARTID_MAP (the only
        // defined part, bytes 0..64) is cached with the STE (5.6.2). An external abort is
        // F_VMS_FETCH, after C_BAD_STE in priority (7.3.20, 7.3.22).
        let partid_map = match sc {
            StreamConfig::Translate { vms: Some(p), .. } => {
                inc(&self.counters.vms_fetches);
                let mut map = [0u16; 32];
                for (i, four) in map.chunks_exact_mut(4).enumerate() {
                    let a = p + 8 * i as u64;
                    let w = self
                        .mem
                        .read_u64(a)
                        .map_err(|_| Fail::Fault(XFault::fetch(EventType::FVmsFetch, a)))?;
                    for (j, id) in four.iter_mut().enumerate() {
                        *id = (w >> (16 * j)) as u16;
                    }
                }
                Some(map)
            }
            _ => None,
        };
        let cont = ste.dw1.cont();
        let entry = crate::smmu::CachedSte {
            cfg: sc,
            fp: ste_fingerprint(&d),
            partid_map,
        };
        let mut t = self.tcu.write();
        if t.cfg_gen == gen0 {
            // STE.CONT = n: one entry serves the aligned span of 2^n StreamIDs (IHI0070
            // 5.2). Caching it over a non-identical entry of the span would make a lookup
            // match both: F_CFG_CONFLICT, the transaction aborts, the new entry is not
            // cached (IHI0070 3.20.2, 7.3.18). Detected here, on the fill, never on a hit.
            if cont > 0 && t.span_conflicts(sid, cont, entry.fp) {
                return Err(Fail::Fault(XFault::config(EventType::FCfgConflict)));
            }
            if t.len() >= self.cfg.cfg_cache_capacity {
                if let Some(k) = t.ste.keys().next().copied() {
                    t.ste.remove(&k);
                } else if let Some(k) = t.ste_spans.keys().next().copied() {
                    t.ste_spans.remove(&k);
                    t.span_sizes = t.ste_spans.keys().fold(0, |m, &(n, _)| m | (1 << n));
                }
            }
            if cont > 0 {
                t.ste_spans.insert((cont, sid >> cont), entry);
                t.span_sizes |= 1 << cont;
            } else {
                t.ste.insert(sid, entry);
            }
        }
        Ok(sc)
    }

    /// A stage-2 fault of class `class` under the STE's recording and stall rules.
    pub(crate) fn s2_fault(
        &self,
        s2: &S2Config,
        f: twinmmu_vmsa::Fault,
        ipa: u64,
        class: FaultClass,
    ) -> Fail {
        let event = event_of(f.kind);
        if let FaultKind::ExternalAbort { fetch_addr } = f.kind {
            return Fail::Fault(XFault {
                s2: true,
                class,
                ipa,
                ..XFault::fetch(EventType::FWalkEabt, fetch_addr)
            });
        }
        Fail::Fault(XFault {
            event,
            s2: true,
            class,
            ipa,
            fetch_addr: 0,
            ttrnw: class == FaultClass::Tt,
            ssid_override: None,
            record: s2.record,
            may_stall: s2.stall || self.cfg.stall_model == StallModel::StallForced,
            // A stage-2 fault terminates with an abort (IHI0070 4.7.1).
            termination: Termination::Abort,
        })
    }

    /// Stage 2 of `ipa` (TLB, then walk), with the permission check for `access`.
    pub(crate) fn s2_translate(
        &self,
        s2: &S2Config,
        ipa: u64,
        access: Access,
        class: FaultClass,
        batch: Option<&mut Batch>,
    ) -> Result<S2Hit, Fail> {
        let h = self.s2_entry(s2, ipa, class, batch)?;
        if check_s2(h.perms, access).is_err() {
            return Err(self.s2_fault(
                s2,
                twinmmu_vmsa::Fault::new(FaultKind::Permission, h.level, Stage::Stage2),
                ipa,
                class,
            ));
        }
        Ok(h)
    }

    /// The stage-2 entry of `ipa` (no permission check): the TLB (and the entries `batch`
    /// holds for insertion), else a walk, whose entry goes into `batch` when there is one
    /// and into the TLB at once otherwise.
    pub(crate) fn s2_entry(
        &self,
        s2: &S2Config,
        ipa: u64,
        class: FaultClass,
        batch: Option<&mut Batch>,
    ) -> Result<S2Hit, Fail> {
        let ctx = Ctx::new(World::NsEl1, Kind::S2, s2.vmid, None, false);
        let cached = match batch.as_deref().and_then(|b| b.find(ctx, ipa)) {
            Some(e) => Some(e),
            None => self.tlb_lookup(ctx, ipa),
        };
        if let Some(e) = cached {
            inc(&self.counters.tlb_hits);
            return Ok(S2Hit::of(&e, ipa));
        }
        inc(&self.counters.tlb_misses);
        self.s2_walk(s2, ipa, ctx, batch)
            .map_err(|f| self.s2_fault(s2, f, ipa, class))
    }

    pub(crate) fn tlb_insert(&self, e: TlbEntry, gen0: u64) {
        self.tlb_insert_all([&e], gen0);
    }

    /// Inserts `entries` in order under one acquisition of the store lock, unless an
    /// invalidation ran since `gen0` was read (before the walks that made them began).
    pub(crate) fn tlb_insert_all<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a TlbEntry>,
        gen0: u64,
    ) {
        self.tlb_insert_walk(entries, None, gen0);
    }

    /// One insertion under the store lock: the store, then the lookup array and id cache.
    fn insert_locked(&self, t: &mut Tlb, e: &TlbEntry, generation: u64) {
        // Entries hit through the array are referenced there: CLOCK asks it.
        let ins = t.insert_with(*e, |old, id| self.hit.take_referenced(id, old));
        // What the store evicted or replaced leaves the lookup array first.
        for (old, id) in t.drain_removed() {
            self.hit.remove(id, &old);
        }
        let dropped = if ins.replaced {
            self.hit.insert(ins.ctx_id, e)
        } else {
            self.hit.insert_new(ins.ctx_id, e)
        };
        if self.ids.lookup_state(e.ctx, generation) != Some((ins.ctx_id, ins.lossy)) {
            self.ids.fill(e.ctx, ins.ctx_id, ins.lossy, generation);
        }
        self.array_dropped(t, dropped, generation);
    }

    /// The lookup array gave up an entry of context incarnation `dropped` (a full set) that
    /// the store keeps: the context becomes lossy, in the store and in the id cache, so its
    /// array misses go to the store again. Under the store lock.
    fn array_dropped(&self, t: &mut Tlb, dropped: Option<u64>, generation: u64) {
        if let Some(id) = dropped
            && let Some(c) = t.mark_lossy(id)
            && self.ids.lookup(c, generation) == Some(id)
        {
            self.ids.fill(c, id, true, generation);
        }
    }

    /// A slow-path main-TLB lookup (for an ASID-tagged context a global entry of the same
    /// context also matches, IHI0070 3.17.1): the lookup array, when the ids of the
    /// contexts are known under the current generation; then, unless the array holds every
    /// entry of both contexts (neither is lossy), the store under its lock, whose hit goes
    /// into the array. A miss is always safe (the caller walks), so an id that went stale
    /// since the cache recorded it costs a walk, never a wrong translation.
    pub(crate) fn tlb_lookup(&self, ctx: Ctx, addr: u64) -> Option<TlbEntry> {
        self.tlb_lookup_from(ctx, addr, None)
    }

    /// [`Smmu::tlb_lookup`]; `probed`: the context ids with which the hit path has just
    /// probed the array for this address, and missed.
    fn tlb_lookup_from(&self, ctx: Ctx, addr: u64, probed: Option<[u64; 2]>) -> Option<TlbEntry> {
        let generation = self.ctx_gen.load(Ordering::Acquire);
        let global = ctx.asid().is_some().then(|| ctx.global());
        // Ids known under the current generation (0: the context holds no entries).
        let own = self.ids.lookup_state(ctx, generation);
        let twin = global.and_then(|g| self.ids.lookup_state(g, generation));
        let ids = [own.map_or(0, |s| s.0), twin.map_or(0, |s| s.0)];
        if probed != Some(ids)
            && ids != [0, 0]
            && let Some(e) = self.hit.lookup(ids, [ctx, global.unwrap_or(ctx)], addr)
        {
            return Some(e);
        }
        // Both contexts known and not lossy: the array has answered for the store too.
        let exact = |s: Option<(u64, bool)>| s.is_some_and(|(_, lossy)| !lossy);
        if exact(own) && (global.is_none() || exact(twin)) {
            return None;
        }
        let mut t = self.tlb.lock();
        // Under the store lock the generation is exact for the ids read there. Ids the
        // cache did not know are recorded (0: the context holds nothing); a known one is
        // corrected below if the store answers from another incarnation.
        let generation = self.ctx_gen.load(Ordering::Acquire);
        for (c, cached) in [(Some(ctx), own), (global, twin)] {
            if let (Some(c), None) = (c, cached) {
                let (id, lossy) = t.context_state(c).unwrap_or((0, false));
                self.ids.fill(c, id, lossy, generation);
            }
        }
        let e = t.lookup(ctx, addr)?;
        if let Some((id, lossy)) = t.context_state(e.ctx) {
            let dropped = self.hit.insert(id, &e);
            let known = if e.ctx == ctx { own } else { twin };
            if known.is_some_and(|k| k != (id, lossy)) {
                self.ids.fill(e.ctx, id, lossy, generation);
            }
            self.array_dropped(&mut t, dropped, generation);
        }
        Some(e)
    }

    /// The PA of CD-table address `addr`: an IPA through stage 2 when nested (CLASS = CD).
    fn cd_pa(&self, s2: Option<&S2Config>, addr: u64) -> Result<u64, Fail> {
        match s2 {
            Some(s2) => Ok(self
                .s2_translate(
                    s2,
                    addr,
                    Access::new(AccessKind::Read, true),
                    FaultClass::Cd,
                    None,
                )?
                .pa),
            None => Ok(addr),
        }
    }

    /// Reads 8 bytes of a CD-table structure at `addr` (an IPA when nested).
    fn cd_read(&self, s2: Option<&S2Config>, addr: u64) -> Result<u64, Fail> {
        let pa = self.cd_pa(s2, addr)?;
        self.mem
            .read_u64(pa)
            .map_err(|_| Fail::Fault(XFault::fetch(EventType::FCdFetch, pa)))
    }

    /// The 64-byte structure (STE or CD) at `pa`; an abort is `event` (F_STE_FETCH,
    /// F_CD_FETCH) with the address of the failing read.
    fn read_struct(&self, pa: u64, event: EventType) -> Result<[u64; 8], Fail> {
        let mut d = [0u64; 8];
        for (i, w) in d.iter_mut().enumerate() {
            let a = pa + 8 * i as u64;
            *w = self
                .mem
                .read_u64(a)
                .map_err(|_| Fail::Fault(XFault::fetch(event, a)))?;
        }
        Ok(d)
    }

    /// Locates, reads and validates CD `idx` of the stream (IHI0070 3.3.2, 5.3, 5.4).
    pub(crate) fn cd_config(
        &self,
        txn: &Transaction,
        live: &Live,
        s1: &S1Ctx,
        s2: Option<&S2Config>,
        idx: u32,
    ) -> Result<crate::cd::CdConfig, Fail> {
        if let Some(cd) = self.tcu.read().cd.get(&(txn.sid, idx)).copied() {
            inc(&self.counters.cfg_hits);
            return Ok(cd);
        }
        inc(&self.counters.cfg_misses);
        let gen0 = self.tcu.read().cfg_gen;
        inc(&self.counters.cd_fetches);
        let bad_ssid = || {
            Fail::Fault(XFault {
                ssid_override: Some(idx),
                ..XFault::config(EventType::CBadSubstreamid)
            })
        };
        let cd_addr = if s1.cdmax == 0 || s1.fmt == 0 {
            s1.context_ptr + u64::from(idx) * 64
        } else {
            let leaf_bits = if s1.fmt == 1 { 6 } else { 10 };
            let l1_addr = s1.context_ptr + (u64::from(idx) >> leaf_bits) * 8;
            let l1 = L1Cd::from_bits(self.cd_read(s2, l1_addr)?);
            if !l1.v() {
                return Err(bad_ssid());
            }
            let l2 = l1.l2ptr() << 12;
            // An L2Ptr beyond the OAS (stage 1 only) is C_BAD_SUBSTREAMID (IHI0070 3.4.3).
            if s2.is_none() && l2 >> self.cfg.oas_bits != 0 {
                return Err(bad_ssid());
            }
            l2 + (u64::from(idx) & ((1 << leaf_bits) - 1)) * 64
        };
        // The CD is 64 bytes, naturally aligned: one stage-2 translation covers it.
        let d = self.read_struct(self.cd_pa(s2, cd_addr)?, EventType::FCdFetch)?;
        // Under CR2.E2H an EL2 stream's CDs have two VA ranges and an ASID, as an EL1 CD
        // does.
        let world = stream_world(s1.world, live);
        let cd = decode_cd(&ContextDescriptor::from_dwords(d), world, &self.cfg)
            .map_err(|_| Fail::Fault(XFault::config(EventType::CBadCd)))?;
        let mut t = self.tcu.write();
        if t.cfg_gen == gen0 {
            if t.len() >= self.cfg.cfg_cache_capacity
                && let Some(k) = t.cd.keys().next().copied()
            {
                t.cd.remove(&k);
            }
            t.cd.insert((txn.sid, idx), cd);
        }
        Ok(cd)
    }

    /// A stage-1 fault under the CD's recording, stall and termination rules.
    fn s1_fault(&self, sel: &S1Sel, f: twinmmu_vmsa::Fault) -> Fail {
        if let FaultKind::ExternalAbort { fetch_addr } = f.kind {
            // A stage-1 walk abort: S2 = 0, CLASS = TT (IHI0070 7.3.12); always recorded.
            return Fail::Fault(XFault {
                class: FaultClass::Tt,
                ..XFault::fetch(EventType::FWalkEabt, fetch_addr)
            });
        }
        let may_stall = match self.cfg.stall_model {
            StallModel::TerminateOnly => false,
            StallModel::StallForced => true,
            StallModel::StallAndTerminate => sel.cd.stall && !sel.stalld,
        };
        Fail::Fault(XFault {
            event: event_of(f.kind),
            s2: false,
            class: FaultClass::In,
            ipa: 0,
            fetch_addr: 0,
            ttrnw: false,
            ssid_override: None,
            record: sel.cd.record,
            may_stall,
            termination: if sel.cd.abort {
                Termination::Abort
            } else {
                Termination::RazWi
            },
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn s1_translate(
        &self,
        txn: &Transaction,
        sel: &S1Sel,
        s2: Option<&S2Config>,
        ctx: Ctx,
        access: Access,
        (privcfg, instcfg): (AttrOverride, AttrOverride),
        want_fill: bool,
        probed: Option<[u64; 2]>,
    ) -> Result<(Resolved, bool), Fail> {
        let va = txn.addr;
        let entry = self.s1_entry(va, sel, s2, ctx, access, probed)?;
        // Permissions: stage 1 first, then stage 2 (IHI0070 7.3.22: the final stage-1
        // descriptor's F_PERMISSION comes before any fault of the output IPA's stage 2); a
        // stage-2 permission fault on the output is CLASS = IN with the IPA. A walk has
        // already checked stage 1 (before translating the output); a hit checks it here.
        if let Some((p, ctl, level)) = entry.perms.s1
            && check_s1(p, access, ctl).is_err()
        {
            return Err(self.s1_fault(
                sel,
                twinmmu_vmsa::Fault::new(FaultKind::Permission, level, Stage::Stage1),
            ));
        }
        if let (Some((p, level, _)), Some(s2)) = (entry.perms.s2, s2)
            && check_s2(p, access).is_err()
        {
            let ipa = entry.ipa_base | (va & (entry.size() - 1));
            return Err(self.s2_fault(
                s2,
                twinmmu_vmsa::Fault::new(FaultKind::Permission, level, Stage::Stage2),
                ipa,
                FaultClass::In,
            ));
        }
        Ok((
            Resolved {
                pa: entry.output(va),
                fill: want_fill.then(|| Fill {
                    in_base: entry.in_base,
                    shift: entry.shift,
                    out_base: entry.out_base,
                    allowed: allowed_mask(&entry.perms, privcfg, instcfg),
                }),
            },
            entry.ctx.asid().is_none(),
        ))
    }

    /// The stage-1 (or nested combined) entry translating `va`: the main TLB, else a walk
    /// (which inserts it). No permission check beyond the nested walk's stage-1 check for
    /// `access` (IHI0070 7.3.22). `probed`: ids the hit path has just probed and missed.
    pub(crate) fn s1_entry(
        &self,
        va: u64,
        sel: &S1Sel,
        s2: Option<&S2Config>,
        ctx: Ctx,
        access: Access,
        probed: Option<[u64; 2]>,
    ) -> Result<TlbEntry, Fail> {
        let key_va = tbi_key(
            va,
            [
                sel.cd.walk.tbi(twinmmu_vmsa::Ttb::Ttb0),
                sel.cd.walk.tbi(twinmmu_vmsa::Ttb::Ttb1),
            ],
        );
        // The hit path's probe (same tag, same ids under this generation) already missed.
        match self.tlb_lookup_from(ctx, key_va, probed) {
            Some(e) => {
                inc(&self.counters.tlb_hits);
                Ok(e)
            }
            None => {
                inc(&self.counters.tlb_misses);
                self.s1_walk(va, key_va, sel, s2, ctx, access)
            }
        }
    }

    /// Walks stage 1 (and stage 2 for every table address and the output, when nested),
    /// inserts the resulting entry and returns it. When nested, the stage-1 permission
    /// check for `access` comes between the stage-1 walk and stage 2 of the output IPA
    /// (IHI0070 7.3.22); the stage-2 permission check on the output is the caller's.
    fn s1_walk(
        &self,
        va: u64,
        key_va: u64,
        sel: &S1Sel,
        s2: Option<&S2Config>,
        ctx: Ctx,
        access: Access,
    ) -> Result<TlbEntry, Fail> {
        // Read before any walk: what the walks read is inserted only if no invalidation
        // ran since.
        let gen0 = self.tlb_gen.load(Ordering::Acquire);
        let mut batch = Batch::default();
        let r = self.s1_walk_in(va, key_va, sel, s2, ctx, access, &mut batch);
        // The stage-2 entries of the walk and its stage-1 (or combined) entry go in
        // together, also when a later step faulted: one acquisition of the store lock.
        let conflict =
            self.tlb_insert_walk(batch.entries(), r.as_ref().ok().map(|e| (e, ctx)), gen0);
        if conflict {
            // IHI0070 3.20.1: the lookup would match more than one entry (tables changed
            // without break-before-make and invalidation): the transaction aborts with
            // F_TLB_CONFLICT and the new entry is not cached.
            return Err(Fail::Fault(XFault::config(EventType::FTlbConflict)));
        }
        r
    }

    /// Inserts a walk's stage-2 `entries`, then its final entry (`last`, made for lookups
    /// of context `tag`) unless that conflicts with entries already cached (returns true
    /// then); nothing if an invalidation ran since `gen0` (read before the walks that made
    /// them began). Under one acquisition of the store lock.
    fn tlb_insert_walk<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a TlbEntry>,
        last: Option<(&TlbEntry, Ctx)>,
        gen0: u64,
    ) -> bool {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_none() && last.is_none() {
            return false;
        }
        let mut t = self.tlb.lock();
        // An invalidation since the walk started may have covered what it read.
        if self.tlb_gen.load(Ordering::Acquire) != gen0 {
            return false;
        }
        // Under the store lock the generation is exact for the ids read there.
        let generation = self.ctx_gen.load(Ordering::Acquire);
        for e in entries {
            self.insert_locked(&mut t, e, generation);
        }
        let Some((e, tag)) = last else {
            return false;
        };
        // A lookup of an ASID-tagged context (`tag`) also matches its global twin: a new
        // entry conflicts with entries of the other one too.
        let twin = if e.ctx != tag {
            Some(tag)
        } else {
            tag.asid().map(|_| tag.global())
        };
        if t.conflicts(e, twin) {
            return true;
        }
        self.insert_locked(&mut t, e, generation);
        false
    }

    /// [`Smmu::s1_walk`] before the insertion: the entries it makes go into `batch`.
    #[allow(clippy::too_many_arguments)]
    fn s1_walk_in(
        &self,
        va: u64,
        key_va: u64,
        sel: &S1Sel,
        s2: Option<&S2Config>,
        ctx: Ctx,
        access: Access,
        batch: &mut Batch,
    ) -> Result<TlbEntry, Fail> {
        inc(&self.counters.walks_s1);
        let mem = WalkMem(&*self.mem);
        let w = match s2 {
            None => {
                // The hook sees each descriptor address before it is read: an exact count
                // of the reads per level.
                let mut count = |pa: u64, level: u8| -> Result<u64, std::convert::Infallible> {
                    inc(&self.counters.desc_reads[usize::from(level & 3)]);
                    Ok(pa)
                };
                walk_stage1(&sel.cd.walk, &mem, &mut count, va).map_err(|e| match e {
                    WalkError::Fault(f) => Ok(f),
                    WalkError::TableFetch { error, .. } => match error {},
                })
            }
            Some(s2c) => {
                let mut hook = |ipa: u64, level: u8| -> Result<u64, Fail> {
                    // Each stage-1 table address is an IPA translated by stage 2: CLASS = TT
                    // (IHI0070 3.3.3, 7.3.13).
                    let h = self.s2_translate(
                        s2c,
                        ipa,
                        Access::new(AccessKind::Read, true),
                        FaultClass::Tt,
                        Some(&mut *batch),
                    )?;
                    // STE.S2PTW: a walk access to Device memory is a stage-2 Permission
                    // fault (IHI0070 5.2 S2PTW).
                    if s2c.ptw && h.device {
                        return Err(self.s2_fault(
                            s2c,
                            twinmmu_vmsa::Fault::new(FaultKind::Permission, h.level, Stage::Stage2),
                            ipa,
                            FaultClass::Tt,
                        ));
                    }
                    inc(&self.counters.desc_reads[usize::from(level & 3)]);
                    Ok(h.pa)
                };
                walk_stage1(&sel.cd.walk, &mem, &mut hook, va).map_err(|e| match e {
                    WalkError::Fault(f) => Ok(f),
                    WalkError::TableFetch { error, .. } => Err(error),
                })
            }
        };
        let t = match w {
            Ok(t) => t,
            Err(Ok(f)) => return Err(self.s1_fault(sel, f)),
            Err(Err(fail)) => return Err(fail),
        };
        let (s1perms, ctl) = if sel.world == World::El2 {
            // The EL2 regime (DDI0487 D8.4): one XN bit (bit 54, UXN's place, with
            // XNTable), no EL0 permission, no PXN and no PAN.
            let p = t.perms;
            (
                S1Perms::new(p.read_only(), false, p.uxn(), p.uxn()),
                twinmmu_vmsa::S1Controls {
                    wxn: sel.cd.walk.controls().wxn,
                    pan: false,
                },
            )
        } else {
            (t.perms, sel.cd.walk.controls())
        };
        let s2_out = match s2 {
            None => None,
            Some(s2c) => {
                // IHI0070 7.3.22 (nested walk, steps 4 and 5): the final stage-1
                // descriptor's F_ACCESS and F_PERMISSION come before anything stage 2 of
                // the output IPA can raise; that walk only happens once stage 1 has
                // granted the access. So a stage-1 Permission fault is reported (S2 = 0)
                // even when the output IPA would also fault at stage 2.
                if check_s1(s1perms, access, ctl).is_err() {
                    return Err(self.s1_fault(
                        sel,
                        twinmmu_vmsa::Fault::new(FaultKind::Permission, t.level, Stage::Stage1),
                    ));
                }
                // Stage 2 of the output IPA. Its permission check is done on the combined
                // entry by the caller (an entry whose stage 2 denies this access still
                // caches, for the accesses it allows).
                let h = self.s2_entry(s2c, t.output, FaultClass::In, Some(batch))?;
                Some(OutputStage2 {
                    pa: h.pa,
                    shift: h.shift,
                    perms: h.perms,
                    level: h.level,
                    device: h.device,
                })
            }
        };
        // Global (nG = 0) entries are tagged with no ASID; nested ones are the size of the
        // smaller stage.
        Ok(TlbEntry::from_stage1(
            ctx,
            key_va,
            &t,
            (s1perms, ctl),
            s2_out,
        ))
    }

    /// Walks stage 2 for `ipa`, counting every descriptor read by level, and caches the
    /// result as an S2 entry of `ctx`: into `batch`, or at once unless an invalidation ran
    /// meanwhile.
    fn s2_walk(
        &self,
        s2: &S2Config,
        ipa: u64,
        ctx: Ctx,
        batch: Option<&mut Batch>,
    ) -> Result<S2Hit, twinmmu_vmsa::Fault> {
        let gen0 = self.tlb_gen.load(Ordering::Acquire);
        inc(&self.counters.walks_s2);
        let mut count = |pa: u64, level: u8| -> Result<u64, std::convert::Infallible> {
            inc(&self.counters.desc_reads[4 + usize::from(level & 3)]);
            Ok(pa)
        };
        let t =
            walk_stage2_with(&s2.walk, &WalkMem(&*self.mem), &mut count, ipa).map_err(
                |e| match e {
                    WalkError::Fault(f) => f,
                    WalkError::TableFetch { error, .. } => match error {},
                },
            )?;
        // FEAT_S2FWB is not implemented: MemAttr[3:2] = 0b00 is Device.
        let e = TlbEntry::from_stage2(ctx, &t, t.attrs.is_device());
        let h = S2Hit::of(&e, ipa);
        match batch {
            Some(b) => b.push(self, e, gen0),
            None => self.tlb_insert(e, gen0),
        }
        Ok(h)
    }
}

/// The entries one nested translation makes (stage 2 of each stage-1 table IPA and of the
/// output, then the combined entry), inserted together at its end under one acquisition of
/// the store lock. Its own later stage-2 lookups see them (two table IPAs in one stage-2
/// block, say).
#[derive(Default)]
pub(crate) struct Batch {
    n: usize,
    // `Option`s: a new batch only marks its slots empty (no 8-entry initialisation).
    e: [Option<TlbEntry>; 8],
}

impl Batch {
    fn entries(&self) -> impl Iterator<Item = &TlbEntry> {
        self.e[..self.n].iter().flatten()
    }

    /// Adds `e`; a full batch is inserted first (made under `gen0`).
    fn push(&mut self, smmu: &Smmu, e: TlbEntry, gen0: u64) {
        if self.n == self.e.len() {
            smmu.tlb_insert_all(self.entries(), gen0);
            self.n = 0;
        }
        self.e[self.n] = Some(e);
        self.n += 1;
    }

    fn find(&self, ctx: Ctx, addr: u64) -> Option<TlbEntry> {
        self.entries()
            .find(|e| e.ctx == ctx && e.covers(addr))
            .copied()
    }
}

/// What the slow path knows from the hit path's attempt.
struct Slow {
    /// The configuration generation loaded before anything was read.
    generation: u64,
    /// The stream's hit context, if the cache held one.
    known: Option<HitCtx>,
    /// The hit path probed the array with that context's ids and found no entry.
    array_missed: bool,
}

/// The TLB tag of a stage-1 (or nested) stream's entries. IHI0070 3.17: NS-EL1 entries
/// carry the VMID and (non-global) the ASID; EL2-E2H entries the ASID only; EL2 entries
/// neither, nor an ASET (permitted, not required).
pub(crate) fn s1_tag(sel: &S1Sel, nested: bool, vmid: u16) -> Ctx {
    let kind = if nested { Kind::Nested } else { Kind::S1 };
    let (vm, asid, aset) = match sel.world {
        World::NsEl1 => (vmid, Some(sel.cd.asid), sel.cd.aset),
        World::El2 => (0, None, false),
        World::El2E2h => (0, Some(sel.cd.asid), sel.cd.aset),
    };
    Ctx::new(sel.world, kind, vm, asid, aset)
}

/// A fingerprint of an STE's 64 bytes with CONT (dword 1 bits \[16:13\]) cleared: equal
/// for STEs that are identical in the sense of STE.CONT. A collision only hides a conflict,
/// which an implementation need not detect (IHI0070 3.20.2).
fn ste_fingerprint(d: &[u64; 8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    for (i, w) in d.iter().enumerate() {
        let w = if i == 1 { w & !(0xf << 13) } else { *w };
        w.hash(&mut h);
    }
    h.finish()
}

/// What `op` finally did when terminated by `t` after fault `event`: RAZ/WI completes a
/// read with zeros and a write as done, anything else fails.
fn terminated(op: &PendingOp, event: EventType, recorded: bool, t: Termination) -> StallResult {
    match (op, t) {
        (PendingOp::Read { len }, Termination::RazWi) => StallResult::Read(vec![0; *len]),
        (PendingOp::Write { .. }, Termination::RazWi) => StallResult::Written,
        (_, t) => StallResult::Failed(DmaError::Fault {
            event,
            recorded,
            termination: t,
        }),
    }
}

// Device threads, ports and the command path share one Smmu: checked at compile time.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Smmu>();
};
