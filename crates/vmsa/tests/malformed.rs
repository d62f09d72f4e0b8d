//! Random table contents and random CD/STE fields: the configuration is accepted or refused
//! with a typed error, every walk returns a translation or a typed fault, the builder returns
//! a result — nothing panics, and what is returned is self-consistent.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use twinmmu_vmsa::*;

fn cases() -> u32 {
    if std::env::var("TWINMMU_LONG").is_ok_and(|v| v == "1") {
        4096
    } else {
        128
    }
}

/// Eight 64 KiB "table pages" at these addresses; random descriptors point between them so
/// walks go deep.
const POOL: u64 = 0x4000_0000;
const PAGE: u64 = 0x1_0000;

fn descriptor(raw: u64, pick: u8) -> u64 {
    // Keep the attribute and type bits random; aim the address at a pool page most of the time.
    if pick & 0x80 != 0 {
        raw
    } else {
        let target = POOL + (pick as u64 & 7) * PAGE + ((raw >> 3) & 0x7) * 0x1000;
        (raw & !descriptor::OA_MASK_48) | target
    }
}

fn fill(mem: &SparseMemory, words: &[(u16, u64, u8)]) {
    for p in 0..8 {
        mem.add_range(POOL + p * PAGE, PAGE);
    }
    for &(slot, raw, pick) in words {
        let pa = POOL + (slot as u64 % (8 * PAGE / 8)) * 8;
        mem.write_u64(pa, descriptor(raw, pick)).unwrap();
    }
}

