//! TLB coherence for nested translation, stage-2 side. The TLB caches stage 2 of the
//! stage-1 table IPAs and of the output IPAs (S2 entries) as well as combined VA -> PA
//! entries. Random stage-2 changes (remapping a data IPA, with or without write
//! permission; moving the IPA of the stage-1 level-3 table to another frame holding
//! different descriptors), each followed by a correct invalidation (TLBI_S2_IPA +
//! TLBI_NH_ALL, TLBI_S12_VMALL, TLBI_NSNH_ALL, IPAS2E1IS + VMALLE1IS, VMALLS12E1IS), and
//! every translation must equal a TLB-less nested walk. The negative: without TLBI_S2_IPA,
//! the cached stage 2 of a table IPA keeps the walk on the old table.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proptest::prelude::*;
use twinmmu_hw::cd::decode_cd;
use twinmmu_hw::cmd::build;
use twinmmu_hw::mem::WalkMem;
use twinmmu_hw::ste::{SteDw0, StreamConfig, StreamWorld, decode_ste};
use twinmmu_hw::{AccessKind, EventType, Outcome, PhysMem, SmmuConfig, Tlbi, TlbiOp, Transaction};
use twinmmu_vmsa::{
    Access, BumpAllocator, Fault, FaultKind, Granule, S2LeafAttrs, Stage1Config, Stage2Config,
    TableBuilder, WalkError, check_s1, walk_stage1, walk_stage2,
};

const SID: u32 = 5;
const VMID: u16 = 9;
const ASID: u16 = 4;
const PAGES: u64 = 16;
const IOVA0: u64 = 0x7f_0000_0000;
/// Stage-1 output IPAs (outside RAM: stage 2 must translate them).
const IPA_DATA: u64 = 0x1_0000_0000;

type Builder = TableBuilder<&'static twinmmu_hw::SparseMem, BumpAllocator>;

struct Nested {
    m: Machine,
    s2: Builder,
    s1: Stage1Config,
    s2cfg: Stage2Config,
    /// IPA (= original PA) of the stage-1 level-3 table, and the alternative frame.
    l3: u64,
    alt: u64,
    on_alt: bool,
}

fn rw() -> u64 {
    S2LeafAttrs::rw().bits()
}

fn ro() -> u64 {
    S2LeafAttrs {
        write: false,
        ..S2LeafAttrs::rw()
    }
    .bits()
}

fn setup(tlb_capacity: usize) -> Nested {
    let mut m = Machine::new(SmmuConfig {
        tlb_capacity,
        ..SmmuConfig::default()
    });
    let mem: &'static twinmmu_hw::SparseMem = Box::leak(Box::new(m.mem.clone()));
    let mut s2: Builder = s2_builder(mem, m.alloc(0x40_0000), Granule::Size4K, 48, 0);
    // Stage-1 tables at IPA = PA (stage 2 maps them one to one, 4K pages).
    let s1_mem = m.alloc(0x40_0000);
    let mut s1b = s1_builder(mem, s1_mem, Granule::Size4K, 48);
    s1b.map(IOVA0, IPA_DATA, PAGES * 0x1000, urw()).unwrap();
    for page in 0..4 {
        let a = s1_mem + page * 0x1000;
        s2.map(a, a, 0x1000, rw()).unwrap();
    }
    s2.map(CDS, CDS, 0x1000, rw()).unwrap();
    for p in 0..PAGES {
        s2.map(IPA_DATA + p * 0x1000, DATA + p * 0x1000, 0x1000, rw())
            .unwrap();
    }
    let cd = s1_cd(Granule::Size4K, 48, s1b.root(), ASID);
    m.write_cd(CDS, &cd);
    let mut ste = s2_ste(Granule::Size4K, 48, 0, s2.root(), VMID);
    ste.dw0 = SteDw0::new()
        .with_v(true)
        .with_config(0b111)
        .with_s1_context_ptr(CDS >> 6);
    m.set_ste(SID, &ste);
    let s2cfg = match decode_ste(&ste, m.smmu.config()).unwrap() {
        StreamConfig::Translate { s2: Some(s2), .. } => s2.walk,
        other => panic!("{other:?}"),
    };
    let s1 = decode_cd(&cd, StreamWorld::NsEl1, m.smmu.config())
        .unwrap()
        .walk;
    // The level-3 table: where the leaf descriptor of IOVA0 lives (IPA = PA here).
    let leaf = walk_stage1(&s1, &WalkMem(mem), &mut twinmmu_vmsa::Direct, IOVA0).unwrap();
    let l3 = leaf.descriptor_pa & !0xfff;
    // The alternative level-3 table: page p maps IPA_DATA + (p + 5) % PAGES, page 0 is
    // invalid, the other entries as the original.
    let alt = m.alloc(0x1000);
    for i in 0..512u64 {
        let d = mem.read_u64(l3 + 8 * i).unwrap();
        mem.write_u64(alt + 8 * i, d).unwrap();
    }
    let idx0 = (IOVA0 >> 12) & 511;
    for p in 0..PAGES {
        let a = alt + 8 * (idx0 + p);
        let d = mem.read_u64(a).unwrap();
        let ipa = IPA_DATA + ((p + 5) % PAGES) * 0x1000;
        let nd = if p == 0 {
            0
        } else {
            (d & !0x0000_ffff_ffff_f000) | ipa
        };
        mem.write_u64(a, nd).unwrap();
    }
    std::mem::forget(s1b);
    Nested {
        m,
        s2,
        s1,
        s2cfg,
        l3,
        alt,
        on_alt: false,
    }
}

