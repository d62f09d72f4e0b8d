//! A Tegra241-CMDQV-style HW queue (smmu_kvm.md §5; threads/003): a vIOMMU of type
//! TEGRA241_CMDQV owns a VINTF whose register page (one per vIOMMU, logical queues at a
//! 0x80 stride: CONS, PROD, CONFIG, STATUS, GERROR, GERRORN) lives in a page of host memory
//! that user space maps through the iommufd mmap window and the driver reads. A guest ring
//! lives in the IOAS (pinned, physically contiguous, by the iommufd core).
//!
//! The model has no CMDQV silicon, so the host consumes the ring itself, as threads/003
//! sketches ("the kernel simply reads the cons index after the eventfd, looks in the IOAS to
//! get the queue memory and does the operation"): [`VSmmu::kick`] is the doorbell (an
//! ioeventfd on the page). Only TLBI_NH_ASID, TLBI_NH_VA, ATC_INV and CMD_SYNC are accepted
//! (§5.4), with the VINTF's VMID forced and the StreamID replaced through the VINTF's
//! SID_MATCH/SID_REPLACE slots (the vDEVICEs); they are issued to the main command queue,
//! one host CMD_SYNC per guest CMD_SYNC (and one at the end of what PROD published), and CONS
//! moves past them only once that SYNC has completed. Anything else stops the
//! queue at that command with CONS.ERR = CERROR_ILL and a GERROR toggle on the queue's page,
//! and the LVCMDQ error map is posted to the vIOMMU's TEGRA241_CMDQV vEVENTQ (§5.5). The guest
//! recovers on its page (fix or skip the command, GERRORN = GERROR, kick).

use std::collections::BTreeMap;

use twinmmu_iommufd::{Errno, HwQueueInit, ViommuCore, hw_queue_type, veventq_type};

use crate::CMDQ_BATCH_ENTRIES;
use crate::defs::{self, cmd, q};
use crate::device::{ArmSmmuV3, CmdqvConfig};
use crate::ida::Ida;
use crate::memory::zero;
use crate::viommu::VSmmu;

/// The VINTF page user space maps (the model's page size; Tegra241's page0 is 64 KiB).
pub const VCMDQ_PAGE_SIZE: u64 = 4096;

/// Register offsets of logical queue `lidx` in the VINTF page (smmu_kvm.md §5.1, VCMDQ page0).
pub mod vcmdq_reg {
    pub const STRIDE: u64 = 0x80;
    /// CONS (index + wrap, ERR in bits 30:24 as SMMU_CMDQ_CONS).
    pub const CONS: u64 = 0x0;
    pub const PROD: u64 = 0x4;
    /// CONFIG.EN bit 0.
    pub const CONFIG: u64 = 0x8;
    /// STATUS.ENABLED bit 0.
    pub const STATUS: u64 = 0xC;
    /// GERROR.CMDQ_ERR bit 0, toggled by the host on an error.
    pub const GERROR: u64 = 0x10;
    /// GERRORN: the guest acknowledges by copying GERROR.
    pub const GERRORN: u64 = 0x14;
}

#[derive(Debug, Clone, Copy)]
struct Lvcmdq {
    base_pa: u64,
    log2: u32,
    enabled: bool,
}

/// One VINTF: the vIOMMU's VMID, its page, its logical queues and SID slots.
#[derive(Debug)]
pub(crate) struct Vintf {
    idx: u32,
    vmid: u16,
    page: u64,
    mmap_offset: u64,
    cfg: CmdqvConfig,
    queues: Vec<Option<Lvcmdq>>,
    sid_slots: Ida,
    /// vSID → (slot, physical SID): SID_MATCH / SID_REPLACE.
    vsids: BTreeMap<u64, (u32, u32)>,
    /// LVCMDQ_ERR_MAP: queues with an error pending.
    err_map: u128,
    /// IDR1.CMDQS of the SMMU (the queue size limit).
    cmdqs: u32,
}

