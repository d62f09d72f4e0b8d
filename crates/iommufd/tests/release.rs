//! Context release (iommufd.md §4.5): closing the last handle tears down every object in
//! dependency order, leaves nothing pinned and runs every driver destroy hook; files (fault
//! and vEVENTQ fds, mmap regions) keep the context alive until they are closed.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::thread;

use common::*;
use twinmmu_iommufd::mock::{self, *};
use twinmmu_iommufd::*;

/// Builds every kind of object on one context; returns what the checks need.
fn build_everything(env: &Env) -> (Arc<MockAccess>, Vec<Arc<dyn Viommu>>, FaultFd, VeventqFd) {
    let c = &env.ictx;
    let z = ObjectId(0);
    let ioas = env.ioas();
    let ioas2 = env.ioas();
    env.map_fixed(ioas, BUFFER, BUFFER_SIZE, MOCK_APERTURE_START)
        .unwrap();
    env.map_fixed(ioas2, BUFFER, BUFFER_SIZE, MOCK_APERTURE_START)
        .unwrap();
    c.ioas_copy(
        FIXED,
        ioas,
        ioas2,
        BUFFER_SIZE,
        MOCK_APERTURE_START + BUFFER_SIZE,
        MOCK_APERTURE_START,
    )
    .unwrap();
    let (d1, _) = env.mock_domain(ioas, 0).unwrap();
    let (d2, _) = env.mock_domain(ioas2, MOCK_FLAGS_DEVICE_PASID).unwrap();
    let parent = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            d1.dev_id,
            ioas,
            &mut none_data(),
            z,
        )
        .unwrap();
    let fault = c.fault_alloc(0).unwrap();
    let v = c
        .viommu_alloc(
            0,
            IOMMU_VIOMMU_TYPE_SELFTEST,
            d1.dev_id,
            parent,
            &mut none_data(),
        )
        .unwrap();
    let mut data = [0u8; 24];
    let vd = c
        .viommu_alloc(
            0,
            IOMMU_VIOMMU_TYPE_SELFTEST,
            d1.dev_id,
            parent,
            &mut UserData::new(IOMMU_VIOMMU_TYPE_SELFTEST, &mut data),
        )
        .unwrap();
    let mut b = selftest_data(0);
    let nested = c
        .hwpt_alloc(
            hwpt_flags::FAULT_ID_VALID,
            d1.dev_id,
            v,
            &mut sdata(&mut b),
            fault.id(),
        )
        .unwrap();
    let _vdev = c.vdevice_alloc(v, d1.dev_id, 0x42).unwrap();
    c.replace(d1.dev_id, NO_PASID, nested).unwrap();
    let q = c
        .veventq_alloc(0, v, IOMMU_VEVENTQ_TYPE_SELFTEST, 4)
        .unwrap();
    mock::trigger_vevent(c, d1.dev_id).unwrap();
    mock::trigger_iopf(c, d1.dev_id, 0, 1, fault::PERM_READ, 0).unwrap();
    let _q0 = c
        .hw_queue_alloc(
            0,
            v,
            IOMMU_HW_QUEUE_TYPE_SELFTEST,
            0,
            MOCK_APERTURE_START,
            PAGE_SIZE,
        )
        .unwrap();
    let _q1 = c
        .hw_queue_alloc(
            0,
            v,
            IOMMU_HW_QUEUE_TYPE_SELFTEST,
            1,
            MOCK_APERTURE_START + PAGE_SIZE,
            PAGE_SIZE,
        )
        .unwrap();
    let s2 = c
        .hwpt_alloc(hwpt_flags::PASID, d2.dev_id, ioas2, &mut none_data(), z)
        .unwrap();
    c.replace(d2.dev_id, NO_PASID, s2).unwrap();
    c.attach(d2.dev_id, 9, s2).unwrap();
    let a = MockAccess::create(c, ioas2, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
    a.pin_pages(0, MOCK_APERTURE_START, 4 * PAGE_SIZE).unwrap();
    let viommus = vec![c.viommu_ops(v).unwrap(), c.viommu_ops(vd).unwrap()];
    (a, viommus, fault, q)
}

