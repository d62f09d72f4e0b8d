//! Deterministic checks of the allocator and the pin API (smmu_kvm.md §1–§3).

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::sync::{Arc, Mutex};

use twinmmu_kvm::{
    BroadcastTlbi, Kvm, KvmConfig, KvmVmid, NullTlbi, PinError, TlbiBroadcaster, Vcpu, VcpuError,
    Vm, VmConfig, VmidAllocator, VmidBits, VmidError, VmidInitError, VmidPath, VmidWidthMismatch,
    check_btm_vmid_width,
};

#[derive(Default)]
struct TlbiLog(Mutex<Vec<(Option<usize>, BroadcastTlbi)>>);

impl TlbiBroadcaster for TlbiLog {
    fn broadcast(&self, issuer: Option<usize>, op: BroadcastTlbi) {
        self.0.lock().unwrap().push((issuer, op));
    }
}

fn kvm8(ncpus: usize) -> (Arc<Kvm>, Arc<TlbiLog>) {
    let log = Arc::new(TlbiLog::default());
    let kvm = Kvm::with_tlbi(
        KvmConfig::new(ncpus).vmid_bits(VmidBits::Eight),
        log.clone(),
    )
    .unwrap();
    (kvm, log)
}

fn vm(kvm: &Arc<Kvm>) -> Arc<Vm> {
    kvm.create_vm(VmConfig::default())
}

/// Loads and puts a fresh VM on `cpu`; returns its VMID.
fn churn_one(kvm: &Arc<Kvm>, cpu: usize) -> u16 {
    let v = vm(kvm);
    let mut c = v.create_vcpu();
    let u = c.load(cpu).unwrap();
    c.put().unwrap();
    u.vmid.get()
}

/// Loads fresh VMs on `cpu` until the generation rolls over; returns how many loads that
/// took.
fn roll_over(kvm: &Arc<Kvm>, cpu: usize) -> usize {
    let before = kvm.stats().rollovers;
    let mut n = 0;
    while kvm.stats().rollovers == before {
        churn_one(kvm, cpu);
        n += 1;
        assert!(n <= 70_000, "no rollover");
    }
    n
}

#[test]
fn first_load_allocates_index_one_then_takes_the_fast_path() {
    let (kvm, _) = kvm8(2);
    let v = vm(&kvm);
    let mut c = v.create_vcpu();
    let u = c.load(0).unwrap();
    assert_eq!(u.vmid.get(), 1, "searches start at index 1, never 0");
    assert_eq!(u.path, VmidPath::Slow);
    // Generation 1 is FIRST_VERSION = 1 << 8.
    assert_eq!(u.id, (1 << 8) | 1);
    c.put().unwrap();
    assert_eq!(
        kvm.vmid_allocator().snapshot().active[0],
        1 << 8,
        "put writes VMID_ACTIVE_INVALID = FIRST_VERSION"
    );
    let u2 = c.load(0).unwrap();
    assert_eq!(u2.path, VmidPath::Fast);
    assert_eq!(u2.vmid, u.vmid);
    let s = kvm.stats();
    assert_eq!((s.slow_paths, s.fast_paths), (1, 1));
}

#[test]
fn first_load_on_a_cpu_that_never_ran_takes_the_slow_path() {
    // Per-CPU active slots start at 0, like the kernel's per-CPU variables.
    let (kvm, _) = kvm8(2);
    let v = vm(&kvm);
    let mut a = v.create_vcpu();
    a.load(0).unwrap();
    let mut b = v.create_vcpu();
    let u = b.load(1).unwrap();
    assert_eq!(u.path, VmidPath::Slow);
    assert!(!u.rolled_over);
}

#[test]
fn allocation_searches_from_the_last_allocated_index() {
    let (kvm, _) = kvm8(1);
    let got: Vec<u16> = (0..5).map(|_| churn_one(&kvm, 0)).collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    assert_eq!(kvm.vmid_allocator().snapshot().cur_idx, 5);
}

