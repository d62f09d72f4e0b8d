//! The register protocols and the command queue: CR0/CR0ACK, IRQ_CTRL/ACK, GBPA UPDATE,
//! GERROR/GERRORN, CMDQ_CONS write rule, RO IDRs, RAZ reserved locations, and every command
//! error path of smmu_kvm.md §4.8 with its recovery; CMD_SYNC MSI; stalls and RESUME;
//! broadcast TLB maintenance.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use twinmmu_hw::cmd::{CmdqEntry, build};
use twinmmu_hw::regs::{PAGE1, off};
use twinmmu_hw::{
    AccessKind, AtcResponse, AtsEndpoint, CmdError, DmaError, EventType, Outcome, PhysMem,
    SmmuConfig, StallResult, Termination, Tlbi, TlbiOp, Transaction,
};
use twinmmu_vmsa::Granule;

#[test]
fn id_registers_are_read_only_and_reserved_locations_raz() {
    let m = Machine::new(SmmuConfig::default());
    let idr0 = m.r32(off::IDR0);
    m.w32(off::IDR0, !idr0);
    assert_eq!(m.r32(off::IDR0), idr0);
    assert_eq!(idr0 & 3, 3);
    assert_eq!(m.r32(0x30), 0, "reserved");
    m.w32(0x30, 0xffff_ffff);
    assert_eq!(m.r32(0x30), 0);
    assert_eq!(m.r32(off::AIDR), 2, "SMMUv3.2");
    assert_eq!(m.r32(off::CIDR1), 0xF0);
    // Reserved CR0 bits read as zero.
    m.w32(off::CR0, !1);
    assert_eq!(m.r32(off::CR0) & !0x1df, 0);
    // Unsupported sizes are refused, not crashed on.
    assert!(m.smmu.mmio_read(off::IDR0, 1).is_err());
    assert!(m.smmu.mmio_read(off::IDR1, 8).is_err(), "misaligned");
    assert_eq!(
        m.smmu.mmio_read(off::IDR0, 8).unwrap(),
        u64::from(m.r32(off::IDR0)) | (u64::from(m.r32(off::IDR1)) << 32)
    );
    assert!(m.smmu.mmio_read(0x2_0000, 4).is_err());
    assert!(m.smmu.mmio_write(off::CR0 + 2, 4, 0).is_err());
}

#[test]
fn sixty_four_bit_registers_take_both_access_sizes() {
    let m = Machine::new(SmmuConfig::default());
    m.w32(off::CR0, 0);
    m.w32(off::STRTAB_BASE, 0x4000_1000);
    m.w32(off::STRTAB_BASE + 4, 0x12);
    assert_eq!(m.r64(off::STRTAB_BASE), 0x12_4000_1000);
    assert_eq!(m.r32(off::STRTAB_BASE + 4), 0x12);
    // RA at bit 62 is kept; bits 63, [61:52] and [5:0] are RES0.
    m.w64(off::STRTAB_BASE, u64::MAX);
    assert_eq!(
        m.r64(off::STRTAB_BASE),
        (1 << 62) | (((1u64 << 52) - 1) & !0x3f)
    );
    // Page-1 aliases for the event queue indexes.
    assert_eq!(m.r32(PAGE1 + off::EVENTQ_PROD), m.r32(off::EVENTQ_PROD));
}

#[test]
fn strtab_registers_locked_while_enabled_and_cmdq_cons_while_cmdqen() {
    let m = Machine::new(SmmuConfig::default());
    let base = m.r64(off::STRTAB_BASE);
    m.w64(off::STRTAB_BASE, 0x4800_0000);
    assert_eq!(m.r64(off::STRTAB_BASE), base, "ignored while SMMUEN = 1");
    let cons = m.r32(off::CMDQ_CONS);
    m.w32(off::CMDQ_CONS, cons + 5);
    assert_eq!(m.r32(off::CMDQ_CONS), cons, "ignored while CMDQEN = 1");
    m.w32(off::CR0, 0b0101);
    m.w32(off::CMDQ_CONS, 7);
    assert_eq!(m.r32(off::CMDQ_CONS), 7);
}

