//! Every event of smmu_kvm.md §4.9 the model can produce, provoked through memory and
//! registers, with its record checked field by field at raw bit positions.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_hw::cd::CdDw0;
use twinmmu_hw::regs::off;
use twinmmu_hw::ste::{L1Std, SteDw0, SteDw1};
use twinmmu_hw::{
    AccessKind, DmaError, EventType, Outcome, PhysMem, SmmuConfig, Termination, Transaction,
};
use twinmmu_vmsa::{Granule, S1LeafAttrs, S2LeafAttrs};

const IOVA: u64 = 0x10_0000;
const SID: u32 = 0x21;

/// A stage-1 stream with IOVA..+64K mapped RW, one RO page at +64K and one AF=0 page at
/// +68K; returns the machine and the TTB.
fn s1_machine() -> (Machine, u64) {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(IOVA, DATA, 0x1_0000, urw()).unwrap();
    let ro = S1LeafAttrs {
        read_only: true,
        el0: true,
        ..S1LeafAttrs::rw()
    };
    b.map(IOVA + 0x1_0000, DATA + 0x1_0000, 0x1000, ro.bits())
        .unwrap();
    let noaf = S1LeafAttrs {
        af: false,
        el0: true,
        ..S1LeafAttrs::rw()
    };
    b.map(IOVA + 0x1_1000, DATA + 0x1_1000, 0x1000, noaf.bits())
        .unwrap();
    let ttb = b.root();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, ttb, 3));
    m.set_ste(SID, &s1_ste(CDS, 0, 1));
    (m, ttb)
}

fn txn(sid: u32, ssid: Option<u32>, addr: u64, kind: AccessKind) -> Transaction {
    Transaction::new(sid, ssid, addr, kind, false)
}

/// Presents `t`, expects a fault `ev`, and returns its one recorded record.
fn one_event(m: &Machine, t: Transaction, ev: EventType) -> [u64; 4] {
    match m.smmu.translate(t) {
        Outcome::Fault {
            event, recorded, ..
        } => {
            assert_eq!(event, ev);
            assert!(recorded, "{ev:?} recorded");
        }
        o => panic!("expected {ev:?}, got {o:?}"),
    }
    let evs = m.events();
    assert_eq!(evs.len(), 1, "{evs:x?}");
    let r = evs[0];
    assert_eq!(r[0] & 0xff, u64::from(ev.code()), "Type[7:0]");
    assert_eq!(r[0] >> 32, u64::from(t.sid), "StreamID[63:32]");
    r
}

#[test]
fn f_translation_recorded_under_cd_r_only() {
    let (m, ttb) = s1_machine();
    let r = one_event(
        &m,
        txn(SID, None, 0x9000_0000, AccessKind::Read),
        EventType::FTranslation,
    );
    assert_eq!(r[2], 0x9000_0000, "InputAddr");
    assert_ne!(r[1] & (1 << 35), 0, "RnW = read");
    assert_eq!((r[1] >> 40) & 3, 2, "CLASS = IN");
    assert_eq!(r[1] & (1 << 39), 0, "S2 = 0");
    // CD.R = 0: the transaction still terminates, nothing is recorded.
    let mut cd = s1_cd(Granule::Size4K, 48, ttb, 3);
    cd.dw0 = cd.dw0.with_r(false);
    m.write_cd(CDS, &cd);
    m.submit(&[
        twinmmu_hw::cmd::build::cfgi_cd(SID, 0, true),
        twinmmu_hw::cmd::build::sync(),
    ]);
    match m
        .smmu
        .translate(txn(SID, None, 0x9000_0000, AccessKind::Read))
    {
        Outcome::Fault {
            event: EventType::FTranslation,
            recorded: false,
            termination: Termination::Abort,
        } => {}
        o => panic!("{o:?}"),
    }
    assert!(m.events().is_empty());
}

#[test]
fn f_permission_and_f_access() {
    let (m, _) = s1_machine();
    let r = one_event(
        &m,
        txn(SID, None, IOVA + 0x1_0008, AccessKind::Write),
        EventType::FPermission,
    );
    assert_eq!(r[1] & (1 << 35), 0, "RnW = write");
    assert_eq!(r[2], IOVA + 0x1_0008);
    // An instruction fetch is reported with InD (bit 34).
    let mut t = txn(SID, None, IOVA + 0x1_1000, AccessKind::Execute);
    t.privileged = true;
    let r = one_event(&m, t, EventType::FAccess);
    assert_ne!(r[1] & (1 << 34), 0, "InD");
    assert_ne!(r[1] & (1 << 33), 0, "PnU");
}

