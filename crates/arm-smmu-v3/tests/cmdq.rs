//! The command queue's error recovery (smmu_kvm.md §4.8, `arm_smmu_cmdq_skip_err`) and the
//! PRI queue's page requests to the FAULT path, answered with CMD_PRI_RESP.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use twinmmu_arm_smmu_v3::defs::{cmd, get};
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{AtcResponse, AtsEndpoint, SmmuConfig};
use twinmmu_iommufd::*;

fn traced(cfg: SmmuConfig) -> Machine {
    Machine::new(
        cfg,
        Options {
            trace: true,
            ..Options::default()
        },
    )
}

#[test]
fn cerror_ill_is_skipped_as_a_sync_and_the_queue_goes_on() {
    for msi in [true, false] {
        let m = traced(SmmuConfig {
            msi,
            ..SmmuConfig::default()
        });
        m.drv.take_trace();
        // An unknown opcode between two good commands.
        let good = [cmd::OP_TLBI_NSNH_ALL, 0];
        m.drv.issue_commands(&[good, [0xff, 0], good]).unwrap();
        let t = m.drv.take_trace();
        assert!(
            t.contains(&TraceEvent::CmdError {
                code: twinmmu_arm_smmu_v3::defs::q::CERROR_ILL as u8
            }),
            "{t:?}"
        );
        assert_eq!(t.last(), Some(&TraceEvent::SyncDone));
        assert_eq!(m.drv.stats().cmd_errors, 1);
        // GERROR acknowledged, CONS caught up with PROD.
        assert_eq!((m.r32(0x60) ^ m.r32(0x64)) & 1, 0);
        assert_eq!(m.r32(0x9c) & 0xfffff, m.r32(0x98));
        // The queue keeps working.
        m.drv.issue_commands(&[good]).unwrap();
        assert_eq!(m.drv.stats().cmd_errors, 1);
    }
}

/// A device ATC whose first invalidation never completes.
struct FlakyAtc(AtomicU32);

impl AtsEndpoint for FlakyAtc {
    fn invalidate(&self, _ssid: Option<u32>, _addr: u64, _size: u8) -> AtcResponse {
        if self.0.fetch_add(1, Ordering::Relaxed) == 0 {
            AtcResponse::Timeout
        } else {
            AtcResponse::Completed
        }
    }
}

#[test]
fn cerror_atc_inv_sync_is_acknowledged_and_the_sync_retried() {
    let m = traced(SmmuConfig {
        ats: true,
        ..SmmuConfig::default()
    });
    let atc = Arc::new(FlakyAtc(AtomicU32::new(0)));
    m.smmu
        .attach_ats_endpoint(9, Arc::clone(&atc) as Arc<dyn AtsEndpoint>);
    m.drv.take_trace();
    let atc_inv = [
        cmd::OP_ATC_INV | (9u64 << 32),
        twinmmu_arm_smmu_v3::defs::prep(cmd::ATC_1_SIZE, cmd::ATC_INV_SIZE_ALL),
    ];
    m.drv.issue_commands(&[atc_inv]).unwrap();
    let t = m.drv.take_trace();
    assert!(t.contains(&TraceEvent::CmdError {
        code: twinmmu_arm_smmu_v3::defs::q::CERROR_ATC_INV_SYNC as u8
    }));
    assert_eq!(t.last(), Some(&TraceEvent::SyncDone));
    // Only the ATC_INV and one SYNC were written: the SYNC itself was retried in place.
    let written = t.iter().filter(|e| matches!(e, TraceEvent::Cmd(_))).count();
    assert_eq!(written, 2);
}

#[test]
fn queue_wraps_many_times() {
    let m = traced(SmmuConfig::default());
    // 4096 commands through a 1024-entry queue, in one list: chunks wait for space.
    let cmds: Vec<[u64; 2]> = (0..4096u64)
        .map(|i| {
            [
                cmd::OP_TLBI_NH_ASID | (1u64 << 32) | ((i & 0xffff) << 48),
                0,
            ]
        })
        .collect();
    m.drv.take_trace();
    m.drv.issue_commands(&cmds).unwrap();
    let t = m.drv.take_trace();
    let n = t.iter().filter(|e| matches!(e, TraceEvent::Cmd(_))).count();
    assert_eq!(n, 4097);
    let ops: Vec<u64> = t
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Cmd(c) => Some(get(cmd::OP, c[0])),
            _ => None,
        })
        .collect();
    assert_eq!(*ops.last().unwrap(), cmd::OP_SYNC);
}

