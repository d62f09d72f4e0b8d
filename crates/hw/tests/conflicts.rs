//! TLB and configuration cache conflicts (IHI0070 3.20, 7.3.17, 7.3.18): provoked the way
//! software bugs provoke them — tables changed without break-before-make and without
//! invalidation; contiguous STE spans (STE.CONT) over STEs that are not identical — and
//! checked field by field. The same setups with the bug removed record nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_hw::cmd::build;
use twinmmu_hw::ste::{Ste, SteDw0, SteDw1};
use twinmmu_hw::{AccessKind, EventType, Outcome, PhysMem, SmmuConfig, Termination, Transaction};
use twinmmu_vmsa::Granule;

/// 2 MiB aligned, so one level-2 descriptor covers IOVA..IOVA+2M.
const IOVA: u64 = 0x20_0000;
const SID: u32 = 0x12;
const BLOCK_PA: u64 = DATA + 0x40_0000;

fn read(addr: u64) -> Transaction {
    Transaction::new(SID, None, addr, AccessKind::Read, false)
}

/// A stage-1 stream mapping IOVA..+8K with 4 KiB pages; returns the machine and the
/// address of the level-2 descriptor covering IOVA (a table descriptor).
fn paged_machine() -> (Machine, u64) {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(IOVA, DATA, 0x2000, urw()).unwrap();
    let root = b.root();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, root, 3));
    m.set_ste(SID, &s1_ste(CDS, 0, 1));
    // Level 0 → level 1 → level 2 (4 KiB granule, 48-bit VA).
    let next = |table: u64, va: u64, shift: u32| {
        let d = m.mem.read_u64(table + ((va >> shift) & 511) * 8).unwrap();
        assert_eq!(d & 3, 3, "table descriptor");
        d & 0x0000_ffff_ffff_f000
    };
    let l1 = next(root, IOVA, 39);
    let l2 = next(l1, IOVA, 30);
    (m, l2 + ((IOVA >> 21) & 511) * 8)
}

/// Replaces the level-2 table descriptor by a 2 MiB block at BLOCK_PA, with no
/// break-before-make and no invalidation.
fn make_block(m: &Machine, l2desc: u64) {
    m.mem.write_u64(l2desc, BLOCK_PA | urw() | 0b01).unwrap();
}

#[test]
fn f_tlb_conflict_when_a_block_is_cached_over_a_page() {
    let (m, l2desc) = paged_machine();
    assert_eq!(
        m.smmu.translate(read(IOVA + 8)),
        Outcome::Translated { pa: DATA + 8 }
    );
    make_block(&m, l2desc);
    // IOVA + 4K was never cached: its walk finds the block, whose entry would overlap the
    // cached 4 KiB entry of IOVA.
    match m.smmu.translate(read(IOVA + 0x1010)) {
        Outcome::Fault {
            event: EventType::FTlbConflict,
            recorded: true,
            termination: Termination::Abort,
        } => {}
        o => panic!("{o:?}"),
    }
    let evs = m.events();
    assert_eq!(evs.len(), 1, "{evs:x?}");
    let r = evs[0];
    assert_eq!(
        r[0],
        0x20 | (u64::from(SID) << 32),
        "Type, no SubstreamID, StreamID"
    );
    assert_eq!(r[1], 1 << 35, "RnW = read, data, unprivileged, S2 = 0");
    assert_eq!(r[2], IOVA + 0x1010, "InputAddr");
    assert_eq!(r[3], 0, "IPA unknown for S2 = 0");
    // The conflicting entry was not cached: the conflict persists until software
    // invalidates...
    assert!(matches!(
        m.smmu.translate(read(IOVA + 0x1010)),
        Outcome::Fault {
            event: EventType::FTlbConflict,
            ..
        }
    ));
    assert_eq!(m.events().len(), 1);
    // ... and the old page still translates as cached.
    assert_eq!(
        m.smmu.translate(read(IOVA + 8)),
        Outcome::Translated { pa: DATA + 8 }
    );
    // After TLBI_NH_ALL + SYNC (the entries are global) the block is used everywhere.
    m.submit(&[build::tlbi_nh_all(1), build::sync()]);
    assert_eq!(
        m.smmu.translate(read(IOVA + 0x1010)),
        Outcome::Translated {
            pa: BLOCK_PA + 0x1010
        }
    );
    assert_eq!(
        m.smmu.translate(read(IOVA + 8)),
        Outcome::Translated { pa: BLOCK_PA + 8 }
    );
    assert!(m.events().is_empty());
}

