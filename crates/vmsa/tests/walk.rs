//! Walker tests over hand-written tables: each descriptor is composed from raw bit positions
//! (smmu_kvm.md §4.12), not through the crate's encoders.

#![allow(clippy::unwrap_used)]

use twinmmu_vmsa::*;

const MAIR: u64 = 0x44_ff_04; // idx0 Device-nGnRE, idx1 Normal WB, idx2 Normal NC

fn features() -> Features {
    Features::default()
}

fn s1_params(ttb0: u64, tsz: u8, tg0: u8) -> Stage1Params {
    Stage1Params {
        ttb: [
            TtbParams {
                ttb: ttb0,
                tsz,
                tg: tg0,
                ..Default::default()
            },
            TtbParams {
                epd: true,
                ..Default::default()
            },
        ],
        ips: 5,
        mair: MAIR,
        ..Default::default()
    }
}

fn w(m: &SparseMemory, pa: u64, v: u64) {
    m.write_u64(pa, v).unwrap();
}

/// 4K, 48-bit: L0 @0x10000, L1 @0x11000, L2 @0x12000, L3 @0x13000; VA 0x0000_0080_4020_3000
/// = indices L0 1, L1 1, L2 1, L3 3.
fn four_level_4k(m: &SparseMemory, leaf: u64) -> u64 {
    let va = (1u64 << 39) | (1 << 30) | (1 << 21) | (3 << 12);
    w(m, 0x10000 + 8, 0x11000 | 0b11);
    w(m, 0x11000 + 8, 0x12000 | 0b11);
    w(m, 0x12000 + 8, 0x13000 | 0b11);
    w(m, 0x13000 + 3 * 8, leaf);
    va
}

#[test]
fn four_level_4k_page() {
    let m = SparseMemory::new();
    // Page at 0x8_7654_3000, AttrIndx 1, inner shareable, AF, nG, AP 01.
    let leaf = 0x8_7654_3000 | (1 << 2) | (3 << 8) | (1 << 10) | (1 << 11) | (0b01 << 6) | 0b11;
    let va = four_level_4k(&m, leaf);
    let cfg = Stage1Config::new(&s1_params(0x10000, 16, 0), &features()).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, va + 0x123).unwrap();
    assert_eq!(t.output, 0x8_7654_3123);
    assert_eq!(t.output_base(), 0x8_7654_3000);
    assert_eq!(
        (t.block_shift, t.level, t.start_level, t.reads()),
        (12, 3, 0, 4)
    );
    assert_eq!(t.attrs.attr_index, 1);
    assert_eq!(t.attrs.mair_attr, 0xff);
    assert_eq!(t.attrs.sh, 3);
    assert!(!t.global);
    assert!(t.perms.el0() && !t.perms.read_only());
    assert_eq!(t.descriptor, leaf);
    assert_eq!(t.descriptor_pa, 0x13018);
}

#[test]
fn blocks_at_l1_and_l2_4k() {
    let m = SparseMemory::new();
    // L0[0] → L1 @0x21000; L1[2] = 1 GiB block at 0x80000000; L1[3] → L2 @0x22000;
    // L2[5] = 2 MiB block at 0x1_0020_0000.
    w(&m, 0x20000, 0x21000 | 0b11);
    w(&m, 0x21000 + 16, 0x8000_0000 | (1 << 10) | 0b01);
    w(&m, 0x21000 + 24, 0x22000 | 0b11);
    w(&m, 0x22000 + 40, 0x1_0020_0000 | (1 << 10) | 0b01);
    let cfg = Stage1Config::new(&s1_params(0x20000, 16, 0), &features()).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, (2 << 30) + 0x1234_5678).unwrap();
    assert_eq!(
        (t.output, t.level, t.block_shift),
        (0x8000_0000 + 0x1234_5678, 1, 30)
    );
    let t = walk_stage1(&cfg, &m, &mut Direct, (3 << 30) + (5 << 21) + 0x1_2345).unwrap();
    assert_eq!(
        (t.output, t.level, t.block_shift),
        (0x1_0020_0000 + 0x1_2345, 2, 21)
    );
    // Block OA bits below the block size are ignored (RES0).
    w(&m, 0x22000 + 40, 0x1_0020_0000 | 0x1000 | (1 << 10) | 0b01);
    let t = walk_stage1(&cfg, &m, &mut Direct, (3 << 30) + (5 << 21)).unwrap();
    assert_eq!(t.output, 0x1_0020_0000);
}