#[test]
fn cerror_ill_stops_at_the_command_and_restarts_after_gerrorn() {
    let m = Machine::new(SmmuConfig::default());
    m.w32(off::IRQ_CTRL, 1);
    let start = m.r32(off::CMDQ_CONS);
    // Reserved opcode 0x08 between two good commands.
    let cons = m.submit(&[build::sync(), CmdqEntry([0x08, 0]), build::sync()]);
    assert_eq!(
        cons & 0x1ff,
        (start + 1) & 0x1ff,
        "stopped at the failing command"
    );
    assert_eq!((cons >> 24) & 0x7f, 1, "CONS.ERR = CERROR_ILL");
    assert_eq!(m.smmu.cmdq_error(), CmdError::Ill);
    let gerror = m.r32(off::GERROR);
    assert_eq!(gerror & 1, 1, "CMDQ_ERR toggled");
    assert_eq!(m.smmu.stats().irq_gerror, 1);
    // Writing PROD again does not consume while the error is active.
    m.w32(off::CMDQ_PROD, m.r32(off::CMDQ_PROD));
    assert_eq!(m.r32(off::CMDQ_CONS) & 0x1ff, (start + 1) & 0x1ff);
    // Linux recovery: overwrite the slot with a CMD_SYNC, then acknowledge.
    let idx = u64::from((start + 1) & 0xff);
    m.mem
        .write_u64(CMDQ + idx * 16, build::sync().0[0])
        .unwrap();
    m.w32(off::GERRORN, gerror);
    assert!(m.cmdq_idle(), "restarted at CONS and drained");
    assert_eq!(m.r32(off::GERROR) ^ m.r32(off::GERRORN), 0);
}

#[test]
fn cerror_ill_for_unimplemented_features() {
    let m = Machine::new(SmmuConfig {
        s2p: false,
        ..SmmuConfig::default()
    });
    let start = m.r32(off::CMDQ_CONS);
    let cons = m.submit(&[build::tlbi_s12_vmall(1)]);
    assert_eq!(cons & 0x1ff, start & 0x1ff);
    assert_eq!(m.smmu.cmdq_error(), CmdError::Ill);
}

#[test]
fn cerror_abt_on_a_queue_outside_memory_then_retry() {
    let m = Machine::new(SmmuConfig::default());
    m.w32(off::CR0, 0b0101);
    m.w64(off::CMDQ_BASE, 0x60_0000_0000 | 4);
    m.w32(off::CMDQ_PROD, 0);
    m.w32(off::CMDQ_CONS, 0);
    m.w32(off::CR0, 0b1101);
    m.w32(off::CMDQ_PROD, 1);
    assert_eq!(m.smmu.cmdq_error(), CmdError::Abt);
    assert_eq!(
        m.r32(off::CMDQ_CONS) & 0x1f,
        0,
        "CONS not incremented on a fetch abort"
    );
    // Recovery: move the queue (CMDQEN off), put a SYNC there, acknowledge (retry).
    m.w32(off::CR0, 0b0101);
    m.w64(off::CMDQ_BASE, CMDQ | 4);
    m.mem.write_u64(CMDQ, build::sync().0[0]).unwrap();
    m.mem.write_u64(CMDQ + 8, 0).unwrap();
    m.w32(off::CMDQ_CONS, 0);
    m.w32(off::CR0, 0b1101);
    m.w32(off::GERRORN, m.r32(off::GERROR));
    assert_eq!(m.r32(off::CMDQ_CONS) & 0x1f, 1);
}

struct Endpoint(AtcResponse);
impl AtsEndpoint for Endpoint {
    fn invalidate(&self, _: Option<u32>, _: u64, _: u8) -> AtcResponse {
        self.0
    }
}

