//! PCIe ATS at the SMMU (IHI0070 3.9.1, 5.2 EATS, 7.3.2, 7.3.6, 7.3.8, 7.3.19, 13.6, 13.7):
//! Translation Requests and their Completions, Translated transactions under ATSCHK and
//! EATS, and the events only ATS and client hints can raise — F_UUT, F_BAD_ATS_TREQ,
//! F_TRANSL_FORBIDDEN, E_PAGE_REQUEST — each checked field by field at raw bit positions,
//! with the same setup minus the condition producing no event.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_hw::regs::off;
use twinmmu_hw::ste::{Ste, SteDw0, SteDw1};
use twinmmu_hw::{
    AccessKind, AtsCompletion, AtsRequest, AtsTranslation, DmaError, EventType, Outcome,
    PageRequestHint, PhysMem, SmmuConfig, Termination,
};
use twinmmu_vmsa::{Granule, S1LeafAttrs};

const IOVA: u64 = 0x10_0000;
const SID: u32 = 0x31;
/// CR0 with SMMUEN, EVENTQEN, CMDQEN (as `bring_up` leaves it).
const CR0_ON: u32 = 0b1101;
const ATSCHK: u32 = 1 << 4;

fn ats_cfg() -> SmmuConfig {
    SmmuConfig {
        ats: true,
        ..SmmuConfig::default()
    }
}

/// A stage-1 stream (CD 0, no substreams) with IOVA..+64K RW at DATA, one read-only page
/// at +64K and one privileged-only page at +68K; STE.EATS as given.
fn s1_machine(cfg: SmmuConfig, eats: u8) -> Machine {
    let mut m = Machine::new(cfg);
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
    b.map(
        IOVA + 0x1_1000,
        DATA + 0x1_1000,
        0x1000,
        S1LeafAttrs::rw().bits(),
    )
    .unwrap();
    let ttb = b.root();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, ttb, 3));
    let mut ste = s1_ste(CDS, 0, 1);
    ste.dw1 = SteDw1::new().with_eats(eats);
    m.set_ste(SID, &ste);
    m
}

fn set_eats(m: &Machine, sid: u32, ste: &Ste, eats: u8) {
    let mut s = *ste;
    s.dw1 = s.dw1.with_eats(eats);
    m.set_ste(sid, &s);
}

fn success(c: AtsCompletion) -> AtsTranslation {
    match c {
        AtsCompletion::Success(t) => t,
        o => panic!("expected a Success completion, got {o:?}"),
    }
}

fn one_record(m: &Machine, ty: u8) -> [u64; 4] {
    let evs = m.events();
    assert_eq!(evs.len(), 1, "{evs:x?}");
    let r = evs[0];
    assert_eq!(r[0] & 0xff, u64::from(ty), "Type[7:0] of {r:x?}");
    r
}

// ------------------------------------------------------------------ F_BAD_ATS_TREQ

#[test]
fn f_bad_ats_treq_when_ste_eats_is_0() {
    let m = s1_machine(ats_cfg(), 0);
    let req = AtsRequest {
        no_write: true,
        ..AtsRequest::new(SID, IOVA + 0x2345)
    };
    assert_eq!(
        m.smmu.ats_translation_request(&req),
        AtsCompletion::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq),
            recorded: true
        }
    );
    let r = one_record(&m, 0x05);
    // No PASID: SSV = 0, SubstreamID RES0.
    assert_eq!(r[0], 0x05 | (u64::from(SID) << 32));
    // R = 1 (always), W = !NW = 0, X = P = 0, Span = 1 STU.
    assert_eq!(r[1], (1 << 31) | 1);
    assert_eq!(r[2], IOVA + 0x2000, "InputAddr[63:12]");
    assert_eq!(r[3], 0);
}

