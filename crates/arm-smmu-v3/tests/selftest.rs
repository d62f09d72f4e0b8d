//! A fixture/variant matrix in the style of the kernel's iommufd selftest
//! (tools/testing/selftests/iommu/iommufd.c, iommufd.md §6.2), over the arm-smmu-v3 driver:
//! every driver-specific operation and errno path, and the core operations re-run with this
//! driver where they touch it. Every test ends with the fixture teardown: close the context;
//! then nothing is pinned, no VMID or ASID is left allocated, the device's STE aborts, and
//! every frame the driver took for the context came back.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use twinmmu_arm_smmu_v3::defs::{cmd, get, ste};
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::SmmuConfig;
use twinmmu_hw::ste::{BadSte, Ste, decode_ste};
use twinmmu_iommufd::*;
use twinmmu_kvm::Vm;

macro_rules! variant_tests {
    ($variant:ident, [$($test:ident),* $(,)?]) => {
        mod $variant {
            $(
                #[test]
                fn $test() {
                    let f = super::F::setup(super::Variant::$variant());
                    super::$test(&f);
                    f.teardown();
                }
            )*
        }
    };
}

pub struct Variant {
    cfg: SmmuConfig,
    opts: Options,
    kvm: bool,
}

impl Variant {
    /// A modern SMMU with BTM: vIOMMU VMIDs are pinned KVM VMIDs.
    fn btm() -> Variant {
        Variant {
            cfg: SmmuConfig::default(),
            opts: Options {
                trace: true,
                ..Options::default()
            },
            kvm: true,
        }
    }
    /// No BTM: private VMIDs, no KVM.
    fn no_btm() -> Variant {
        Variant {
            cfg: SmmuConfig {
                btm: false,
                ..SmmuConfig::default()
            },
            opts: Options {
                trace: true,
                ..Options::default()
            },
            kvm: false,
        }
    }
    /// An older SMMU: linear stream table, no range invalidation, no MSIs (CONS polling),
    /// 8-bit VMIDs and ASIDs, and a non-VHE host.
    fn legacy() -> Variant {
        Variant {
            cfg: SmmuConfig {
                btm: false,
                st_level_2lvl: false,
                sidsize: 12,
                ril: false,
                msi: false,
                vmid16: false,
                asid16: false,
                ..SmmuConfig::default()
            },
            opts: Options {
                trace: true,
                host_vhe: false,
                ..Options::default()
            },
            kvm: false,
        }
    }
    /// BTM and a Tegra241-CMDQV-style extension.
    fn cmdqv() -> Variant {
        Variant {
            cfg: SmmuConfig::default(),
            opts: Options {
                trace: true,
                cmdqv: Some(CmdqvConfig::default()),
                ..Options::default()
            },
            kvm: true,
        }
    }
    /// Stage 2 only: no nesting, no vIOMMU.
    fn stage2_only() -> Variant {
        Variant {
            cfg: SmmuConfig {
                s1p: false,
                btm: false,
                ..SmmuConfig::default()
            },
            opts: Options {
                trace: true,
                ..Options::default()
            },
            kvm: false,
        }
    }
}

pub struct F {
    m: Machine,
    c: Iommufd,
    vm: Option<Arc<Vm>>,
    dev: Arc<Master>,
    dev_id: ObjectId,
    ioas: ObjectId,
    nesting: bool,
    frames_baseline: u64,
}

const SID: u32 = 0x100;

impl F {
    fn setup(v: Variant) -> F {
        let m = Machine::new(v.cfg, v.opts);
        let frames_baseline = m.frames.live_bytes();
        let c = Iommufd::new();
        let dev = m.master(SID);
        let vm = v.kvm.then(|| vm(&kvm16()));
        let dev_id = c
            .bind_device(
                Arc::clone(&dev) as Arc<dyn IommuDevice>,
                vm.as_ref().map(|v| KvmRef::new(Arc::clone(v))),
            )
            .unwrap();
        let ioas = c.ioas_alloc(0).unwrap();
        let nesting = m.drv.features().nesting;
        F {
            m,
            c,
            vm,
            dev,
            dev_id,
            ioas,
            nesting,
            frames_baseline,
        }
    }

    fn teardown(self) {
        let F {
            m,
            c,
            vm,
            dev,
            frames_baseline,
            ..
        } = self;
        drop(c);
        assert_eq!(m.guest.total_pins(), 0, "pages left pinned after close");
        if let Some(vm) = &vm {
            assert_eq!(vm.vmid_pin_count(), 0, "VMID pin left after close");
            assert_eq!(vm.kvm().stats().leaked_pins, 0);
        }
        let s = m.drv.stats();
        assert_eq!(
            (s.private_vmids, s.asids),
            (0, 0),
            "VMID/ASID left allocated"
        );
        assert_eq!(
            get(ste::CFG, dev.ste().unwrap()[0]),
            ste::CFG_ABORT,
            "unattached device aborts"
        );
        drop(dev);
        // The L2 stream table of the device stays, as in Linux; everything else came back.
        let l2 = if m.drv.features().two_level_strtab {
            256 * 64
        } else {
            0
        };
        assert_eq!(m.frames.live_bytes(), frames_baseline + l2, "frames leaked");
    }

