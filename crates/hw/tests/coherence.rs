//! TLB coherence: random tables and random changes, each followed by a correct invalidation
//! (a command through the queue and CMD_SYNC, or a broadcast TLBI), and every translation
//! must equal a TLB-less walk of the tables in memory. The negative: when the invalidation
//! is skipped, a stale translation is observed.
//!
//! Also the concurrency test: translations from several threads (through DMA ports with
//! micro-TLBs and through the SMMU's main path) against a thread that remaps and
//! invalidates; no translation that starts after a CMD_SYNC completed may see a mapping
//! older than that SYNC.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use proptest::prelude::*;
use twinmmu_hw::cd::{ContextDescriptor, decode_cd};
use twinmmu_hw::cmd::build;
use twinmmu_hw::mem::WalkMem;
use twinmmu_hw::ste::StreamWorld;
use twinmmu_hw::{AccessKind, EventType, Outcome, PhysMem, SmmuConfig, Tlbi, TlbiOp, Transaction};
use twinmmu_vmsa::{Access, FaultKind, Granule, S1LeafAttrs, WalkError, check_s1, walk_stage1};

const SID: u32 = 3;
const VMID: u16 = 7;
const ASID: u16 = 5;
const PAGES: u64 = 24;
const IOVA0: u64 = 0x4000_0000_0000 >> 4;

fn attrs(ro: bool, global: bool) -> u64 {
    S1LeafAttrs {
        read_only: ro,
        el0: true,
        not_global: !global,
        ..S1LeafAttrs::rw()
    }
    .bits()
}

/// What the tables say for `va` with `kind`: Ok(pa) or the event a fault would raise.
fn reference(
    m: &Machine,
    cd: &ContextDescriptor,
    va: u64,
    kind: AccessKind,
) -> Result<u64, EventType> {
    let c = decode_cd(cd, StreamWorld::NsEl1, m.smmu.config()).unwrap();
    let mem = WalkMem(&*m.mem);
    let t = walk_stage1(&c.walk, &mem, &mut twinmmu_vmsa::Direct, va).map_err(|e| match e {
        WalkError::Fault(f) => match f.kind {
            FaultKind::Translation => EventType::FTranslation,
            FaultKind::AccessFlag => EventType::FAccess,
            FaultKind::Permission => EventType::FPermission,
            FaultKind::AddressSize => EventType::FAddrSize,
            FaultKind::ExternalAbort { .. } => EventType::FWalkEabt,
        },
        WalkError::TableFetch { error, .. } => match error {},
    })?;
    check_s1(t.perms, Access::new(kind, false), c.walk.controls())
        .map_err(|_| EventType::FPermission)?;
    Ok(t.output)
}

fn observed(o: Outcome) -> Result<u64, EventType> {
    match o {
        Outcome::Translated { pa } => Ok(pa),
        Outcome::Fault { event, .. } => Err(event),
        other => panic!("unexpected {other:?}"),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Map {
        page: u64,
        frame: u64,
        ro: bool,
        global: bool,
    },
    Unmap {
        page: u64,
    },
    Translate {
        page: u64,
        write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..PAGES, 0..64u64, any::<bool>(), any::<bool>()).prop_map(|(page, frame, ro, global)| {
            Op::Map {
                page,
                frame,
                ro,
                global,
            }
        }),
        (0..PAGES).prop_map(|page| Op::Unmap { page }),
        (0..PAGES, any::<bool>()).prop_map(|(page, write)| Op::Translate { page, write }),
        (0..PAGES, any::<bool>()).prop_map(|(page, write)| Op::Translate { page, write }),
    ]
}

/// The invalidation used after a change (all of them correct for a single-page change).
#[derive(Debug, Clone, Copy)]
enum Inval {
    NhVa,
    NhVaa,
    NhAsid,
    NhAll,
    Range,
    NsnhAll,
    BroadcastVae1,
    BroadcastVaae1,
    BroadcastVmalle1,
}

fn inval() -> impl Strategy<Value = Inval> {
    prop_oneof![
        Just(Inval::NhVa),
        Just(Inval::NhVaa),
        Just(Inval::NhAsid),
        Just(Inval::NhAll),
        Just(Inval::Range),
        Just(Inval::NsnhAll),
        Just(Inval::BroadcastVae1),
        Just(Inval::BroadcastVaae1),
        Just(Inval::BroadcastVmalle1),
    ]
}