#[test]
fn cerror_atc_inv_sync_leaves_cons_at_the_sync() {
    let cfg = SmmuConfig {
        ats: true,
        ..SmmuConfig::default()
    };
    let m = Machine::new(cfg);
    m.smmu
        .attach_ats_endpoint(3, Arc::new(Endpoint(AtcResponse::Timeout)));
    m.smmu
        .attach_ats_endpoint(4, Arc::new(Endpoint(AtcResponse::Completed)));
    let start = m.r32(off::CMDQ_CONS);
    m.submit(&[build::atc_inv(4, None, 0, 52), build::sync()]);
    assert!(m.cmdq_idle(), "a completed ATC invalidation syncs");
    let cons = m.submit(&[build::atc_inv(3, None, 0x1000, 0), build::sync()]);
    assert_eq!(
        cons & 0x1ff,
        (start + 3) & 0x1ff,
        "CONS points at the CMD_SYNC"
    );
    assert_eq!(m.smmu.cmdq_error(), CmdError::AtcInvSync);
    // Acknowledge: the SYNC is retried and completes.
    m.w32(off::GERRORN, m.r32(off::GERROR));
    assert!(m.cmdq_idle());
}

#[test]
fn cmd_sync_msi_and_msi_abort() {
    let m = Machine::new(SmmuConfig::default());
    let flag = DATA + 0x100;
    m.submit(&[build::sync_msi(flag, 0xC0FFEE)]);
    let mut b = [0u8; 4];
    m.mem.read(flag, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xC0FFEE);
    assert_eq!(m.smmu.stats().irq_sync, 1);
    // An MSI to nowhere: consumed, GERROR.MSI_CMDQ_ABT_ERR.
    m.submit(&[build::sync_msi(0x70_0000_0000, 1)]);
    assert!(m.cmdq_idle());
    assert_ne!(m.r32(off::GERROR) & (1 << 4), 0);
}

#[test]
fn cr0_acknowledged_at_once_and_smmuen_off_terminates_stalls() {
    let m = Machine::new(SmmuConfig::default());
    for v in [0u32, 0b1000, 0b1100, 0b1101] {
        m.w32(off::CR0, v);
        assert_eq!(m.r32(off::CR0ACK), v);
    }
}

/// A stage-1 stream whose CD stalls faults (CD.S = 1).
fn stalling_machine() -> (Machine, u64) {
    stalling_stream(Machine::new(SmmuConfig::default()))
}

/// StreamID 2 on `m`: stage 1 with CD.S = 1, IOVA 0x1000 mapped RW to DATA.
fn stalling_stream(mut m: Machine) -> (Machine, u64) {
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(0x1000, DATA, 0x1000, urw()).unwrap();
    let ttb = b.root();
    let mut cd = s1_cd(Granule::Size4K, 48, ttb, 1);
    cd.dw0 = cd.dw0.with_s(true);
    m.write_cd(CDS, &cd);
    m.set_ste(2, &s1_ste(CDS, 0, 1));
    std::mem::forget(b);
    (m, ttb)
}

