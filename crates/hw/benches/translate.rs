//! SMMU hot paths: TLB-hit translation (1 and 2 threads) at both cache levels, S1 4-level
//! and nested 4+4 misses, by-VMID invalidation against a full scan, and a 1 GiB range
//! invalidation. In the same run: the floor (a bare hashbrown lookup over the same keys)
//! and the peer (the `smmu` crate 1.8's cached translation).
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use hashbrown::HashMap;
use rustc_hash::FxBuildHasher;
use twinmmu_benchkit::{Report, criterion};
use twinmmu_hw::ste::SteDw0;
use twinmmu_hw::tlb::{AsidMatch, Ctx, EntryPerms, InvScope, Kind, Tlb, TlbEntry, World};
use twinmmu_hw::{AccessKind, Outcome, Smmu, SmmuConfig, Tlbi, TlbiOp, Transaction};
use twinmmu_vmsa::{Granule, S2LeafAttrs};

/// Pages translated by the hit benchmarks (within the micro-TLB's reach).
const KEYS: u64 = 64;
const IOVA: u64 = 0x10_0000;
const SID: u32 = 1;

fn s1_machine(tlb_capacity: usize) -> Machine {
    let mut m = Machine::new(SmmuConfig {
        tlb_capacity,
        utlb_entries: 256,
        ..SmmuConfig::default()
    });
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    // 4096 pages in 16 MiB, so misses walk distinct level-3 tables.
    b.map(IOVA, DATA, 4096 * 0x1000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 1));
    m.set_ste(SID, &s1_ste(CDS, 0, 1));
    m
}

/// A nested machine: stream SID + k (k < `streams`) uses VMID 3 + k over the same stage-2
/// and stage-1 tables.
fn nested_machine(tlb_capacity: usize, streams: u32) -> Machine {
    let mut m = Machine::new(SmmuConfig {
        tlb_capacity,
        ..SmmuConfig::default()
    });
    let mem = m.mem.clone();
    // Stage 2: 48-bit IPA from level 0, 4K pages only (4 levels on every walk).
    let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48, 0);
    let mut off = 0;
    while off < 0x200_0000 {
        s2.map(TABLES + off, TABLES + off, 0x1000, S2LeafAttrs::rw().bits())
            .unwrap();
        off += 0x1000;
    }
    s2.map(CDS, CDS, 0x1000, S2LeafAttrs::rw().bits()).unwrap();
    let mut off = 0;
    while off < 0x100_0000 {
        s2.map(DATA + off, DATA + off, 0x1000, S2LeafAttrs::rw().bits())
            .unwrap();
        off += 0x1000;
    }
    let s2root = s2.root();
    let mut s1 = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    s1.map(IOVA, DATA, 4096 * 0x1000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, s1.root(), 1));
    for k in 0..streams {
        let mut ste = s2_ste(Granule::Size4K, 48, 0, s2root, 3 + k as u16);
        ste.dw0 = SteDw0::new()
            .with_v(true)
            .with_config(0b111)
            .with_s1_context_ptr(CDS >> 6);
        m.set_ste(SID + k, &ste);
    }
    m
}

/// Streams of the cold nested benchmark: SID + k uses VMID 3 + k over the same tables, so
/// the first translation of each stream after an ALLE1IS finds nothing of its VMID cached.
const COLD_STREAMS: u32 = 64;

fn txn(i: u64) -> Transaction {
    Transaction::new(
        SID,
        None,
        IOVA + (i % KEYS) * 0x1000 + 0x40,
        AccessKind::Read,
        false,
    )
}

fn pa_of(o: Outcome) -> u64 {
    match o {
        Outcome::Translated { pa } => pa,
        o => panic!("{o:?}"),
    }
}

fn floor_map() -> HashMap<(u32, u64), u64, FxBuildHasher> {
    let mut h = HashMap::with_hasher(FxBuildHasher);
    for i in 0..KEYS {
        h.insert((SID, (IOVA >> 12) + i), DATA + i * 0x1000);
    }
    h
}

