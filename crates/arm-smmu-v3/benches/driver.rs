//! The arm-smmu-v3 driver under iommufd, on the `hw` SMMU:
//! - IOAS map/unmap of 10^5 × 4 KiB and of 1 GiB as 512 × 2 MiB with this driver's stage-2
//!   domain attached (a nesting parent with a device on it). Floor: the `vmsa` builder's
//!   map/unmap of the same ranges alone, so the ratio is the iommufd + driver overhead,
//!   invalidation (TLBI_S2_IPA range + TLBI_NH_ALL + CMD_SYNC per unmap) included.
//! - HWPT_INVALIDATE of 128 guest TLBI_NH_VA on a vIOMMU. Floor: the same 128 converted
//!   commands issued straight to the command queue (the SMMU's own work).
//! - vIOMMU alloc + destroy, with a pinned KVM VMID (BTM) and with a private one. Floor for
//!   the pinned case: KVM's pin + unpin alone.
//! - A HW queue: the guest writes 128 TLBI_NH_VA into its ring, bumps PROD and rings the
//!   doorbell, against the same 128 through HWPT_INVALIDATE (the VMM building the array).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::BatchSize;
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{FrameAllocator, PhysMem, Smmu, SmmuConfig, SparseMem};
use twinmmu_iommufd::*;
use twinmmu_kvm::{Kvm, KvmConfig, Vm, VmConfig};
use twinmmu_vmsa::{S2LeafAttrs, TableBuilder};

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 0x8000_0000;
const GUEST: u64 = RAM + 0x4000_0000;
const N_4K: u64 = 100_000;
const SZ_4K: u64 = 4096;
const N_2M: u64 = 512;
const SZ_2M: u64 = 2 << 20;
const IOVA: u64 = 0x1_0000_0000;
const FIXED: u32 = map_flags::FIXED_IOVA | map_flags::READABLE | map_flags::WRITEABLE;

/// Host memory mapped by physical address with no per-page bookkeeping: the bench measures
/// iommufd and the driver, not a test backing's pin counters.
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

struct Machine {
    mem: Arc<SparseMem>,
    drv: Arc<ArmSmmuV3>,
}

fn machine(cfg: SmmuConfig, opts: Options) -> Machine {
    let mem = Arc::new(SparseMem::with_range(RAM, RAM_SIZE).unwrap());
    let smmu = Smmu::new(cfg, Arc::clone(&mem) as Arc<dyn PhysMem>).unwrap();
    let frames = FrameAllocator::new(RAM..RAM + 0x1000_0000).unwrap();
    let drv = ArmSmmuV3::probe(smmu, frames, opts).unwrap();
    Machine { mem, drv }
}

fn none() -> UserData<'static> {
    UserData {
        data_type: hwpt_data::NONE,
        len: 0,
        buf: None,
    }
}

/// A context with an IOAS and a device attached to a NEST_PARENT stage 2 of it.
struct S2Setup {
    _m: Machine,
    c: Iommufd,
    ioas: ObjectId,
    src: Arc<dyn Backing>,
    _dev: Arc<Master>,
}