fn event_of(f: Fault) -> EventType {
    match f.kind {
        FaultKind::Translation => EventType::FTranslation,
        FaultKind::AccessFlag => EventType::FAccess,
        FaultKind::Permission => EventType::FPermission,
        FaultKind::AddressSize => EventType::FAddrSize,
        FaultKind::ExternalAbort { .. } => EventType::FWalkEabt,
    }
}

/// A TLB-less nested walk: stage 2 for every stage-1 table IPA and for the output.
fn reference(n: &Nested, va: u64, kind: AccessKind) -> Result<u64, EventType> {
    let mem = WalkMem(&*n.m.mem);
    let mut hook = |ipa: u64, _level: u8| -> Result<u64, EventType> {
        walk_stage2(&n.s2cfg, &mem, ipa)
            .map(|t| t.output)
            .map_err(event_of)
    };
    let t = walk_stage1(&n.s1, &mem, &mut hook, va).map_err(|e| match e {
        WalkError::Fault(f) => event_of(f),
        WalkError::TableFetch { error, .. } => error,
    })?;
    let o = walk_stage2(&n.s2cfg, &mem, t.output).map_err(event_of)?;
    let a = Access::new(kind, false);
    check_s1(t.perms, a, n.s1.controls()).map_err(|_| EventType::FPermission)?;
    o.check(a).map_err(event_of)?;
    Ok(o.output)
}

fn observed(o: Outcome) -> Result<u64, EventType> {
    match o {
        Outcome::Translated { pa } => Ok(pa),
        Outcome::Fault { event, .. } => Err(event),
        other => panic!("unexpected {other:?}"),
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Stage 2 maps IPA_DATA + page to DATA + frame, writable or not.
    RemapData {
        page: u64,
        frame: u64,
        write: bool,
    },
    /// Stage 2 moves the level-3 table's IPA to the other frame.
    SwapTable,
    Translate {
        page: u64,
        write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..PAGES, 0..32u64, any::<bool>()).prop_map(|(page, frame, write)| Op::RemapData {
            page,
            frame,
            write
        }),
        Just(Op::SwapTable),
        (0..PAGES, any::<bool>()).prop_map(|(page, write)| Op::Translate { page, write }),
    ]
}

/// Invalidations that are correct after a stage-2 change at one IPA.
#[derive(Debug, Clone, Copy)]
enum Inval {
    S2IpaNhAll,
    S2IpaRangeNhAll,
    S12Vmall,
    NsnhAll,
    BroadcastIpas2Vmalle1,
    BroadcastVmalls12,
}

fn inval() -> impl Strategy<Value = Inval> {
    prop_oneof![
        Just(Inval::S2IpaNhAll),
        Just(Inval::S2IpaRangeNhAll),
        Just(Inval::S12Vmall),
        Just(Inval::NsnhAll),
        Just(Inval::BroadcastIpas2Vmalle1),
        Just(Inval::BroadcastVmalls12),
    ]
}

fn invalidate(m: &Machine, how: Inval, ipa: u64) {
    match how {
        Inval::S2IpaNhAll => {
            m.submit(&[
                build::tlbi_s2_ipa(VMID, ipa, false),
                build::tlbi_nh_all(VMID),
                build::sync(),
            ]);
        }
        Inval::S2IpaRangeNhAll => {
            // Two 4K pages from the page below the IPA.
            let c = build::with_range(build::tlbi_s2_ipa(VMID, ipa - 0x1000, false), 1, 1, 0, 0);
            m.submit(&[c, build::tlbi_nh_all(VMID), build::sync()]);
        }
        Inval::S12Vmall => {
            m.submit(&[build::tlbi_s12_vmall(VMID), build::sync()]);
        }
        Inval::NsnhAll => {
            m.submit(&[build::tlbi_nsnh_all(), build::sync()]);
        }
        Inval::BroadcastIpas2Vmalle1 => {
            assert!(
                m.smmu
                    .broadcast(Tlbi::new(TlbiOp::Ipas2e1is, VMID).with_addr(ipa))
            );
            assert!(m.smmu.broadcast(Tlbi::new(TlbiOp::Vmalle1is, VMID)));
        }
        Inval::BroadcastVmalls12 => {
            assert!(m.smmu.broadcast(Tlbi::new(TlbiOp::Vmalls12e1is, VMID)));
        }
    }
    assert!(m.cmdq_idle());
}