#[test]
fn stall_then_resume_retry_after_fixing_the_tables() {
    let (m, ttb) = stalling_machine();
    let out = m.smmu.dma_write(2, None, 0x5000, &[1, 2, 3, 4], false);
    let stag = match out {
        Err(DmaError::Stalled {
            stag,
            event: EventType::FTranslation,
            done: 0,
        }) => stag,
        r => panic!("{r:?}"),
    };
    let evs = m.events();
    assert_eq!(evs.len(), 1);
    assert_ne!(evs[0][1] & (1 << 31), 0, "Stall = 1");
    assert_eq!(evs[0][1] & 0xffff, u64::from(stag), "STAG");
    assert!(m.smmu.is_stalled(2, stag));
    // Software maps the page, then resumes with retry.
    let mut b = twinmmu_vmsa::TableBuilder::adopt(
        twinmmu_vmsa::TableFormat::stage1(Granule::Size4K, 48, twinmmu_vmsa::PaSize::Bits48)
            .unwrap(),
        ttb,
        &*m.mem,
        twinmmu_vmsa::BumpAllocator::new(TABLES + 0x80_0000, 0x10_0000),
    );
    b.map(0x5000, DATA + 0x5000, 0x1000, urw()).unwrap();
    m.submit(&[build::resume(2, stag, true, false)]);
    assert_eq!(m.smmu.stall_result(2, stag), Some(StallResult::Written));
    let mut back = [0u8; 4];
    m.mem.read(DATA + 0x5000, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
    assert!(m.smmu.stall_result(2, stag).is_none(), "taken once");
}

#[test]
fn stall_terminate_forms() {
    let (m, _) = stalling_machine();
    let t = Transaction::new(2, None, 0x7000, AccessKind::Read, false);
    let Outcome::Stalled { stag: s1, .. } = m.smmu.translate(t) else {
        panic!()
    };
    let Outcome::Stalled { stag: s2, .. } = m.smmu.translate(t) else {
        panic!()
    };
    let Outcome::Stalled { stag: s3, .. } = m.smmu.translate(t) else {
        panic!()
    };
    assert!(s1 != s2 && s2 != s3);
    // RESUME terminate with Abort = 0: RAZ/WI.
    m.submit(&[build::resume(2, s1, false, false)]);
    assert_eq!(
        m.smmu.stall_result(2, s1),
        Some(StallResult::Failed(DmaError::Fault {
            event: EventType::FTranslation,
            recorded: true,
            termination: Termination::RazWi
        }))
    );
    // A RESUME naming another StreamID has no effect.
    m.submit(&[build::resume(3, s2, true, false)]);
    assert!(m.smmu.is_stalled(2, s2));
    // STALL_TERM aborts the rest.
    m.submit(&[build::stall_term(2), build::sync()]);
    assert!(!m.smmu.is_stalled(2, s2) && !m.smmu.is_stalled(2, s3));
    assert!(matches!(
        m.smmu.stall_result(2, s3),
        Some(StallResult::Failed(DmaError::Fault {
            termination: Termination::Abort,
            ..
        }))
    ));
    // SMMUEN → 0 terminates stalled transactions too.
    let Outcome::Stalled { stag: s4, .. } = m.smmu.translate(t) else {
        panic!()
    };
    m.w32(off::CR0, 0b1100);
    assert!(!m.smmu.is_stalled(2, s4));
}

#[test]
fn resume_is_ill_without_a_stall_model() {
    let m = Machine::new(SmmuConfig {
        stall_model: twinmmu_hw::StallModel::TerminateOnly,
        ..SmmuConfig::default()
    });
    m.submit(&[build::resume(1, 0, true, false)]);
    assert_eq!(m.smmu.cmdq_error(), CmdError::Ill);
}

/// A stage-1 stream (VMID 5, ASID 9, ASET as given) with one page mapped.
fn btm_machine(aset: bool) -> Machine {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    let ng = twinmmu_vmsa::S1LeafAttrs {
        el0: true,
        not_global: true,
        ..twinmmu_vmsa::S1LeafAttrs::rw()
    };
    b.map(0x1000, DATA, 0x1000, ng.bits()).unwrap();
    let mut cd = s1_cd(Granule::Size4K, 48, b.root(), 9);
    cd.dw0 = cd.dw0.with_aset(aset);
    m.write_cd(CDS, &cd);
    m.set_ste(1, &s1_ste(CDS, 0, 5));
    let t = Transaction::new(1, None, 0x1000, AccessKind::Read, false);
    assert_eq!(m.smmu.translate(t), Outcome::Translated { pa: DATA });
    assert_eq!(m.smmu.tlb_entries().len(), 1);
    m
}

#[test]
fn broadcast_tlbi_honours_btm_ptm_and_aset() {
    // PTM = 1: broadcasts are ignored.
    let m = btm_machine(false);
    m.w32(off::CR2, 1 << 2);
    assert!(!m.smmu.broadcast(Tlbi::new(TlbiOp::Vmalle1is, 5)));
    assert_eq!(m.smmu.tlb_entries().len(), 1);
    m.w32(off::CR2, 0);
    // Another VMID's VMALLE1IS does not touch it.
    assert!(m.smmu.broadcast(Tlbi::new(TlbiOp::Vmalle1is, 6)));
    assert_eq!(m.smmu.tlb_entries().len(), 1);
    assert!(
        m.smmu
            .broadcast(Tlbi::new(TlbiOp::Aside1is, 5).with_asid(9))
    );
    assert!(
        m.smmu.tlb_entries().is_empty(),
        "ASIDE1IS removes ASET = 0 entries"
    );

    // ASET = 1: ASID-scoped broadcasts skip the entry, VMALLE1IS and ALLE1IS do not.
    let m = btm_machine(true);
    m.smmu
        .broadcast(Tlbi::new(TlbiOp::Aside1is, 5).with_asid(9));
    m.smmu
        .broadcast(Tlbi::new(TlbiOp::Vae1is, 5).with_asid(9).with_addr(0x1000));
    assert_eq!(
        m.smmu.tlb_entries().len(),
        1,
        "ASET = 1 entries skip ASID-scoped TLBIs"
    );
    m.smmu
        .broadcast(Tlbi::new(TlbiOp::Vaae1is, 5).with_addr(0x1000));
    assert!(
        m.smmu.tlb_entries().is_empty(),
        "VAAE1IS is not ASID-scoped"
    );
    let m = btm_machine(true);
    m.smmu.broadcast(Tlbi::new(TlbiOp::Alle1is, 0));
    assert!(m.smmu.tlb_entries().is_empty(), "ALLE1IS acts as NSNH_ALL");

    // No BTM in the IDRs: ignored.
    let mut m = Machine::new(SmmuConfig {
        btm: false,
        ..SmmuConfig::default()
    });
    m.alloc(1);
    assert!(!m.smmu.broadcast(Tlbi::new(TlbiOp::Alle1is, 0)));
}

#[test]
fn range_invalidation_removes_only_the_range() {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(0, DATA, 0x10_0000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 1));
    m.set_ste(1, &s1_ste(CDS, 0, 5));
    for p in 0..16u64 {
        let t = Transaction::new(1, None, p << 12, AccessKind::Read, false);
        assert!(matches!(m.smmu.translate(t), Outcome::Translated { .. }));
    }
    // Global entries: NH_VAA over pages 4..12 (NUM = 1, SCALE = 2: 8 pages).
    let cmd = build::with_range(build::tlbi_nh_vaa(5, 4 << 12, true), 1, 1, 2, 3);
    m.submit(&[cmd, build::sync()]);
    assert!(m.cmdq_idle());
    let mut left: Vec<u64> = m
        .smmu
        .tlb_entries()
        .iter()
        .map(|e| e.in_base >> 12)
        .collect();
    left.sort();
    assert_eq!(left, vec![0, 1, 2, 3, 12, 13, 14, 15]);
}

