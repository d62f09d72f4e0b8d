//! The DVM interconnect: broadcast TLB maintenance between PEs and SMMUs (DDI0487 D8.13;
//! IHI0070 3.17; smmu_kvm.md §4.11).
//!
//! A `TLBI …IS` executed by one PE is a DVM message that reaches every PE in the Inner
//! Shareable domain, the issuer included, and every SMMU attached to the interconnect (an
//! SMMU acts on it only with IDR0.BTM = 1 and CR2.PTM = 0). The TLBI itself only *posts*
//! the message: the architecture guarantees nothing until the issuer's `DSB ISH`, which
//! completes only when every recipient has applied every TLBI the issuer posted before it.
//!
//! The model keeps that split and makes it hold under concurrency:
//! - each recipient has an inbox (a sequence number per message posted, and the highest
//!   sequence number applied);
//! - a recipient's inbox is applied in order with the inbox locked (for a PE, under its TLB
//!   write lock too), and the applied sequence number is published only after the entries
//!   are gone;
//! - a DSB, for each recipient, compares the applied number with the posted one and, if the
//!   recipient is behind, drains the inbox itself. The inbox lock serialises drains, so
//!   when a DSB sees `applied ≥ posted` (or has drained itself) every message it posted is
//!   applied — no matter which thread applied it;
//! - a PE walk that started before an invalidation does not insert its result after it
//!   (the PE's TLB generation, as the SMMU's), so once the DSB returns no recipient holds,
//!   or later gains, an entry from tables older than the maintenance.
//!
//! An inbox that fills up ([`DvmConfig::inbox_capacity`]) is drained by the poster: the
//! interconnect's buffering is finite, and back-pressure reaches the issuer.
//!
//! Counters: broadcasts issued (per TLBI op), DSBs, and per recipient the messages received,
//! those acted on (an SMMU may ignore them) and the entries removed. A completed broadcast
//! also reports what it removed ([`DvmReport`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::cmd::TlbiRange;
pub use crate::dvm::TlbiInsn;
use crate::dvm::{Tlbi, TlbiOp};
use crate::mem::PhysMem;
use crate::pe::{Pe, PeConfig, Regime};
use crate::smmu::Smmu;

/// What a broadcast, or every broadcast a DSB completed, did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DvmReport {
    /// TLBI messages completed.
    pub tlbis: u64,
    /// Recipient applications (one per message per recipient).
    pub deliveries: u64,
    /// PE TLB entries removed.
    pub pe_removed: u64,
    /// SMMU applications that acted on the message (IDR0.BTM = 1, CR2.PTM = 0).
    pub smmu_honoured: u64,
    /// SMMU main-TLB entries removed.
    pub smmu_removed: u64,
}

impl DvmReport {
    /// Entries removed by every recipient.
    pub fn removed(&self) -> u64 {
        self.pe_removed + self.smmu_removed
    }

    /// Adds a completed message's record (every recipient has applied it).
    fn add(&mut self, c: &Completion) {
        self.tlbis += 1;
        self.deliveries += c.recipients;
        self.pe_removed += c.pe_removed.load(Ordering::Acquire);
        self.smmu_honoured += c.smmu_honoured.load(Ordering::Acquire);
        self.smmu_removed += c.smmu_removed.load(Ordering::Acquire);
    }
}

/// The per-message record the recipients fill in as they apply it (only what is not
/// zero, so a TLBI that removes nothing costs no shared write per recipient).
#[derive(Debug, Default)]
pub(crate) struct Completion {
    /// Recipients it was posted to.
    recipients: u64,
    pe_removed: AtomicU64,
    smmu_honoured: AtomicU64,
    smmu_removed: AtomicU64,
}

impl Completion {
    pub(crate) fn pe_applied(&self, removed: usize) {
        if removed > 0 {
            self.pe_removed.fetch_add(removed as u64, Ordering::Relaxed);
        }
    }