#[test]
fn f_bad_ats_treq_fields_with_a_pasid() {
    // Substreams enabled, S1DSS = bypass: SSID 5 is valid, the request is refused by EATS.
    let mut m = Machine::new(ats_cfg());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(IOVA, DATA, 0x1000, urw()).unwrap();
    let root = b.root();
    for i in 0..8 {
        m.write_cd(CDS + i * 64, &s1_cd(Granule::Size4K, 48, root, 3));
    }
    let mut ste = s1_ste(CDS, 3, 1);
    ste.dw1 = SteDw1::new().with_s1dss(1);
    m.set_ste(SID, &ste);
    let req = AtsRequest {
        ssid: Some(5),
        exec: true,
        privileged: true,
        ..AtsRequest::new(SID, IOVA)
    };
    assert!(matches!(
        m.smmu.ats_translation_request(&req),
        AtsCompletion::UnsupportedRequest { .. }
    ));
    let r = one_record(&m, 0x05);
    assert_eq!(r[0], 0x05 | (1 << 11) | (5 << 12) | (u64::from(SID) << 32));
    assert_eq!(
        r[1],
        (1 << 31) | (1 << 30) | (1 << 29) | (1 << 28) | 1,
        "R W X P Span"
    );
    // The same request with EATS = Full translates, and records nothing.
    set_eats(&m, SID, &ste, 1);
    let t = success(m.smmu.ats_translation_request(&req));
    assert_eq!(t.addr, DATA);
    assert!(t.read && t.write && t.privileged);
    assert!(m.events().is_empty());
}

#[test]
fn f_bad_ats_treq_for_bypass_streams_and_with_the_smmu_disabled() {
    let m = s1_machine(ats_cfg(), 1);
    // STE.Config = 0b100: the effective EATS is 0b00.
    let bypass = Ste {
        dw0: SteDw0::new().with_v(true).with_config(0b100),
        dw1: SteDw1::new().with_eats(1),
        ..Ste::default()
    };
    m.set_ste(7, &bypass);
    assert!(matches!(
        m.smmu.ats_translation_request(&AtsRequest::new(7, 0x1000)),
        AtsCompletion::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq),
            recorded: true
        }
    ));
    assert_eq!(one_record(&m, 0x05)[0] >> 32, 7);
    // STE.Config = 0b000: UR with no event.
    m.set_ste(
        8,
        &Ste {
            dw0: SteDw0::new().with_v(true),
            ..Ste::default()
        },
    );
    assert_eq!(
        m.smmu.ats_translation_request(&AtsRequest::new(8, 0x1000)),
        AtsCompletion::UnsupportedRequest {
            event: None,
            recorded: false
        }
    );
    assert!(m.events().is_empty());
    // SMMUEN = 0 (the event queue still enabled): UR and F_BAD_ATS_TREQ.
    m.w32(off::CR0, CR0_ON & !1);
    assert!(matches!(
        m.smmu.ats_translation_request(&AtsRequest::new(SID, IOVA)),
        AtsCompletion::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq),
            recorded: true
        }
    ));
    assert_eq!(one_record(&m, 0x05)[0] >> 32, u64::from(SID));
}

// ------------------------------------------------------------------ Translation Completions