#[test]
fn rollover_broadcasts_alle1is_once_and_never_hands_out_zero() {
    let (kvm, log) = kvm8(2);
    let mut seen = Vec::new();
    // 255 usable indices (1..=255) in generation 1.
    for _ in 0..255 {
        seen.push(churn_one(&kvm, 1));
    }
    assert_eq!(kvm.stats().rollovers, 0);
    assert!(log.0.lock().unwrap().is_empty());
    let v = vm(&kvm);
    let mut c = v.create_vcpu();
    let u = c.load(1).unwrap();
    assert!(u.rolled_over);
    seen.push(u.vmid.get());
    assert!(!seen.contains(&0));
    let s = kvm.stats();
    assert_eq!((s.rollovers, s.broadcasts, s.generation), (1, 1, 2));
    assert_eq!(
        *log.0.lock().unwrap(),
        vec![(Some(1), BroadcastTlbi::Alle1is)],
        "issued by the CPU that rolled over"
    );
    // Generation 2 starts at 2 << 8.
    assert_eq!(u.id >> 8, 2);
}

#[test]
fn a_vm_loaded_at_rollover_keeps_its_number_on_every_cpu() {
    let (kvm, _) = kvm8(3);
    let a = vm(&kvm);
    let mut a0 = a.create_vcpu();
    let mut a2 = a.create_vcpu();
    let ua = a0.load(0).unwrap();
    a2.load(2).unwrap();
    roll_over(&kvm, 1);
    let snap = kvm.vmid_allocator().snapshot();
    assert_eq!(
        snap.active[0], 0,
        "rollover exchanges every active slot to 0"
    );
    assert_eq!(snap.reserved[0], ua.id);
    assert_eq!(snap.reserved[2], ua.id);
    // Re-entering after the rollover: the reserved check gives A its number in the new
    // generation and rewrites *every* reserved copy.
    a0.put().unwrap();
    let again = a0.load(0).unwrap();
    assert_eq!(again.vmid, ua.vmid);
    assert_eq!(again.id >> 8, 2);
    let snap = kvm.vmid_allocator().snapshot();
    assert_eq!(snap.reserved[0], again.id);
    assert_eq!(
        snap.reserved[2], again.id,
        "stale reserved copy left behind"
    );
    // A second rollover: CPU 2 loaded nothing since (active 0), so it keeps its reservation.
    a0.put().unwrap();
    roll_over(&kvm, 1);
    let snap = kvm.vmid_allocator().snapshot();
    assert_eq!(snap.reserved[2], again.id);
    assert!(snap.is_allocated(u64::from(ua.vmid.get())));
    assert_eq!(a2.vmid(), Some(ua.vmid));
    kvm.vmid_allocator().audit([a.kvm_vmid()]).unwrap();
}

#[test]
fn a_vm_idle_at_rollover_keeps_its_number_if_still_free() {
    let (kvm, _) = kvm8(2);
    // The load that rolls over takes index 1 in the new generation; give A index 4.
    for _ in 0..3 {
        churn_one(&kvm, 1);
    }
    let a = vm(&kvm);
    let mut c = a.create_vcpu();
    let first = c.load(0).unwrap().vmid;
    assert_eq!(first.get(), 4);
    c.put().unwrap();
    roll_over(&kvm, 1);
    let u = c.load(0).unwrap();
    assert_eq!(u.path, VmidPath::Slow);
    assert_eq!(u.vmid, first, "the old bit was free in the new generation");
}

#[test]
fn a_vm_idle_at_rollover_whose_number_was_taken_gets_a_new_one() {
    let (kvm, _) = kvm8(1);
    let a = vm(&kvm);
    let mut c = a.create_vcpu();
    let first = c.load(0).unwrap().vmid;
    c.put().unwrap();
    // Fill generation 1 and roll over; generation 2 hands out 1, 2, ... again.
    roll_over(&kvm, 0);
    let mut taken = false;
    for _ in 0..300 {
        if churn_one(&kvm, 0) == first.get() {
            taken = true;
            break;
        }
    }
    assert!(taken);
    let before = kvm.stats().generation;
    let u = c.load(0).unwrap();
    if kvm.stats().generation == before {
        assert_ne!(u.vmid, first);
    }
    kvm.vmid_allocator().audit([a.kvm_vmid()]).unwrap();
}

