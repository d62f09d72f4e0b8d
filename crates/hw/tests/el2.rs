//! EL2 and EL2-E2H stream worlds (IHI0070 3.17, 3.17.5, 4.4.2.7–4.4.2.10, 13.4.1): how their
//! TLB entries are tagged, and every EL2 invalidation command and broadcast against them.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_hw::cmd::{CmdqEntry, TlbiRange, build};
use twinmmu_hw::regs::off;
use twinmmu_hw::ste::SteDw1;
use twinmmu_hw::tlb::World;
use twinmmu_hw::{AccessKind, EventType, Outcome, SmmuConfig, Tlbi, TlbiOp, Transaction};
use twinmmu_vmsa::{Granule, S1LeafAttrs};

/// Non-global pages.
const VA0: u64 = 0x1000;
const VA1: u64 = 0x2000;
/// A global page.
const VG: u64 = 0x3000;
/// A page in the TTB1 range (used only in E2H, where an EL2 CD has two ranges).
const VHI: u64 = 0xffff_0000_0000_5000;
/// Two EL2 streams; their CDs carry ASIDs 5 and 6 (ignored without E2H).
const SID_A: u32 = 9;
const SID_B: u32 = 10;
/// STE.S2VMID of both streams: an EL2 regime has no VMID, so it must not matter.
const STE_VMID: u16 = 3;

fn ng() -> u64 {
    S1LeafAttrs {
        not_global: true,
        ..S1LeafAttrs::rw()
    }
    .bits()
}

fn global() -> u64 {
    S1LeafAttrs::rw().bits()
}

/// A machine with two STRW = EL2 streams, `e2h` setting CR2.E2H, `aset` the CDs' ASET.
fn el2_machine(e2h: bool, aset: bool) -> Machine {
    let mut m = Machine::new(SmmuConfig::default());
    if e2h {
        m.w32(off::CR2, 1);
        m.submit(&[build::cfgi_all(), build::sync()]);
    }
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(VA0, DATA, 0x1000, ng()).unwrap();
    b.map(VA1, DATA + 0x1000, 0x1000, ng()).unwrap();
    b.map(VG, DATA + 0x2000, 0x1000, global()).unwrap();
    let mut hi = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    hi.map(VHI & ((1 << 48) - 1), DATA + 0x5000, 0x1000, ng())
        .unwrap();
    for (i, (sid, asid)) in [(SID_A, 5u16), (SID_B, 6u16)].into_iter().enumerate() {
        let mut cd = s1_cd(Granule::Size4K, 48, b.root(), asid);
        cd.dw0 = cd
            .dw0
            .with_aset(aset)
            .with_epd1(false)
            .with_t1sz(16)
            .with_tg1(Granule::Size4K.tg1());
        cd.ttb1 = twinmmu_hw::cd::CdTtb::new().with_ttb(hi.root() >> 4);
        let cd_addr = CDS + 64 * i as u64;
        m.write_cd(cd_addr, &cd);
        let mut ste = s1_ste(cd_addr, 0, STE_VMID);
        ste.dw1 = SteDw1::new().with_strw(2);
        m.set_ste(sid, &ste);
    }
    m
}

fn read(sid: u32, va: u64) -> Transaction {
    Transaction::new(sid, None, va, AccessKind::Read, true)
}

/// Fills the TLB: A at VA0, VA1, VG; B at VA0, VG.
fn fill(m: &Machine) {
    for (sid, va) in [
        (SID_A, VA0),
        (SID_A, VA1),
        (SID_A, VG),
        (SID_B, VA0),
        (SID_B, VG),
    ] {
        assert!(
            matches!(m.smmu.translate(read(sid, va)), Outcome::Translated { .. }),
            "sid {sid} va {va:#x}"
        );
    }
}

/// The cached entries as (world, ASID, VA), sorted.
fn cached(m: &Machine) -> Vec<(World, Option<u16>, u64)> {
    let mut v: Vec<_> = m
        .smmu
        .tlb_entries()
        .iter()
        .map(|e| (e.ctx.world(), e.ctx.asid(), e.in_base))
        .collect();
    v.sort();
    v
}