#[test]
fn completions_grant_what_the_tables_allow() {
    let m = s1_machine(ats_cfg(), 1);
    // RW page: the Completion carries the PA of the page, R and W, one 4 KiB region.
    let t = success(
        m.smmu
            .ats_translation_request(&AtsRequest::new(SID, IOVA + 0x3456)),
    );
    assert_eq!(
        t,
        AtsTranslation {
            addr: DATA + 0x3000,
            size: 0x1000,
            read: true,
            write: true,
            exec: false,
            privileged: false
        }
    );
    assert_eq!(t.translate(IOVA + 0x3456), DATA + 0x3456);
    // It agrees with an ordinary transaction.
    assert_eq!(
        m.smmu.translate(twinmmu_hw::Transaction::new(
            SID,
            None,
            IOVA + 0x3456,
            AccessKind::Read,
            false
        )),
        Outcome::Translated { pa: DATA + 0x3456 }
    );
    // Read-only page: R only, even though the device intends to write.
    let t = success(
        m.smmu
            .ats_translation_request(&AtsRequest::new(SID, IOVA + 0x1_0000)),
    );
    assert!(t.read && !t.write);
    // Privileged-only page, unprivileged request (no PASID): Success with R = W = 0.
    let t = success(
        m.smmu
            .ats_translation_request(&AtsRequest::new(SID, IOVA + 0x1_1000)),
    );
    assert!(!t.grants_any());
    // Unmapped: a translation fault becomes Success R = W = 0 of one STU, and no event
    // even though CD.R = 1 (IHI0070 3.9.1).
    let t = success(
        m.smmu
            .ats_translation_request(&AtsRequest::new(SID, 0x7000_0000)),
    );
    assert!(!t.grants_any());
    assert_eq!(t.size, 0x1000);
    assert!(m.events().is_empty());
    // A configuration error is a Completer Abort, with no event (no REC_CFG_ATS).
    let mut bad = s1_ste(CDS, 0, 1);
    bad.dw1 = SteDw1::new().with_eats(1).with_strw(1);
    m.set_ste(9, &bad);
    assert_eq!(
        m.smmu.ats_translation_request(&AtsRequest::new(9, IOVA)),
        AtsCompletion::CompleterAbort {
            cause: EventType::CBadSte
        }
    );
    assert!(m.events().is_empty());
}

#[test]
fn without_ats_there_is_no_ats_interface() {
    let m = s1_machine(SmmuConfig::default(), 1);
    assert_eq!(
        m.smmu.ats_translation_request(&AtsRequest::new(SID, IOVA)),
        AtsCompletion::UnsupportedRequest {
            event: None,
            recorded: false
        }
    );
    assert!(m.events().is_empty());
}

// ------------------------------------------------------------------ F_TRANSL_FORBIDDEN

#[test]
fn f_transl_forbidden_under_atschk_with_eats_0() {
    let m = s1_machine(ats_cfg(), 0);
    m.w32(off::CR0, CR0_ON | ATSCHK);
    assert_eq!(m.r32(off::CR0ACK), CR0_ON | ATSCHK);
    match m.smmu.translated(SID, DATA + 0x1234, AccessKind::Write) {
        Outcome::Fault {
            event: EventType::FTranslForbidden,
            recorded: true,
            termination: Termination::Abort,
        } => {}
        o => panic!("{o:?}"),
    }
    let r = one_record(&m, 0x07);
    // No SSV/SubstreamID fields; RnW = 0 (a write); InputAddr[63:0].
    assert_eq!(r[0], 0x07 | (u64::from(SID) << 32));
    assert_eq!(r[1], 0);
    assert_eq!(r[2], DATA + 0x1234);
    assert_eq!(r[3], 0);
    let mut buf = [0u8; 4];
    assert!(matches!(
        m.smmu.dma_read_translated(SID, DATA, &mut buf),
        Err(DmaError::Fault {
            event: EventType::FTranslForbidden,
            ..
        })
    ));
    assert_eq!(one_record(&m, 0x07)[1], 1 << 35, "RnW = read");
}

#[test]
fn translated_traffic_passes_with_full_ats_or_without_atschk() {
    // EATS = Full under ATSCHK: the address is a PA and bypasses translation.
    let m = s1_machine(ats_cfg(), 1);
    m.w32(off::CR0, CR0_ON | ATSCHK);
    m.mem.write(DATA + 0x5000, &[1, 2, 3, 4]).unwrap();
    let mut buf = [0u8; 4];
    m.smmu
        .dma_read_translated(SID, DATA + 0x5000, &mut buf)
        .unwrap();
    assert_eq!(buf, [1, 2, 3, 4]);
    // EATS = 0 but ATSCHK = 0: no checks, no event.
    let m = s1_machine(ats_cfg(), 0);
    m.smmu
        .dma_write_translated(SID, DATA + 0x6000, &[9, 9])
        .unwrap();
    m.mem.read(DATA + 0x6000, &mut buf[..2]).unwrap();
    assert_eq!(&buf[..2], &[9, 9]);
    // Beyond the OAS: aborted with no event (IMPLEMENTATION DEFINED choice).
    assert_eq!(
        m.smmu.translated(SID, 1 << 50, AccessKind::Read),
        Outcome::Abort
    );
    assert!(m.events().is_empty());
    // SMMUEN = 0: F_TRANSL_FORBIDDEN whatever ATSCHK says.
    m.w32(off::CR0, CR0_ON & !1);
    assert!(matches!(
        m.smmu.translated(SID, DATA, AccessKind::Read),
        Outcome::Fault {
            event: EventType::FTranslForbidden,
            recorded: true,
            ..
        }
    ));
    assert_eq!(one_record(&m, 0x07)[2], DATA);
}

