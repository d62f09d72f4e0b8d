//! Events from the SMMU's event queue: forwarded to the owning vIOMMU's vEVENTQ with the
//! virtual StreamID (the types iommufd forwards), host stage-2 faults kept by the host, vEVENTQ
//! overflow (LOST_EVENTS) with real SMMU events, event-queue overflow acknowledged, and stalls
//! turned into page requests answered with CMD_RESUME.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use twinmmu_arm_smmu_v3::defs::{evt, get};
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{DmaError, PhysMem, SmmuConfig, StallResult};
use twinmmu_iommufd::*;

const VA: u64 = 0x5500_0000;

fn read_vevents(q: &VeventqFd) -> Vec<(u32, u32, Vec<u8>)> {
    let mut buf = vec![0u8; 1 << 16];
    let n = q.read(&mut buf).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at < n {
        let flags = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
        let seq = u32::from_le_bytes(buf[at + 4..at + 8].try_into().unwrap());
        at += VEVENT_HEADER_SIZE;
        if flags & veventq_type::FLAG_LOST_EVENTS != 0 {
            out.push((flags, seq, Vec::new()));
            continue;
        }
        out.push((flags, seq, buf[at..at + VEVENT_ARM_SMMUV3_SIZE].to_vec()));
        at += VEVENT_ARM_SMMUV3_SIZE;
    }
    out
}

fn le64(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())
}

fn nested(m: &Machine, sid: u32, vsid: u32) -> Nested {
    Nested::new(m, sid, vsid, Some(KvmRef::new(vm(&kvm16()))))
}

#[test]
fn stage1_faults_reach_the_veventq_with_the_virtual_sid() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let n = nested(&m, 0x1234, 0x56);
    let q = n
        .ictx
        .veventq_alloc(0, n.viommu, veventq_type::ARM_SMMUV3, 8)
        .unwrap();
    // Unmapped VA: F_TRANSLATION at stage 1 (the guest's CD records faults).
    assert!(dma_write(&m, 0x1234, VA + 0x48, b"x").is_err());
    assert_eq!(m.drv.process_events(), 1);
    let ev = read_vevents(&q);
    assert_eq!(ev.len(), 1);
    let rec = &ev[0].2;
    assert_eq!(get(evt::ID, le64(rec, 0)), evt::ID_TRANSLATION);
    assert_eq!(
        get(evt::SID, le64(rec, 0)),
        0x56,
        "vSID, not the physical 0x1234"
    );
    assert_eq!(le64(rec, 1) & evt::S2, 0);
    assert_eq!(le64(rec, 1) & evt::RNW, 0, "a write");
    assert_eq!(le64(rec, 2), VA + 0x48, "input address");

    // A broken guest CD (V = 0) after CFGI_CD: C_BAD_CD, forwarded too.
    for i in 0..8 {
        m.mem
            .write_u64(GUEST_BASE + n.guest.cd_ipa + 8 * i, 0)
            .unwrap();
    }
    assert_eq!(n.invalidate(&[gcmd::cfgi_cd(0x56)]), (Ok(()), 1));
    assert!(dma_write(&m, 0x1234, VA, b"x").is_err());
    m.drv.process_events();
    let ev = read_vevents(&q);
    assert_eq!(ev.len(), 1);
    assert_eq!(get(evt::ID, le64(&ev[0].2, 0)), evt::ID_BAD_CD);
    assert_eq!(get(evt::SID, le64(&ev[0].2, 0)), 0x56);
    // Sequence numbers increase.
    assert_eq!(ev[0].1, 1);
}

#[test]
fn guest_abort_ste_and_non_forwarded_events_stay_with_the_host() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let n = nested(&m, 0x10, 0x1);
    let q = n
        .ictx
        .veventq_alloc(0, n.viommu, veventq_type::ARM_SMMUV3, 8)
        .unwrap();
    // A guest "V = 0" STE becomes a physical abort STE: aborted, no event at all.
    let mut data = vste_bytes([0, 0]);
    let abort = n
        .ictx
        .hwpt_alloc(
            0,
            n.dev_id,
            n.viommu,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut data),
            ObjectId(0),
        )
        .unwrap();
    n.ictx.replace(n.dev_id, NO_PASID, abort).unwrap();
    assert_eq!(dma_write(&m, 0x10, VA, b"x"), Err(DmaError::Abort));
    assert_eq!(m.drv.process_events(), 0);
    assert!(read_vevents(&q).is_empty());
    // A device with a plain S1 domain (no vIOMMU): its faults stay with the host.
    let dev = m.master(0x11);
    let d = n
        .ictx
        .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, None)
        .unwrap();
    let ioas = n.ictx.ioas_alloc(0).unwrap();
    n.ictx.attach(d, NO_PASID, ioas).unwrap();
    assert!(dma_write(&m, 0x11, VA, b"x").is_err());
    assert_eq!(m.drv.process_events(), 1);
    assert!(read_vevents(&q).is_empty());
    assert_eq!(m.drv.stats().events_forwarded, 0);
}