    fn smmu_applied(&self, removed: Option<usize>) {
        if let Some(n) = removed {
            self.smmu_honoured.fetch_add(1, Ordering::Relaxed);
            if n > 0 {
                self.smmu_removed.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// One DVM message in flight.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) tlbi: Tlbi,
    pub(crate) done: Arc<Completion>,
}

/// What the inbox lock protects. The counters are written only here: plain integers.
#[derive(Debug, Default)]
struct Queue {
    items: Vec<Message>,
    posted: u64,
    received: u64,
    acted: u64,
    removed: u64,
    drains: u64,
}

/// A recipient's inbox. Messages are applied with the queue locked (the lock serialises
/// drains, and the buffer keeps its capacity); `applied` is stored (Release) only after
/// they are.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    queue: Mutex<Queue>,
    /// Sequence number of the last message posted (mirror of `queue.posted`).
    posted: AtomicU64,
    /// Sequence number of the last message applied.
    applied: AtomicU64,
}

impl Inbox {
    /// Posts a message; returns how many wait in the inbox.
    fn post(&self, m: Message) -> usize {
        let mut q = self.queue.lock();
        q.items.push(m);
        q.posted += 1;
        self.posted.store(q.posted, Ordering::Release);
        q.items.len()
    }

    /// Messages posted but not yet applied.
    fn behind(&self) -> bool {
        self.applied.load(Ordering::Acquire) < self.posted.load(Ordering::Acquire)
    }

    /// Applies every waiting message in order with `apply` (which returns whether the
    /// recipient acted on it and the entries it removed), then publishes the sequence
    /// number reached. Returns whether there was anything. A PE calls this with its TLB
    /// write lock held.
    pub(crate) fn drain(&self, mut apply: impl FnMut(&Message) -> (bool, usize)) -> bool {
        let mut q = self.queue.lock();
        if q.items.is_empty() {
            return false;
        }
        let (mut acted, mut removed) = (0u64, 0u64);
        for m in &q.items {
            let (a, n) = apply(m);
            acted += u64::from(a);
            removed += n as u64;
        }
        q.received += q.items.len() as u64;
        q.acted += acted;
        q.removed += removed;
        q.drains += 1;
        q.items.clear();
        self.applied.store(q.posted, Ordering::Release);
        true
    }

    /// The recipient's counters, and how many drains it has had.
    pub(crate) fn stats(&self) -> (RecipientStats, u64) {
        let q = self.queue.lock();
        (
            RecipientStats {
                received: q.received,
                acted: q.acted,
                removed: q.removed,
                pending: q.items.len() as u64,
            },
            q.drains,
        )
    }
}

/// An SMMU's DVM port.
struct SmmuPort {
    smmu: Arc<Smmu>,
    inbox: Inbox,
}

impl SmmuPort {
    fn drain(&self) {
        self.inbox.drain(|m| {
            let r = self.smmu.broadcast_counted(m.tlbi);
            m.done.smmu_applied(r);
            (r.is_some(), r.unwrap_or(0))
        });
    }
}

/// Per-recipient counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecipientStats {
    /// Messages applied (for an SMMU: delivered to its DVM port).
    pub received: u64,
    /// Messages acted on: every one for a PE; for an SMMU, those it honoured.
    pub acted: u64,
    /// TLB entries the messages removed.
    pub removed: u64,
    /// Messages posted and not yet applied.
    pub pending: u64,
}

/// Interconnect counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DvmStats {
    /// `TLBI …IS` messages issued.
    pub broadcasts: u64,
    /// Broadcasts by operation, in [`TlbiOp::ALL`] order, operations never issued left out.
    pub by_op: Vec<(TlbiOp, u64)>,
    /// DSBs that completed broadcasts (each synchronous [`Dvm::broadcast`] counts one).
    pub dsbs: u64,
    /// Inbox drains (by a DSB, or by a poster finding an inbox full), over every
    /// recipient.
    pub drains: u64,
    /// Per PE, in PE order.
    pub pes: Vec<RecipientStats>,
    /// Per attached SMMU, in attachment order.
    pub smmus: Vec<RecipientStats>,
}

/// A TLBI the interconnect refused to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DvmError {
    #[error("PE {pe} does not exist ({count} PEs)")]
    NoSuchPe { pe: usize, count: usize },
    /// The instruction is UNDEFINED in the issuing context (an EL2 operation at EL1, or a
    /// range form without FEAT_TLBIRANGE); a real PE takes an exception instead.
    #[error("TLBI {} is UNDEFINED at {regime}", op.name())]
    Undefined { op: TlbiOp, regime: Regime },
    /// A range form without its range, or a range on a non-range form.
    #[error("TLBI {}: {}", op.name(), if op.is_range() { "a range form needs a range" } else { "only range forms take a range" })]
    RangeOperand { op: TlbiOp },
    /// TG is not 4K/16K/64K (12, 14, 16), or NUM/SCALE do not fit their 5-bit fields.
    #[error("TLBI {}: bad range (granule shift {}, NUM {}, SCALE {})", op.name(), range.tg_shift, range.num, range.scale)]
    BadRange { op: TlbiOp, range: TlbiRange },
}