#[test]
fn release_tears_down_everything_and_unpins() {
    let env = Env::new();
    let (access, viommus, fault, q) = build_everything(&env);
    assert!(env.user.total_pins() > 0);
    // The access holds a context handle, like the selftest's access fd: close it first.
    access.close().unwrap();
    drop(access);
    drop(fault);
    drop(q);
    let user = Arc::clone(&env.user);
    env.teardown();
    assert_eq!(user.total_pins(), 0);
    for v in viommus {
        let m = v.as_any().downcast_ref::<MockViommu>().unwrap();
        assert!(m.is_destroyed(), "driver destroy hook ran");
        assert_eq!(m.hw_queue(0), None);
        assert_eq!(m.hw_queue(1), None);
    }
}

#[test]
fn files_keep_the_context_alive() {
    let env = Env::new();
    let (access, viommus, fault, q) = build_everything(&env);
    access.close().unwrap();
    drop(access);
    let Env { ictx, user, .. } = env;
    drop(ictx);
    // The fault fd and the vEVENTQ fd still hold the context: nothing torn down yet.
    assert!(user.total_pins() > 0);
    let m = viommus[0].as_any().downcast_ref::<MockViommu>().unwrap();
    assert!(!m.is_destroyed());
    let mut buf = [0u8; 64];
    assert_eq!(q.read(&mut buf), Ok(12));
    assert_eq!(le32(&buf, 8), 0x42);
    assert_eq!(fault.read(&mut buf[..40]), Ok(40));
    drop(q);
    assert!(!m.is_destroyed());
    drop(fault);
    assert!(m.is_destroyed());
    assert_eq!(user.total_pins(), 0);
}

#[test]
fn mmap_region_keeps_the_context_alive() {
    let env = Env::new();
    let c = env.ictx.clone();
    let ioas = env.ioas();
    let (d, _) = env.mock_domain(ioas, 0).unwrap();
    let parent = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            d.dev_id,
            ioas,
            &mut none_data(),
            ObjectId(0),
        )
        .unwrap();
    let mut data = [0u8; 24];
    let v = c
        .viommu_alloc(
            0,
            IOMMU_VIOMMU_TYPE_SELFTEST,
            d.dev_id,
            parent,
            &mut UserData::new(IOMMU_VIOMMU_TYPE_SELFTEST, &mut data),
        )
        .unwrap();
    let region = c
        .mmap(le64(&data, 8), le64(&data, 16), true, false)
        .unwrap();
    let ops = c.viommu_ops(v).unwrap();
    drop(c);
    let Env { ictx, .. } = env;
    drop(ictx);
    let m = ops.as_any().downcast_ref::<MockViommu>().unwrap();
    assert!(!m.is_destroyed());
    drop(region);
    assert!(m.is_destroyed());
}