#[test]
fn f_addr_size_from_an_output_beyond_ips() {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    // Output above 2^32 with IPS = 32 bits.
    b.map(IOVA, 0x1_0000_0000, 0x1000, urw()).unwrap();
    let mut cd = s1_cd(Granule::Size4K, 48, b.root(), 3);
    cd.dw0 = cd.dw0.with_ips(0);
    m.write_cd(CDS, &cd);
    m.set_ste(SID, &s1_ste(CDS, 0, 1));
    one_event(
        &m,
        txn(SID, None, IOVA, AccessKind::Read),
        EventType::FAddrSize,
    );
}

#[test]
fn f_walk_eabt_reports_the_fetch_address() {
    let m = Machine::new(SmmuConfig::default());
    // TTB0 outside RAM (inside the 48-bit IPS).
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, 0x10_0000_0000, 3));
    m.set_ste(SID, &s1_ste(CDS, 0, 1));
    let r = one_event(
        &m,
        txn(SID, None, IOVA, AccessKind::Read),
        EventType::FWalkEabt,
    );
    assert_eq!((r[1] >> 40) & 3, 1, "CLASS = TT");
    assert_eq!(r[1] & (1 << 39), 0, "S2 = 0");
    assert_eq!(r[2], IOVA);
    assert_eq!(
        r[3], 0x10_0000_0000,
        "FetchAddr[55:3] in dword 3 (level-0 descriptor)"
    );
}

#[test]
fn configuration_errors() {
    let (m, ttb) = s1_machine();
    // C_BAD_STE: V = 0.
    let mut ste = s1_ste(CDS, 0, 1);
    ste.dw0 = ste.dw0.with_v(false);
    m.set_ste(5, &ste);
    one_event(&m, txn(5, None, IOVA, AccessKind::Read), EventType::CBadSte);
    // C_BAD_SUBSTREAMID: a SubstreamID on a stream without substreams.
    let r = one_event(
        &m,
        txn(SID, Some(3), IOVA, AccessKind::Read),
        EventType::CBadSubstreamid,
    );
    assert_eq!((r[0] >> 12) & 0xf_ffff, 3, "SubstreamID");
    // F_STREAM_DISABLED: substreams enabled, S1DSS = terminate, no SubstreamID.
    let mut ste = s1_ste(CDS, 2, 1);
    ste.dw1 = SteDw1::new().with_s1dss(0);
    m.set_ste(6, &ste);
    one_event(
        &m,
        txn(6, None, IOVA, AccessKind::Read),
        EventType::FStreamDisabled,
    );
    // ... and SubstreamID 0 with S1DSS = 0b10.
    ste.dw1 = SteDw1::new().with_s1dss(2);
    m.set_ste(6, &ste);
    one_event(
        &m,
        txn(6, Some(0), IOVA, AccessKind::Read),
        EventType::FStreamDisabled,
    );
    // C_BAD_SUBSTREAMID: SubstreamID beyond S1CDMax.
    one_event(
        &m,
        txn(6, Some(4), IOVA, AccessKind::Read),
        EventType::CBadSubstreamid,
    );
    // C_BAD_CD: V = 0.
    let mut cd = s1_cd(Granule::Size4K, 48, ttb, 3);
    cd.dw0 = CdDw0::new();
    m.write_cd(CDS + 0x1000, &cd);
    m.set_ste(7, &s1_ste(CDS + 0x1000, 0, 1));
    one_event(&m, txn(7, None, IOVA, AccessKind::Read), EventType::CBadCd);
    // F_CD_FETCH: the CD is outside memory; FetchAddr in dword 3 (QEMU used dword 2).
    m.set_ste(8, &s1_ste(0x20_0000_0000, 0, 1));
    let r = one_event(
        &m,
        txn(8, None, IOVA, AccessKind::Read),
        EventType::FCdFetch,
    );
    assert_eq!(r[3], 0x20_0000_0000);
    assert_eq!(r[2], 0);
}

