//! A VM's stage 2: guest RAM mapped and unmapped through the vmsa builder in host memory;
//! after the maintenance KVM does, a vCPU's translation through its PE's TLB equals a
//! TLB-less walk (property test, with and without FEAT_TLBIRANGE); without it, the vCPU
//! is seen using a stale translation.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use twinmmu_hw::{PeConfig, SmmuConfig, TlbiOp};
use twinmmu_kvm::{Stage2Error, VcpuError, VmConfig, VmidBits};
use twinmmu_vmsa::{
    Access, AccessKind, BumpAllocator, FaultKind, Granule, PaSize, Stage, TableBuilder, TableFormat,
};

fn rd() -> Access {
    Access::new(AccessKind::Read, true)
}

fn host(range: bool) -> Host {
    Host::with_pe(
        2,
        VmidBits::Sixteen,
        SmmuConfig::default(),
        PeConfig::default().tlbi_range(range),
    )
}

#[test]
fn guest_ram_maps_and_unmaps_through_the_builder() {
    let h = host(true);
    let base = h.frames.live_bytes();
    let vm = h.kvm.create_vm(VmConfig::default());
    let cfg = vm.stage2_config().unwrap();
    // 40-bit IPA with 4K: start level 1, two concatenated tables (KVM's choice).
    assert_eq!(cfg.geometry().start_level(), 1);
    assert_eq!(cfg.geometry().concatenated(), 2);
    let p = vm.stage2_params().unwrap();
    assert_eq!((p.s2t0sz, p.s2sl0, p.s2ttb), (24, 1, cfg.ttb()));

    // 4 MiB + 8 KiB of RAM at an IPA 2 MiB-aligned: two 2 MiB chunks and an 8 KiB one.
    let ipa = 0x8000_0000;
    let size = 0x40_2000;
    vm.add_ram(ipa, size).unwrap();
    assert_eq!(h.frames.live_bytes() - base, 0x2000 + size);
    vm.stage2_map(ipa, size).unwrap();
    for off in [0, 0x1234, 0x20_0000, 0x3f_fff8, 0x40_1ff8] {
        let t = vm.stage2_walk(ipa + off).unwrap();
        assert_eq!(t.output, vm.ram_pa(ipa + off).unwrap());
    }
    assert_eq!(vm.stage2_walk(ipa).unwrap().level, 2, "a 2 MiB block");
    assert_eq!(vm.stage2_walk(ipa + 0x40_0000).unwrap().level, 3);

    // Unmapping one page inside a block splits it.
    vm.stage2_unmap(0, ipa + 0x10_0000, 0x1000).unwrap();
    assert!(matches!(
        vm.stage2_walk(ipa + 0x10_0000),
        Err(Stage2Error::Fault(f)) if f.kind == FaultKind::Translation && f.stage == Stage::Stage2
    ));
    assert_eq!(
        vm.stage2_walk(ipa + 0x10_1000).unwrap().output,
        vm.ram_pa(ipa + 0x10_1000).unwrap()
    );

    // Errors change nothing.
    assert_eq!(
        vm.stage2_map(ipa, 0x1000),
        Err(Stage2Error::AlreadyMapped { ipa })
    );
    assert_eq!(
        vm.stage2_map(ipa + 0x10_0000, 0x2000),
        Err(Stage2Error::AlreadyMapped {
            ipa: ipa + 0x10_1000
        })
    );
    assert_eq!(
        vm.stage2_map(ipa + size, 0x1000),
        Err(Stage2Error::NotRam { ipa: ipa + size })
    );
    assert!(matches!(
        vm.add_ram(ipa + 0x1000, 0x1000),
        Err(Stage2Error::Overlap { other, .. }) if other == ipa
    ));
    assert!(matches!(
        vm.add_ram(0x1234, 0x1000),
        Err(Stage2Error::Misaligned { what: "IPA", .. })
    ));
    assert!(matches!(
        vm.add_ram(1 << 40, 0x1000),
        Err(Stage2Error::OutOfRange { ipa_bits: 40, .. })
    ));
    assert!(matches!(
        vm.add_ram(0x1000, 1 << 41),
        Err(Stage2Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vm.stage2_unmap(9, ipa, 0x1000),
        Err(Stage2Error::Dvm(_))
    ));
    vm.stage2_map(ipa + 0x10_0000, 0x1000).unwrap();

    // Guest memory by IPA goes to the same host bytes.
    let g = vm.guest_memory().unwrap();
    g.write(ipa + 0x1ffffe, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    g.read(ipa + 0x1ffffe, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    assert_eq!(g.pa(ipa + 0x20_0001), vm.ram_pa(ipa + 0x20_0001));
    assert_eq!(g.pa(ipa + size), None);
    assert!(g.write(ipa + size - 2, &[0; 4]).is_err());

    vm.remove_ram(1, ipa).unwrap();
    assert!(vm.stage2_walk(ipa).is_err());
    assert_eq!(vm.ram_pa(ipa), None);
    assert_eq!(
        vm.remove_ram(1, ipa),
        Err(Stage2Error::NoSuchRegion { ipa })
    );
    drop(vm);
    assert_eq!(h.frames.live_bytes(), base, "tables and RAM freed");
}

#[test]
fn out_of_host_memory_is_an_error_that_changes_nothing() {
    let h = host(true);
    let vm = h.kvm.create_vm(VmConfig::default());
    vm.stage2_config().unwrap();
    let before = h.frames.live_bytes();
    assert_eq!(
        vm.add_ram(0x8000_0000, 0x8000_0000),
        Err(Stage2Error::OutOfMemory)
    );
    assert_eq!(h.frames.live_bytes(), before);
    assert_eq!(vm.ram_pa(0x8000_0000), None);
    // Without host memory there is no stage 2.
    let dvm = twinmmu_hw::Dvm::new(twinmmu_hw::DvmConfig::new(1), h.mem.clone());
    let kvm = twinmmu_kvm::Kvm::with_machine(
        twinmmu_kvm::KvmConfig::new(1),
        twinmmu_kvm::Machine::new(dvm),
    )
    .unwrap();
    let vm = kvm.create_vm(VmConfig::default());
    assert_eq!(vm.add_ram(0, 0x1000), Err(Stage2Error::NoMemory));
    assert_eq!(vm.stage2_config(), None);
    let mut v = vm.create_vcpu();
    v.load(0).unwrap();
    let ctx = kvm.pe(0).unwrap().context();
    assert!(ctx.stage2_enabled && ctx.stage2.is_none());
    assert!(matches!(
        v.translate(0, rd()),
        Err(VcpuError::Fault(f)) if f.fault.stage == Stage::Stage2
    ));
}

/// KVM's maintenance, as the DVM counts it, with and without FEAT_TLBIRANGE.
#[test]
fn unmap_maintenance_is_what_kvm_issues() {
    let ipa = 0x8000_0000u64;
    let ops = |h: &Host| h.dvm.stats().by_op;
    // A VM that never had a VMID: nothing can cache its translations, nothing is sent.
    let h = host(true);
    let vm = h.kvm.create_vm(VmConfig::default());
    vm.add_ram(ipa, 0x40_0000).unwrap();
    vm.stage2_map(ipa, 0x40_0000).unwrap();
    assert_eq!(vm.stage2_unmap(0, ipa, 0x5000).unwrap().tlbis, 0);
    assert!(ops(&h).is_empty());

    // With range: one deferred range flush of the requested range (5 pages: RIPAS2E1IS of
    // 4, IPAS2E1IS of 1), then VMALLE1IS.
    let mut v = vm.create_vcpu();
    v.load(0).unwrap();
    v.put().unwrap();
    let r = vm.stage2_unmap(1, ipa + 0x10_0000, 0x5000).unwrap();
    assert_eq!(r.tlbis, 3);
    assert_eq!(
        ops(&h),
        vec![
            (TlbiOp::Vmalle1is, 1),
            (TlbiOp::Ipas2e1is, 1),
            (TlbiOp::Ripas2e1is, 1)
        ]
    );

    // Without range: per valid leaf IPAS2E1IS + VMALLE1IS; the split block left pages, so
    // unmapping 3 of them is 3 leaves; freeing a whole table adds VMALLS12E1IS.
    let h = host(false);
    let vm = h.kvm.create_vm(VmConfig::default());
    vm.add_ram(ipa, 0x40_0000).unwrap();
    vm.stage2_map(ipa, 0x40_0000).unwrap();
    let mut v = vm.create_vcpu();
    v.load(0).unwrap();
    v.put().unwrap();
    let r = vm.stage2_unmap(1, ipa, 0x1000).unwrap();
    assert_eq!(r.tlbis, 2, "one 2 MiB block: IPAS2E1IS + VMALLE1IS");
    let r = vm.stage2_unmap(1, ipa + 0x1000, 0x3000).unwrap();
    assert_eq!(r.tlbis, 6, "three 4K leaves");
    // The rest of the first 2 MiB: 508 pages, and the level-3 table is freed.
    let r = vm
        .stage2_unmap(1, ipa + 0x4000, 0x20_0000 - 0x4000)
        .unwrap();
    assert_eq!(r.tlbis, 2 * 508 + 1);
    let by = ops(&h);
    assert!(by.contains(&(TlbiOp::Vmalls12e1is, 1)), "{by:?}");
    assert!(!by.iter().any(|(op, _)| op.is_range()));
}

#[test]
fn skipped_maintenance_is_seen_stale() {
    let h = host(true);
    let vm = h.kvm.create_vm(VmConfig::default());
    let ipa = 0x8000_0000u64;
    vm.add_ram(ipa, 0x20_0000).unwrap();
    vm.stage2_map(ipa, 0x20_0000).unwrap();
    let mut v = vm.create_vcpu();
    v.load(0).unwrap();
    let pa = vm.ram_pa(ipa + 0x5008).unwrap();
    assert_eq!(v.translate(ipa + 0x5008, rd()).unwrap().pa, pa);

    // The hazard: the tables no longer map the page, the vCPU's TLB still does.
    let changes = vm.stage2_unmap_unflushed(ipa + 0x5000, 0x1000).unwrap();
    assert!(vm.stage2_walk(ipa + 0x5008).is_err());
    let t = v.translate(ipa + 0x5008, rd()).unwrap();
    assert!(t.tlb_hit);
    assert_eq!(t.pa, pa, "stale: the unmapped page is still reachable");

    // A CPU the machine does not have issues nothing and changes nothing.
    assert!(matches!(
        vm.stage2_flush(2, &changes),
        Err(Stage2Error::Dvm(_))
    ));
    assert!(v.translate(ipa + 0x5008, rd()).unwrap().tlb_hit);

    // The maintenance KVM does closes it.
    let r = vm.stage2_flush(1, &changes).unwrap();
    assert!(r.pe_removed >= 1);
    assert!(matches!(
        v.translate(ipa + 0x5008, rd()),
        Err(VcpuError::Fault(f)) if f.fault.kind == FaultKind::Translation
    ));
    v.put().unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Map { page: u64, pages: u64 },
    Unmap { cpu: usize, page: u64, pages: u64 },
    Touch { vcpu: usize, page: u64 },
}

/// 8 MiB of RAM in 4K pages: mapped with 2 MiB blocks where alignment allows, split by
/// partial unmaps.
const PAGES: u64 = 2048;
const IPA: u64 = 0x8000_0000;
/// Guest page tables (never unmapped by the operations).
const PT_IPA: u64 = 0x4000_0000;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..PAGES, 1u64..600).prop_map(|(page, pages)| Op::Map {
            page,
            pages: pages.min(PAGES - page)
        }),
        (0usize..2, 0..PAGES, 1u64..600).prop_map(|(cpu, page, pages)| Op::Unmap {
            cpu,
            page,
            pages: pages.min(PAGES - page)
        }),
        (0usize..2, 0..PAGES).prop_map(|(vcpu, page)| Op::Touch { vcpu, page }),
    ]
}