#[test]
fn sixteen_k_and_sixty_four_k() {
    let m = SparseMemory::new();
    // 16K/47 bits: start L1 (shift 36); L1 @0x40000, L2 @0x44000, L3 @0x48000.
    let va = (3u64 << 36) | (7 << 25) | (9 << 14) | 0x3ff;
    w(&m, 0x40000 + 3 * 8, 0x44000 | 0b11);
    w(&m, 0x44000 + 7 * 8, 0x48000 | 0b11);
    w(&m, 0x48000 + 9 * 8, 0x1234_4000 | (1 << 10) | 0b11);
    let cfg = Stage1Config::new(&s1_params(0x40000, 17, 2), &features()).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, va).unwrap();
    assert_eq!(
        (t.output, t.level, t.start_level, t.block_shift),
        (0x1234_43ff, 3, 1, 14)
    );
    // 16K L2 block = 32 MiB.
    w(&m, 0x44000 + 8 * 8, 0x4_0000_0000 | (1 << 10) | 0b01);
    let t = walk_stage1(&cfg, &m, &mut Direct, (3u64 << 36) | (8 << 25) | 0x12_3456).unwrap();
    assert_eq!((t.output, t.level, t.block_shift), (0x4_0012_3456, 2, 25));

    // 64K/42 bits: start L2 (shift 29); L2 @0x100000 (64K aligned), L3 @0x110000.
    let m = SparseMemory::new();
    w(&m, 0x10_0000 + 5 * 8, 0x11_0000 | 0b11);
    w(&m, 0x11_0000 + 17 * 8, 0x7_0001_0000 | (1 << 10) | 0b11);
    w(&m, 0x10_0000 + 6 * 8, 0x6000_0000 | (1 << 10) | 0b01);
    let cfg = Stage1Config::new(&s1_params(0x10_0000, 22, 1), &features()).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, (5 << 29) | (17 << 16) | 0xabcd).unwrap();
    assert_eq!(
        (t.output, t.level, t.start_level, t.block_shift),
        (0x7_0001_abcd, 3, 2, 16)
    );
    let t = walk_stage1(&cfg, &m, &mut Direct, (6 << 29) | 0x123_4567).unwrap();
    assert_eq!((t.output, t.level, t.block_shift), (0x6123_4567, 2, 29));
}

#[test]
fn sixty_four_k_with_52_bit_pa() {
    let f = Features {
        oas: PaSize::Bits52,
        ias: PaSize::Bits52,
        ..features()
    };
    let m = SparseMemory::new();
    // 64K/48 bits: start L1 (shift 42, 64 entries). L1[1] = 4 TiB block (52-bit PA only).
    // OA[51:48] = 0x3 in descriptor bits [15:12].
    w(&m, 0x10_0000 + 8, (3 << 12) | (1 << 10) | 0b01);
    let mut p = s1_params(0x10_0000, 16, 1);
    p.ips = 6;
    let cfg = Stage1Config::new(&p, &f).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, (1 << 42) | 0x1234).unwrap();
    assert_eq!(
        (t.output, t.level, t.block_shift),
        ((3 << 48) | 0x1234, 1, 42)
    );
    // With IPS 48 the same descriptor is an Address Size fault.
    p.ips = 5;
    let cfg = Stage1Config::new(&p, &f).unwrap();
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, 1 << 42),
        Err(WalkError::Fault(Fault::new(
            FaultKind::AddressSize,
            1,
            Stage::Stage1
        )))
    );
    // Without 52-bit PAs in the implementation, a 64K L1 block is reserved.
    let cfg = Stage1Config::new(&p, &features()).unwrap();
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, 1 << 42),
        Err(WalkError::Fault(Fault::new(
            FaultKind::Translation,
            1,
            Stage::Stage1
        )))
    );
}

fn fault<E>(kind: FaultKind, level: u8) -> Result<S1Translation, WalkError<E>> {
    Err(WalkError::Fault(Fault::new(kind, level, Stage::Stage1)))
}