    fn nest_parent(&self) -> ObjectId {
        self.c
            .hwpt_alloc(
                hwpt_flags::NEST_PARENT,
                self.dev_id,
                self.ioas,
                &mut none_data(),
                ObjectId(0),
            )
            .unwrap()
    }

    fn viommu(&self, s2: ObjectId) -> ObjectId {
        self.c
            .viommu_alloc(
                0,
                viommu_type::ARM_SMMUV3,
                self.dev_id,
                s2,
                &mut none_data(),
            )
            .unwrap()
    }

    fn nested_hwpt(&self, viommu: ObjectId, vste: [u64; 2]) -> Result<ObjectId, Errno> {
        let mut data = vste_bytes(vste);
        self.c.hwpt_alloc(
            0,
            self.dev_id,
            viommu,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut data),
            ObjectId(0),
        )
    }

    fn vsmmu(&self, viommu: ObjectId) -> Arc<dyn Viommu> {
        self.c.viommu_ops(viommu).unwrap()
    }

    fn invalidate(&self, viommu: ObjectId, cmds: &[[u64; 2]]) -> (Result<(), Errno>, u32) {
        let bytes = cmd_bytes(cmds);
        let mut arr = InvalidateArray::new(
            invalidate_data::VIOMMU_ARM_SMMUV3,
            16,
            cmds.len() as u32,
            &bytes,
        );
        let r = self.c.hwpt_invalidate(viommu, &mut arr);
        (r, arr.entry_num)
    }

    /// A full vIOMMU stack: (S2, vIOMMU, vDEVICE with vSID 0x31).
    fn stack(&self) -> (ObjectId, ObjectId, ObjectId) {
        let s2 = self.nest_parent();
        let v = self.viommu(s2);
        let vd = self.c.vdevice_alloc(v, self.dev_id, 0x31).unwrap();
        (s2, v, vd)
    }
}

// ---------------------------------------------------------------------------------------

fn get_hw_info(f: &F) {
    let mut buf = [0xffu8; 48];
    let r = f.c.get_hw_info(0, f.dev_id, 0, 48, Some(&mut buf)).unwrap();
    assert_eq!(r.out_data_type, hw_info::TYPE_ARM_SMMUV3);
    assert_eq!(r.data_len, HW_INFO_ARM_SMMUV3_SIZE as u32);
    assert_eq!(r.out_capabilities, 0, "no dirty tracking without HTTU");
    let le = |i: usize| u32::from_le_bytes(buf[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!((le(0), le(1)), (0, 0), "flags, __reserved");
    for (i, off) in [0x0u64, 0x4, 0x8, 0xc, 0x10, 0x14].into_iter().enumerate() {
        assert_eq!(le(2 + i), f.m.r32(off), "IDR{i} as read over MMIO");
    }
    assert_eq!(le(8), f.m.r32(0x18), "IIDR");
    assert_eq!(le(9), f.m.r32(0x1c), "AIDR");
    assert_eq!(&buf[40..], &[0; 8], "tail of the user buffer zeroed");
    // Explicit types.
    let r = f.c.get_hw_info(
        hw_info::FLAG_INPUT_TYPE,
        f.dev_id,
        hw_info::TYPE_ARM_SMMUV3,
        0,
        None,
    );
    assert_eq!(r.unwrap().out_data_type, hw_info::TYPE_ARM_SMMUV3);
    assert_eq!(
        f.c.get_hw_info(
            hw_info::FLAG_INPUT_TYPE,
            f.dev_id,
            hw_info::TYPE_INTEL_VTD,
            0,
            None
        ),
        Err(Errno::EOPNOTSUPP)
    );
    let cmdqv = f.m.drv.options().cmdqv.is_some();
    let r = f.c.get_hw_info(
        hw_info::FLAG_INPUT_TYPE,
        f.dev_id,
        hw_info::TYPE_TEGRA241_CMDQV,
        0,
        None,
    );
    assert_eq!(r.is_ok(), cmdqv);
}

fn hwpt_alloc_paging(f: &F) {
    let c = &f.c;
    let s1 = f.m.drv.features().s1p;
    let h = c
        .hwpt_alloc(0, f.dev_id, f.ioas, &mut none_data(), ObjectId(0))
        .unwrap();
    let d = c.paging_domain(h).unwrap();
    assert_eq!(d.as_any().downcast_ref::<S1Domain>().is_some(), s1);
    assert_eq!(d.as_any().downcast_ref::<S2Domain>().is_some(), !s1);
    drop(d);
    let np = c.hwpt_alloc(
        hwpt_flags::NEST_PARENT,
        f.dev_id,
        f.ioas,
        &mut none_data(),
        ObjectId(0),
    );
    if f.nesting {
        let np = np.unwrap();
        let d = c.paging_domain(np).unwrap();
        assert!(
            d.as_any()
                .downcast_ref::<S2Domain>()
                .unwrap()
                .is_nest_parent()
        );
    } else {
        assert_eq!(np, Err(Errno::EOPNOTSUPP));
    }
    // Dirty tracking: the device has no dirty capability (no HTTU).
    assert_eq!(
        c.hwpt_alloc(
            hwpt_flags::DIRTY_TRACKING,
            f.dev_id,
            f.ioas,
            &mut none_data(),
            ObjectId(0)
        ),
        Err(Errno::EOPNOTSUPP)
    );
    // Driver data for a paging domain: EOPNOTSUPP.
    let mut data = [0u8; 16];
    assert_eq!(
        c.hwpt_alloc(
            0,
            f.dev_id,
            f.ioas,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut data),
            ObjectId(0)
        ),
        Err(Errno::EOPNOTSUPP)
    );
    // A nested HWPT on a HWPT_PAGING parent: arm-smmu-v3 nests only through a vIOMMU.
    if f.nesting {
        let np = c
            .hwpt_alloc(
                hwpt_flags::NEST_PARENT,
                f.dev_id,
                f.ioas,
                &mut none_data(),
                ObjectId(0),
            )
            .unwrap();
        let mut data = vste_bytes([0, 0]);
        assert_eq!(
            c.hwpt_alloc(
                0,
                f.dev_id,
                np,
                &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut data),
                ObjectId(0)
            ),
            Err(Errno::EOPNOTSUPP)
        );
    }
}