fn cases() -> u32 {
    if std::env::var_os("TWINMMU_LONG").is_some_and(|v| v == "1") {
        512
    } else {
        24
    }
}

proptest! {
    #![proptest_config(Config { cases: cases(), ..Config::default() })]

    /// After every map and every unmap (with KVM's maintenance from a random CPU), each
    /// vCPU's translation through its PE's TLB equals a TLB-less walk of the tables, for
    /// the pages the operation touched and a sample of others.
    #[test]
    fn a_vcpu_translation_through_the_pe_tlb_equals_a_walk_after_kvms_maintenance(
        range in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..40),
        probes in proptest::collection::vec(0..PAGES, 8),
    ) {
        let h = host(range);
        let vm = h.kvm.create_vm(VmConfig::default());
        vm.add_ram(IPA, PAGES << 12).unwrap();
        vm.stage2_map(IPA, PAGES << 12).unwrap();
        let mut vcpus = [vm.create_vcpu(), vm.create_vcpu()];
        for (cpu, v) in vcpus.iter_mut().enumerate() {
            v.load(cpu).unwrap();
        }
        // vCPU 1 runs with its MMU on: an identity stage 1 over the RAM (tables in a RAM
        // region the operations leave alone), so its TLB holds combined entries, which
        // only the VMALLE1IS after IPAS2E1IS removes.
        vm.add_ram(PT_IPA, 0x20_0000).unwrap();
        vm.stage2_map(PT_IPA, 0x20_0000).unwrap();
        let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
        let mut s1 = TableBuilder::new(
            fmt,
            vm.guest_memory().unwrap(),
            BumpAllocator::new(PT_IPA, 0x20_0000),
        )
        .unwrap();
        s1.map(IPA, IPA, PAGES << 12, s1_attrs()).unwrap();
        let guest = Guest::stage1_of(s1.root(), 3);
        vcpus[1].set_guest_stage1(Some(guest));
        // Fill both TLBs.
        for v in &vcpus {
            for p in (0..PAGES).step_by(97) {
                let _ = v.translate(IPA + (p << 12), rd());
            }
        }
        for op in ops {
            let touched: Vec<u64> = match op {
                Op::Map { page, pages } => {
                    // Map only if nothing in the range is mapped (else AlreadyMapped,
                    // which must change nothing).
                    let r = vm.stage2_map(IPA + (page << 12), pages << 12);
                    if let Err(e) = &r {
                        prop_assert!(matches!(e, Stage2Error::AlreadyMapped { .. }), "{e}");
                    }
                    (page..page + pages).step_by(37).chain([page + pages - 1]).collect()
                }
                Op::Unmap { cpu, page, pages } => {
                    vm.stage2_unmap(cpu, IPA + (page << 12), pages << 12).unwrap();
                    (page..page + pages).step_by(37).chain([page + pages - 1]).collect()
                }
                Op::Touch { vcpu, page } => {
                    let _ = vcpus[vcpu].translate(IPA + (page << 12), rd());
                    vec![page]
                }
            };
            for &p in touched.iter().chain(&probes) {
                let ipa = IPA + (p << 12) + 0x18;
                let want = vm.stage2_walk(ipa).map(|t| t.output).ok();
                for v in &vcpus {
                    let got = v.translate(ipa, rd()).map(|t| t.pa).ok();
                    prop_assert_eq!(got, want, "IPA {:#x} range {}", ipa, range);
                }
            }
        }
        for v in &mut vcpus {
            v.put().unwrap();
        }
    }
}