impl Vintf {
    /// `tegra241_cmdqv_init_vintf_user`: a free VINTF (ENOSPC), HYP_OWN = 0, VMID = `vmid`,
    /// its page allocated and registered for mmap. Returns the mmap offset.
    pub(crate) fn alloc(
        drv: &ArmSmmuV3,
        core: &ViommuCore,
        vmid: u16,
    ) -> Result<(Vintf, u64), Errno> {
        let cfg = drv.opts.cmdqv.ok_or(Errno::EOPNOTSUPP)?;
        let idx = drv.vintf_ida.lock().alloc().ok_or(Errno::ENOSPC)?;
        let page = match drv.frames.alloc(VCMDQ_PAGE_SIZE) {
            Ok(p) => p,
            Err(_) => {
                drv.vintf_ida.lock().free(idx);
                return Err(Errno::ENOMEM);
            }
        };
        let undo = |e| {
            let _ = drv.frames.free(page, VCMDQ_PAGE_SIZE);
            drv.vintf_ida.lock().free(idx);
            e
        };
        zero(&*drv.mem, page, VCMDQ_PAGE_SIZE).map_err(|_| undo(Errno::EFAULT))?;
        let offset = core.alloc_mmap(page, VCMDQ_PAGE_SIZE).map_err(undo)?;
        let vi = Vintf {
            idx,
            vmid,
            page,
            mmap_offset: offset,
            cfg,
            queues: vec![None; cfg.lvcmdqs_per_vintf as usize],
            sid_slots: Ida::new(0, cfg.sids_per_vintf.saturating_sub(1)),
            vsids: BTreeMap::new(),
            err_map: 0,
            // IDR1.CMDQS is at most 19 (IHI0070 6.3.2).
            cmdqs: (defs::get(defs::idr1::CMDQS, u64::from(drv.feat.idr[1])) as u32).min(19),
        };
        Ok((vi, offset))
    }

    /// Releases what `alloc` took (the vIOMMU never came to be).
    pub(crate) fn free(self, drv: &ArmSmmuV3, core: &ViommuCore) {
        core.destroy_mmap(self.mmap_offset);
        let _ = drv.frames.free(self.page, VCMDQ_PAGE_SIZE);
        drv.vintf_ida.lock().free(self.idx);
    }

    /// vIOMMU destroy: every queue is gone already (iommufd destroys them first).
    pub(crate) fn teardown(&mut self, drv: &ArmSmmuV3, core: &ViommuCore) {
        for i in 0..self.queues.len() as u32 {
            self.hw_queue_destroy(drv, i);
        }
        core.destroy_mmap(self.mmap_offset);
        let _ = drv.frames.free(self.page, VCMDQ_PAGE_SIZE);
        drv.vintf_ida.lock().free(self.idx);
        self.page = 0;
    }

    /// `tegra241_vintf_init_vsid`: a SID_MATCH/SID_REPLACE slot for a vDEVICE (ENOSPC).
    pub(crate) fn init_vsid(&mut self, vsid: u64, sid: u32) -> Result<(), Errno> {
        let slot = self.sid_slots.alloc().ok_or(Errno::ENOSPC)?;
        self.vsids.insert(vsid, (slot, sid));
        Ok(())
    }

    pub(crate) fn destroy_vsid(&mut self, vsid: u64) {
        if let Some((slot, _)) = self.vsids.remove(&vsid) {
            self.sid_slots.free(slot);
        }
    }

    fn reg(&self, lidx: u32, off: u64) -> u64 {
        self.page + u64::from(lidx) * vcmdq_reg::STRIDE + off
    }

