//! The kernel selftest's fixture/variant matrix (tools/testing/selftests/iommu/iommufd.c,
//! iommufd.md §6.2) over the core with the mock driver. Each `FIXTURE` is a setup function and
//! a set of variants; `variant_tests!` instantiates every test of a fixture for one variant,
//! and every test ends with the fixture teardown: close the context, nothing left pinned.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use twinmmu_iommufd::mock::{self, *};
use twinmmu_iommufd::*;

macro_rules! variant_tests {
    ($fixture:ident, $variant:ident, [$($test:ident),* $(,)?]) => {
        mod $variant {
            $(
                #[test]
                fn $test() {
                    let f = super::$fixture::setup(super::$fixture::Variant::$variant());
                    super::$fixture::$test(&f);
                    f.teardown();
                }
            )*
        }
    };
}

// ---------------------------------------------------------------------------------------
// FIXTURE(iommufd): a bare context.
mod iommufd {
    use super::*;

    pub struct Variant;
    impl Variant {
        pub fn only() -> Variant {
            Variant
        }
    }
    pub struct F {
        pub env: Env,
    }
    impl F {
        pub fn teardown(self) {
            self.env.teardown();
        }
    }
    pub fn setup(_: Variant) -> F {
        F { env: Env::new() }
    }

    pub fn simple_close(_f: &F) {}

    pub fn cmd_fail(f: &F) {
        assert_eq!(f.env.ictx.destroy(ObjectId(0)), Err(Errno::ENOENT));
        assert_eq!(f.env.ictx.destroy(ObjectId(1)), Err(Errno::ENOENT));
        assert_eq!(f.env.ictx.ioas_alloc(1), Err(Errno::EOPNOTSUPP));
    }

    pub fn global_options(f: &F) {
        let c = &f.env.ictx;
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_GET, 0, 0, false),
            Ok(0)
        );
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_GET, 1, 0, false),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_SET, 0, 1, false),
            Err(Errno::EPERM)
        );
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_SET, 0, 1, true),
            Ok(1)
        );
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_GET, 0, 0, false),
            Ok(1)
        );
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_SET, 0, 2, true),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.option(option::RLIMIT_MODE, 7, 0, 0, true),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.option(9, option::OP_GET, 0, 0, true),
            Err(Errno::EOPNOTSUPP)
        );
        // HUGE_PAGES needs an IOAS: object 0 is ENOENT, as is any non-IOAS.
        assert_eq!(
            c.option(option::HUGE_PAGES, option::OP_GET, 0, 0, true),
            Err(Errno::ENOENT)
        );
        let ioas = f.env.ioas();
        // Objects exist now: the accounting mode is frozen.
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_SET, 0, 0, true),
            Err(Errno::EBUSY)
        );
        assert_eq!(
            c.option(option::HUGE_PAGES, 9, ioas.raw(), 0, true),
            Err(Errno::EOPNOTSUPP)
        );
        c.destroy(ioas).unwrap();
        assert_eq!(
            c.option(option::RLIMIT_MODE, option::OP_SET, 0, 0, true),
            Ok(0)
        );
        assert!(!c.account_mm());
    }

    pub fn vfio_ioas(f: &F) {
        let c = &f.env.ictx;
        assert_eq!(
            c.vfio_ioas(vfio_ioas_op::GET, ObjectId(0)),
            Err(Errno::ENODEV)
        );
        assert_eq!(
            c.vfio_ioas(vfio_ioas_op::SET, ObjectId(55)),
            Err(Errno::ENOENT)
        );
        assert_eq!(c.vfio_ioas(9, ObjectId(0)), Err(Errno::EOPNOTSUPP));
        let ioas = f.env.ioas();
        c.vfio_ioas(vfio_ioas_op::SET, ioas).unwrap();
        assert_eq!(c.vfio_ioas(vfio_ioas_op::GET, ObjectId(0)), Ok(ioas));
        // No reference is taken: destroying the IOAS clears compat.
        c.destroy(ioas).unwrap();
        assert_eq!(
            c.vfio_ioas(vfio_ioas_op::GET, ObjectId(0)),
            Err(Errno::ENODEV)
        );
        let ioas = f.env.ioas();
        c.vfio_ioas(vfio_ioas_op::SET, ioas).unwrap();
        c.vfio_ioas(vfio_ioas_op::CLEAR, ObjectId(0)).unwrap();
        assert_eq!(c.vfio_compat_ioas(), None);
    }

    pub fn ids_are_lowest_free_and_reused(f: &F) {
        let c = &f.env.ictx;
        let a = f.env.ioas();
        let b = f.env.ioas();
        let d = f.env.ioas();
        assert_eq!((a.raw(), b.raw(), d.raw()), (1, 2, 3));
        c.destroy(b).unwrap();
        assert_eq!(c.object_type(b), None);
        assert_eq!(f.env.ioas().raw(), 2);
        assert_eq!(f.env.ioas().raw(), 4);
        // Failed commands release their IDs.
        assert_eq!(
            f.env.mock_domain(ObjectId(99), 0).map(|_| ()),
            Err(Errno::ENOENT)
        );
        assert_eq!(f.env.ioas().raw(), 5);
    }

    pub fn typed_lookup_is_enoent(f: &F) {
        let c = &f.env.ictx;
        let ioas = f.env.ioas();
        // An IOAS is not a DEVICE, a HWPT_PAGING, a vIOMMU...
        assert_eq!(c.unbind_device(ioas), Err(Errno::ENOENT));
        assert_eq!(c.hwpt_set_dirty_tracking(0, ioas), Err(Errno::ENOENT));
        assert_eq!(
            c.vdevice_alloc(ioas, ioas, 1).map(|_| ()),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.veventq_alloc(0, ioas, 1, 1).map(|_| ()),
            Err(Errno::ENOENT)
        );
        // ... except where the kernel says EINVAL: HWPT_ALLOC's pt_id and INVALIDATE.
        let (d, _) = f.env.mock_domain(ioas, 0).unwrap();
        assert_eq!(
            c.hwpt_alloc(0, d.dev_id, d.dev_id, &mut none_data(), ObjectId(0)),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.hwpt_alloc(0, d.dev_id, ObjectId(1000), &mut none_data(), ObjectId(0)),
            Err(Errno::EINVAL)
        );
        let mut arr = InvalidateArray::new(0, 8, 0, &[]);
        assert_eq!(c.hwpt_invalidate(d.hwpt_id, &mut arr), Err(Errno::EINVAL));
        assert_eq!(
            c.hwpt_invalidate(ObjectId(1000), &mut arr),
            Err(Errno::ENOENT)
        );
        assert_eq!(c.attach(d.dev_id, NO_PASID, d.stdev_id), Err(Errno::EINVAL));
        assert_eq!(
            c.attach(d.dev_id, NO_PASID, ObjectId(1000)),
            Err(Errno::ENOENT)
        );
    }
}
mod iommufd_groups {
    pub use super::iommufd::{F, setup};
    use super::*;

    pub struct Variant;
    impl Variant {
        pub fn groups() -> super::iommufd::Variant {
            super::iommufd::Variant::only()
        }
    }

    /// Devices sharing an iommu_group attach together: one HWPT per PASID for the group.
    pub fn group_attach(f: &F) {
        let c = &f.env.ictx;
        let ioas = f.env.ioas();
        let a = f.env.iommu.new_device(0).unwrap();
        let b = f.env.iommu.new_device_in_group(0, &a).unwrap();
        let da = c.bind_device(a, None).unwrap();
        let db = c.bind_device(b, None).unwrap();
        let h1 = c
            .hwpt_alloc(0, da, ioas, &mut none_data(), ObjectId(0))
            .unwrap();
        let h2 = c
            .hwpt_alloc(0, da, ioas, &mut none_data(), ObjectId(0))
            .unwrap();
        c.attach(da, NO_PASID, h1).unwrap();
        // The other device of the group must follow the group's HWPT.
        assert_eq!(c.attach(db, NO_PASID, h2), Err(Errno::EINVAL));
        c.attach(db, NO_PASID, h1).unwrap();
        assert_eq!(c.object_users(h1), 3);
        // Replace moves the whole group; the references move with it.
        c.replace(da, NO_PASID, h2).unwrap();
        assert_eq!(c.attached_hwpt(db, NO_PASID), Some(h2));
        assert_eq!(c.object_users(h1), 1);
        assert_eq!(c.object_users(h2), 3);
        c.destroy(h1).unwrap();
        c.detach(da, NO_PASID);
        assert_eq!(c.attached_hwpt(db, NO_PASID), Some(h2));
        c.detach(db, NO_PASID);
        c.destroy(h2).unwrap();
        // Binding the same device twice is refused (DMA ownership is claimed).
        let dev = c.device_handle(da).unwrap();
        assert_eq!(c.bind_device(dev, None), Err(Errno::EBUSY));
        c.unbind_device(da).unwrap();
        c.unbind_device(db).unwrap();
        assert_eq!(c.unbind_device(db), Err(Errno::ENOENT));
        // A selftest device is unbound through its SELFTEST object only.
        let (sd, _) = f.env.mock_domain(ioas, 0).unwrap();
        assert_eq!(c.unbind_device(sd.dev_id), Err(Errno::EBUSY));
        c.destroy(sd.stdev_id).unwrap();
        assert_eq!(c.object_type(sd.dev_id), None);
    }

    /// Attaching through an IOAS attaches the device to the new auto domain before the
    /// domain is loaded (immediate attach), so attach errors come before aperture errors.
    pub fn auto_domain_attach_errors_first(f: &F) {
        let c = &f.env.ictx;
        let ioas = f.env.ioas();
        c.ioas_allow_iovas(ioas, 1, &[IovaRange::new(0x1000, 0x1fff)])
            .unwrap();
        let dev = f.env.iommu.new_device(MOCK_FLAGS_DEVICE_PASID).unwrap();
        let d = c.bind_device(dev, None).unwrap();
        let before = c.object_count();
        // A PASID attach through an IOAS: auto domains are not PASID-compatible (EINVAL),
        // reported before the aperture conflict with the allowed range (EADDRINUSE).
        assert_eq!(c.attach(d, 5, ioas), Err(Errno::EINVAL));
        assert_eq!(c.attach(d, NO_PASID, ioas), Err(Errno::EADDRINUSE));
        assert_eq!(c.object_count(), before);
        assert_eq!(c.attached_hwpt(d, NO_PASID), None);
        assert_eq!(c.object_users(d), 2, "no attached reference left behind");
        c.unbind_device(d).unwrap();
    }
}
variant_tests!(
    iommufd_groups,
    groups,
    [group_attach, auto_domain_attach_errors_first]
);

variant_tests!(
    iommufd,
    only,
    [
        simple_close,
        cmd_fail,
        global_options,
        vfio_ioas,
        ids_are_lowest_free_and_reused,
        typed_lookup_is_enoent
    ]
);

// ---------------------------------------------------------------------------------------
// FIXTURE(iommufd_ioas): an IOAS with 0, 1 or 2 mock domains (and a PASID-capable device).
mod iommufd_ioas {
    use super::*;

    pub struct Variant {
        mock_domains: u32,
        pasid_capable: bool,
    }
    impl Variant {
        pub fn no_domain() -> Variant {
            Variant {
                mock_domains: 0,
                pasid_capable: false,
            }
        }
        pub fn mock_domain() -> Variant {
            Variant {
                mock_domains: 1,
                pasid_capable: true,
            }
        }
        pub fn two_mock_domain() -> Variant {
            Variant {
                mock_domains: 2,
                pasid_capable: false,
            }
        }
        /// The kernel variant sets a 16-byte temporary memory limit; it only affects internal
        /// batching, so this is the one-domain setup again.
        pub fn mock_domain_limit() -> Variant {
            Variant {
                mock_domains: 1,
                pasid_capable: false,
            }
        }
    }

    pub struct F {
        pub env: Env,
        pub v: Variant,
        pub ioas_id: ObjectId,
        pub stdev_id: Option<ObjectId>,
        pub hwpt_id: Option<ObjectId>,
        pub device_id: Option<ObjectId>,
        pub device_pasid_id: Option<ObjectId>,
        pub base_iova: u64,
    }
    impl F {
        pub fn teardown(self) {
            self.env.teardown();
        }
        fn c(&self) -> &Iommufd {
            &self.env.ictx
        }
    }

    pub fn setup(v: Variant) -> F {
        let env = Env::new();
        let ioas_id = env.ioas();
        let (mut stdev_id, mut hwpt_id, mut device_id, mut base_iova) = (None, None, None, 0);
        for _ in 0..v.mock_domains {
            let (d, _) = env.mock_domain(ioas_id, 0).unwrap();
            mock::dev_check_cache(&env.ictx, d.dev_id, 0, IOMMU_TEST_DEV_CACHE_DEFAULT).unwrap();
            stdev_id = Some(d.stdev_id);
            hwpt_id = Some(d.hwpt_id);
            device_id = Some(d.dev_id);
            base_iova = MOCK_APERTURE_START;
        }
        let device_pasid_id = v.pasid_capable.then(|| {
            env.mock_domain(ioas_id, MOCK_FLAGS_DEVICE_PASID)
                .unwrap()
                .0
                .dev_id
        });
        F {
            env,
            v,
            ioas_id,
            stdev_id,
            hwpt_id,
            device_id,
            device_pasid_id,
            base_iova,
        }
    }

    pub fn ioas_auto_destroy(_f: &F) {}

    pub fn ioas_destroy(f: &F) {
        if f.stdev_id.is_some() {
            // IOAS cannot be freed while a device has a HWPT using it.
            assert_eq!(f.c().destroy(f.ioas_id), Err(Errno::EBUSY));
        } else {
            f.c().destroy(f.ioas_id).unwrap();
        }
    }

