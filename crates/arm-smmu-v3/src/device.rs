//! The SMMU instance: probe (`arm_smmu_device_hw_probe`), memory set-up and reset
//! (`arm_smmu_device_reset`), register access, and the iommufd `IommuDriver` half.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use twinmmu_hw::{FrameAllocator, PhysMem, Smmu};

use crate::cmdq::{Cmdq, CmdqError};
use crate::defs::{self, cmd, cr0, cr1, cr2, gbpa, idr0, idr1, idr3, idr5, irq_ctrl, q, reg};
use crate::events::OutQueue;
use crate::ida::Ida;
use crate::master::Master;
use crate::memory::zero;
use crate::strtab::StreamTable;
use crate::trace::{Trace, TraceEvent};

/// The Tegra241 CMDQV extension's shape (smmu_kvm.md §5.1): VINTFs, logical queues per VINTF
/// and StreamID slots per VINTF. VINTF 0 belongs to the host; user vIOMMUs take 1.. .
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdqvConfig {
    pub num_vintfs: u32,
    pub lvcmdqs_per_vintf: u32,
    pub sids_per_vintf: u32,
}

impl Default for CmdqvConfig {
    fn default() -> Self {
        CmdqvConfig {
            num_vintfs: 4,
            lvcmdqs_per_vintf: 2,
            sids_per_vintf: 16,
        }
    }
}

/// Driver and platform choices (the kernel's module parameters and what it learns about the
/// CPU side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The host kernel runs at EL2 with E2H (`is_kernel_in_hyp_mode()`): its own TLBIs are
    /// EL2&0 operations, so BTM needs IDR0.HYP (smmu_kvm.md §4.2), and stage-1 DMA domains use
    /// the EL2-E2H StreamWorld when IDR0.HYP.
    pub host_vhe: bool,
    /// Use broadcast TLB maintenance when the SMMU and the host allow it (the BTM patch of
    /// RFC v3). Off: CR2.PTM stays set, as upstream Linux does.
    pub enable_btm: bool,
    /// Unattached streams abort (Linux `disable_bypass`, default on); off: they bypass.
    pub disable_bypass: bool,
    /// Test knob, the hazard the RFC removes: give every vIOMMU a private SMMU VMID even when
    /// BTM is on (what the upstream vSMMU does today by copying the S2 domain's VMID).
    pub force_private_vmid: bool,
    /// Caps on the queue sizes (log2 entries) below what IDR1 allows; Linux caps them at
    /// 4 MiB, the model at smaller rings to keep host memory small.
    pub cmdq_max_log2: u8,
    pub evtq_max_log2: u8,
    pub priq_max_log2: u8,
    /// Complete CMD_SYNC by MSI when IDR0.MSI and IDR0.COHACC (Linux's default); off: poll
    /// CONS.
    pub msi_sync: bool,
    /// A Tegra241-CMDQV-style extension is present: vIOMMU type TEGRA241_CMDQV and HW queues.
    pub cmdqv: Option<CmdqvConfig>,
    /// Record every step in the trace ([`ArmSmmuV3::take_trace`]).
    pub trace: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            host_vhe: true,
            enable_btm: true,
            disable_bypass: true,
            force_private_vmid: false,
            cmdq_max_log2: 10,
            evtq_max_log2: 8,
            priq_max_log2: 8,
            msi_sync: true,
            cmdqv: None,
            trace: false,
        }
    }
}