fn invalidate(m: &Machine, how: Inval, va: u64, global_changed: bool) {
    // NH_ASID does not remove global entries: fall back to NH_VA when one changed.
    let how = match how {
        Inval::NhAsid if global_changed => Inval::NhVa,
        h => h,
    };
    match how {
        Inval::NhVa => {
            m.submit(&[build::tlbi_nh_va(VMID, ASID, va, true), build::sync()]);
        }
        Inval::NhVaa => {
            m.submit(&[build::tlbi_nh_vaa(VMID, va, false), build::sync()]);
        }
        Inval::NhAsid => {
            m.submit(&[build::tlbi_nh_asid(VMID, ASID), build::sync()]);
        }
        Inval::NhAll => {
            m.submit(&[build::tlbi_nh_all(VMID), build::sync()]);
        }
        Inval::Range => {
            // Two 4K pages from the page below (NUM = 1, SCALE = 0).
            let base = va.saturating_sub(0x1000);
            let c = build::with_range(build::tlbi_nh_va(VMID, ASID, base, true), 1, 1, 0, 3);
            m.submit(&[c, build::sync()]);
        }
        Inval::NsnhAll => {
            m.submit(&[build::tlbi_nsnh_all(), build::sync()]);
        }
        Inval::BroadcastVae1 => {
            assert!(
                m.smmu.broadcast(
                    Tlbi::new(TlbiOp::Vae1is, VMID)
                        .with_asid(ASID)
                        .with_addr(va)
                )
            );
        }
        Inval::BroadcastVaae1 => {
            assert!(
                m.smmu
                    .broadcast(Tlbi::new(TlbiOp::Vaae1is, VMID).with_addr(va))
            );
        }
        Inval::BroadcastVmalle1 => {
            assert!(m.smmu.broadcast(Tlbi::new(TlbiOp::Vmalle1is, VMID)));
        }
    }
    assert!(m.cmdq_idle());
}