fn s2_setup() -> S2Setup {
    let m = machine(
        SmmuConfig {
            btm: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    let dev = m.drv.add_master(1, MasterOptions::default()).unwrap();
    let c = Iommufd::new();
    let d = c
        .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, None)
        .unwrap();
    let ioas = c.ioas_alloc(0).unwrap();
    let s2 = c
        .hwpt_alloc(hwpt_flags::NEST_PARENT, d, ioas, &mut none(), ObjectId(0))
        .unwrap();
    c.attach(d, NO_PASID, s2).unwrap();
    S2Setup {
        _m: m,
        c,
        ioas,
        src: Arc::new(FlatBacking),
        _dev: dev,
    }
}

fn map_all(s: &S2Setup, n: u64, size: u64) {
    for i in 0..n {
        let src = MapSource {
            backing: Arc::clone(&s.src),
            addr: GUEST + i * size,
        };
        s.c.ioas_map(FIXED, s.ioas, src, size, IOVA + i * size)
            .unwrap();
    }
}

fn unmap_all(s: &S2Setup, n: u64, size: u64) {
    for i in 0..n {
        s.c.ioas_unmap(s.ioas, IOVA + i * size, size).unwrap();
    }
}

type Builder = TableBuilder<TableMem, FrameAllocator>;

/// The floor: a bare stage-2 builder on the same memory, same format.
fn floor_builder() -> (Arc<SparseMem>, Builder) {
    let mem = Arc::new(SparseMem::with_range(RAM, RAM_SIZE).unwrap());
    let frames = FrameAllocator::new(RAM..RAM + 0x1000_0000).unwrap();
    let fmt = twinmmu_vmsa::TableFormat::stage2(
        twinmmu_vmsa::Granule::Size4K,
        48,
        0,
        twinmmu_vmsa::PaSize::Bits48,
    )
    .unwrap();
    let b = TableBuilder::new(fmt, TableMem(Arc::clone(&mem) as Arc<dyn PhysMem>), frames).unwrap();
    (mem, b)
}

fn floor_map(b: &mut Builder, n: u64, size: u64) {
    let attrs = S2LeafAttrs::rw().bits();
    for i in 0..n {
        black_box(
            b.map(IOVA + i * size, GUEST + i * size, size, attrs)
                .unwrap(),
        );
    }
}

fn floor_unmap(b: &mut Builder, n: u64, size: u64) {
    for i in 0..n {
        black_box(b.unmap(IOVA + i * size, size).unwrap());
    }
}

/// A nested stack: device with vSID 1 under a vIOMMU (BTM: pinned KVM VMID), optionally a
/// TEGRA241_CMDQV vIOMMU with a 256-entry HW queue at guest PA 0x10000, enabled.
struct NestedSetup {
    m: Machine,
    c: Iommufd,
    viommu: ObjectId,
    vs: Arc<dyn Viommu>,
    page: Option<MmapRegion>,
    prod: u32,
    _dev: Arc<Master>,
    _vm: Arc<Vm>,
}

const RING: u64 = 0x1_0000;
const RING_LOG2: u32 = 8;

fn nested_setup(cmdqv: bool) -> NestedSetup {
    let m = machine(
        SmmuConfig::default(),
        Options {
            cmdqv: cmdqv.then(CmdqvConfig::default),
            ..Options::default()
        },
    );
    let dev = m.drv.add_master(1, MasterOptions::default()).unwrap();
    let vm = Kvm::new(KvmConfig::new(4))
        .unwrap()
        .create_vm(VmConfig::default());
    let c = Iommufd::new();
    let d = c
        .bind_device(
            Arc::clone(&dev) as Arc<dyn IommuDevice>,
            Some(KvmRef::new(Arc::clone(&vm))),
        )
        .unwrap();
    let ioas = c.ioas_alloc(0).unwrap();
    let src = MapSource {
        backing: Arc::new(FlatBacking),
        addr: GUEST,
    };
    c.ioas_map(FIXED, ioas, src, 0x20_0000, 0).unwrap();
    let s2 = c
        .hwpt_alloc(hwpt_flags::NEST_PARENT, d, ioas, &mut none(), ObjectId(0))
        .unwrap();
    let mut data = [0u8; 16];
    let viommu = if cmdqv {
        c.viommu_alloc(
            0,
            viommu_type::TEGRA241_CMDQV,
            d,
            s2,
            &mut UserData::new(viommu_type::TEGRA241_CMDQV, &mut data),
        )
        .unwrap()
    } else {
        c.viommu_alloc(0, viommu_type::ARM_SMMUV3, d, s2, &mut none())
            .unwrap()
    };
    c.vdevice_alloc(viommu, d, 1).unwrap();
    let mut vste = [0u8; 16];
    vste[..8].copy_from_slice(&(1u64 | (5 << 1) | 0x8000).to_le_bytes());
    let n = c
        .hwpt_alloc(
            0,
            d,
            viommu,
            &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut vste),
            ObjectId(0),
        )
        .unwrap();
    c.attach(d, NO_PASID, n).unwrap();
    let vs = c.viommu_ops(viommu).unwrap();
    let page = if cmdqv {
        let off = u64::from_le_bytes(data[..8].try_into().unwrap());
        let page = c.mmap(off, VCMDQ_PAGE_SIZE, true, false).unwrap();
        c.hw_queue_alloc(
            0,
            viommu,
            hw_queue_type::TEGRA241_CMDQV,
            0,
            RING,
            16 << RING_LOG2,
        )
        .unwrap();
        m.mem
            .write(page.base_pa() + vcmdq_reg::CONFIG, &1u32.to_le_bytes())
            .unwrap();
        vs.as_any().downcast_ref::<VSmmu>().unwrap().kick();
        Some(page)
    } else {
        None
    };
    NestedSetup {
        m,
        c,
        viommu,
        vs,
        page,
        prod: 0,
        _dev: dev,
        _vm: vm,
    }
}

