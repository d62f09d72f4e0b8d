//! Many threads on one driver at once: the VMM mapping and unmapping guest RAM, devices doing
//! DMA and faulting, the event-queue handler and guest invalidations through HWPT_INVALIDATE.
//! Checked after every unmap (no translation of the
//! unmapped range survives it, invariant 1 of the design) and at the end (nothing lost or
//! leaked, the context closes). A lock-order mistake shows as a hang. `TWINMMU_LONG=1` runs
//! longer.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{DmaError, SmmuConfig};
use twinmmu_iommufd::*;

fn rounds() -> u64 {
    if std::env::var_os("TWINMMU_LONG").is_some() {
        5000
    } else {
        300
    }
}

#[test]
fn concurrent_vmm_devices_events_and_guest_queues() {
    let m = Arc::new(Machine::new(
        SmmuConfig::default(),
        Options {
            cmdqv: Some(CmdqvConfig::default()),
            ..Options::default()
        },
    ));
    let vm = vm(&kvm16());
    let mut n = Nested::new(&m, 0x60, 6, Some(KvmRef::new(Arc::clone(&vm))));
    // The guest maps its VA window 1:1 onto IPAs [0x80_0000, 0xa0_0000), one 2 MiB area.
    let base_ipa = 0x80_0000;
    for p in 0..16u64 {
        n.guest
            .map(0x4000_0000 + p * 0x1000, base_ipa + p * 0x1000, 0x1000);
    }
    let q = n
        .ictx
        .veventq_alloc(0, n.viommu, veventq_type::ARM_SMMUV3, 16)
        .unwrap();
    // A second device on a plain stage-1 domain of another IOAS, mapped and unmapped by the
    // VMM thread.
    let dev2 = m.master(0x61);
    let d2 = n
        .ictx
        .bind_device(Arc::clone(&dev2) as Arc<dyn IommuDevice>, None)
        .unwrap();
    let ioas2 = n.ictx.ioas_alloc(0).unwrap();
    n.ictx.attach(d2, NO_PASID, ioas2).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Devices: DMA through both streams, errors are fine (faults), panics are not.
    for sid in [0x60u32, 0x61] {
        let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let va = if sid == 0x60 {
                    0x4000_0000 + (i % 20) * 0x1000
                } else {
                    0x1000_0000 + (i % 8) * 0x1000
                };
                let _ = m.smmu.dma_write(sid, None, va, &i.to_le_bytes(), false);
                i += 1;
            }
        }));
    }
    // The event-queue interrupt handler.
    {
        let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                m.drv.process_events();
                std::thread::yield_now();
            }
        }));
    }
    // The guest's trapped invalidations.
    {
        let (c, viommu, stop) = (n.ictx.clone(), n.viommu, Arc::clone(&stop));
        let asid = n.guest.asid;
        threads.push(std::thread::spawn(move || {
            let b = cmd_bytes(&[gcmd::tlbi_nh_asid(asid), gcmd::cfgi_cd(6)]);
            while !stop.load(Ordering::Relaxed) {
                let mut arr = InvalidateArray::new(invalidate_data::VIOMMU_ARM_SMMUV3, 16, 2, &b);
                c.hwpt_invalidate(viommu, &mut arr).unwrap();
            }
        }));
    }
    // The VMM: map / DMA / unmap on the second IOAS, checking nothing survives the unmap.
    for r in 0..rounds() {
        let iova = 0x1000_0000;
        n.ictx
            .ioas_map(
                FIXED,
                ioas2,
                m.src(0x100_0000 + (r % 4) * 0x8000),
                0x8000,
                iova,
            )
            .unwrap();
        assert_eq!(n.ictx.ioas_unmap(ioas2, iova, 0x8000), Ok(0x8000));
        for p in 0..8 {
            let res = m
                .smmu
                .dma_write(0x61, None, iova + p * 0x1000, b"late", false);
            assert!(
                matches!(res, Err(DmaError::Fault { .. })),
                "round {r}: translation survived the unmap: {res:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    m.drv.process_events();
    let s = m.drv.stats();
    assert!(s.events > 0 && s.cmd_errors == 0, "{s:?}");
    n.ictx.detach(d2, NO_PASID);
    n.ictx.unbind_device(d2).unwrap();
    // Everything still works.
    n.guest.map(0x5000_0000, 0x90_0000, 0x1000);
    dma_write(&m, 0x60, 0x5000_0000, b"end").unwrap();
    assert_eq!(m.read(m.hpa(0x90_0000), 3), b"end");
    // The vEVENTQ fd keeps the context open; closing both releases everything.
    drop(q);
    drop(n);
    assert_eq!(vm.vmid_pin_count(), 0);
    assert_eq!(m.guest.total_pins(), 0);
}