#[test]
fn two_level_cd_table_and_bad_l1cd() {
    let (m, ttb) = s1_machine();
    // S1Fmt = 1 (4K leaves of 64 CDs), S1CDMax = 8; L1CD 1 valid, L1CD 2 invalid.
    let l1 = CDS + 0x2000;
    let l2 = CDS + 0x3000;
    m.mem
        .write_u64(
            l1 + 8,
            twinmmu_hw::cd::L1Cd::new()
                .with_v(true)
                .with_l2ptr(l2 >> 12)
                .into_bits(),
        )
        .unwrap();
    m.write_cd(l2 + 5 * 64, &s1_cd(Granule::Size4K, 48, ttb, 9));
    let mut ste = s1_ste(l1, 8, 1);
    ste.dw0 = ste.dw0.with_s1fmt(1);
    ste.dw1 = SteDw1::new().with_s1dss(1);
    m.set_ste(10, &ste);
    // SSID 69 = L1 index 1, L2 index 5.
    assert_eq!(
        m.smmu
            .translate(txn(10, Some(69), IOVA + 4, AccessKind::Read)),
        Outcome::Translated { pa: DATA + 4 }
    );
    let r = one_event(
        &m,
        txn(10, Some(130), IOVA, AccessKind::Read),
        EventType::CBadSubstreamid,
    );
    assert_eq!((r[0] >> 12) & 0xf_ffff, 130);
    // S1DSS = bypass: non-substream traffic passes untranslated.
    assert_eq!(
        m.smmu.translate(txn(10, None, DATA, AccessKind::Read)),
        Outcome::Translated { pa: DATA }
    );
}

#[test]
fn stream_table_errors() {
    let m = Machine::new(SmmuConfig::default());
    // 2-level table, SPLIT 8. RECINVSID = 0: C_BAD_STREAMID is not recorded.
    match m.smmu.translate(txn(0x1_0000, None, 0, AccessKind::Read)) {
        Outcome::Fault {
            event: EventType::CBadStreamid,
            recorded: false,
            ..
        } => {}
        o => panic!("{o:?}"),
    }
    assert!(m.events().is_empty());
    m.w32(off::CR2, 1 << 1);
    // StreamID ≥ 2^LOG2SIZE.
    one_event(
        &m,
        txn(0x1_0000, None, 0, AccessKind::Read),
        EventType::CBadStreamid,
    );
    // L1 descriptor with Span = 0.
    one_event(
        &m,
        txn(0x300, None, 0, AccessKind::Read),
        EventType::CBadStreamid,
    );
    // A StreamID beyond the span: Span 2 holds 2 STEs.
    m.mem
        .write_u64(
            STRTAB + 4 * 8,
            L1Std::new()
                .with_span(2)
                .with_l2ptr((L2STRTAB + 0x8_0000) >> 6)
                .into_bits(),
        )
        .unwrap();
    one_event(
        &m,
        txn(0x405, None, 0, AccessKind::Read),
        EventType::CBadStreamid,
    );
    // F_STE_FETCH: the L2 table is outside memory.
    m.mem
        .write_u64(
            STRTAB + 5 * 8,
            L1Std::new()
                .with_span(9)
                .with_l2ptr(0x30_0000_0000 >> 6)
                .into_bits(),
        )
        .unwrap();
    let r = one_event(
        &m,
        txn(0x503, None, 0, AccessKind::Read),
        EventType::FSteFetch,
    );
    assert_eq!(r[3], 0x30_0000_0000 + 3 * 64, "FetchAddr of the STE");
}