/// What probe found (`smmu->features` and the sizes), in the driver's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    pub idr: [u32; 6],
    pub iidr: u32,
    pub aidr: u32,
    pub s1p: bool,
    pub s2p: bool,
    /// FEAT_NESTING: both stages.
    pub nesting: bool,
    /// IDR0.BTM.
    pub btm_hw: bool,
    /// BTM in use: CR2.PTM cleared.
    pub btm: bool,
    pub hyp: bool,
    /// FEAT_E2H: IDR0.HYP and a VHE host; CR2.E2H set, S1 DMA domains in the EL2-E2H world.
    pub e2h: bool,
    pub ats: bool,
    pub pri: bool,
    pub msi: bool,
    pub sev: bool,
    pub coherent: bool,
    pub two_level_strtab: bool,
    pub ril: bool,
    pub fwb: bool,
    pub stall: bool,
    pub asid_bits: u32,
    pub vmid_bits: u32,
    pub sid_bits: u32,
    pub ssid_bits: u32,
    pub oas_bits: u32,
    /// Stage-2 input size (IAS = OAS for an AArch64-only SMMU).
    pub ias_bits: u32,
    pub gran4k: bool,
    pub gran16k: bool,
    pub gran64k: bool,
    pub cmdq_log2: u32,
    pub evtq_log2: u32,
    pub priq_log2: u32,
}

/// Probe refused the SMMU or could not set it up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("the SMMU has no AArch64 translation table format (IDR0.TTF)")]
    NoAarch64,
    #[error("the SMMU implements neither stage")]
    NoStages,
    #[error("no translation granule the driver can use")]
    NoGranule,
    #[error("out of host memory for {0}")]
    NoMemory(&'static str),
    #[error("host memory at {0:#x} is not writable")]
    Memory(u64),
    #[error("CR0ACK did not acknowledge {0:#x}")]
    Cr0Ack(u32),
    #[error("GBPA update did not complete")]
    Gbpa,
    #[error("command queue: {0}")]
    Cmdq(#[from] CmdqError),
    #[error("CMDQV shape not possible: {0}")]
    Cmdqv(&'static str),
}

/// Counters of the driver's own work.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) commands: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) cmd_errors: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) events_forwarded: AtomicU64,
    pub(crate) events_overflows: AtomicU64,
    pub(crate) page_requests: AtomicU64,
    pub(crate) ste_writes: AtomicU64,
}

/// A snapshot of the driver's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DriverStats {
    pub commands: u64,
    pub syncs: u64,
    pub cmd_errors: u64,
    pub events: u64,
    pub events_forwarded: u64,
    pub event_overflows: u64,
    pub page_requests: u64,
    pub ste_writes: u64,
    pub private_vmids: u64,
    pub asids: u64,
}

/// One SMMUv3 instance under the driver.
pub struct ArmSmmuV3 {
    pub(crate) me: Weak<ArmSmmuV3>,
    pub(crate) smmu: Arc<Smmu>,
    pub(crate) mem: Arc<dyn PhysMem>,
    pub(crate) frames: FrameAllocator,
    pub(crate) feat: Features,
    pub(crate) opts: Options,
    pub(crate) cmdq: Mutex<Cmdq>,
    pub(crate) strtab: Mutex<StreamTable>,
    pub(crate) evtq: Mutex<OutQueue>,
    pub(crate) priq: Option<Mutex<OutQueue>>,
    pub(crate) vmid_ida: Mutex<Ida>,
    pub(crate) asid_ida: Mutex<Ida>,
    /// StreamID → master, for event routing (`arm_smmu_find_master`).
    pub(crate) masters: Mutex<BTreeMap<u32, Weak<Master>>>,
    pub(crate) next_group: AtomicU64,
    /// Free VINTF indexes (1.., VINTF 0 is the host's).
    pub(crate) vintf_ida: Mutex<Ida>,
    pub(crate) trace: Mutex<Trace>,
    pub(crate) stats: Stats,
}

impl std::fmt::Debug for ArmSmmuV3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmSmmuV3")
            .field("features", &self.feat)
            .finish_non_exhaustive()
    }
}

/// A block of host memory the driver owns.
fn alloc_zeroed(
    frames: &FrameAllocator,
    mem: &dyn PhysMem,
    size: u64,
    what: &'static str,
) -> Result<u64, ProbeError> {
    let pa = frames.alloc(size).map_err(|_| ProbeError::NoMemory(what))?;
    zero(mem, pa, size).map_err(|_| ProbeError::Memory(pa))?;
    Ok(pa)
}