#[test]
fn malformed_tables_fault_at_the_right_level() {
    let m = SparseMemory::new();
    let cfg = Stage1Config::new(&s1_params(0x10000, 16, 0), &features()).unwrap();
    // Reserved 0b01 at L3.
    let va = four_level_4k(&m, 0x5000 | (1 << 10) | 0b01);
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, va),
        fault(FaultKind::Translation, 3)
    );
    // Invalid at L3 (bit 0 clear, other bits set).
    w(&m, 0x13000 + 24, 0xffff_ffff_ffff_fffe);
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, va),
        fault(FaultKind::Translation, 3)
    );
    // A block at L0 (4K) is reserved.
    w(&m, 0x10000 + 8, 0x80_0000_0000 | (1 << 10) | 0b01);
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, va),
        fault(FaultKind::Translation, 0)
    );
    // Table address beyond the 48-bit PA size... with IPS 40: bit 45 set.
    let mut p = s1_params(0x10000, 16, 0);
    p.ips = 2;
    let cfg40 = Stage1Config::new(&p, &features()).unwrap();
    w(&m, 0x10000 + 8, 0x11000 | 0b11);
    w(&m, 0x11000 + 8, (1 << 45) | 0x12000 | 0b11);
    assert_eq!(
        walk_stage1(&cfg40, &m, &mut Direct, va),
        fault(FaultKind::AddressSize, 1)
    );
    // Output address beyond the size.
    w(&m, 0x11000 + 8, 0x12000 | 0b11);
    w(&m, 0x13000 + 24, (1 << 40) | (1 << 10) | 0b11);
    assert_eq!(
        walk_stage1(&cfg40, &m, &mut Direct, va),
        fault(FaultKind::AddressSize, 3)
    );
    assert!(walk_stage1(&cfg, &m, &mut Direct, va).is_ok());
    // An unreadable table: L2 points at memory that does not exist.
    w(&m, 0x12000 + 8, 0xdead_0000 | 0b11);
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, va),
        fault(
            FaultKind::ExternalAbort {
                fetch_addr: 0xdead_0018
            },
            3
        )
    );
    // An unreadable root.
    let cfg = Stage1Config::new(&s1_params(0xbeef_0000, 16, 0), &features()).unwrap();
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, va),
        fault(
            FaultKind::ExternalAbort {
                fetch_addr: 0xbeef_0008
            },
            0
        )
    );
}

#[test]
fn access_flag_and_affd() {
    let m = SparseMemory::new();
    let va = four_level_4k(&m, 0x5000 | 0b11);
    let cfg = Stage1Config::new(&s1_params(0x10000, 16, 0), &features()).unwrap();
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, va),
        fault(FaultKind::AccessFlag, 3)
    );
    let mut p = s1_params(0x10000, 16, 0);
    p.affd = true;
    let cfg = Stage1Config::new(&p, &features()).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, va).unwrap();
    assert!(!t.af);
    // Address Size is checked before AF (IPS 40, OA bit 44 set, AF clear).
    w(&m, 0x13000 + 24, (1 << 44) | 0b11);
    let mut p = s1_params(0x10000, 16, 0);
    p.ips = 2;
    let cfg = Stage1Config::new(&p, &features()).unwrap();
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, va),
        fault(FaultKind::AddressSize, 3)
    );
}

#[test]
fn ttb_selection_tbi_and_epd() {
    let m = SparseMemory::new();
    // TTB0: 4K/39 bits (L1 start) @0x10000; TTB1: 4K/39 bits @0x20000.
    w(&m, 0x10000, 0x4000_0000 | (1 << 10) | 0b01);
    w(&m, 0x20000 + 511 * 8, 0x8000_0000 | (1 << 10) | 0b01);
    let mut p = Stage1Params {
        ttb: [
            TtbParams {
                ttb: 0x10000,
                tsz: 25,
                tg: 0,
                ..Default::default()
            },
            TtbParams {
                ttb: 0x20000,
                tsz: 25,
                tg: 2, // TG1 encoding of 4K
                ..Default::default()
            },
        ],
        ips: 5,
        ..Default::default()
    };
    let cfg = Stage1Config::new(&p, &features()).unwrap();
    let ok = |cfg: &Stage1Config, va| walk_stage1(cfg, &m, &mut Direct, va).map(|t| t.output);
    assert_eq!(ok(&cfg, 0x1234), Ok(0x4000_1234));
    assert_eq!(ok(&cfg, 0xFFFF_FFFF_C000_1234), Ok(0x8000_1234));
    // Bits [63:39] not all equal: Translation fault at level 0.
    assert_eq!(
        ok(&cfg, 1 << 39),
        Err(WalkError::Fault(Fault::new(
            FaultKind::Translation,
            0,
            Stage::Stage1
        )))
    );
    assert!(ok(&cfg, 0xFFFF_FF7F_C000_0000).is_err());
    // Tagged pointers fault without TBI, translate with it.
    assert!(ok(&cfg, 0x5A00_0000_0000_1234).is_err());
    p.ttb[0].tbi = true;
    let cfg_tbi = Stage1Config::new(&p, &features()).unwrap();
    assert_eq!(ok(&cfg_tbi, 0x5A00_0000_0000_1234), Ok(0x4000_1234));
    // TBI0 does not cover TTB1 addresses.
    assert!(ok(&cfg_tbi, 0x5AFF_FFFF_C000_1234).is_err());
    p.ttb[1].tbi = true;
    let cfg_tbi = Stage1Config::new(&p, &features()).unwrap();
    assert_eq!(ok(&cfg_tbi, 0x5AFF_FFFF_C000_1234), Ok(0x8000_1234));
    // EPD1: TTB1 addresses fault without a walk.
    p.ttb[1].epd = true;
    let cfg = Stage1Config::new(&p, &features()).unwrap();
    assert_eq!(
        ok(&cfg, 0xFFFF_FFFF_C000_1234),
        Err(WalkError::Fault(Fault::new(
            FaultKind::Translation,
            0,
            Stage::Stage1
        )))
    );
    assert_eq!(ok(&cfg, 0x1234), Ok(0x4000_1234));
}

