//! The event and PRI queues (`arm_smmu_evtq_thread`, `arm_smmu_priq_thread`): records read
//! between CONS and PROD, overflow acknowledged by copying OVFLG into CONS.OVACKFLG.
//!
//! Routing (`arm_smmu_handle_event`): the event types iommufd forwards (C_BAD_STE,
//! F_STREAM_DISABLED, C_BAD_SUBSTREAMID, C_BAD_CD, F_TRANSLATION, F_ADDR_SIZE, F_ACCESS,
//! F_PERMISSION) go to the vEVENTQ of the vIOMMU the device is attached through, with the
//! StreamID replaced by the virtual one — unless the fault is the host's stage 2 (S2 = 1),
//! which stays with the host. A stalled transaction becomes a page request to the FAULT path
//! (answered with CMD_RESUME); PRI page requests likewise (answered with CMD_PRI_RESP).

use std::sync::atomic::Ordering;

use twinmmu_iommufd::{PageRequest, PageResponse, fault, veventq_type};

use crate::defs::{self, cmd, evt, priq, q, reg};
use crate::device::ArmSmmuV3;
use crate::master::Master;

/// An SMMU-written queue as the driver tracks it.
#[derive(Debug)]
pub(crate) struct OutQueue {
    pub(crate) base: u64,
    pub(crate) log2: u32,
    pub(crate) cons: u32,
}

impl OutQueue {
    pub(crate) fn new(base: u64, log2: u32) -> Self {
        OutQueue {
            base,
            log2,
            cons: 0,
        }
    }

    pub(crate) fn base_reg(&self) -> u64 {
        q::BASE_RWA
            | defs::prep(q::BASE_ADDR, self.base >> 5)
            | defs::prep(q::BASE_LOG2SIZE, u64::from(self.log2))
    }

    fn mask(&self) -> u32 {
        (1u32 << (self.log2 + 1)) - 1
    }
}

/// What became of one event record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDisposition {
    /// Posted to a vIOMMU's vEVENTQ.
    Forwarded,
    /// Reported as a page request (stall).
    PageRequest,
    /// Kept by the host (logged): not forwardable, no vIOMMU, a stage-2 fault, no device.
    Host,
}

impl ArmSmmuV3 {
    /// The event-queue interrupt handler: drains the event queue and routes each record.
    /// Returns the records read.
    pub fn process_events(&self) -> usize {
        let mut qs = self.evtq.lock();
        let (n, overflowed) =
            self.drain_queue(&mut qs, reg::EVTQ_PROD, reg::EVTQ_CONS, |e: &[u64; 4]| {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                let _ = self.handle_event(e);
            });
        if overflowed {
            self.stats.events_overflows.fetch_add(1, Ordering::Relaxed);
        }
        n
    }

    /// Reads the records of an SMMU-written queue between CONS and PROD, each of `N` 64-bit
    /// words, freeing each slot before handing it to `handle` (`queue_sync_cons_out`).
    /// Returns the records read and whether the queue had overflowed (records were lost);
    /// an overflow is acknowledged by copying PROD.OVFLG into CONS.OVACKFLG.
    fn drain_queue<const N: usize>(
        &self,
        qs: &mut OutQueue,
        prod_reg: u64,
        cons_reg: u64,
        mut handle: impl FnMut(&[u64; N]),
    ) -> (usize, bool) {
        let mask = qs.mask();
        let mut n = 0;
        loop {
            let prod = self.mmio_r32(prod_reg);
            if (prod ^ qs.cons) & mask == 0 {
                let overflowed = (u64::from(prod) ^ u64::from(qs.cons)) & q::OVF != 0;
                if overflowed {
                    qs.cons = (qs.cons & mask) | (prod & q::OVF as u32);
                    self.mmio_w32(cons_reg, qs.cons);
                }
                return (n, overflowed);
            }
            let idx = qs.cons & ((1 << qs.log2) - 1);
            let a = qs.base + u64::from(idx) * 8 * N as u64;
            let mut e = [0u64; N];
            for (i, w) in e.iter_mut().enumerate() {
                *w = self.mem.read_u64(a + 8 * i as u64).unwrap_or(0);
            }
            qs.cons = (qs.cons & !mask) | (qs.cons.wrapping_add(1) & mask);
            self.mmio_w32(cons_reg, qs.cons);
            n += 1;
            handle(&e);
        }
    }

    fn handle_event(&self, e: &[u64; 4]) -> EventDisposition {
        let id = defs::get(evt::ID, e[0]);
        if !evt::forwarded(id) {
            return EventDisposition::Host;
        }
        let sid = defs::get(evt::SID, e[0]) as u32;
        let Some(master) = self.find_master(sid) else {
            return EventDisposition::Host;
        };
        let stall = e[1] & evt::STALL != 0;
        if stall {
            return self.report_stall(&master, e);
        }
        if e[1] & evt::S2 != 0 {
            return EventDisposition::Host;
        }
        let vmaster = master.state.lock().vmaster.clone();
        let Some(vm) = vmaster else {
            return EventDisposition::Host;
        };
        // iommu_vevent_arm_smmuv3: the record with the virtual StreamID.
        let mut rec = [0u8; crate::VEVENT_ARM_SMMUV3_SIZE];
        let d0 = (e[0] & !evt::SID) | defs::prep(evt::SID, vm.vsid);
        rec[..8].copy_from_slice(&d0.to_le_bytes());
        for i in 1..4 {
            rec[8 * i..8 * i + 8].copy_from_slice(&e[i].to_le_bytes());
        }
        match vm.core.report_event(veventq_type::ARM_SMMUV3, &rec) {
            Ok(()) => {
                self.stats.events_forwarded.fetch_add(1, Ordering::Relaxed);
                EventDisposition::Forwarded
            }
            Err(_) => EventDisposition::Host,
        }
    }