#[test]
fn every_granule_maps_unmaps_and_flushes() {
    for (g, level) in [(Granule::Size16K, 2u8), (Granule::Size64K, 2)] {
        for range in [true, false] {
            let h = host(range);
            let vm = h.kvm.create_vm(VmConfig::default().granule(g));
            let cfg = vm.stage2_config().unwrap();
            // KVM's start level for a 40-bit IPA: the shallowest the size allows.
            assert_eq!(cfg.geometry().start_level(), level, "{g:?}");
            let gs = g.size();
            vm.add_ram(IPA, 64 * gs).unwrap();
            vm.stage2_map(IPA, 64 * gs).unwrap();
            let mut v = vm.create_vcpu();
            v.load(0).unwrap();
            let ipa = IPA + 5 * gs + 8;
            assert_eq!(v.translate(ipa, rd()).unwrap().pa, vm.ram_pa(ipa).unwrap());
            let r = vm.stage2_unmap(1, IPA + 4 * gs, 3 * gs).unwrap();
            assert!(r.pe_removed >= 1, "{g:?} range {range}: {r:?}");
            assert!(v.translate(ipa, rd()).is_err());
            assert_eq!(
                v.translate(IPA + 7 * gs, rd()).unwrap().pa,
                vm.ram_pa(IPA + 7 * gs).unwrap()
            );
            assert!(matches!(
                vm.stage2_map(IPA + 4 * gs + 0x1000, gs),
                Err(Stage2Error::Misaligned { .. })
            ));
            v.put().unwrap();
        }
    }
}
