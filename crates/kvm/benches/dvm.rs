//! Broadcast TLB maintenance: a `TLBI …IS; DSB ISH` reaching N PEs and one SMMU, against
//! its floor — the same invalidation applied locally to one TLB — when it removes nothing
//! and when it removes one entry per PE; and a VMID rollover with the DVM attached
//! (`TLBI ALLE1IS` to every PE and the SMMU) against the same rollover with no
//! interconnect.

#![allow(clippy::unwrap_used)] // benchmarks may unwrap, like tests

use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion};
use twinmmu_benchkit::Report;
use twinmmu_hw::tlb::{Ctx, EntryPerms, Kind, TlbEntry, World};
use twinmmu_hw::{Dvm, DvmConfig, Pe, Smmu, SmmuConfig, SparseMem, Tlbi, TlbiOp};
use twinmmu_kvm::sync::StdPrimitives;
use twinmmu_kvm::{Kvm, KvmConfig, KvmVmid, Machine, NullTlbi, VmidAllocator, VmidBits};

const PES: [usize; 5] = [1, 2, 4, 8, 16];
const ROLLOVER_CPUS: [usize; 3] = [1, 8, 64];

fn mem() -> Arc<SparseMem> {
    Arc::new(SparseMem::with_range(0x4000_0000, 0x100_0000).unwrap())
}

fn entry(vmid: u16, asid: u16, va: u64) -> TlbEntry {
    TlbEntry {
        ctx: Ctx::new(World::NsEl1, Kind::S1, vmid, Some(asid), false),
        in_base: va,
        shift: 12,
        out_base: 0x4000_0000,
        ipa_base: va,
        tg_shift: 12,
        perms: EntryPerms { s1: None, s2: None },
    }
}

/// A TLB as a busy PE has it: 1024 entries of 16 other VMIDs.
fn populate(pe: &Pe) {
    for i in 0..1024u64 {
        pe.tlb_insert(entry(100 + (i % 16) as u16, 1, i << 12));
    }
}

/// The broadcast every benchmark sends: the guest's `TLBI VAE1IS` for VMID 5, ASID 1.
fn tlbi() -> Tlbi {
    Tlbi::new(TlbiOp::Vae1is, 5).with_asid(1).with_addr(0x7000)
}

fn machine(pes: usize) -> Arc<Dvm> {
    let m = mem();
    let dvm = Dvm::new(DvmConfig::new(pes), m.clone());
    for pe in dvm.pes() {
        populate(pe);
    }
    // The SMMU honours broadcasts from reset (IDR0.BTM = 1, CR2.PTM = 0).
    let smmu = Smmu::new(SmmuConfig::default(), m).unwrap();
    dvm.attach_smmu(smmu);
    dvm
}

fn broadcast(c: &mut Criterion) {
    let mut g = c.benchmark_group("dvm_broadcast_empty");
    let floor = machine(1);
    let pe = &floor.pes()[0];
    let t = tlbi();
    g.bench_function("local", |b| b.iter(|| pe.tlbi_local(&t)));
    for n in PES {
        let dvm = machine(n);
        g.bench_with_input(BenchmarkId::new("pes", n), &dvm, |b, dvm| {
            b.iter(|| dvm.broadcast(Some(0), t).unwrap())
        });
    }
    g.finish();

    // The same, each time removing one entry from every PE's TLB (inserted outside the
    // measurement).
    let mut g = c.benchmark_group("dvm_broadcast_hit");
    g.bench_function("local", |b| {
        b.iter_batched(
            || pe.tlb_insert(entry(5, 1, 0x7000)),
            |()| pe.tlbi_local(&t),
            BatchSize::SmallInput,
        )
    });
    for n in PES {
        let dvm = machine(n);
        g.bench_with_input(BenchmarkId::new("pes", n), &dvm, |b, dvm| {
            b.iter_batched(
                || {
                    for pe in dvm.pes() {
                        pe.tlb_insert(entry(5, 1, 0x7000));
                    }
                },
                |()| {
                    let r = dvm.broadcast(Some(0), t).unwrap();
                    debug_assert_eq!(r.pe_removed, dvm.pes().len() as u64);
                    r
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn rollover(c: &mut Criterion) {
    let mut g = c.benchmark_group("rollover_dvm");
    for n in ROLLOVER_CPUS {
        // Without an interconnect: the allocator alone.
        let alloc =
            VmidAllocator::<StdPrimitives>::new(VmidBits::Sixteen, n, true, Arc::new(NullTlbi))
                .unwrap();
        let vms: Vec<KvmVmid> = (0..n).map(|_| KvmVmid::new()).collect();
        for (cpu, v) in vms.iter().enumerate() {
            alloc.update(cpu, v).unwrap();
        }
        g.bench_with_input(BenchmarkId::new("null", n), &alloc, |b, a| {
            b.iter(|| a.roll_over(Some(0)))
        });
        // With n PEs (1024 entries each) and an SMMU on the interconnect: every rollover
        // sends ALLE1IS and waits for all of them. After the first, the TLBs are empty:
        // this is the cost of reaching the recipients, not of what they remove.
        let dvm = machine(n);
        let kvm = Kvm::with_machine(KvmConfig::new(n), Machine::new(dvm)).unwrap();
        let vms: Vec<KvmVmid> = (0..n).map(|_| KvmVmid::new()).collect();
        for (cpu, v) in vms.iter().enumerate() {
            kvm.vmid_allocator().update(cpu, v).unwrap();
        }
        g.bench_with_input(BenchmarkId::new("dvm", n), &kvm, |b, k| {
            b.iter(|| k.vmid_allocator().roll_over(Some(0)))
        });
    }
    g.finish();
}

fn main() {
    let mut c = twinmmu_benchkit::criterion();
    broadcast(&mut c);
    rollover(&mut c);
    c.final_summary();
    let mut r = Report::new("kvm DVM broadcast").median(
        "floor: the TLBI applied locally to one TLB, nothing removed",
        "dvm_broadcast_empty/local",
    );
    for n in PES {
        r = r.ratio(
            &format!("TLBI+DSB to {n} PE(s) + 1 SMMU, nothing removed / floor"),
            &format!("dvm_broadcast_empty/pes/{n}"),
            "dvm_broadcast_empty/local",
            None,
        );
    }
    r = r.median(
        "floor: the TLBI applied locally to one TLB, removing 1 entry",
        "dvm_broadcast_hit/local",
    );
    for n in PES {
        r = r.ratio(
            &format!("TLBI+DSB to {n} PE(s) + 1 SMMU, removing 1 per PE / floor"),
            &format!("dvm_broadcast_hit/pes/{n}"),
            "dvm_broadcast_hit/local",
            None,
        );
    }
    for n in ROLLOVER_CPUS {
        r = r.ratio(
            &format!("rollover with the DVM, {n} CPU(s) / without"),
            &format!("rollover_dvm/dvm/{n}"),
            &format!("rollover_dvm/null/{n}"),
            None,
        );
    }
    r.print();
}