fn cmd(m: &Machine, c: CmdqEntry) {
    m.submit(&[c, build::sync()]);
    assert!(m.cmdq_idle());
}

fn bcast(m: &Machine, t: Tlbi) {
    assert!(m.smmu.broadcast(t), "{t:?} honoured");
}

// ------------------------------------------------------------------------ EL2 (E2H = 0)

#[test]
fn el2_entries_carry_no_vmid_asid_or_aset() {
    let m = el2_machine(false, true);
    fill(&m);
    let es = m.smmu.tlb_entries();
    // A and B share every page: one regime without ASIDs (IHI0070 3.17 "all CDs are
    // considered equivalent"), so B's lookups hit A's entries.
    assert_eq!(es.len(), 3);
    for e in &es {
        assert_eq!(e.ctx.world(), World::El2);
        assert_eq!(e.ctx.asid(), None);
        assert_eq!(e.ctx.vmid(), 0, "EL2 has no VMID, whatever STE.S2VMID says");
        assert!(!e.ctx.aset(), "EL2 entries are not tagged with ASET");
    }
}

#[test]
fn el2_commands() {
    let m = el2_machine(false, false);
    fill(&m);
    let all = cached(&m);
    assert_eq!(all.len(), 3);
    // EL1 and all-non-EL2 scopes never reach EL2 entries (IHI0070 4.4.2.1, 4.4.3.2,
    // 4.4.4.1).
    for c in [
        build::tlbi_nh_all(0),
        build::tlbi_nh_all(STE_VMID),
        build::tlbi_nh_asid(0, 5),
        build::tlbi_nh_vaa(0, VA0, false),
        build::tlbi_s12_vmall(0),
        build::tlbi_nsnh_all(),
    ] {
        cmd(&m, c);
        assert_eq!(cached(&m), all, "{c:?}");
    }
    // EL2_ASID: EL2 entries have no ASID (4.4.2.10).
    cmd(&m, build::tlbi_el2_asid(5));
    assert_eq!(cached(&m), all);
    // EL2_VA ignores the ASID without E2H (4.4.2.8).
    cmd(&m, build::tlbi_el2_va(77, VA0, true));
    assert_eq!(
        cached(&m),
        vec![(World::El2, None, VA1), (World::El2, None, VG)]
    );
    // EL2_VAA.
    cmd(&m, build::tlbi_el2_vaa(VA1, false));
    assert_eq!(cached(&m), vec![(World::El2, None, VG)]);
    // EL2_ALL.
    cmd(&m, build::tlbi_el2_all());
    assert!(cached(&m).is_empty());

    // The range form of EL2_VA: two 4K pages from VA0.
    fill(&m);
    cmd(
        &m,
        build::with_range(build::tlbi_el2_va(0, VA0, false), 1, 1, 0, 0),
    );
    assert_eq!(cached(&m), vec![(World::El2, None, VG)]);
    cmd(
        &m,
        build::with_range(build::tlbi_el2_vaa(VA0, false), 1, 3, 0, 0),
    );
    assert!(cached(&m).is_empty());
}

