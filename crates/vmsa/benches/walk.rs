//! One stage-1 4-level 4K walk against its floor (four dependent 8-byte reads from the same
//! memory implementation), and builder map+unmap of 1 GiB as 4K pages and as 2 MiB blocks.
//!
//! `cargo bench -p twinmmu-vmsa --bench walk`

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use twinmmu_vmsa::*;

const GIB: u64 = 1 << 30;

fn main() {
    let mut c = twinmmu_benchkit::criterion();

    // A 48-bit 4K stage-1 hierarchy with one page mapped: a four-level walk.
    let mem = SparseMemory::new();
    let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
    let mut b = TableBuilder::new(fmt, &mem, BumpAllocator::new(0x1_0000_0000, GIB)).unwrap();
    let va = 0x0000_7654_3210_9000u64;
    b.map(va, 0x8_0000_0000, 0x1000, S1LeafAttrs::rw().bits())
        .unwrap();
    let cfg = Stage1Config::new(
        &Stage1Params {
            ttb: [
                TtbParams {
                    ttb: b.root(),
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
    .unwrap();
    assert_eq!(walk_stage1(&cfg, &mem, &mut Direct, va).unwrap().reads(), 4);

    // The floor: four dependent reads (each address comes from the previous value), through
    // the same SparseMemory, from four different pages like the walk's tables.
    let floor_mem = SparseMemory::new();
    let chain = [0x10_0000u64, 0x20_1008, 0x30_2ff0, 0x40_3010];
    for w in chain.windows(2) {
        floor_mem.write_u64(w[0], w[1]).unwrap();
    }
    floor_mem.write_u64(chain[3], 0x8_0000_0000).unwrap();

    {
        let mut g = c.benchmark_group("walk");
        g.bench_function("s1_4k", |bch| {
            bch.iter(|| walk_stage1(&cfg, &mem, &mut Direct, black_box(va)).map(|t| t.output))
        });
        g.bench_function("floor", |bch| {
            bch.iter(|| {
                let mut a = black_box(chain[0]);
                for _ in 0..4 {
                    a = floor_mem.read_u64(a).unwrap_or(0);
                }
                a
            })
        });
        g.finish();
    }

    {
        let mut g = c.benchmark_group("builder");
        g.sample_size(10);
        let mem = SparseMemory::new();
        let mut b =
            TableBuilder::new(fmt, &mem, BumpAllocator::new(0x1_0000_0000, 4 * GIB)).unwrap();
        let attrs = S1LeafAttrs::rw().bits();
        // Output only 4K aligned: 262144 pages.
        g.bench_function("map_unmap_1g_4k", |bch| {
            bch.iter(|| {
                b.map(GIB, 0x10_0000_1000, GIB, attrs).unwrap();
                b.unmap(GIB, GIB).unwrap().leaf_bytes()
            })
        });
        // Output 2 MiB but not 1 GiB aligned: 512 L2 blocks.
        g.bench_function("map_unmap_1g_2m", |bch| {
            bch.iter(|| {
                b.map(GIB, 0x10_0020_0000, GIB, attrs).unwrap();
                b.unmap(GIB, GIB).unwrap().leaf_bytes()
            })
        });
        g.finish();
    }

    twinmmu_benchkit::Report::new("vmsa walker and builder")
        .median("stage-1 4-level 4K walk", "walk/s1_4k")
        .median("floor: 4 dependent reads", "walk/floor")
        .ratio("walk / floor", "walk/s1_4k", "walk/floor", Some(3.0))
        .median("map+unmap 1 GiB as 4K pages", "builder/map_unmap_1g_4k")
        .median("map+unmap 1 GiB as 2M blocks", "builder/map_unmap_1g_2m")
        .print();
}
