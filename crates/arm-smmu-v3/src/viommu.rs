//! The vIOMMU (`struct arm_vsmmu`, arm-smmu-v3-iommufd.c): one per guest SMMU instance, on a
//! NEST_PARENT stage 2, holding the VMID every nested STE and every converted guest command
//! carries.
//!
//! VMID policy (threads 000–002, smmu_kvm.md §3):
//! - BTM in use: the VMID is the VM's KVM VMID, pinned at alloc and held for the vIOMMU's
//!   life, so the guest's own broadcast TLBIs (tagged with VTTBR_EL2.VMID) reach the SMMU's
//!   nested entries. The device must be bound with a KVM (EINVAL otherwise), KVM and SMMU
//!   VMID widths must match (EOPNOTSUPP), and a pin that cannot be had fails the alloc
//!   (ENOSPC exhausted, EOPNOTSUPP pinning disabled) leaving nothing behind.
//! - BTM not in use: a private VMID per vIOMMU from the SMMU's allocator (ENOSPC), so one
//!   stage 2 shared by several vIOMMUs has several VMIDs, all invalidated on unmap.
//!
//! Destroy retires the VMID in the safe order: no STE uses it any more, TLBI_S12_VMALL +
//! CMD_SYNC, and only then the pin is released (`VmidPin::unpin`) or the private VMID freed.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use twinmmu_iommufd::{
    Errno, HwQueueInit, InvalidateArray, IommuDevice, KvmRef, NestedDomain, UserData, Viommu,
    ViommuCore, hw_queue_type, hwpt_data, invalidate_data, viommu_type,
};
use twinmmu_kvm::{PinError, Vm, VmidBits, VmidPin};

use crate::CMDQ_BATCH_ENTRIES;
use crate::cmdq::CmdqError;
use crate::defs::{self, cmd, ste};
use crate::device::ArmSmmuV3;
use crate::domain::S2Domain;
use crate::master::Master;
use crate::strtab::{self, Entry};
use crate::trace::TraceEvent;
use crate::vcmdq::Vintf;

/// Where a vIOMMU's VMID comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmidSource {
    /// The VM's KVM VMID, pinned (BTM).
    KvmPinned,
    /// The SMMU's own allocator.
    Private,
}

/// The arm-smmu-v3 vIOMMU.
pub struct VSmmu {
    pub(crate) me: Weak<VSmmu>,
    pub(crate) drv: Arc<ArmSmmuV3>,
    pub(crate) core: ViommuCore,
    pub(crate) s2: Arc<S2Domain>,
    pub(crate) viommu_type: u32,
    vmid: u16,
    source: VmidSource,
    pin: Mutex<Option<VmidPin>>,
    kvm: Option<KvmRef>,
    pub(crate) vintf: Option<Mutex<Vintf>>,
    destroyed: AtomicBool,
}

