//! Nothing a guest or a VMM can put in front of the driver panics it: arbitrary guest STEs,
//! arbitrary guest commands through HWPT_INVALIDATE, arbitrary ring contents and register
//! values on the VINTF page, arbitrary CD/table memory behind a nested STE. Each case ends with
//! the driver still working (a known-good invalidation completes) and the context closing
//! cleanly. `TWINMMU_LONG=1` runs many more cases.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{PhysMem, SmmuConfig};
use twinmmu_iommufd::*;

fn cases() -> u32 {
    if std::env::var_os("TWINMMU_LONG").is_some() {
        2000
    } else {
        48
    }
}

const RING: u64 = 0x1_0000;

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_guest_input_never_panics(
        vstes in proptest::collection::vec(any::<[u64; 2]>(), 1..6),
        cmds in proptest::collection::vec(any::<[u64; 2]>(), 0..40),
        ring in proptest::collection::vec(any::<[u64; 2]>(), 0..40),
        regs in proptest::collection::vec((0u64..0x18, any::<u32>()), 0..12),
        junk in proptest::collection::vec(any::<u64>(), 8),
        dma in proptest::collection::vec(any::<u64>(), 0..6),
    ) {
        let m = Machine::new(
            SmmuConfig::default(),
            Options { cmdqv: Some(CmdqvConfig::default()), ..Options::default() },
        );
        let c = Iommufd::new();
        let dev = m.master(0x12);
        let vm = vm(&kvm16());
        let d = c
            .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, Some(KvmRef::new(vm)))
            .unwrap();
        let ioas = c.ioas_alloc(0).unwrap();
        c.ioas_map(FIXED, ioas, m.src(0), 0x20_0000, 0).unwrap();
        let s2 = c
            .hwpt_alloc(hwpt_flags::NEST_PARENT, d, ioas, &mut none_data(), ObjectId(0))
            .unwrap();
        let mut data = [0u8; 16];
        let v = c
            .viommu_alloc(
                0,
                viommu_type::TEGRA241_CMDQV,
                d,
                s2,
                &mut UserData::new(viommu_type::TEGRA241_CMDQV, &mut data),
            )
            .unwrap();
        let off = u64::from_le_bytes(data[..8].try_into().unwrap());
        let page = c.mmap(off, VCMDQ_PAGE_SIZE, true, false).unwrap();
        c.vdevice_alloc(v, d, 5).unwrap();
        let _q = c.hw_queue_alloc(0, v, hw_queue_type::TEGRA241_CMDQV, 0, RING, 0x400).unwrap();
        // Junk where the guest's CD and tables would be.
        for (i, w) in junk.iter().enumerate() {
            m.mem.write_u64(GUEST_BASE + 0x8000 + 8 * i as u64, *w).unwrap();
        }
        for s in vstes {
            // Point S1 translations at the junk CD.
            let s = [s[0] & !0xfff_ffff_ffff_ffc0 | 0x8000, s[1]];
            let mut b = vste_bytes(s);
            if let Ok(n) = c.hwpt_alloc(
                0, d, v, &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut b), ObjectId(0),
            ) {
                if c.attached_hwpt(d, NO_PASID).is_some() {
                    let _ = c.replace(d, NO_PASID, n);
                } else {
                    let _ = c.attach(d, NO_PASID, n);
                }
            }
            for a in &dma {
                let _ = m.smmu.dma_write(0x12, None, *a, b"x", false);
            }
            m.drv.process_events();
        }
        if !cmds.is_empty() {
            let b = cmd_bytes(&cmds);
            let mut arr = InvalidateArray::new(
                invalidate_data::VIOMMU_ARM_SMMUV3, 16, cmds.len() as u32, &b,
            );
            let r = c.hwpt_invalidate(v, &mut arr);
            prop_assert!(arr.entry_num <= cmds.len() as u32);
            prop_assert!(r.is_ok() || r == Err(Errno::EIO), "{r:?}");
        }
        // The guest's ring and registers: whatever it writes.
        for (i, cmd) in ring.iter().enumerate() {
            let a = GUEST_BASE + RING + 16 * (i as u64 % 64);
            m.mem.write_u64(a, cmd[0]).unwrap();
            m.mem.write_u64(a + 8, cmd[1]).unwrap();
        }
        let vs = c.viommu_ops(v).unwrap();
        let vs = vs.as_any().downcast_ref::<VSmmu>().unwrap();
        m.mem.write(page.base_pa() + vcmdq_reg::CONFIG, &1u32.to_le_bytes()).unwrap();
        m.mem.write(page.base_pa() + vcmdq_reg::PROD, &(ring.len() as u32 % 128).to_le_bytes()).unwrap();
        vs.kick();
        for (off, val) in regs {
            m.mem.write(page.base_pa() + (off & !3), &val.to_le_bytes()).unwrap();
            vs.kick();
        }
        // Still working: a good invalidation completes.
        let b = cmd_bytes(&[gcmd::tlbi_nh_all()]);
        let mut arr = InvalidateArray::new(invalidate_data::VIOMMU_ARM_SMMUV3, 16, 1, &b);
        prop_assert_eq!(c.hwpt_invalidate(v, &mut arr), Ok(()));
        drop(page);
        drop(c);
        prop_assert_eq!(m.drv.stats().private_vmids, 0);
    }
}