/// Checks what the message carries can be applied: a range form has a well-formed range.
fn check_operands(t: &Tlbi) -> Result<(), DvmError> {
    match (t.op.is_range(), t.range) {
        (true, None) | (false, Some(_)) => Err(DvmError::RangeOperand { op: t.op }),
        (true, Some(r)) => {
            if matches!(r.tg_shift, 12 | 14 | 16) && r.num < 32 && r.scale < 32 {
                Ok(())
            } else {
                Err(DvmError::BadRange { op: t.op, range: r })
            }
        }
        (false, None) => Ok(()),
    }
}

/// How to build a [`Dvm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DvmConfig {
    /// PEs in the Inner Shareable domain.
    pub pes: usize,
    /// Every PE's configuration.
    pub pe: PeConfig,
    /// Messages an inbox holds before the poster drains it.
    pub inbox_capacity: usize,
}

impl DvmConfig {
    /// `pes` PEs with the default [`PeConfig`], 64-message inboxes.
    pub fn new(pes: usize) -> Self {
        DvmConfig {
            pes,
            pe: PeConfig::default(),
            inbox_capacity: 64,
        }
    }
    pub fn pe(mut self, pe: PeConfig) -> Self {
        self.pe = pe;
        self
    }
    pub fn inbox_capacity(mut self, n: usize) -> Self {
        self.inbox_capacity = n.max(1);
        self
    }
}

/// The DVM interconnect with its PEs and the SMMUs attached to it.
pub struct Dvm {
    pes: Box<[Arc<Pe>]>,
    smmus: RwLock<Vec<Arc<SmmuPort>>>,
    inbox_capacity: usize,
    broadcasts: AtomicU64,
    by_op: [AtomicU64; TlbiOp::ALL.len()],
    dsbs: AtomicU64,
}

impl std::fmt::Debug for Dvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dvm")
            .field("pes", &self.pes.len())
            .field("smmus", &self.smmus.read().len())
            .finish_non_exhaustive()
    }
}

impl Dvm {
    /// An interconnect with `config.pes` PEs (ids 0..) reaching `mem`, and no SMMU.
    pub fn new(config: DvmConfig, mem: Arc<dyn PhysMem>) -> Arc<Dvm> {
        Arc::new(Dvm {
            pes: (0..config.pes)
                .map(|id| Arc::new(Pe::new(id, config.pe, Arc::clone(&mem))))
                .collect(),
            smmus: RwLock::new(Vec::new()),
            inbox_capacity: config.inbox_capacity.max(1),
            broadcasts: AtomicU64::new(0),
            by_op: std::array::from_fn(|_| AtomicU64::new(0)),
            dsbs: AtomicU64::new(0),
        })
    }

    pub fn pes(&self) -> &[Arc<Pe>] {
        &self.pes
    }

    pub fn pe(&self, id: usize) -> Result<&Arc<Pe>, DvmError> {
        self.pes.get(id).ok_or(DvmError::NoSuchPe {
            pe: id,
            count: self.pes.len(),
        })
    }

    /// Connects an SMMU's DVM port; returns its index in [`DvmStats::smmus`]. Broadcasts
    /// posted from now on reach it.
    pub fn attach_smmu(&self, smmu: Arc<Smmu>) -> usize {
        let mut v = self.smmus.write();
        v.push(Arc::new(SmmuPort {
            smmu,
            inbox: Inbox::default(),
        }));
        v.len() - 1
    }

    pub fn smmu_count(&self) -> usize {
        self.smmus.read().len()
    }

    /// `TLBI <op>IS` executed by PE `issuer` in its current context: the VMID is its
    /// VTTBR_EL2.VMID; in a VHE host (EL2&0) the EL1 forms act on EL2&0; EL2 forms are
    /// UNDEFINED at EL1. Posts the message and returns it; it is complete only after the
    /// issuer's [`Dvm::dsb`].
    pub fn tlbi(&self, issuer: usize, insn: TlbiInsn) -> Result<Tlbi, DvmError> {
        let pe = self.pe(issuer)?;
        let t = pe.tlbi_message(insn)?;
        check_operands(&t)?;
        let done = self.post(t);
        pe.outstanding.lock().push(done);
        Ok(t)
    }