fn ioas_with_domain(f: &F) {
    let c = &f.c;
    let h = c.attach(f.dev_id, NO_PASID, f.ioas).unwrap();
    // The software MSI window and the aperture's complement are reserved.
    let r = c.ioas_iova_ranges(f.ioas, 8).unwrap();
    assert_eq!(r.out_iova_alignment, PAGE_SIZE);
    assert_eq!(r.ranges[0], IovaRange::new(0, MSI_IOVA_BASE - 1));
    assert_eq!(r.ranges[1].start, MSI_IOVA_BASE + MSI_IOVA_LENGTH);
    assert_eq!(r.ranges.len(), 2);
    assert_eq!(
        c.ioas_map(FIXED, f.ioas, f.m.src(0), PAGE_SIZE, MSI_IOVA_BASE),
        Err(Errno::EINVAL)
    );
    let above = r.ranges[1].last + 1;
    assert_eq!(
        c.ioas_map(FIXED, f.ioas, f.m.src(0), PAGE_SIZE, above),
        Err(Errno::EINVAL),
        "beyond the domain's input size"
    );
    // Maps are loaded into the domain at once (pinned), in blocks where they fit.
    let iova = 0x4000_0000;
    c.ioas_map(FIXED, f.ioas, f.m.src(0x20_0000), 0x40_0000, iova)
        .unwrap();
    assert_eq!(f.m.guest.pin_count(f.m.hpa(0x20_0000)), 1);
    let d = c.paging_domain(h).unwrap();
    for off in [0, 0x1000, 0x1f_f000, 0x3f_ffff] {
        assert_eq!(d.iova_to_phys(iova + off), Some(f.m.hpa(0x20_0000 + off)));
    }
    dma_write(&f.m, SID, iova + 0x12_3456, b"dma").unwrap();
    assert_eq!(f.m.read(f.m.hpa(0x32_3456), 3), b"dma");
    // Auto IOVA lands inside the aperture and outside the MSI window.
    let auto = c
        .ioas_map(RW, f.ioas, f.m.src(0x80_0000), 0x1000, 0)
        .unwrap();
    assert!(!(MSI_IOVA_BASE..MSI_IOVA_BASE + MSI_IOVA_LENGTH).contains(&auto));
    assert_eq!(d.iova_to_phys(auto), Some(f.m.hpa(0x80_0000)));
    // Unmap invalidates: no stale translation.
    assert_eq!(c.ioas_unmap(f.ioas, iova, 0x40_0000), Ok(0x40_0000));
    assert!(dma_write(&f.m, SID, iova + 0x12_3456, b"x").is_err());
    assert_eq!(d.iova_to_phys(iova), None);
    assert_eq!(f.m.guest.pin_count(f.m.hpa(0x20_0000)), 0);
}

