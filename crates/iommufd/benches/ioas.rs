//! IOAS map/unmap with the mock driver attached: 10^5 × 4 KiB areas, and 1 GiB as 512
//! 2 MiB-aligned areas.
//!
//! Floors (printed as ratios in the same run):
//! - `floor_btree`: the bare interval-structure work every map/unmap must do — a BTreeMap
//!   keyed by IOVA, an overlap lookup and an insert per map, a remove per unmap, for the same
//!   ranges. The kernel's iopt does an interval-tree insert/remove per area; anything above
//!   this is validation, pinning and the domain's page table.
//! - `floor_pfn` (1 GiB only): one physical-address store per 4 KiB page, the least any pinning
//!   does (pin_user_pages fills one `struct page *` per page), plus the BTreeMap work.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::BatchSize;
use twinmmu_iommufd::mock::{self, MOCK_APERTURE_START, MockIommu};
use twinmmu_iommufd::*;

/// Identity-mapped host memory with no per-page bookkeeping: the bench measures iommufd, not
/// a test backing's pin counters.
struct FlatBacking;

impl Backing for FlatBacking {
    fn pin(&self, addr: u64, npages: u64, _write: bool) -> Result<Vec<PhysRun>, Errno> {
        Ok(vec![PhysRun { pa: addr, npages }])
    }
    fn unpin(&self, _addr: u64, _npages: u64) {}
    fn read(&self, _addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _addr: u64, _buf: &[u8]) -> Result<(), Errno> {
        Ok(())
    }
}

const N_4K: u64 = 100_000;
const SZ_4K: u64 = 4096;
const N_2M: u64 = 512;
const SZ_2M: u64 = 2 << 20;
const FLAGS: u32 = map_flags::FIXED_IOVA | map_flags::READABLE | map_flags::WRITEABLE;

struct Setup {
    ictx: Iommufd,
    ioas: ObjectId,
    src: Arc<dyn Backing>,
    _iommu: Arc<MockIommu>,
}

fn setup() -> Setup {
    let ictx = Iommufd::new();
    let iommu = MockIommu::new();
    let ioas = ictx.ioas_alloc(0).unwrap();
    mock::mock_domain(&ictx, &iommu, ioas, 0).unwrap();
    Setup {
        ictx,
        ioas,
        src: Arc::new(FlatBacking),
        _iommu: iommu,
    }
}

fn map_all(s: &Setup, n: u64, size: u64) {
    for i in 0..n {
        let src = MapSource {
            backing: Arc::clone(&s.src),
            addr: 0x1_0000_0000 + i * size,
        };
        s.ictx
            .ioas_map(FLAGS, s.ioas, src, size, MOCK_APERTURE_START + i * size)
            .unwrap();
    }
}

fn unmap_all(s: &Setup, n: u64, size: u64) {
    for i in 0..n {
        s.ictx
            .ioas_unmap(s.ioas, MOCK_APERTURE_START + i * size, size)
            .unwrap();
    }
}

fn floor_insert(t: &mut BTreeMap<u64, (u64, u64)>, n: u64, size: u64) {
    for i in 0..n {
        let iova = MOCK_APERTURE_START + i * size;
        let last = iova + size - 1;
        let overlap = t
            .range(..=last)
            .next_back()
            .is_some_and(|(_, &(l, _))| l >= iova);
        assert!(!overlap);
        t.insert(iova, (last, 0x1_0000_0000 + i * size));
    }
}

fn floor_remove(t: &mut BTreeMap<u64, (u64, u64)>, n: u64, size: u64) {
    for i in 0..n {
        black_box(t.remove(&(MOCK_APERTURE_START + i * size)));
    }
}

fn main() {
    let mut c = twinmmu_benchkit::criterion();

    for (name, n, size) in [("4k", N_4K, SZ_4K), ("1g", N_2M, SZ_2M)] {
        let mut g = c.benchmark_group(format!("ioas_map_{name}"));
        g.sample_size(10);
        g.bench_function("iommufd", |b| {
            b.iter_batched(
                setup,
                |s| {
                    map_all(&s, n, size);
                    s
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("floor_btree", |b| {
            b.iter_batched(
                BTreeMap::new,
                |mut t| {
                    floor_insert(&mut t, n, size);
                    t
                },
                BatchSize::PerIteration,
            )
        });
        if name == "1g" {
            g.bench_function("floor_pfn", |b| {
                b.iter_batched(
                    BTreeMap::new,
                    |mut t| {
                        floor_insert(&mut t, n, size);
                        let pages = n * size / SZ_4K;
                        let mut pfns = vec![0u64; pages as usize];
                        for (i, p) in pfns.iter_mut().enumerate() {
                            *p = 0x1_0000_0000 + i as u64 * SZ_4K;
                        }
                        (t, pfns)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("ioas_unmap_{name}"));
        g.sample_size(10);
        g.bench_function("iommufd", |b| {
            b.iter_batched(
                || {
                    let s = setup();
                    map_all(&s, n, size);
                    s
                },
                |s| {
                    unmap_all(&s, n, size);
                    s
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("floor_btree", |b| {
            b.iter_batched(
                || {
                    let mut t = BTreeMap::new();
                    floor_insert(&mut t, n, size);
                    t
                },
                |mut t| {
                    floor_remove(&mut t, n, size);
                    t
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }

    twinmmu_benchkit::Report::new("iommufd IOAS with the mock driver attached")
        .median("map 4 KiB x 10^5", "ioas_map_4k/iommufd")
        .ratio(
            "map 4 KiB x 10^5 / btree floor",
            "ioas_map_4k/iommufd",
            "ioas_map_4k/floor_btree",
            None,
        )
        .median("unmap 4 KiB x 10^5", "ioas_unmap_4k/iommufd")
        .ratio(
            "unmap 4 KiB x 10^5 / btree floor",
            "ioas_unmap_4k/iommufd",
            "ioas_unmap_4k/floor_btree",
            None,
        )
        .median("map 1 GiB (512 x 2 MiB)", "ioas_map_1g/iommufd")
        .ratio(
            "map 1 GiB / btree floor",
            "ioas_map_1g/iommufd",
            "ioas_map_1g/floor_btree",
            None,
        )
        .ratio(
            "map 1 GiB / pfn-store floor",
            "ioas_map_1g/iommufd",
            "ioas_map_1g/floor_pfn",
            None,
        )
        .median("unmap 1 GiB (512 x 2 MiB)", "ioas_unmap_1g/iommufd")
        .ratio(
            "unmap 1 GiB / btree floor",
            "ioas_unmap_1g/iommufd",
            "ioas_unmap_1g/floor_btree",
            None,
        )
        .print();
}
