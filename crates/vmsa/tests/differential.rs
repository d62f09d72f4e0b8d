//! Differential tests: tables built by the independent `aarch64-paging` crate (4K granule,
//! stage 1 lower and upper ranges, stage 2) for random mappings, unmappings and attributes;
//! our walker must agree with the sequence of operations on translation, fault and
//! permission for every probed address.

#![allow(clippy::unwrap_used)]

use aarch64_paging::descriptor::{El1Attributes, PhysicalAddress, Stage2Attributes};
use aarch64_paging::paging::{Constraints, El1And0, MemoryRegion, RootTable, Stage2, VaRange};
use aarch64_paging::target::TargetAllocator;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use twinmmu_vmsa::*;

const TABLES: u64 = 0x80_0000_0000;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

fn cases() -> u32 {
    if std::env::var("TWINMMU_LONG").is_ok_and(|v| v == "1") {
        2048
    } else {
        64
    }
}

/// One map (or unmap, when `valid` is false) as issued to aarch64-paging.
#[derive(Clone, Debug)]
struct Op {
    start: u64,
    len: u64,
    pa: u64,
    bits: u64,
    valid: bool,
    no_blocks: bool,
}

fn decode_ops(raw: &[(u64, u8, u64, u64, u8)], window: u64) -> Vec<Op> {
    raw.iter()
        .map(|&(a, n, p, bits, flags)| {
            let unit = match a & 3 {
                0 | 1 => 0x1000,
                2 => MIB2,
                _ => GIB,
            }
            .min(window);
            let start = ((a >> 2) % (window / unit)) * unit;
            let len =
                (((n % 3) as u64 + 1) * unit + ((n as u64 >> 2) % 3) * 0x1000).min(window - start);
            let pa_unit = if p & 1 == 0 { 0x1000 } else { unit };
            let pa = ((p >> 1) % ((1 << 39) / pa_unit)) * pa_unit;
            Op {
                start,
                len,
                pa,
                bits,
                valid: flags % 5 != 0,
                no_blocks: flags & 8 != 0,
            }
        })
        .collect()
}

/// The last operation covering `a` decides (aarch64-paging overwrites).
fn expect(ops: &[Op], a: u64) -> Option<(u64, u64)> {
    let op = ops
        .iter()
        .rev()
        .find(|o| o.start <= a && a < o.start + o.len)?;
    op.valid.then(|| (op.pa + (a - op.start), op.bits))
}

fn s1_flags(bits: u64) -> El1Attributes {
    let f = El1Attributes::from_bits_truncate(bits as usize);
    // Only leaf attribute bits; the library adds the type bits.
    f & (El1Attributes::ATTRIBUTE_INDEX_7
        | El1Attributes::INNER_SHAREABLE
        | El1Attributes::NS
        | El1Attributes::USER
        | El1Attributes::READ_ONLY
        | El1Attributes::ACCESSED
        | El1Attributes::NON_GLOBAL
        | El1Attributes::DBM
        | El1Attributes::CONTIGUOUS_OR_PROTECTED
        | El1Attributes::PXN
        | El1Attributes::UXN
        | El1Attributes::SWFLAG_0
        | El1Attributes::SWFLAG_3)
}

fn s2_flags(bits: u64) -> Stage2Attributes {
    let f = Stage2Attributes::from_bits_truncate(bits as usize);
    f & (Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
        | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
        | Stage2Attributes::S2AP_ACCESS_RW
        | Stage2Attributes::SH_INNER
        | Stage2Attributes::ACCESS_FLAG
        | Stage2Attributes::XN
        | Stage2Attributes::SWFLAG_1)
}

/// Reference permission rule for stage 1 (DDI0487 D8.4), written from the descriptor bits
/// as a truth table rather than through the crate's folded value.
fn s1_reference(bits: u64, kind: AccessKind, privileged: bool, wxn: bool, pan: bool) -> bool {
    let ap1 = bits & (1 << 6) != 0;
    let ap2 = bits & (1 << 7) != 0;
    let pxn = bits & (1 << 53) != 0;
    let uxn = bits & (1 << 54) != 0;
    let (pr, pw, ur, uw) = match (ap2, ap1) {
        (false, false) => (true, true, false, false),
        (false, true) => (true, true, true, true),
        (true, false) => (true, false, false, false),
        (true, true) => (true, false, true, false),
    };
    let px = !(pxn || uw || (wxn && pw));
    let ux = !(uxn || (wxn && uw));
    let pan_hit = pan && privileged && ur && kind != AccessKind::Execute;
    let allowed = match (kind, privileged) {
        (AccessKind::Read, true) => pr,
        (AccessKind::Write, true) => pw,
        (AccessKind::Execute, true) => px,
        (AccessKind::Read, false) => ur,
        (AccessKind::Write, false) => uw,
        (AccessKind::Execute, false) => ux,
    };
    allowed && !pan_hit
}