impl ArmSmmuV3 {
    /// Probes `smmu` and brings it up: reads the ID registers, allocates and programs the
    /// stream table and queues from `frames`, and enables it with every stream aborting
    /// (or bypassing, without `disable_bypass`) until a device is attached.
    pub fn probe(
        smmu: Arc<Smmu>,
        frames: FrameAllocator,
        opts: Options,
    ) -> Result<Arc<ArmSmmuV3>, ProbeError> {
        let mem = Arc::clone(smmu.memory());
        if let Some(c) = opts.cmdqv {
            // Every logical queue's registers must fit the VINTF page, and the LVCMDQ error
            // map is 128 bits.
            if c.lvcmdqs_per_vintf == 0
                || u64::from(c.lvcmdqs_per_vintf) * crate::vcmdq::vcmdq_reg::STRIDE
                    > crate::vcmdq::VCMDQ_PAGE_SIZE
            {
                return Err(ProbeError::Cmdqv("logical queues per VINTF must be 1..=32"));
            }
            if c.num_vintfs < 2 || c.num_vintfs > 64 {
                return Err(ProbeError::Cmdqv(
                    "VINTFs must be 2..=64 (VINTF 0 is the host's)",
                ));
            }
        }
        let feat = Self::hw_probe(&smmu, &opts)?;
        let strtab = StreamTable::new(&frames, &*mem, &feat, opts.disable_bypass)?;
        let cmdq_bytes = (1u64 << feat.cmdq_log2) * q::CMDQ_ENT_DWORDS * 8;
        let cmdq_base = alloc_zeroed(&frames, &*mem, cmdq_bytes.max(32), "the command queue")?;
        let evtq_bytes = (1u64 << feat.evtq_log2) * q::EVTQ_ENT_DWORDS * 8;
        let evtq_base = alloc_zeroed(&frames, &*mem, evtq_bytes, "the event queue")?;
        let priq = if feat.pri {
            let bytes = (1u64 << feat.priq_log2) * q::PRIQ_ENT_DWORDS * 8;
            let base = alloc_zeroed(&frames, &*mem, bytes, "the PRI queue")?;
            Some(Mutex::new(OutQueue::new(base, feat.priq_log2)))
        } else {
            None
        };
        let vintfs = opts.cmdqv.map_or(0, |c| c.num_vintfs);
        let drv = Arc::new_cyclic(|me| ArmSmmuV3 {
            me: me.clone(),
            cmdq: Mutex::new(Cmdq {
                base: cmdq_base,
                log2: feat.cmdq_log2,
                prod: 0,
                msi: opts.msi_sync && feat.msi && feat.coherent,
                sev: feat.sev,
            }),
            strtab: Mutex::new(strtab),
            evtq: Mutex::new(OutQueue::new(evtq_base, feat.evtq_log2)),
            priq,
            // Linux: VMIDs from 1 (0 is for stage-2 bypass EL1 STEs), ASIDs from 1.
            vmid_ida: Mutex::new(Ida::new(1, (1u32 << feat.vmid_bits) - 1)),
            asid_ida: Mutex::new(Ida::new(1, (1u32 << feat.asid_bits) - 1)),
            masters: Mutex::new(BTreeMap::new()),
            next_group: AtomicU64::new(1),
            vintf_ida: Mutex::new(Ida::new(1, vintfs.saturating_sub(1))),
            trace: Mutex::new(Trace::new(opts.trace)),
            stats: Stats::default(),
            smmu,
            mem,
            frames,
            feat,
            opts,
        });
        drv.device_reset()?;
        Ok(drv)
    }