#[test]
fn pinned_vmids_survive_three_rollovers_and_refresh_to_the_fast_path() {
    let (kvm, _) = kvm8(2);
    let a = vm(&kvm);
    let mut c = a.create_vcpu();
    let v = c.load(0).unwrap().vmid;
    c.put().unwrap();
    let pin = a.pin_vmid().unwrap();
    assert_eq!(pin.vmid(), v);
    for round in 1..=3 {
        roll_over(&kvm, 1);
        assert!(
            kvm.vmid_allocator()
                .snapshot()
                .is_allocated(u64::from(v.get()))
        );
        assert_eq!(a.last_vmid(), Some(v), "round {round}");
        // No other VM can get the pinned number in this generation.
        for _ in 0..250 {
            assert_ne!(churn_one(&kvm, 1), v.get());
        }
    }
    assert!(kvm.stats().rollovers >= 3);
    // The RFC v3 quirk, fixed: the first load after a rollover refreshes the id (slow path),
    // and the next load takes the fast path instead of the lock every time.
    let u = c.load(0).unwrap();
    assert_eq!((u.vmid, u.path), (v, VmidPath::Slow));
    assert!(kvm.vmid_allocator().gen_match(a.kvm_vmid().id()));
    c.put().unwrap();
    assert_eq!(c.load(0).unwrap().path, VmidPath::Fast);
    c.put().unwrap();
    pin.unpin(|_| Ok::<(), ()>(())).unwrap();
}

#[test]
fn pinning_fails_at_exactly_max_pinned() {
    for ncpus in [1, 4, 64] {
        let (kvm, _) = kvm8(ncpus);
        let max = 256 - ncpus as u64 - 2;
        assert_eq!(kvm.stats().max_pinned, max);
        let mut pins = Vec::new();
        let vms: Vec<_> = (0..max + 1).map(|_| vm(&kvm)).collect();
        for v in &vms[..max as usize] {
            let p = v.pin_vmid().unwrap();
            assert_ne!(p.vmid().get(), 0);
            pins.push(p);
        }
        assert_eq!(kvm.stats().nr_pinned, max);
        assert_eq!(
            vms[max as usize].pin_vmid().unwrap_err(),
            PinError::Exhausted { max_pinned: max }
        );
        // Another reference on an already pinned VMID is not a new pin.
        let extra = vms[0].pin_vmid().unwrap();
        assert_eq!(extra.vmid(), pins[0].vmid());
        assert_eq!(vms[0].vmid_pin_count(), 2);
        // Even with everything pinned, the CPUs can still run (a rollover leaves a free
        // index: the init check and max_pinned together guarantee it).
        for cpu in 0..ncpus {
            churn_one(&kvm, cpu);
        }
        roll_over(&kvm, 0);
        extra.unpin(|_| Ok::<(), ()>(())).unwrap();
        for p in pins {
            p.unpin(|_| Ok::<(), ()>(())).unwrap();
        }
        assert_eq!(kvm.stats().nr_pinned, 0);
        assert!(vms[max as usize].pin_vmid().is_ok());
    }
}

#[test]
fn pinning_disabled_is_an_error_never_vmid_zero() {
    let kvm = Kvm::new(KvmConfig::new(2).pinning(false)).unwrap();
    let v = vm(&kvm);
    assert_eq!(v.pin_vmid().unwrap_err(), PinError::Disabled);
    assert_eq!(kvm.stats().max_pinned, 0);
    assert_eq!(v.vmid_pin_count(), 0);
    assert_eq!(v.last_vmid(), None, "a refused pin allocates nothing");
}

#[test]
fn pinning_a_vm_that_never_ran_allocates_and_may_roll_over() {
    let (kvm, log) = kvm8(2);
    let a = vm(&kvm);
    assert_eq!(a.last_vmid(), None);
    let p = a.pin_vmid().unwrap();
    assert_eq!(p.vmid().get(), 1);
    assert!(!p.rolled_over());
    for _ in 0..254 {
        churn_one(&kvm, 0);
    }
    // The map is full: pinning a new VM rolls over, issued from no vCPU context.
    let b = vm(&kvm);
    let pb = b.pin_vmid().unwrap();
    assert!(pb.rolled_over());
    assert_eq!(
        log.0.lock().unwrap().last(),
        Some(&(None, BroadcastTlbi::Alle1is))
    );
    assert_ne!(pb.vmid(), p.vmid());
    assert_eq!(a.last_vmid(), Some(p.vmid()));
    kvm.vmid_allocator()
        .audit([a.kvm_vmid(), b.kvm_vmid()])
        .unwrap();
    p.unpin(|_| Ok::<(), ()>(())).unwrap();
    pb.unpin(|_| Ok::<(), ()>(())).unwrap();
}