#[test]
fn stage2_faults_carry_class_and_ipa() {
    // Nested stream whose stage 2 maps nothing but the RAM holding the stage-1 tables:
    // CD fetch, table walk and output each fault at stage 2 in turn.
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 40, 1);
    let s2_root = s2.root();
    let mut ste = s2_ste(Granule::Size4K, 40, 1, s2_root, 12);
    ste.dw0 = SteDw0::new()
        .with_v(true)
        .with_config(0b111)
        .with_s1_context_ptr(CDS >> 6);
    m.set_ste(SID, &ste);
    // 1. The CD's IPA is unmapped at stage 2: CLASS = CD.
    let r = one_event(
        &m,
        txn(SID, None, IOVA, AccessKind::Read),
        EventType::FTranslation,
    );
    assert_ne!(r[1] & (1 << 39), 0, "S2");
    assert_eq!((r[1] >> 40) & 3, 0, "CLASS = CD");
    assert_eq!(r[3], CDS, "IPA = the CD address");
    // 2. Map the CD page; the stage-1 tables (at IPA 0x5000_0000) are not: CLASS = TT.
    s2.map(CDS, CDS, 0x1000, S2LeafAttrs::rw().bits()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, 0x5000_0000, 3));
    m.submit(&[
        twinmmu_hw::cmd::build::cfgi_ste(SID, false),
        twinmmu_hw::cmd::build::sync(),
    ]);
    let r = one_event(
        &m,
        txn(SID, None, IOVA, AccessKind::Read),
        EventType::FTranslation,
    );
    assert_eq!((r[1] >> 40) & 3, 1, "CLASS = TT");
    assert_eq!(r[3], 0x5000_0000, "IPA = the level-0 descriptor");
    assert_ne!(r[1] & (1 << 39), 0, "S2");
    // 3. Build stage-1 tables identity-placed in mapped RAM; the output IPA is unmapped:
    //    CLASS = IN with the output IPA.
    let mut s1 = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    s1.map(IOVA, 0x6000_0000, 0x1000, urw()).unwrap();
    s2.map(TABLES, TABLES, 0x100_0000, S2LeafAttrs::rw().bits())
        .unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, s1.root(), 3));
    m.submit(&[
        twinmmu_hw::cmd::build::cfgi_ste(SID, false),
        twinmmu_hw::cmd::build::tlbi_s12_vmall(12),
        twinmmu_hw::cmd::build::sync(),
    ]);
    let r = one_event(
        &m,
        txn(SID, None, IOVA + 0x18, AccessKind::Read),
        EventType::FTranslation,
    );
    assert_eq!((r[1] >> 40) & 3, 2, "CLASS = IN");
    assert_eq!(r[3], 0x6000_0000, "IPA[55:12]");
    assert_eq!(r[2], IOVA + 0x18, "InputAddr is the IOVA");
    // 4. A stage-2 permission fault (read-only output page, write access).
    let ro = S2LeafAttrs {
        write: false,
        ..S2LeafAttrs::rw()
    };
    s2.map(0x6000_0000 & !0xfff, DATA, 0x1000, ro.bits())
        .unwrap();
    m.submit(&[
        twinmmu_hw::cmd::build::tlbi_s12_vmall(12),
        twinmmu_hw::cmd::build::sync(),
    ]);
    assert!(matches!(
        m.smmu.translate(txn(SID, None, IOVA, AccessKind::Read)),
        Outcome::Translated { pa } if pa == DATA
    ));
    let r = one_event(
        &m,
        txn(SID, None, IOVA, AccessKind::Write),
        EventType::FPermission,
    );
    assert_ne!(r[1] & (1 << 39), 0, "S2");
    assert_eq!((r[1] >> 40) & 3, 2, "CLASS = IN");
}

/// IHI0070 7.3.22: in a nested walk the final stage-1 descriptor's F_PERMISSION comes
/// before every fault of stage 2 on the output IPA, which is translated only once stage 1
/// has granted the access. So a write to a stage-1 read-only page reports the stage-1
/// Permission fault (S2 = 0) whether its output IPA is unmapped at stage 2 (on a walk)
/// or read-only there too (on a hit of the combined entry).
#[test]
fn stage1_permission_fault_comes_before_stage2_of_the_output() {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 40, 1);
    s2.map(CDS, CDS, 0x1000, S2LeafAttrs::rw().bits()).unwrap();
    let mut s1 = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    let s1_ro = S1LeafAttrs {
        read_only: true,
        el0: true,
        ..S1LeafAttrs::rw()
    };
    // IOVA → IPA 0x6000_0000 (unmapped at stage 2); IOVA + 4K → IPA 0x6000_1000, which
    // stage 2 maps read-only. Stage 1 is read-only for both.
    s1.map(IOVA, 0x6000_0000, 0x2000, s1_ro.bits()).unwrap();
    s2.map(TABLES, TABLES, 0x100_0000, S2LeafAttrs::rw().bits())
        .unwrap();
    let s2_ro = S2LeafAttrs {
        write: false,
        ..S2LeafAttrs::rw()
    };
    s2.map(0x6000_1000, DATA, 0x1000, s2_ro.bits()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, s1.root(), 3));
    let mut ste = s2_ste(Granule::Size4K, 40, 1, s2.root(), 12);
    ste.dw0 = SteDw0::new()
        .with_v(true)
        .with_config(0b111)
        .with_s1_context_ptr(CDS >> 6);
    m.set_ste(SID, &ste);

    // A read of the second page translates (caching the stage-2 entries of the tables and
    // the combined entry).
    assert_eq!(
        m.smmu
            .translate(txn(SID, None, IOVA + 0x1008, AccessKind::Read)),
        Outcome::Translated { pa: DATA + 8 }
    );
    // A read of the first page: stage 1 grants it, stage 2 of the output faults.
    let r = one_event(
        &m,
        txn(SID, None, IOVA + 0x10, AccessKind::Read),
        EventType::FTranslation,
    );
    assert_ne!(r[1] & (1 << 39), 0, "S2");
    assert_eq!((r[1] >> 40) & 3, 2, "CLASS = IN");
    assert_eq!(r[3], 0x6000_0000, "IPA");

    // On a walk: a write to the first page is a stage-1 Permission fault, and stage 2 of
    // its output is never walked.
    let before = m.smmu.stats();
    let r = one_event(
        &m,
        txn(SID, None, IOVA + 0x10, AccessKind::Write),
        EventType::FPermission,
    );
    let after = m.smmu.stats();
    assert_eq!(r[1] & (1 << 39), 0, "S2 = 0: a stage-1 fault");
    assert_eq!(r[3], 0, "no IPA for a stage-1 fault");
    assert_eq!(r[2], IOVA + 0x10, "InputAddr");
    assert_eq!(after.walks_s1 - before.walks_s1, 1, "one stage-1 walk");
    assert_eq!(
        after.walks_s2, before.walks_s2,
        "no stage-2 walk of the output IPA"
    );

    // On a hit of the combined entry (stage 1 and stage 2 both read-only): stage 1 again.
    let before = m.smmu.stats();
    let r = one_event(
        &m,
        txn(SID, None, IOVA + 0x1010, AccessKind::Write),
        EventType::FPermission,
    );
    let after = m.smmu.stats();
    assert_eq!(after.walks_s1, before.walks_s1, "a TLB hit, no walk");
    assert_eq!(r[1] & (1 << 39), 0, "S2 = 0: a stage-1 fault");
    assert_eq!(r[3], 0, "no IPA for a stage-1 fault");
}