#[test]
fn el2_broadcasts() {
    let m = el2_machine(false, false);
    let range = TlbiRange {
        tg_shift: 12,
        num: 1,
        scale: 0,
        ttl: 0,
    };
    // Issued from a context whose VMID is 7 and with an ASID operand: neither matters to
    // the EL2 world.
    for op in [TlbiOp::Vae2is, TlbiOp::Vale2is] {
        fill(&m);
        bcast(&m, Tlbi::new(op, 7).with_asid(99).with_addr(VA0 + 0x123));
        assert_eq!(
            cached(&m),
            vec![(World::El2, None, VA1), (World::El2, None, VG)],
            "{op:?}"
        );
        m.submit(&[build::tlbi_el2_all(), build::sync()]);
    }
    for op in [TlbiOp::Rvae2is, TlbiOp::Rvale2is] {
        fill(&m);
        bcast(
            &m,
            Tlbi::new(op, 7)
                .with_asid(99)
                .with_addr(VA0)
                .with_range(range),
        );
        assert_eq!(cached(&m), vec![(World::El2, None, VG)], "{op:?}");
        m.submit(&[build::tlbi_el2_all(), build::sync()]);
    }
    fill(&m);
    let all = cached(&m);
    // ASIDE2IS: the EL2 world has no ASIDs. EL1 broadcasts: not the EL2 world.
    for t in [
        Tlbi::new(TlbiOp::Aside2is, 0).with_asid(0),
        Tlbi::new(TlbiOp::Vmalle1is, 0),
        Tlbi::new(TlbiOp::Vaae1is, 0).with_addr(VA0),
        Tlbi::new(TlbiOp::Vmalls12e1is, STE_VMID),
        Tlbi::new(TlbiOp::Alle1is, 0),
    ] {
        bcast(&m, t);
        assert_eq!(cached(&m), all, "{t:?}");
    }
    bcast(&m, Tlbi::new(TlbiOp::Alle2is, 7));
    assert!(cached(&m).is_empty());
}

#[test]
fn el2_checks_every_access_as_privileged_with_one_xn_bit() {
    let m = el2_machine(false, false);
    let mem = m.mem.clone();
    let mut m = m;
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    // AP[1] = 0 (no EL0 access), PXN set (RES0 at EL2), UXN clear: readable and executable
    // at EL2 (IHI0070 13.4.1; DDI0487 D8.4: the EL2 regime's XN is bit 54).
    b.map(
        0x1000,
        DATA,
        0x1000,
        S1LeafAttrs {
            pxn: true,
            ..S1LeafAttrs::rw()
        }
        .bits(),
    )
    .unwrap();
    // Bit 54 set: execute-never at EL2.
    b.map(
        0x2000,
        DATA,
        0x1000,
        S1LeafAttrs {
            uxn: true,
            ..S1LeafAttrs::rw()
        }
        .bits(),
    )
    .unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 0));
    m.submit(&[
        build::cfgi_cd(SID_A, 0, true),
        build::tlbi_el2_all(),
        build::sync(),
    ]);
    let t = |va, kind, privileged| {
        m.smmu
            .translate(Transaction::new(SID_A, None, va, kind, privileged))
    };
    // An unprivileged access is checked as privileged: AP[1] = 0 does not deny it.
    assert_eq!(
        t(0x1000, AccessKind::Read, false),
        Outcome::Translated { pa: DATA }
    );
    assert_eq!(
        t(0x1000, AccessKind::Write, false),
        Outcome::Translated { pa: DATA }
    );
    assert_eq!(
        t(0x1000, AccessKind::Execute, false),
        Outcome::Translated { pa: DATA },
        "PXN is RES0 in the EL2 regime"
    );
    assert!(matches!(
        t(0x2000, AccessKind::Execute, true),
        Outcome::Fault {
            event: EventType::FPermission,
            ..
        }
    ));
    assert_eq!(
        t(0x2000, AccessKind::Read, false),
        Outcome::Translated { pa: DATA }
    );
}

// ------------------------------------------------------------------------ EL2-E2H

#[test]
fn e2h_cds_have_asids_and_two_ranges() {
    let m = el2_machine(true, false);
    fill(&m);
    assert_eq!(
        m.smmu.translate(read(SID_A, VHI + 8)),
        Outcome::Translated { pa: DATA + 0x5008 },
        "TTB1 is in use under E2H"
    );
    assert_eq!(
        cached(&m),
        vec![
            (World::El2E2h, None, VG),
            (World::El2E2h, Some(5), VA0),
            (World::El2E2h, Some(5), VA1),
            (World::El2E2h, Some(5), VHI),
            (World::El2E2h, Some(6), VA0),
        ]
    );
    for e in m.smmu.tlb_entries() {
        assert_eq!(e.ctx.vmid(), 0);
    }
    // Without E2H the same CDs have one range.
    let m = el2_machine(false, false);
    assert!(matches!(
        m.smmu.translate(read(SID_A, VHI)),
        Outcome::Fault {
            event: EventType::FTranslation,
            ..
        }
    ));
}