#[test]
fn no_tlb_conflict_when_the_change_is_invalidated() {
    let (m, l2desc) = paged_machine();
    assert_eq!(
        m.smmu.translate(read(IOVA + 8)),
        Outcome::Translated { pa: DATA + 8 }
    );
    make_block(&m, l2desc);
    m.submit(&[build::tlbi_nh_all(1), build::sync()]);
    assert_eq!(
        m.smmu.translate(read(IOVA + 0x1010)),
        Outcome::Translated {
            pa: BLOCK_PA + 0x1010
        }
    );
    assert!(m.events().is_empty());
}

// ------------------------------------------------------------------ F_CFG_CONFLICT

/// A bypass STE, privileged by PRIVCFG when `privileged`, with STE.CONT = `cont`.
fn bypass(cont: u8, privileged: bool) -> Ste {
    Ste {
        dw0: SteDw0::new().with_v(true).with_config(0b100),
        dw1: SteDw1::new()
            .with_cont(cont)
            .with_privcfg(if privileged { 3 } else { 0 }),
        ..Ste::default()
    }
}

fn bypassed(m: &Machine, sid: u32) -> bool {
    let t = Transaction::new(sid, None, 0x4000_0000, AccessKind::Read, false);
    m.smmu.translate(t) == Outcome::Translated { pa: 0x4000_0000 }
}

const SPAN: u32 = 0x40;

#[test]
fn f_cfg_conflict_when_a_contiguous_span_covers_a_different_ste() {
    let m = Machine::new(SmmuConfig::default());
    // STE 0x40 claims (CONT = 2) that 0x40..0x43 are identical; 0x41 is not.
    m.set_ste(SPAN, &bypass(2, false));
    m.set_ste(SPAN + 1, &bypass(0, true));
    assert!(bypassed(&m, SPAN + 1));
    match m.smmu.translate(Transaction::new(
        SPAN,
        None,
        0x1000,
        AccessKind::Read,
        false,
    )) {
        Outcome::Fault {
            event: EventType::FCfgConflict,
            recorded: true,
            termination: Termination::Abort,
        } => {}
        o => panic!("{o:?}"),
    }
    let evs = m.events();
    assert_eq!(evs.len(), 1, "{evs:x?}");
    // Type, SSV = 0, StreamID; Reason (IMPLEMENTATION DEFINED) 0, the rest RES0.
    assert_eq!(evs[0], [0x21 | (u64::from(SPAN) << 32), 0, 0, 0]);
    // Software invalidates both STEs of the span it got wrong: the span then caches.
    m.submit(&[
        build::cfgi_ste(SPAN, false),
        build::cfgi_ste(SPAN + 1, false),
        build::sync(),
    ]);
    assert!(bypassed(&m, SPAN));
    // The span entry now serves 0x41 too (CONSTRAINED UNPREDICTABLE: a neighbour's STE).
    assert!(bypassed(&m, SPAN + 1));
    assert!(m.events().is_empty());
}

#[test]
fn contiguous_spans_of_identical_stes_cache_as_one_and_no_conflict() {
    let m = Machine::new(SmmuConfig::default());
    // Identical but for CONT: no conflict whatever the order.
    m.set_ste(SPAN, &bypass(2, false));
    m.set_ste(SPAN + 1, &bypass(0, false));
    assert!(bypassed(&m, SPAN + 1));
    assert!(bypassed(&m, SPAN));
    // STE 0x42 in memory is all zeros (V = 0, C_BAD_STE), but the span entry fetched for
    // 0x40 matches it: it is not fetched.
    let fetches = m.smmu.stats().ste_fetches;
    assert!(bypassed(&m, SPAN + 2));
    assert_eq!(m.smmu.stats().ste_fetches, fetches);
    // CFGI of one StreamID of the span drops the span entry: 0x42 is fetched again.
    m.submit(&[build::cfgi_ste(SPAN + 3, false), build::sync()]);
    assert!(!bypassed(&m, SPAN + 2));
    let evs = m.events();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0][0] & 0xff, 0x04, "C_BAD_STE");
}

#[test]
fn different_stes_without_cont_do_not_conflict() {
    let m = Machine::new(SmmuConfig::default());
    m.set_ste(SPAN, &bypass(0, false));
    m.set_ste(SPAN + 1, &bypass(0, true));
    assert!(bypassed(&m, SPAN + 1));
    assert!(bypassed(&m, SPAN));
    assert!(m.events().is_empty());
}