#[test]
fn hierarchical_attributes_and_had() {
    let m = SparseMemory::new();
    // APTable[1] (RO) at L0, PXNTable at L1, APTable[0] at L2.
    let leaf = 0x5000 | (1 << 10) | (0b01 << 6) | 0b11;
    let va = four_level_4k(&m, leaf);
    w(&m, 0x10000 + 8, 0x11000 | (1 << 62) | 0b11);
    w(&m, 0x11000 + 8, 0x12000 | (1 << 59) | 0b11);
    let cfg = Stage1Config::new(&s1_params(0x10000, 16, 0), &features()).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, va).unwrap();
    assert!(t.perms.read_only() && t.perms.el0() && t.perms.pxn() && !t.perms.uxn());
    let none = S1Controls::default();
    assert!(t.check(Access::new(AccessKind::Write, true), none).is_err());
    assert_eq!(
        t.check(Access::new(AccessKind::Write, false), none),
        Err(Fault::new(FaultKind::Permission, 3, Stage::Stage1))
    );
    assert!(t.check(Access::new(AccessKind::Read, false), none).is_ok());
    w(&m, 0x12000 + 8, 0x13000 | (1 << 61) | (1 << 60) | 0b11);
    let t = walk_stage1(&cfg, &m, &mut Direct, va).unwrap();
    assert!(!t.perms.el0() && t.perms.uxn());
    // HAD0 with IDR3.HAD: table bits ignored.
    let f = Features {
        had: true,
        ..features()
    };
    let mut p = s1_params(0x10000, 16, 0);
    p.ttb[0].had = true;
    let cfg = Stage1Config::new(&p, &f).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, va).unwrap();
    assert!(!t.perms.read_only() && t.perms.el0() && !t.perms.pxn() && !t.perms.uxn());
    // HAD0 without IDR3.HAD has no effect.
    let cfg = Stage1Config::new(&p, &features()).unwrap();
    assert!(
        walk_stage1(&cfg, &m, &mut Direct, va)
            .unwrap()
            .perms
            .read_only()
    );
}

#[test]
fn hook_sees_every_table_fetch_and_its_failure_is_distinct() {
    let m = SparseMemory::new();
    let va = four_level_4k(&m, 0x5000 | (1 << 10) | 0b11);
    // Put the tables at PA = IPA + 0x1_0000_0000 and translate in the hook.
    for pa in [0x10000u64, 0x11000, 0x12000, 0x13000] {
        for i in 0..512 {
            let v = m.read_u64(pa + i * 8).unwrap();
            w(&m, pa + 0x1_0000_0000 + i * 8, v);
        }
        m.remove_range(pa, 0x1000);
    }
    let cfg = Stage1Config::new(&s1_params(0x10000, 16, 0), &features()).unwrap();
    let mut seen = Vec::new();
    let mut hook = |ipa: u64, level: u8| -> Result<u64, &'static str> {
        seen.push((ipa, level));
        Ok(ipa + 0x1_0000_0000)
    };
    let t = walk_stage1(&cfg, &m, &mut hook, va).unwrap();
    assert_eq!(t.output, 0x5000);
    assert_eq!(t.descriptor_pa, 0x1_0001_3018);
    assert_eq!(
        seen,
        [(0x10008, 0), (0x11008, 1), (0x12008, 2), (0x13018, 3)]
    );
    // The hook refuses the level-2 fetch: a TableFetch error, not a stage-1 fault.
    let mut refuse = |ipa: u64, level: u8| {
        if level == 2 {
            Err(Fault::new(FaultKind::Translation, 1, Stage::Stage2))
        } else {
            Ok(ipa + 0x1_0000_0000)
        }
    };
    assert_eq!(
        walk_stage1(&cfg, &m, &mut refuse, va),
        Err(WalkError::TableFetch {
            ipa: 0x12008,
            level: 2,
            error: Fault::new(FaultKind::Translation, 1, Stage::Stage2)
        })
    );
}