    fn r32(&self, drv: &ArmSmmuV3, lidx: u32, off: u64) -> u32 {
        let mut b = [0u8; 4];
        match drv.mem.read(self.reg(lidx, off), &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    fn w32(&self, drv: &ArmSmmuV3, lidx: u32, off: u64, v: u32) {
        let _ = drv.mem.write(self.reg(lidx, off), &v.to_le_bytes());
    }

    /// `tegra241_vintf_hw_queue_init` with the §5.3 validation.
    pub(crate) fn hw_queue_init(&mut self, drv: &ArmSmmuV3, hq: &HwQueueInit) -> Result<(), Errno> {
        if hq.queue_type != hw_queue_type::TEGRA241_CMDQV {
            return Err(Errno::EOPNOTSUPP);
        }
        let lidx = hq.index;
        if lidx >= self.cfg.lvcmdqs_per_vintf {
            return Err(Errno::EINVAL);
        }
        if self.queues[lidx as usize].is_some() {
            return Err(Errno::EEXIST);
        }
        // The hardware maps LVCMDQs in ascending order.
        if lidx > 0 && self.queues[lidx as usize - 1].is_none() {
            return Err(Errno::EIO);
        }
        let max = 1u64 << (self.cmdqs + q::CMDQ_ENT_SZ_SHIFT);
        if !hq.length.is_power_of_two() || hq.length < 32 || hq.length > max {
            return Err(Errno::EINVAL);
        }
        // VCMDQ_ADDR is [47:5]; the base must be aligned to the length.
        if hq.base_pa & !defs::genmask(47, 5) != 0 || hq.base_pa & (hq.length - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        let log2 = hq.length.trailing_zeros() - q::CMDQ_ENT_SZ_SHIFT;
        for off in [
            vcmdq_reg::CONS,
            vcmdq_reg::PROD,
            vcmdq_reg::CONFIG,
            vcmdq_reg::STATUS,
            vcmdq_reg::GERROR,
            vcmdq_reg::GERRORN,
        ] {
            self.w32(drv, lidx, off, 0);
        }
        // Not enabled: the guest sets CONFIG.EN and polls STATUS.
        self.queues[lidx as usize] = Some(Lvcmdq {
            base_pa: hq.base_pa,
            log2,
            enabled: false,
        });
        Ok(())
    }

    /// `tegra241_vintf_destroy_lvcmdq`: disable, CMD_SYNC on the main queue (flushes an
    /// ATC_INV the guest left without a SYNC), clear the registers, unmap.
    pub(crate) fn hw_queue_destroy(&mut self, drv: &ArmSmmuV3, lidx: u32) {
        let Some(slot) = self.queues.get_mut(lidx as usize) else {
            return;
        };
        if slot.take().is_none() {
            return;
        }
        let _ = drv.issue_cmdlist(&[], true);
        for off in [
            vcmdq_reg::CONFIG,
            vcmdq_reg::STATUS,
            vcmdq_reg::PROD,
            vcmdq_reg::CONS,
        ] {
            self.w32(drv, lidx, off, 0);
        }
        // Acknowledge a leftover error.
        let g = self.r32(drv, lidx, vcmdq_reg::GERROR);
        self.w32(drv, lidx, vcmdq_reg::GERRORN, g);
        self.err_map &= !(1u128 << lidx);
    }

    /// The guest command at slot `cons` converted for the main queue, or `None` when the
    /// VCMDQ must stop with CERROR_ILL.
    fn convert(&self, drv: &ArmSmmuV3, c: [u64; 2]) -> Option<Option<[u64; 2]>> {
        let [d0, d1] = c;
        let vmid = defs::prep(cmd::TLBI_0_VMID, u64::from(self.vmid));
        match defs::get(cmd::OP, d0) {
            cmd::OP_TLBI_NH_ASID => Some(Some([(d0 & !cmd::TLBI_0_VMID) | vmid, d1])),
            cmd::OP_TLBI_NH_VA => {
                // A range form with NUM = SCALE = TTL = 0 is reserved (IHI0070 4.4.1.1).
                let tg = defs::get(cmd::TLBI_1_TG, d1);
                if drv.feat.ril
                    && tg != 0
                    && d0 & (cmd::TLBI_0_NUM | cmd::TLBI_0_SCALE) == 0
                    && defs::get(cmd::TLBI_1_TTL, d1) == 0
                {
                    return None;
                }
                Some(Some([(d0 & !cmd::TLBI_0_VMID) | vmid, d1]))
            }
            cmd::OP_ATC_INV => {
                if !drv.feat.ats {
                    return None;
                }
                let vsid = defs::get(cmd::SID, d0);
                let (_, sid) = self.vsids.get(&vsid)?;
                Some(Some([
                    (d0 & !cmd::SID) | defs::prep(cmd::SID, u64::from(*sid)),
                    d1,
                ]))
            }
            // The guest's SYNC: completion is CONS moving past it, after the host's SYNC.
            cmd::OP_SYNC => Some(None),
            _ => None,
        }
    }

    /// The doorbell: apply CONFIG changes, then consume every enabled queue without a
    /// pending error. Returns the number of guest commands consumed.
    pub(crate) fn kick(&mut self, drv: &ArmSmmuV3, core: &ViommuCore) -> usize {
        let mut consumed = 0;
        for lidx in 0..self.queues.len() as u32 {
            let Some(mut lq) = self.queues[lidx as usize] else {
                continue;
            };
            let en = self.r32(drv, lidx, vcmdq_reg::CONFIG) & 1 != 0;
            if en != lq.enabled {
                lq.enabled = en;
                self.w32(drv, lidx, vcmdq_reg::STATUS, u32::from(en));
                self.queues[lidx as usize] = Some(lq);
            }
            if !lq.enabled {
                continue;
            }
            let g = self.r32(drv, lidx, vcmdq_reg::GERROR);
            let gn = self.r32(drv, lidx, vcmdq_reg::GERRORN);
            if (g ^ gn) & 1 != 0 {
                // An error is pending until the guest acknowledges it.
                continue;
            }
            self.err_map &= !(1u128 << lidx);
            consumed += self.consume(drv, core, lidx, lq);
        }
        consumed
    }

    fn consume(&mut self, drv: &ArmSmmuV3, core: &ViommuCore, lidx: u32, lq: Lvcmdq) -> usize {
        let mask = (1u32 << (lq.log2 + 1)) - 1;
        let cons_reg = self.r32(drv, lidx, vcmdq_reg::CONS);
        let prod = self.r32(drv, lidx, vcmdq_reg::PROD) & mask;
        let mut cons = cons_reg & mask;
        let mut batch: Vec<[u64; 2]> = Vec::with_capacity(CMDQ_BATCH_ENTRIES);
        let mut consumed = 0;
        let mut illegal = false;
        // CONS as the guest last saw it: only moves after the host's SYNC completed.
        let mut published = cons;
        let publish = |v: &Vintf, c: u32, err: u64| {
            let val = u64::from(c) | defs::prep(q::CONS_ERR, err);
            v.w32(drv, lidx, vcmdq_reg::CONS, val as u32);
        };
        let old_err = defs::get(q::CONS_ERR, u64::from(cons_reg));
        while cons != prod {
            let idx = cons & ((1u32 << lq.log2) - 1);
            let a = lq.base_pa + u64::from(idx) * 16;
            let entry = match (drv.mem.read_u64(a), drv.mem.read_u64(a + 8)) {
                (Ok(x), Ok(y)) => [x, y],
                _ => {
                    illegal = true;
                    break;
                }
            };
            let guest_sync = match self.convert(drv, entry) {
                None => {
                    illegal = true;
                    break;
                }
                Some(Some(c)) => {
                    batch.push(c);
                    false
                }
                Some(None) => true,
            };
            cons = (cons + 1) & mask;
            consumed += 1;
            // A guest CMD_SYNC completes once everything before it has: one host SYNC for
            // the commands since the last one, then CONS may pass it.
            if guest_sync {
                if drv.issue_cmdlist(&batch, true).is_err() {
                    return consumed;
                }
                batch.clear();
                publish(self, cons, old_err);
                published = cons;
            }
        }
        if published != cons || !batch.is_empty() {
            if drv.issue_cmdlist(&batch, true).is_err() {
                return consumed;
            }
            publish(self, cons, old_err);
        }
        if illegal {
            // Stop at the command: CONS points at it with ERR = ILL, GERROR toggles.
            publish(self, cons, q::CERROR_ILL);
            let gn = self.r32(drv, lidx, vcmdq_reg::GERRORN);
            self.w32(drv, lidx, vcmdq_reg::GERROR, gn ^ 1);
            self.err_map |= 1u128 << lidx;
            let mut rec = [0u8; crate::VEVENT_TEGRA241_CMDQV_SIZE];
            rec[..8].copy_from_slice(&(self.err_map as u64).to_le_bytes());
            rec[8..].copy_from_slice(&((self.err_map >> 64) as u64).to_le_bytes());
            let _ = core.report_event(veventq_type::TEGRA241_CMDQV, &rec);
        }
        consumed
    }

    pub(crate) fn err_map(&self) -> u128 {
        self.err_map
    }
}

impl VSmmu {
    /// The HW queue doorbell (the ioeventfd on the VINTF page): consume the guest rings.
    /// Returns the number of guest commands consumed; 0 for a vIOMMU without a VINTF.
    pub fn kick(&self) -> usize {
        match &self.vintf {
            Some(v) => v.lock().kick(&self.drv, &self.core),
            None => 0,
        }
    }

    /// LVCMDQ_ERR_MAP of the VINTF (bit per logical queue with a pending error).
    pub fn lvcmdq_err_map(&self) -> u128 {
        self.vintf.as_ref().map_or(0, |v| v.lock().err_map())
    }
}

/// The doorbell shared by the VMM side and a consumer thread.
#[derive(Default)]
struct Bell {
    state: parking_lot::Mutex<(bool, bool)>,
    cv: parking_lot::Condvar,
}

/// A host thread consuming a vIOMMU's HW queues whenever the doorbell rings (threads/003:
/// "kvm captures the store … and triggers the eventfd; the kernel reads the cons index after
/// the eventfd … and does the operation async"). Dropping it stops the thread.
pub struct HwQueueConsumer {
    bell: std::sync::Arc<Bell>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HwQueueConsumer {
    /// Ring the doorbell (the ioeventfd of a PROD/CONFIG/GERRORN store); returns at once.
    pub fn ring(&self) {
        self.bell.state.lock().0 = true;
        self.bell.cv.notify_one();
    }
}

impl Drop for HwQueueConsumer {
    fn drop(&mut self) {
        self.bell.state.lock().1 = true;
        self.bell.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VSmmu {
    /// Starts a consumer thread for this vIOMMU's HW queues (`None` without a VINTF). The
    /// thread holds the vIOMMU weakly: it ends when the vIOMMU is gone.
    pub fn spawn_consumer(&self) -> Option<HwQueueConsumer> {
        self.vintf.as_ref()?;
        let bell = std::sync::Arc::new(Bell::default());
        let b = std::sync::Arc::clone(&bell);
        let me = self.me.clone();
        let thread = std::thread::Builder::new()
            .name("vcmdq-consumer".into())
            .spawn(move || {
                loop {
                    {
                        let mut s = b.state.lock();
                        while !s.0 && !s.1 {
                            b.cv.wait(&mut s);
                        }
                        if s.1 {
                            return;
                        }
                        s.0 = false;
                    }
                    match me.upgrade() {
                        Some(v) if !v.is_destroyed() => {
                            v.kick();
                        }
                        _ => return,
                    }
                }
            })
            .ok()?;
        Some(HwQueueConsumer {
            bell,
            thread: Some(thread),
        })
    }
}