#[test]
fn pri_queue_records_page_requests_with_overflow() {
    let cfg = SmmuConfig {
        ats: true,
        pri: true,
        ..SmmuConfig::default()
    };
    let m = Machine::new(cfg);
    let priq = DATA + 0x10_0000;
    m.w32(off::CR0, 0b1101);
    m.w64(off::PRIQ_BASE, priq | 1);
    m.w32(off::IRQ_CTRL, 0b010);
    m.w32(off::CR0, 0b1111);
    assert_eq!(m.r32(off::CR0ACK), 0b1111);
    assert!(
        m.smmu
            .page_request(7, Some(3), 0x1234_5000, 5, true, true, false, false, false)
    );
    assert!(
        m.smmu
            .page_request(7, None, 0x9000, 6, false, false, true, false, true)
    );
    assert!(
        !m.smmu
            .page_request(7, None, 0xa000, 7, true, true, false, false, false),
        "full"
    );
    let prod = m.r32(PAGE1 + off::PRIQ_PROD);
    assert_eq!(prod & 3, 0b10, "two entries, wrapped");
    assert_ne!(prod & (1 << 31), 0, "OVFLG");
    assert_eq!(m.smmu.stats().irq_priq, 1);
    let w0 = m.mem.read_u64(priq).unwrap();
    let w1 = m.mem.read_u64(priq + 8).unwrap();
    assert_eq!(w0 & 0xffff_ffff, 7, "StreamID");
    assert_eq!((w0 >> 32) & 0xf_ffff, 3, "SSID");
    assert_ne!(w0 & (1 << 63), 0, "SSV");
    assert_ne!(w0 & (1 << 60), 0, "read");
    assert_ne!(w0 & (1 << 62), 0, "last");
    assert_eq!(w1, 0x1234_5000 | 5, "address and PRG index");
    // PRI_RESP is accepted.
    m.submit(&[build::pri_resp(7, 5, 2), build::sync()]);
    assert!(m.cmdq_idle());
}