#[test]
fn pinning_a_stale_vm_keeps_its_number_when_free() {
    let (kvm, _) = kvm8(2);
    for _ in 0..3 {
        churn_one(&kvm, 1);
    }
    let a = vm(&kvm);
    let mut c = a.create_vcpu();
    let v = c.load(0).unwrap().vmid;
    c.put().unwrap();
    roll_over(&kvm, 1);
    assert!(!kvm.vmid_allocator().gen_match(a.kvm_vmid().id()));
    let p = a.pin_vmid().unwrap();
    assert_eq!(p.vmid(), v);
    assert!(kvm.vmid_allocator().gen_match(a.kvm_vmid().id()));
    p.unpin(|_| Ok::<(), ()>(())).unwrap();
}

#[test]
fn after_unpin_and_a_rollover_the_index_is_reusable() {
    let (kvm, _) = kvm8(1);
    let a = vm(&kvm);
    let p = a.pin_vmid().unwrap();
    let v = p.vmid().get();
    roll_over(&kvm, 0);
    // Still pinned: nobody gets it in this generation.
    for _ in 0..250 {
        assert_ne!(churn_one(&kvm, 0), v);
    }
    let mut retired = None;
    p.unpin(|vmid| {
        retired = Some(vmid.get());
        Ok::<(), ()>(())
    })
    .unwrap();
    assert_eq!(
        retired,
        Some(v),
        "the retire step is told which VMID to invalidate"
    );
    assert!(!kvm.vmid_allocator().snapshot().is_pinned(u64::from(v)));
    // Unpinned but still allocated until the next rollover; after it, someone gets it.
    roll_over(&kvm, 0);
    let reused = (0..255).any(|_| churn_one(&kvm, 0) == v);
    assert!(reused, "index {v} never reused after unpin + rollover");
}

#[test]
fn a_failed_retire_keeps_the_pin() {
    let (kvm, _) = kvm8(1);
    let a = vm(&kvm);
    let p = a.pin_vmid().unwrap();
    let v = p.vmid();
    let err = p.unpin(|_| Err("CMD_SYNC timed out")).unwrap_err();
    assert_eq!(err.error, "CMD_SYNC timed out");
    assert_eq!(a.vmid_pin_count(), 1);
    assert_eq!(kvm.stats().nr_pinned, 1);
    roll_over(&kvm, 0);
    assert_eq!(a.last_vmid(), Some(v));
    let pin = err.pin;
    assert_eq!(pin.vmid(), v);
    pin.unpin(|_| Ok::<(), ()>(())).unwrap();
    assert_eq!(a.vmid_pin_count(), 0);
    assert_eq!(kvm.stats().leaked_pins, 0);
}

#[test]
fn a_dropped_pin_is_leaked_visibly_and_its_vmid_never_reused() {
    let (kvm, _) = kvm8(1);
    let a = vm(&kvm);
    let p = a.pin_vmid().unwrap();
    let v = p.vmid().get();
    let weak = Arc::downgrade(&a);
    drop(a);
    assert!(weak.upgrade().is_some(), "the pin keeps its VM alive");
    drop(p);
    assert!(weak.upgrade().is_none());
    let s = kvm.stats();
    assert_eq!((s.leaked_pins, s.nr_pinned), (1, 1));
    for _ in 0..3 {
        roll_over(&kvm, 0);
        for _ in 0..250 {
            assert_ne!(churn_one(&kvm, 0), v, "leaked pinned VMID handed out");
        }
    }
}