fn attach_replace_detach(f: &F) {
    let c = &f.c;
    let a = c
        .hwpt_alloc(0, f.dev_id, f.ioas, &mut none_data(), ObjectId(0))
        .unwrap();
    let b = c
        .hwpt_alloc(0, f.dev_id, f.ioas, &mut none_data(), ObjectId(0))
        .unwrap();
    c.ioas_map(FIXED, f.ioas, f.m.src(0x10_0000), 0x1000, 0x9000)
        .unwrap();
    c.attach(f.dev_id, NO_PASID, a).unwrap();
    assert_eq!(c.attach(f.dev_id, NO_PASID, b), Err(Errno::EBUSY));
    let cfg = |f: &F| get(ste::CFG, f.dev.ste().unwrap()[0]);
    let s1 = f.m.drv.features().s1p;
    assert_eq!(
        cfg(f),
        if s1 {
            ste::CFG_S1_TRANS
        } else {
            ste::CFG_S2_TRANS
        }
    );
    dma_write(&f.m, SID, 0x9000, b"a").unwrap();
    assert_eq!(c.replace(f.dev_id, NO_PASID, b), Ok(b));
    dma_write(&f.m, SID, 0x9008, b"b").unwrap();
    assert_eq!(f.m.read(f.m.hpa(0x10_0000), 9), b"a\0\0\0\0\0\0\0b");
    assert_eq!(c.destroy(b), Err(Errno::EBUSY), "attached");
    // PASID attach: the masters have no SubstreamIDs.
    assert_eq!(c.attach(f.dev_id, 1, a), Err(Errno::EINVAL));
    c.detach(f.dev_id, NO_PASID);
    assert_eq!(cfg(f), ste::CFG_ABORT, "blocked: abort STE");
    assert!(dma_write(&f.m, SID, 0x9000, b"x").is_err());
    c.destroy(a).unwrap();
    c.destroy(b).unwrap();
}

fn viommu_negative_tests(f: &F) {
    let c = &f.c;
    let paging = c
        .hwpt_alloc(0, f.dev_id, f.ioas, &mut none_data(), ObjectId(0))
        .unwrap();
    let ty = viommu_type::ARM_SMMUV3;
    assert_eq!(
        c.viommu_alloc(0, viommu_type::DEFAULT, f.dev_id, paging, &mut none_data()),
        Err(Errno::EOPNOTSUPP)
    );
    assert_eq!(
        c.viommu_alloc(0, 0x77, f.dev_id, paging, &mut none_data()),
        Err(Errno::EOPNOTSUPP)
    );
    if !f.nesting {
        assert_eq!(
            c.viommu_alloc(0, ty, f.dev_id, paging, &mut none_data()),
            Err(Errno::EOPNOTSUPP),
            "no FEAT_NESTING"
        );
        return;
    }
    assert_eq!(
        c.viommu_alloc(0, ty, f.dev_id, f.ioas, &mut none_data()),
        Err(Errno::ENOENT),
        "not a HWPT_PAGING"
    );
    assert_eq!(
        c.viommu_alloc(0, ty, f.dev_id, paging, &mut none_data()),
        Err(Errno::EINVAL),
        "not a nesting parent"
    );
    let cmdqv = f.m.drv.options().cmdqv.is_some();
    let s2 = f.nest_parent();
    let r = c.viommu_alloc(
        0,
        viommu_type::TEGRA241_CMDQV,
        f.dev_id,
        s2,
        &mut none_data(),
    );
    assert_eq!(
        r,
        Err(if cmdqv {
            Errno::EINVAL
        } else {
            Errno::EOPNOTSUPP
        }),
        "CMDQV type: EOPNOTSUPP without the extension, EINVAL without its data"
    );
    // A device that could make the guest's memory non-coherent (no CANWBS) on an SMMU
    // without S2FWB: no vIOMMU.
    let nc =
        f.m.drv
            .add_master(
                SID + 1,
                MasterOptions {
                    canwbs: false,
                    ..MasterOptions::default()
                },
            )
            .unwrap();
    let kvm = f.vm.as_ref().map(|v| KvmRef::new(Arc::clone(v)));
    let nc_id = c
        .bind_device(Arc::clone(&nc) as Arc<dyn IommuDevice>, kvm)
        .unwrap();
    assert_eq!(
        c.viommu_alloc(0, ty, nc_id, s2, &mut none_data()),
        Err(Errno::EOPNOTSUPP)
    );
    c.unbind_device(nc_id).unwrap();
    // A parent from another SMMU instance: EINVAL (the core checks the instance for HWPTs;
    // vIOMMU init checks the parent's SMMU).
    let m2 = Machine::new(SmmuConfig::default(), Options::default());
    let other = m2.master(1);
    let kvm = f.vm.as_ref().map(|v| KvmRef::new(Arc::clone(v)));
    let other_id = c
        .bind_device(Arc::clone(&other) as Arc<dyn IommuDevice>, kvm)
        .unwrap();
    let r = c.viommu_alloc(0, ty, other_id, s2, &mut none_data());
    assert_eq!(r, Err(Errno::EINVAL));
    let v = f.viommu(s2);
    assert_eq!(c.vdevice_alloc(v, other_id, 5), Err(Errno::EINVAL));
    c.unbind_device(other_id).unwrap();
    c.destroy(v).unwrap();
}

