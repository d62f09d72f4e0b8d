//! Devices behind the SMMU (`struct arm_smmu_master`): one StreamID each, their STE and CD
//! programming, and attach/detach of domains.

use std::any::Any;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use twinmmu_iommufd::{
    DeviceEvents, Domain, Errno, IommuDevice, IommuDriver, IovaRange, ViommuCore,
};

use crate::cd::CdTable;
use crate::defs::{self, cmd};
use crate::device::ArmSmmuV3;
use crate::domain::{S1Domain, S2Domain};
use crate::strtab::{self, Entry, StrtabError};
use crate::trace::TraceEvent;
use crate::viommu::{ArmNestedDomain, VSmmu};

/// Linux's software MSI window, reserved in every IOAS a device attaches to (MSI_IOVA_BASE,
/// MSI_IOVA_LENGTH; `arm_smmu_get_resv_regions`).
pub const MSI_IOVA_BASE: u64 = 0x800_0000;
pub const MSI_IOVA_LENGTH: u64 = 0x10_0000;

/// Firmware facts about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterOptions {
    /// PCIe ATS capable (used only if IDR0.ATS).
    pub ats: bool,
    /// Coherent with no way to issue non-snooped DMA ("CANWBS" in the IORT): a vIOMMU needs
    /// it unless the SMMU has S2FWB (`arm_smmu_get_viommu_size`).
    pub canwbs: bool,
    /// The device tolerates stalls (`dma-can-stall`), used only if the SMMU can stall.
    pub stall: bool,
    /// Share the iommu_group of this earlier master (same group id).
    pub group_with: Option<u64>,
}

impl Default for MasterOptions {
    fn default() -> Self {
        MasterOptions {
            ats: false,
            canwbs: true,
            stall: false,
            group_with: None,
        }
    }
}

/// What a master is attached to.
#[derive(Clone)]
pub(crate) enum Attached {
    S1(Arc<S1Domain>),
    S2(Arc<S2Domain>),
    Nested(Arc<ArmNestedDomain>),
}

/// The vIOMMU a master is attached through (`struct arm_smmu_vmaster`): events about it are
/// forwarded there with its virtual StreamID.
#[derive(Clone)]
pub(crate) struct VMaster {
    pub(crate) core: ViommuCore,
    pub(crate) vsid: u64,
    pub(crate) vsmmu: Weak<VSmmu>,
}

#[derive(Default)]
pub(crate) struct MasterState {
    pub(crate) events: Option<DeviceEvents>,
    pub(crate) attached: Option<Attached>,
    pub(crate) vmaster: Option<VMaster>,
    pub(crate) cd_table: Option<CdTable>,
}