#[test]
fn pri_page_requests_reach_the_fault_queue_and_are_answered() {
    let m = traced(SmmuConfig {
        ats: true,
        pri: true,
        ..SmmuConfig::default()
    });
    let dev = m.drv.add_master(0x21, MasterOptions::default()).unwrap();
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
    // Two requests of group 5, the second the last of its group.
    assert!(
        m.smmu
            .page_request(0x21, None, 0x7000, 5, false, true, false, false, false)
    );
    assert!(
        m.smmu
            .page_request(0x21, None, 0x8000, 5, true, true, true, false, false)
    );
    assert_eq!(m.drv.process_priq(), 2);
    let mut rec = [0u8; 2 * fault::RECORD_SIZE];
    assert_eq!(fault.read(&mut rec).unwrap(), 2 * fault::RECORD_SIZE);
    let le32 = |at: usize| u32::from_le_bytes(rec[at..at + 4].try_into().unwrap());
    assert_eq!(le32(12), 5, "grpid = PRG index");
    assert_eq!(le32(16), fault::PERM_READ);
    assert_eq!(le32(40), fault::FLAG_LAST_PAGE);
    assert_eq!(le32(40 + 16), fault::PERM_READ | fault::PERM_WRITE);
    let cookie = le32(40 + 36);
    m.drv.take_trace();
    let mut resp = cookie.to_le_bytes().to_vec();
    resp.extend_from_slice(&fault::RESP_SUCCESS.to_le_bytes());
    assert_eq!(fault.write(&resp), Ok(8));
    let pri: Vec<[u64; 2]> = m
        .drv
        .take_trace()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Cmd(c) if get(cmd::OP, c[0]) == cmd::OP_PRI_RESP => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(pri.len(), 1);
    assert_eq!(get(cmd::SID, pri[0][0]), 0x21);
    assert_eq!(get(cmd::PRI_1_GRPID, pri[0][1]), 5);
    assert_eq!(get(cmd::PRI_1_RESP, pri[0][1]), cmd::PRI_RESP_SUCC);
    // A request from a StreamID nobody owns is denied at once.
    m.smmu
        .page_request(0x99, None, 0x1000, 7, true, true, false, false, false);
    assert_eq!(m.drv.process_priq(), 1);
    let deny = m.drv.take_trace().into_iter().any(|e| {
        matches!(e, TraceEvent::Cmd(c) if get(cmd::OP, c[0]) == cmd::OP_PRI_RESP
            && get(cmd::PRI_1_RESP, c[1]) == cmd::PRI_RESP_DENY)
    });
    assert!(deny);
}

/// A device ATC that records what it is told.
#[derive(Default)]
struct Atc(parking_lot::Mutex<Vec<(Option<u32>, u64, u8)>>);

impl AtsEndpoint for Atc {
    fn invalidate(&self, ssid: Option<u32>, addr: u64, size: u8) -> AtcResponse {
        self.0.lock().push((ssid, addr, size));
        AtcResponse::Completed
    }
}

#[test]
fn ats_masters_get_atc_invalidations_on_unmap() {
    let m = traced(SmmuConfig {
        ats: true,
        btm: false,
        ..SmmuConfig::default()
    });
    let dev = m
        .drv
        .add_master(
            0x31,
            MasterOptions {
                ats: true,
                ..MasterOptions::default()
            },
        )
        .unwrap();
    let atc = Arc::new(Atc::default());
    m.smmu
        .attach_ats_endpoint(0x31, Arc::clone(&atc) as Arc<dyn AtsEndpoint>);
    let c = Iommufd::new();
    let d = c
        .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, None)
        .unwrap();
    let ioas = c.ioas_alloc(0).unwrap();
    let s2 = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            d,
            ioas,
            &mut none_data(),
            ObjectId(0),
        )
        .unwrap();
    c.attach(d, NO_PASID, s2).unwrap();
    // EATS = full ATS in the STE.
    let ste = dev.ste().unwrap();
    assert_eq!(get(twinmmu_arm_smmu_v3::defs::ste::EATS, ste[1]), 1);
    c.ioas_map(FIXED, ioas, m.src(0), 0x2000, 0x10_0000)
        .unwrap();
    assert!(atc.0.lock().is_empty());
    c.ioas_unmap(ioas, 0x10_0000, 0x2000).unwrap();
    assert_eq!(
        atc.0.lock().as_slice(),
        &[(None, 0, 52)],
        "whole-ATC invalidation"
    );
    // A guest STE without EATS: ATS off in the physical STE, no ATC invalidation.
    let v = c
        .viommu_alloc(0, viommu_type::ARM_SMMUV3, d, s2, &mut none_data())
        .unwrap();
    c.vdevice_alloc(v, d, 1).unwrap();
    let mut data = vste_bytes([1 | (4 << 1), 0]);
    let n = c
        .hwpt_alloc(
            0,
            d,
            v,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut data),
            ObjectId(0),
        )
        .unwrap();
    c.replace(d, NO_PASID, n).unwrap();
    assert_eq!(
        get(twinmmu_arm_smmu_v3::defs::ste::EATS, dev.ste().unwrap()[1]),
        0
    );
    c.ioas_map(FIXED, ioas, m.src(0), 0x2000, 0x10_0000)
        .unwrap();
    c.ioas_unmap(ioas, 0x10_0000, 0x2000).unwrap();
    assert_eq!(atc.0.lock().len(), 1);
}