fn nested_ste_fields(f: &F) {
    if !f.nesting {
        return;
    }
    let (s2, v, _vd) = f.stack();
    let cd = 0x12_3000u64;
    let good0 = 1 | (5 << 1) | cd;
    // Every field a guest may not set, alone: EIO.
    let bad: &[[u64; 2]] = &[
        [good0 | (1 << 52), 0], // S1ContextPtr above bit 51
        [good0 | (1 << 56), 0], // reserved dword-0 bits
        [good0, ste::STRW],     // StreamWorld
        [good0, ste::S2FWB],    // S2FWB
        [good0, ste::MEV],      // MEV is the host's
        [good0, ste::SHCFG],    // attribute overrides
        [good0, 1 << 8],        // S2HWU
        [good0, 2 << 28],       // EATS = S1CHK (split stage)
        [good0, 3 << 28],       // EATS reserved
        [1 | (6 << 1), 0],      // Config = S2 translate
        [1 | (7 << 1), 0],      // Config = nested
        [1 | (1 << 1), 0],      // Config reserved
        [1 | (3 << 1), 0],      // Config reserved
        [good0 | (1 << 2) | (7 << 60), 0],
    ];
    let objects = f.c.object_count();
    for b in bad {
        assert_eq!(f.nested_hwpt(v, *b), Err(Errno::EIO), "{b:#x?}");
    }
    assert_eq!(f.c.object_count(), objects, "failed allocs leave nothing");
    // Copy rules: wrong data type, short, long data: EINVAL; flags: EOPNOTSUPP.
    let mut data = vste_bytes([good0, 0]);
    assert_eq!(
        f.c.hwpt_alloc(
            0,
            f.dev_id,
            v,
            &mut UserData::new(hwpt_data::VTD_S1, &mut data),
            ObjectId(0)
        ),
        Err(Errno::EINVAL)
    );
    let mut short = [0u8; 8];
    assert_eq!(
        f.c.hwpt_alloc(
            0,
            f.dev_id,
            v,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut short),
            ObjectId(0)
        ),
        Err(Errno::EINVAL)
    );
    let mut long = [0u8; 24];
    long[..16].copy_from_slice(&data);
    assert_eq!(
        f.c.hwpt_alloc(
            0,
            f.dev_id,
            v,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut long),
            ObjectId(0)
        ),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        f.c.hwpt_alloc(
            hwpt_flags::PASID,
            f.dev_id,
            v,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut data),
            ObjectId(0)
        ),
        Err(Errno::EOPNOTSUPP)
    );
    // The allowed fields, all of them: accepted (EATS 0 or 1).
    let all0 = good0 | (2 << 4) | (0x1f << 59);
    let all1 = ste::S1DSS | ste::S1CIR | ste::S1COR | ste::S1CSH | ste::S1STALLD | (1 << 28);
    let vmid = f.vsmmu(v).as_any().downcast_ref::<VSmmu>().unwrap().vmid();
    let s1 = f.nested_hwpt(v, [all0, all1]).unwrap();
    f.c.attach(f.dev_id, NO_PASID, s1).unwrap();
    let p = f.dev.ste().unwrap();
    assert_eq!(get(ste::CFG, p[0]), ste::CFG_NESTED);
    assert_eq!(
        p[0] & !ste::CFG,
        all0 & !ste::CFG,
        "guest dword-0 fields kept"
    );
    assert_eq!(
        p[1] & ste::DW1_NESTING_ALLOWED & !ste::EATS,
        all1 & !ste::EATS
    );
    assert_ne!(p[1] & ste::MEV, 0, "events merged");
    assert_eq!(get(ste::S2VMID, p[2]), u64::from(vmid));
    let s2_ttb =
        f.c.paging_domain(s2)
            .unwrap()
            .as_any()
            .downcast_ref::<S2Domain>()
            .unwrap()
            .ttb();
    assert_eq!(p[3] & ste::S2TTB, s2_ttb, "the parent's stage 2");
    // Bypass: stage 2 only with the vIOMMU's VMID. Abort and V = 0 (any garbage): abort.
    let byp = f.nested_hwpt(v, [1 | (4 << 1), 0]).unwrap();
    f.c.replace(f.dev_id, NO_PASID, byp).unwrap();
    let p = f.dev.ste().unwrap();
    assert_eq!(get(ste::CFG, p[0]), ste::CFG_S2_TRANS);
    assert_eq!(get(ste::S2VMID, p[2]), u64::from(vmid));
    let abt = f.nested_hwpt(v, [1, 0]).unwrap();
    f.c.replace(f.dev_id, NO_PASID, abt).unwrap();
    assert_eq!(get(ste::CFG, f.dev.ste().unwrap()[0]), ste::CFG_ABORT);
    let off = f.nested_hwpt(v, [!1u64, !0u64]).unwrap();
    f.c.replace(f.dev_id, NO_PASID, off).unwrap();
    assert_eq!(f.dev.ste().unwrap(), [1, 0, 0, 0, 0, 0, 0, 0]);
    f.c.detach(f.dev_id, NO_PASID);
}