/// One device (one StreamID) behind an SMMU.
pub struct Master {
    pub(crate) drv: Arc<ArmSmmuV3>,
    pub(crate) sid: u32,
    pub(crate) group: u64,
    pub(crate) opts: MasterOptions,
    pub(crate) state: Mutex<MasterState>,
    /// STAGs of stalled transactions reported as page requests and not yet answered.
    pub(crate) pending_stalls: Mutex<std::collections::BTreeSet<u32>>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("sid", &self.sid)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl ArmSmmuV3 {
    /// `arm_smmu_probe_device`: a device with StreamID `sid`. Its STE exists from now on
    /// (level-2 table allocated if needed) and aborts until something is attached. ERANGE if
    /// `sid` is beyond IDR1.SIDSIZE, EEXIST if a live master has it, ENOMEM without memory.
    pub fn add_master(&self, sid: u32, opts: MasterOptions) -> Result<Arc<Master>, Errno> {
        let drv = self.me.upgrade().ok_or(Errno::ENODEV)?;
        let mut masters = self.masters.lock();
        if masters.get(&sid).is_some_and(|w| w.strong_count() > 0) {
            return Err(Errno::EEXIST);
        }
        let l1_written = {
            let mut st = self.strtab.lock();
            st.ensure(sid, &self.frames, &*self.mem)
                .map_err(|e| match e {
                    StrtabError::OutOfRange => Errno::ERANGE,
                    StrtabError::NoMemory => Errno::ENOMEM,
                    StrtabError::Memory => Errno::EFAULT,
                })?
        };
        if l1_written {
            // A new L1 descriptor: invalidate it together with the STE (Leaf = 0).
            self.issue_cmd_with_sync([cmd::OP_CFGI_STE | defs::prep(cmd::SID, u64::from(sid)), 0])
                .map_err(|_| Errno::EIO)?;
        }
        let group = match opts.group_with {
            Some(g) => g,
            None => self
                .next_group
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let m = Arc::new(Master {
            drv,
            sid,
            group,
            opts,
            state: Mutex::new(MasterState::default()),
            pending_stalls: Mutex::new(Default::default()),
        });
        masters.insert(sid, Arc::downgrade(&m));
        Ok(m)
    }

    /// The live master with StreamID `sid`.
    pub fn find_master(&self, sid: u32) -> Option<Arc<Master>> {
        self.masters.lock().get(&sid).and_then(Weak::upgrade)
    }

    /// Writes `target` into the STE of `sid` with the update discipline of
    /// `arm_smmu_write_entry`, syncing (CFGI_STE + CMD_SYNC) after each step.
    pub(crate) fn install_ste(&self, sid: u32, target: &Entry) -> Result<(), Errno> {
        let st = self.strtab.lock();
        let pa = st.ste_addr(sid).ok_or(Errno::EINVAL)?;
        let cur = strtab::read_entry(&*self.mem, pa);
        let steps = strtab::write_entry_steps(&cur, target, strtab::ste_used);
        let mut mem_now = cur;
        for step in steps {
            for (i, (&old, &new)) in mem_now.iter().zip(step.iter()).enumerate() {
                if old != new {
                    // Single-copy atomic 64-bit stores, as WRITE_ONCE on a __le64.
                    self.mem
                        .write_u64(pa + 8 * i as u64, new)
                        .map_err(|_| Errno::EFAULT)?;
                    self.trace.lock().push(TraceEvent::SteWrite {
                        sid,
                        index: i as u8,
                        value: new,
                    });
                }
            }
            mem_now = step;
            self.stats
                .ste_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.issue_cmd_with_sync([
                cmd::OP_CFGI_STE | defs::prep(cmd::SID, u64::from(sid)),
                cmd::CFGI_1_LEAF,
            ])
            .map_err(|_| Errno::EIO)?;
        }
        Ok(())
    }

    /// The STE of `sid` as it is in memory (tests and tools).
    pub fn read_ste(&self, sid: u32) -> Option<[u64; 8]> {
        let pa = self.strtab.lock().ste_addr(sid)?;
        Some(strtab::read_entry(&*self.mem, pa))
    }
}

impl Master {
    pub fn sid(&self) -> u32 {
        self.sid
    }

    pub fn driver(&self) -> &Arc<ArmSmmuV3> {
        &self.drv
    }

    /// The StreamID's current STE.
    pub fn ste(&self) -> Option<[u64; 8]> {
        self.drv.read_ste(self.sid)
    }

    /// The (vIOMMU object, virtual StreamID) this device is attached through, if nested.
    pub fn vmaster(&self) -> Option<(twinmmu_iommufd::ObjectId, u64)> {
        self.state
            .lock()
            .vmaster
            .as_ref()
            .map(|v| (v.core.id(), v.vsid))
    }

    pub(crate) fn ats_enabled_for(&self, guest_eats: bool) -> bool {
        self.drv.feat.ats && self.opts.ats && guest_eats
    }

    /// Attaches `domain` (replacing whatever was attached), iommufd's `attach_dev`.
    pub(crate) fn attach(self: &Arc<Self>, domain: &Domain) -> Result<(), Errno> {
        let drv = &self.drv;
        let mut st = self.state.lock();
        let (target, attached, vmaster) = match domain {
            Domain::Paging(d) => {
                if let Some(s2) = d.as_any().downcast_ref::<S2Domain>() {
                    if !Arc::ptr_eq(&s2.drv, drv) {
                        return Err(Errno::EINVAL);
                    }
                    let s2 = s2.me.upgrade().ok_or(Errno::EINVAL)?;
                    let vmid = s2.own_vmid()?;
                    let ats = self.ats_enabled_for(true);
                    (s2.ste(vmid, ats), Attached::S2(s2), None)
                } else if let Some(s1) = d.as_any().downcast_ref::<S1Domain>() {
                    if !Arc::ptr_eq(&s1.drv, drv) {
                        return Err(Errno::EINVAL);
                    }
                    let s1 = s1.me.upgrade().ok_or(Errno::EINVAL)?;
                    if st.cd_table.is_none() {
                        st.cd_table = Some(CdTable::new(drv)?);
                    }
                    let cdt = st.cd_table.as_ref().ok_or(Errno::ENOMEM)?;
                    let stall = self.opts.stall && drv.feat.stall;
                    cdt.write_cd(drv, self.sid, &s1.make_cd(stall))?;
                    let ats = self.ats_enabled_for(true);
                    (
                        strtab::make_cdtable_ste(cdt.pa, drv.feat.e2h, ats, stall),
                        Attached::S1(s1),
                        None,
                    )
                } else {
                    return Err(Errno::EINVAL);
                }
            }
            Domain::Nested(n) => {
                let Some(n) = n.as_any().downcast_ref::<ArmNestedDomain>() else {
                    return Err(Errno::EINVAL);
                };
                let n = n.me.upgrade().ok_or(Errno::EINVAL)?;
                let vsmmu = Arc::clone(&n.vsmmu);
                if !Arc::ptr_eq(&vsmmu.drv, drv) {
                    return Err(Errno::EINVAL);
                }
                // arm_smmu_attach_prepare_vmaster: the device needs a vDEVICE on the vIOMMU.
                let me: Arc<dyn IommuDevice> = Arc::clone(self) as Arc<dyn IommuDevice>;
                let vsid = vsmmu.core.virt_id_of(&me).ok_or(Errno::ENOENT)?;
                let ats = self.ats_enabled_for(n.enable_ats);
                let ste = n.make_ste(ats);
                (
                    ste,
                    Attached::Nested(Arc::clone(&n)),
                    Some(VMaster {
                        core: vsmmu.core.clone(),
                        vsid,
                        vsmmu: Arc::downgrade(&vsmmu),
                    }),
                )
            }
        };
        drv.install_ste(self.sid, &target)?;
        let old = st.attached.replace(attached.clone());
        st.vmaster = vmaster;
        drop(st);
        if let Some(old) = old {
            old.remove_master(self);
        }
        attached.add_master(self);
        Ok(())
    }

    /// Back to the blocking domain: an abort STE.
    pub(crate) fn detach(&self) {
        let mut st = self.state.lock();
        let _ = self.drv.install_ste(self.sid, &strtab::make_abort_ste());
        let old = st.attached.take();
        st.vmaster = None;
        drop(st);
        if let Some(old) = old {
            old.remove_master(self);
        }
    }
}

impl Attached {
    fn add_master(&self, m: &Master) {
        match self {
            Attached::S1(d) => d.add_master(m),
            Attached::S2(d) => d.add_master(m, m.ats_enabled_for(true)),
            Attached::Nested(n) => n.vsmmu.s2.add_master(m, m.ats_enabled_for(n.enable_ats)),
        }
    }
    fn remove_master(&self, m: &Master) {
        match self {
            Attached::S1(d) => d.remove_master(m),
            Attached::S2(d) => d.remove_master(m),
            Attached::Nested(n) => n.vsmmu.s2.remove_master(m),
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // arm_smmu_release_device: the stream goes back to its initial STE; the CD table is
        // freed once nothing can fetch it.
        let initial = self.drv.strtab.lock().initial();
        let _ = self.drv.install_ste(self.sid, &initial);
        let st = self.state.get_mut();
        let old = st.attached.take();
        let cdt = st.cd_table.take();
        if let Some(old) = old {
            old.remove_master(self);
        }
        if let Some(cdt) = cdt {
            cdt.free(&self.drv);
        }
    }
}

impl IommuDevice for Master {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn iommu(&self) -> Arc<dyn IommuDriver> {
        Arc::clone(&self.drv) as Arc<dyn IommuDriver>
    }

    fn group(&self) -> u64 {
        self.group
    }

    fn reserved_regions(&self) -> Vec<IovaRange> {
        vec![IovaRange::new(
            MSI_IOVA_BASE,
            MSI_IOVA_BASE + MSI_IOVA_LENGTH - 1,
        )]
    }
}