fn s2_params(ttb: u64, t0sz: u8, sl0: u8, tg: u8) -> Stage2Params {
    Stage2Params {
        s2ttb: ttb,
        s2t0sz: t0sz,
        s2sl0: sl0,
        s2tg: tg,
        s2ps: 5,
        ..Default::default()
    }
}

#[test]
fn stage2_concatenated_root() {
    let m = SparseMemory::new();
    // 4K, 40-bit IPA, SL0 = 1 → L1 start with two concatenated tables @0x40000..0x42000.
    let cfg = Stage2Config::new(&s2_params(0x40000, 24, 1, 0), &features()).unwrap();
    assert_eq!(cfg.geometry().concatenated(), 2);
    // IPA 0x80_4000_0000: L1 index 513 lives in the second table.
    let ipa = (513u64 << 30) | 0x1234;
    w(
        &m,
        0x40000 + 513 * 8,
        0x9_0000_0000 | (0b11 << 6) | (1 << 10) | (0xF << 2) | 0b01,
    );
    let t = walk_stage2(&cfg, &m, ipa).unwrap();
    assert_eq!(
        (t.output, t.level, t.block_shift, t.start_level),
        (0x9_0000_1234, 1, 30, 1)
    );
    assert_eq!(t.attrs.mem_attr, 0xF);
    assert!(t.perms.read() && t.perms.write());
    // IPA beyond 40 bits.
    assert_eq!(
        walk_stage2(&cfg, &m, 1 << 40),
        Err(Fault::new(FaultKind::Translation, 0, Stage::Stage2))
    );
    // S2 AF fault and S2AFFD.
    w(&m, 0x40000 + 513 * 8, 0x9_0000_0000 | (0b11 << 6) | 0b01);
    assert_eq!(
        walk_stage2(&cfg, &m, ipa),
        Err(Fault::new(FaultKind::AccessFlag, 1, Stage::Stage2))
    );
    let mut p = s2_params(0x40000, 24, 1, 0);
    p.s2affd = true;
    let cfg = Stage2Config::new(&p, &features()).unwrap();
    assert!(walk_stage2(&cfg, &m, ipa).is_ok());
}

#[test]
fn stage2_ignores_table_attributes_and_checks_output_size() {
    let m = SparseMemory::new();
    // 64K, 42-bit IPA, SL0 = 1 → L2 start (shift 29, 8192 entries).
    let mut p = s2_params(0x100000, 22, 1, 1);
    p.s2ps = 2; // 40 bits
    let cfg = Stage2Config::new(&p, &features()).unwrap();
    w(&m, 0x100000 + 3 * 8, 0x200000 | (0xF << 59) | 0b11);
    w(
        &m,
        0x200000 + 2 * 8,
        0x3_0000 | (0b01 << 6) | (1 << 10) | (0b10 << 53) | 0b11,
    );
    let ipa = (3 << 29) | (2 << 16) | 0x42;
    let t = walk_stage2(&cfg, &m, ipa).unwrap();
    assert_eq!(t.output, 0x3_0042);
    assert!(t.perms.read() && !t.perms.write() && t.perms.priv_xn() && t.perms.unpriv_xn());
    assert_eq!(
        t.check(Access::new(AccessKind::Write, false)),
        Err(Fault::new(FaultKind::Permission, 3, Stage::Stage2))
    );
    w(&m, 0x200000 + 2 * 8, (1 << 40) | (1 << 10) | 0b11);
    assert_eq!(
        walk_stage2(&cfg, &m, ipa),
        Err(Fault::new(FaultKind::AddressSize, 3, Stage::Stage2))
    );
}