#[test]
fn el2_streams_and_el2_invalidation() {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(0x1000, DATA, 0x1000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 0));
    let mut ste = s1_ste(CDS, 0, 0);
    ste.dw1 = twinmmu_hw::ste::SteDw1::new().with_strw(2);
    m.set_ste(9, &ste);
    let t = Transaction::new(9, None, 0x1000, AccessKind::Read, true);
    assert_eq!(m.smmu.translate(t), Outcome::Translated { pa: DATA });
    assert_eq!(
        m.smmu.tlb_entries()[0].ctx.world(),
        twinmmu_hw::tlb::World::El2
    );
    // NH_ALL does not touch EL2 entries; EL2_ALL does.
    m.submit(&[build::tlbi_nh_all(0), build::tlbi_nsnh_all(), build::sync()]);
    assert_eq!(m.smmu.tlb_entries().len(), 1);
    m.submit(&[build::tlbi_el2_all(), build::sync()]);
    assert!(m.smmu.tlb_entries().is_empty());
    // STRW = EL2 without IDR0.HYP is ILLEGAL.
    let nohyp = Machine::new(SmmuConfig {
        hyp: false,
        ..SmmuConfig::default()
    });
    nohyp.write_cd(CDS, &s1_cd(Granule::Size4K, 48, DATA, 0));
    nohyp.set_ste(9, &ste);
    assert!(matches!(
        nohyp.smmu.translate(t),
        Outcome::Fault {
            event: EventType::CBadSte,
            ..
        }
    ));
}

#[test]
fn tbi_tagged_addresses_share_one_entry_and_untagged_tlbi_removes_it() {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(0x1000, DATA, 0x1000, urw()).unwrap();
    let mut cd = s1_cd(Granule::Size4K, 48, b.root(), 2);
    cd.dw0 = cd.dw0.with_tbi0(true);
    m.write_cd(CDS, &cd);
    m.set_ste(1, &s1_ste(CDS, 0, 4));
    for tag in [0u64, 0x5a, 0xff] {
        let t = Transaction::new(1, None, (tag << 56) | 0x1008, AccessKind::Read, false);
        assert_eq!(m.smmu.translate(t), Outcome::Translated { pa: DATA + 8 });
    }
    assert_eq!(m.smmu.tlb_entries().len(), 1, "one entry for every tag");
    m.submit(&[build::tlbi_nh_va(4, 2, 0x1000, true), build::sync()]);
    assert!(m.smmu.tlb_entries().is_empty());
    // Without TBI a tagged address is outside the 48-bit region.
    cd.dw0 = cd.dw0.with_tbi0(false);
    m.write_cd(CDS, &cd);
    m.submit(&[build::cfgi_cd(1, 0, true), build::sync()]);
    let t = Transaction::new(1, None, (0x5a << 56) | 0x1008, AccessKind::Read, false);
    assert!(matches!(
        m.smmu.translate(t),
        Outcome::Fault {
            event: EventType::FTranslation,
            ..
        }
    ));
}

/// A stalling stream (CD.S = 1) with an event queue of two entries.
fn stalling_machine_small_evtq() -> (Machine, u64) {
    let (m, ttb) = stalling_stream(Machine::with_queues(SmmuConfig::default(), 1));
    // A terminating stream (CD.S = 0) to fill the queue with.
    m.write_cd(CDS + 64, &s1_cd(Granule::Size4K, 48, ttb, 2));
    m.set_ste(3, &s1_ste(CDS + 64, 0, 2));
    (m, ttb)
}