const ACCESSES: [AccessKind; 3] = [AccessKind::Read, AccessKind::Write, AccessKind::Execute];

fn probes(ops: &[Op], extra: &[u64], window: u64) -> Vec<u64> {
    let mut v: Vec<u64> = extra.iter().map(|a| (a % window) & !7).collect();
    for o in ops {
        v.extend([
            o.start,
            o.start + o.len - 1,
            o.start + o.len / 2,
            o.start + 0x1008,
        ]);
        v.push((o.start + o.len) % window);
    }
    v.retain(|a| *a < window);
    v
}

fn stage1(
    root_level: usize,
    upper: bool,
    raw: &[(u64, u8, u64, u64, u8)],
    extra: &[u64],
    ctl: (bool, bool, bool),
) {
    let ia_bits = 12 + 9 * (4 - root_level as u8);
    let window = (1u64 << ia_bits).min(8 * GIB);
    let mut ops = decode_ops(raw, window);
    if upper {
        // aarch64-paging cannot express a region ending at 2^64 (its end wraps to 0): keep the
        // top page of the upper range unmapped.
        ops.retain_mut(|o| {
            if o.start + o.len == window {
                o.len -= 0x1000;
            }
            o.len > 0
        });
    }
    let range = if upper {
        VaRange::Upper
    } else {
        VaRange::Lower
    };
    let mut map =
        RootTable::with_va_range(TargetAllocator::new(TABLES), root_level, El1And0, range);
    // Upper-range VAs: the top `window` of the region ends at 2^64.
    let va = |off: u64| if upper { off.wrapping_sub(window) } else { off };
    for o in &ops {
        let mut flags = s1_flags(o.bits);
        if o.valid {
            flags |= El1Attributes::VALID;
        }
        let c = if o.no_blocks {
            Constraints::NO_BLOCK_MAPPINGS
        } else {
            Constraints::empty()
        };
        let region = MemoryRegion::new(
            va(o.start) as usize,
            va(o.start).wrapping_add(o.len) as usize,
        );
        map.map_range(&region, PhysicalAddress(o.pa as usize), flags, c)
            .unwrap();
    }
    let mem = SparseMemory::new();
    mem.write_bytes(TABLES, &map.translation().as_bytes());
    let root = map.to_physical().0 as u64;
    let (affd, wxn, pan) = ctl;
    let tsz = 64 - ia_bits;
    let region = TtbParams {
        ttb: root,
        tsz,
        tg: 0,
        ..Default::default()
    };
    let off = TtbParams {
        epd: true,
        ..Default::default()
    };
    let p = Stage1Params {
        ttb: if upper {
            [off, TtbParams { tg: 2, ..region }]
        } else {
            [region, off]
        },
        ips: 5,
        affd,
        wxn,
        pan,
        mair: 0x0011_2233_4455_6677,
        ..Default::default()
    };
    let cfg = Stage1Config::new(&p, &Features::default()).unwrap();
    for a in probes(&ops, extra, window) {
        let got = walk_stage1(&cfg, &mem, &mut Direct, va(a));
        match (expect(&ops, a), got) {
            (None, Err(WalkError::Fault(f))) => {
                assert_eq!(
                    (f.kind, f.stage),
                    (FaultKind::Translation, Stage::Stage1),
                    "{a:#x}"
                )
            }
            (Some((_, bits)), Err(WalkError::Fault(f))) if bits & (1 << 10) == 0 && !affd => {
                assert_eq!(f.kind, FaultKind::AccessFlag, "{a:#x}")
            }
            (Some((pa, bits)), Ok(t)) => {
                assert!(
                    bits & (1 << 10) != 0 || affd,
                    "{a:#x}: AF clear but translated"
                );
                assert_eq!(t.output, pa, "{a:#x}");
                let bits = s1_flags(bits).bits() as u64;
                assert_eq!(t.attrs.attr_index as u64, (bits >> 2) & 7);
                assert_eq!(
                    t.attrs.mair_attr as u64,
                    (0x0011_2233_4455_6677u64 >> (8 * ((bits >> 2) & 7))) & 0xff
                );
                assert_eq!(t.attrs.sh as u64, (bits >> 8) & 3);
                assert_eq!(t.attrs.ns, bits & (1 << 5) != 0);
                assert_eq!(t.global, bits & (1 << 11) == 0);
                assert_eq!(t.contiguous, bits & (1 << 52) != 0);
                assert_eq!(t.dbm, bits & (1 << 51) != 0);
                assert_eq!(t.af, bits & (1 << 10) != 0);
                let ctl = S1Controls { wxn, pan };
                for kind in ACCESSES {
                    for privileged in [false, true] {
                        let ours = check_s1(t.perms, Access::new(kind, privileged), ctl).is_ok();
                        let reference = s1_reference(bits, kind, privileged, wxn, pan);
                        assert_eq!(
                            ours, reference,
                            "{a:#x} {kind:?} priv={privileged} bits={bits:#x}"
                        );
                    }
                }
                // The leaf block lies inside one operation's linear range.
                let base = t.input_base().wrapping_sub(va(0));
                let last = base + t.block_size() - 1;
                assert_eq!(
                    expect(&ops, base).map(|e| e.0),
                    Some(t.output_base()),
                    "{a:#x}"
                );
                assert_eq!(
                    expect(&ops, last).map(|e| e.0),
                    Some(t.output_base() + t.block_size() - 1)
                );
            }
            (e, g) => panic!("{a:#x}: expected {e:?}, walker {g:?}"),
        }
    }
}