impl std::fmt::Debug for VSmmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VSmmu")
            .field("id", &self.core.id())
            .field("vmid", &self.vmid)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ArmSmmuV3 {
    /// Retire step of a VMID: nothing uses it in an STE any more; invalidate everything the
    /// SMMU cached with it and wait for completion.
    pub(crate) fn retire_vmid(&self, vmid: u16) -> Result<(), CmdqError> {
        self.issue_cmd_with_sync([
            cmd::OP_TLBI_S12_VMALL | defs::prep(cmd::TLBI_0_VMID, u64::from(vmid)),
            0,
        ])
    }

    /// `arm_vsmmu_init` with the VMID policy.
    pub(crate) fn vsmmu_alloc(
        self: &Arc<Self>,
        req: twinmmu_iommufd::ViommuAlloc<'_, '_>,
    ) -> Result<Arc<VSmmu>, Errno> {
        let Some(parent) = req.parent.as_any().downcast_ref::<S2Domain>() else {
            return Err(Errno::EINVAL);
        };
        if !Arc::ptr_eq(&parent.drv, self) || !parent.nest_parent {
            return Err(Errno::EINVAL);
        }
        let s2 = parent.me.upgrade().ok_or(Errno::EINVAL)?;
        // Driver data first (nothing to undo yet): only the CMDQV type takes any.
        let mut tegra_data = None;
        if req.viommu_type == viommu_type::TEGRA241_CMDQV {
            let data = req.data.ok_or(Errno::EINVAL)?;
            data.copy_struct(
                viommu_type::TEGRA241_CMDQV,
                crate::VIOMMU_TEGRA241_CMDQV_SIZE,
                crate::VIOMMU_TEGRA241_CMDQV_SIZE,
            )?;
            tegra_data = Some(data);
        }
        let (vmid, source, pin) = if self.feat.btm && !self.opts.force_private_vmid {
            let kvm = req.kvm.ok_or(Errno::EINVAL)?;
            let vm = kvm.downcast::<Vm>().ok_or(Errno::EINVAL)?;
            vm.kvm()
                .check_btm_vmid_width(VmidBits::from_smmu_idr0(self.feat.idr[0]))
                .map_err(|_| Errno::EOPNOTSUPP)?;
            let pin = vm.pin_vmid().map_err(|e| match e {
                PinError::Disabled => Errno::EOPNOTSUPP,
                _ => Errno::ENOSPC,
            })?;
            (pin.vmid().get(), VmidSource::KvmPinned, Some(pin))
        } else {
            let v = self.alloc_private_vmid().ok_or(Errno::ENOSPC)?;
            (v, VmidSource::Private, None)
        };
        // CMDQV: a VINTF with this VMID and its page exposed through mmap.
        let mut vintf = None;
        if let Some(data) = tegra_data {
            let made = Vintf::alloc(self, &req.core, vmid).and_then(|(vi, offset)| {
                let mut out = [0u8; crate::VIOMMU_TEGRA241_CMDQV_SIZE];
                out[..8].copy_from_slice(&offset.to_le_bytes());
                out[8..].copy_from_slice(&crate::vcmdq::VCMDQ_PAGE_SIZE.to_le_bytes());
                match data.copy_to_user(
                    viommu_type::TEGRA241_CMDQV,
                    crate::VIOMMU_TEGRA241_CMDQV_SIZE,
                    &out,
                ) {
                    Ok(()) => Ok(vi),
                    Err(e) => {
                        vi.free(self, &req.core);
                        Err(e)
                    }
                }
            });
            match made {
                Ok(vi) => vintf = Some(Mutex::new(vi)),
                Err(e) => {
                    self.release_vmid(vmid, pin);
                    return Err(e);
                }
            }
        }
        s2.add_vmid(vmid);
        Ok(Arc::new_cyclic(|me| VSmmu {
            me: me.clone(),
            drv: Arc::clone(self),
            core: req.core.clone(),
            s2: Arc::clone(&s2),
            viommu_type: req.viommu_type,
            vmid,
            source,
            pin: Mutex::new(pin),
            kvm: req.kvm.cloned(),
            vintf,
            destroyed: AtomicBool::new(false),
        }))
    }

    /// Gives a VMID back in the safe order: invalidate, then unpin or free.
    fn release_vmid(&self, vmid: u16, pin: Option<VmidPin>) -> Option<VmidPin> {
        match pin {
            Some(pin) => match pin.unpin(|v| self.retire_vmid(v.get())) {
                Ok(()) => {
                    self.trace.lock().push(TraceEvent::Unpin { vmid });
                    None
                }
                // The invalidation did not complete: keep the pin (KVM must not reuse the
                // number while the SMMU may cache it).
                Err(e) => Some(e.pin),
            },
            None => {
                self.free_private_vmid(vmid);
                None
            }
        }
    }
}

impl VSmmu {
    /// The VMID in every STE and command of this vIOMMU.
    pub fn vmid(&self) -> u16 {
        self.vmid
    }

    /// `IOMMU_VIOMMU_TYPE_ARM_SMMUV3` or `_TEGRA241_CMDQV`.
    pub fn viommu_type(&self) -> u32 {
        self.viommu_type
    }

    pub fn vmid_source(&self) -> VmidSource {
        self.source
    }

    /// The nesting parent.
    pub fn s2(&self) -> &Arc<S2Domain> {
        &self.s2
    }

    pub fn driver(&self) -> &Arc<ArmSmmuV3> {
        &self.drv
    }

    /// The KVM VM this vIOMMU holds (BTM), if any.
    pub fn kvm(&self) -> Option<&KvmRef> {
        self.kvm.as_ref()
    }

    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    /// vSID → physical StreamID through the vDEVICEs (`arm_vsmmu_vsid_to_sid`).
    pub(crate) fn vsid_to_sid(&self, vsid: u64) -> Option<u32> {
        let dev = self.core.find_device(vsid)?;
        dev.as_any().downcast_ref::<Master>().map(|m| m.sid)
    }

