//! The driver against the model, bit for bit: what probe leaves in the registers (CR0, CR2
//! with PTM cleared only for BTM, the stream table format, GBPA), unattached streams, every
//! STE the driver installs decoded by the `hw` crate's own STE checker, and every command the
//! driver issues decoded by the `hw` command decoder (legal, and the TLBI ranges covering
//! what was unmapped — a differential test of the range encoding under proptest).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::cmd::{CmdqEntry, Command, decode};
use twinmmu_hw::ste::{S1Dss, Ste, StreamConfig, StreamWorld, decode_ste};
use twinmmu_hw::{DmaError, SmmuConfig};
use twinmmu_iommufd::*;

fn reg(m: &Machine, off: u64) -> u32 {
    m.r32(off)
}

#[test]
fn probe_leaves_the_smmu_enabled_with_linux_settings() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    // CR0 = SMMUEN | EVENTQEN | CMDQEN, acknowledged.
    assert_eq!(reg(&m, 0x20), 0b1101);
    assert_eq!(reg(&m, 0x24), 0b1101);
    // CR2: RECINVSID, E2H (VHE host, IDR0.HYP), PTM clear (BTM in use).
    assert_eq!(reg(&m, 0x2c), (1 << 1) | (1 << 0));
    // CR1: tables and queues inner-shareable write-back.
    assert_eq!(reg(&m, 0x28), 0b11_01_01_11_01_01);
    // Two-level stream table, SPLIT 8, 16 StreamID bits.
    assert_eq!(reg(&m, 0x88), (1 << 16) | (8 << 6) | 16);
    // GBPA.ABORT: nothing bypasses while the SMMU is disabled.
    assert_ne!(reg(&m, 0x44) & (1 << 20), 0);
    // IRQ_CTRL: GERROR and EVTQ interrupts.
    assert_eq!(reg(&m, 0x50), 0b101);
    assert!(m.drv.btm_enabled());
    assert!(m.drv.features().e2h);
}

#[test]
fn ptm_is_cleared_only_when_btm_can_be_used() {
    // (IDR0.BTM, IDR0.HYP, VHE host, enable_btm) → BTM used.
    let cases = [
        (true, true, true, true, true),
        (true, false, true, true, false),
        (true, false, false, true, true),
        (false, true, true, true, false),
        (true, true, true, false, false),
    ];
    for (btm, hyp, vhe, enable, used) in cases {
        let m = Machine::new(
            SmmuConfig {
                btm,
                hyp,
                ..SmmuConfig::default()
            },
            Options {
                host_vhe: vhe,
                enable_btm: enable,
                ..Options::default()
            },
        );
        assert_eq!(m.drv.btm_enabled(), used, "{btm} {hyp} {vhe} {enable}");
        assert_eq!(reg(&m, 0x2c) & (1 << 2) == 0, used, "CR2.PTM");
        assert_eq!(reg(&m, 0x2c) & 1 != 0, hyp && vhe, "CR2.E2H");
    }
}