#[test]
fn f_transl_forbidden_for_bypass_streams_and_silent_abort_for_disabled_ones() {
    let m = s1_machine(ats_cfg(), 1);
    m.w32(off::CR0, CR0_ON | ATSCHK);
    m.set_ste(
        7,
        &Ste {
            dw0: SteDw0::new().with_v(true).with_config(0b100),
            dw1: SteDw1::new().with_eats(1),
            ..Ste::default()
        },
    );
    assert!(matches!(
        m.smmu.translated(7, DATA, AccessKind::Read),
        Outcome::Fault {
            event: EventType::FTranslForbidden,
            ..
        }
    ));
    assert_eq!(one_record(&m, 0x07)[0], 0x07 | (7 << 32));
    m.set_ste(
        8,
        &Ste {
            dw0: SteDw0::new().with_v(true),
            ..Ste::default()
        },
    );
    assert_eq!(m.smmu.translated(8, DATA, AccessKind::Read), Outcome::Abort);
    // An invalid STE aborts silently too (C_BAD_STE is not recorded without REC_CFG_ATS).
    m.set_ste(9, &Ste::default());
    assert_eq!(m.smmu.translated(9, DATA, AccessKind::Read), Outcome::Abort);
    assert!(m.events().is_empty());
}

// ------------------------------------------------------------------ F_UUT

#[test]
fn f_uut_for_translated_traffic_without_ats() {
    let m = s1_machine(SmmuConfig::default(), 0);
    match m
        .smmu
        .translated(SID, 0xffff_0000_1234_5678, AccessKind::Read)
    {
        Outcome::Fault {
            event: EventType::FUut,
            recorded: true,
            termination: Termination::Abort,
        } => {}
        o => panic!("{o:?}"),
    }
    let r = one_record(&m, 0x01);
    // SSV = 0; RnW 99 = read; incoming InD/PnU (Data, unprivileged); InputAddr[63:0].
    assert_eq!(r[0], 0x01 | (u64::from(SID) << 32));
    assert_eq!(r[1], 1 << 35);
    assert_eq!(r[2], 0xffff_0000_1234_5678);
    assert_eq!(r[3], 0);
    // F_UUT may be recorded while SMMUEN = 0 (IHI0070 7.3.2).
    m.w32(off::CR0, CR0_ON & !1);
    assert!(matches!(
        m.smmu.translated(SID, 0x1000, AccessKind::Write),
        Outcome::Fault {
            event: EventType::FUut,
            recorded: true,
            ..
        }
    ));
    assert_eq!(one_record(&m, 0x01)[1], 0, "RnW = write");
    // The same traffic with ATS implemented (ATSCHK = 0) passes and records nothing.
    let m = s1_machine(ats_cfg(), 0);
    assert_eq!(
        m.smmu.translated(SID, 0x4000_1000, AccessKind::Read),
        Outcome::Translated { pa: 0x4000_1000 }
    );
    assert!(m.events().is_empty());
}

// ------------------------------------------------------------------ Split-stage ATS

/// A nested stream with STE.EATS = `eats` (see `common::nested_stream`).
fn nested_machine(eats: u8) -> (Machine, Ste) {
    let mut m = Machine::new(ats_cfg());
    let mut ste = nested_stream(&mut m, IOVA);
    ste.dw1 = ste.dw1.with_eats(eats);
    m.set_ste(SID, &ste);
    (m, ste)
}