    /// `arm_vsmmu_convert_user_cmd`: the guest command with the VMID forced and the SID
    /// translated; EIO for anything a guest may not issue.
    pub(crate) fn convert_user_cmd(&self, c: [u64; 2]) -> Result<[u64; 2], Errno> {
        let [mut d0, mut d1] = c;
        let vmid = defs::prep(cmd::TLBI_0_VMID, u64::from(self.vmid));
        match defs::get(cmd::OP, d0) {
            cmd::OP_TLBI_NSNH_ALL => {
                d0 = cmd::OP_TLBI_NH_ALL | vmid;
                d1 = 0;
            }
            cmd::OP_TLBI_NH_VA
            | cmd::OP_TLBI_NH_VAA
            | cmd::OP_TLBI_NH_ALL
            | cmd::OP_TLBI_NH_ASID => {
                d0 = (d0 & !cmd::TLBI_0_VMID) | vmid;
            }
            cmd::OP_ATC_INV | cmd::OP_CFGI_CD | cmd::OP_CFGI_CD_ALL => {
                let vsid = defs::get(cmd::SID, d0);
                let sid = self.vsid_to_sid(vsid).ok_or(Errno::EIO)?;
                d0 = (d0 & !cmd::SID) | defs::prep(cmd::SID, u64::from(sid));
            }
            _ => return Err(Errno::EIO),
        }
        Ok([d0, d1])
    }

    /// Everything that must happen when the vIOMMU goes away (also on a failed alloc).
    fn teardown(&self) {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        // STEs off: iommufd destroys nested HWPTs (and so detaches) before the vIOMMU, but a
        // master still attached through it would keep the VMID in its STE.
        let masters: Vec<Arc<Master>> = self
            .drv
            .masters
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for m in masters {
            let mine = m
                .state
                .lock()
                .vmaster
                .as_ref()
                .is_some_and(|vm| std::ptr::eq(vm.vsmmu.as_ptr(), self));
            if mine {
                m.detach();
            }
        }
        if let Some(v) = &self.vintf {
            v.lock().teardown(&self.drv, &self.core);
        }
        self.s2.remove_vmid(self.vmid);
        let pin = self.pin.lock().take();
        if self.source == VmidSource::KvmPinned && pin.is_none() {
            return;
        }
        let kept = self.drv.release_vmid(self.vmid, pin);
        *self.pin.lock() = kept;
    }
}

impl Viommu for VSmmu {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn destroy(&self) {
        self.teardown();
    }

    fn supports_nested(&self) -> bool {
        true
    }

    /// `arm_vsmmu_alloc_domain_nested`.
    fn alloc_domain_nested(
        &self,
        flags: u32,
        data: &mut UserData<'_>,
    ) -> Result<Arc<dyn NestedDomain>, Errno> {
        if flags != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let raw = data.copy_struct(
            hwpt_data::ARM_SMMUV3,
            crate::HWPT_ARM_SMMUV3_SIZE,
            crate::HWPT_ARM_SMMUV3_SIZE,
        )?;
        let (vste, enable_ats) = validate_vste(le_words(&raw))?;
        let vsmmu = self.me.upgrade().ok_or(Errno::ENODEV)?;
        Ok(Arc::new_cyclic(|me| ArmNestedDomain {
            me: me.clone(),
            vsmmu,
            vste,
            enable_ats,
        }))
    }

    fn supports_cache_invalidate(&self) -> bool {
        true
    }

