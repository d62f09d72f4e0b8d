//! TableBuilder behaviour: blocks, -EEXIST semantics, block splitting, freeing, changed
//! ranges, out-of-memory rollback. Descriptors are checked by raw bit positions.

#![allow(clippy::unwrap_used, clippy::single_range_in_vec_init)]

use twinmmu_vmsa::*;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

fn s1_4k_48(mem: &SparseMemory) -> TableBuilder<&SparseMemory, BumpAllocator> {
    let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
    TableBuilder::new(fmt, mem, BumpAllocator::new(0x1000_0000, 0x1000_0000)).unwrap()
}

fn s1_cfg(root: u64) -> Stage1Config {
    Stage1Config::new(
        &Stage1Params {
            ttb: [
                TtbParams {
                    ttb: root,
                    tsz: 16,
                    tg: 0,
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
        &Features::default(),
    )
    .unwrap()
}

#[test]
fn uses_the_largest_blocks_alignment_allows() {
    let m = SparseMemory::new();
    let mut b = s1_4k_48(&m);
    let attrs = S1LeafAttrs::rw().bits();
    // 1 GiB + 2 MiB + 4 KiB starting at 1 GiB: one L1 block, one L2 block, one page.
    let ch = b
        .map(GIB, 0x40_0000_0000, GIB + MIB2 + 0x1000, attrs)
        .unwrap();
    assert_eq!(ch.leaves, [GIB..2 * GIB + MIB2 + 0x1000]);
    let cfg = s1_cfg(b.root());
    let t = walk_stage1(&cfg, &m, &mut Direct, GIB + 0x1234).unwrap();
    assert_eq!((t.level, t.block_shift, t.output), (1, 30, 0x40_0000_1234));
    // Raw descriptor: block type 0b01, AF bit 10, SH bits [9:8] = 0b11.
    assert_eq!(
        t.descriptor,
        0x40_0000_0000 | (1 << 10) | (0b11 << 8) | 0b01
    );
    let t = walk_stage1(&cfg, &m, &mut Direct, 2 * GIB + 0x10).unwrap();
    assert_eq!((t.level, t.block_shift, t.output), (2, 21, 0x40_4000_0010));
    let t = walk_stage1(&cfg, &m, &mut Direct, 2 * GIB + MIB2).unwrap();
    assert_eq!((t.level, t.block_shift), (3, 12));
    assert_eq!(t.descriptor & 0b11, 0b11);
    // A misaligned output forces pages even when the input is block aligned.
    let ch = b.map(4 * GIB, 0x50_0000_1000, MIB2, attrs).unwrap();
    assert_eq!(ch.leaf_bytes(), MIB2);
    let t = walk_stage1(&cfg, &m, &mut Direct, 4 * GIB + 0x20_0000 - 1).unwrap();
    assert_eq!((t.level, t.output), (3, 0x50_0020_0fff));
}

#[test]
fn mapping_over_a_mapping_changes_nothing() {
    let m = SparseMemory::new();
    let mut b = s1_4k_48(&m);
    let attrs = S1LeafAttrs::rw().bits();
    b.map(0x20_0000, 0x8000_0000, 0x3000, attrs).unwrap();
    let live = b.allocator().live_bytes();
    let pages = m.page_count();
    // Overlaps the last page of the existing mapping; the first 2 MiB block of the new
    // range would be free but must not be written.
    let err = b.map(0x0, 0x9000_0000, 0x20_3000, attrs).unwrap_err();
    assert_eq!(err, BuildError::AlreadyMapped { iova: 0x20_0000 });
    assert_eq!((b.allocator().live_bytes(), m.page_count()), (live, pages));
    let cfg = s1_cfg(b.root());
    assert!(walk_stage1(&cfg, &m, &mut Direct, 0x1000).is_err());
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, 0x20_2000)
            .unwrap()
            .output,
        0x8000_2000
    );
    // Over a block.
    b.map(GIB, 0x4000_0000, GIB, attrs).unwrap();
    assert_eq!(
        b.map(GIB + 0x5000, 0x1000, 0x1000, attrs),
        Err(BuildError::AlreadyMapped { iova: GIB + 0x5000 })
    );
}

#[test]
fn partial_unmap_splits_blocks_and_reports_ranges() {
    let m = SparseMemory::new();
    let mut b = s1_4k_48(&m);
    let attrs = S1LeafAttrs {
        el0: true,
        not_global: true,
        ..S1LeafAttrs::rw()
    }
    .bits();
    b.map(GIB, 0x80_0000_0000, GIB, attrs).unwrap();
    let cfg = s1_cfg(b.root());
    // Unmap one 4K page in the middle of the 1 GiB block: L1 block → L2 table of 2 MiB
    // blocks → one L3 table of pages.
    let hole = GIB + 5 * MIB2 + 0x7000;
    let ch = b.unmap(hole, 0x1000).unwrap();
    assert_eq!(ch.leaves, [hole..hole + 0x1000]);
    assert!(ch.tables.is_empty());
    assert_eq!(
        walk_stage1(&cfg, &m, &mut Direct, hole),
        Err(WalkError::Fault(Fault::new(
            FaultKind::Translation,
            3,
            Stage::Stage1
        )))
    );
    let t = walk_stage1(&cfg, &m, &mut Direct, hole + 0x1000).unwrap();
    assert_eq!((t.level, t.output), (3, 0x80_0000_0000 + 5 * MIB2 + 0x8000));
    assert!(!t.global && t.perms.el0());
    let t = walk_stage1(&cfg, &m, &mut Direct, GIB + 0x10).unwrap();
    assert_eq!((t.level, t.block_shift, t.output), (2, 21, 0x80_0000_0010));
    let t = walk_stage1(&cfg, &m, &mut Direct, 2 * GIB - 1).unwrap();
    assert_eq!((t.level, t.output), (2, 0x80_3fff_ffff));
    // Unmapping a range with holes and a split block: reported ranges are what changed.
    let ch = b.unmap(GIB + 4 * MIB2, 3 * MIB2).unwrap();
    assert_eq!(
        ch.leaves,
        [GIB + 4 * MIB2..hole, hole + 0x1000..GIB + 7 * MIB2]
    );
    // The L3 table of the split 2 MiB block became empty and was freed.
    assert_eq!(ch.tables, [GIB + 5 * MIB2..GIB + 6 * MIB2]);
}

#[test]
fn unmapping_everything_frees_every_table() {
    let m = SparseMemory::new();
    let mut b = s1_4k_48(&m);
    let root_only = b.allocator().live_bytes();
    let attrs = S1LeafAttrs::rw().bits();
    b.map(0x7f_0000_0000, 0x1000_0000, 0x40_5000, attrs)
        .unwrap();
    b.map(0x1000, 0x2000_0000, 0x1000, attrs).unwrap();
    assert!(b.allocator().live_bytes() > root_only);
    let ch = b.unmap(0, 1 << 48).unwrap();
    assert_eq!(ch.leaf_bytes(), 0x40_5000 + 0x1000);
    assert_eq!(b.allocator().live_bytes(), root_only);
    // L0 entries whose tables were freed are reported for walk-cache invalidation.
    assert!(ch.tables.iter().any(|r| r.start == 0 && r.end == 1 << 39));
    for i in 0..512 {
        assert_eq!(m.read_u64(b.root() + i * 8).unwrap(), 0);
    }
    let (_, alloc) = b.destroy().unwrap();
    assert_eq!(alloc.live_bytes(), 0);
}

#[test]
fn out_of_memory_rolls_back() {
    let m = SparseMemory::new();
    let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
    // Room for the root and two more tables only: a 4-level page needs three.
    let mut b = TableBuilder::new(fmt, &m, BumpAllocator::new(0x10_0000, 0x3000)).unwrap();
    let live = b.allocator().live_bytes();
    let err = b
        .map(0x1000, 0x5000, 0x1000, S1LeafAttrs::rw().bits())
        .unwrap_err();
    assert!(matches!(err, BuildError::OutOfMemory { .. }));
    assert_eq!(b.allocator().live_bytes(), live);
    assert_eq!(m.read_u64(b.root()).unwrap(), 0);
    // A 1 GiB block needs only the L1 table.
    b.map(GIB, 0, GIB, S1LeafAttrs::rw().bits()).unwrap();
}

#[test]
fn bad_arguments_are_typed_errors() {
    let m = SparseMemory::new();
    let mut b = s1_4k_48(&m);
    let a = S1LeafAttrs::rw().bits();
    assert!(matches!(
        b.map(0x10, 0, 0x1000, a),
        Err(BuildError::Misaligned { .. })
    ));
    assert!(matches!(
        b.map(0, 0x10, 0x1000, a),
        Err(BuildError::Misaligned { .. })
    ));
    assert!(matches!(
        b.map(0, 0, 0, a),
        Err(BuildError::Misaligned { .. })
    ));
    assert!(matches!(
        b.map(1 << 48, 0, 0x1000, a),
        Err(BuildError::InputOutOfRange { .. })
    ));
    assert!(matches!(
        b.map((1 << 48) - 0x1000, 0, 0x2000, a),
        Err(BuildError::InputOutOfRange { .. })
    ));
    assert!(matches!(
        b.map(0, (1 << 48) - 0x1000, 0x2000, a),
        Err(BuildError::OutputOutOfRange { .. })
    ));
    assert!(matches!(
        b.unmap(u64::MAX - 0xfff, 0x1000),
        Err(BuildError::InputOutOfRange { .. })
    ));
}

#[test]
fn stage2_concatenated_root_and_attributes() {
    let m = SparseMemory::new();
    let f = Features::default();
    // 4K, 40-bit IPA, SL0 = 1: two concatenated L1 tables.
    let p = Stage2Params {
        s2ttb: 0,
        s2t0sz: 24,
        s2sl0: 1,
        s2tg: 0,
        s2ps: 5,
        ..Default::default()
    };
    let cfg0 = Stage2Config::new(&p, &f).unwrap();
    let fmt = TableFormat::of_stage2(&cfg0);
    let mut b = TableBuilder::new(fmt, &m, BumpAllocator::new(0x100_0000, 0x100_0000)).unwrap();
    assert_eq!(
        b.root() & 0x1fff,
        0,
        "root aligned to the 8 KiB concatenated size"
    );
    let cfg = Stage2Config::new(
        &Stage2Params {
            s2ttb: b.root(),
            ..p
        },
        &f,
    )
    .unwrap();
    let attrs = S2LeafAttrs {
        write: false,
        xn: 0b10,
        ..S2LeafAttrs::rw()
    };
    b.map(600 * GIB, 0x2_0000_0000, GIB + 0x1000, attrs.bits())
        .unwrap();
    let t = walk_stage2(&cfg, &m, 600 * GIB + 0x42).unwrap();
    assert_eq!((t.level, t.output), (1, 0x2_0000_0042));
    // S2AP[7:6] = 0b01 (read only), XN[54:53] = 0b10, MemAttr [5:2] = 0b1111.
    assert_eq!(
        t.descriptor,
        0x2_0000_0000 | (0b01 << 6) | (0b10 << 53) | (0xF << 2) | (0b11 << 8) | (1 << 10) | 0b01
    );
    assert!(t.check(Access::new(AccessKind::Write, false)).is_err());
    let t = walk_stage2(&cfg, &m, 601 * GIB).unwrap();
    assert_eq!((t.level, t.output), (3, 0x2_4000_0000));
}

#[test]
fn sixty_four_k_52_bit_outputs() {
    let m = SparseMemory::new();
    let fmt = TableFormat::stage1(Granule::Size64K, 52, PaSize::Bits52).unwrap();
    let mut b = TableBuilder::new(fmt, &m, BumpAllocator::new(0x100_0000, 0x100_0000)).unwrap();
    let oa = 0xA_0000_1234_0000u64;
    b.map(0x1_0000, oa, 0x1_0000, S1LeafAttrs::rw().bits())
        .unwrap();
    let f = Features {
        oas: PaSize::Bits52,
        ias: PaSize::Bits52,
        vax52: true,
        ..Features::default()
    };
    let cfg = Stage1Config::new(
        &Stage1Params {
            ttb: [
                TtbParams {
                    ttb: b.root(),
                    tsz: 12,
                    tg: 1,
                    ..Default::default()
                },
                TtbParams {
                    epd: true,
                    ..Default::default()
                },
            ],
            ips: 6,
            ..Default::default()
        },
        &f,
    )
    .unwrap();
    let t = walk_stage1(&cfg, &m, &mut Direct, 0x1_0042).unwrap();
    assert_eq!(t.output, oa | 0x42);
    // OA[51:48] = 0xA sits in descriptor bits [15:12].
    assert_eq!((t.descriptor >> 12) & 0xF, 0xA);
}
