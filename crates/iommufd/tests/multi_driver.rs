//! Two IOMMU drivers in one context: a minimal driver written against the public traits (as
//! the arm-smmu-v3 crate will be) next to the mock. Domains of one driver are incompatible
//! with devices of the other (EINVAL), auto domains are not shared across drivers, and a
//! nesting parent of another driver is refused (iommufd.md §3.10, §4.4).
#![allow(clippy::unwrap_used)]

mod common;

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use parking_lot::Mutex;
use twinmmu_iommufd::mock::{self, MOCK_APERTURE_START};
use twinmmu_iommufd::*;

/// A paging domain that records its mappings in a map (4 KiB pages, full aperture).
#[derive(Default)]
struct FlatDomain {
    map: Mutex<BTreeMap<u64, (u64, u64)>>,
}

impl PagingDomain for FlatDomain {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn map(&self, iova: u64, pa: u64, len: u64, _prot: Prot) -> Result<(), Errno> {
        self.map.lock().insert(iova, (pa, len));
        Ok(())
    }
    fn unmap(&self, iova: u64, len: u64) -> u64 {
        let mut m = self.map.lock();
        let keys: Vec<u64> = m.range(iova..iova + len).map(|(&k, _)| k).collect();
        keys.iter()
            .filter_map(|k| m.remove(k))
            .map(|(_, l)| l)
            .sum()
    }
    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        let m = self.map.lock();
        let (&k, &(pa, len)) = m.range(..=iova).next_back()?;
        (iova - k < len).then(|| pa + (iova - k))
    }
}

struct FlatIommu {
    me: std::sync::Weak<FlatIommu>,
}

struct FlatDevice {
    iommu: Arc<FlatIommu>,
    group: u64,
}

impl IommuDevice for FlatDevice {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn iommu(&self) -> Arc<dyn IommuDriver> {
        Arc::clone(&self.iommu) as Arc<dyn IommuDriver>
    }
    fn group(&self) -> u64 {
        self.group
    }
    fn reserved_regions(&self) -> Vec<IovaRange> {
        // A software MSI window, as SMMUv3 reports one.
        vec![IovaRange::new(0x800_0000, 0x80f_ffff)]
    }
}

impl IommuDriver for FlatIommu {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn hw_info(&self, _dev: &Arc<dyn IommuDevice>, _in_type: u32) -> Result<HwInfo, Errno> {
        Ok(HwInfo {
            data_type: hw_info::TYPE_ARM_SMMUV3,
            data: vec![1, 2, 3],
        })
    }
    fn domain_alloc_paging(
        &self,
        _dev: &Arc<dyn IommuDevice>,
        _flags: u32,
        data: Option<&mut UserData<'_>>,
    ) -> Result<Arc<dyn PagingDomain>, Errno> {
        if data.is_some() {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(Arc::new(FlatDomain::default()))
    }
    fn attach_dev(
        &self,
        _dev: &Arc<dyn IommuDevice>,
        _pasid: u32,
        domain: &Domain,
        _old: Option<&Domain>,
    ) -> Result<(), Errno> {
        match domain {
            Domain::Paging(d) if d.as_any().is::<FlatDomain>() => Ok(()),
            _ => Err(Errno::EINVAL),
        }
    }
    fn detach_dev(&self, _dev: &Arc<dyn IommuDevice>, _pasid: u32, _old: &Domain) {}
}

fn flat_device(group: u64) -> Arc<FlatDevice> {
    let iommu = Arc::new_cyclic(|me| FlatIommu { me: me.clone() });
    let _ = &iommu.me;
    Arc::new(FlatDevice { iommu, group })
}

#[test]
fn domains_of_another_driver_are_incompatible() {
    let env = Env::new();
    let c = &env.ictx;
    let ioas = env.ioas();
    env.map_fixed(ioas, BUFFER, 4 * PAGE_SIZE, MOCK_APERTURE_START)
        .unwrap();
    let fd = c.bind_device(flat_device(1), None).unwrap();
    // Auto domain of the flat driver: loaded with the area, MSI window reserved.
    let fh = c.attach(fd, NO_PASID, ioas).unwrap();
    assert!(c.hwpt_is_auto(fh));
    let d = c.paging_domain(fh).unwrap();
    assert_eq!(d.iova_to_phys(MOCK_APERTURE_START + 5), Some(BUFFER + 5));
    assert_eq!(
        env.map_fixed(ioas, BUFFER, PAGE_SIZE, 0x800_0000),
        Err(Errno::EINVAL),
        "the device's reserved region"
    );
    let r = c.ioas_iova_ranges(ioas, 8).unwrap();
    assert!(r.ranges.contains(&IovaRange::new(0, 0x7ff_ffff)));
    // A mock device on the same IOAS does not share the flat auto domain.
    let (md, _) = env.mock_domain(ioas, 0).unwrap();
    assert_ne!(md.hwpt_id, fh);
    assert!(c.hwpt_is_auto(md.hwpt_id));
    // Explicit cross-driver attach: EINVAL.
    assert_eq!(c.replace(md.dev_id, NO_PASID, fh), Err(Errno::EINVAL));
    // A NEST_PARENT of the flat driver cannot parent a mock nested HWPT.
    let parent = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            fd,
            ioas,
            &mut none_data(),
            ObjectId(0),
        )
        .unwrap();
    let mut b = selftest_data(0);
    assert_eq!(
        c.hwpt_alloc(0, md.dev_id, parent, &mut sdata(&mut b), ObjectId(0)),
        Err(Errno::EINVAL)
    );
    // The flat driver has no nested support at all: EOPNOTSUPP before the parent checks.
    assert_eq!(
        c.hwpt_alloc(0, fd, parent, &mut sdata(&mut b), ObjectId(0)),
        Err(Errno::EOPNOTSUPP)
    );
    // ... nor vIOMMUs.
    assert_eq!(
        c.viommu_alloc(0, viommu_type::ARM_SMMUV3, fd, parent, &mut none_data()),
        Err(Errno::EOPNOTSUPP)
    );
    // GET_HW_INFO goes to the device's driver.
    let mut buf = [0u8; 4];
    let info = c.get_hw_info(0, fd, 0, 4, Some(&mut buf)).unwrap();
    assert_eq!(
        (info.out_data_type, info.data_len, buf),
        (hw_info::TYPE_ARM_SMMUV3, 3, [1, 2, 3, 0])
    );
    mock::md_check_map(c, md.hwpt_id, MOCK_APERTURE_START, 4 * PAGE_SIZE, BUFFER).unwrap();
    assert_eq!(
        mock::md_check_map(c, fh, MOCK_APERTURE_START, PAGE_SIZE, BUFFER),
        Err(Errno::EINVAL)
    );
    c.destroy(parent).unwrap();
    c.detach(fd, NO_PASID);
    assert_eq!(c.object_type(fh), None);
    c.unbind_device(fd).unwrap();
    env.teardown();
}