fn tlbi_nh_va(i: u64) -> [u64; 2] {
    [0x12 | (7u64 << 48), (0x4000_0000 + (i << 12)) & !0xfff]
}

/// The VMM's side of HWPT_INVALIDATE: the array of 128 commands, then the ioctl.
fn invalidate_128(s: &NestedSetup) {
    let mut bytes = Vec::with_capacity(128 * 16);
    for i in 0..128 {
        let c = tlbi_nh_va(i);
        bytes.extend_from_slice(&c[0].to_le_bytes());
        bytes.extend_from_slice(&c[1].to_le_bytes());
    }
    let mut arr = InvalidateArray::new(invalidate_data::VIOMMU_ARM_SMMUV3, 16, 128, &bytes);
    s.c.hwpt_invalidate(s.viommu, &mut arr).unwrap();
    assert_eq!(arr.entry_num, 128);
}

/// The guest's side of the HW queue: 128 commands into the ring, PROD, the doorbell.
fn hw_queue_128(s: &mut NestedSetup) {
    let base = GUEST + RING;
    let mask = (1u32 << (RING_LOG2 + 1)) - 1;
    for i in 0..128 {
        let idx = u64::from(s.prod & ((1 << RING_LOG2) - 1));
        let c = tlbi_nh_va(i);
        s.m.mem.write_u64(base + idx * 16, c[0]).unwrap();
        s.m.mem.write_u64(base + idx * 16 + 8, c[1]).unwrap();
        s.prod = (s.prod + 1) & mask;
    }
    let page = s.page.as_ref().map(|p| p.base_pa()).unwrap_or(0);
    s.m.mem
        .write(page + vcmdq_reg::PROD, &s.prod.to_le_bytes())
        .unwrap();
    let n = s.vs.as_any().downcast_ref::<VSmmu>().unwrap().kick();
    assert_eq!(n, 128);
}