#[test]
fn razwi_termination_with_cd_a_clear() {
    let (m, ttb) = s1_machine();
    let mut cd = s1_cd(Granule::Size4K, 48, ttb, 3);
    cd.dw0 = cd.dw0.with_a(false).with_r(false);
    m.write_cd(CDS, &cd);
    m.submit(&[
        twinmmu_hw::cmd::build::cfgi_cd_all(SID),
        twinmmu_hw::cmd::build::sync(),
    ]);
    let mut buf = [0xAAu8; 16];
    match m.smmu.dma_read(SID, None, 0x9000_0000, &mut buf, false) {
        Err(DmaError::Fault {
            termination: Termination::RazWi,
            recorded: false,
            ..
        }) => {}
        r => panic!("{r:?}"),
    }
    assert_eq!(buf, [0; 16], "RAZ");
}

#[test]
fn event_queue_overflow_and_irq() {
    // A 2-entry event queue.
    let m = Machine::with_queues(SmmuConfig::default(), 1);
    m.w32(off::IRQ_CTRL, 0b100);
    assert_eq!(m.r32(off::IRQ_CTRLACK), 0b100, "acknowledged at once");
    m.w32(off::CR2, 1 << 1);
    for i in 0..3u32 {
        let _ = m
            .smmu
            .translate(txn(0x2_0000 + i, None, 0, AccessKind::Read));
    }
    let prod = m.r32(twinmmu_hw::regs::PAGE1 + off::EVENTQ_PROD);
    assert_ne!(
        prod & (1 << 31),
        0,
        "OVFLG toggled by the lost third record"
    );
    assert_eq!(
        m.smmu.stats().irq_eventq,
        1,
        "one IRQ when the queue became non-empty"
    );
    assert_eq!(m.smmu.stats().events_lost, 1);
    let evs = m.events();
    assert_eq!(evs.len(), 2);
    // Acknowledge the overflow by copying OVFLG to OVACKFLG.
    let cons = m.r32(twinmmu_hw::regs::PAGE1 + off::EVENTQ_CONS);
    m.w32(twinmmu_hw::regs::PAGE1 + off::EVENTQ_CONS, cons | (1 << 31));
    let _ = m.smmu.translate(txn(0x2_0009, None, 0, AccessKind::Read));
    assert_eq!(m.events().len(), 1);
    let prod = m.r32(twinmmu_hw::regs::PAGE1 + off::EVENTQ_PROD);
    assert_ne!(
        prod & (1 << 31),
        0,
        "OVFLG unchanged until the next overflow"
    );
}

#[test]
fn event_queue_abort_sets_gerror() {
    let m = Machine::new(SmmuConfig::default());
    m.w32(off::CR0, 0b1001);
    // Event queue outside memory.
    m.w64(off::EVENTQ_BASE, 0x50_0000_0000 | 4);
    m.w32(off::CR0, 0b1101);
    m.w32(off::CR2, 1 << 1);
    let _ = m.smmu.translate(txn(0x2_0000, None, 0, AccessKind::Read));
    assert_ne!(m.r32(off::GERROR) & (1 << 2), 0, "EVTQ_ABT_ERR");
    assert_eq!(
        m.r32(twinmmu_hw::regs::PAGE1 + off::EVENTQ_PROD) & 0x1f,
        0,
        "PROD not advanced"
    );
}