#[test]
fn pin_references_share_one_vmid_and_release_at_zero() {
    let (kvm, _) = kvm8(1);
    let a = vm(&kvm);
    let p1 = a.pin_vmid().unwrap();
    let p2 = a.pin_vmid().unwrap();
    assert_eq!(p1.vmid(), p2.vmid());
    assert_eq!(kvm.stats().nr_pinned, 1);
    p1.unpin(|_| Ok::<(), ()>(())).unwrap();
    assert_eq!(kvm.stats().nr_pinned, 1);
    assert!(
        kvm.vmid_allocator()
            .snapshot()
            .is_pinned(u64::from(p2.vmid().get()))
    );
    p2.unpin(|_| Ok::<(), ()>(())).unwrap();
    let s = kvm.stats();
    assert_eq!((s.nr_pinned, s.pins, s.unpins), (0, 2, 2));
}

#[test]
fn init_refuses_too_many_cpus_for_the_vmid_space() {
    let null = || Arc::new(NullTlbi) as Arc<dyn TlbiBroadcaster>;
    // NUM_VMIDS - 1 <= ncpus is refused: 255 <= 255.
    assert!(
        VmidAllocator::<twinmmu_kvm::sync::StdPrimitives>::new(VmidBits::Eight, 254, true, null())
            .is_ok()
    );
    assert_eq!(
        Kvm::new(KvmConfig::new(255).vmid_bits(VmidBits::Eight)).unwrap_err(),
        VmidInitError::TooManyCpus {
            bits: VmidBits::Eight,
            ncpus: 255
        }
    );
    assert_eq!(
        Kvm::new(KvmConfig::new(65_535)).unwrap_err(),
        VmidInitError::TooManyCpus {
            bits: VmidBits::Sixteen,
            ncpus: 65_535
        }
    );
    assert_eq!(
        Kvm::new(KvmConfig::new(0)).unwrap_err(),
        VmidInitError::NoCpus
    );
    // 254 CPUs with 8 bits: nothing left to pin, but the CPUs can run through rollovers.
    let kvm = Kvm::new(KvmConfig::new(254).vmid_bits(VmidBits::Eight)).unwrap();
    assert_eq!(kvm.stats().max_pinned, 0);
    assert!(matches!(
        vm(&kvm).pin_vmid(),
        Err(PinError::Exhausted { max_pinned: 0 })
    ));
    let vms: Vec<_> = (0..254).map(|_| vm(&kvm)).collect();
    let mut vcpus: Vec<Vcpu> = vms.iter().map(|v| v.create_vcpu()).collect();
    for (cpu, c) in vcpus.iter_mut().enumerate() {
        c.load(cpu).unwrap();
    }
    vcpus[0].put().unwrap();
    roll_over(&kvm, 0);
    roll_over(&kvm, 0);
    for c in &vcpus[1..] {
        assert_eq!(c.vm().last_vmid(), c.vmid(), "a loaded VM was renumbered");
    }
    kvm.vmid_allocator()
        .audit(vms.iter().map(|v| v.kvm_vmid()))
        .unwrap();
}

#[test]
fn vmid_widths_decode_from_the_id_registers() {
    // ID_AA64MMFR1_EL1.VMIDBits is [7:4]: 0b0010 = 16 bits, anything else 8.
    assert_eq!(VmidBits::from_id_aa64mmfr1(0b0010 << 4), VmidBits::Sixteen);
    assert_eq!(VmidBits::from_id_aa64mmfr1(0), VmidBits::Eight);
    assert_eq!(VmidBits::from_id_aa64mmfr1(0b0001 << 4), VmidBits::Eight);
    assert_eq!(VmidBits::from_id_aa64mmfr1(0b0010), VmidBits::Eight);
    assert_eq!(
        VmidBits::from_id_aa64mmfr1(!(0xf_u64 << 4) | (0b0010 << 4)),
        VmidBits::Sixteen
    );
    // SMMU_IDR0.VMID16 is bit 18 (IHI0070 6.3.1).
    assert_eq!(VmidBits::from_smmu_idr0(1 << 18), VmidBits::Sixteen);
    assert_eq!(VmidBits::from_smmu_idr0(!(1 << 18)), VmidBits::Eight);
    assert_eq!(VmidBits::from_bits(12), None);
}