fn nested_attach_requires_vdevice(f: &F) {
    if !f.nesting {
        return;
    }
    let s2 = f.nest_parent();
    let v = f.viommu(s2);
    let n = f.nested_hwpt(v, [1 | (4 << 1), 0]).unwrap();
    assert_eq!(f.c.attach(f.dev_id, NO_PASID, n), Err(Errno::ENOENT));
    assert_eq!(get(ste::CFG, f.dev.ste().unwrap()[0]), ste::CFG_ABORT);
    let vd = f.c.vdevice_alloc(v, f.dev_id, 9).unwrap();
    f.c.attach(f.dev_id, NO_PASID, n).unwrap();
    assert_eq!(f.dev.vmaster(), Some((v, 9)));
    // vDEVICE rules: one per device, virt_id unique.
    assert_eq!(f.c.vdevice_alloc(v, f.dev_id, 10), Err(Errno::EEXIST));
    f.c.detach(f.dev_id, NO_PASID);
    assert_eq!(f.dev.vmaster(), None);
    f.c.destroy(vd).unwrap();
}

fn invalidate_conversion_and_errors(f: &F) {
    if !f.nesting {
        return;
    }
    let (_s2, v, _vd) = f.stack();
    let vmid = u64::from(f.vsmmu(v).as_any().downcast_ref::<VSmmu>().unwrap().vmid());
    f.m.drv.take_trace();
    // Accepted: converted with the vIOMMU's VMID / the physical SID.
    let ok = [
        [gcmd::tlbi_nh_va(3, 0x1000)[0] | (0x5555 << 32), 0x1000],
        gcmd::tlbi_nh_asid(3),
        gcmd::tlbi_nh_all(),
        [0x13, 0x2000],
        gcmd::tlbi_nsnh_all(),
        gcmd::cfgi_cd(0x31),
        gcmd::cfgi_cd_all(0x31),
    ];
    assert_eq!(f.invalidate(v, &ok), (Ok(()), ok.len() as u32));
    let issued: Vec<[u64; 2]> =
        f.m.drv
            .take_trace()
            .into_iter()
            .filter_map(|e| match e {
                TraceEvent::Cmd(c) if get(cmd::OP, c[0]) != cmd::OP_SYNC => Some(c),
                _ => None,
            })
            .collect();
    assert_eq!(issued.len(), ok.len());
    for c in &issued[..5] {
        assert_eq!(get(cmd::TLBI_0_VMID, c[0]), vmid, "VMID forced: {c:#x?}");
    }
    assert_eq!(
        get(cmd::OP, issued[4][0]),
        cmd::OP_TLBI_NH_ALL,
        "NSNH_ALL → NH_ALL"
    );
    assert_eq!(get(cmd::SID, issued[5][0]), u64::from(SID), "vSID → pSID");
    assert_eq!(get(cmd::SID, issued[6][0]), u64::from(SID));
    // Rejected: anything else, EIO with entry_num = the entries handled before it.
    for bad in [
        gcmd::cfgi_ste(0x31),
        gcmd::tlbi_s12_vmall(1),
        gcmd::sync(),
        [0x2a, 0],           // TLBI_S2_IPA
        [0x20, 0],           // TLBI_EL2_ALL
        [0x01, 0],           // PREFETCH_CONFIG
        [0x44, 0],           // RESUME
        [0xff, 0],           // unknown opcode
        gcmd::cfgi_cd(0x99), // unknown vSID
        gcmd::atc_inv(0x98),
    ] {
        let r = f.invalidate(v, &[gcmd::tlbi_nh_asid(1), gcmd::tlbi_nh_asid(2), bad]);
        assert_eq!(r, (Err(Errno::EIO), 2), "{bad:#x?}");
    }
    // Array rules: entry_num 0 (the full-array copy refuses it), wrong type: EINVAL; short
    // entries zero-extended, a longer entry's non-zero tail E2BIG.
    let mut arr = InvalidateArray::new(invalidate_data::VIOMMU_ARM_SMMUV3, 16, 0, &[]);
    assert_eq!(f.c.hwpt_invalidate(v, &mut arr), Err(Errno::EINVAL));
    assert_eq!(arr.entry_num, 0);
    let b = cmd_bytes(&[gcmd::tlbi_nh_all()]);
    let mut arr = InvalidateArray::new(invalidate_data::VTD_S1, 16, 1, &b);
    assert_eq!(f.c.hwpt_invalidate(v, &mut arr), Err(Errno::EINVAL));
    let mut arr = InvalidateArray::new(invalidate_data::VIOMMU_ARM_SMMUV3, 8, 1, &b[..8]);
    assert_eq!(f.c.hwpt_invalidate(v, &mut arr), Ok(()));
    assert_eq!(arr.entry_num, 1);
    let mut wide = b.clone();
    wide.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    let mut arr = InvalidateArray::new(invalidate_data::VIOMMU_ARM_SMMUV3, 24, 1, &wide);
    assert_eq!(f.c.hwpt_invalidate(v, &mut arr), Err(Errno::E2BIG));
    assert_eq!(arr.entry_num, 0);
    // HWPT_INVALIDATE on the nested HWPT itself: arm-smmu-v3 has none (EOPNOTSUPP).
    let n = f.nested_hwpt(v, [1 | (4 << 1), 0]).unwrap();
    let mut arr = InvalidateArray::new(invalidate_data::VIOMMU_ARM_SMMUV3, 16, 1, &b);
    assert_eq!(f.c.hwpt_invalidate(n, &mut arr), Err(Errno::EOPNOTSUPP));
}