#[test]
fn e2h_commands() {
    let m = el2_machine(true, false);
    fill(&m);
    let w = World::El2E2h;
    // EL2_ASID: non-global entries of that ASID only (4.4.2.10).
    cmd(&m, build::tlbi_el2_asid(5));
    assert_eq!(cached(&m), vec![(w, None, VG), (w, Some(6), VA0)]);
    fill(&m);
    // EL2_VA with E2H: the ASID's entry at the VA, and a global one (4.4.2.8).
    cmd(&m, build::tlbi_el2_va(6, VA0, true));
    assert_eq!(
        cached(&m),
        vec![(w, None, VG), (w, Some(5), VA0), (w, Some(5), VA1)]
    );
    cmd(&m, build::tlbi_el2_va(6, VG, true));
    assert_eq!(cached(&m), vec![(w, Some(5), VA0), (w, Some(5), VA1)]);
    // EL2_VAA: every ASID (4.4.2.9).
    fill(&m);
    cmd(&m, build::tlbi_el2_vaa(VA0, false));
    assert_eq!(cached(&m), vec![(w, None, VG), (w, Some(5), VA1)]);
    // Range form of EL2_VA.
    fill(&m);
    cmd(
        &m,
        build::with_range(build::tlbi_el2_va(5, VA0, false), 1, 1, 0, 0),
    );
    assert_eq!(cached(&m), vec![(w, None, VG), (w, Some(6), VA0)]);
    // EL1 scopes do not reach EL2-E2H entries; EL2_ALL removes them all.
    fill(&m);
    let all = cached(&m);
    cmd(&m, build::tlbi_nh_asid(0, 5));
    cmd(&m, build::tlbi_nsnh_all());
    assert_eq!(cached(&m), all);
    cmd(&m, build::tlbi_el2_all());
    assert!(cached(&m).is_empty());
}

#[test]
fn e2h_broadcasts() {
    let m = el2_machine(true, false);
    let w = World::El2E2h;
    let range = TlbiRange {
        tg_shift: 12,
        num: 1,
        scale: 0,
        ttl: 0,
    };
    for op in [TlbiOp::Vae2is, TlbiOp::Vale2is] {
        fill(&m);
        bcast(&m, Tlbi::new(op, 7).with_asid(5).with_addr(VA0));
        assert_eq!(
            cached(&m),
            vec![(w, None, VG), (w, Some(5), VA1), (w, Some(6), VA0)],
            "{op:?}"
        );
        // The global entry matches any ASID.
        bcast(&m, Tlbi::new(op, 7).with_asid(6).with_addr(VG));
        assert_eq!(
            cached(&m),
            vec![(w, Some(5), VA1), (w, Some(6), VA0)],
            "{op:?}"
        );
        m.submit(&[build::tlbi_el2_all(), build::sync()]);
    }
    for op in [TlbiOp::Rvae2is, TlbiOp::Rvale2is] {
        fill(&m);
        bcast(
            &m,
            Tlbi::new(op, 7)
                .with_asid(5)
                .with_addr(VA0)
                .with_range(range),
        );
        assert_eq!(cached(&m), vec![(w, None, VG), (w, Some(6), VA0)], "{op:?}");
        m.submit(&[build::tlbi_el2_all(), build::sync()]);
    }
    fill(&m);
    bcast(&m, Tlbi::new(TlbiOp::Aside2is, 7).with_asid(6));
    assert_eq!(
        cached(&m),
        vec![(w, None, VG), (w, Some(5), VA0), (w, Some(5), VA1)]
    );
    bcast(&m, Tlbi::new(TlbiOp::Alle2is, 0));
    assert!(cached(&m).is_empty());
}