fn peer() -> (smmu::SMMU, Vec<smmu::types::IOVA>) {
    use smmu::types::{
        IOVA as PIova, PA, PASID, PagePermissions, SecurityState, StreamConfig, StreamID,
    };
    let s = smmu::SMMU::new();
    let sid = StreamID::new(SID).unwrap();
    let cfg = StreamConfig {
        translation_enabled: true,
        stage1_enabled: true,
        ..StreamConfig::default()
    };
    s.configure_stream(sid, cfg).unwrap();
    s.create_pasid(sid, PASID::new(0).unwrap()).unwrap();
    let mut iovas = Vec::new();
    for i in 0..KEYS {
        let iova = PIova::new(IOVA + i * 0x1000).unwrap();
        s.map_page(
            sid,
            PASID::new(0).unwrap(),
            iova,
            PA::new(DATA + i * 0x1000).unwrap(),
            PagePermissions::read_write(),
            SecurityState::NonSecure,
        )
        .unwrap();
        iovas.push(iova);
    }
    (s, iovas)
}

fn peer_translate(s: &smmu::SMMU, iova: smmu::types::IOVA) -> bool {
    use smmu::types::{AccessType, PASID, SecurityState, StreamID};
    s.translate(
        StreamID::new(SID).unwrap(),
        PASID::new(0).unwrap(),
        iova,
        AccessType::Read,
        SecurityState::NonSecure,
    )
    .is_ok()
}

/// Runs `f(state, i)` `iters` times on each of two threads started together, each with
/// its own `mk()` state (a DMA port, say); returns the wall time, i.e. the per-translation
/// latency with two threads translating concurrently.
fn two_threads<S, M, F>(iters: u64, mk: M, f: F) -> Duration
where
    M: Fn() -> S + Sync,
    F: Fn(&mut S, u64) + Sync,
{
    let barrier = Barrier::new(3);
    let done = Barrier::new(3);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (mk, f, barrier, done) = (&mk, &f, &barrier, &done);
            s.spawn(move || {
                let mut st = mk();
                barrier.wait();
                for i in 0..iters {
                    f(&mut st, i + t * 7);
                }
                done.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        done.wait();
        start.elapsed()
    })
}

fn tlb_entry(vmid: u16, asid: u16, va: u64) -> TlbEntry {
    TlbEntry {
        ctx: Ctx::new(World::NsEl1, Kind::S1, vmid, Some(asid), false),
        in_base: va,
        shift: 12,
        out_base: va,
        ipa_base: va,
        tg_shift: 12,
        perms: EntryPerms { s1: None, s2: None },
    }
}