fn invalidate_batches(f: &F) {
    if !f.nesting {
        return;
    }
    let (_s2, v, _vd) = f.stack();
    f.m.drv.take_trace();
    let cmds: Vec<[u64; 2]> = (0..130u64).map(|i| gcmd::tlbi_nh_va(1, i << 12)).collect();
    assert_eq!(f.invalidate(v, &cmds), (Ok(()), 130));
    let t = f.m.drv.take_trace();
    // 63 + 63 + 4, each batch followed by its CMD_SYNC.
    let mut run = 0;
    let mut runs = Vec::new();
    for e in t {
        match e {
            TraceEvent::Cmd(c) if get(cmd::OP, c[0]) == cmd::OP_SYNC => {
                runs.push(run);
                run = 0;
            }
            TraceEvent::Cmd(_) => run += 1,
            _ => {}
        }
    }
    assert_eq!(runs, vec![63, 63, 4]);
}

fn destroy_ordering(f: &F) {
    if !f.nesting {
        return;
    }
    let (s2, v, vd) = f.stack();
    let n = f.nested_hwpt(v, [1 | (4 << 1), 0]).unwrap();
    let q =
        f.c.veventq_alloc(0, v, veventq_type::ARM_SMMUV3, 4)
            .unwrap();
    f.c.attach(f.dev_id, NO_PASID, n).unwrap();
    assert_eq!(f.c.destroy(s2), Err(Errno::EBUSY), "vIOMMU on it");
    assert_eq!(
        f.c.destroy(v),
        Err(Errno::EBUSY),
        "nested HWPT, vDEVICE, vEVENTQ on it"
    );
    assert_eq!(f.c.destroy(n), Err(Errno::EBUSY), "attached");
    f.c.detach(f.dev_id, NO_PASID);
    f.c.destroy(n).unwrap();
    assert_eq!(f.c.destroy(v), Err(Errno::EBUSY));
    f.c.destroy(vd).unwrap();
    assert_eq!(f.c.destroy(v), Err(Errno::EBUSY), "vEVENTQ on it");
    let qid = q.id();
    assert_eq!(f.c.destroy(qid), Err(Errno::EBUSY), "its fd is open");
    drop(q);
    f.c.destroy(qid).unwrap();
    f.c.destroy(v).unwrap();
    f.c.destroy(s2).unwrap();
}

fn vdevice_tombstone(f: &F) {
    if !f.nesting {
        return;
    }
    let (_s2, v, vd) = f.stack();
    let n = f.nested_hwpt(v, [1 | (4 << 1), 0]).unwrap();
    f.c.attach(f.dev_id, NO_PASID, n).unwrap();
    // Unbinding the device detaches it and leaves the vDEVICE as a tombstone.
    f.c.unbind_device(f.dev_id).unwrap();
    assert!(f.c.is_tombstone(vd));
    assert_eq!(get(ste::CFG, f.dev.ste().unwrap()[0]), ste::CFG_ABORT);
    // Converting a command that names the vanished vSID: EIO.
    assert_eq!(
        f.invalidate(v, &[gcmd::cfgi_cd(0x31)]),
        (Err(Errno::EIO), 0)
    );
    f.c.destroy(n).unwrap();
}

/// Every state the SMMU can fetch while the driver rewrites an STE is either the old
/// configuration, the new one, or V = 0 during a break: never a torn, illegal entry.
fn ste_updates_are_never_torn(f: &F) {
    let smmu_cfg = f.m.smmu.config().clone();
    let mut states: Vec<[u64; 8]> = Vec::new();
    let mut cur = f.dev.ste().unwrap();
    let record = |f: &F, cur: &mut [u64; 8], states: &mut Vec<[u64; 8]>| {
        for e in f.m.drv.take_trace() {
            if let TraceEvent::SteWrite {
                sid: SID,
                index,
                value,
            } = e
            {
                cur[index as usize] = value;
                states.push(*cur);
            }
        }
    };
    f.m.drv.take_trace();
    c_ops(f);
    record(f, &mut cur, &mut states);
    assert!(states.len() >= 4, "{} STE writes", states.len());
    assert_eq!(cur, f.dev.ste().unwrap(), "trace replays to memory");
    for s in &states {
        match decode_ste(&Ste::from_dwords(*s), &smmu_cfg) {
            Ok(_) | Err(BadSte::NotValid) => {}
            Err(e) => panic!("torn STE {s:#x?}: {e}"),
        }
    }
}