#[test]
fn e2h_aset_entries_skip_asid_scoped_broadcasts_only() {
    let m = el2_machine(true, true);
    fill(&m);
    let all = cached(&m);
    // IHI0070 3.17: ASET = 1 entries need not follow VA{L}E2IS / ASIDE2IS broadcasts.
    bcast(&m, Tlbi::new(TlbiOp::Vae2is, 0).with_asid(5).with_addr(VA0));
    bcast(&m, Tlbi::new(TlbiOp::Aside2is, 0).with_asid(6));
    assert_eq!(cached(&m), all);
    // Commands disregard ASET (4.4).
    cmd(&m, build::tlbi_el2_asid(6));
    assert_eq!(cached(&m).len(), all.len() - 1);
    // ALLE2IS removes them (3.17).
    bcast(&m, Tlbi::new(TlbiOp::Alle2is, 0));
    assert!(cached(&m).is_empty());
}

#[test]
fn e2h_change_refetches_cds() {
    // CR2.E2H changes how an EL2 CD decodes; the model re-decodes after the change (and
    // software must invalidate the EL2 TLB entries, IHI0070 3.17.5).
    let m = el2_machine(false, false);
    fill(&m);
    assert!(matches!(
        m.smmu.translate(read(SID_A, VHI)),
        Outcome::Fault { .. }
    ));
    m.w32(off::CR2, 1);
    m.submit(&[build::tlbi_el2_all(), build::sync()]);
    assert_eq!(
        m.smmu.translate(read(SID_A, VHI)),
        Outcome::Translated { pa: DATA + 0x5000 }
    );
    assert_eq!(cached(&m), vec![(World::El2E2h, Some(5), VHI)]);
}

/// A VHE host's TLBI VAAE1IS / VAALE1IS (and range forms) travel as the EL2&0 "by VA, all
/// ASIDs" operations and act as CMD_TLBI_EL2_VAA (IHI0070 4.4.2.9): every ASID's entry at
/// the address, global ones too, ASET = 1 ones too (not ASID-scoped), and nothing else;
/// without CR2.E2H, the EL2 world's entry at the address.
#[test]
fn vaae2is_acts_as_el2_vaa() {
    let w = World::El2E2h;
    for aset in [false, true] {
        let m = el2_machine(true, aset);
        for op in [TlbiOp::Vaae2is, TlbiOp::Vaale2is] {
            fill(&m);
            bcast(&m, Tlbi::new(op, 7).with_asid(99).with_addr(VA0));
            let after = cached(&m);
            assert_eq!(
                after,
                vec![(w, None, VG), (w, Some(5), VA1)],
                "{op:?}, ASET {aset}"
            );
            fill(&m);
            cmd(&m, build::tlbi_el2_vaa(VA0, op.is_leaf()));
            assert_eq!(cached(&m), after, "{op:?} = EL2_VAA");
            bcast(&m, Tlbi::new(op, 7).with_addr(VG));
            assert_eq!(cached(&m), vec![(w, Some(5), VA1)], "a global entry");
            m.submit(&[build::tlbi_el2_all(), build::sync()]);
        }
        let range = TlbiRange {
            tg_shift: 12,
            num: 1,
            scale: 0,
            ttl: 0,
        };
        for op in [TlbiOp::Rvaae2is, TlbiOp::Rvaale2is] {
            fill(&m);
            bcast(&m, Tlbi::new(op, 7).with_addr(VA0).with_range(range));
            assert_eq!(cached(&m), vec![(w, None, VG)], "{op:?}, ASET {aset}");
            m.submit(&[build::tlbi_el2_all(), build::sync()]);
        }
    }
    let m = el2_machine(false, false);
    fill(&m);
    bcast(&m, Tlbi::new(TlbiOp::Vaae2is, 7).with_addr(VA0));
    assert_eq!(
        cached(&m),
        vec![(World::El2, None, VA1), (World::El2, None, VG)]
    );
}