    pub fn alloc_hwpt_nested(f: &F) {
        let Some(dev) = f.device_id else { return };
        let c = f.c();
        let nest = hwpt_flags::NEST_PARENT;
        let parent = c
            .hwpt_alloc(nest, dev, f.ioas_id, &mut none_data(), ObjectId(0))
            .unwrap();
        let plain = c
            .hwpt_alloc(0, dev, f.ioas_id, &mut none_data(), ObjectId(0))
            .unwrap();
        assert!(!c.hwpt_is_auto(plain));
        let mut buf = selftest_data(IOMMU_TEST_IOTLB_DEFAULT);
        // Negative tests.
        assert_eq!(
            c.hwpt_alloc(0, dev, parent, &mut none_data(), ObjectId(0)),
            Err(Errno::EOPNOTSUPP),
            "nested needs data"
        );
        assert_eq!(
            c.hwpt_alloc(
                hwpt_flags::NEST_PARENT,
                dev,
                parent,
                &mut sdata(&mut buf),
                ObjectId(0)
            ),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.hwpt_alloc(
                hwpt_flags::DIRTY_TRACKING,
                dev,
                parent,
                &mut sdata(&mut buf),
                ObjectId(0)
            ),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.hwpt_alloc(0, dev, plain, &mut sdata(&mut buf), ObjectId(0)),
            Err(Errno::EINVAL),
            "parent must be NEST_PARENT"
        );
        let auto = f.hwpt_id.unwrap();
        assert!(c.hwpt_is_auto(auto));
        assert_eq!(
            c.hwpt_alloc(0, dev, auto, &mut sdata(&mut buf), ObjectId(0)),
            Err(Errno::EINVAL),
            "parent must not be an auto domain"
        );
        let mut bad_type = UserData::new(0xbeef, &mut buf[..]);
        assert_eq!(
            c.hwpt_alloc(0, dev, parent, &mut bad_type, ObjectId(0)),
            Err(Errno::EOPNOTSUPP)
        );
        let mut zero_len = UserData {
            data_type: IOMMU_HWPT_DATA_SELFTEST,
            len: 0,
            buf: None,
        };
        assert_eq!(
            c.hwpt_alloc(0, dev, parent, &mut zero_len, ObjectId(0)),
            Err(Errno::EINVAL)
        );
        let mut none_with_len = UserData {
            data_type: hwpt_data::NONE,
            len: 4,
            buf: None,
        };
        assert_eq!(
            c.hwpt_alloc(0, dev, parent, &mut none_with_len, ObjectId(0)),
            Err(Errno::EINVAL)
        );
        let mut short = UserData::new(IOMMU_HWPT_DATA_SELFTEST, &mut buf[..3]);
        assert_eq!(
            c.hwpt_alloc(0, dev, parent, &mut short, ObjectId(0)),
            Err(Errno::EINVAL)
        );
        let mut null = UserData {
            data_type: IOMMU_HWPT_DATA_SELFTEST,
            len: 4,
            buf: None,
        };
        assert_eq!(
            c.hwpt_alloc(0, dev, parent, &mut null, ObjectId(0)),
            Err(Errno::EFAULT)
        );

        // Allocate two nested HWPTs sharing one parent.
        let n0 = c
            .hwpt_alloc(0, dev, parent, &mut sdata(&mut buf), ObjectId(0))
            .unwrap();
        let n1 = c
            .hwpt_alloc(0, dev, parent, &mut sdata(&mut buf), ObjectId(0))
            .unwrap();
        for n in [n0, n1] {
            for i in 0..4 {
                mock::md_check_iotlb(c, n, i, IOMMU_TEST_IOTLB_DEFAULT).unwrap();
            }
        }
        assert_eq!(mock::md_check_iotlb(c, n0, 4, 0), Err(Errno::EINVAL));
        assert_eq!(mock::md_check_iotlb(c, parent, 0, 0), Err(Errno::ENOENT));
        // A nested HWPT cannot be a parent.
        assert_eq!(
            c.hwpt_alloc(0, dev, n1, &mut sdata(&mut buf), ObjectId(0)),
            Err(Errno::EINVAL)
        );
        // The parent is in use.
        assert_eq!(c.destroy(parent), Err(Errno::EBUSY));
        assert_eq!(c.object_users(parent), 3);

        // hwpt_invalidate: early errors report entry_num 0.
        let e0 = inv_entry(0, 0);
        let mut a = InvalidateArray {
            data_type: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
            entry_len: 8,
            entry_num: 1,
            data: None,
        };
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EINVAL));
        assert_eq!(a.entry_num, 0);
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 0, 1, &e0);
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EINVAL));
        assert_eq!(a.entry_num, 0);
        // Probe a type with entry_num 0.
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 0, &[]);
        c.hwpt_invalidate(n0, &mut a).unwrap();
        assert_eq!(a.entry_num, 0);
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID, 8, 1, &e0);
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EINVAL));
        assert_eq!(a.entry_num, 0);
        // A paging parent is not invalidatable this way.
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 1, &e0);
        assert_eq!(c.hwpt_invalidate(parent, &mut a), Err(Errno::EINVAL));
        assert_eq!(a.entry_num, 0);
        // entry_len too short / too long.
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 7, 1, &e0);
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EINVAL));
        assert_eq!(a.entry_num, 0);
        let long = [e0.clone(), vec![0; 8]].concat();
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 16, 1, &long);
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EINVAL));
        // Unknown flag / iotlb_id too big.
        let bad = inv_entry(0xffff_fffe, 0);
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 1, &bad);
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EOPNOTSUPP));
        assert_eq!(a.entry_num, 0);
        let bad = inv_entry(
            IOMMU_TEST_INVALIDATE_FLAG_ALL,
            MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1,
        );
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 1, &bad);
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EINVAL));
        for i in 0..4 {
            mock::md_check_iotlb(c, n0, i, IOMMU_TEST_IOTLB_DEFAULT).unwrap();
        }
        // Invalidate iotlb 1, then 2 and 3 with a bad third entry: two handled.
        let e1 = inv_entry(0, 1);
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 1, &e1);
        c.hwpt_invalidate(n0, &mut a).unwrap();
        assert_eq!(a.entry_num, 1);
        mock::md_check_iotlb(c, n0, 1, 0).unwrap();
        mock::md_check_iotlb(c, n0, 0, IOMMU_TEST_IOTLB_DEFAULT).unwrap();
        let three = [inv_entry(0, 2), inv_entry(0, 3), inv_entry(0, 9)].concat();
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 3, &three);
        assert_eq!(c.hwpt_invalidate(n0, &mut a), Err(Errno::EINVAL));
        assert_eq!(a.entry_num, 2);
        mock::md_check_iotlb(c, n0, 3, 0).unwrap();
        // A short entry (entry_len 4 < 8) is EINVAL; a truncated array EFAULT after progress.
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 2, &e1);
        assert_eq!(c.hwpt_invalidate(n1, &mut a), Err(Errno::EFAULT));
        assert_eq!(a.entry_num, 1);
        // ALL.
        let all = inv_entry(IOMMU_TEST_INVALIDATE_FLAG_ALL, 0);
        let mut a = InvalidateArray::new(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 1, &all);
        c.hwpt_invalidate(n1, &mut a).unwrap();
        for i in 0..4 {
            mock::md_check_iotlb(c, n1, i, 0).unwrap();
        }

        // Attach the device to the nested HWPT, replace, detach.
        let stdev_dev = dev;
        c.replace(stdev_dev, NO_PASID, n0).unwrap();
        assert_eq!(c.destroy(n0), Err(Errno::EBUSY));
        c.replace(stdev_dev, NO_PASID, n1).unwrap();
        c.destroy(n0).unwrap();
        // The auto domain goes away with its last attachment (other devices may share it).
        if f.v.mock_domains == 1 && f.device_pasid_id.is_none() {
            assert_eq!(c.object_type(auto), None);
        } else {
            assert_eq!(c.object_type(auto), Some(ObjectType::HwptPaging));
        }
        c.replace(stdev_dev, NO_PASID, parent).unwrap();
        c.destroy(n1).unwrap();
        assert_eq!(c.destroy(parent), Err(Errno::EBUSY));
        c.replace(stdev_dev, NO_PASID, f.ioas_id).unwrap();
        c.destroy(parent).unwrap();
        c.destroy(plain).unwrap();
    }

    pub fn hwpt_attach(f: &F) {
        let c = f.c();
        let Some(dev) = f.device_id else {
            // Without a device there is nothing to attach; ids are still typed.
            assert_eq!(c.attach(f.ioas_id, NO_PASID, f.ioas_id), Err(Errno::ENOENT));
            return;
        };
        // Attaching again on the RID: already attached → EBUSY.
        assert_eq!(c.attach(dev, NO_PASID, f.ioas_id), Err(Errno::EBUSY));
        // Replace with a fresh paging HWPT, then back to the IOAS (a new auto domain).
        let h = c
            .hwpt_alloc(0, dev, f.ioas_id, &mut none_data(), ObjectId(0))
            .unwrap();
        assert_eq!(c.replace(dev, NO_PASID, h), Ok(h));
        assert_eq!(c.replace(dev, NO_PASID, h), Ok(h), "same HWPT: no-op");
        // Detach is a silent no-op on an unattached PASID; replace needs an attachment.
        c.detach(dev, 77);
        assert_eq!(c.replace(dev, 77, h), Err(Errno::EINVAL));
        c.detach(dev, NO_PASID);
        assert_eq!(c.attached_hwpt(dev, NO_PASID), None);
        assert_eq!(c.replace(dev, NO_PASID, h), Err(Errno::EINVAL));
        assert_eq!(c.attach(dev, NO_PASID, h), Ok(h));
        assert_eq!(c.destroy(h), Err(Errno::EBUSY));
        // A device object is never destroyable by the user while bound.
        assert_eq!(c.destroy(dev), Err(Errno::EBUSY));
        let auto = c.replace(dev, NO_PASID, f.ioas_id).unwrap();
        assert!(c.hwpt_is_auto(auto));
        c.destroy(h).unwrap();
    }

    pub fn ioas_area_destroy(f: &F) {
        // Adding an area does not change ability to destroy.
        f.env
            .map_fixed(f.ioas_id, BUFFER, PAGE_SIZE, f.base_iova)
            .unwrap();
        if f.stdev_id.is_some() {
            assert_eq!(f.c().destroy(f.ioas_id), Err(Errno::EBUSY));
        } else {
            f.c().destroy(f.ioas_id).unwrap();
        }
    }

    pub fn ioas_area_auto_destroy(f: &F) {
        for i in 0..10 {
            f.env
                .map_fixed(f.ioas_id, BUFFER, PAGE_SIZE, f.base_iova + i * PAGE_SIZE)
                .unwrap();
        }
        if f.v.mock_domains != 0 {
            f.env.check_refs(BUFFER, PAGE_SIZE, 10);
        } else {
            f.env.check_refs(BUFFER, PAGE_SIZE, 0);
        }
    }

    pub fn get_hw_info(f: &F) {
        let c = f.c();
        let Some(dev) = f.device_id else {
            assert_eq!(
                c.get_hw_info(0, ObjectId(1000), 0, 0, None).map(|_| ()),
                Err(Errno::ENOENT)
            );
            return;
        };
        // Exact size.
        let mut buf = [0xffu8; 8];
        let r = c.get_hw_info(0, dev, 0, 8, Some(&mut buf)).unwrap();
        assert_eq!(r.out_data_type, IOMMU_HW_INFO_TYPE_SELFTEST);
        assert_eq!(r.data_len, 8);
        assert_eq!(le32(&buf, 0), 0);
        assert_eq!(le32(&buf, 4), IOMMU_HW_INFO_SELFTEST_REGVAL);
        assert_eq!(r.out_capabilities, hw_info::CAP_DIRTY_TRACKING);
        assert_eq!(r.out_max_pasid_log2, 0);
        // A larger buffer: the tail is zeroed; data_len reports the driver's length.
        let mut big = [0xffu8; 16];
        let r = c.get_hw_info(0, dev, 0, 16, Some(&mut big)).unwrap();
        assert_eq!(r.data_len, 8);
        assert_eq!(&big[8..], &[0; 8]);
        // A smaller buffer: truncated.
        let mut small = [0xffu8; 6];
        c.get_hw_info(0, dev, 0, 4, Some(&mut small)).unwrap();
        assert_eq!(&small[..4], &[0; 4]);
        assert_eq!(&small[4..], &[0xff; 2]);
        // data_len 0 is allowed, even with no buffer.
        assert_eq!(c.get_hw_info(0, dev, 0, 0, None).unwrap().data_len, 8);
        // A buffer that faults.
        assert_eq!(
            c.get_hw_info(0, dev, 0, 8, Some(&mut small)).map(|_| ()),
            Err(Errno::EFAULT)
        );
        // INPUT_TYPE.
        c.get_hw_info(
            hw_info::FLAG_INPUT_TYPE,
            dev,
            IOMMU_HW_INFO_TYPE_SELFTEST,
            0,
            None,
        )
        .unwrap();
        assert_eq!(
            c.get_hw_info(
                hw_info::FLAG_INPUT_TYPE,
                dev,
                hw_info::TYPE_ARM_SMMUV3,
                0,
                None
            )
            .map(|_| ()),
            Err(Errno::EOPNOTSUPP)
        );
        // Without INPUT_TYPE the input type is ignored (forced to DEFAULT).
        c.get_hw_info(0, dev, hw_info::TYPE_ARM_SMMUV3, 0, None)
            .unwrap();
        assert_eq!(
            c.get_hw_info(2, dev, 0, 0, None).map(|_| ()),
            Err(Errno::EOPNOTSUPP)
        );
        if let Some(pdev) = f.device_pasid_id {
            let r = c.get_hw_info(0, pdev, 0, 0, None).unwrap();
            assert_eq!(r.out_max_pasid_log2, MOCK_PASID_WIDTH);
        }
    }

    pub fn area(f: &F) {
        let (env, ioas, base) = (&f.env, f.ioas_id, f.base_iova);
        // Unmap fails if nothing is mapped.
        for i in 0..10 {
            assert_eq!(
                env.unmap(ioas, i * PAGE_SIZE, PAGE_SIZE),
                Err(Errno::ENOENT)
            );
        }
        // Unmap works.
        for i in 0..10 {
            env.map_fixed(ioas, BUFFER, PAGE_SIZE, base + i * PAGE_SIZE)
                .unwrap();
        }
        for i in 0..10 {
            assert_eq!(
                env.unmap(ioas, base + i * PAGE_SIZE, PAGE_SIZE),
                Ok(PAGE_SIZE)
            );
        }
        // Split fails.
        env.map_fixed(ioas, BUFFER, PAGE_SIZE * 2, base + 16 * PAGE_SIZE)
            .unwrap();
        assert_eq!(
            env.unmap(ioas, base + 16 * PAGE_SIZE, PAGE_SIZE),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            env.unmap(ioas, base + 17 * PAGE_SIZE, PAGE_SIZE),
            Err(Errno::ENOENT)
        );
        // Over map fails.
        assert_eq!(
            env.map_fixed(ioas, BUFFER, PAGE_SIZE * 2, base + 16 * PAGE_SIZE),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            env.map_fixed(ioas, BUFFER, PAGE_SIZE, base + 16 * PAGE_SIZE),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            env.map_fixed(ioas, BUFFER, PAGE_SIZE, base + 17 * PAGE_SIZE),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            env.map_fixed(ioas, BUFFER, PAGE_SIZE * 2, base + 15 * PAGE_SIZE),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            env.map_fixed(ioas, BUFFER, PAGE_SIZE * 3, base + 15 * PAGE_SIZE),
            Err(Errno::EEXIST)
        );
        // Unmap all works.
        assert_eq!(env.unmap(ioas, 0, u64::MAX), Ok(2 * PAGE_SIZE));
        // Unmap all succeeds on an empty IOAS.
        assert_eq!(env.unmap(ioas, 0, u64::MAX), Ok(0));
    }

    pub fn unmap_fully_contained_areas(f: &F) {
        let (env, ioas) = (&f.env, f.ioas_id);
        // Give no_domain some space to rewind base_iova.
        let base = f.base_iova + 4 * PAGE_SIZE;
        for i in 0..4 {
            env.map_fixed(ioas, BUFFER, 8 * PAGE_SIZE, base + i * 16 * PAGE_SIZE)
                .unwrap();
        }
        // Unmapping a range not fully containing its areas fails.
        assert_eq!(
            env.unmap(ioas, base - 4 * PAGE_SIZE, 8 * PAGE_SIZE),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            env.unmap(
                ioas,
                base + 3 * 16 * PAGE_SIZE + 8 * PAGE_SIZE - 4 * PAGE_SIZE,
                8 * PAGE_SIZE
            ),
            Err(Errno::ENOENT)
        );
        // Unmapping fully contained areas works.
        assert_eq!(
            env.unmap(
                ioas,
                base - 4 * PAGE_SIZE,
                3 * 16 * PAGE_SIZE + 8 * PAGE_SIZE + 4 * PAGE_SIZE
            ),
            Ok(32 * PAGE_SIZE)
        );
    }

    pub fn unmap_partial_progress_stays(f: &F) {
        // Areas removed before the walk hits a partial one stay removed (§3.7).
        let (env, ioas, base) = (&f.env, f.ioas_id, f.base_iova);
        env.map_fixed(ioas, BUFFER, PAGE_SIZE, base).unwrap();
        env.map_fixed(ioas, BUFFER, 2 * PAGE_SIZE, base + PAGE_SIZE)
            .unwrap();
        assert_eq!(env.unmap(ioas, base, 2 * PAGE_SIZE), Err(Errno::ENOENT));
        assert_eq!(
            f.c().ioas_areas(ioas).unwrap(),
            vec![(base + PAGE_SIZE, 2 * PAGE_SIZE)]
        );
        // Argument checks.
        assert_eq!(env.unmap(ioas, base, 0), Err(Errno::EINVAL));
        assert_eq!(env.unmap(ioas, u64::MAX, 1), Err(Errno::EOVERFLOW));
        assert_eq!(env.unmap(ioas, 1, u64::MAX), Err(Errno::EOVERFLOW));
        assert_eq!(env.unmap(ioas, u64::MAX - 1, 5), Err(Errno::EOVERFLOW));
        assert_eq!(env.unmap(ObjectId(999), 0, u64::MAX), Err(Errno::ENOENT));
    }

    pub fn area_auto_iova(f: &F) {
        let (env, ioas) = (&f.env, f.ioas_id);
        let mut iovas = Vec::new();
        for i in 0..10u64 {
            let len = PAGE_SIZE * (i + 1);
            let iova = env.map_auto(ioas, BUFFER, len).unwrap();
            iovas.push((iova, len));
        }
        for &(iova, len) in &iovas {
            assert_eq!(
                iova % len.next_power_of_two().min(HPAGE_SIZE),
                0,
                "{iova:#x}"
            );
            assert!(iova >= PAGE_SIZE);
            if f.v.mock_domains != 0 {
                assert!((MOCK_APERTURE_START..=MOCK_APERTURE_LAST).contains(&iova));
            }
        }
        for (iova, len) in iovas {
            env.unmap(ioas, iova, len).unwrap();
        }
        // Allowed ranges steer automatic allocation.
        let ranges = [IovaRange::new(
            f.base_iova.max(PAGE_SIZE) + 64 * PAGE_SIZE,
            f.base_iova.max(PAGE_SIZE) + 128 * PAGE_SIZE - 1,
        )];
        f.c().ioas_allow_iovas(ioas, 1, &ranges).unwrap();
        let mut iovas = Vec::new();
        for i in 0..4u64 {
            let len = PAGE_SIZE * (i + 1);
            let iova = env.map_auto(ioas, BUFFER, len).unwrap();
            assert!(iova >= ranges[0].start && iova + len - 1 <= ranges[0].last);
            iovas.push((iova, len));
        }
        // A request that cannot fit in the allowed range.
        assert_eq!(
            env.map_auto(ioas, BUFFER, 128 * PAGE_SIZE),
            Err(Errno::ENOSPC)
        );
        // Fixed maps ignore the allowed set.
        env.map_fixed(ioas, BUFFER, PAGE_SIZE, f.base_iova + 200 * PAGE_SIZE)
            .unwrap();
        // Reserving inside an allowed range fails.
        assert_eq!(
            f.c().ioas_add_reserved(ioas, ranges[0].start, PAGE_SIZE),
            Err(Errno::EADDRINUSE)
        );
        // The sub-page offset of the user address is kept.
        f.c().ioas_allow_iovas(ioas, 0, &[]).unwrap();
        if f.v.mock_domains == 0 {
            let iova = env.map_auto(ioas, BUFFER + 7, PAGE_SIZE).unwrap();
            assert_eq!(iova % PAGE_SIZE, 7);
            // Lengths and addresses not aligned to the IOAS alignment of 1 are fine.
            let iova = env.map_auto(ioas, BUFFER + 1, 3).unwrap();
            assert_eq!(iova % PAGE_SIZE, 1);
        }
    }

    pub fn area_allowed(f: &F) {
        let c = f.c();
        let ioas = f.ioas_id;
        // start == last and start > last are EINVAL; overlaps within the list too.
        assert_eq!(
            c.ioas_allow_iovas(ioas, 1, &[IovaRange::new(0x5000, 0x5000)]),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.ioas_allow_iovas(ioas, 1, &[IovaRange::new(0x6000, 0x5000)]),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.ioas_allow_iovas(
                ioas,
                2,
                &[
                    IovaRange::new(0x5000, 0x8fff),
                    IovaRange::new(0x8000, 0x9fff)
                ]
            ),
            Err(Errno::EINVAL)
        );
        // A faulting array: fewer readable entries than num_iovas.
        assert_eq!(
            c.ioas_allow_iovas(ioas, 2, &[IovaRange::new(0x5000, 0x8fff)]),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            c.ioas_allow_iovas(ObjectId(999), 0, &[]),
            Err(Errno::ENOENT)
        );
        if f.v.mock_domains != 0 {
            // The mock aperture reserves [0, 1<<24): an allowed range there is EADDRINUSE,
            // and the old set is kept.
            let good = [IovaRange::new(
                MOCK_APERTURE_START,
                MOCK_APERTURE_START + 0xffff,
            )];
            c.ioas_allow_iovas(ioas, 1, &good).unwrap();
            assert_eq!(
                c.ioas_allow_iovas(ioas, 1, &[IovaRange::new(0x1000, 0x1fff)]),
                Err(Errno::EADDRINUSE)
            );
            assert_eq!(c.ioas_allowed(ioas).unwrap(), good.to_vec());
            // Attaching a new domain whose aperture complement meets an allowed range.
            let ioas2 = f.env.ioas();
            c.ioas_allow_iovas(ioas2, 1, &[IovaRange::new(0x1000, 0x1fff)])
                .unwrap();
            assert_eq!(
                f.env.mock_domain(ioas2, 0).map(|_| ()),
                Err(Errno::EADDRINUSE)
            );
            c.destroy(ioas2).unwrap();
        } else {
            c.ioas_add_reserved(ioas, 0x10000, 0x1000).unwrap();
            assert_eq!(
                c.ioas_allow_iovas(ioas, 1, &[IovaRange::new(0x10000, 0x10fff)]),
                Err(Errno::EADDRINUSE)
            );
            // Reserving over an area is EADDRINUSE too.
            f.env.map_fixed(ioas, BUFFER, PAGE_SIZE, 0x20000).unwrap();
            assert_eq!(
                c.ioas_add_reserved(ioas, 0x20000, 1),
                Err(Errno::EADDRINUSE)
            );
            // A fixed map over a reserved range is EINVAL.
            assert_eq!(
                f.env.map_fixed(ioas, BUFFER, PAGE_SIZE, 0x10000),
                Err(Errno::EINVAL)
            );
        }
    }

    pub fn copy_area(f: &F) {
        let c = f.c();
        let ioas = f.ioas_id;
        f.env
            .map_fixed(ioas, BUFFER, PAGE_SIZE, f.base_iova)
            .unwrap();
        let dst = f.env.ioas();
        let iova = c
            .ioas_copy(RW, dst, ioas, PAGE_SIZE, 0, f.base_iova)
            .unwrap();
        assert!(iova >= PAGE_SIZE);
        assert_eq!(c.ioas_areas(dst).unwrap(), vec![(iova, PAGE_SIZE)]);
        // Fixed copy into the same IOAS.
        c.ioas_copy(
            FIXED,
            ioas,
            ioas,
            PAGE_SIZE,
            f.base_iova + 8 * PAGE_SIZE,
            f.base_iova,
        )
        .unwrap();
        // Errors in order.
        assert_eq!(
            c.ioas_copy(1 << 5, dst, ioas, PAGE_SIZE, 0, 0),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.ioas_copy(RW, dst, ioas, u64::MAX, 0, 0),
            Err(Errno::EOVERFLOW)
        );
        assert_eq!(
            c.ioas_copy(0, dst, ioas, PAGE_SIZE, 0, f.base_iova),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.ioas_copy(RW, dst, ObjectId(999), PAGE_SIZE, 0, f.base_iova),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.ioas_copy(RW, dst, ioas, 0, 0, f.base_iova),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.ioas_copy(RW, dst, ioas, PAGE_SIZE * 2, 0, f.base_iova),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.ioas_copy(RW, ObjectId(999), ioas, PAGE_SIZE, 0, f.base_iova),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.ioas_copy(FIXED, dst, ioas, PAGE_SIZE, iova, f.base_iova),
            Err(Errno::EEXIST)
        );
        // A read-only source cannot be copied writeable.
        let ro = f.env.ioas();
        c.ioas_map(
            map_flags::READABLE | map_flags::FIXED_IOVA,
            ro,
            f.env.src(BUFFER),
            PAGE_SIZE,
            0x100000,
        )
        .unwrap();
        assert_eq!(
            c.ioas_copy(RW, dst, ro, PAGE_SIZE, 0, 0x100000),
            Err(Errno::EPERM)
        );
        c.ioas_copy(map_flags::READABLE, dst, ro, PAGE_SIZE, 0, 0x100000)
            .unwrap();
    }

    pub fn iova_ranges(f: &F) {
        let c = f.c();
        let ioas = f.ioas_id;
        let r = c.ioas_iova_ranges(ioas, 0).unwrap();
        assert_eq!(r.num_iovas, 1);
        assert!(r.ranges.is_empty());
        assert_eq!(r.status, Err(Errno::EMSGSIZE));
        let r = c.ioas_iova_ranges(ioas, 1).unwrap();
        assert_eq!(r.status, Ok(()));
        if f.v.mock_domains != 0 {
            assert_eq!(
                r.ranges,
                vec![IovaRange::new(MOCK_APERTURE_START, MOCK_APERTURE_LAST)]
            );
            assert_eq!(r.out_iova_alignment, MOCK_IO_PAGE_SIZE);
        } else {
            assert_eq!(r.ranges, vec![IovaRange::new(0, u64::MAX)]);
            assert_eq!(r.out_iova_alignment, 1);
        }
        // Buffer too small for two: first written, num_iovas = 2, EMSGSIZE.
        let start = f.base_iova + PAGE_SIZE;
        c.ioas_add_reserved(ioas, start, PAGE_SIZE).unwrap();
        let r = c.ioas_iova_ranges(ioas, 1).unwrap();
        assert_eq!(r.num_iovas, 2);
        assert_eq!(r.status, Err(Errno::EMSGSIZE));
        assert_eq!(r.ranges.len(), 1);
        let r = c.ioas_iova_ranges(ioas, 3).unwrap();
        assert_eq!(r.num_iovas, 2);
        assert_eq!(r.status, Ok(()));
        if f.v.mock_domains != 0 {
            assert_eq!(
                r.ranges,
                vec![
                    IovaRange::new(MOCK_APERTURE_START, start - 1),
                    IovaRange::new(start + PAGE_SIZE, MOCK_APERTURE_LAST)
                ]
            );
        } else {
            assert_eq!(
                r.ranges,
                vec![
                    IovaRange::new(0, start - 1),
                    IovaRange::new(start + PAGE_SIZE, u64::MAX)
                ]
            );
        }
        assert_eq!(
            c.ioas_iova_ranges(ObjectId(999), 1).map(|_| ()),
            Err(Errno::ENOENT)
        );
    }

    pub fn access_domain_destroy(f: &F) {
        let c = f.c();
        let a = MockAccess::create(c, f.ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
        f.env
            .map_fixed(f.ioas_id, BUFFER, 2 * HPAGE_SIZE, f.base_iova)
            .unwrap();
        let (item, pas) = a.pin_pages(0, f.base_iova, PAGE_SIZE).unwrap();
        assert_eq!(pas, vec![BUFFER]);
        // Pins are shared: one per page per mapping whatever the users.
        f.env.check_refs(BUFFER, PAGE_SIZE, 1);
        // An access is held by its creator.
        assert_eq!(c.destroy(a.id()), Err(Errno::EBUSY));
        assert_eq!(c.destroy(f.ioas_id), Err(Errno::EBUSY));
        a.destroy_pages(item).unwrap();
        assert_eq!(a.destroy_pages(item), Err(Errno::ENOENT));
        a.close().unwrap();
    }

    pub fn access_pin(f: &F) {
        let c = f.c();
        let a = MockAccess::create(c, f.ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
        assert_eq!(c.ioas_alignment(f.ioas_id).unwrap(), PAGE_SIZE);
        f.env
            .map_fixed(f.ioas_id, BUFFER, BUFFER_SIZE, f.base_iova)
            .unwrap();
        for npages in 1..=BUFFER_SIZE / PAGE_SIZE {
            let (item, pas) = a.pin_pages(0, f.base_iova, npages * PAGE_SIZE).unwrap();
            let expect: Vec<u64> = (0..npages).map(|i| BUFFER + i * PAGE_SIZE).collect();
            assert_eq!(pas, expect);
            // A second device attached now must see the pinned pages too.
            if npages == 1 && f.v.mock_domains != 0 {
                let (d, _) = f.env.mock_domain(f.ioas_id, 0).unwrap();
                mock::md_check_map(c, d.hwpt_id, f.base_iova, BUFFER_SIZE, BUFFER).unwrap();
                c.destroy(d.stdev_id).unwrap();
            }
            a.destroy_pages(item).unwrap();
        }
        // Argument checks (§4.6).
        assert_eq!(
            a.pin_pages(0, f.base_iova, 0).map(|_| ()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            a.pin_pages(0, u64::MAX, 2).map(|_| ()),
            Err(Errno::EOVERFLOW)
        );
        assert_eq!(
            a.pin_pages(0, f.base_iova + BUFFER_SIZE, PAGE_SIZE)
                .map(|_| ()),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            a.pin_pages(0, f.base_iova + 1, PAGE_SIZE).map(|_| ()),
            Err(Errno::EINVAL),
            "not page aligned within the backing"
        );
        assert_eq!(
            a.pin_pages(1 << 3, f.base_iova, PAGE_SIZE).map(|_| ()),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            a.pin_pages(0, f.base_iova, MOCK_ACCESS_MAX + 1).map(|_| ()),
            Err(Errno::ENOMEM)
        );
        // Write pins of a read-only area are EPERM.
        f.env.unmap(f.ioas_id, 0, u64::MAX).unwrap();
        c.ioas_map(
            map_flags::READABLE | map_flags::FIXED_IOVA,
            f.ioas_id,
            f.env.src(BUFFER),
            PAGE_SIZE,
            f.base_iova,
        )
        .unwrap();
        assert_eq!(
            a.pin_pages(MOCK_FLAGS_ACCESS_WRITE, f.base_iova, PAGE_SIZE)
                .map(|_| ()),
            Err(Errno::EPERM)
        );
        a.pin_pages(0, f.base_iova, PAGE_SIZE).unwrap();
        a.close().unwrap();
        // An access that cannot pin.
        let b = MockAccess::create(c, f.ioas_id, 0).unwrap();
        assert_eq!(
            b.pin_pages(0, f.base_iova, PAGE_SIZE).map(|_| ()),
            Err(Errno::EOPNOTSUPP)
        );
        b.close().unwrap();
        assert_eq!(
            MockAccess::create(c, f.ioas_id, 2).map(|_| ()),
            Err(Errno::EOPNOTSUPP)
        );
    }

    pub fn access_pin_unmap(f: &F) {
        let c = f.c();
        let a = MockAccess::create(c, f.ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
        f.env
            .map_fixed(f.ioas_id, BUFFER, BUFFER_SIZE, f.base_iova)
            .unwrap();
        a.pin_pages(0, f.base_iova, BUFFER_SIZE).unwrap();
        // Unmap asks the access to let go, then succeeds.
        assert_eq!(
            f.env.unmap(f.ioas_id, f.base_iova, BUFFER_SIZE),
            Ok(BUFFER_SIZE)
        );
        assert_eq!(a.items(), 0);
        assert_eq!(a.unmaps.lock().clone(), vec![(f.base_iova, BUFFER_SIZE)]);
        // An access that never lets go: EDEADLK after 100 tries.
        f.env
            .map_fixed(f.ioas_id, BUFFER, BUFFER_SIZE, f.base_iova)
            .unwrap();
        a.pin_pages(0, f.base_iova, PAGE_SIZE).unwrap();
        a.stubborn.store(true, Ordering::Relaxed);
        assert_eq!(f.env.unmap(f.ioas_id, 0, u64::MAX), Err(Errno::EDEADLK));
        // While the unmap was pending, new pins of that area are refused.
        assert_eq!(
            a.pin_pages(0, f.base_iova, PAGE_SIZE).map(|_| ()),
            Err(Errno::EINVAL)
        );
        a.stubborn.store(false, Ordering::Relaxed);
        assert_eq!(f.env.unmap(f.ioas_id, 0, u64::MAX), Ok(BUFFER_SIZE));
        a.close().unwrap();
    }

    pub fn access_destroy_and_replace(f: &F) {
        let c = f.c();
        let a = MockAccess::create(c, f.ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
        f.env
            .map_fixed(f.ioas_id, BUFFER, BUFFER_SIZE, f.base_iova)
            .unwrap();
        a.pin_pages(0, f.base_iova, 4 * PAGE_SIZE).unwrap();
        // A replace refused by the new IOAS's alignment changes nothing.
        let odd = f.env.ioas();
        f.env
            .map_fixed(odd, BUFFER + 1, PAGE_SIZE, 0x100001)
            .unwrap();
        assert_eq!(a.replace_ioas(odd), Err(Errno::EADDRINUSE));
        assert_eq!(a.items(), 1);
        a.pin_pages(0, f.base_iova, PAGE_SIZE).unwrap();
        // Destroying an access with pins asks it to unmap everything first.
        c.access_destroy(a.id()).unwrap();
        assert_eq!(a.items(), 0);
        assert_eq!(a.unmaps.lock().last().copied(), Some((0, u64::MAX)));
        assert_eq!(c.object_type(a.id()), None);
        f.env.unmap(f.ioas_id, 0, u64::MAX).unwrap();
        f.env.check_refs(BUFFER, BUFFER_SIZE, 0);
        c.destroy(f.ioas_id).unwrap_or(());
    }

    pub fn access_rw(f: &F) {
        let c = f.c();
        let a = MockAccess::create(c, f.ioas_id, 0).unwrap();
        f.env
            .map_fixed(f.ioas_id, BUFFER, BUFFER_SIZE, f.base_iova)
            .unwrap();
        let pattern: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for (off, len) in [
            (0u64, 1usize),
            (1, 17),
            (PAGE_SIZE - 3, 7),
            (PAGE_SIZE * 2 + 5, 300),
        ] {
            let mut w = pattern[..len].to_vec();
            a.rw(f.base_iova + off, &mut w, MOCK_ACCESS_RW_WRITE)
                .unwrap();
            let mut direct = vec![0u8; len];
            f.env.mem.read_phys(BUFFER + off, &mut direct).unwrap();
            assert_eq!(direct, pattern[..len]);
            let mut r = vec![0u8; len];
            a.rw(f.base_iova + off, &mut r, MOCK_ACCESS_RW_SLOW_PATH)
                .unwrap();
            assert_eq!(r, pattern[..len]);
        }
        let mut b = [0u8; 4];
        assert_eq!(
            a.rw(f.base_iova + BUFFER_SIZE - 2, &mut b, 0),
            Err(Errno::ENOENT)
        );
        assert_eq!(a.rw(u64::MAX - 1, &mut b, 0), Err(Errno::EOVERFLOW));
        assert_eq!(a.rw(f.base_iova, &mut [], 0), Err(Errno::EINVAL));
        assert_eq!(a.rw(f.base_iova, &mut b, 1 << 9), Err(Errno::EOPNOTSUPP));
        a.close().unwrap();
    }

    pub fn access_rw_unaligned(f: &F) {
        if f.v.mock_domains != 0 {
            return;
        }
        let c = f.c();
        let a = MockAccess::create(c, f.ioas_id, 0).unwrap();
        // Unaligned user memory and IOVA: only possible without a domain.
        let iova = f.env.map_auto(f.ioas_id, BUFFER + 3, 13).unwrap();
        let mut w = *b"hello, iommu!";
        a.rw(iova, &mut w, MOCK_ACCESS_RW_WRITE).unwrap();
        let mut direct = [0u8; 13];
        f.env.mem.read_phys(BUFFER + 3, &mut direct).unwrap();
        assert_eq!(&direct, b"hello, iommu!");
        a.close().unwrap();
    }

    pub fn fork_gone(f: &F) {
        // The child maps memory and exits: modelled by a hole in the backing. Lazy pinning
        // means MAP succeeds without a domain and attaching one later fails with EFAULT.
        let hole = BUFFER + 64 * PAGE_SIZE;
        f.env.user.punch_hole(hole, 4 * PAGE_SIZE);
        let r = f
            .env
            .map_fixed(f.ioas_id, hole, 4 * PAGE_SIZE, MOCK_APERTURE_START);
        if f.v.mock_domains != 0 {
            assert_eq!(r, Err(Errno::EFAULT));
            return;
        }
        r.unwrap();
        assert_eq!(
            f.env.mock_domain(f.ioas_id, 0).map(|_| ()),
            Err(Errno::EFAULT)
        );
        // Nothing stayed pinned, and no object was left behind.
        assert_eq!(f.env.user.total_pins(), 0);
        assert_eq!(f.c().object_count(), 1);
    }

    pub fn ioas_option_huge_pages(f: &F) {
        let c = f.c();
        let id = f.ioas_id.raw();
        assert_eq!(
            c.option(option::HUGE_PAGES, option::OP_GET, id, 0, false),
            Ok(1)
        );
        assert_eq!(
            c.option(option::HUGE_PAGES, option::OP_SET, id, 2, false),
            Err(Errno::EINVAL)
        );
        c.option(option::HUGE_PAGES, option::OP_SET, id, 0, false)
            .unwrap();
        assert_eq!(
            c.option(option::HUGE_PAGES, option::OP_GET, id, 0, false),
            Ok(0)
        );
        assert_eq!(c.ioas_alignment(f.ioas_id).unwrap(), PAGE_SIZE);
        c.option(option::HUGE_PAGES, option::OP_SET, id, 0, false)
            .unwrap();
        c.option(option::HUGE_PAGES, option::OP_SET, id, 1, false)
            .unwrap();
        assert_eq!(
            c.option(option::HUGE_PAGES, option::OP_GET, id, 0, false),
            Ok(1)
        );
        // With domains and areas, disabling is refused.
        f.env
            .map_fixed(f.ioas_id, BUFFER, PAGE_SIZE, f.base_iova)
            .unwrap();
        let r = c.option(option::HUGE_PAGES, option::OP_SET, id, 0, false);
        if f.v.mock_domains != 0 {
            assert_eq!(r, Err(Errno::EINVAL));
        } else {
            r.unwrap();
            c.option(option::HUGE_PAGES, option::OP_SET, id, 1, false)
                .unwrap();
            // Without domains: every area must be PAGE_SIZE aligned, else EADDRINUSE.
            f.env.map_fixed(f.ioas_id, BUFFER, 5, 0x100000).unwrap();
            assert_eq!(
                c.option(option::HUGE_PAGES, option::OP_SET, id, 0, false),
                Err(Errno::EADDRINUSE)
            );
            assert_eq!(
                c.option(option::HUGE_PAGES, option::OP_GET, id, 0, false),
                Ok(1)
            );
        }
    }

    pub fn ioas_iova_alloc(f: &F) {
        let env = &f.env;
        for length in (1..PAGE_SIZE * 2).step_by(97) {
            let r = env.map_auto(f.ioas_id, BUFFER, length);
            if f.v.mock_domains != 0 && length % MOCK_IO_PAGE_SIZE != 0 {
                assert_eq!(r, Err(Errno::EINVAL), "length {length}");
            } else {
                let iova = r.unwrap();
                env.unmap(f.ioas_id, iova, length).unwrap();
            }
        }
    }

    pub fn ioas_align_change(f: &F) {
        let c = f.c();
        let env = &f.env;
        let ioas = f.ioas_id;
        if f.v.mock_domains != 0 {
            // A map misaligned to the mock page is rejected at map time.
            assert_eq!(
                env.map_fixed(
                    ioas,
                    BUFFER + MOCK_IO_PAGE_SIZE / 2,
                    PAGE_SIZE,
                    MOCK_APERTURE_START
                ),
                Err(Errno::EINVAL)
            );
            // The mock page itself is fine...
            env.map_fixed(
                ioas,
                BUFFER + MOCK_IO_PAGE_SIZE,
                PAGE_SIZE,
                MOCK_APERTURE_START + PAGE_SIZE,
            )
            .unwrap();
            // ...but a pin-capable access now needs PAGE_SIZE: alignment upgrade blocked.
            assert_eq!(
                MockAccess::create(c, ioas, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).map(|_| ()),
                Err(Errno::EADDRINUSE)
            );
            env.unmap(ioas, 0, u64::MAX).unwrap();
            let a = MockAccess::create(c, ioas, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
            // Now the misaligned map is refused.
            assert_eq!(
                env.map_fixed(
                    ioas,
                    BUFFER + MOCK_IO_PAGE_SIZE,
                    PAGE_SIZE,
                    MOCK_APERTURE_START + PAGE_SIZE
                ),
                Err(Errno::EINVAL)
            );
            a.close().unwrap();
            assert_eq!(c.ioas_alignment(ioas).unwrap(), MOCK_IO_PAGE_SIZE);
        } else {
            // Without a domain the alignment is 1; a new domain raises it to the mock page,
            // which every area must satisfy (EADDRINUSE otherwise).
            env.map_fixed(ioas, BUFFER + 1, PAGE_SIZE, 0x100001)
                .unwrap();
            assert_eq!(env.mock_domain(ioas, 0).map(|_| ()), Err(Errno::EADDRINUSE));
            env.unmap(ioas, 0, u64::MAX).unwrap();
            let (d, _) = env.mock_domain(ioas, 0).unwrap();
            assert_eq!(c.ioas_alignment(ioas).unwrap(), MOCK_IO_PAGE_SIZE);
            c.destroy(d.stdev_id).unwrap();
            assert_eq!(c.ioas_alignment(ioas).unwrap(), 1);
        }
    }

    pub fn copy_sweep(f: &F) {
        let c = f.c();
        let env = &f.env;
        let src = f.ioas_id;
        let dst = env.ioas();
        let base = f.base_iova + 4 * PAGE_SIZE;
        // Three adjacent areas of 4 pages.
        for i in 0..3 {
            env.map_fixed(
                src,
                BUFFER + i * 4 * PAGE_SIZE,
                4 * PAGE_SIZE,
                base + i * 4 * PAGE_SIZE,
            )
            .unwrap();
        }
        let lo = base - 4 * PAGE_SIZE;
        let hi = base + 16 * PAGE_SIZE;
        let mut start = lo;
        while start < hi {
            let mut end = start + PAGE_SIZE;
            while end <= hi {
                let len = end - start;
                let r = c.ioas_copy(FIXED, dst, src, len, 0x40_0000, start);
                if start >= base && end <= base + 12 * PAGE_SIZE {
                    assert_eq!(r, Ok(0x40_0000), "copy [{start:#x}, {end:#x})");
                    // Each piece of each source area becomes a destination area.
                    let areas = c.ioas_areas(dst).unwrap();
                    let total: u64 = areas.iter().map(|a| a.1).sum();
                    assert_eq!(total, len);
                    if f.v.mock_domains == 0 {
                        let mut rd = vec![0u8; 8];
                        let a = MockAccess::create(c, dst, 0).unwrap();
                        a.rw(0x40_0000, &mut rd, 0).unwrap();
                        a.close().unwrap();
                    }
                    assert_eq!(env.unmap(dst, 0x40_0000, len), Ok(len));
                } else {
                    assert_eq!(r, Err(Errno::ENOENT), "copy [{start:#x}, {end:#x})");
                }
                end += 2 * PAGE_SIZE;
            }
            start += 3 * PAGE_SIZE;
        }
    }

    pub fn reserved_overflow(f: &F) {
        f.c()
            .ioas_add_reserved(f.ioas_id, 6, 0xffff_ffff_ffff_8001)
            .unwrap();
        assert_eq!(
            f.env.map_auto(f.ioas_id, BUFFER, 0x5000),
            Err(Errno::ENOSPC)
        );
    }

    pub fn map_errors_in_order(f: &F) {
        let c = f.c();
        let env = &f.env;
        let ioas = f.ioas_id;
        let src = || env.src(BUFFER);
        assert_eq!(
            c.ioas_map(1 << 3 | RW, ioas, src(), PAGE_SIZE, 0),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.ioas_map(RW, ioas, src(), PAGE_SIZE, u64::MAX),
            Err(Errno::EOVERFLOW)
        );
        assert_eq!(
            c.ioas_map(RW, ioas, src(), u64::MAX, 0),
            Err(Errno::EOVERFLOW)
        );
        assert_eq!(c.ioas_map(0, ioas, src(), PAGE_SIZE, 0), Err(Errno::EINVAL));
        assert_eq!(
            c.ioas_map(RW, ObjectId(99), src(), PAGE_SIZE, 0),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.ioas_map(RW, ioas, env.src(u64::MAX - 100), PAGE_SIZE, 0),
            Err(Errno::EOVERFLOW)
        );
        assert_eq!(c.ioas_map(RW, ioas, src(), 0, 0), Err(Errno::EINVAL));
        // MAP_FILE: start + length - 1 may reach u64::MAX, beyond it overflows.
        assert_eq!(
            c.ioas_map(RW, ioas, env.file_src(u64::MAX - 10), 12, 0),
            Err(Errno::EOVERFLOW)
        );
        if f.v.mock_domains != 0 {
            // Not a multiple of the IOAS alignment.
            assert_eq!(c.ioas_map(RW, ioas, src(), 100, 0), Err(Errno::EINVAL));
            assert_eq!(
                c.ioas_map(FIXED, ioas, src(), PAGE_SIZE, MOCK_APERTURE_START + 1),
                Err(Errno::EINVAL)
            );
            // Intersecting a reserved range (the aperture complement) is EINVAL for fixed.
            assert_eq!(
                c.ioas_map(FIXED, ioas, src(), PAGE_SIZE, 0),
                Err(Errno::EINVAL)
            );
            // Sub-page offset of the backing not aligned to the IOAS alignment.
            assert_eq!(
                c.ioas_map(
                    FIXED,
                    ioas,
                    env.src(BUFFER + 1),
                    PAGE_SIZE,
                    MOCK_APERTURE_START
                ),
                Err(Errno::EINVAL)
            );
            // Automatic IOVA: the alignment from the address is below the IOAS alignment.
            assert_eq!(
                c.ioas_map(RW, ioas, env.src(BUFFER + 1024), 2048, 0),
                Err(Errno::EINVAL)
            );
        }
        // Fixed IOVA overflowing.
        assert_eq!(
            c.ioas_map(FIXED, ioas, src(), 2 * PAGE_SIZE, u64::MAX - PAGE_SIZE + 1),
            Err(Errno::EOVERFLOW)
        );
        // Automatic: length ≥ ULONG_MAX/2.
        assert_eq!(
            c.ioas_map(RW, ioas, env.src(0), 1 << 63, 0),
            Err(Errno::EOVERFLOW)
        );
    }
}
variant_tests!(
    iommufd_ioas,
    no_domain,
    [
        ioas_auto_destroy,
        ioas_destroy,
        alloc_hwpt_nested,
        hwpt_attach,
        ioas_area_destroy,
        ioas_area_auto_destroy,
        get_hw_info,
        area,
        unmap_fully_contained_areas,
        unmap_partial_progress_stays,
        area_auto_iova,
        area_allowed,
        copy_area,
        iova_ranges,
        access_domain_destroy,
        access_pin,
        access_pin_unmap,
        access_destroy_and_replace,
        access_rw,
        access_rw_unaligned,
        fork_gone,
        ioas_option_huge_pages,
        ioas_iova_alloc,
        ioas_align_change,
        copy_sweep,
        reserved_overflow,
        map_errors_in_order
    ]
);
variant_tests!(
    iommufd_ioas,
    mock_domain,
    [
        ioas_auto_destroy,
        ioas_destroy,
        alloc_hwpt_nested,
        hwpt_attach,
        ioas_area_destroy,
        ioas_area_auto_destroy,
        get_hw_info,
        area,
        unmap_fully_contained_areas,
        unmap_partial_progress_stays,
        area_auto_iova,
        area_allowed,
        copy_area,
        iova_ranges,
        access_domain_destroy,
        access_pin,
        access_pin_unmap,
        access_destroy_and_replace,
        access_rw,
        access_rw_unaligned,
        fork_gone,
        ioas_option_huge_pages,
        ioas_iova_alloc,
        ioas_align_change,
        copy_sweep,
        reserved_overflow,
        map_errors_in_order
    ]
);
variant_tests!(
    iommufd_ioas,
    two_mock_domain,
    [
        ioas_auto_destroy,
        ioas_destroy,
        alloc_hwpt_nested,
        hwpt_attach,
        ioas_area_destroy,
        ioas_area_auto_destroy,
        get_hw_info,
        area,
        unmap_fully_contained_areas,
        unmap_partial_progress_stays,
        area_auto_iova,
        area_allowed,
        copy_area,
        iova_ranges,
        access_domain_destroy,
        access_pin,
        access_pin_unmap,
        access_destroy_and_replace,
        access_rw,
        access_rw_unaligned,
        fork_gone,
        ioas_option_huge_pages,
        ioas_iova_alloc,
        ioas_align_change,
        copy_sweep,
        reserved_overflow,
        map_errors_in_order
    ]
);
variant_tests!(
    iommufd_ioas,
    mock_domain_limit,
    [
        ioas_auto_destroy,
        ioas_destroy,
        alloc_hwpt_nested,
        hwpt_attach,
        area,
        unmap_fully_contained_areas,
        area_auto_iova,
        copy_area,
        iova_ranges,
        access_pin,
        access_rw,
        ioas_iova_alloc,
        copy_sweep,
        reserved_overflow
    ]
);

// ---------------------------------------------------------------------------------------
// FIXTURE(iommufd_mock_domain): an IOAS with one or two mock domains; hugepage variants use a
// 2 × HUGEPAGE buffer and HUGE_IOVA devices (1 MiB mock pages), file variants MAP_FILE.
mod iommufd_mock_domain {
    use super::*;

    pub struct Variant {
        mock_domains: usize,
        hugepages: bool,
        file: bool,
    }
    impl Variant {
        pub fn one_domain() -> Variant {
            Variant {
                mock_domains: 1,
                hugepages: false,
                file: false,
            }
        }
        pub fn two_domains() -> Variant {
            Variant {
                mock_domains: 2,
                hugepages: false,
                file: false,
            }
        }
        pub fn one_domain_hugepage() -> Variant {
            Variant {
                mock_domains: 1,
                hugepages: true,
                file: false,
            }
        }
        pub fn two_domains_hugepage() -> Variant {
            Variant {
                mock_domains: 2,
                hugepages: true,
                file: false,
            }
        }
        pub fn one_domain_file() -> Variant {
            Variant {
                mock_domains: 1,
                hugepages: false,
                file: true,
            }
        }
        pub fn one_domain_file_hugepage() -> Variant {
            Variant {
                mock_domains: 1,
                hugepages: true,
                file: true,
            }
        }
    }

    pub struct F {
        pub env: Env,
        pub v: Variant,
        pub ioas_id: ObjectId,
        pub stdev_ids: Vec<ObjectId>,
        pub hwpt_ids: Vec<ObjectId>,
        pub dev_flags: u32,
        pub buf: u64,
        pub buf_size: u64,
    }
    impl F {
        pub fn teardown(self) {
            self.env.teardown();
        }
        fn src(&self, addr: u64) -> MapSource {
            if self.v.file {
                self.env.file_src(addr)
            } else {
                self.env.src(addr)
            }
        }
        fn map_auto(&self, addr: u64, len: u64) -> Result<u64, Errno> {
            self.env
                .ictx
                .ioas_map(RW, self.ioas_id, self.src(addr), len, 0)
        }
        fn check_map_all(&self, iova: u64, len: u64, pa: u64) {
            for &h in &self.hwpt_ids {
                mock::md_check_map(&self.env.ictx, h, iova, len, pa).unwrap();
            }
        }
    }

    pub fn setup(v: Variant) -> F {
        let mut env = Env::new();
        let (buf, buf_size) = if v.hugepages {
            (BUFFER, 2 * HPAGE_SIZE)
        } else {
            (BUFFER, BUFFER_SIZE)
        };
        if v.file {
            // The memfd: file offsets 0..buf_size are the buffer's pages.
            env.file = Arc::new(FileBacking(PhysBacking::new(
                Arc::clone(&env.mem),
                0,
                buf + buf_size,
            )));
        }
        let dev_flags = if v.hugepages {
            MOCK_FLAGS_DEVICE_HUGE_IOVA
        } else {
            0
        };
        let ioas_id = env.ioas();
        let mut stdev_ids = Vec::new();
        let mut hwpt_ids = Vec::new();
        for _ in 0..v.mock_domains {
            let (d, _) = env.mock_domain(ioas_id, dev_flags).unwrap();
            stdev_ids.push(d.stdev_id);
            hwpt_ids.push(d.hwpt_id);
        }
        F {
            env,
            v,
            ioas_id,
            stdev_ids,
            hwpt_ids,
            dev_flags,
            buf,
            buf_size,
        }
    }

    pub fn basic(f: &F) {
        let c = &f.env.ictx;
        // Simple one page map.
        let iova = f.map_auto(f.buf, PAGE_SIZE).unwrap();
        f.check_map_all(iova, PAGE_SIZE, f.buf);
        if f.v.file {
            // MAP_FILE past the end of the memfd: EINVAL once pinned.
            let past = f.buf + f.buf_size - PAGE_SIZE;
            assert_eq!(f.map_auto(past, 2 * PAGE_SIZE), Err(Errno::EINVAL));
        } else {
            // EFAULT half way through the mapping, and when the whole buffer is gone.
            let b = f.buf + 64 * f.buf_size;
            f.env.user.punch_hole(b + f.buf_size / 2, f.buf_size / 2);
            assert_eq!(f.map_auto(b, f.buf_size), Err(Errno::EFAULT));
            f.env.user.punch_hole(b, f.buf_size);
            assert_eq!(f.map_auto(b, f.buf_size), Err(Errno::EFAULT));
        }
        // Nothing of the failed maps stayed.
        assert_eq!(c.ioas_areas(f.ioas_id).unwrap(), vec![(iova, PAGE_SIZE)]);
    }

    pub fn ro_unshare(f: &F) {
        let c = &f.env.ictx;
        // A read-only mapping of read-only memory pins for reading only.
        let ro = Arc::new(PhysBacking::read_only(
            Arc::clone(&f.env.mem),
            f.buf,
            PAGE_SIZE,
        ));
        let src = MapSource {
            backing: ro.clone() as Arc<dyn Backing>,
            addr: f.buf,
        };
        let iova = c
            .ioas_map(map_flags::READABLE, f.ioas_id, src.clone(), PAGE_SIZE, 0)
            .unwrap();
        f.check_map_all(iova, PAGE_SIZE, f.buf);
        assert_eq!(ro.pin_count(f.buf), 1);
        // Writing the page does not change the translation.
        f.env.mem.write_phys(f.buf, &[0xaa; 16]).unwrap();
        f.check_map_all(iova, PAGE_SIZE, f.buf);
        // Asking for a writeable mapping of it fails when pinned (EFAULT).
        assert_eq!(
            c.ioas_map(RW, f.ioas_id, src, PAGE_SIZE, 0),
            Err(Errno::EFAULT)
        );
        c.ioas_unmap(f.ioas_id, iova, PAGE_SIZE).unwrap();
        assert_eq!(ro.total_pins(), 0);
    }

    fn sweep_steps(f: &F) -> u64 {
        if f.v.hugepages {
            64 * MOCK_IO_PAGE_SIZE
        } else {
            MOCK_IO_PAGE_SIZE
        }
    }

    pub fn all_aligns(f: &F) {
        let c = &f.env.ictx;
        let step = sweep_steps(f);
        let mut start = 0;
        while start < f.buf_size {
            let mut end = start + MOCK_IO_PAGE_SIZE;
            while end <= f.buf_size {
                let len = end - start;
                let iova = f.map_auto(f.buf + start, len).unwrap();
                f.check_map_all(iova, len, f.buf + start);
                if !f.v.file {
                    f.env.check_refs(f.buf + start, len, 1);
                }
                assert_eq!(c.ioas_unmap(f.ioas_id, iova, len), Ok(len));
                if !f.v.file {
                    f.env.check_refs(f.buf + start, len, 0);
                }
                end += step;
            }
            start += step;
        }
    }

    pub fn all_aligns_copy(f: &F) {
        let c = &f.env.ictx;
        let step = sweep_steps(f) * 2;
        let mut start = 0;
        while start < f.buf_size {
            let mut end = start + MOCK_IO_PAGE_SIZE;
            while end <= f.buf_size {
                let len = end - start;
                let iova = f.map_auto(f.buf + start, len).unwrap();
                // Add and destroy a domain while the area is present.
                let (d, _) = f.env.mock_domain(f.ioas_id, f.dev_flags).unwrap();
                mock::md_check_map(c, d.hwpt_id, iova, len, f.buf + start).unwrap();
                if !f.v.file {
                    f.env.check_refs(f.buf + start, len, 1);
                }
                c.destroy(d.stdev_id).unwrap();
                c.ioas_unmap(f.ioas_id, iova, len).unwrap();
                end += step;
            }
            start += step;
        }
    }

    pub fn user_copy(f: &F) {
        let c = &f.env.ictx;
        // Pin the pages in an IOAS with no domains, then copy to an IOAS with domains.
        let ioas = f.env.ioas();
        let a = MockAccess::create(c, ioas, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
        f.env
            .map_fixed(ioas, f.buf, BUFFER_SIZE, MOCK_APERTURE_START)
            .unwrap();
        let (item, _) = a.pin_pages(0, MOCK_APERTURE_START, BUFFER_SIZE).unwrap();
        let dst = c
            .ioas_copy(RW, f.ioas_id, ioas, BUFFER_SIZE, 0, MOCK_APERTURE_START)
            .unwrap();
        f.check_map_all(dst, BUFFER_SIZE, f.buf);
        // Shared pages: still one pin each.
        f.env.check_refs(f.buf, BUFFER_SIZE, 1);
        // Move the access to the IOAS with domains.
        a.destroy_pages(item).unwrap();
        a.replace_ioas(f.ioas_id).unwrap();
        let (_, pas) = a.pin_pages(0, dst, BUFFER_SIZE).unwrap();
        assert_eq!(pas[0], f.buf);
        assert_eq!(a.replace_ioas(ObjectId(999)), Err(Errno::ENOENT));
        a.replace_ioas(ioas).unwrap();
        assert_eq!(a.items(), 0, "replace released the pins of the old IOAS");
        a.close().unwrap();
        c.destroy(ioas).unwrap();
        f.env.check_refs(f.buf, BUFFER_SIZE, 1);
    }

    pub fn replace(f: &F) {
        let c = &f.env.ictx;
        let ioas = f.env.ioas();
        let stdev = f.stdev_ids[0];
        let dev = c.selftest_device(stdev).unwrap();
        assert_eq!(c.selftest_device(ObjectId(999)), Err(Errno::ENOENT));
        assert_eq!(c.selftest_device(f.ioas_id), Err(Errno::EINVAL));
        // Replace to a new IOAS: a new auto domain there.
        let h = c.replace(dev, NO_PASID, ioas).unwrap();
        assert!(c.hwpt_is_auto(h));
        assert_ne!(h, f.hwpt_ids[0]);
        // Replacing back creates a new auto domain in the first IOAS if the old one died.
        let h2 = c.replace(dev, NO_PASID, f.ioas_id).unwrap();
        if f.v.mock_domains == 1 {
            // The old auto domain died with its last attachment; its ID is reused.
            assert_eq!(h2, f.hwpt_ids[0]);
            assert!(c.hwpt_is_auto(h2));
        } else {
            assert_eq!(h2, f.hwpt_ids[1], "shares the other device's auto domain");
        }
        assert_eq!(
            c.object_type(h),
            None,
            "auto domain destroyed with its last user"
        );
        assert_eq!(c.replace(dev, NO_PASID, ObjectId(999)), Err(Errno::ENOENT));
        assert_eq!(c.replace(dev, NO_PASID, stdev), Err(Errno::EINVAL));
        c.destroy(ioas).unwrap();
    }

    pub fn alloc_hwpt(f: &F) {
        let c = &f.env.ictx;
        for &stdev in &f.stdev_ids {
            let dev = c.selftest_device(stdev).unwrap();
            let h = c
                .hwpt_alloc(0, dev, f.ioas_id, &mut none_data(), ObjectId(0))
                .unwrap();
            assert_eq!(
                c.hwpt_alloc(1 << 6, dev, f.ioas_id, &mut none_data(), ObjectId(0)),
                Err(Errno::EOPNOTSUPP)
            );
            // Driver data on a paging HWPT: the mock refuses any.
            let mut b = [0u8; 4];
            assert_eq!(
                c.hwpt_alloc(0, dev, f.ioas_id, &mut sdata(&mut b), ObjectId(0)),
                Err(Errno::EOPNOTSUPP)
            );
            // FAULT_ID_VALID with NEST_PARENT.
            assert_eq!(
                c.hwpt_alloc(
                    hwpt_flags::FAULT_ID_VALID | hwpt_flags::NEST_PARENT,
                    dev,
                    f.ioas_id,
                    &mut none_data(),
                    ObjectId(0)
                ),
                Err(Errno::EOPNOTSUPP)
            );
            // FAULT_ID_VALID with a bad fault id: ENOENT, nothing left behind.
            let before = c.object_count();
            assert_eq!(
                c.hwpt_alloc(
                    hwpt_flags::FAULT_ID_VALID,
                    dev,
                    f.ioas_id,
                    &mut none_data(),
                    h
                ),
                Err(Errno::ENOENT)
            );
            assert_eq!(c.object_count(), before);
            // Do a hw_pagetable rotation test.
            c.replace(dev, NO_PASID, h).unwrap();
            assert_eq!(c.destroy(h), Err(Errno::EBUSY));
            c.replace(dev, NO_PASID, f.ioas_id).unwrap();
            c.destroy(h).unwrap();
        }
        assert_eq!(
            c.hwpt_alloc(0, ObjectId(999), f.ioas_id, &mut none_data(), ObjectId(0)),
            Err(Errno::ENOENT)
        );
    }
}
variant_tests!(
    iommufd_mock_domain,
    one_domain,
    [
        basic,
        ro_unshare,
        all_aligns,
        all_aligns_copy,
        user_copy,
        replace,
        alloc_hwpt
    ]
);
variant_tests!(
    iommufd_mock_domain,
    two_domains,
    [
        basic,
        ro_unshare,
        all_aligns,
        all_aligns_copy,
        user_copy,
        replace,
        alloc_hwpt
    ]
);
variant_tests!(
    iommufd_mock_domain,
    one_domain_hugepage,
    [
        basic,
        ro_unshare,
        all_aligns,
        all_aligns_copy,
        user_copy,
        replace,
        alloc_hwpt
    ]
);
variant_tests!(
    iommufd_mock_domain,
    two_domains_hugepage,
    [
        basic,
        ro_unshare,
        all_aligns,
        all_aligns_copy,
        user_copy,
        replace,
        alloc_hwpt
    ]
);
variant_tests!(
    iommufd_mock_domain,
    one_domain_file,
    [basic, all_aligns, all_aligns_copy, replace, alloc_hwpt]
);
variant_tests!(
    iommufd_mock_domain,
    one_domain_file_hugepage,
    [basic, all_aligns, replace, alloc_hwpt]
);

// ---------------------------------------------------------------------------------------
// FIXTURE(iommufd_dirty_tracking): a buffer of the variant's size, a mock domain (1 MiB
// mock pages in the huge variants).
mod iommufd_dirty_tracking {
    use super::*;

    pub struct Variant {
        buffer_size: u64,
        hugepages: bool,
    }
    impl Variant {
        pub fn domain_dirty8k() -> Variant {
            Variant {
                buffer_size: 8 << 10,
                hugepages: false,
            }
        }
        pub fn domain_dirty16k() -> Variant {
            Variant {
                buffer_size: 16 << 10,
                hugepages: false,
            }
        }
        pub fn domain_dirty64k() -> Variant {
            Variant {
                buffer_size: 64 << 10,
                hugepages: false,
            }
        }
        pub fn domain_dirty128k() -> Variant {
            Variant {
                buffer_size: 128 << 10,
                hugepages: false,
            }
        }
        pub fn domain_dirty320k() -> Variant {
            Variant {
                buffer_size: 320 << 10,
                hugepages: false,
            }
        }
        pub fn domain_dirty64m() -> Variant {
            Variant {
                buffer_size: 64 << 20,
                hugepages: false,
            }
        }
        pub fn domain_dirty128m() -> Variant {
            Variant {
                buffer_size: 128 << 20,
                hugepages: false,
            }
        }
        pub fn domain_dirty64m_huge() -> Variant {
            Variant {
                buffer_size: 64 << 20,
                hugepages: true,
            }
        }
        pub fn domain_dirty128m_huge() -> Variant {
            Variant {
                buffer_size: 128 << 20,
                hugepages: true,
            }
        }
    }

    pub struct F {
        pub env: Env,
        pub v: Variant,
        pub ioas_id: ObjectId,
        #[allow(dead_code)]
        pub stdev_id: ObjectId,
        pub idev_id: ObjectId,
    }
    impl F {
        pub fn teardown(self) {
            self.env.teardown();
        }
    }

    pub fn setup(v: Variant) -> F {
        let env = Env::new();
        let ioas_id = env.ioas();
        let flags = if v.hugepages {
            MOCK_FLAGS_DEVICE_HUGE_IOVA
        } else {
            0
        };
        let (d, _) = env.mock_domain(ioas_id, flags).unwrap();
        F {
            env,
            v,
            ioas_id,
            stdev_id: d.stdev_id,
            idev_id: d.dev_id,
        }
    }

    pub fn enforce_dirty(f: &F) {
        let c = &f.env.ictx;
        let h = c
            .hwpt_alloc(
                hwpt_flags::DIRTY_TRACKING,
                f.idev_id,
                f.ioas_id,
                &mut none_data(),
                ObjectId(0),
            )
            .unwrap();
        let (d, _) = f.env.mock_domain(h, 0).unwrap();
        assert_eq!(
            f.env.mock_domain(h, MOCK_FLAGS_DEVICE_NO_DIRTY).map(|_| ()),
            Err(Errno::EINVAL)
        );
        c.destroy(d.stdev_id).unwrap();
        c.destroy(h).unwrap();
        // A device without dirty tracking cannot allocate a dirty HWPT.
        let ioas = f.env.ioas();
        let (d, _) = f.env.mock_domain(ioas, MOCK_FLAGS_DEVICE_NO_DIRTY).unwrap();
        assert_eq!(
            c.hwpt_alloc(
                hwpt_flags::DIRTY_TRACKING,
                d.dev_id,
                ioas,
                &mut none_data(),
                ObjectId(0)
            ),
            Err(Errno::EOPNOTSUPP)
        );
        c.destroy(d.stdev_id).unwrap();
    }

    pub fn set_dirty_tracking(f: &F) {
        let c = &f.env.ictx;
        let h = c
            .hwpt_alloc(
                hwpt_flags::DIRTY_TRACKING,
                f.idev_id,
                f.ioas_id,
                &mut none_data(),
                ObjectId(0),
            )
            .unwrap();
        let (d, _) = f.env.mock_domain(h, 0).unwrap();
        c.hwpt_set_dirty_tracking(dirty_flags::ENABLE, h).unwrap();
        c.hwpt_set_dirty_tracking(dirty_flags::ENABLE, h).unwrap();
        c.hwpt_set_dirty_tracking(0, h).unwrap();
        assert_eq!(c.hwpt_set_dirty_tracking(2, h), Err(Errno::EOPNOTSUPP));
        assert_eq!(c.hwpt_set_dirty_tracking(0, f.ioas_id), Err(Errno::ENOENT));
        // A HWPT without dirty support.
        let plain = c
            .hwpt_alloc(0, f.idev_id, f.ioas_id, &mut none_data(), ObjectId(0))
            .unwrap();
        assert_eq!(
            c.hwpt_set_dirty_tracking(dirty_flags::ENABLE, plain),
            Err(Errno::EOPNOTSUPP)
        );
        c.destroy(plain).unwrap();
        c.destroy(d.stdev_id).unwrap();
        c.destroy(h).unwrap();
    }

    pub fn device_dirty_capability(f: &F) {
        let c = &f.env.ictx;
        let ioas = f.env.ioas();
        let (d, _) = f.env.mock_domain(ioas, 0).unwrap();
        let r = c.get_hw_info(0, d.dev_id, 0, 0, None).unwrap();
        assert_eq!(
            r.out_capabilities & hw_info::CAP_DIRTY_TRACKING,
            hw_info::CAP_DIRTY_TRACKING
        );
        c.destroy(d.stdev_id).unwrap();
        let (d, _) = f.env.mock_domain(ioas, MOCK_FLAGS_DEVICE_NO_DIRTY).unwrap();
        let r = c.get_hw_info(0, d.dev_id, 0, 0, None).unwrap();
        assert_eq!(r.out_capabilities & hw_info::CAP_DIRTY_TRACKING, 0);
        c.destroy(d.stdev_id).unwrap();
    }

    /// test_mock_dirty_bitmaps: mark every even mock page dirty, read the bitmap back
    /// (at `bitmap_off` within a larger buffer), with and without NO_CLEAR.
    fn mock_dirty_bitmaps(f: &F, h: ObjectId, page_size: u64, bitmap_off: usize, flags: u32) {
        let c = &f.env.ictx;
        let size = f.v.buffer_size;
        let iova = MOCK_APERTURE_START;
        let nmock = size / MOCK_IO_PAGE_SIZE;
        let mut marks = vec![0u8; nmock.div_ceil(8) as usize];
        for i in (0..nmock).step_by(2) {
            marks[(i / 8) as usize] |= 1 << (i % 8);
        }
        let n = mock::dirty(c, h, iova, size, MOCK_IO_PAGE_SIZE, &marks).unwrap();
        assert_eq!(n, nmock / 2);
        let nbits = size / page_size;
        let mut buf = vec![0u8; bitmap_off + nbits.div_ceil(8) as usize];
        c.hwpt_get_dirty_bitmap(h, flags, iova, size, page_size, &mut buf[bitmap_off..])
            .unwrap();
        let bitmap = &buf[bitmap_off..];
        for i in 0..nbits {
            let set = bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0;
            // A unit is dirty if one of its mock pages is; a dirty 1 MiB mock page makes
            // every unit inside it dirty.
            let first_mock = i * page_size / MOCK_IO_PAGE_SIZE;
            let expect =
                f.v.hugepages || page_size > MOCK_IO_PAGE_SIZE || first_mock.is_multiple_of(2);
            assert_eq!(set, expect, "bit {i} page_size {page_size}");
        }
        // Read again: cleared unless NO_CLEAR.
        let mut again = vec![0u8; nbits.div_ceil(8) as usize];
        c.hwpt_get_dirty_bitmap(h, 0, iova, size, page_size, &mut again)
            .unwrap();
        let any = again.iter().any(|&b| b != 0);
        assert_eq!(any, flags & dirty_flags::NO_CLEAR != 0);
        let mut third = vec![0u8; nbits.div_ceil(8) as usize];
        c.hwpt_get_dirty_bitmap(h, 0, iova, size, page_size, &mut third)
            .unwrap();
        assert!(third.iter().all(|&b| b == 0));
    }

    fn dirty_setup(f: &F) -> (ObjectId, ObjectId) {
        let c = &f.env.ictx;
        let h = c
            .hwpt_alloc(
                hwpt_flags::DIRTY_TRACKING,
                f.idev_id,
                f.ioas_id,
                &mut none_data(),
                ObjectId(0),
            )
            .unwrap();
        let flags = if f.v.hugepages {
            MOCK_FLAGS_DEVICE_HUGE_IOVA
        } else {
            0
        };
        let (d, _) = f.env.mock_domain(h, flags).unwrap();
        f.env
            .map_fixed(f.ioas_id, BUFFER, f.v.buffer_size, MOCK_APERTURE_START)
            .unwrap();
        c.hwpt_set_dirty_tracking(dirty_flags::ENABLE, h).unwrap();
        (h, d.stdev_id)
    }

    pub fn get_dirty_bitmap(f: &F) {
        let c = &f.env.ictx;
        let (h, stdev) = dirty_setup(f);
        for page_size in [MOCK_IO_PAGE_SIZE, PAGE_SIZE] {
            mock_dirty_bitmaps(f, h, page_size, 0, 0);
            // PAGE_SIZE unaligned and u64 unaligned bitmaps.
            mock_dirty_bitmaps(f, h, page_size, MOCK_IO_PAGE_SIZE as usize, 0);
            mock_dirty_bitmaps(f, h, page_size, 0xff1, 0);
        }
        // Errors, in order.
        let mut bm = vec![0u8; 64];
        let iova = MOCK_APERTURE_START;
        assert_eq!(
            c.hwpt_get_dirty_bitmap(h, 2, iova, PAGE_SIZE, PAGE_SIZE, &mut bm),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.hwpt_get_dirty_bitmap(f.ioas_id, 0, iova, PAGE_SIZE, PAGE_SIZE, &mut bm),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.hwpt_get_dirty_bitmap(h, 0, u64::MAX, 4, PAGE_SIZE, &mut bm),
            Err(Errno::EOVERFLOW)
        );
        assert_eq!(
            c.hwpt_get_dirty_bitmap(h, 0, iova + 1, PAGE_SIZE, PAGE_SIZE, &mut bm),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.hwpt_get_dirty_bitmap(h, 0, iova, PAGE_SIZE, 0, &mut bm),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.hwpt_get_dirty_bitmap(h, 0, iova, MOCK_IO_PAGE_SIZE, PAGE_SIZE, &mut bm),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.hwpt_get_dirty_bitmap(h, 0, iova, 1024 * PAGE_SIZE, PAGE_SIZE, &mut bm[..1]),
            Err(Errno::EFAULT)
        );
        // A range not covered by areas: the walk stops, and the ioctl still succeeds.
        c.hwpt_get_dirty_bitmap(h, 0, iova - PAGE_SIZE, 2 * PAGE_SIZE, PAGE_SIZE, &mut bm)
            .unwrap();
        // A HWPT without dirty support.
        let plain = c
            .hwpt_alloc(0, f.idev_id, f.ioas_id, &mut none_data(), ObjectId(0))
            .unwrap();
        assert_eq!(
            c.hwpt_get_dirty_bitmap(plain, 0, iova, PAGE_SIZE, PAGE_SIZE, &mut bm),
            Err(Errno::EOPNOTSUPP)
        );
        c.destroy(plain).unwrap();
        // Tracking off: DIRTY marks nothing (EINVAL).
        c.hwpt_set_dirty_tracking(0, h).unwrap();
        assert_eq!(
            mock::dirty(c, h, iova, PAGE_SIZE, PAGE_SIZE, &[1]),
            Err(Errno::EINVAL)
        );
        c.destroy(stdev).unwrap();
        c.ioas_unmap(f.ioas_id, 0, u64::MAX).unwrap();
        c.destroy(h).unwrap();
    }

    pub fn get_dirty_bitmap_no_clear(f: &F) {
        let c = &f.env.ictx;
        let (h, stdev) = dirty_setup(f);
        for page_size in [MOCK_IO_PAGE_SIZE, PAGE_SIZE] {
            mock_dirty_bitmaps(f, h, page_size, 0, dirty_flags::NO_CLEAR);
            mock_dirty_bitmaps(f, h, page_size, 0xff1, dirty_flags::NO_CLEAR);
        }
        c.destroy(stdev).unwrap();
        c.ioas_unmap(f.ioas_id, 0, u64::MAX).unwrap();
        c.destroy(h).unwrap();
    }
}
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty8k,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty16k,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty64k,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty128k,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty320k,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty64m,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty128m,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty64m_huge,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);
variant_tests!(
    iommufd_dirty_tracking,
    domain_dirty128m_huge,
    [
        enforce_dirty,
        set_dirty_tracking,
        device_dirty_capability,
        get_dirty_bitmap,
        get_dirty_bitmap_no_clear
    ]
);

/// test_cmd_trigger_iopf: trigger one page request and check the fault fd delivers it, then
/// answer it.
fn trigger_and_answer_iopf(c: &Iommufd, dev_id: ObjectId, pasid: u32, fault_fd: &FaultFd) {
    let grpid = 0x2;
    mock::trigger_iopf(
        c,
        dev_id,
        pasid,
        grpid,
        fault::PERM_READ | fault::PERM_WRITE,
        0x0dea_dbee_f000,
    )
    .unwrap();
    assert!(fault_fd.readable());
    let mut rec = [0u8; fault::RECORD_SIZE];
    // Reads must be whole records.
    assert_eq!(fault_fd.read(&mut rec[..39]), Err(Errno::ESPIPE));
    assert_eq!(fault_fd.read_at(1, &mut rec), Err(Errno::ESPIPE));
    assert_eq!(fault_fd.read(&mut rec), Ok(fault::RECORD_SIZE));
    let mut flags = fault::FLAG_LAST_PAGE;
    if pasid != 0 {
        flags |= fault::FLAG_PASID_VALID;
    }
    assert_eq!(le32(&rec, 0), flags);
    assert_eq!(le32(&rec, 4), dev_id.raw());
    assert_eq!(le32(&rec, 8), pasid);
    assert_eq!(le32(&rec, 12), grpid);
    assert_eq!(le32(&rec, 16), fault::PERM_READ | fault::PERM_WRITE);
    assert_eq!(le64(&rec, 24), 0x0dea_dbee_f000);
    assert_eq!(le32(&rec, 32), 0);
    let cookie = le32(&rec, 36);
    assert_eq!(fault_fd.pending(), (0, 1));
    // Responses: size multiple of 8, a known cookie, a valid code.
    let mut resp = cookie.to_le_bytes().to_vec();
    resp.extend_from_slice(&7u32.to_le_bytes());
    assert_eq!(fault_fd.write(&resp[..4]), Err(Errno::ESPIPE));
    assert_eq!(fault_fd.write(&resp), Err(Errno::EINVAL));
    let mut bad = (cookie + 100).to_le_bytes().to_vec();
    bad.extend_from_slice(&fault::RESP_SUCCESS.to_le_bytes());
    assert_eq!(fault_fd.write(&bad), Err(Errno::EINVAL));
    resp[4..].copy_from_slice(&fault::RESP_SUCCESS.to_le_bytes());
    assert_eq!(fault_fd.write(&resp), Ok(8));
    assert_eq!(fault_fd.pending(), (0, 0));
    let d = c.device_handle(dev_id).unwrap();
    let m = d.as_any().downcast_ref::<MockDevice>().unwrap();
    let last = *m.page_responses().last().unwrap();
    assert_eq!(last.code, fault::RESP_SUCCESS);
    assert_eq!(last.grpid, grpid);
    assert_eq!(last.pasid, (pasid != 0).then_some(pasid));
}

// ---------------------------------------------------------------------------------------
// FIXTURE(iommufd_viommu): mock domain, NEST_PARENT HWPT, vIOMMU, nested HWPT on it.
mod iommufd_viommu {
    use super::*;

    pub struct Variant {
        viommu: bool,
    }
    impl Variant {
        pub fn no_viommu() -> Variant {
            Variant { viommu: false }
        }
        pub fn mock_viommu() -> Variant {
            Variant { viommu: true }
        }
    }

    pub struct F {
        pub env: Env,
        pub ioas_id: ObjectId,
        pub stdev_id: ObjectId,
        pub device_id: ObjectId,
        pub hwpt_id: ObjectId,
        pub viommu_id: ObjectId,
        pub nested_hwpt_id: ObjectId,
    }
    impl F {
        pub fn teardown(self) {
            self.env.teardown();
        }
    }

    pub fn setup(v: Variant) -> F {
        let env = Env::new();
        let ioas_id = env.ioas();
        let z = ObjectId(0);
        let mut f = F {
            ioas_id,
            stdev_id: z,
            device_id: z,
            hwpt_id: z,
            viommu_id: z,
            nested_hwpt_id: z,
            env,
        };
        if v.viommu {
            let c = &f.env.ictx;
            let (d, _) = f.env.mock_domain(ioas_id, 0).unwrap();
            f.stdev_id = d.stdev_id;
            f.device_id = d.dev_id;
            (f.hwpt_id, f.viommu_id) = f.env.selftest_viommu(d.dev_id, ioas_id);
            let mut b = selftest_data(IOMMU_TEST_IOTLB_DEFAULT);
            f.nested_hwpt_id = c
                .hwpt_alloc(0, d.dev_id, f.viommu_id, &mut sdata(&mut b), z)
                .unwrap();
        }
        f
    }

    pub fn viommu_auto_destroy(_f: &F) {}

    pub fn viommu_negative_tests(f: &F) {
        let c = &f.env.ictx;
        let st = IOMMU_VIOMMU_TYPE_SELFTEST;
        if f.device_id.raw() != 0 {
            // Invalid hwpt (0).
            assert_eq!(
                c.viommu_alloc(0, st, f.device_id, ObjectId(0), &mut none_data()),
                Err(Errno::ENOENT)
            );
            // Not a nesting parent.
            let h = c
                .hwpt_alloc(0, f.device_id, f.ioas_id, &mut none_data(), ObjectId(0))
                .unwrap();
            assert_eq!(
                c.viommu_alloc(0, st, f.device_id, h, &mut none_data()),
                Err(Errno::EINVAL)
            );
            c.destroy(h).unwrap();
            // Unsupported type, DEFAULT type, flags.
            assert_eq!(
                c.viommu_alloc(0, 0xdead, f.device_id, f.hwpt_id, &mut none_data()),
                Err(Errno::EOPNOTSUPP)
            );
            assert_eq!(
                c.viommu_alloc(0, 0, f.device_id, f.hwpt_id, &mut none_data()),
                Err(Errno::EOPNOTSUPP)
            );
            assert_eq!(
                c.viommu_alloc(1, st, f.device_id, f.hwpt_id, &mut none_data()),
                Err(Errno::EOPNOTSUPP)
            );
            // An IOAS as hwpt_id: ENOENT (typed lookup of a HWPT_PAGING).
            assert_eq!(
                c.viommu_alloc(0, st, f.device_id, f.ioas_id, &mut none_data()),
                Err(Errno::ENOENT)
            );
            // Bad data: too short → EINVAL; NULL → EFAULT; wrong... (type is the vIOMMU type).
            let mut b = [0u8; 4];
            let mut short = UserData::new(st, &mut b);
            assert_eq!(
                c.viommu_alloc(0, st, f.device_id, f.hwpt_id, &mut short),
                Err(Errno::EINVAL)
            );
            // Longer than the kernel's struct (24 bytes): EINVAL, even with a zero tail.
            let mut long = [0u8; 32];
            let mut long = UserData::new(st, &mut long);
            assert_eq!(
                c.viommu_alloc(0, st, f.device_id, f.hwpt_id, &mut long),
                Err(Errno::EINVAL)
            );
            let mut null = UserData {
                data_type: st,
                len: 24,
                buf: None,
            };
            assert_eq!(
                c.viommu_alloc(0, st, f.device_id, f.hwpt_id, &mut null),
                Err(Errno::EFAULT)
            );
            assert_eq!(c.destroy(f.hwpt_id), Err(Errno::EBUSY));
            assert_eq!(c.destroy(f.viommu_id), Err(Errno::EBUSY));
            // A vIOMMU is not invalidatable without the op... the mock has it: entry_num 0.
            let mut a = InvalidateArray::new(IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST, 12, 0, &[]);
            c.hwpt_invalidate(f.viommu_id, &mut a).unwrap();
            // The vIOMMU pt of another IOMMU instance: EINVAL.
            let other = MockIommu::new();
            let dev2 = other.new_device(0).unwrap();
            let d2 = c.bind_device(dev2, None).unwrap();
            let mut b = selftest_data(0);
            assert_eq!(
                c.hwpt_alloc(0, d2, f.viommu_id, &mut sdata(&mut b), ObjectId(0)),
                Err(Errno::EINVAL)
            );
            assert_eq!(c.vdevice_alloc(f.viommu_id, d2, 5), Err(Errno::EINVAL));
            c.unbind_device(d2).unwrap();
            // Nested from a vIOMMU: flags and data.
            assert_eq!(
                c.hwpt_alloc(
                    hwpt_flags::NEST_PARENT,
                    f.device_id,
                    f.viommu_id,
                    &mut sdata(&mut b),
                    ObjectId(0)
                ),
                Err(Errno::EOPNOTSUPP)
            );
            assert_eq!(
                c.hwpt_alloc(0, f.device_id, f.viommu_id, &mut none_data(), ObjectId(0)),
                Err(Errno::EOPNOTSUPP)
            );
        } else {
            assert_eq!(
                c.viommu_alloc(0, st, f.device_id, f.hwpt_id, &mut none_data()),
                Err(Errno::ENOENT)
            );
        }
    }

    pub fn viommu_alloc_nested_iopf(f: &F) {
        if f.device_id.raw() == 0 {
            return;
        }
        let c = &f.env.ictx;
        let fault = c.fault_alloc(0).unwrap();
        assert_eq!(c.fault_alloc(1).map(|_| ()), Err(Errno::EOPNOTSUPP));
        let mut b = selftest_data(IOMMU_TEST_IOTLB_DEFAULT);
        assert_eq!(
            c.hwpt_alloc(
                hwpt_flags::FAULT_ID_VALID,
                f.device_id,
                f.viommu_id,
                &mut sdata(&mut b),
                ObjectId(u32::MAX)
            ),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.hwpt_alloc(
                hwpt_flags::FAULT_ID_VALID | 1 << 31,
                f.device_id,
                f.viommu_id,
                &mut sdata(&mut b),
                fault.id()
            ),
            Err(Errno::EOPNOTSUPP)
        );
        let iopf = c
            .hwpt_alloc(
                hwpt_flags::FAULT_ID_VALID,
                f.device_id,
                f.viommu_id,
                &mut sdata(&mut b),
                fault.id(),
            )
            .unwrap();
        // Must allocate a vDEVICE before attaching to a vIOMMU-based nested HWPT.
        assert_eq!(c.replace(f.device_id, NO_PASID, iopf), Err(Errno::ENOENT));
        let vdev = c.vdevice_alloc(f.viommu_id, f.device_id, 0x99).unwrap();
        c.replace(f.device_id, NO_PASID, iopf).unwrap();
        assert_eq!(c.destroy(iopf), Err(Errno::EBUSY));
        trigger_and_answer_iopf(c, f.device_id, 0, &fault);
        // A request left unanswered is answered INVALID when the attachment goes away.
        mock::trigger_iopf(c, f.device_id, 0, 9, fault::PERM_READ, 0x1000).unwrap();
        let mut rec = [0u8; 80];
        assert_eq!(fault.read(&mut rec), Ok(40));
        mock::trigger_iopf(c, f.device_id, 0, 10, fault::PERM_READ, 0x2000).unwrap();
        assert_eq!(fault.pending(), (1, 1));
        c.replace(f.device_id, NO_PASID, f.ioas_id).unwrap();
        assert_eq!(fault.pending(), (0, 0));
        let dev = c.device_handle(f.device_id).unwrap();
        let m = dev.as_any().downcast_ref::<MockDevice>().unwrap();
        let codes: Vec<(u32, u32)> = m
            .page_responses()
            .iter()
            .map(|r| (r.grpid, r.code))
            .collect();
        assert_eq!(
            &codes[1..],
            &[(10, fault::RESP_INVALID), (9, fault::RESP_INVALID)]
        );
        // With no HWPT with a FAULT attached, a request is answered INVALID at once.
        mock::trigger_iopf(c, f.device_id, 0, 11, fault::PERM_READ, 0x3000).unwrap();
        assert_eq!(
            m.page_responses().last().map(|r| (r.grpid, r.code)),
            Some((11, fault::RESP_INVALID))
        );
        c.destroy(iopf).unwrap();
        // The fd holds the FAULT object.
        let fid = fault.id();
        assert_eq!(c.destroy(fid), Err(Errno::EBUSY));
        drop(fault);
        c.destroy(fid).unwrap();
        c.destroy(vdev).unwrap();
    }

    pub fn viommu_alloc_with_data(f: &F) {
        if f.device_id.raw() == 0 {
            return;
        }
        let c = &f.env.ictx;
        let mut data = [0u8; 24];
        data[..4].copy_from_slice(&0xbeefu32.to_le_bytes());
        let v = c
            .viommu_alloc(
                0,
                IOMMU_VIOMMU_TYPE_SELFTEST,
                f.device_id,
                f.hwpt_id,
                &mut UserData::new(IOMMU_VIOMMU_TYPE_SELFTEST, &mut data),
            )
            .unwrap();
        assert_eq!(le32(&data, 4), 0xbeef, "out_data loops back in_data");
        let (offset, length) = (le64(&data, 8), le64(&data, 16));
        assert_eq!(length, 2 * PAGE_SIZE);
        assert_eq!(
            offset, PAGE_SIZE,
            "first window after the skipped first page"
        );
        // Offset and length cannot be changed.
        for (len, off) in [
            (length, offset + PAGE_SIZE),
            (length, offset + 2 * PAGE_SIZE),
            (length / 2, offset),
            (length * 2, offset),
        ] {
            assert_eq!(c.mmap(off, len, true, false).map(|_| ()), Err(Errno::ENXIO));
        }
        assert_eq!(
            c.mmap(offset, length + 1, true, false).map(|_| ()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.mmap(offset, length, false, false).map(|_| ()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.mmap(offset, length, true, true).map(|_| ()),
            Err(Errno::EPERM)
        );
        let region = c.mmap(offset, length, true, false).unwrap();
        let mut word = [0u8; 4];
        f.env
            .iommu
            .memory()
            .read_phys(region.base_pa(), &mut word)
            .unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xbeef);
        // The owner of the mmap region is held.
        assert_eq!(c.destroy(v), Err(Errno::EBUSY));
        drop(region);
        c.destroy(v).unwrap();
        // The window went with its vIOMMU.
        assert_eq!(
            c.mmap(offset, length, true, false).map(|_| ()),
            Err(Errno::ENXIO)
        );
    }

    fn read_vevents(q: &VeventqFd, n: usize, virt_id: u32, seq: &mut Option<u32>) {
        for _ in 0..n {
            let mut rec = [0u8; 12];
            // A buffer too small for the record reads nothing.
            assert_eq!(q.read(&mut rec[..11]), Ok(0));
            assert_eq!(q.read(&mut rec), Ok(12));
            assert_eq!(le32(&rec, 0), 0, "flags");
            let s = le32(&rec, 4);
            if let Some(prev) = *seq {
                assert_eq!(s, (prev + 1) & i32::MAX as u32);
            }
            *seq = Some(s);
            assert_eq!(le32(&rec, 8), virt_id);
        }
    }

    pub fn vdevice_alloc(f: &F) {
        let c = &f.env.ictx;
        if f.device_id.raw() == 0 {
            assert_eq!(
                c.vdevice_alloc(f.viommu_id, f.device_id, 0x99),
                Err(Errno::ENOENT)
            );
            return;
        }
        let st = IOMMU_VEVENTQ_TYPE_SELFTEST;
        // Must allocate a vDEVICE before attaching to a nested HWPT.
        assert_eq!(
            c.replace(f.device_id, NO_PASID, f.nested_hwpt_id),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.veventq_alloc(0, f.viommu_id, st, 0).map(|_| ()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            c.veventq_alloc(1, f.viommu_id, st, 2).map(|_| ()),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.veventq_alloc(0, f.viommu_id, 0, 2).map(|_| ()),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.veventq_alloc(0, f.ioas_id, st, 2).map(|_| ()),
            Err(Errno::ENOENT)
        );
        let q = c.veventq_alloc(0, f.viommu_id, st, 2).unwrap();
        assert_eq!(
            c.veventq_alloc(0, f.viommu_id, st, 2).map(|_| ()),
            Err(Errno::EEXIST)
        );
        // Any other type is accepted by the core.
        let q2 = c.veventq_alloc(0, f.viommu_id, 0x1234, 1).unwrap();
        let mut seq = None;
        let vdev = c.vdevice_alloc(f.viommu_id, f.device_id, 0x99).unwrap();
        assert_eq!(
            mock::trigger_vevent(c, f.device_id),
            Err(Errno::ENOENT),
            "not attached yet"
        );
        c.replace(f.device_id, NO_PASID, f.nested_hwpt_id).unwrap();
        mock::trigger_vevent(c, f.device_id).unwrap();
        assert!(q.readable());
        read_vevents(&q, 1, 0x99, &mut seq);
        assert!(!q.readable());
        assert_eq!(
            c.vdevice_alloc(f.viommu_id, f.device_id, 0x99),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            c.vdevice_alloc(f.viommu_id, f.device_id, 0x98),
            Err(Errno::EEXIST),
            "one vDEVICE per device"
        );
        c.replace(f.device_id, NO_PASID, f.ioas_id).unwrap();
        c.destroy(vdev).unwrap();
        // Try again with 0x88.
        let vdev = c.vdevice_alloc(f.viommu_id, f.device_id, 0x88).unwrap();
        c.replace(f.device_id, NO_PASID, f.nested_hwpt_id).unwrap();
        // Overflow with three events on a depth of 2: two events and a LOST_EVENTS header.
        for _ in 0..3 {
            mock::trigger_vevent(c, f.device_id).unwrap();
        }
        read_vevents(&q, 2, 0x88, &mut seq);
        let mut hdr = [0u8; 16];
        assert_eq!(q.read(&mut hdr), Ok(8));
        assert_eq!(le32(&hdr, 0), veventq_type::FLAG_LOST_EVENTS);
        let lost_seq = le32(&hdr, 4);
        assert_eq!(Some(lost_seq), seq.map(|s| s + 1));
        seq = Some(lost_seq);
        // The overflow is gone after the reads.
        mock::trigger_vevent(c, f.device_id).unwrap();
        read_vevents(&q, 1, 0x88, &mut seq);
        // A vDEVICE of another virt id on a second device works; its own virt id is unique.
        let (d2, dev2) = f.env.mock_domain(f.ioas_id, 0).unwrap();
        assert_eq!(
            c.vdevice_alloc(f.viommu_id, d2.dev_id, 0x88),
            Err(Errno::EEXIST)
        );
        let v2 = c.vdevice_alloc(f.viommu_id, d2.dev_id, 0x77).unwrap();
        assert_eq!(dev2.viommu_binding(), None);
        c.destroy(v2).unwrap();
        c.destroy(d2.stdev_id).unwrap();
        let qid = q.id();
        assert_eq!(
            c.destroy(qid),
            Err(Errno::EBUSY),
            "the fd holds the vEVENTQ"
        );
        assert_eq!(c.destroy(f.viommu_id), Err(Errno::EBUSY));
        drop(q);
        drop(q2);
        c.replace(f.device_id, NO_PASID, f.ioas_id).unwrap();
        // No SELFTEST queue any more: TRIGGER_VEVENT is EOPNOTSUPP.
        c.destroy(qid).unwrap();
        c.replace(f.device_id, NO_PASID, f.nested_hwpt_id).unwrap();
        assert_eq!(mock::trigger_vevent(c, f.device_id), Err(Errno::EOPNOTSUPP));
        c.replace(f.device_id, NO_PASID, f.ioas_id).unwrap();
        c.destroy(vdev).unwrap();
    }

    pub fn vdevice_cache(f: &F) {
        if f.device_id.raw() == 0 {
            return;
        }
        let c = &f.env.ictx;
        let v = f.viommu_id;
        let dev = f.device_id;
        let ty = IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST;
        let vdev = c.vdevice_alloc(v, dev, 0x99).unwrap();
        let check = |vals: [u32; 4]| {
            for (i, &val) in vals.iter().enumerate() {
                mock::dev_check_cache(c, dev, i as u32, val).unwrap();
            }
        };
        let d = IOMMU_TEST_DEV_CACHE_DEFAULT;
        check([d; 4]);
        let run = |entries: &[Vec<u8>], data_type: u32, entry_len: u32| {
            let bytes = entries.concat();
            let mut a = InvalidateArray::new(data_type, entry_len, entries.len() as u32, &bytes);
            let r = c.hwpt_invalidate(v, &mut a);
            (r, a.entry_num)
        };
        // Check data_type with a zero-length array.
        assert_eq!(run(&[], ty, 12), (Ok(()), 0));
        // Invalid data_type.
        assert_eq!(
            run(
                &[vinv_entry(0, 0x99, 0)],
                IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID,
                12
            ),
            (Err(Errno::EINVAL), 0)
        );
        // Entry longer than the struct with a non-zero tail: E2BIG; a zero tail is fine.
        let mut long = vinv_entry(0, 0x99, 0);
        long.push(1);
        assert_eq!(run(&[long], ty, 13), (Err(Errno::E2BIG), 0));
        // Invalid flag.
        assert_eq!(
            run(&[vinv_entry(0xffff_ffff, 0x99, 0)], ty, 12),
            (Err(Errno::EOPNOTSUPP), 0)
        );
        // NULL data or zero entry_len with entries.
        let mut a = InvalidateArray {
            data_type: ty,
            entry_len: 12,
            entry_num: 1,
            data: None,
        };
        assert_eq!(c.hwpt_invalidate(v, &mut a), Err(Errno::EINVAL));
        assert_eq!(
            run(&[vinv_entry(0, 0x99, 0)], ty, 0),
            (Err(Errno::EINVAL), 0)
        );
        // Invalid cache_id, invalid vdev_id.
        assert_eq!(
            run(&[vinv_entry(0, 0x99, MOCK_DEV_CACHE_ID_MAX + 1)], ty, 12),
            (Err(Errno::EINVAL), 0)
        );
        assert_eq!(
            run(&[vinv_entry(0, 0x9, 0)], ty, 12),
            (Err(Errno::EINVAL), 0)
        );
        check([d; 4]);
        // First entry handled, the second has bad flags.
        assert_eq!(
            run(
                &[vinv_entry(0, 0x99, 0), vinv_entry(0xffff_ffff, 0x99, 1)],
                ty,
                12
            ),
            (Err(Errno::EOPNOTSUPP), 1)
        );
        check([0, d, d, d]);
        // The longer entry with a zero tail is accepted (cache 0 is already invalidated).
        let mut zero_tail = vinv_entry(0, 0x99, 0);
        zero_tail.push(0);
        assert_eq!(run(&[zero_tail], ty, 13), (Ok(()), 1));
        check([0, d, d, d]);
        // First entry handled, the second has a bad cache_id.
        assert_eq!(
            run(
                &[
                    vinv_entry(0, 0x99, 0),
                    vinv_entry(0, 0x99, MOCK_DEV_CACHE_ID_MAX + 1)
                ],
                ty,
                12
            ),
            (Err(Errno::EINVAL), 1)
        );
        // The 2nd, then the 3rd and 4th; shorter entries are zero-extended (cache_id 0).
        assert_eq!(run(&[vinv_entry(0, 0x99, 1)], ty, 12), (Ok(()), 1));
        check([0, 0, d, d]);
        assert_eq!(
            run(&[vinv_entry(0, 0x99, 2), vinv_entry(0, 0x99, 3)], ty, 12),
            (Ok(()), 2)
        );
        check([0; 4]);
        c.destroy(vdev).unwrap();
        // ALL on a fresh device.
        let (d2, _) = f.env.mock_domain(f.ioas_id, 0).unwrap();
        let vd2 = c.vdevice_alloc(v, d2.dev_id, 0x55).unwrap();
        assert_eq!(
            run(
                &[vinv_entry(IOMMU_TEST_INVALIDATE_FLAG_ALL, 0x55, 0)],
                ty,
                12
            ),
            (Ok(()), 1)
        );
        for i in 0..4 {
            mock::dev_check_cache(c, d2.dev_id, i, 0).unwrap();
        }
        assert_eq!(
            mock::dev_check_cache(c, d2.dev_id, 4, 0),
            Err(Errno::EINVAL)
        );
        c.destroy(vd2).unwrap();
        c.destroy(d2.stdev_id).unwrap();
    }

    pub fn hw_queue(f: &F) {
        if f.viommu_id.raw() == 0 {
            return;
        }
        let c = &f.env.ictx;
        let v = f.viommu_id;
        let st = IOMMU_HW_QUEUE_TYPE_SELFTEST;
        let iova = MOCK_APERTURE_START;
        assert_eq!(
            c.hw_queue_alloc(0, v, 0, 0, iova, PAGE_SIZE),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            c.hw_queue_alloc(1, v, st, 0, iova, PAGE_SIZE),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(c.hw_queue_alloc(0, v, st, 0, iova, 0), Err(Errno::EINVAL));
        assert_eq!(
            c.hw_queue_alloc(0, v, st, 0, u64::MAX, PAGE_SIZE),
            Err(Errno::EOVERFLOW)
        );
        // The page-aligned covering range does not fit in 64 bits.
        assert_eq!(
            c.hw_queue_alloc(0, v, st, 0, 1, u64::MAX),
            Err(Errno::ERANGE)
        );
        assert_eq!(
            c.hw_queue_alloc(0, f.ioas_id, st, 0, iova, PAGE_SIZE),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            c.hw_queue_alloc(0, v, 0x1234, 0, iova, PAGE_SIZE),
            Err(Errno::EOPNOTSUPP)
        );
        // Missing IOVA.
        let before = c.object_count();
        assert_eq!(
            c.hw_queue_alloc(0, v, st, 0, iova, PAGE_SIZE),
            Err(Errno::ENOENT)
        );
        assert_eq!(c.object_count(), before, "failed alloc left no object");
        let iova = f.env.map_auto(f.ioas_id, BUFFER, PAGE_SIZE).unwrap();
        let iova2 = f
            .env
            .map_auto(f.ioas_id, BUFFER + PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        // Must start from index 0; index MAX is out of range.
        assert_eq!(
            c.hw_queue_alloc(0, v, st, 1, iova, PAGE_SIZE),
            Err(Errno::EIO)
        );
        assert_eq!(
            c.hw_queue_alloc(0, v, st, IOMMU_TEST_HW_QUEUE_MAX, iova, PAGE_SIZE),
            Err(Errno::EINVAL)
        );
        f.env.check_refs(BUFFER, PAGE_SIZE, 1);
        let q0 = c.hw_queue_alloc(0, v, st, 0, iova, PAGE_SIZE).unwrap();
        // Two IDs: the queue, then its internal access.
        assert_eq!(
            c.object_type(ObjectId(q0.raw() + 1)),
            Some(ObjectType::Access)
        );
        assert_eq!(c.destroy(ObjectId(q0.raw() + 1)), Err(Errno::EBUSY));
        let vops = c.viommu_ops(v).unwrap();
        let mv = vops.as_any().downcast_ref::<MockViommu>().unwrap();
        assert_eq!(mv.hw_queue(0).map(|q| q.base_pa), Some(BUFFER));
        // Shared pin: still one per page.
        f.env.check_refs(BUFFER, PAGE_SIZE, 1);
        assert_eq!(
            c.hw_queue_alloc(0, v, st, 0, iova, PAGE_SIZE),
            Err(Errno::EEXIST)
        );
        // The ring's area is locked.
        assert_eq!(f.env.unmap(f.ioas_id, iova, PAGE_SIZE), Err(Errno::EBUSY));
        assert_eq!(f.env.unmap(f.ioas_id, 0, u64::MAX), Err(Errno::EBUSY));
        // The second page is not pinned, so it can be unmapped.
        f.env.unmap(f.ioas_id, iova2, PAGE_SIZE).unwrap();
        // Index 1, unaligned inside the first page.
        let q1 = c
            .hw_queue_alloc(0, v, st, 1, iova + PAGE_SIZE / 2, PAGE_SIZE / 2)
            .unwrap();
        assert_eq!(
            mv.hw_queue(1).map(|q| q.base_pa),
            Some(BUFFER + PAGE_SIZE / 2)
        );
        assert_eq!(
            c.destroy(q0),
            Err(Errno::EBUSY),
            "queue 1 depends on queue 0"
        );
        assert_eq!(c.destroy(v), Err(Errno::EBUSY));
        c.destroy(q1).unwrap();
        c.destroy(q0).unwrap();
        assert_eq!(mv.hw_queue(0), None);
        f.env.unmap(f.ioas_id, iova, PAGE_SIZE).unwrap();
        f.env.check_refs(BUFFER, PAGE_SIZE, 0);
        // A read-only ring: the internal access pins for reading, so it works; a ring over
        // physically discontiguous pages is EFAULT.
        let a = c
            .ioas_map(
                map_flags::READABLE,
                f.ioas_id,
                f.env.src(BUFFER),
                PAGE_SIZE,
                0,
            )
            .unwrap();
        let q = c.hw_queue_alloc(0, v, st, 0, a, PAGE_SIZE).unwrap();
        c.destroy(q).unwrap();
        let base = MOCK_APERTURE_START + 0x100000;
        f.env
            .map_fixed(f.ioas_id, BUFFER + 8 * PAGE_SIZE, PAGE_SIZE, base)
            .unwrap();
        f.env
            .map_fixed(f.ioas_id, BUFFER, PAGE_SIZE, base + PAGE_SIZE)
            .unwrap();
        assert_eq!(
            c.hw_queue_alloc(0, v, st, 0, base, 2 * PAGE_SIZE),
            Err(Errno::EFAULT)
        );
        // A write-only ring is not readable: EPERM.
        let wo = c
            .ioas_map(
                map_flags::WRITEABLE,
                f.ioas_id,
                f.env.src(BUFFER),
                PAGE_SIZE,
                0,
            )
            .unwrap();
        assert_eq!(
            c.hw_queue_alloc(0, v, st, 0, wo, PAGE_SIZE),
            Err(Errno::EPERM)
        );
        f.env.unmap(f.ioas_id, 0, u64::MAX).unwrap();
        f.env.check_refs(BUFFER, 16 * PAGE_SIZE, 0);
    }

    pub fn vdevice_tombstone(f: &F) {
        if f.device_id.raw() == 0 {
            return;
        }
        let c = &f.env.ictx;
        let vdev = c.vdevice_alloc(f.viommu_id, f.device_id, 0x99).unwrap();
        c.destroy(f.stdev_id).unwrap();
        assert_eq!(c.destroy(vdev), Err(Errno::ENOENT));
        assert!(c.is_tombstone(vdev));
        // The ID stays reserved: new objects do not get it.
        let x = f.env.ioas();
        assert_ne!(x, vdev);
        // The vIOMMU's virt id is free again: another device may take it.
        let (other, _dev) = f.env.mock_domain(f.ioas_id, 0).unwrap();
        let vdev2 = c.vdevice_alloc(f.viommu_id, other.dev_id, 0x99).unwrap();
        c.destroy(vdev2).unwrap();
        c.destroy(other.stdev_id).unwrap();
    }

    pub fn viommu_kvm_handle_reaches_driver(f: &F) {
        if f.device_id.raw() == 0 {
            return;
        }
        // RFC v3: the KVM handle given at bind reaches viommu_alloc untouched.
        struct Vm {
            vmid: u16,
        }
        let c = &f.env.ictx;
        let vm = Arc::new(Vm { vmid: 7 });
        let dev = f.env.iommu.new_device(0).unwrap();
        let d = c
            .bind_device(dev, Some(KvmRef::new(Arc::clone(&vm))))
            .unwrap();
        c.attach(d, NO_PASID, f.ioas_id).unwrap();
        let v = c
            .viommu_alloc(
                0,
                IOMMU_VIOMMU_TYPE_SELFTEST,
                d,
                f.hwpt_id,
                &mut none_data(),
            )
            .unwrap();
        let ops = c.viommu_ops(v).unwrap();
        let mv = ops.as_any().downcast_ref::<MockViommu>().unwrap();
        let k = mv.kvm().unwrap();
        assert_eq!(k.downcast::<Vm>().map(|v| v.vmid), Some(7));
        assert!(k.downcast::<u8>().is_none());
        // The vIOMMU keeps the VM alive.
        assert_eq!(Arc::strong_count(&vm), 3);
        // The first vIOMMU was made for a device bound without KVM.
        let first = c.viommu_ops(f.viommu_id).unwrap();
        assert!(
            first
                .as_any()
                .downcast_ref::<MockViommu>()
                .unwrap()
                .kvm()
                .is_none()
        );
        c.destroy(v).unwrap();
        c.detach(d, NO_PASID);
        c.unbind_device(d).unwrap();
        assert!(mv.is_destroyed());
    }
}
variant_tests!(
    iommufd_viommu,
    no_viommu,
    [
        viommu_auto_destroy,
        viommu_negative_tests,
        viommu_alloc_nested_iopf,
        viommu_alloc_with_data,
        vdevice_alloc,
        vdevice_cache,
        hw_queue,
        vdevice_tombstone,
        viommu_kvm_handle_reaches_driver
    ]
);
variant_tests!(
    iommufd_viommu,
    mock_viommu,
    [
        viommu_auto_destroy,
        viommu_negative_tests,
        viommu_alloc_nested_iopf,
        viommu_alloc_with_data,
        vdevice_alloc,
        vdevice_cache,
        hw_queue,
        vdevice_tombstone,
        viommu_kvm_handle_reaches_driver
    ]
);

// ---------------------------------------------------------------------------------------
// FIXTURE(iommufd_device_pasid): a PASID-capable mock device (and, in `no_pasid`, one that
// is not).
mod iommufd_device_pasid {
    use super::*;

    pub struct Variant {
        pasid_capable: bool,
    }
    impl Variant {
        pub fn no_pasid() -> Variant {
            Variant {
                pasid_capable: false,
            }
        }
        pub fn has_pasid() -> Variant {
            Variant {
                pasid_capable: true,
            }
        }
    }

    pub struct F {
        pub env: Env,
        pub v: Variant,
        pub ioas_id: ObjectId,
        pub stdev_id: ObjectId,
        pub device_id: ObjectId,
        pub no_pasid_dev: Option<ObjectId>,
    }
    impl F {
        pub fn teardown(self) {
            self.env.teardown();
        }
    }

    pub fn setup(v: Variant) -> F {
        let env = Env::new();
        let ioas_id = env.ioas();
        let (d, _) = env.mock_domain(ioas_id, MOCK_FLAGS_DEVICE_PASID).unwrap();
        let no_pasid_dev =
            (!v.pasid_capable).then(|| env.mock_domain(ioas_id, 0).unwrap().0.dev_id);
        F {
            env,
            v,
            ioas_id,
            stdev_id: d.stdev_id,
            device_id: d.dev_id,
            no_pasid_dev,
        }
    }

    /// PASID_CHECK_HWPT: 0 means "nothing attached".
    fn check(f: &F, pasid: u32, hwpt: u32) {
        let got = f
            .env
            .ictx
            .attached_hwpt(f.device_id, pasid)
            .map(|h| h.raw())
            .unwrap_or(0);
        assert_eq!(got, hwpt, "pasid {pasid}");
    }

    pub fn pasid_attach(f: &F) {
        let c = &f.env.ictx;
        let dev = f.device_id;
        let z = ObjectId(0);
        let mut pasid = 100;
        // Detaching a PASID that is not attached is a no-op.
        c.detach(dev, pasid);
        let parent = c
            .hwpt_alloc(hwpt_flags::NEST_PARENT, dev, f.ioas_id, &mut none_data(), z)
            .unwrap();
        let mut b = selftest_data(IOMMU_TEST_IOTLB_DEFAULT);
        let n0 = c
            .hwpt_alloc(hwpt_flags::PASID, dev, parent, &mut sdata(&mut b), z)
            .unwrap();
        let n1 = c
            .hwpt_alloc(hwpt_flags::PASID, dev, parent, &mut sdata(&mut b), z)
            .unwrap();
        let fault = c.fault_alloc(0).unwrap();
        let iopf = c
            .hwpt_alloc(
                hwpt_flags::FAULT_ID_VALID | hwpt_flags::PASID,
                dev,
                parent,
                &mut sdata(&mut b),
                fault.id(),
            )
            .unwrap();
        let viommu = c
            .viommu_alloc(0, IOMMU_VIOMMU_TYPE_SELFTEST, dev, parent, &mut none_data())
            .unwrap();
        let _n2 = c
            .hwpt_alloc(hwpt_flags::PASID, dev, viommu, &mut sdata(&mut b), z)
            .unwrap();
        let s2 = c
            .hwpt_alloc(hwpt_flags::PASID, dev, f.ioas_id, &mut none_data(), z)
            .unwrap();

        // RID on a non-PASID-compatible domain: PASID attach fails.
        c.replace(dev, NO_PASID, parent).unwrap();
        assert_eq!(c.attach(dev, pasid, s2), Err(Errno::EINVAL));
        // RID on a compatible one: PASID attach works, and the RID can no longer move to a
        // non-compatible domain.
        c.replace(dev, NO_PASID, s2).unwrap();
        c.attach(dev, pasid, n0).unwrap();
        assert_eq!(c.replace(dev, NO_PASID, parent), Err(Errno::EINVAL));
        c.detach(dev, pasid);
        check(f, pasid, 0);

        if let Some(np) = f.no_pasid_dev {
            // A PASID-compatible domain can be used by a device without PASID support...
            c.replace(np, NO_PASID, n0).unwrap();
            c.replace(np, NO_PASID, f.ioas_id).unwrap();
            // ...but such a device cannot attach a PASID, whatever the domain.
            assert_eq!(c.attach(np, pasid, parent), Err(Errno::EINVAL));
            assert_eq!(c.attach(np, pasid, s2), Err(Errno::EINVAL));
        }
        // Non-compatible HWPT and IOAS (auto domains are never compatible) on a PASID.
        assert_eq!(c.attach(dev, pasid, parent), Err(Errno::EINVAL));
        check(f, pasid, 0);
        let before = c.object_count();
        assert_eq!(c.attach(dev, pasid, f.ioas_id), Err(Errno::EINVAL));
        assert_eq!(
            c.object_count(),
            before,
            "the failed auto domain was destroyed"
        );
        check(f, pasid, 0);
        // PASID beyond the device's width.
        assert_eq!(c.attach(dev, 1 << MOCK_PASID_WIDTH, s2), Err(Errno::EINVAL));
        c.attach(dev, pasid, s2).unwrap();
        check(f, pasid, s2.raw());
        // Attach does not overwrite: EBUSY.
        assert_eq!(c.attach(dev, pasid, n0), Err(Errno::EBUSY));
        c.detach(dev, pasid);
        check(f, pasid, 0);
        c.attach(dev, pasid, n0).unwrap();
        check(f, pasid, n0.raw());
        assert_eq!(c.attach(dev, pasid, n0), Err(Errno::EBUSY));
        c.detach(dev, pasid);

        // Replace.
        pasid = 200;
        assert_eq!(c.replace(dev, pasid, s2), Err(Errno::EINVAL));
        c.attach(dev, pasid, s2).unwrap();
        assert_eq!(c.replace(dev, pasid, f.ioas_id), Err(Errno::EINVAL));
        check(f, pasid, s2.raw());
        c.replace(dev, pasid, n0).unwrap();
        check(f, pasid, n0.raw());
        c.replace(dev, pasid, n1).unwrap();
        check(f, pasid, n1.raw());
        c.detach(dev, pasid);

        // The mock's PASID 1024 quirk: every other attach/replace fails with ENOMEM.
        pasid = IOMMU_TEST_PASID_RESERVED;
        c.attach(dev, pasid, s2).unwrap();
        check(f, pasid, s2.raw());
        assert_eq!(c.replace(dev, pasid, n0), Err(Errno::ENOMEM));
        check(f, pasid, s2.raw());
        c.detach(dev, pasid);

        // An iopf-capable HWPT on PASID 2048.
        pasid = 2048;
        c.attach(dev, pasid, iopf).unwrap();
        check(f, pasid, iopf.raw());
        trigger_and_answer_iopf(c, dev, pasid, &fault);
        c.replace(dev, pasid, s2).unwrap();
        check(f, pasid, s2.raw());
        c.detach(dev, pasid);
        c.destroy(iopf).unwrap();
        let fid = fault.id();
        drop(fault);
        c.destroy(fid).unwrap();
        c.replace(dev, NO_PASID, f.ioas_id).unwrap();
        let _ = (&f.v, f.stdev_id);
    }

    pub fn fault_routing(f: &F) {
        // §4.4: a request on a PASID with no attachment goes to the RID attachment only if
        // that is nested (the mock keeps PASID tables in user memory); requests are held until
        // their group's last page.
        let c = &f.env.ictx;
        let dev = f.device_id;
        let z = ObjectId(0);
        let fault = c.fault_alloc(0).unwrap();
        let parent = c
            .hwpt_alloc(hwpt_flags::NEST_PARENT, dev, f.ioas_id, &mut none_data(), z)
            .unwrap();
        let mut b = selftest_data(0);
        let nested = c
            .hwpt_alloc(
                hwpt_flags::FAULT_ID_VALID,
                dev,
                parent,
                &mut sdata(&mut b),
                fault.id(),
            )
            .unwrap();
        let paging = c
            .hwpt_alloc(
                hwpt_flags::FAULT_ID_VALID,
                dev,
                f.ioas_id,
                &mut none_data(),
                fault.id(),
            )
            .unwrap();
        let h = c.device_handle(dev).unwrap();
        let m = h.as_any().downcast_ref::<MockDevice>().unwrap();
        c.replace(dev, NO_PASID, paging).unwrap();
        m.trigger_iopf(7, 1, fault::PERM_READ, 0);
        assert_eq!(
            fault.pending(),
            (0, 0),
            "paging RID does not take PASID requests"
        );
        m.trigger_iopf(0, 1, fault::PERM_READ, 0);
        assert_eq!(fault.pending(), (1, 0));
        c.replace(dev, NO_PASID, nested).unwrap();
        assert_eq!(
            fault.pending(),
            (0, 0),
            "replace answered the old attachment's groups"
        );
        m.trigger_iopf(7, 2, fault::PERM_READ, 0);
        assert_eq!(fault.pending(), (1, 0));
        // A three-request group arrives as one group of three records.
        for (i, last) in [(0u64, false), (1, false), (2, true)] {
            m.report_page_request(PageRequest {
                flags: if last { fault::FLAG_LAST_PAGE } else { 0 },
                pasid: 0,
                grpid: 5,
                perm: fault::PERM_WRITE,
                addr: i * PAGE_SIZE,
            });
        }
        assert_eq!(fault.pending(), (2, 0));
        let mut buf = [0u8; 40 * 3];
        // The first group (one record) fits; the second needs 3 records and only 2 are left.
        assert_eq!(fault.read(&mut buf[..80]), Ok(40));
        assert_eq!(fault.read(&mut buf), Ok(120));
        assert_eq!(le32(&buf, 12), 5);
        assert_eq!(le64(&buf, 40 + 24), PAGE_SIZE);
        assert_eq!(le32(&buf, 36), le32(&buf, 76), "one cookie per group");
        assert_eq!(
            le32(&buf, 36),
            2,
            "cookie 1 is still waiting for its answer"
        );
        // Destroying the HWPT is blocked by the attachment; destroying the FAULT by its users.
        assert_eq!(c.destroy(fault.id()), Err(Errno::EBUSY));
        c.replace(dev, NO_PASID, f.ioas_id).unwrap();
        assert_eq!(fault.pending(), (0, 0));
        c.destroy(nested).unwrap();
        c.destroy(paging).unwrap();
        c.destroy(parent).unwrap();
        let fid = fault.id();
        drop(fault);
        c.destroy(fid).unwrap();
    }
}
variant_tests!(
    iommufd_device_pasid,
    no_pasid,
    [pasid_attach, fault_routing]
);
variant_tests!(
    iommufd_device_pasid,
    has_pasid,
    [pasid_attach, fault_routing]
);

// ---------------------------------------------------------------------------------------
// FIXTURE(change_process): CHANGE_PROCESS needs every area to be a file mapping.
mod change_process {
    use super::*;

    pub struct Variant;
    impl Variant {
        pub fn account_user() -> Variant {
            Variant
        }
    }
    pub struct F {
        pub env: Env,
        pub ioas_id: ObjectId,
    }
    impl F {
        pub fn teardown(self) {
            self.env.teardown();
        }
    }
    pub fn setup(_: Variant) -> F {
        let env = Env::new();
        let ioas_id = env.ioas();
        env.mock_domain(ioas_id, 0).unwrap();
        F { env, ioas_id }
    }

    pub fn basic(f: &F) {
        let c = &f.env.ictx;
        let iova = c
            .ioas_map(RW, f.ioas_id, f.env.src(BUFFER), PAGE_SIZE, 0)
            .unwrap();
        assert_eq!(c.ioas_change_process(), Err(Errno::EINVAL));
        c.ioas_unmap(f.ioas_id, iova, PAGE_SIZE).unwrap();
        c.ioas_map(RW, f.ioas_id, f.env.file_src(BUFFER), PAGE_SIZE, 0)
            .unwrap();
        c.ioas_change_process().unwrap();
    }
}
variant_tests!(change_process, account_user, [basic]);