#[test]
fn events_reported_from_other_threads_are_all_accounted_for() {
    // Design invariant 4 (nothing lost): every report reaches the queue or the LOST_EVENTS
    // marker says so; the driver reports from its own threads while the context works.
    let env = Env::new();
    let c = &env.ictx;
    let ioas = env.ioas();
    let (d, _) = env.mock_domain(ioas, 0).unwrap();
    let (_, v) = env.selftest_viommu(d.dev_id, ioas);
    let mut b = selftest_data(0);
    let nested = c
        .hwpt_alloc(0, d.dev_id, v, &mut sdata(&mut b), ObjectId(0))
        .unwrap();
    c.vdevice_alloc(v, d.dev_id, 3).unwrap();
    c.replace(d.dev_id, NO_PASID, nested).unwrap();
    let q = c
        .veventq_alloc(0, v, IOMMU_VEVENTQ_TYPE_SELFTEST, 64)
        .unwrap();
    let dev = c.device_handle(d.dev_id).unwrap();
    let per_thread = 2000;
    let reporters: Vec<_> = (0..2)
        .map(|_| {
            let dev = Arc::clone(&dev);
            thread::spawn(move || {
                let m = dev.as_any().downcast_ref::<MockDevice>().unwrap();
                for _ in 0..per_thread {
                    m.trigger_vevent().unwrap();
                }
            })
        })
        .collect();
    // Meanwhile the context keeps working.
    for i in 0..200 {
        env.map_fixed(ioas, BUFFER, PAGE_SIZE, MOCK_APERTURE_START + i * PAGE_SIZE)
            .unwrap();
    }
    let mut got = 0u64;
    let mut lost_markers = 0u64;
    let mut last_seq: Option<u32> = None;
    let mut buf = vec![0u8; 12 * 32];
    let mut drain = |got: &mut u64, lost: &mut u64| loop {
        let n = q.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let mut at = 0;
        while at < n {
            let flags = le32(&buf, at);
            let seq = le32(&buf, at + 4);
            if let Some(p) = last_seq {
                assert!(seq > p, "sequence numbers increase: {p} then {seq}");
            }
            last_seq = Some(seq);
            if flags & veventq_type::FLAG_LOST_EVENTS != 0 {
                *lost += 1;
                at += 8;
            } else {
                assert_eq!(le32(&buf, at + 8), 3);
                *got += 1;
                at += 12;
            }
        }
    };
    for r in reporters {
        while !r.is_finished() {
            drain(&mut got, &mut lost_markers);
        }
        r.join().unwrap();
    }
    drain(&mut got, &mut lost_markers);
    // Every report took a sequence number, delivered or not, so a reader sees every loss as a
    // gap (or a LOST_EVENTS record) and the last number read is the last report's.
    let total = 2 * per_thread as u64;
    assert!(got <= total);
    assert_eq!(u64::from(last_seq.unwrap()), total - 1);
    if got == total {
        assert_eq!(lost_markers, 0);
    }
    env.unmap(ioas, 0, u64::MAX).unwrap();
    drop(q);
    c.replace(d.dev_id, NO_PASID, ioas).unwrap();
    env.teardown();
}

#[test]
fn driver_reports_device_events_with_the_virtual_id() {
    let env = Env::new();
    let c = &env.ictx;
    let ioas = env.ioas();
    let (d, _) = env.mock_domain(ioas, 0).unwrap();
    let (d2, _) = env.mock_domain(ioas, 0).unwrap();
    let (_, v) = env.selftest_viommu(d.dev_id, ioas);
    let ops = c.viommu_ops(v).unwrap();
    let core = ops
        .as_any()
        .downcast_ref::<MockViommu>()
        .unwrap()
        .core()
        .clone();
    let dev = c.device_handle(d.dev_id).unwrap();
    let dev2 = c.device_handle(d2.dev_id).unwrap();
    // No vEVENTQ of the type yet, and no vDEVICE yet.
    assert_eq!(
        core.report_device_event(&dev, 0x77, |_| vec![]),
        Err(Errno::ENOENT)
    );
    let vd = c.vdevice_alloc(v, d.dev_id, 0x0001_2345_6789).unwrap();
    assert_eq!(
        core.report_device_event(&dev, 0x77, |_| vec![]),
        Err(Errno::EOPNOTSUPP)
    );
    let q = c.veventq_alloc(0, v, 0x77, 8).unwrap();
    // From another thread, as a driver's event-queue reader would.
    let t = {
        let core = core.clone();
        let dev = Arc::clone(&dev);
        thread::spawn(move || {
            core.report_device_event(&dev, 0x77, |vsid| vsid.to_le_bytes().to_vec())
        })
    };
    t.join().unwrap().unwrap();
    assert_eq!(
        core.report_device_event(&dev2, 0x77, |_| vec![]),
        Err(Errno::ENOENT)
    );
    assert_eq!(
        core.find_device(0x0001_2345_6789)
            .map(|x| Arc::ptr_eq(&x, &dev)),
        Some(true)
    );
    let mut buf = [0u8; 32];
    assert_eq!(q.read(&mut buf), Ok(16));
    assert_eq!(le64(&buf, 8), 0x0001_2345_6789);
    drop(q);
    c.destroy(vd).unwrap();
    assert_eq!(
        core.virt_id_of(&dev),
        None,
        "the vDEVICE is gone from the driver's view too"
    );
    env.teardown();
}