/// Attach, replace through every kind of domain, detach.
fn c_ops(f: &F) {
    let c = &f.c;
    let a = c
        .hwpt_alloc(0, f.dev_id, f.ioas, &mut none_data(), ObjectId(0))
        .unwrap();
    c.attach(f.dev_id, NO_PASID, a).unwrap();
    if f.nesting {
        let (s2, v, _vd) = f.stack();
        c.replace(f.dev_id, NO_PASID, s2).unwrap();
        let n = f.nested_hwpt(v, [1 | (5 << 1) | 0x8000, 0]).unwrap();
        c.replace(f.dev_id, NO_PASID, n).unwrap();
        let b = f.nested_hwpt(v, [1 | (4 << 1), 0]).unwrap();
        c.replace(f.dev_id, NO_PASID, b).unwrap();
    }
    c.replace(f.dev_id, NO_PASID, a).unwrap();
    c.detach(f.dev_id, NO_PASID);
}

fn close_with_everything_alive(f: &F) {
    // The teardown closes the context with a whole stack still live: release must tear it
    // down in dependency order (the fixture checks VMIDs, pins, frames, STE afterwards).
    let a =
        f.c.hwpt_alloc(0, f.dev_id, f.ioas, &mut none_data(), ObjectId(0))
            .unwrap();
    f.c.ioas_map(FIXED, f.ioas, f.m.src(0x40_0000), 0x20_0000, 0x20_0000)
        .unwrap();
    if !f.nesting {
        f.c.attach(f.dev_id, NO_PASID, a).unwrap();
        return;
    }
    let (_s2, v, _vd) = f.stack();
    let n = f.nested_hwpt(v, [1 | (4 << 1), 0]).unwrap();
    f.c.attach(f.dev_id, NO_PASID, n).unwrap();
    let _q =
        f.c.veventq_alloc(0, v, veventq_type::ARM_SMMUV3, 2)
            .unwrap();
    dma_write(&f.m, SID, 0x20_0000, b"ok").unwrap();
}

variant_tests!(
    btm,
    [
        get_hw_info,
        hwpt_alloc_paging,
        ioas_with_domain,
        attach_replace_detach,
        viommu_negative_tests,
        nested_ste_fields,
        nested_attach_requires_vdevice,
        invalidate_conversion_and_errors,
        invalidate_batches,
        destroy_ordering,
        vdevice_tombstone,
        ste_updates_are_never_torn,
    ]
);
variant_tests!(
    no_btm,
    [
        get_hw_info,
        hwpt_alloc_paging,
        ioas_with_domain,
        attach_replace_detach,
        viommu_negative_tests,
        nested_ste_fields,
        nested_attach_requires_vdevice,
        invalidate_conversion_and_errors,
        invalidate_batches,
        destroy_ordering,
        vdevice_tombstone,
        ste_updates_are_never_torn,
    ]
);
variant_tests!(
    legacy,
    [
        get_hw_info,
        hwpt_alloc_paging,
        ioas_with_domain,
        attach_replace_detach,
        viommu_negative_tests,
        nested_ste_fields,
        nested_attach_requires_vdevice,
        invalidate_conversion_and_errors,
        invalidate_batches,
        destroy_ordering,
        vdevice_tombstone,
        ste_updates_are_never_torn,
    ]
);
variant_tests!(
    cmdqv,
    [
        get_hw_info,
        hwpt_alloc_paging,
        ioas_with_domain,
        attach_replace_detach,
        viommu_negative_tests,
        nested_ste_fields,
        nested_attach_requires_vdevice,
        invalidate_conversion_and_errors,
        invalidate_batches,
        destroy_ordering,
        vdevice_tombstone,
        ste_updates_are_never_torn,
    ]
);
variant_tests!(
    stage2_only,
    [
        get_hw_info,
        hwpt_alloc_paging,
        ioas_with_domain,
        attach_replace_detach,
        viommu_negative_tests,
        nested_ste_fields,
        nested_attach_requires_vdevice,
        invalidate_conversion_and_errors,
        invalidate_batches,
        destroy_ordering,
        vdevice_tombstone,
        ste_updates_are_never_torn,
    ]
);

mod close {
    use super::*;
    #[test]
    fn btm() {
        let f = F::setup(Variant::btm());
        close_with_everything_alive(&f);
        f.teardown();
    }
    #[test]
    fn no_btm() {
        let f = F::setup(Variant::no_btm());
        close_with_everything_alive(&f);
        f.teardown();
    }
    #[test]
    fn stage2_only() {
        let f = F::setup(Variant::stage2_only());
        close_with_everything_alive(&f);
        f.teardown();
    }
}