    fn hw_probe(smmu: &Smmu, opts: &Options) -> Result<Features, ProbeError> {
        let r = |o: u64| smmu.mmio_read(o, 4).map(|v| v as u32).unwrap_or(0);
        let idr = [
            r(reg::IDR0),
            r(reg::IDR1),
            r(reg::IDR0 + 8),
            r(reg::IDR3),
            r(reg::IDR0 + 0x10),
            r(reg::IDR5),
        ];
        let i0 = u64::from(idr[0]);
        let i1 = u64::from(idr[1]);
        let i3 = u64::from(idr[3]);
        let i5 = u64::from(idr[5]);
        // TTF: bit 1 of the field = AArch64 tables.
        let ttf = defs::get(idr0::TTF, i0);
        if ttf & 2 == 0 {
            return Err(ProbeError::NoAarch64);
        }
        let s1p = i0 & idr0::S1P != 0;
        let s2p = i0 & idr0::S2P != 0;
        if !s1p && !s2p {
            return Err(ProbeError::NoStages);
        }
        let hyp = i0 & idr0::HYP != 0;
        let btm_hw = i0 & idr0::BTM != 0;
        // The BTM patch: a VHE host's TLBIs are EL2&0 operations, which miss NS-EL1 entries
        // unless the SMMU has HYP (smmu_kvm.md §4.2).
        let btm = opts.enable_btm && btm_hw && (!opts.host_vhe || hyp);
        let e2h = hyp && opts.host_vhe;
        let oas_bits = twinmmu_hw::config::pa_bits(defs::get(idr5::OAS, i5) as u8) as u32;
        let gran4k = i5 & idr5::GRAN4K != 0;
        let gran16k = i5 & idr5::GRAN16K != 0;
        let gran64k = i5 & idr5::GRAN64K != 0;
        if !gran4k && !gran16k && !gran64k {
            return Err(ProbeError::NoGranule);
        }
        // Queue sizes are at most 2^19 entries (IHI0070 6.3.2); a larger report is capped.
        let cap = |v: u64, max: u8| (v as u32).min(u32::from(max)).min(19);
        Ok(Features {
            idr,
            iidr: r(reg::IIDR),
            aidr: r(reg::AIDR),
            s1p,
            s2p,
            nesting: s1p && s2p,
            btm_hw,
            btm,
            hyp,
            e2h,
            ats: i0 & idr0::ATS != 0,
            pri: i0 & idr0::PRI != 0,
            msi: i0 & idr0::MSI != 0,
            sev: i0 & idr0::SEV != 0,
            coherent: i0 & idr0::COHACC != 0,
            two_level_strtab: defs::get(idr0::ST_LEVEL, i0) == 1,
            ril: i3 & idr3::RIL != 0,
            fwb: i3 & idr3::FWB != 0,
            stall: defs::get(idr0::STALL_MODEL, i0) != 1,
            asid_bits: if i0 & idr0::ASID16 != 0 { 16 } else { 8 },
            vmid_bits: if i0 & idr0::VMID16 != 0 { 16 } else { 8 },
            sid_bits: defs::get(idr1::SIDSIZE, i1) as u32,
            ssid_bits: defs::get(idr1::SSIDSIZE, i1) as u32,
            oas_bits,
            ias_bits: oas_bits,
            gran4k,
            gran16k,
            gran64k,
            cmdq_log2: cap(defs::get(idr1::CMDQS, i1), opts.cmdq_max_log2).max(1),
            evtq_log2: cap(defs::get(idr1::EVTQS, i1), opts.evtq_max_log2).max(1),
            priq_log2: cap(defs::get(idr1::PRIQS, i1), opts.priq_max_log2).max(1),
        })
    }