fn check_s1_result(
    r: &Result<S1Translation, WalkError<std::convert::Infallible>>,
    cfg: &Stage1Config,
    va: u64,
) {
    match r {
        Ok(t) => {
            let ttb = if (va >> 55) & 1 == 1 {
                Ttb::Ttb1
            } else {
                Ttb::Ttb0
            };
            assert!(t.output >> cfg.oa_bits(ttb) == 0);
            assert!(t.level <= 3 && t.start_level <= t.level);
            assert_eq!(t.output & (t.block_size() - 1), va & (t.block_size() - 1));
        }
        Err(WalkError::Fault(f)) => {
            assert!(f.level <= 3);
            assert_eq!(f.stage, Stage::Stage1);
        }
        Err(WalkError::TableFetch { .. }) => unreachable!("Direct never refuses"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions/malformed.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_stage1_tables_and_fields_never_panic(
        words in prop::collection::vec((any::<u16>(), any::<u64>(), any::<u8>()), 0..256),
        fields in any::<(u8, u8, u8, u8, u8, u8)>(),
        ttb_pick in any::<(u8, u8)>(),
        vas in prop::collection::vec(any::<u64>(), 1..16),
        had in any::<bool>(),
    ) {
        let mem = SparseMemory::new();
        fill(&mem, &words);
        let (tsz0, tsz1, tg, ips, flags, _) = fields;
        let ttb = |p: u8| if p & 0x80 != 0 { (p as u64) << 40 } else { POOL + (p as u64 & 7) * PAGE };
        let p = Stage1Params {
            ttb: [
                TtbParams { ttb: ttb(ttb_pick.0), tsz: tsz0 % 64, tg: tg & 3, epd: flags & 1 != 0, tbi: flags & 2 != 0, had },
                TtbParams { ttb: ttb(ttb_pick.1), tsz: tsz1 % 64, tg: (tg >> 2) & 3, epd: flags & 4 != 0, tbi: flags & 8 != 0, had },
            ],
            ips: ips & 7,
            affd: flags & 16 != 0,
            wxn: flags & 32 != 0,
            pan: flags & 64 != 0,
            ..Default::default()
        };
        let f = Features { oas: PaSize::Bits52, ias: PaSize::Bits52, had: true, vax52: true, stt: flags & 128 != 0, ..Features::default() };
        if let Ok(cfg) = Stage1Config::new(&p, &f) {
            for &va in &vas {
                let r = walk_stage1(&cfg, &mem, &mut Direct, va);
                check_s1_result(&r, &cfg, va);
                if let Ok(t) = r {
                    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Execute] {
                        let _ = t.check(Access::new(kind, va & 1 == 0), cfg.controls());
                    }
                }
            }
        }
    }

    #[test]
    fn random_stage2_tables_and_fields_never_panic(
        words in prop::collection::vec((any::<u16>(), any::<u64>(), any::<u8>()), 0..256),
        fields in any::<(u8, u8, u8, u8, bool)>(),
        ipas in prop::collection::vec(any::<u64>(), 1..16),
    ) {
        let mem = SparseMemory::new();
        fill(&mem, &words);
        let (t0sz, sl0, tg, ps, affd) = fields;
        let p = Stage2Params {
            s2ttb: POOL + (ps as u64 >> 4 & 7) * PAGE,
            s2t0sz: t0sz % 64,
            s2sl0: sl0 & 3,
            s2tg: tg & 3,
            s2ps: ps & 7,
            s2affd: affd,
            ..Default::default()
        };
        let f = Features { oas: PaSize::Bits52, ias: PaSize::Bits52, xnx: tg & 4 != 0, ..Features::default() };
        if let Ok(cfg) = Stage2Config::new(&p, &f) {
            for &ipa in &ipas {
                for a in [ipa, ipa & ((1 << cfg.geometry().ia_bits()) - 1)] {
                    match walk_stage2(&cfg, &mem, a) {
                        Ok(t) => {
                            prop_assert!(t.output >> cfg.oa_bits() == 0);
                            prop_assert!(t.level >= t.start_level && t.level <= 3);
                        }
                        Err(f) => prop_assert!(f.level <= 3 && f.stage == Stage::Stage2),
                    }
                }
            }
        }
    }

    /// The builder over tables it did not build (random contents) returns errors or does its
    /// job; it never panics.
    #[test]
    fn builder_on_garbage_tables_never_panics(
        words in prop::collection::vec((any::<u16>(), any::<u64>(), any::<u8>()), 0..256),
        granule in 0u8..3,
        ops in prop::collection::vec((any::<bool>(), any::<u32>(), 1u8..64, any::<u32>()), 1..8),
    ) {
        let mem = SparseMemory::new();
        fill(&mem, &words);
        let g = [Granule::Size4K, Granule::Size16K, Granule::Size64K][granule as usize];
        let fmt = TableFormat::stage1(g, 42, PaSize::Bits48).unwrap();
        let mut b = TableBuilder::adopt(fmt, POOL, &mem, BumpAllocator::new(1 << 44, 1 << 30));
        for (map, start, n, pa) in ops {
            let start = start as u64 * g.size();
            let len = n as u64 * g.size();
            let _ = if map {
                b.map(start, pa as u64 * g.size(), len, S1LeafAttrs::rw().bits())
            } else {
                b.unmap(start, len)
            };
        }
    }
}

#[test]
fn fault_levels_for_bad_fields_are_typed_config_errors() {
    // TTB beyond the effective PA size is a configuration error, not a walk.
    let p = Stage1Params {
        ttb: [
            TtbParams {
                ttb: 1 << 48,
                tsz: 16,
                ..Default::default()
            },
            TtbParams {
                epd: true,
                ..Default::default()
            },
        ],
        ips: 5,
        ..Default::default()
    };
    assert!(matches!(
        Stage1Config::new(&p, &Features::default()),
        Err(ConfigError::TtbOutOfRange { .. })
    ));
    // 52-bit IPS with a 4K granule still cannot place a TTB above 48 bits (IHI0070 5.4).
    let f = Features {
        oas: PaSize::Bits52,
        ..Features::default()
    };
    let p = Stage1Params { ips: 6, ..p };
    assert!(matches!(
        Stage1Config::new(&p, &f),
        Err(ConfigError::TtbOutOfRange { bits: 48, .. })
    ));
}