fn main() {
    let mut c = criterion();

    // ---------------------------------------------------------------- hits
    let m = s1_machine(16384);
    let mut port = m.smmu.port();
    for i in 0..KEYS {
        pa_of(port.translate(txn(i)));
    }
    let floor = floor_map();
    let (p, piovas) = peer();
    for i in &piovas {
        assert!(peer_translate(&p, *i));
    }
    {
        let mut g = c.benchmark_group("hit");
        let mut i = 0u64;
        g.bench_function("floor", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let t = txn(i);
                black_box(
                    floor
                        .get(&(t.sid, t.addr >> 12))
                        .map(|pa| pa | (t.addr & 0xfff)),
                )
            })
        });
        g.bench_function("utlb", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(port.translate(black_box(txn(i))))
            })
        });
        g.bench_function("main", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(m.smmu.translate(black_box(txn(i))))
            })
        });
        g.bench_function("peer", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(peer_translate(&p, piovas[(i % KEYS) as usize]))
            })
        });
        g.finish();
    }
    {
        let smmu: Arc<Smmu> = m.smmu.clone();
        let mut g = c.benchmark_group("hit2");
        g.bench_function("floor", |b| {
            b.iter_custom(|iters| {
                two_threads(
                    iters,
                    || (),
                    |_, i| {
                        let t = txn(i);
                        black_box(floor.get(&(t.sid, t.addr >> 12)));
                    },
                )
            })
        });
        g.bench_function("utlb", |b| {
            b.iter_custom(|iters| {
                two_threads(
                    iters,
                    || {
                        let mut port = smmu.port();
                        for i in 0..KEYS {
                            pa_of(port.translate(txn(i)));
                        }
                        port
                    },
                    |port, i| {
                        black_box(port.translate(txn(i)));
                    },
                )
            })
        });
        g.bench_function("main", |b| {
            b.iter_custom(|iters| {
                two_threads(
                    iters,
                    || (),
                    |_, i| {
                        black_box(smmu.translate(txn(i)));
                    },
                )
            })
        });
        g.bench_function("peer", |b| {
            b.iter_custom(|iters| {
                two_threads(
                    iters,
                    || (),
                    |_, i| {
                        black_box(peer_translate(&p, piovas[(i % KEYS) as usize]));
                    },
                )
            })
        });
        g.finish();
    }

    // ---------------------------------------------------------------- misses
    {
        // TLB capacity 1: every translation walks completely (config cached).
        let s1 = s1_machine(1);
        let nested = nested_machine(1, 1);
        let mut g = c.benchmark_group("miss");
        let mut i = 0u64;
        g.bench_function("s1_4level", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let t = Transaction::new(
                    SID,
                    None,
                    IOVA + (i % 4096) * 0x1000,
                    AccessKind::Read,
                    false,
                );
                black_box(pa_of(s1.smmu.translate(t)))
            })
        });
        g.bench_function("nested_4x4", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let t = Transaction::new(
                    SID,
                    None,
                    IOVA + (i % 4096) * 0x1000,
                    AccessKind::Read,
                    false,
                );
                black_box(pa_of(nested.smmu.translate(t)))
            })
        });
        // The realistic nested miss: the combined VA -> PA entry misses, but stage 2 of the
        // stage-1 table IPAs and of the output IPA hits in the TLB's S2 entries (as in
        // QEMU, and as a TCU's S2 TLB / walk caches would). Each timed batch translates 64
        // distinct VAs; between batches (untimed) a VMALLE1IS broadcast removes the
        // combined entries of the VMID and leaves its S2 entries.
        let warm = nested_machine(16384, 1);
        for k in 0..4096u64 {
            pa_of(warm.smmu.translate(Transaction::new(
                SID,
                None,
                IOVA + k * 0x1000,
                AccessKind::Read,
                false,
            )));
        }
        warm.smmu.broadcast(Tlbi::new(TlbiOp::Vmalle1is, 3));
        let before = warm.smmu.stats();
        let mut base = 0u64;
        g.bench_function("nested_4x4_s2_warm", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                let mut done = 0u64;
                while done < iters {
                    let n = (iters - done).min(64);
                    let s = Instant::now();
                    for k in 0..n {
                        let va = IOVA + ((base + k) % 4096) * 0x1000;
                        black_box(pa_of(warm.smmu.translate(Transaction::new(
                            SID,
                            None,
                            va,
                            AccessKind::Read,
                            false,
                        ))));
                    }
                    t += s.elapsed();
                    base += n;
                    warm.smmu.broadcast(Tlbi::new(TlbiOp::Vmalle1is, 3));
                    done += n;
                }
                t
            })
        });
        // The cold nested miss without evictions: a TLB with room, each translation the
        // first of its VMID since the last ALLE1IS (untimed, between batches), so all 24
        // descriptors are read and all 6 entries inserted, none evicted.
        let cold = nested_machine(16384, COLD_STREAMS);
        let mut va_k = 0u64;
        g.bench_function("nested_4x4_cold", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                let mut done = 0u64;
                while done < iters {
                    let n = (iters - done).min(u64::from(COLD_STREAMS));
                    va_k = va_k.wrapping_add(1);
                    let va = IOVA + (va_k % 4096) * 0x1000;
                    let s = Instant::now();
                    for k in 0..n {
                        black_box(pa_of(cold.smmu.translate(Transaction::new(
                            SID + k as u32,
                            None,
                            va,
                            AccessKind::Read,
                            false,
                        ))));
                    }
                    t += s.elapsed();
                    cold.smmu.broadcast(Tlbi::new(TlbiOp::Alle1is, 0));
                    done += n;
                }
                t
            })
        });
        g.finish();
        let cs = cold.smmu.stats();
        println!(
            "cold nested miss with room: {:.1} descriptor reads and {:.2} evictions per translation",
            cs.desc_reads.iter().flatten().sum::<u64>() as f64 / cs.translations.max(1) as f64,
            cs.tlb_evictions as f64 / cs.translations.max(1) as f64
        );
        let after = warm.smmu.stats();
        let n = after.translations - before.translations;
        let reads = |s: &twinmmu_hw::SmmuStats| -> [u64; 2] {
            [s.desc_reads[0].iter().sum(), s.desc_reads[1].iter().sum()]
        };
        let (r0, r1) = (reads(&before), reads(&after));
        println!(
            "nested miss, S2 warm: {:.2} S1 and {:.2} S2 descriptor reads per translation",
            (r1[0] - r0[0]) as f64 / n.max(1) as f64,
            (r1[1] - r0[1]) as f64 / n.max(1) as f64
        );
        let st = nested.smmu.stats();
        let reads: u64 = st.desc_reads.iter().flatten().sum();
        println!(
            "nested miss: {:.1} descriptor reads per translation ({} S1 walks, {} S2 walks)",
            reads as f64 / st.translations.max(1) as f64,
            st.walks_s1,
            st.walks_s2
        );
    }

    // ---------------------------------------------------------------- invalidation
    {
        // 10^5 entries: 100 VMIDs × 10 ASIDs × 100 pages; one VMID = 1%.
        let mut tlb = Tlb::new(100_000);
        for v in 0..100u16 {
            for a in 0..10u16 {
                for p in 0..100u64 {
                    tlb.insert(tlb_entry(v, a, (u64::from(a) << 32) | (p << 12)));
                }
            }
        }
        assert_eq!(tlb.len(), 100_000);
        let by_vmid = |v: u16| InvScope {
            worlds: 1,
            kinds: InvScope::ALL_KINDS,
            vmid: Some(v),
            asid: AsidMatch::Any,
            skip_aset: false,
            range: None,
        };
        let refill = |tlb: &mut Tlb, v: u16| {
            for a in 0..10u16 {
                for p in 0..100u64 {
                    tlb.insert(tlb_entry(v, a, (u64::from(a) << 32) | (p << 12)));
                }
            }
        };
        let mut g = c.benchmark_group("inval");
        let mut v = 0u16;
        g.bench_function("by_vmid", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    v = (v + 1) % 100;
                    let s = Instant::now();
                    assert_eq!(tlb.invalidate(&by_vmid(v)), 1000);
                    t += s.elapsed();
                    refill(&mut tlb, v);
                }
                t
            })
        });
        g.bench_function("full_scan", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    v = (v + 1) % 100;
                    let s = Instant::now();
                    assert_eq!(tlb.invalidate_by_scan(&by_vmid(v)), 1000);
                    t += s.elapsed();
                    refill(&mut tlb, v);
                }
                t
            })
        });
        // A 1 GiB range over a context holding 10 entries spread over that GiB, in a TLB of
        // 10^5 entries.
        for k in 0..10u64 {
            tlb.insert(tlb_entry(200, 1, 0x4000_0000 + k * 0x600_0000));
        }
        let range = InvScope {
            worlds: 1,
            kinds: InvScope::ALL_KINDS,
            vmid: Some(200),
            asid: AsidMatch::AsidOrGlobal(1),
            skip_aset: false,
            range: Some((0x4000_0000, 0x8000_0000)),
        };
        g.bench_function("range_1g", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let s = Instant::now();
                    assert_eq!(tlb.invalidate(&range), 10);
                    t += s.elapsed();
                    for k in 0..10u64 {
                        tlb.insert(tlb_entry(200, 1, 0x4000_0000 + k * 0x600_0000));
                    }
                }
                t
            })
        });
        g.finish();
    }

    // ---------------------------------------------------------------- invalidation, SMMU
    {
        // The same by-VMID shape through the SMMU (the store and its lock-free lookup
        // array): 100 stage-2 streams of 1000 4K pages, one VMID each, 10^5 entries; a
        // VMALLS12E1IS broadcast removes one VMID's 1000 (1%). Refills are untimed.
        let mut m = Machine::new(SmmuConfig {
            tlb_capacity: 131_072,
            ..SmmuConfig::default()
        });
        let mem = m.mem.clone();
        let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48, 0);
        for p in 0..1000u64 {
            s2.map(
                0x1000_0000 + p * 0x1000,
                DATA + p * 0x1000,
                0x1000,
                S2LeafAttrs::rw().bits(),
            )
            .unwrap();
        }
        let root = s2.root();
        for v in 0..100u32 {
            m.set_ste(v, &s2_ste(Granule::Size4K, 48, 0, root, v as u16 + 1));
        }
        let fill = |v: u32| {
            for p in 0..1000u64 {
                pa_of(m.smmu.translate(Transaction::new(
                    v,
                    None,
                    0x1000_0000 + p * 0x1000,
                    AccessKind::Read,
                    false,
                )));
            }
        };
        for v in 0..100 {
            fill(v);
        }
        assert_eq!(m.smmu.stats().tlb_entries, 100_000);
        let mut g = c.benchmark_group("inval");
        g.sample_size(10).measurement_time(Duration::from_secs(1));
        let mut v = 0u32;
        g.bench_function("smmu_by_vmid", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    v = (v + 1) % 100;
                    let before = m.smmu.stats().entries_removed;
                    let s = Instant::now();
                    m.smmu
                        .broadcast(Tlbi::new(TlbiOp::Vmalls12e1is, v as u16 + 1));
                    t += s.elapsed();
                    assert_eq!(m.smmu.stats().entries_removed - before, 1000);
                    fill(v);
                }
                t
            })
        });
        g.finish();
    }

    Report::new("SMMU translation (TLB hit; 64 pages; S1 4K)")
        .median("micro-TLB hit, 1 thread", "hit/utlb")
        .median("main-TLB hit, 1 thread", "hit/main")
        .median("floor: hashbrown lookup, 1 thread", "hit/floor")
        .median("peer: smmu 1.8 cached translate, 1 thread", "hit/peer")
        .ratio("micro-TLB hit / floor", "hit/utlb", "hit/floor", Some(2.0))
        .ratio(
            "micro-TLB hit / peer (target <= 0.5)",
            "hit/utlb",
            "hit/peer",
            Some(0.5),
        )
        .ratio("main-TLB hit / floor", "hit/main", "hit/floor", None)
        .ratio("main-TLB hit / peer", "hit/main", "hit/peer", None)
        .ratio(
            "2 threads: micro-TLB hit / floor",
            "hit2/utlb",
            "hit2/floor",
            Some(2.0),
        )
        .ratio(
            "2 threads: micro-TLB hit / peer",
            "hit2/utlb",
            "hit2/peer",
            Some(0.5),
        )
        .ratio(
            "2 threads: main-TLB hit / floor",
            "hit2/main",
            "hit2/floor",
            None,
        )
        .ratio(
            "2 threads: main-TLB hit / peer",
            "hit2/main",
            "hit2/peer",
            None,
        )
        .print();
    Report::new("SMMU misses (config cached)")
        .median("S1 4-level miss, TLB capacity 1", "miss/s1_4level")
        .median(
            "nested 4+4 miss, TLB capacity 1 (cold: 24 reads, 6 evictions)",
            "miss/nested_4x4",
        )
        .median(
            "nested 4+4 miss, cold, TLB with room (24 reads, 6 inserts)",
            "miss/nested_4x4_cold",
        )
        .median(
            "nested 4+4 miss, S2 entries warm (4 S1 reads)",
            "miss/nested_4x4_s2_warm",
        )
        .ratio(
            "cold nested miss / micro-TLB hit",
            "miss/nested_4x4",
            "hit/utlb",
            Some(25.0),
        )
        .ratio(
            "cold nested miss / main-TLB hit",
            "miss/nested_4x4",
            "hit/main",
            Some(25.0),
        )
        .ratio(
            "cold nested miss (room) / main-TLB hit",
            "miss/nested_4x4_cold",
            "hit/main",
            Some(25.0),
        )
        .ratio(
            "warm nested miss / micro-TLB hit",
            "miss/nested_4x4_s2_warm",
            "hit/utlb",
            Some(25.0),
        )
        .ratio(
            "warm nested miss / main-TLB hit",
            "miss/nested_4x4_s2_warm",
            "hit/main",
            Some(25.0),
        )
        .print();
    Report::new("SMMU TLB invalidation (10^5 entries)")
        .median("by VMID, removing 1% (1000 entries)", "inval/by_vmid")
        .median("full scan, same scope", "inval/full_scan")
        .median("1 GiB range over 10 entries", "inval/range_1g")
        .median(
            "through the SMMU: VMALLS12E1IS removing 1% (1000 entries)",
            "inval/smmu_by_vmid",
        )
        .ratio(
            "by VMID / full scan (target <= 0.05)",
            "inval/by_vmid",
            "inval/full_scan",
            Some(0.05),
        )
        .print();
}