    /// `arm_smmu_write_reg_sync`: write CR0 and wait for CR0ACK to match.
    fn write_cr0_sync(&self, v: u32) -> Result<(), ProbeError> {
        self.mmio_w32(reg::CR0, v);
        for _ in 0..64 {
            if self.mmio_r32(reg::CR0ACK) == v {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        Err(ProbeError::Cr0Ack(v))
    }

    /// `arm_smmu_update_gbpa`: set/clear GBPA bits with UPDATE and wait for it to clear.
    fn update_gbpa(&self, set: u32, clr: u32) -> Result<(), ProbeError> {
        let v = (self.mmio_r32(reg::GBPA) & !clr) | set;
        self.mmio_w32(reg::GBPA, v | gbpa::UPDATE as u32);
        for _ in 0..64 {
            if u64::from(self.mmio_r32(reg::GBPA)) & gbpa::UPDATE == 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        Err(ProbeError::Gbpa)
    }

    /// `arm_smmu_device_reset`.
    fn device_reset(&self) -> Result<(), ProbeError> {
        // An SMMU left enabled: abort incoming traffic through GBPA while it is reset.
        if u64::from(self.mmio_r32(reg::CR0)) & cr0::SMMUEN != 0 {
            self.update_gbpa(gbpa::ABORT as u32, 0)?;
        }
        self.write_cr0_sync(0)?;
        // Unattached streams and a disabled SMMU must not bypass (disable_bypass).
        if self.opts.disable_bypass {
            self.update_gbpa(gbpa::ABORT as u32, 0)?;
        } else {
            self.update_gbpa(0, gbpa::ABORT as u32)?;
        }
        let cr1 = defs::prep(cr1::TABLE_SH, cr1::SH_ISH)
            | defs::prep(cr1::TABLE_OC, cr1::CACHE_WB)
            | defs::prep(cr1::TABLE_IC, cr1::CACHE_WB)
            | defs::prep(cr1::QUEUE_SH, cr1::SH_ISH)
            | defs::prep(cr1::QUEUE_OC, cr1::CACHE_WB)
            | defs::prep(cr1::QUEUE_IC, cr1::CACHE_WB);
        self.mmio_w32(reg::CR1, cr1 as u32);
        // CR2: RECINVSID; PTM unless BTM is used; E2H for a VHE host on an SMMU with HYP.
        let mut cr2 = cr2::RECINVSID;
        if !self.feat.btm {
            cr2 |= cr2::PTM;
        }
        if self.feat.e2h {
            cr2 |= cr2::E2H;
        }
        self.mmio_w32(reg::CR2, cr2 as u32);
        {
            let st = self.strtab.lock();
            self.mmio_w64(reg::STRTAB_BASE, st.base_reg());
            self.mmio_w32(reg::STRTAB_BASE_CFG, st.base_cfg_reg());
        }
        {
            let c = self.cmdq.lock();
            let base = q::BASE_RWA
                | defs::prep(q::BASE_ADDR, c.base >> 5)
                | defs::prep(q::BASE_LOG2SIZE, u64::from(c.log2));
            self.mmio_w64(reg::CMDQ_BASE, base);
            self.mmio_w32(reg::CMDQ_PROD, c.prod);
            self.mmio_w32(reg::CMDQ_CONS, c.prod);
        }
        let mut enables = cr0::CMDQEN as u32;
        self.write_cr0_sync(enables)?;
        // Invalidate any cached configuration and any stale TLB entry.
        self.issue_cmd_with_sync([cmd::OP_CFGI_ALL, defs::prep(cmd::CFGI_1_RANGE, 31)])?;
        if self.feat.hyp {
            self.issue_cmd_with_sync([cmd::OP_TLBI_EL2_ALL, 0])?;
        }
        self.issue_cmd_with_sync([cmd::OP_TLBI_NSNH_ALL, 0])?;
        {
            let e = self.evtq.lock();
            self.mmio_w64(reg::EVTQ_BASE, e.base_reg());
            self.mmio_w32(reg::EVTQ_PROD, 0);
            self.mmio_w32(reg::EVTQ_CONS, 0);
        }
        enables |= cr0::EVTQEN as u32;
        self.write_cr0_sync(enables)?;
        if let Some(p) = &self.priq {
            let p = p.lock();
            self.mmio_w64(reg::PRIQ_BASE, p.base_reg());
            self.mmio_w32(reg::PRIQ_PROD, 0);
            self.mmio_w32(reg::PRIQ_CONS, 0);
            enables |= cr0::PRIQEN as u32;
            self.write_cr0_sync(enables)?;
        }
        if self.feat.ats {
            enables |= cr0::ATSCHK as u32;
            self.write_cr0_sync(enables)?;
        }
        // Wired interrupts (no MSI doorbells configured): the IRQ handlers are the
        // `process_*` methods, called by whoever models the interrupt controller.
        let mut irqs = irq_ctrl::GERROR_IRQEN | irq_ctrl::EVTQ_IRQEN;
        if self.priq.is_some() {
            irqs |= irq_ctrl::PRIQ_IRQEN;
        }
        self.mmio_w32(reg::IRQ_CTRL, irqs as u32);
        enables |= cr0::SMMUEN as u32;
        self.write_cr0_sync(enables)
    }

    // ------------------------------------------------------------------ register access

    pub(crate) fn mmio_r32(&self, off: u64) -> u32 {
        // Offsets are the driver's own constants: an MmioError cannot happen; read 0 if it
        // ever did rather than panic.
        self.smmu.mmio_read(off, 4).map(|v| v as u32).unwrap_or(0)
    }

    pub(crate) fn mmio_w32(&self, off: u64, v: u32) {
        let _ = self.smmu.mmio_write(off, 4, u64::from(v));
    }

    pub(crate) fn mmio_w64(&self, off: u64, v: u64) {
        let _ = self.smmu.mmio_write(off, 8, v);
    }

    // ------------------------------------------------------------------ public API

    /// The SMMU this driver drives.
    pub fn smmu(&self) -> &Arc<Smmu> {
        &self.smmu
    }

    /// Host memory.
    pub fn memory(&self) -> &Arc<dyn PhysMem> {
        &self.mem
    }

    /// The frame allocator the driver's structures come from.
    pub fn frames(&self) -> &FrameAllocator {
        &self.frames
    }

    pub fn features(&self) -> &Features {
        &self.feat
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Whether broadcast TLB maintenance is in use (CR2.PTM = 0).
    pub fn btm_enabled(&self) -> bool {
        self.feat.btm
    }

    /// The trace recorded since the last call (empty unless `Options::trace`).
    pub fn take_trace(&self) -> Vec<TraceEvent> {
        self.trace.lock().take()
    }

    pub fn stats(&self) -> DriverStats {
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DriverStats {
            commands: g(&s.commands),
            syncs: g(&s.syncs),
            cmd_errors: g(&s.cmd_errors),
            events: g(&s.events),
            events_forwarded: g(&s.events_forwarded),
            event_overflows: g(&s.events_overflows),
            page_requests: g(&s.page_requests),
            ste_writes: g(&s.ste_writes),
            private_vmids: self.vmid_ida.lock().in_use() as u64,
            asids: self.asid_ida.lock().in_use() as u64,
        }
    }

    /// Issues raw commands followed by a CMD_SYNC (for tests and tools that exercise the
    /// queue; the driver's own paths use the same function).
    pub fn issue_commands(&self, cmds: &[[u64; 2]]) -> Result<(), CmdqError> {
        self.issue_cmdlist(cmds, true)
    }

    /// A private VMID from the SMMU's allocator (never 0).
    pub(crate) fn alloc_private_vmid(&self) -> Option<u16> {
        self.vmid_ida.lock().alloc().map(|v| v as u16)
    }

    /// Invalidates everything tagged with `vmid` and returns it to the allocator.
    pub(crate) fn free_private_vmid(&self, vmid: u16) {
        let inv = self.issue_cmd_with_sync([
            cmd::OP_TLBI_S12_VMALL | defs::prep(cmd::TLBI_0_VMID, u64::from(vmid)),
            0,
        ]);
        // A VMID whose invalidation did not complete must not be reused: keep it allocated.
        if inv.is_ok() {
            self.vmid_ida.lock().free(u32::from(vmid));
            self.trace.lock().push(TraceEvent::FreeVmid { vmid });
        }
    }
}