#[test]
fn split_stage_answers_the_ipa_and_translates_translated_traffic_at_stage_2() {
    let (m, ste) = nested_machine(2);
    // ATSCHK = 0: Split-stage behaves as EATS = 0b00.
    assert!(matches!(
        m.smmu
            .ats_translation_request(&AtsRequest::new(SID, IOVA + 0x1008)),
        AtsCompletion::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq),
            ..
        }
    ));
    one_record(&m, 0x05);
    m.w32(off::CR0, CR0_ON | ATSCHK);
    let t = success(
        m.smmu
            .ats_translation_request(&AtsRequest::new(SID, IOVA + 0x1008)),
    );
    let ipa = IPA_BASE + (DATA - RAM) + 0x1000;
    assert_eq!((t.addr, t.size, t.read, t.write), (ipa, 0x1000, true, true));
    // The device then uses the IPA; the SMMU translates it at stage 2.
    m.mem.write(DATA + 0x1008, &[7, 7, 7]).unwrap();
    let mut buf = [0u8; 3];
    m.smmu
        .dma_read_translated(SID, t.translate(IOVA + 0x1008), &mut buf)
        .unwrap();
    assert_eq!(buf, [7, 7, 7]);
    // Full ATS on the same stream answers the PA instead.
    set_eats(&m, SID, &ste, 0);
    set_eats(&m, SID, &ste, 1);
    let t = success(
        m.smmu
            .ats_translation_request(&AtsRequest::new(SID, IOVA + 0x1008)),
    );
    assert_eq!(t.addr, DATA + 0x1000);
    assert!(m.events().is_empty());
}

#[test]
fn split_stage_translated_traffic_faults_at_stage_2_like_ordinary_traffic() {
    let (m, _) = nested_machine(2);
    m.w32(off::CR0, CR0_ON | ATSCHK);
    // An IPA stage 2 does not map (S2R = 1): F_TRANSLATION, S2 = 1, CLASS = IN.
    let ipa = IPA_BASE + 0x2000_0000;
    match m.smmu.translated(SID, ipa, AccessKind::Write) {
        Outcome::Fault {
            event: EventType::FTranslation,
            recorded: true,
            termination: Termination::Abort,
        } => {}
        o => panic!("{o:?}"),
    }
    let r = one_record(&m, 0x10);
    assert_eq!(r[0], 0x10 | (u64::from(SID) << 32), "no SubstreamID");
    assert_eq!(
        r[1],
        (1 << 39) | (2 << 40),
        "S2, CLASS = IN, write, Data, unprivileged"
    );
    assert_eq!(r[2], ipa);
    assert_eq!(r[3], ipa, "IPA[55:12]");
}

// ------------------------------------------------------------------ E_PAGE_REQUEST

#[test]
fn e_page_request_records_the_hint() {
    let m = s1_machine(ats_cfg(), 1);
    let hint = PageRequestHint {
        sid: SID,
        ssid: Some(3),
        addr: 0x1234_5678_9abc,
        span: 16,
        priv_read: true,
        priv_write: true,
        user_read: true,
        user_exec: true,
        ..PageRequestHint::default()
    };
    assert!(m.smmu.page_request_hint(&hint));
    let r = one_record(&m, 0x24);
    assert_eq!(r[0], 0x24 | (1 << 11) | (3 << 12) | (u64::from(SID) << 32));
    assert_eq!(
        r[1],
        (1 << 39) | (1 << 38) | (1 << 36) | (1 << 34) | (16 << 44),
        "pR pW uR uX, Span"
    );
    assert_eq!(r[2], 0x1234_5678_9000, "InputAddr[63:12]");
    assert_eq!(r[3], 0);
    // No pages, or the SMMU disabled: nothing is recorded.
    assert!(
        !m.smmu
            .page_request_hint(&PageRequestHint { span: 0, ..hint })
    );
    m.w32(off::CR0, CR0_ON & !1);
    assert!(!m.smmu.page_request_hint(&hint));
    assert!(m.events().is_empty());
    // A hint is not a PRI page request: the PRI queue is untouched.
    assert_eq!(m.smmu.stats().pri_requests, 0);
}