    /// `DSB ISH` on PE `issuer`: returns once every recipient has applied every TLBI the PE
    /// posted before it, with what they did.
    pub fn dsb(&self, issuer: usize) -> Result<DvmReport, DvmError> {
        let pe = self.pe(issuer)?;
        let outstanding = std::mem::take(&mut *pe.outstanding.lock());
        self.complete_all();
        let mut report = DvmReport::default();
        for c in &outstanding {
            report.add(c);
        }
        Ok(report)
    }

    /// `TLBI …IS; DSB ISH` from PE `issuer` in its current context.
    pub fn tlbi_sync(&self, issuer: usize, insn: TlbiInsn) -> Result<DvmReport, DvmError> {
        self.tlbi(issuer, insn)?;
        self.dsb(issuer)
    }

    /// Broadcasts the message `t` as it is and completes it (`TLBI …IS; DSB ISH`), for
    /// EL2 software that has set the context itself: KVM loads the target VM's VMID into
    /// VTTBR_EL2 around its stage-2 maintenance (`enter_vmid_context`), and issues `TLBI
    /// ALLE1IS` at rollover. `issuer` is the PE it runs on, `None` when not tied to one;
    /// it does not change what the message does. The PE's own pending TLBIs are not
    /// part of the report (they complete here all the same).
    pub fn broadcast(&self, issuer: Option<usize>, t: Tlbi) -> Result<DvmReport, DvmError> {
        self.broadcast_all(issuer, &[t])
    }

    /// [`Dvm::broadcast`] of several messages with one DSB after the last (`TLBI; TLBI;
    /// …; DSB ISH`). Every message is checked before any is posted.
    pub fn broadcast_all(&self, issuer: Option<usize>, ts: &[Tlbi]) -> Result<DvmReport, DvmError> {
        if let Some(i) = issuer {
            self.pe(i)?;
        }
        for t in ts {
            check_operands(t)?;
        }
        let done: Vec<_> = ts.iter().map(|&t| self.post(t)).collect();
        self.complete_all();
        let mut report = DvmReport::default();
        for d in &done {
            report.add(d);
        }
        Ok(report)
    }

    /// Posts `t`, whose operands the caller checked ([`check_operands`]), to every PE and
    /// every attached SMMU.
    fn post(&self, t: Tlbi) -> Arc<Completion> {
        let smmus = self.smmus.read();
        let done = Arc::new(Completion {
            recipients: (self.pes.len() + smmus.len()) as u64,
            ..Completion::default()
        });
        let m = Message {
            tlbi: t,
            done: Arc::clone(&done),
        };
        self.broadcasts.fetch_add(1, Ordering::Relaxed);
        // TlbiOp::ALL is in declaration order: an operation's discriminant is its index.
        self.by_op[t.op as usize].fetch_add(1, Ordering::Relaxed);
        for pe in self.pes.iter() {
            if pe.inbox.post(m.clone()) >= self.inbox_capacity {
                pe.drain();
            }
        }
        for s in smmus.iter() {
            if s.inbox.post(m.clone()) >= self.inbox_capacity {
                s.drain();
            }
        }
        done
    }

    /// The completion half of a DSB: every recipient that is behind is drained. After this
    /// returns, every message posted before the call has been applied.
    fn complete_all(&self) {
        self.dsbs.fetch_add(1, Ordering::Relaxed);
        for pe in self.pes.iter() {
            if pe.inbox.behind() {
                pe.drain();
            }
        }
        for s in self.smmus.read().iter() {
            if s.inbox.behind() {
                s.drain();
            }
        }
    }

    pub fn stats(&self) -> DvmStats {
        let pes: Vec<(RecipientStats, u64)> = self.pes.iter().map(|p| p.inbox.stats()).collect();
        let smmus: Vec<(RecipientStats, u64)> =
            self.smmus.read().iter().map(|s| s.inbox.stats()).collect();
        DvmStats {
            broadcasts: self.broadcasts.load(Ordering::Relaxed),
            by_op: TlbiOp::ALL
                .iter()
                .zip(&self.by_op)
                .map(|(&op, n)| (op, n.load(Ordering::Relaxed)))
                .filter(|&(_, n)| n > 0)
                .collect(),
            dsbs: self.dsbs.load(Ordering::Relaxed),
            drains: pes.iter().chain(&smmus).map(|&(_, d)| d).sum(),
            pes: pes.into_iter().map(|(s, _)| s).collect(),
            smmus: smmus.into_iter().map(|(s, _)| s).collect(),
        }
    }
}
