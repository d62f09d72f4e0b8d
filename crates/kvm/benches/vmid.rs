//! VMID allocator benchmarks: the vCPU-load fast path against its floor (one atomic load and
//! one compare-and-swap on one cache line), alone and on two CPUs at once; rollover cost
//! against CPUs, VMID bits and VMs; pin + unpin.

#![allow(clippy::unwrap_used)] // benchmarks may unwrap, like tests

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use crossbeam_utils::CachePadded;
use twinmmu_benchkit::Report;
use twinmmu_kvm::sync::StdPrimitives;
use twinmmu_kvm::{Kvm, KvmConfig, KvmVmid, NullTlbi, VmConfig, VmidAllocator, VmidBits, VmidPath};

fn allocator(bits: VmidBits, ncpus: usize) -> VmidAllocator<StdPrimitives> {
    VmidAllocator::new(bits, ncpus, true, Arc::new(NullTlbi)).unwrap()
}

/// The floor: what the fast path cannot avoid, a load and a compare-and-swap of one word.
#[inline(always)]
fn floor_op(slot: &AtomicU64) {
    let v = slot.load(Relaxed);
    let _ = black_box(slot.compare_exchange(v, v ^ 1, Relaxed, Relaxed));
}

/// Runs `op` `iters` times on each of `threads` threads at once; returns the wall time, so
/// the per-iteration figure is the time one CPU spends per operation while the others run.
fn parallel(threads: usize, iters: u64, op: impl Fn(usize) + Sync) -> Duration {
    let start_line = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (op, start_line) = (&op, &start_line);
            s.spawn(move || {
                start_line.wait();
                for _ in 0..iters {
                    op(t);
                }
            });
        }
        start_line.wait();
        let t0 = Instant::now();
        // The scope joins every thread before returning.
        t0
    })
    .elapsed()
}