fn main() {
    let mut c = twinmmu_benchkit::criterion();

    for (name, n, size) in [("4k", N_4K, SZ_4K), ("1g", N_2M, SZ_2M)] {
        let mut g = c.benchmark_group(format!("s2_map_{name}"));
        g.sample_size(10);
        g.bench_function("iommufd_smmuv3", |b| {
            b.iter_batched(
                s2_setup,
                |s| {
                    map_all(&s, n, size);
                    s
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("floor_vmsa_builder", |b| {
            b.iter_batched(
                floor_builder,
                |(m, mut bld)| {
                    floor_map(&mut bld, n, size);
                    (m, bld)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();

        let mut g = c.benchmark_group(format!("s2_unmap_{name}"));
        g.sample_size(10);
        g.bench_function("iommufd_smmuv3", |b| {
            b.iter_batched(
                || {
                    let s = s2_setup();
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
        g.bench_function("floor_vmsa_builder", |b| {
            b.iter_batched(
                || {
                    let (m, mut bld) = floor_builder();
                    floor_map(&mut bld, n, size);
                    (m, bld)
                },
                |(m, mut bld)| {
                    floor_unmap(&mut bld, n, size);
                    (m, bld)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }

    {
        let mut g = c.benchmark_group("invalidate_128");
        let s = nested_setup(false);
        g.bench_function("hwpt_invalidate", |b| b.iter(|| invalidate_128(&s)));
        let vmid = s.vs.as_any().downcast_ref::<VSmmu>().unwrap().vmid();
        let converted: Vec<[u64; 2]> = (0..128)
            .map(|i| {
                let c = tlbi_nh_va(i);
                [c[0] | (u64::from(vmid) << 32), c[1]]
            })
            .collect();
        g.bench_function("floor_cmdq", |b| {
            b.iter(|| {
                for chunk in converted.chunks(CMDQ_BATCH_ENTRIES - 1) {
                    s.m.drv.issue_commands(chunk).unwrap();
                }
            })
        });
        g.finish();
    }

    {
        let mut g = c.benchmark_group("hw_queue_128");
        let mut s = nested_setup(true);
        g.bench_function("vcmdq_doorbell", |b| b.iter(|| hw_queue_128(&mut s)));
        g.bench_function("hwpt_invalidate", |b| b.iter(|| invalidate_128(&s)));
        g.finish();
    }

    {
        let mut g = c.benchmark_group("viommu_alloc_destroy");
        for (name, btm) in [("pinned_kvm_vmid", true), ("private_vmid", false)] {
            let m = machine(
                SmmuConfig {
                    btm,
                    ..SmmuConfig::default()
                },
                Options::default(),
            );
            let dev = m.drv.add_master(1, MasterOptions::default()).unwrap();
            let vm = Kvm::new(KvmConfig::new(4))
                .unwrap()
                .create_vm(VmConfig::default());
            let ctx = Iommufd::new();
            let d = ctx
                .bind_device(
                    Arc::clone(&dev) as Arc<dyn IommuDevice>,
                    Some(KvmRef::new(Arc::clone(&vm))),
                )
                .unwrap();
            let ioas = ctx.ioas_alloc(0).unwrap();
            let s2 = ctx
                .hwpt_alloc(hwpt_flags::NEST_PARENT, d, ioas, &mut none(), ObjectId(0))
                .unwrap();
            g.bench_function(name, |b| {
                b.iter(|| {
                    let v = ctx
                        .viommu_alloc(0, viommu_type::ARM_SMMUV3, d, s2, &mut none())
                        .unwrap();
                    ctx.destroy(v).unwrap();
                })
            });
            if btm {
                g.bench_function("floor_kvm_pin_unpin", |b| {
                    b.iter(|| {
                        let p = vm.pin_vmid().unwrap();
                        p.unpin(|_| Ok::<(), ()>(())).unwrap();
                    })
                });
            }
        }
        g.finish();
    }

    twinmmu_benchkit::Report::new("arm-smmu-v3 driver under iommufd (hw SMMU)")
        .median(
            "IOAS map 4 KiB x 10^5 (S2 attached)",
            "s2_map_4k/iommufd_smmuv3",
        )
        .ratio(
            "  / vmsa builder floor",
            "s2_map_4k/iommufd_smmuv3",
            "s2_map_4k/floor_vmsa_builder",
            None,
        )
        .median("IOAS unmap 4 KiB x 10^5", "s2_unmap_4k/iommufd_smmuv3")
        .ratio(
            "  / vmsa builder floor",
            "s2_unmap_4k/iommufd_smmuv3",
            "s2_unmap_4k/floor_vmsa_builder",
            None,
        )
        .median("IOAS map 1 GiB (512 x 2 MiB)", "s2_map_1g/iommufd_smmuv3")
        .ratio(
            "  / vmsa builder floor",
            "s2_map_1g/iommufd_smmuv3",
            "s2_map_1g/floor_vmsa_builder",
            None,
        )
        .median(
            "IOAS unmap 1 GiB (512 x 2 MiB)",
            "s2_unmap_1g/iommufd_smmuv3",
        )
        .ratio(
            "  / vmsa builder floor",
            "s2_unmap_1g/iommufd_smmuv3",
            "s2_unmap_1g/floor_vmsa_builder",
            None,
        )
        .median("HWPT_INVALIDATE 128 cmds", "invalidate_128/hwpt_invalidate")
        .ratio(
            "  / the same commands straight to the CMDQ",
            "invalidate_128/hwpt_invalidate",
            "invalidate_128/floor_cmdq",
            None,
        )
        .median("HW queue 128 TLBIs", "hw_queue_128/vcmdq_doorbell")
        .median(
            "  same 128 via HWPT_INVALIDATE",
            "hw_queue_128/hwpt_invalidate",
        )
        .ratio(
            "HW queue / HWPT_INVALIDATE",
            "hw_queue_128/vcmdq_doorbell",
            "hw_queue_128/hwpt_invalidate",
            None,
        )
        .median(
            "vIOMMU alloc+destroy, pinned KVM VMID",
            "viommu_alloc_destroy/pinned_kvm_vmid",
        )
        .ratio(
            "  / KVM pin+unpin floor",
            "viommu_alloc_destroy/pinned_kvm_vmid",
            "viommu_alloc_destroy/floor_kvm_pin_unpin",
            None,
        )
        .median(
            "vIOMMU alloc+destroy, private VMID",
            "viommu_alloc_destroy/private_vmid",
        )
        .print();
}