fn stage2(root_level: usize, raw: &[(u64, u8, u64, u64, u8)], extra: &[u64], affd: bool) {
    let ia_bits = 12 + 9 * (4 - root_level as u8);
    let window = (1u64 << ia_bits).min(8 * GIB);
    let ops = decode_ops(raw, window);
    let mut map = RootTable::new(TargetAllocator::new(TABLES), root_level, Stage2);
    for o in &ops {
        let mut flags = s2_flags(o.bits);
        if o.valid {
            flags |= Stage2Attributes::VALID;
        }
        let c = if o.no_blocks {
            Constraints::NO_BLOCK_MAPPINGS
        } else {
            Constraints::empty()
        };
        let region = MemoryRegion::new(o.start as usize, (o.start + o.len) as usize);
        map.map_range(&region, PhysicalAddress(o.pa as usize), flags, c)
            .unwrap();
    }
    let mem = SparseMemory::new();
    mem.write_bytes(TABLES, &map.translation().as_bytes());
    // One 512-entry table at the root level: SL0 2 → L0, 1 → L1, 0 → L2.
    let p = Stage2Params {
        s2ttb: map.to_physical().0 as u64,
        s2t0sz: 64 - ia_bits,
        s2sl0: 2 - root_level as u8,
        s2tg: 0,
        s2ps: 5,
        s2affd: affd,
        ..Default::default()
    };
    let cfg = Stage2Config::new(&p, &Features::default()).unwrap();
    assert_eq!(cfg.geometry().concatenated(), 1);
    for a in probes(&ops, extra, window) {
        match (expect(&ops, a), walk_stage2(&cfg, &mem, a)) {
            (None, Err(f)) => {
                assert_eq!((f.kind, f.stage), (FaultKind::Translation, Stage::Stage2))
            }
            (Some((_, bits)), Err(f)) if bits & (1 << 10) == 0 && !affd => {
                assert_eq!(f.kind, FaultKind::AccessFlag, "{a:#x}")
            }
            (Some((pa, bits)), Ok(t)) => {
                let bits = s2_flags(bits).bits() as u64;
                assert_eq!(t.output, pa, "{a:#x}");
                assert_eq!(t.attrs.mem_attr as u64, (bits >> 2) & 0xF);
                assert_eq!(t.attrs.sh as u64, (bits >> 8) & 3);
                let r = bits & (1 << 6) != 0;
                let w = bits & (1 << 7) != 0;
                let x = bits & (1 << 54) == 0;
                for privileged in [false, true] {
                    let ok = |k| t.check(Access::new(k, privileged)).is_ok();
                    assert_eq!(
                        (
                            ok(AccessKind::Read),
                            ok(AccessKind::Write),
                            ok(AccessKind::Execute)
                        ),
                        (r, w, x),
                        "{a:#x}"
                    );
                }
                let base = t.input_base();
                assert_eq!(expect(&ops, base).map(|e| e.0), Some(t.output_base()));
                assert_eq!(
                    expect(&ops, base + t.block_size() - 1).map(|e| e.0),
                    Some(t.output_base() + t.block_size() - 1)
                );
            }
            (e, g) => panic!("{a:#x}: expected {e:?}, walker {g:?}"),
        }
    }
}

fn raw_ops() -> impl Strategy<Value = Vec<(u64, u8, u64, u64, u8)>> {
    prop::collection::vec(
        (
            any::<u64>(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
        ),
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Integration tests have no lib.rs beside them: persist failures to a fixed file.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions/differential.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn stage1_agrees_with_aarch64_paging(
        root_level in 0usize..3,
        upper in any::<bool>(),
        raw in raw_ops(),
        extra in prop::collection::vec(any::<u64>(), 0..16),
        ctl in any::<(bool, bool, bool)>(),
    ) {
        stage1(root_level, upper, &raw, &extra, ctl);
    }

    #[test]
    fn stage2_agrees_with_aarch64_paging(
        root_level in 0usize..3,
        raw in raw_ops(),
        extra in prop::collection::vec(any::<u64>(), 0..16),
        affd in any::<bool>(),
    ) {
        stage2(root_level, &raw, &extra, affd);
    }
}
