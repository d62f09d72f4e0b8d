//! Builder → walker round trips for every granule and both stages, against a plain model of
//! the mapped ranges: every reported change and every probed translation must match.

#![allow(clippy::unwrap_used)]

use std::ops::Range;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use twinmmu_vmsa::*;

fn cases() -> u32 {
    if std::env::var("TWINMMU_LONG").is_ok_and(|v| v == "1") {
        2048
    } else {
        48
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        start: u64,
        len: u64,
        pa: u64,
        attr: u8,
    },
    Unmap {
        start: u64,
        len: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    stage: Stage,
    granule: Granule,
    /// TnSZ / S2T0SZ.
    tsz: u8,
    /// S2SL0 (stage 2 only).
    sl0: u8,
}

fn shapes() -> Vec<Shape> {
    use Granule::*;
    let s1 = |granule, tsz| Shape {
        stage: Stage::Stage1,
        granule,
        tsz,
        sl0: 0,
    };
    let s2 = |granule, tsz, sl0| Shape {
        stage: Stage::Stage2,
        granule,
        tsz,
        sl0,
    };
    vec![
        s1(Size4K, 16),
        s1(Size4K, 25),
        s1(Size4K, 34),
        s1(Size16K, 16),
        s1(Size16K, 17),
        s1(Size16K, 28),
        s1(Size64K, 16),
        s1(Size64K, 22),
        s1(Size64K, 34),
        s2(Size4K, 24, 1),  // L1, 2 tables
        s2(Size4K, 21, 1),  // L1, 16 tables
        s2(Size4K, 16, 2),  // L0
        s2(Size4K, 30, 0),  // L2, 16 tables
        s2(Size16K, 24, 1), // L2, 16 tables
        s2(Size16K, 17, 2), // L1
        s2(Size64K, 22, 1), // L2
        s2(Size64K, 18, 1), // L2, 16 tables
        s2(Size64K, 16, 2), // L1
    ]
}

/// Leaf attributes by index, for both stages (permissions vary so the walker's decode is
/// checked as well as the address).
fn attrs(stage: Stage, i: u8) -> u64 {
    match stage {
        Stage::Stage1 => S1LeafAttrs {
            attr_index: i & 7,
            read_only: i & 1 != 0,
            el0: i & 2 != 0,
            pxn: i & 4 != 0,
            uxn: i & 8 != 0,
            not_global: i & 16 != 0,
            ..S1LeafAttrs::rw()
        }
        .bits(),
        Stage::Stage2 => S2LeafAttrs {
            mem_attr: i & 0xF,
            read: i & 1 != 0,
            write: i & 2 != 0,
            xn: (i >> 2) & 3,
            ..S2LeafAttrs::rw()
        }
        .bits(),
    }
}

struct Model {
    /// Non-overlapping, unsorted: (input range, output base, attr index).
    ranges: Vec<(Range<u64>, u64, u8)>,
}

impl Model {
    fn overlaps(&self, r: &Range<u64>) -> bool {
        self.ranges
            .iter()
            .any(|(m, _, _)| m.start < r.end && r.start < m.end)
    }
    fn lookup(&self, a: u64) -> Option<(u64, u8)> {
        self.ranges
            .iter()
            .find(|(m, _, _)| m.contains(&a))
            .map(|(m, pa, at)| (pa + (a - m.start), *at))
    }
    /// Removes `r`; returns the removed pieces, sorted and coalesced.
    fn remove(&mut self, r: &Range<u64>) -> Vec<Range<u64>> {
        let mut removed = Vec::new();
        let mut kept = Vec::new();
        for (m, pa, at) in self.ranges.drain(..) {
            if m.end <= r.start || r.end <= m.start {
                kept.push((m, pa, at));
                continue;
            }
            let s = m.start.max(r.start);
            let e = m.end.min(r.end);
            removed.push(s..e);
            if m.start < s {
                kept.push((m.start..s, pa, at));
            }
            if e < m.end {
                kept.push((e..m.end, pa + (e - m.start), at));
            }
        }
        self.ranges = kept;
        removed.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in removed {
            match out.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }
}

fn run(shape: Shape, ops: &[(u8, u64, u64, u64, u8, u8)], probes: &[u64]) {
    let g = shape.granule;
    let f = Features::default();
    let mem = SparseMemory::new();
    let (fmt, ia_bits) = match shape.stage {
        Stage::Stage1 => {
            let ia = 64 - shape.tsz;
            (TableFormat::stage1(g, ia, PaSize::Bits48).unwrap(), ia)
        }
        Stage::Stage2 => {
            let p = Stage2Params {
                s2t0sz: shape.tsz,
                s2sl0: shape.sl0,
                s2tg: g.s2tg(),
                s2ps: 5,
                ..Default::default()
            };
            let cfg = Stage2Config::new(&p, &f).unwrap();
            (TableFormat::of_stage2(&cfg), 64 - shape.tsz)
        }
    };
    let mut b = TableBuilder::new(fmt, &mem, BumpAllocator::new(1 << 46, 1 << 40)).unwrap();
    let root_bytes = b.allocator().live_bytes();
    let s1cfg = Stage1Config::new(
        &Stage1Params {
            ttb: [
                TtbParams {
                    ttb: b.root(),
                    tsz: shape.tsz,
                    tg: g.tg0(),
                    ..Default::default()
                },
                TtbParams {
                    epd: true,
                    ..Default::default()
                },
            ],
            ips: 5,
            ..Default::default()
        },
        &f,
    );
    let s2cfg = Stage2Config::new(
        &Stage2Params {
            s2ttb: b.root(),
            s2t0sz: shape.tsz,
            s2sl0: shape.sl0,
            s2tg: g.s2tg(),
            s2ps: 5,
            ..Default::default()
        },
        &f,
    );
    let page = g.size();
    let l2 = 1u64 << g.level_shift(2);
    let space = 1u64 << ia_bits;
    let window = space.min(64 * l2);
    let mut model = Model { ranges: Vec::new() };

    // Decode raw op tuples into page/block-aligned ranges inside the window.
    let decoded: Vec<Op> = ops
        .iter()
        .map(|&(kind, a, n, p, extra, attr)| {
            let unit = if a & 1 == 0 { page } else { l2.min(window / 2) };
            let start = ((a >> 1) % (window / unit)) * unit;
            let len = ((n % 4) + 1) * unit + (extra as u64 % 3) * page;
            let len = len.min(window - start);
            if kind % 3 == 0 {
                Op::Unmap { start, len }
            } else {
                // Outputs sometimes only page aligned, so block-aligned inputs must fall back
                // to smaller entries.
                let pa_unit = if p & 1 == 0 { page } else { unit };
                let pa = ((p >> 1) % ((1 << 40) / pa_unit)) * pa_unit;
                Op::Map {
                    start,
                    len,
                    pa,
                    attr,
                }
            }
        })
        .collect();

    for op in &decoded {
        match *op {
            Op::Map {
                start,
                len,
                pa,
                attr,
            } => {
                let r = start..start + len;
                let res = b.map(start, pa, len, attrs(shape.stage, attr));
                if model.overlaps(&r) {
                    assert!(
                        matches!(res, Err(BuildError::AlreadyMapped { .. })),
                        "{op:?}: {res:?}"
                    );
                } else {
                    let ch = res.unwrap();
                    assert_eq!(ch.leaves, vec![r.clone()], "{op:?}");
                    model.ranges.push((r, pa, attr));
                }
            }
            Op::Unmap { start, len } => {
                let r = start..start + len;
                let ch = b.unmap(start, len).unwrap();
                let expect = model.remove(&r);
                assert_eq!(ch.leaves, expect, "{op:?}");
                for t in &ch.tables {
                    assert!(
                        t.start >= r.start.min(t.start) && !model.overlaps(t),
                        "{t:?}"
                    );
                }
            }
        }
    }

    // Probe: every range's edges and middle, the pages either side, and random addresses.
    let mut addrs: Vec<u64> = probes.iter().map(|p| p % window).collect();
    for (m, _, _) in &model.ranges {
        addrs.extend([m.start, m.end - 1, m.start + (m.end - m.start) / 2]);
        addrs.push(m.start.wrapping_sub(1) % space);
        addrs.push(m.end % space);
    }
    for a in addrs {
        let expect = model.lookup(a);
        match shape.stage {
            Stage::Stage1 => {
                let cfg = s1cfg.as_ref().unwrap();
                let got = walk_stage1(cfg, &mem, &mut Direct, a);
                match (expect, got) {
                    (None, Err(WalkError::Fault(f))) => {
                        assert_eq!((f.kind, f.stage), (FaultKind::Translation, Stage::Stage1));
                    }
                    (Some((pa, at)), Ok(t)) => {
                        assert_eq!(t.output, pa, "{a:#x}");
                        let want = attrs(Stage::Stage1, at);
                        let mask = descriptor::LEAF_ATTR_MASK;
                        assert_eq!(t.descriptor & mask, want, "{a:#x}");
                        assert_eq!(t.perms.read_only(), at & 1 != 0);
                        assert_eq!(t.global, at & 16 == 0);
                        check_block(&model, t.input_base(), t.block_size(), t.output_base());
                    }
                    (e, g) => panic!("{shape:?} {a:#x}: model {e:?}, walker {g:?}"),
                }
            }
            Stage::Stage2 => {
                let cfg = s2cfg.as_ref().unwrap();
                let got = walk_stage2(cfg, &mem, a);
                match (expect, got) {
                    (None, Err(f)) => {
                        assert_eq!((f.kind, f.stage), (FaultKind::Translation, Stage::Stage2));
                    }
                    (Some((pa, at)), Ok(t)) => {
                        assert_eq!(t.output, pa, "{a:#x}");
                        assert_eq!(t.attrs.mem_attr, at & 0xF);
                        assert_eq!(
                            (t.perms.read(), t.perms.write()),
                            (at & 1 != 0, at & 2 != 0)
                        );
                        check_block(&model, t.input_base(), t.block_size(), t.output_base());
                    }
                    (e, g) => panic!("{shape:?} {a:#x}: model {e:?}, walker {g:?}"),
                }
            }
        }
    }

    // Unmapping everything frees every table but the root.
    let all = b.unmap(0, window).unwrap();
    assert_eq!(all.leaves, model.remove(&(0..window)));
    assert_eq!(
        b.allocator().live_bytes(),
        root_bytes,
        "{shape:?}: tables leaked"
    );
}

/// A leaf the walker found must map its whole block linearly inside one model range.
fn check_block(model: &Model, base: u64, size: u64, out: u64) {
    let (m, pa, _) = model
        .ranges
        .iter()
        .find(|(m, _, _)| m.contains(&base))
        .unwrap();
    assert!(
        base + size <= m.end,
        "block {base:#x}+{size:#x} beyond {m:?}"
    );
    assert_eq!(pa + (base - m.start), out);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Integration tests have no lib.rs beside them: persist failures to a fixed file.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions/roundtrip.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn builder_walker_round_trip(
        shape in proptest::sample::select(shapes()),
        ops in prop::collection::vec((any::<u8>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u8>(), any::<u8>()), 1..24),
        probes in prop::collection::vec(any::<u64>(), 0..16),
    ) {
        run(shape, &ops, &probes);
    }
}

/// Every shape at least once, deterministically, so no granule/stage pair depends on the
/// random draw.
#[test]
fn every_shape_round_trips() {
    for shape in shapes() {
        let ops = [
            (1u8, 1u64, 1u64, 7u64, 1u8, 3u8),
            (1, 20, 2, 9, 2, 0x15),
            (0, 3, 0, 0, 1, 0),
            (2, 40, 3, 3, 0, 0x0a),
            (0, 41, 1, 0, 2, 0),
        ];
        run(shape, &ops, &[0, 1 << 20, 12345 << 12]);
    }
}