    fn report_stall(&self, m: &Master, e: &[u64; 4]) -> EventDisposition {
        let st = m.state.lock();
        let Some(events) = st.events.clone() else {
            drop(st);
            // Nobody to ask: terminate the transaction (arm_smmu_handle_event's failure path).
            let _ = self.issue_cmdlist(&[resume(m.sid, defs::get(evt::STAG, e[1]), false)], true);
            return EventDisposition::Host;
        };
        drop(st);
        let ssv = e[0] & evt::SSV != 0;
        let mut perm = if e[1] & evt::RNW != 0 {
            fault::PERM_READ
        } else {
            fault::PERM_WRITE
        };
        if e[1] & evt::IND != 0 {
            perm |= fault::PERM_EXEC;
        }
        if e[1] & evt::PNU != 0 {
            perm |= fault::PERM_PRIV;
        }
        let stag = defs::get(evt::STAG, e[1]) as u32;
        m.pending_stalls.lock().insert(stag);
        self.stats.page_requests.fetch_add(1, Ordering::Relaxed);
        events.report_page_request(PageRequest {
            flags: fault::FLAG_LAST_PAGE | if ssv { fault::FLAG_PASID_VALID } else { 0 },
            pasid: if ssv {
                defs::get(evt::SSID, e[0]) as u32
            } else {
                0
            },
            grpid: stag,
            perm,
            addr: e[2],
        });
        EventDisposition::PageRequest
    }

    /// The PRI-queue interrupt handler: page requests to the FAULT path
    /// (`arm_smmu_handle_ppr`). Returns the requests read.
    pub fn process_priq(&self) -> usize {
        let Some(pq) = &self.priq else {
            return 0;
        };
        let mut qs = pq.lock();
        let (n, _) = self.drain_queue(&mut qs, reg::PRIQ_PROD, reg::PRIQ_CONS, |e: &[u64; 2]| {
            self.handle_ppr(e[0], e[1]);
        });
        n
    }

    fn handle_ppr(&self, d0: u64, d1: u64) {
        let sid = defs::get(priq::SID, d0) as u32;
        let ssv = d0 & priq::SSID_V != 0;
        let grpid = defs::get(priq::PRG_IDX, d1) as u32;
        let last = d0 & priq::PRG_LAST != 0;
        let master = self.find_master(sid);
        let events = master.as_ref().and_then(|m| m.state.lock().events.clone());
        let Some(events) = events else {
            // No one to handle it: deny, as Linux does for an unknown device.
            if last {
                let _ = self.issue_cmdlist(&[pri_resp(sid, None, grpid, cmd::PRI_RESP_DENY)], true);
            }
            return;
        };
        let mut perm = 0;
        for (bit, p) in [
            (priq::PERM_READ, fault::PERM_READ),
            (priq::PERM_WRITE, fault::PERM_WRITE),
            (priq::PERM_EXEC, fault::PERM_EXEC),
            (priq::PERM_PRIV, fault::PERM_PRIV),
        ] {
            if d0 & bit != 0 {
                perm |= p;
            }
        }
        self.stats.page_requests.fetch_add(1, Ordering::Relaxed);
        events.report_page_request(PageRequest {
            flags: if last { fault::FLAG_LAST_PAGE } else { 0 }
                | if ssv { fault::FLAG_PASID_VALID } else { 0 },
            pasid: if ssv {
                defs::get(priq::SSID, d0) as u32
            } else {
                0
            },
            grpid,
            perm,
            addr: d1 & priq::ADDR,
        });
    }

    /// `arm_smmu_page_response`: CMD_RESUME for a stall, CMD_PRI_RESP for a PRI group.
    pub(crate) fn page_response(&self, m: &Master, resp: &PageResponse) {
        let success = resp.code == fault::RESP_SUCCESS;
        let stall = m.pending_stalls.lock().remove(&resp.grpid);
        let c = if stall {
            resume(m.sid, u64::from(resp.grpid), success)
        } else {
            pri_resp(
                m.sid,
                resp.pasid,
                resp.grpid,
                if success {
                    cmd::PRI_RESP_SUCC
                } else {
                    cmd::PRI_RESP_FAIL
                },
            )
        };
        let _ = self.issue_cmdlist(&[c], true);
    }
}

/// CMD_RESUME: retry on success, abort otherwise.
fn resume(sid: u32, stag: u64, retry: bool) -> [u64; 2] {
    [
        cmd::OP_RESUME
            | defs::prep(cmd::SID, u64::from(sid))
            | defs::prep(
                cmd::RESUME_0_RESP,
                if retry {
                    cmd::RESUME_RESP_RETRY
                } else {
                    cmd::RESUME_RESP_ABORT
                },
            ),
        defs::prep(cmd::RESUME_1_STAG, stag),
    ]
}

fn pri_resp(sid: u32, pasid: Option<u32>, grpid: u32, resp: u64) -> [u64; 2] {
    let mut d0 = cmd::OP_PRI_RESP | defs::prep(cmd::SID, u64::from(sid));
    if let Some(p) = pasid {
        d0 |= cmd::SSV | defs::prep(cmd::SSID, u64::from(p));
    }
    [
        d0,
        defs::prep(cmd::PRI_1_GRPID, u64::from(grpid)) | defs::prep(cmd::PRI_1_RESP, resp),
    ]
}