    /// `arm_vsmmu_cache_invalidate`: every entry converted (§5.6) and issued to the main
    /// command queue in batches of CMDQ_BATCH_ENTRIES − 1, each with a CMD_SYNC.
    fn cache_invalidate(&self, array: &mut InvalidateArray<'_>) -> Result<(), Errno> {
        let entries = match array.copy_all(
            invalidate_data::VIOMMU_ARM_SMMUV3,
            crate::VIOMMU_INVALIDATE_ARM_SMMUV3_SIZE,
        ) {
            Ok(e) => e,
            Err(e) => {
                array.entry_num = 0;
                return Err(e);
            }
        };
        let mut batch: Vec<[u64; 2]> = Vec::with_capacity(CMDQ_BATCH_ENTRIES);
        let mut handled = 0u32;
        let mut result = Ok(());
        for raw in &entries {
            match self.convert_user_cmd(le_words(raw)) {
                Ok(c) => batch.push(c),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if batch.len() == CMDQ_BATCH_ENTRIES - 1 {
                if self.drv.issue_cmdlist(&batch, true).is_err() {
                    result = Err(Errno::ETIMEDOUT);
                    batch.clear();
                    break;
                }
                handled += batch.len() as u32;
                batch.clear();
            }
        }
        // Converted commands before a rejected one are issued too, so that entry_num tells
        // the truth about what reached the SMMU.
        if !batch.is_empty() {
            if self.drv.issue_cmdlist(&batch, true).is_ok() {
                handled += batch.len() as u32;
            } else if result.is_ok() {
                result = Err(Errno::ETIMEDOUT);
            }
        }
        array.entry_num = handled;
        result
    }

    fn vdevice_init(&self, virt_id: u64, dev: &Arc<dyn IommuDevice>) -> Result<(), Errno> {
        let Some(m) = dev.as_any().downcast_ref::<Master>() else {
            return Err(Errno::EINVAL);
        };
        if let Some(v) = &self.vintf {
            v.lock().init_vsid(virt_id, m.sid)?;
        }
        Ok(())
    }

    fn vdevice_destroy(&self, virt_id: u64, _dev: &Arc<dyn IommuDevice>) {
        if let Some(v) = &self.vintf {
            v.lock().destroy_vsid(virt_id);
        }
    }

    fn hw_queue_supported(&self, queue_type: u32) -> bool {
        self.vintf.is_some() && queue_type == hw_queue_type::TEGRA241_CMDQV
    }

    fn hw_queue_init(&self, q: &HwQueueInit) -> Result<(), Errno> {
        let Some(v) = &self.vintf else {
            return Err(Errno::EOPNOTSUPP);
        };
        v.lock().hw_queue_init(&self.drv, q)
    }

    fn hw_queue_destroy(&self, index: u32) {
        if let Some(v) = &self.vintf {
            v.lock().hw_queue_destroy(&self.drv, index);
        }
    }
}

/// `arm_smmu_validate_vste`: a guest STE is taken only for the fields the guest controls;
/// anything else is EIO. Returns the (cleaned) guest STE and whether the guest enabled ATS.
pub(crate) fn validate_vste(mut s: [u64; 2]) -> Result<([u64; 2], bool), Errno> {
    if s[0] & ste::V == 0 {
        // A non-valid guest STE becomes an abort STE.
        return Ok(([0, 0], false));
    }
    if s[0] & !ste::DW0_NESTING_ALLOWED != 0 || s[1] & !ste::DW1_NESTING_ALLOWED != 0 {
        return Err(Errno::EIO);
    }
    let cfg = defs::get(ste::CFG, s[0]);
    if cfg != ste::CFG_ABORT && cfg != ste::CFG_BYPASS && cfg != ste::CFG_S1_TRANS {
        return Err(Errno::EIO);
    }
    // Only "ATS disabled" and full ATS; the physical EATS is set by the driver.
    let eats = defs::get(ste::EATS, s[1]);
    s[1] &= !ste::EATS;
    if eats != ste::EATS_ABT && eats != ste::EATS_TRANS {
        return Err(Errno::EIO);
    }
    let ats = cfg == ste::CFG_S1_TRANS && eats == ste::EATS_TRANS;
    Ok((s, ats))
}

/// A nested domain: a guest STE on a vIOMMU (`struct arm_smmu_nested_domain`).
pub struct ArmNestedDomain {
    pub(crate) me: Weak<ArmNestedDomain>,
    pub(crate) vsmmu: Arc<VSmmu>,
    vste: [u64; 2],
    pub(crate) enable_ats: bool,
}

impl std::fmt::Debug for ArmNestedDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmNestedDomain")
            .field("vste", &format_args!("{:#x?}", self.vste))
            .finish_non_exhaustive()
    }
}

/// The two little-endian 64-bit words of a 16-byte uAPI struct (`iommu_hwpt_arm_smmuv3`,
/// `iommu_viommu_arm_smmuv3_invalidate`); bytes the caller did not supply read as zero.
fn le_words(raw: &[u8]) -> [u64; 2] {
    let mut w = [[0u8; 8]; 2];
    for (dst, src) in w.iter_mut().zip(raw.chunks(8)) {
        dst[..src.len()].copy_from_slice(src);
    }
    w.map(u64::from_le_bytes)
}

impl ArmNestedDomain {
    pub fn vsmmu(&self) -> &Arc<VSmmu> {
        &self.vsmmu
    }

    /// `arm_smmu_make_nested_domain_ste`: the stage-2 STE of the parent with the vIOMMU's
    /// VMID, Config = nested and the guest's stage-1 fields; bypass → stage 2 only; abort or
    /// V = 0 → abort.
    pub(crate) fn make_ste(&self, ats: bool) -> Entry {
        let cfg = if self.vste[0] & ste::V == 0 {
            ste::CFG_ABORT
        } else {
            defs::get(ste::CFG, self.vste[0])
        };
        match cfg {
            ste::CFG_S1_TRANS => {
                let mut e = self.vsmmu.s2.ste(self.vsmmu.vmid, ats);
                e[0] = ste::V | defs::prep(ste::CFG, ste::CFG_NESTED);
                e[0] |= self.vste[0] & !ste::CFG;
                e[1] |= self.vste[1];
                // Merge events: a guest cannot flood the host's event queue.
                e[1] |= ste::MEV;
                e
            }
            ste::CFG_BYPASS => self.vsmmu.s2.ste(self.vsmmu.vmid, ats),
            _ => strtab::make_abort_ste(),
        }
    }
}

impl NestedDomain for ArmNestedDomain {
    fn as_any(&self) -> &dyn Any {
        self
    }
}
