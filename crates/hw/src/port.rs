//! DMA ports with a micro-TLB: the TBU in front of the SMMU's main TLB (MMU-600/700 put a
//! small per-port TLB in each TBU and the walker and main TLB in the shared TCU).
//!
//! A [`DmaPort`] belongs to one device thread (`&mut self`, no lock). Its micro-TLB is
//! direct-mapped, holds 4 KiB pages keyed by (StreamID, SubstreamID, page), each with the
//! set of incoming (access, privilege) combinations the full translation allowed, and is
//! validated against the SMMU's invalidation epoch:
//!
//! - every change that can make a translation stale (TLB or configuration invalidation,
//!   CR0/GBPA/STRTAB/CR2 write, broadcast TLBI) updates the main caches under their locks
//!   and *then* increments `epoch` with Release ordering, before the command is consumed;
//! - a port loads `epoch` with Acquire *before* it consults its entries or the main
//!   caches, and tags a fill with that value;
//! - so a fill made from state read before an invalidation carries an epoch older than the
//!   one the invalidation published and is never used after it; and any translation that
//!   starts after software observed the CMD_SYNC consumed (which happens after the
//!   Release) loads the new epoch and misses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use twinmmu_vmsa::AccessKind;

use crate::smmu::Smmu;
use crate::xlate::{DmaError, Outcome, PendingOp, Termination, Transaction, access_bit};

#[derive(Debug, Clone, Copy, Default)]
struct UEntry {
    epoch: u64,
    page: u64,
    sid: u32,
    ssid: u32,
    out_page: u64,
    allowed: u8,
}

const NO_SSID: u32 = u32::MAX;

/// One device's port into the SMMU, with its micro-TLB.
pub struct DmaPort {
    smmu: Arc<Smmu>,
    entries: Box<[UEntry]>,
    mask: usize,
    hits: Arc<AtomicU64>,
}

impl std::fmt::Debug for DmaPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaPort")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

#[inline(always)]
fn slot(sid: u32, ssid: u32, page: u64, mask: usize) -> usize {
    // A multiplicative hash of the page mixed with the stream; pages of one stream spread
    // over consecutive slots.
    let h = page ^ (u64::from(sid) << 20).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(ssid);
    (h as usize) & mask
}

impl Smmu {
    /// A new DMA port (a TBU) with `utlb_entries` micro-TLB entries.
    pub fn port(self: &Arc<Self>) -> DmaPort {
        let n = self.cfg.utlb_entries.max(1).next_power_of_two();
        let hits = Arc::new(AtomicU64::new(0));
        self.register_port_counter(&hits);
        DmaPort {
            smmu: self.clone(),
            entries: vec![UEntry::default(); n].into_boxed_slice(),
            mask: n - 1,
            hits,
        }
    }
}

impl DmaPort {
    pub fn smmu(&self) -> &Arc<Smmu> {
        &self.smmu
    }