#[test]
fn kvm_and_smmu_must_agree_on_vmid_width_to_share_vmids() {
    assert!(check_btm_vmid_width(VmidBits::Sixteen, VmidBits::Sixteen).is_ok());
    assert!(check_btm_vmid_width(VmidBits::Eight, VmidBits::Eight).is_ok());
    assert_eq!(
        check_btm_vmid_width(VmidBits::Sixteen, VmidBits::Eight),
        Err(VmidWidthMismatch {
            kvm: VmidBits::Sixteen,
            smmu: VmidBits::Eight
        })
    );
    let kvm = Kvm::new(KvmConfig::new(2).vmid_bits(VmidBits::Eight)).unwrap();
    let err = kvm.check_btm_vmid_width(VmidBits::Sixteen).unwrap_err();
    assert_eq!(err.kvm, VmidBits::Eight);
    assert!(err.to_string().contains("8-bit"));
    assert!(
        kvm.check_btm_vmid_width(VmidBits::from_smmu_idr0(0))
            .is_ok()
    );
}

#[test]
fn vcpu_misuse_is_a_typed_error() {
    let (kvm, _) = kvm8(2);
    let a = vm(&kvm);
    let mut c0 = a.create_vcpu();
    let mut c1 = a.create_vcpu();
    c0.load(0).unwrap();
    assert_eq!(
        c0.load(1).unwrap_err(),
        VcpuError::AlreadyLoaded {
            vm: a.id(),
            vcpu: 0,
            cpu: 0
        }
    );
    assert_eq!(c1.load(0).unwrap_err(), VcpuError::CpuBusy { cpu: 0 });
    assert_eq!(
        c1.load(7).unwrap_err(),
        VcpuError::CpuOutOfRange { cpu: 7, ncpus: 2 }
    );
    assert_eq!(
        c1.put().unwrap_err(),
        VcpuError::NotLoaded {
            vm: a.id(),
            vcpu: 1
        }
    );
    assert_eq!(kvm.loaded_on(0), Some(kvm.loaded_on(0).unwrap()));
    // Dropping a loaded vCPU puts it and frees the CPU.
    drop(c0);
    assert_eq!(kvm.loaded_on(0), None);
    assert_eq!(kvm.vmid_allocator().snapshot().active[0], 1 << 8);
    c1.load(0).unwrap();
    // The raw allocator refuses a CPU that does not exist.
    let raw = KvmVmid::new();
    assert_eq!(
        kvm.vmid_allocator().update(9, &raw).unwrap_err(),
        VmidError::CpuOutOfRange { cpu: 9, ncpus: 2 }
    );
    assert!(kvm.vmid_allocator().clear_active(9).is_err());
}

#[test]
fn a_forced_rollover_does_what_a_full_map_does() {
    let (kvm, log) = kvm8(2);
    let alloc = kvm.vmid_allocator();
    let a = vm(&kvm);
    let b = vm(&kvm);
    let p = b.pin_vmid().unwrap();
    let mut ca = a.create_vcpu();
    let ua = ca.load(0).unwrap();
    for _ in 0..10 {
        churn_one(&kvm, 1);
    }
    alloc.roll_over(Some(1));
    let s = kvm.stats();
    assert_eq!((s.rollovers, s.broadcasts, s.generation), (1, 1, 2));
    assert_eq!(
        *log.0.lock().unwrap(),
        vec![(Some(1), BroadcastTlbi::Alle1is)]
    );
    let snap = alloc.snapshot();
    assert_eq!(snap.reserved[0], ua.id);
    assert_eq!(snap.active, vec![0, 0]);
    // Pinned 1 and reserved 2 stay; the next VM gets 3, searching from index 1 again.
    assert_eq!((p.vmid().get(), ua.vmid.get()), (1, 2));
    assert_eq!(churn_one(&kvm, 1), 3);
    assert_eq!(
        snap.allocated_count(),
        3,
        "pinned, reserved, and bit 0 from INVALID"
    );
    alloc.audit([a.kvm_vmid(), b.kvm_vmid()]).unwrap();
    p.unpin(|_| Ok::<(), ()>(())).unwrap();
}