#[test]
fn veventq_overflow_reports_lost_events_with_real_smmu_events() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let n = nested(&m, 0x20, 0x7);
    let q = n
        .ictx
        .veventq_alloc(0, n.viommu, veventq_type::ARM_SMMUV3, 2)
        .unwrap();
    for i in 0..5u64 {
        assert!(dma_write(&m, 0x20, VA + i * 0x1000, b"x").is_err());
    }
    assert_eq!(m.drv.process_events(), 5);
    let ev = read_vevents(&q);
    // Two events, then the LOST_EVENTS marker (with its own sequence number).
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[0].0, 0);
    assert_eq!(le64(&ev[0].2, 2), VA);
    assert_eq!(le64(&ev[1].2, 2), VA + 0x1000);
    assert_eq!(ev[2].0, veventq_type::FLAG_LOST_EVENTS);
    assert_eq!((ev[0].1, ev[1].1, ev[2].1), (0, 1, 4));
    // After reading, new events flow again.
    assert!(dma_write(&m, 0x20, VA + 0x9000, b"x").is_err());
    m.drv.process_events();
    let ev = read_vevents(&q);
    assert_eq!(ev.len(), 1);
    assert_eq!(le64(&ev[0].2, 2), VA + 0x9000);
}

#[test]
fn smmu_event_queue_overflow_is_acknowledged() {
    let m = Machine::new(
        SmmuConfig::default(),
        Options {
            evtq_max_log2: 2,
            ..Options::default()
        },
    );
    let n = nested(&m, 0x30, 0x3);
    let q = n
        .ictx
        .veventq_alloc(0, n.viommu, veventq_type::ARM_SMMUV3, 64)
        .unwrap();
    // Four slots; the fifth and sixth faults find the queue full.
    for i in 0..6u64 {
        let _ = dma_write(&m, 0x30, VA + i * 0x1000, b"x");
    }
    assert_eq!(m.drv.process_events(), 4);
    assert_eq!(m.drv.stats().event_overflows, 1);
    assert_eq!(read_vevents(&q).len(), 4);
    // Acknowledged: later events are recorded again.
    let _ = dma_write(&m, 0x30, VA + 0x7000, b"x");
    assert_eq!(m.drv.process_events(), 1);
    assert_eq!(m.drv.stats().event_overflows, 1);
}

#[test]
fn stall_becomes_a_page_request_and_the_response_resumes() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let dev = m
        .drv
        .add_master(
            0x40,
            MasterOptions {
                stall: true,
                ..MasterOptions::default()
            },
        )
        .unwrap();
    let c = Iommufd::new();
    let d = c
        .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, None)
        .unwrap();
    let ioas = c.ioas_alloc(0).unwrap();
    let fault = c.fault_alloc(0).unwrap();
    let hwpt = c
        .hwpt_alloc(
            hwpt_flags::FAULT_ID_VALID,
            d,
            ioas,
            &mut none_data(),
            fault.id(),
        )
        .unwrap();
    c.attach(d, NO_PASID, hwpt).unwrap();
    // A write to an unmapped IOVA stalls.
    let stag = match dma_write(&m, 0x40, 0x10_0000, b"late") {
        Err(DmaError::Stalled { stag, .. }) => stag,
        other => panic!("expected a stall, got {other:?}"),
    };
    assert_eq!(m.drv.process_events(), 1);
    let mut rec = [0u8; fault::RECORD_SIZE];
    assert_eq!(fault.read(&mut rec).unwrap(), fault::RECORD_SIZE);
    let grpid = u32::from_le_bytes(rec[12..16].try_into().unwrap());
    let perm = u32::from_le_bytes(rec[16..20].try_into().unwrap());
    let addr = u64::from_le_bytes(rec[24..32].try_into().unwrap());
    let cookie = u32::from_le_bytes(rec[36..40].try_into().unwrap());
    assert_eq!(grpid, u32::from(stag));
    assert_eq!(perm & fault::PERM_WRITE, fault::PERM_WRITE);
    assert_eq!(addr, 0x10_0000);
    // The VMM maps the page, then answers SUCCESS: CMD_RESUME retries the write.
    c.ioas_map(FIXED, ioas, m.src(0x90_0000), 0x1000, 0x10_0000)
        .unwrap();
    let mut resp = cookie.to_le_bytes().to_vec();
    resp.extend_from_slice(&fault::RESP_SUCCESS.to_le_bytes());
    assert_eq!(fault.write(&resp), Ok(8));
    assert_eq!(m.smmu.stall_result(0x40, stag), Some(StallResult::Written));
    assert_eq!(m.read(m.hpa(0x90_0000), 4), b"late");
}