#[test]
fn contiguous_hint_is_decoded() {
    let m = SparseMemory::new();
    let va = four_level_4k(&m, 0x5000 | (1 << 10) | (1 << 52) | 0b11);
    let cfg = Stage1Config::new(&s1_params(0x10000, 16, 0), &features()).unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, va).unwrap();
    assert!(t.contiguous);
    assert_eq!(t.contiguous_shift(), 16); // 16 × 4K
}

#[test]
fn stage2_hook_sees_each_descriptor_read_with_its_level() {
    let m = SparseMemory::new();
    // 64K, 42-bit IPA, SL0 = 1 → L2 start, then L3.
    let cfg = Stage2Config::new(&s2_params(0x100000, 22, 1, 1), &features()).unwrap();
    w(&m, 0x100000 + 3 * 8, 0x200000 | 0b11);
    w(
        &m,
        0x200000 + 2 * 8,
        0x3_0000 | (0b11 << 6) | (1 << 10) | 0b11,
    );
    let ipa = (3 << 29) | (2 << 16) | 0x42;
    let mut seen = Vec::new();
    let mut hook = |pa: u64, level: u8| -> Result<u64, ()> {
        seen.push((pa, level));
        Ok(pa)
    };
    let t = walk_stage2_with(&cfg, &m, &mut hook, ipa).unwrap();
    assert_eq!(t.output, 0x3_0042);
    assert_eq!(seen, vec![(0x100000 + 3 * 8, 2), (0x200000 + 2 * 8, 3)]);
    // A fault at the second level: both reads happened.
    w(&m, 0x200000 + 2 * 8, 0);
    seen.clear();
    let mut hook = |pa: u64, level: u8| -> Result<u64, ()> {
        seen.push((pa, level));
        Ok(pa)
    };
    assert_eq!(
        walk_stage2_with(&cfg, &m, &mut hook, ipa),
        Err(WalkError::Fault(Fault::new(
            FaultKind::Translation,
            3,
            Stage::Stage2
        )))
    );
    assert_eq!(seen.len(), 2);
    // Out of range: a level-0 Translation fault with no read at all.
    seen.clear();
    let mut hook = |pa: u64, level: u8| -> Result<u64, ()> {
        seen.push((pa, level));
        Ok(pa)
    };
    assert!(walk_stage2_with(&cfg, &m, &mut hook, 1 << 42).is_err());
    assert!(seen.is_empty());
    // The hook may refuse a fetch.
    let mut refuse = |_pa: u64, level: u8| -> Result<u64, u8> { Err(level) };
    assert!(matches!(
        walk_stage2_with(&cfg, &m, &mut refuse, ipa),
        Err(WalkError::TableFetch {
            level: 2,
            error: 2,
            ..
        })
    ));
}

#[test]
fn stage2_device_memory_by_mem_attr() {
    // MemAttr[3:2] = 0b00: Device (nGnRnE 0b0000 .. GRE 0b0011); otherwise Normal.
    for (bits, device) in [
        (0b0000, true),
        (0b0011, true),
        (0b0100, false),
        (0b1111, false),
    ] {
        let a = S2MemAttrs {
            mem_attr: bits,
            sh: 0,
        };
        assert_eq!(a.is_device(), device, "{bits:#06b}");
    }
    // FEAT_S2FWB: MemAttr[2] = 0 is Device.
    for (bits, device) in [
        (0b0000, true),
        (0b0011, true),
        (0b0100, false),
        (0b0110, false),
        (0b1011, true),
    ] {
        let a = S2MemAttrs {
            mem_attr: bits,
            sh: 0,
        };
        assert_eq!(a.is_device_fwb(), device, "{bits:#06b}");
    }
    // From a walked descriptor: MemAttr at bits [5:2].
    let m = SparseMemory::new();
    let cfg = Stage2Config::new(&s2_params(0x40000, 24, 1, 0), &features()).unwrap();
    let ipa = 513u64 << 30;
    w(
        &m,
        0x40000 + 513 * 8,
        0x9_0000_0000 | (0b11 << 6) | (1 << 10) | (0b0001 << 2) | 0b01,
    );
    assert!(walk_stage2(&cfg, &m, ipa).unwrap().attrs.is_device());
    w(
        &m,
        0x40000 + 513 * 8,
        0x9_0000_0000 | (0b11 << 6) | (1 << 10) | (0b1111 << 2) | 0b01,
    );
    assert!(!walk_stage2(&cfg, &m, ipa).unwrap().attrs.is_device());
}