#[test]
fn linear_stream_table_pri_and_ats() {
    let m = Machine::new(
        SmmuConfig {
            st_level_2lvl: false,
            sidsize: 8,
            ats: true,
            pri: true,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    assert_eq!(reg(&m, 0x88), 8, "linear, LOG2SIZE = SIDSIZE");
    assert_eq!(reg(&m, 0x20), 0b11111, "PRIQEN and ATSCHK too");
    assert_eq!(reg(&m, 0x50), 0b111);
    // A StreamID beyond SIDSIZE has no STE.
    assert_eq!(
        m.drv.add_master(256, MasterOptions::default()).err(),
        Some(Errno::ERANGE)
    );
    let a = m.master(7);
    assert_eq!(
        m.drv.add_master(7, MasterOptions::default()).err(),
        Some(Errno::EEXIST)
    );
    drop(a);
    m.master(7);
}

#[test]
fn unattached_streams_abort_or_bypass() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let _d = m.master(5);
    assert_eq!(dma_write(&m, 5, 0x1000, b"x"), Err(DmaError::Abort));
    assert_eq!(m.drv.process_events(), 0, "abort STE: no event");
    let m = Machine::new(
        SmmuConfig::default(),
        Options {
            disable_bypass: false,
            ..Options::default()
        },
    );
    let _d = m.master(5);
    let pa = m.hpa(0x1000);
    dma_write(&m, 5, pa, b"bypass").unwrap();
    assert_eq!(m.read(pa, 6), b"bypass");
}

#[test]
fn installed_stes_pass_the_models_ste_checks() {
    let m = Machine::new(
        SmmuConfig {
            btm: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    let cfg = m.smmu.config().clone();
    let c = Iommufd::new();
    let dev = m.master(0x42);
    let d = c
        .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, None)
        .unwrap();
    let ioas = c.ioas_alloc(0).unwrap();
    let decoded = |dev: &Master| decode_ste(&Ste::from_dwords(dev.ste().unwrap()), &cfg).unwrap();
    assert_eq!(decoded(&dev), StreamConfig::Abort);
    // Stage-1 DMA domain: CD table, NS-EL1 or EL2(-E2H) world per FEAT_E2H.
    let s1 = c.attach(d, NO_PASID, ioas).unwrap();
    match decoded(&dev) {
        StreamConfig::Translate {
            s1: Some(s1c),
            s2: None,
            ..
        } => {
            assert_eq!(s1c.cdmax, 0);
            assert_eq!(s1c.dss, S1Dss::Substream0);
            assert!(s1c.stalld, "no stall for a device that cannot");
            // STRW = EL2; CR2.E2H (set by probe) makes it the EL2-E2H world.
            assert_eq!(s1c.world, StreamWorld::El2);
        }
        other => panic!("{other:?}"),
    }
    // Stage 2 (a nesting parent attached directly): own VMID, the domain's table.
    let s2 = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            d,
            ioas,
            &mut none_data(),
            ObjectId(0),
        )
        .unwrap();
    c.replace(d, NO_PASID, s2).unwrap();
    let ttb = c
        .paging_domain(s2)
        .unwrap()
        .as_any()
        .downcast_ref::<S2Domain>()
        .unwrap()
        .ttb();
    match decoded(&dev) {
        StreamConfig::Translate {
            s1: None,
            s2: Some(s2c),
            vmid,
            ..
        } => {
            assert_ne!(vmid, 0);
            assert_eq!(s2c.vmid, vmid);
            assert_eq!(s2c.walk.ttb(), ttb);
            assert_eq!(s2c.ia_bits(), 48);
            assert!(s2c.record && s2c.ptw);
        }
        other => panic!("{other:?}"),
    }
    // Nested: both stages, the guest's CD pointer (an IPA), the vIOMMU's VMID.
    let v = c
        .viommu_alloc(0, viommu_type::ARM_SMMUV3, d, s2, &mut none_data())
        .unwrap();
    c.vdevice_alloc(v, d, 3).unwrap();
    let mut data = vste_bytes([1 | (5 << 1) | 0x7_7000, 0]);
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
    let vmid = c
        .viommu_ops(v)
        .unwrap()
        .as_any()
        .downcast_ref::<VSmmu>()
        .unwrap()
        .vmid();
    match decoded(&dev) {
        StreamConfig::Translate {
            s1: Some(s1c),
            s2: Some(s2c),
            vmid: v2,
            mev,
            ..
        } => {
            assert_eq!(s1c.context_ptr, 0x7_7000);
            assert_eq!(s1c.world, StreamWorld::NsEl1);
            assert_eq!(v2, vmid);
            assert_eq!(s2c.walk.ttb(), ttb);
            assert!(mev);
        }
        other => panic!("{other:?}"),
    }
    let _ = s1;
}

/// The commands a workload made the driver issue, from its trace.
fn issued(m: &Machine) -> Vec<[u64; 2]> {
    m.drv
        .take_trace()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Cmd(c) => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_issued_command_is_legal_for_the_model() {
    for (ril, msi, vhe) in [(true, true, true), (false, false, false)] {
        let m = Machine::new(
            SmmuConfig {
                ril,
                msi,
                ..SmmuConfig::default()
            },
            Options {
                trace: true,
                host_vhe: vhe,
                ..Options::default()
            },
        );
        let cfg = m.smmu.config().clone();
        {
            let mut n = Nested::new(&m, 0x10, 1, Some(KvmRef::new(vm(&kvm16()))));
            n.guest.map(0x4000, 0x10_0000, 0x1000);
            dma_write(&m, 0x10, 0x4000, b"x").unwrap();
            let r = n.invalidate(&[gcmd::tlbi_nh_va(n.guest.asid, 0x4000), gcmd::cfgi_cd(1)]);
            assert_eq!(r, (Ok(()), 2));
            n.ictx.ioas_unmap(n.ioas, 0, AREA).unwrap();
            let d = m.master(0x11);
            let id = n
                .ictx
                .bind_device(Arc::clone(&d) as Arc<dyn IommuDevice>, None)
                .unwrap();
            let ioas2 = n.ictx.ioas_alloc(0).unwrap();
            n.ictx.attach(id, NO_PASID, ioas2).unwrap();
            n.ictx
                .ioas_map(FIXED, ioas2, m.src(0), 0x40_0000, 0x1000_0000)
                .unwrap();
            n.ictx.ioas_unmap(ioas2, 0x1000_0000, 0x40_0000).unwrap();
        }
        let cmds = issued(&m);
        assert!(cmds.len() > 20);
        for c in cmds {
            let d = decode(CmdqEntry(c), &cfg);
            assert!(d.is_ok(), "{c:#x?} is {d:?}");
        }
    }
}

/// Spans `[start, end)` of the stage-2 TLBIs of `vmid` among `cmds`, and whether a
/// whole-VMID invalidation was issued.
fn s2_spans(cmds: &[[u64; 2]], cfg: &SmmuConfig, vmid: u16) -> (Vec<(u64, u64)>, bool) {
    let mut spans = Vec::new();
    let mut all = false;
    for c in cmds {
        match decode(CmdqEntry(*c), cfg).unwrap() {
            Command::TlbiS2Ipa { vmid: v, addr } if v == vmid => {
                let (s, e) = addr.span();
                // A non-range command covers the entries containing the address: one page.
                let e = if addr.range.is_none() { s + 0x1000 } else { e };
                spans.push((s, e));
            }
            Command::TlbiS12Vmall { vmid: v } if v == vmid => all = true,
            _ => {}
        }
    }
    (spans, all)
}

fn covered(spans: &[(u64, u64)], start: u64, end: u64) -> bool {
    let mut s = spans.to_vec();
    s.sort_unstable();
    let mut at = start;
    for (a, b) in s {
        if a <= at && b > at {
            at = b;
        }
        if at >= end {
            return true;
        }
    }
    at >= end
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Unmapping any run of pages invalidates (at least) all of it for the domain's VMID:
    /// with RIL as NUM/SCALE ranges, without as one command per page (or the whole VMID
    /// past 512 pages), followed by TLBI_NH_ALL for a nesting parent.
    #[test]
    fn unmap_invalidation_covers_the_range(
        ril in any::<bool>(),
        start_page in 0u64..2048,
        npages in 1u64..1200,
    ) {
        let m = Machine::new(
            SmmuConfig { ril, btm: false, ..SmmuConfig::default() },
            Options { trace: true, ..Options::default() },
        );
        let cfg = m.smmu.config().clone();
        let c = Iommufd::new();
        let dev = m.master(1);
        let d = c.bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, None).unwrap();
        let ioas = c.ioas_alloc(0).unwrap();
        let s2 = c
            .hwpt_alloc(hwpt_flags::NEST_PARENT, d, ioas, &mut none_data(), ObjectId(0))
            .unwrap();
        c.attach(d, NO_PASID, s2).unwrap();
        let vmid = twinmmu_arm_smmu_v3::defs::get(
            twinmmu_arm_smmu_v3::defs::ste::S2VMID,
            dev.ste().unwrap()[2],
        ) as u16;
        let iova = 0x4000_0000 + start_page * 0x1000;
        let len = npages * 0x1000;
        c.ioas_map(FIXED, ioas, m.src(start_page * 0x1000), len, iova).unwrap();
        m.drv.take_trace();
        c.ioas_unmap(ioas, iova, len).unwrap();
        let cmds = issued(&m);
        let (spans, all) = s2_spans(&cmds, &cfg, vmid);
        prop_assert!(all || covered(&spans, iova, iova + len), "{spans:#x?}");
        if ril {
            prop_assert!(!all, "range commands never need the whole VMID");
            prop_assert!(spans.len() <= 2 * 13, "O(log) range commands, got {}", spans.len());
        }
        // The stage-1 follow-up of a nesting parent.
        let nh_all = cmds.iter().any(|c| matches!(
            decode(CmdqEntry(*c), &cfg).unwrap(),
            Command::TlbiNhAll { vmid: v } if v == vmid
        ));
        prop_assert!(nh_all || all);
    }
}

#[test]
fn impossible_cmdqv_shapes_are_refused_at_probe() {
    for (q, v) in [(0, 4), (33, 4), (2, 1), (2, 65)] {
        let r = Machine::try_new(
            SmmuConfig::default(),
            Options {
                cmdqv: Some(CmdqvConfig {
                    num_vintfs: v,
                    lvcmdqs_per_vintf: q,
                    sids_per_vintf: 16,
                }),
                ..Options::default()
            },
        );
        assert!(matches!(r, Err(ProbeError::Cmdqv(_))), "{q} {v}");
    }
    let full = Machine::try_new(
        SmmuConfig::default(),
        Options {
            cmdqv: Some(CmdqvConfig {
                lvcmdqs_per_vintf: 32,
                ..CmdqvConfig::default()
            }),
            ..Options::default()
        },
    );
    assert!(full.is_ok(), "32 queues fill the page exactly");
}

#[test]
fn two_level_stream_table_descriptors() {
    use twinmmu_hw::PhysMem;
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let base = m.smmu.mmio_read(0x80, 8).unwrap();
    assert_ne!(base & (1 << 62), 0, "STRTAB_BASE.RA");
    let l1 = base & ((1u64 << 52) - 64);
    // No device yet: every L1 descriptor is invalid (Span 0).
    assert_eq!(m.mem.read_u64(l1 + 8 * 0x12).unwrap(), 0);
    let _d = m.master(0x1234);
    let desc = m.mem.read_u64(l1 + 8 * 0x12).unwrap();
    assert_eq!(desc & 0x1f, 9, "Span = SPLIT + 1: 256 STEs");
    let l2 = desc & ((1u64 << 52) - 64);
    assert_eq!(l2 % (256 * 64), 0, "level-2 table aligned to its size");
    // The device's STE is entry 0x34 of it, and aborts.
    let ste0 = m.mem.read_u64(l2 + 0x34 * 64).unwrap();
    assert_eq!(ste0, 1, "V = 1, Config = abort");
    assert_eq!(m.drv.read_ste(0x1234).unwrap()[0], ste0);
}