#[test]
fn remaining_errno_paths() {
    let env = Env::new();
    let c = &env.ictx;
    let ioas = env.ioas();
    // MAP: a length above SIZE_MAX - PAGE_SIZE.
    assert_eq!(
        c.ioas_map(RW, ioas, env.src(0), u64::MAX - PAGE_SIZE + 1, 0),
        Err(Errno::EINVAL)
    );
    // COPY: src or dst IOVA of ULONG_MAX.
    assert_eq!(
        c.ioas_copy(RW, ioas, ioas, PAGE_SIZE, 0, u64::MAX),
        Err(Errno::EOVERFLOW)
    );
    assert_eq!(
        c.ioas_copy(RW, ioas, ioas, PAGE_SIZE, u64::MAX, 0),
        Err(Errno::EOVERFLOW)
    );
    // COPY: src range overflows.
    assert_eq!(
        c.ioas_copy(RW, ioas, ioas, 3, 0, u64::MAX - 1),
        Err(Errno::EOVERFLOW)
    );
    let (d, _) = env.mock_domain(ioas, 0).unwrap();
    let (parent, v) = env.selftest_viommu(d.dev_id, ioas);
    // VDEVICE: the device must exist.
    assert_eq!(c.vdevice_alloc(v, ObjectId(999), 1), Err(Errno::ENOENT));
    assert_eq!(c.vdevice_alloc(v, ioas, 1), Err(Errno::ENOENT));
    // HW queue over an area whose backing is not page aligned: the internal access needs
    // PAGE_SIZE alignment, and attaching it to the IOAS is refused first (EADDRINUSE), so the
    // pin's own alignment check (EINVAL) is not reached.
    env.map_fixed(ioas, BUFFER + 2048, 2 * PAGE_SIZE, MOCK_APERTURE_START)
        .unwrap();
    let before = c.object_count();
    assert_eq!(
        c.hw_queue_alloc(
            0,
            v,
            mock::IOMMU_HW_QUEUE_TYPE_SELFTEST,
            0,
            MOCK_APERTURE_START,
            64
        ),
        Err(Errno::EADDRINUSE)
    );
    assert_eq!(c.object_count(), before);
    assert_eq!(c.ioas_alignment(ioas).unwrap(), mock::MOCK_IO_PAGE_SIZE);
    // A nested HWPT whose driver has no invalidation op: EOPNOTSUPP with entry_num 0 is the
    // contract; the mock has one, so use a paging HWPT for the type error instead.
    let mut a = InvalidateArray::new(0, 8, 1, &[0; 8]);
    assert_eq!(c.hwpt_invalidate(parent, &mut a), Err(Errno::EINVAL));
    assert_eq!(a.entry_num, 0);
    env.unmap(ioas, 0, u64::MAX).unwrap();
    c.destroy(v).unwrap();
    env.teardown();
}