fn swap_table(n: &mut Nested) {
    n.on_alt = !n.on_alt;
    let target = if n.on_alt { n.alt } else { n.l3 };
    n.s2.unmap(n.l3, 0x1000).unwrap();
    n.s2.map(n.l3, target, 0x1000, rw()).unwrap();
}

fn check_all(n: &Nested, port: &mut twinmmu_hw::DmaPort) -> Result<(), TestCaseError> {
    for page in 0..PAGES {
        let va = IOVA0 + page * 0x1000 + 0x18;
        for write in [false, true] {
            let kind = if write {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            let t = Transaction::new(SID, None, va, kind, false);
            let want = reference(n, va, kind);
            prop_assert_eq!(
                observed(n.m.smmu.translate(t)),
                want,
                "page {} {:?}",
                page,
                kind
            );
            prop_assert_eq!(observed(port.translate(t)), want, "port, page {}", page);
        }
    }
    n.m.events();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if std::env::var_os("TWINMMU_LONG").is_some() { 256 } else { 16 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn nested_translations_match_a_tlbless_walk(
        ops in proptest::collection::vec((op(), inval()), 1..40),
        cap in prop_oneof![Just(8usize), Just(64), Just(4096)],
    ) {
        let mut n = setup(cap);
        let mut port = n.m.smmu.port();
        check_all(&n, &mut port)?;
        for (o, how) in ops {
            match o {
                Op::RemapData { page, frame, write } => {
                    let ipa = IPA_DATA + page * 0x1000;
                    n.s2.unmap(ipa, 0x1000).unwrap();
                    n.s2.map(ipa, DATA + frame * 0x1000, 0x1000, if write { rw() } else { ro() })
                        .unwrap();
                    invalidate(&n.m, how, ipa);
                }
                Op::SwapTable => {
                    swap_table(&mut n);
                    invalidate(&n.m, how, n.l3);
                }
                Op::Translate { page, write } => {
                    let va = IOVA0 + page * 0x1000;
                    let kind = if write { AccessKind::Write } else { AccessKind::Read };
                    let t = Transaction::new(SID, None, va, kind, false);
                    prop_assert_eq!(observed(n.m.smmu.translate(t)), reference(&n, va, kind));
                }
            }
            check_all(&n, &mut port)?;
        }
    }
}

#[test]
fn the_stage2_entry_of_a_table_ipa_needs_tlbi_s2_ipa() {
    let mut n = setup(4096);
    let va = IOVA0 + 3 * 0x1000;
    let t = Transaction::new(SID, None, va, AccessKind::Read, false);
    assert_eq!(observed(n.m.smmu.translate(t)), Ok(DATA + 3 * 0x1000));
    let cached_s2 = n.m.smmu.stats().walks_s2;
    // Stage 2 moves the level-3 table; only the combined entries are invalidated.
    swap_table(&mut n);
    n.m.submit(&[build::tlbi_nh_all(VMID), build::sync()]);
    assert_eq!(reference(&n, va, AccessKind::Read), Ok(DATA + 8 * 0x1000));
    assert_eq!(
        observed(n.m.smmu.translate(t)),
        Ok(DATA + 3 * 0x1000),
        "the walk still reads the old table through the cached S2 entry"
    );
    assert_eq!(
        n.m.smmu.stats().walks_s2,
        cached_s2,
        "no stage-2 walk was needed"
    );
    // TLBI_S2_IPA of the table IPA (and NH_ALL for the combined entry) fixes it.
    n.m.submit(&[
        build::tlbi_s2_ipa(VMID, n.l3, true),
        build::tlbi_nh_all(VMID),
        build::sync(),
    ]);
    assert_eq!(observed(n.m.smmu.translate(t)), Ok(DATA + 8 * 0x1000));
    // Another VMID's invalidation leaves it alone.
    swap_table(&mut n);
    n.m.submit(&[
        build::tlbi_s2_ipa(VMID + 1, n.l3, false),
        build::tlbi_nh_all(VMID),
        build::sync(),
    ]);
    assert_eq!(
        observed(n.m.smmu.translate(t)),
        Ok(DATA + 8 * 0x1000),
        "stale"
    );
    n.m.submit(&[build::tlbi_s12_vmall(VMID), build::sync()]);
    assert_eq!(observed(n.m.smmu.translate(t)), Ok(DATA + 3 * 0x1000));
}
