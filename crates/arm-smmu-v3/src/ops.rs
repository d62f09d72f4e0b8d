//! The iommufd driver half (`arm_smmu_ops`, `arm_vsmmu_ops`): GET_HW_INFO, paging domain
//! allocation, attach/detach, vIOMMU allocation, page responses.

use std::any::Any;
use std::sync::Arc;

use twinmmu_iommufd::{
    DeviceEvents, Domain, Errno, HwInfo, IommuDevice, IommuDriver, PageResponse, PagingDomain,
    UserData, Viommu, ViommuAlloc, hw_info, hwpt_flags, viommu_type,
};

use crate::device::ArmSmmuV3;
use crate::domain::{S1Domain, S2Domain};
use crate::master::Master;

impl ArmSmmuV3 {
    fn master_of<'a>(&self, dev: &'a Arc<dyn IommuDevice>) -> Result<&'a Master, Errno> {
        let m = dev.as_any().downcast_ref::<Master>().ok_or(Errno::EINVAL)?;
        if !std::ptr::eq(Arc::as_ptr(&m.drv), self) {
            return Err(Errno::EINVAL);
        }
        Ok(m)
    }

    /// `struct iommu_hw_info_arm_smmuv3`: the raw IDRs, IIDR and AIDR.
    fn hw_info_smmuv3(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(crate::HW_INFO_ARM_SMMUV3_SIZE);
        v.extend_from_slice(&0u32.to_le_bytes()); // flags
        v.extend_from_slice(&0u32.to_le_bytes()); // __reserved
        for idr in self.feat.idr {
            v.extend_from_slice(&idr.to_le_bytes());
        }
        v.extend_from_slice(&self.feat.iidr.to_le_bytes());
        v.extend_from_slice(&self.feat.aidr.to_le_bytes());
        v
    }
}

impl IommuDriver for ArmSmmuV3 {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn hw_info(&self, dev: &Arc<dyn IommuDevice>, in_type: u32) -> Result<HwInfo, Errno> {
        self.master_of(dev)?;
        match in_type {
            hw_info::TYPE_DEFAULT | hw_info::TYPE_ARM_SMMUV3 => Ok(HwInfo {
                data_type: hw_info::TYPE_ARM_SMMUV3,
                data: self.hw_info_smmuv3(),
            }),
            hw_info::TYPE_TEGRA241_CMDQV => {
                let c = self.opts.cmdqv.ok_or(Errno::EOPNOTSUPP)?;
                // iommu_hw_info_tegra241_cmdqv {flags, version, log2vcmdqs, log2vsids, rsvd}
                let mut v = vec![0u8; crate::HW_INFO_TEGRA241_CMDQV_SIZE];
                v[4] = 1;
                v[5] = c.lvcmdqs_per_vintf.max(1).ilog2() as u8;
                v[6] = c.sids_per_vintf.max(1).ilog2() as u8;
                Ok(HwInfo {
                    data_type: hw_info::TYPE_TEGRA241_CMDQV,
                    data: v,
                })
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    fn device_bound(&self, dev: &Arc<dyn IommuDevice>, events: DeviceEvents) {
        if let Ok(m) = self.master_of(dev) {
            m.state.lock().events = Some(events);
        }
    }

    fn device_unbound(&self, dev: &Arc<dyn IommuDevice>) {
        if let Ok(m) = self.master_of(dev) {
            m.state.lock().events = None;
        }
    }

    /// `arm_smmu_domain_alloc_paging_flags`: flags 0 prefers stage 1; NEST_PARENT is a
    /// stage 2 (needs FEAT_NESTING); PASID needs stage 1; dirty tracking needs HTTU, which
    /// this SMMU does not report; driver data is refused.
    fn domain_alloc_paging(
        &self,
        dev: &Arc<dyn IommuDevice>,
        flags: u32,
        data: Option<&mut UserData<'_>>,
    ) -> Result<Arc<dyn PagingDomain>, Errno> {
        self.master_of(dev)?;
        if data.is_some() {
            return Err(Errno::EOPNOTSUPP);
        }
        let me = self.me.upgrade().ok_or(Errno::ENODEV)?;
        match flags {
            0 if self.feat.s1p => Ok(S1Domain::new(&me)? as Arc<dyn PagingDomain>),
            0 => Ok(S2Domain::new(&me, false)? as Arc<dyn PagingDomain>),
            hwpt_flags::NEST_PARENT if self.feat.nesting => {
                Ok(S2Domain::new(&me, true)? as Arc<dyn PagingDomain>)
            }
            hwpt_flags::PASID if self.feat.s1p => Ok(S1Domain::new(&me)? as Arc<dyn PagingDomain>),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// `arm_smmu_get_viommu_size`: FEAT_NESTING, and a device that cannot make the guest's
    /// mappings non-coherent (CANWBS) unless the SMMU has S2FWB.
    fn viommu_supported(&self, dev: &Arc<dyn IommuDevice>, ty: u32) -> bool {
        let Ok(m) = self.master_of(dev) else {
            return false;
        };
        if !self.feat.nesting || (!m.opts.canwbs && !self.feat.fwb) {
            return false;
        }
        ty == viommu_type::ARM_SMMUV3
            || (ty == viommu_type::TEGRA241_CMDQV && self.opts.cmdqv.is_some())
    }

    fn viommu_alloc(&self, req: ViommuAlloc<'_, '_>) -> Result<Arc<dyn Viommu>, Errno> {
        self.master_of(req.dev)?;
        let me = self.me.upgrade().ok_or(Errno::ENODEV)?;
        Ok(me.vsmmu_alloc(req)? as Arc<dyn Viommu>)
    }

    fn attach_dev(
        &self,
        dev: &Arc<dyn IommuDevice>,
        pasid: u32,
        domain: &Domain,
        _old: Option<&Domain>,
    ) -> Result<(), Errno> {
        self.master_of(dev)?;
        if pasid != twinmmu_iommufd::NO_PASID {
            // The model's masters have no SubstreamIDs.
            return Err(Errno::EINVAL);
        }
        let m = Arc::clone(dev).into_master().ok_or(Errno::EINVAL)?;
        m.attach(domain)
    }

    fn detach_dev(&self, dev: &Arc<dyn IommuDevice>, pasid: u32, _old: &Domain) {
        if pasid != twinmmu_iommufd::NO_PASID {
            return;
        }
        if let Ok(m) = self.master_of(dev) {
            m.detach();
        }
    }

    fn page_response(&self, dev: &Arc<dyn IommuDevice>, resp: &PageResponse) {
        if let Ok(m) = self.master_of(dev) {
            ArmSmmuV3::page_response(self, m, resp);
        }
    }
}

/// `Arc<dyn IommuDevice>` → `Arc<Master>`.
trait AsMasterArc {
    fn into_master(self) -> Option<Arc<Master>>;
}

impl AsMasterArc for Arc<dyn IommuDevice> {
    fn into_master(self) -> Option<Arc<Master>> {
        let any: Arc<dyn Any + Send + Sync> = self;
        any.downcast::<Master>().ok()
    }
}