fn fast_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("fastpath");
    let slot = CachePadded::new(AtomicU64::new(1));
    g.bench_function("floor", |b| b.iter(|| floor_op(&slot)));

    let alloc = allocator(VmidBits::Sixteen, 4);
    let vmid = KvmVmid::new();
    alloc.update(0, &vmid).unwrap();
    alloc.clear_active(0).unwrap();
    assert_eq!(alloc.update(0, &vmid).unwrap().path, VmidPath::Fast);
    // Like the floor, which keeps only its CAS result, the subject keeps what a vCPU load
    // needs: the VMID to program. (Passing the whole 24-byte result through black_box
    // forces stores that the next locked CAS must drain, and measures that instead.)
    g.bench_function("load_put", |b| {
        b.iter(|| {
            let vmid = alloc.update(0, &vmid).map_or(0, |u| u.vmid.get());
            alloc.clear_active(0).unwrap();
            black_box(vmid)
        })
    });

    // The whole vCPU path: claim the physical CPU, the one-shot coherency check, the VMID
    // update, then put.
    let kvm = Kvm::new(KvmConfig::new(4)).unwrap();
    let vm = kvm.create_vm(VmConfig::default());
    let mut vcpu = vm.create_vcpu();
    g.bench_function("vcpu_load_put", |b| {
        b.iter(|| {
            let vmid = vcpu.load(0).map_or(0, |u| u.vmid.get());
            vcpu.put().unwrap();
            black_box(vmid)
        })
    });

    // The same on a machine: the load also programs the PE (VTTBR VMID, stage 2) and
    // checks last_vcpu_ran; the put restores the host context.
    let mem = Arc::new(twinmmu_hw::SparseMem::with_range(0x4000_0000, 0x10_0000).unwrap());
    let dvm = twinmmu_hw::Dvm::new(twinmmu_hw::DvmConfig::new(4), mem);
    let kvm = Kvm::with_machine(KvmConfig::new(4), twinmmu_kvm::Machine::new(dvm)).unwrap();
    let vm = kvm.create_vm(VmConfig::default());
    let mut vcpu = vm.create_vcpu();
    g.bench_function("vcpu_load_put_pe", |b| {
        b.iter(|| {
            let vmid = vcpu.load(0).map_or(0, |u| u.vmid.get());
            vcpu.put().unwrap();
            black_box(vmid)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("fastpath_2cpus");
    let slots: Vec<CachePadded<AtomicU64>> = (0..2)
        .map(|_| CachePadded::new(AtomicU64::new(1)))
        .collect();
    g.bench_function("floor", |b| {
        b.iter_custom(|iters| parallel(2, iters, |t| floor_op(&slots[t])))
    });
    // Two vCPUs of one VM on CPUs 0 and 1: the VM's id and the generation are read by both.
    let alloc = allocator(VmidBits::Sixteen, 4);
    let vmid = KvmVmid::new();
    for cpu in 0..2 {
        alloc.update(cpu, &vmid).unwrap();
        alloc.clear_active(cpu).unwrap();
    }
    g.bench_function("load_put", |b| {
        b.iter_custom(|iters| {
            parallel(2, iters, |t| {
                let vmid = alloc.update(t, &vmid).map_or(0, |u| u.vmid.get());
                alloc.clear_active(t).unwrap();
                black_box(vmid);
            })
        })
    });
    g.finish();
    assert_eq!(
        alloc.stats().slow_paths,
        2,
        "the two-CPU benchmark left the fast path"
    );
}

fn rollover(c: &mut Criterion) {
    // Every CPU has a VM loaded, as on a busy host; each rollover exchanges every slot
    // and reseeds the map.
    let setup = |bits: VmidBits, ncpus: usize, nvms: usize| {
        let alloc = allocator(bits, ncpus);
        let vms: Vec<KvmVmid> = (0..nvms).map(|_| KvmVmid::new()).collect();
        for (i, v) in vms.iter().enumerate() {
            alloc.update(i % ncpus, v).unwrap();
        }
        (alloc, vms)
    };
    let mut g = c.benchmark_group("rollover");
    for bits in [VmidBits::Eight, VmidBits::Sixteen] {
        for ncpus in [1usize, 8, 64, 250] {
            let (alloc, _vms) = setup(bits, ncpus, 100);
            g.bench_with_input(
                BenchmarkId::new(format!("bits{}", bits.bits()), format!("cpus{ncpus}")),
                &alloc,
                |b, alloc| b.iter(|| alloc.roll_over(Some(0))),
            );
        }
    }
    let (alloc, _vms) = setup(VmidBits::Sixteen, 1024, 1024);
    g.bench_with_input(
        BenchmarkId::new("bits16", "cpus1024"),
        &alloc,
        |b, alloc| b.iter(|| alloc.roll_over(Some(0))),
    );
    g.finish();

    let mut g = c.benchmark_group("rollover_vms");
    for nvms in [10usize, 1_000, 60_000] {
        let (alloc, _vms) = setup(VmidBits::Sixteen, 8, nvms);
        g.bench_with_input(
            BenchmarkId::new("bits16_cpus8", nvms),
            &alloc,
            |b, alloc| b.iter(|| alloc.roll_over(Some(0))),
        );
    }
    g.finish();
}

fn pin(c: &mut Criterion) {
    let mut g = c.benchmark_group("pin");
    let lock = parking_lot::Mutex::new(0u64);
    g.bench_function("floor_lock", |b| b.iter(|| *black_box(&lock).lock() += 1));
    let kvm = Kvm::new(KvmConfig::new(4)).unwrap();
    let vm = kvm.create_vm(VmConfig::default());
    let mut vcpu = vm.create_vcpu();
    vcpu.load(0).unwrap();
    vcpu.put().unwrap();
    g.bench_function("pin_unpin", |b| {
        b.iter(|| {
            let p = vm.pin_vmid().unwrap();
            p.unpin(|_| Ok::<(), ()>(())).unwrap();
        })
    });
    g.finish();
}

fn main() {
    let mut c = twinmmu_benchkit::criterion();
    fast_path(&mut c);
    rollover(&mut c);
    pin(&mut c);
    c.final_summary();
    let mut r = Report::new("kvm VMID allocator")
        .ratio(
            "fast-path load+put / floor",
            "fastpath/load_put",
            "fastpath/floor",
            Some(1.5),
        )
        .ratio(
            "fast-path load+put / floor, 2 CPUs at once",
            "fastpath_2cpus/load_put",
            "fastpath_2cpus/floor",
            Some(1.5),
        )
        .ratio(
            "vCPU load+put / floor",
            "fastpath/vcpu_load_put",
            "fastpath/floor",
            None,
        )
        .ratio(
            "vCPU load+put programming a PE / floor",
            "fastpath/vcpu_load_put_pe",
            "fastpath/floor",
            None,
        );
    for bits in [8, 16] {
        for ncpus in [1, 8, 64, 250] {
            r = r.median(
                &format!("rollover, {bits}-bit VMIDs, {ncpus} CPUs"),
                &format!("rollover/bits{bits}/cpus{ncpus}"),
            );
        }
    }
    r = r.median(
        "rollover, 16-bit VMIDs, 1024 CPUs",
        "rollover/bits16/cpus1024",
    );
    for nvms in [10, 1000, 60000] {
        r = r.median(
            &format!("rollover, 16-bit, 8 CPUs, {nvms} VMs"),
            &format!("rollover_vms/bits16_cpus8/{nvms}"),
        );
    }
    r.ratio(
        "pin+unpin / uncontended lock",
        "pin/pin_unpin",
        "pin/floor_lock",
        None,
    )
    .print();
}