fn setup(
    tlb_capacity: usize,
) -> (
    Machine,
    twinmmu_vmsa::TableBuilder<&'static twinmmu_hw::SparseMem, twinmmu_vmsa::BumpAllocator>,
    ContextDescriptor,
) {
    let mut m = Machine::new(SmmuConfig {
        tlb_capacity,
        ..SmmuConfig::default()
    });
    // The builder borrows memory for 'static: leak one Arc clone (tests only).
    let mem: &'static twinmmu_hw::SparseMem = Box::leak(Box::new(m.mem.clone()));
    let b = s1_builder(mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    let cd = s1_cd(Granule::Size4K, 48, b.root(), ASID);
    m.write_cd(CDS, &cd);
    m.set_ste(SID, &s1_ste(CDS, 0, VMID));
    (m, b, cd)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if std::env::var_os("TWINMMU_LONG").is_some() { 512 } else { 24 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn translations_match_a_tlbless_walk(ops in proptest::collection::vec((op(), inval()), 1..80), cap in 4usize..64) {
        let (m, mut b, cd) = setup(cap);
        let mut port = m.smmu.port();
        let mut global = [false; PAGES as usize];
        let mut mapped = [false; PAGES as usize];
        for (o, how) in ops {
            match o {
                Op::Map { page, frame, ro, global: g } => {
                    let va = IOVA0 + page * 0x1000;
                    if mapped[page as usize] {
                        b.unmap(va, 0x1000).unwrap();
                    }
                    b.map(va, DATA + frame * 0x1000, 0x1000, attrs(ro, g)).unwrap();
                    let changed_global = g || global[page as usize];
                    global[page as usize] = g;
                    mapped[page as usize] = true;
                    invalidate(&m, how, va, changed_global);
                }
                Op::Unmap { page } => {
                    let va = IOVA0 + page * 0x1000;
                    if mapped[page as usize] {
                        b.unmap(va, 0x1000).unwrap();
                        mapped[page as usize] = false;
                        invalidate(&m, how, va, global[page as usize]);
                    }
                }
                Op::Translate { page, write } => {
                    let va = IOVA0 + page * 0x1000 + 0x10;
                    let kind = if write { AccessKind::Write } else { AccessKind::Read };
                    let t = Transaction::new(SID, None, va, kind, false);
                    let want = reference(&m, &cd, va, kind);
                    prop_assert_eq!(observed(m.smmu.translate(t)), want);
                    prop_assert_eq!(observed(port.translate(t)), want);
                }
            }
            // After every step the whole range agrees with the tables.
            for page in 0..PAGES {
                let va = IOVA0 + page * 0x1000;
                let t = Transaction::new(SID, None, va, AccessKind::Read, false);
                prop_assert_eq!(observed(m.smmu.translate(t)), reference(&m, &cd, va, AccessKind::Read));
            }
            m.events();
        }
        prop_assert!(m.smmu.tlb_entries().len() <= cap);
    }
}

#[test]
fn a_skipped_invalidation_is_observed_as_stale() {
    let (m, mut b, cd) = setup(64);
    let va = IOVA0;
    b.map(va, DATA, 0x1000, attrs(false, false)).unwrap();
    let t = Transaction::new(SID, None, va, AccessKind::Read, false);
    let mut port = m.smmu.port();
    assert_eq!(observed(m.smmu.translate(t)), Ok(DATA));
    assert_eq!(observed(port.translate(t)), Ok(DATA));
    // Remap without invalidating: the TLB (and the micro-TLB) still answer the old PA.
    b.unmap(va, 0x1000).unwrap();
    b.map(va, DATA + 0x5000, 0x1000, attrs(false, false))
        .unwrap();
    assert_eq!(reference(&m, &cd, va, AccessKind::Read), Ok(DATA + 0x5000));
    assert_eq!(
        observed(m.smmu.translate(t)),
        Ok(DATA),
        "stale main-TLB entry"
    );
    assert_eq!(
        observed(port.translate(t)),
        Ok(DATA),
        "stale micro-TLB entry"
    );
    // A CFGI does not touch the TLB (§4.10): still stale.
    m.submit(&[build::cfgi_all(), build::sync()]);
    assert_eq!(observed(m.smmu.translate(t)), Ok(DATA));
    // The right TLBI fixes both levels.
    m.submit(&[build::tlbi_nh_va(VMID, ASID, va, true), build::sync()]);
    assert_eq!(observed(m.smmu.translate(t)), Ok(DATA + 0x5000));
    assert_eq!(observed(port.translate(t)), Ok(DATA + 0x5000));
    // A TLBI for another ASID or VMID leaves a stale entry in place.
    b.unmap(va, 0x1000).unwrap();
    b.map(va, DATA + 0x6000, 0x1000, attrs(false, false))
        .unwrap();
    m.submit(&[
        build::tlbi_nh_va(VMID, ASID + 1, va, true),
        build::tlbi_nh_all(VMID + 1),
        build::sync(),
    ]);
    assert_eq!(observed(port.translate(t)), Ok(DATA + 0x5000));
}

/// Writes the level-3 descriptor of `va` in place (single-copy atomic), so a concurrent
/// walk sees either the old or the new page, never a transient fault.
fn leaf_pa(m: &Machine, cd: &ContextDescriptor, va: u64) -> u64 {
    let c = decode_cd(cd, StreamWorld::NsEl1, m.smmu.config()).unwrap();
    walk_stage1(&c.walk, &WalkMem(&*m.mem), &mut twinmmu_vmsa::Direct, va)
        .unwrap()
        .descriptor_pa
}

#[test]
fn concurrent_translation_never_sees_a_mapping_older_than_a_completed_sync() {
    let long = std::env::var_os("TWINMMU_LONG").is_some();
    let gens: u64 = if long { 20_000 } else { 1_500 };
    let (m, mut b, cd) = setup(256);
    let pages = 8u64;
    for p in 0..pages {
        b.map(IOVA0 + p * 0x1000, DATA, 0x1000, attrs(false, false))
            .unwrap();
    }
    let descs: Vec<u64> = (0..pages)
        .map(|p| leaf_pa(&m, &cd, IOVA0 + p * 0x1000))
        .collect();
    let template = m.mem.read_u64(descs[0]).unwrap() & !0x0000_ffff_ffff_f000;
    let m = Arc::new(m);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(std::sync::Barrier::new(4));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (m, done, stop, started, reads) = (
            m.clone(),
            done.clone(),
            stop.clone(),
            started.clone(),
            reads.clone(),
        );
        readers.push(std::thread::spawn(move || {
            let mut port = m.smmu.port();
            let mut n = 0u64;
            started.wait();
            while !stop.load(Ordering::Acquire) {
                let p = (n + r) % pages;
                // The generation completed before this translation starts.
                let g0 = done.load(Ordering::Acquire);
                let t = Transaction::new(SID, None, IOVA0 + p * 0x1000, AccessKind::Read, false);
                let o = if r == 0 {
                    m.smmu.translate(t)
                } else {
                    port.translate(t)
                };
                let Outcome::Translated { pa } = o else {
                    panic!("{o:?}")
                };
                let g = (pa - DATA) / 0x1000;
                assert!(
                    g >= g0,
                    "page {p}: saw generation {g} after SYNC of {g0} completed"
                );
                n += 1;
                reads.fetch_add(1, Ordering::Relaxed);
            }
            n
        }));
    }
    started.wait();
    for g in 1..=gens {
        // Interleave with the readers even on a two-core machine: every 16 generations,
        // wait until they have translated a few more times.
        if g % 16 == 0 {
            let r0 = reads.load(Ordering::Relaxed);
            while reads.load(Ordering::Relaxed) < r0 + 3 {
                std::thread::yield_now();
            }
        }
        for d in &descs {
            m.mem.write_u64(*d, template | (DATA + g * 0x1000)).unwrap();
        }
        // Vary the invalidation: by ASID, by VA range, whole VMID, broadcast.
        match g % 4 {
            0 => m.submit(&[build::tlbi_nh_asid(VMID, ASID), build::sync()]),
            1 => m.submit(&[
                build::with_range(build::tlbi_nh_va(VMID, ASID, IOVA0, true), 1, 7, 0, 3),
                build::sync(),
            ]),
            2 => m.submit(&[build::tlbi_nh_all(VMID), build::sync()]),
            _ => {
                m.smmu.broadcast(Tlbi::new(TlbiOp::Vmalle1is, VMID));
                0
            }
        };
        done.store(g, Ordering::Release);
    }
    stop.store(true, Ordering::Release);
    let total: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(
        total >= gens / 16 * 3,
        "readers ran alongside the writer ({total} translations)"
    );
}