#[test]
fn a_stall_whose_record_finds_the_queue_full_waits_and_is_retried() {
    let (m, ttb) = stalling_machine_small_evtq();
    // Fill the 2-entry queue with terminate-model faults.
    for va in [0x8000u64, 0x9000] {
        let t = Transaction::new(3, None, va, AccessKind::Read, false);
        assert!(matches!(
            m.smmu.translate(t),
            Outcome::Fault { recorded: true, .. }
        ));
    }
    let prod_full = m.r32(PAGE1 + off::EVENTQ_PROD);
    // IHI0070 7.2.1: the stall's record cannot be written, and it is not discarded: the
    // transaction stays stalled, with no overflow.
    let out = m.smmu.dma_write(2, None, 0x5000, &[9, 8, 7, 6], false);
    let Err(DmaError::Stalled { stag, .. }) = out else {
        panic!("{out:?}")
    };
    assert!(m.smmu.is_stalled(2, stag));
    assert_eq!(
        m.r32(PAGE1 + off::EVENTQ_PROD),
        prod_full,
        "no record, no OVFLG"
    );
    assert_eq!(m.smmu.stats().events_lost, 0);
    // Software has not seen the STAG: a RESUME naming it has no effect.
    m.submit(&[build::resume(2, stag, false, true), build::sync()]);
    assert!(m.smmu.is_stalled(2, stag));
    // Consuming one record makes the queue writable: the retry faults again and records
    // the stall, with the transaction's STAG.
    assert_eq!(m.events().len(), 2, "the two terminate records");
    let evs = m.events();
    assert_eq!(evs.len(), 1, "then the stall's");
    assert_eq!(evs[0][0] & 0xff, 0x10, "F_TRANSLATION");
    assert_ne!(evs[0][1] & (1 << 31), 0, "Stall = 1");
    assert_eq!(evs[0][1] & 0xffff, u64::from(stag));
    assert_eq!(evs[0][2], 0x5000, "InputAddr");
    assert!(m.smmu.is_stalled(2, stag));
    // Now software may resume it, after mapping the page.
    let mut b = twinmmu_vmsa::TableBuilder::adopt(
        twinmmu_vmsa::TableFormat::stage1(Granule::Size4K, 48, twinmmu_vmsa::PaSize::Bits48)
            .unwrap(),
        ttb,
        &*m.mem,
        twinmmu_vmsa::BumpAllocator::new(TABLES + 0x80_0000, 0x10_0000),
    );
    b.map(0x5000, DATA + 0x5000, 0x1000, urw()).unwrap();
    m.submit(&[build::resume(2, stag, true, false), build::sync()]);
    assert_eq!(m.smmu.stall_result(2, stag), Some(StallResult::Written));
    let mut back = [0u8; 4];
    m.mem.read(DATA + 0x5000, &mut back).unwrap();
    assert_eq!(back, [9, 8, 7, 6]);
}

#[test]
fn a_waiting_stall_that_translates_on_retry_completes_without_a_record() {
    let (m, ttb) = stalling_machine_small_evtq();
    // The event queue disabled: no record can be written.
    m.w32(off::CR0, 0b1001);
    let t = Transaction::new(2, None, 0x6000, AccessKind::Read, false);
    let Outcome::Stalled { stag, .. } = m.smmu.translate(t) else {
        panic!()
    };
    assert!(m.smmu.is_stalled(2, stag));
    // The translation is fixed and invalidated before the queue comes back.
    let mut b = twinmmu_vmsa::TableBuilder::adopt(
        twinmmu_vmsa::TableFormat::stage1(Granule::Size4K, 48, twinmmu_vmsa::PaSize::Bits48)
            .unwrap(),
        ttb,
        &*m.mem,
        twinmmu_vmsa::BumpAllocator::new(TABLES + 0x80_0000, 0x10_0000),
    );
    b.map(0x6000, DATA + 0x6000, 0x1000, urw()).unwrap();
    m.submit(&[build::tlbi_nh_va(1, 1, 0x6000, true), build::sync()]);
    assert!(m.smmu.is_stalled(2, stag), "still waiting for the queue");
    // EVENTQEN = 1: the retry translates; nothing is recorded.
    m.w32(off::CR0, 0b1101);
    assert!(!m.smmu.is_stalled(2, stag));
    assert_eq!(
        m.smmu.stall_result(2, stag),
        Some(StallResult::Translated(DATA + 0x6000))
    );
    assert!(m.events().is_empty());
}