    /// Translates one transaction: a micro-TLB hit costs one atomic load and one compare;
    /// a miss goes to the SMMU (configuration cache, main TLB, walk).
    #[inline]
    pub fn translate(&mut self, txn: Transaction) -> Outcome {
        // Acquire pairs with the Release increment after every invalidation.
        let epoch = self.smmu.epoch.load(Ordering::Acquire);
        let page = txn.addr >> 12;
        let ssid = txn.ssid.unwrap_or(NO_SSID);
        let i = slot(txn.sid, ssid, page, self.mask);
        let e = self.entries[i];
        if e.epoch == epoch
            && e.page == page
            && e.sid == txn.sid
            && e.ssid == ssid
            && e.allowed & access_bit(txn.kind, txn.privileged) != 0
        {
            // Single writer: a plain load and store, no read-modify-write.
            self.hits
                .store(self.hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return Outcome::Translated {
                pa: e.out_page | (txn.addr & 0xfff),
            };
        }
        self.miss(txn, epoch, i, || PendingOp::Translate)
    }

    #[cold]
    fn miss(
        &mut self,
        txn: Transaction,
        epoch: u64,
        i: usize,
        op: impl FnOnce() -> PendingOp,
    ) -> Outcome {
        match self.smmu.resolve(&txn, true) {
            Ok(r) => {
                if let Some(f) = r.fill {
                    self.entries[i] = UEntry {
                        epoch,
                        page: txn.addr >> 12,
                        sid: txn.sid,
                        ssid: txn.ssid.unwrap_or(NO_SSID),
                        out_page: r.pa & !0xfff,
                        allowed: f.allowed,
                    };
                }
                Outcome::Translated { pa: r.pa }
            }
            Err(f) => self.smmu.fail(&txn, f, op()),
        }
    }

    fn chunk_op(&mut self, txn: Transaction, op: impl FnOnce() -> PendingOp) -> Outcome {
        let epoch = self.smmu.epoch.load(Ordering::Acquire);
        let page = txn.addr >> 12;
        let ssid = txn.ssid.unwrap_or(NO_SSID);
        let i = slot(txn.sid, ssid, page, self.mask);
        let e = self.entries[i];
        if e.epoch == epoch
            && e.page == page
            && e.sid == txn.sid
            && e.ssid == ssid
            && e.allowed & access_bit(txn.kind, txn.privileged) != 0
        {
            self.hits
                .store(self.hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return Outcome::Translated {
                pa: e.out_page | (txn.addr & 0xfff),
            };
        }
        self.miss(txn, epoch, i, op)
    }

    /// DMA read through the port.
    pub fn dma_read(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        buf: &mut [u8],
        privileged: bool,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < buf.len() {
            let a = iova.wrapping_add(done as u64);
            let chunk = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - done);
            let txn = Transaction::new(sid, ssid, a, AccessKind::Read, privileged);
            let len = buf.len() - done;
            let op = move || PendingOp::Read { len };
            match self.chunk_op(txn, op) {
                Outcome::Translated { pa } => self
                    .smmu
                    .mem
                    .read(pa, &mut buf[done..done + chunk])
                    .map_err(|_| DmaError::BusError { pa })?,
                Outcome::Fault {
                    event,
                    recorded,
                    termination,
                } => {
                    if termination == Termination::RazWi {
                        buf[done..].fill(0);
                    }
                    return Err(DmaError::Fault {
                        event,
                        recorded,
                        termination,
                    });
                }
                Outcome::Abort => return Err(DmaError::Abort),
                Outcome::Stalled { stag, event } => {
                    return Err(DmaError::Stalled { stag, event, done });
                }
            }
            done += chunk;
        }
        Ok(())
    }

    /// DMA write through the port.
    pub fn dma_write(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        data: &[u8],
        privileged: bool,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < data.len() {
            let a = iova.wrapping_add(done as u64);
            let chunk = ((0x1000 - (a & 0xfff)) as usize).min(data.len() - done);
            let txn = Transaction::new(sid, ssid, a, AccessKind::Write, privileged);
            let rest = &data[done..];
            let op = move || PendingOp::Write {
                data: rest.to_vec(),
            };
            match self.chunk_op(txn, op) {
                Outcome::Translated { pa } => self
                    .smmu
                    .mem
                    .write(pa, &data[done..done + chunk])
                    .map_err(|_| DmaError::BusError { pa })?,
                Outcome::Fault {
                    event,
                    recorded,
                    termination,
                } => {
                    return Err(DmaError::Fault {
                        event,
                        recorded,
                        termination,
                    });
                }
                Outcome::Abort => return Err(DmaError::Abort),
                Outcome::Stalled { stag, event } => {
                    return Err(DmaError::Stalled { stag, event, done });
                }
            }
            done += chunk;
        }
        Ok(())
    }

    /// Empties the micro-TLB (a TBU reset; never needed for coherence).
    pub fn flush(&mut self) {
        self.entries.fill(UEntry::default());
    }
}