#[test]
fn stall_term_and_smmuen_reach_stalls_still_waiting_for_their_record() {
    let (m, _) = stalling_machine_small_evtq();
    m.w32(off::CR0, 0b1001);
    let t = Transaction::new(2, None, 0x6000, AccessKind::Read, false);
    let Outcome::Stalled { stag: a, .. } = m.smmu.translate(t) else {
        panic!()
    };
    let Outcome::Stalled { stag: b, .. } = m.smmu.translate(t) else {
        panic!()
    };
    m.submit(&[build::stall_term(2), build::sync()]);
    for s in [a, b] {
        assert_eq!(
            m.smmu.stall_result(2, s),
            Some(StallResult::Failed(DmaError::Fault {
                event: EventType::FTranslation,
                recorded: false,
                termination: Termination::Abort,
            }))
        );
    }
    let Outcome::Stalled { stag: c, .. } = m.smmu.translate(t) else {
        panic!()
    };
    m.w32(off::CR0, 0b1000);
    assert!(!m.smmu.is_stalled(2, c));
    assert!(matches!(
        m.smmu.stall_result(2, c),
        Some(StallResult::Failed(_))
    ));
}

#[test]
fn a_stall_whose_record_write_aborts_waits_for_the_abort_to_be_acknowledged() {
    let (m, _) = stalling_machine_small_evtq();
    // The event queue moved outside memory: writing a record aborts (IHI0070 7.2.2).
    m.w32(off::CR0, 0b1001);
    m.w64(off::EVENTQ_BASE, 0x1_0000_0000 | 1);
    m.w32(off::CR0, 0b1101);
    let t = Transaction::new(2, None, 0x6000, AccessKind::Read, false);
    let Outcome::Stalled { stag, .. } = m.smmu.translate(t) else {
        panic!()
    };
    assert_ne!(
        (m.r32(off::GERROR) ^ m.r32(off::GERRORN)) & (1 << 2),
        0,
        "EVENTQ_ABT_ERR active"
    );
    assert!(m.smmu.is_stalled(2, stag), "the transaction stays stalled");
    // Software repairs the queue; while the abort is unacknowledged the queue is still not
    // writable (IHI0070 7.2.1), so nothing is recorded yet.
    m.w32(off::CR0, 0b1001);
    m.w64(off::EVENTQ_BASE, EVTQ | 1);
    m.w32(PAGE1 + off::EVENTQ_PROD, 0);
    m.w32(PAGE1 + off::EVENTQ_CONS, 0);
    m.w32(off::CR0, 0b1101);
    assert!(m.events().is_empty());
    // Acknowledging EVENTQ_ABT_ERR makes it writable: the retry records the stall.
    m.w32(off::GERRORN, m.r32(off::GERROR));
    let evs = m.events();
    assert_eq!(evs.len(), 1);
    assert_ne!(evs[0][1] & (1 << 31), 0, "Stall = 1");
    assert_eq!(evs[0][1] & 0xffff, u64::from(stag));
    assert!(m.smmu.is_stalled(2, stag));
    m.submit(&[build::resume(2, stag, false, true), build::sync()]);
    assert!(matches!(
        m.smmu.stall_result(2, stag),
        Some(StallResult::Failed(DmaError::Fault {
            recorded: true,
            termination: Termination::Abort,
            ..
        }))
    ));
}
