//! Many threads load and put vCPUs of many VMs under constant rollover pressure (8-bit
//! VMIDs, more VMs than VMIDs), while another pins and unpins, and a monitor checks the
//! invariants as it goes. `TWINMMU_LONG=1` runs much longer.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinmmu_kvm::{Kvm, KvmConfig, VcpuError, Vm, VmConfig, VmidBits};

const NCPUS: usize = 4;
const NVMS: usize = 600;

fn iterations() -> u64 {
    if std::env::var_os("TWINMMU_LONG").is_some() {
        5_000_000
    } else {
        200_000
    }
}

/// `running[cpu]`: `(vm + 1) << 16 | hw vmid` while a vCPU is loaded there, else 0. Set
/// after the load returns, cleared before the put.
fn pack(vm: usize, hw: u16) -> u64 {
    ((vm as u64 + 1) << 16) | u64::from(hw)
}

#[test]
fn vcpus_loading_under_rollover_pressure_keep_the_invariants() {
    let kvm = Kvm::new(KvmConfig::new(NCPUS).vmid_bits(VmidBits::Eight)).unwrap();
    let vms: Arc<Vec<Arc<Vm>>> = Arc::new(
        (0..NVMS)
            .map(|_| kvm.create_vm(VmConfig::default()))
            .collect(),
    );
    let running: Arc<Vec<AtomicU64>> = Arc::new((0..NCPUS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let loads = Arc::new(AtomicU64::new(0));
    let mask = VmidBits::Eight.num_vmids() - 1;

    let workers: Vec<_> = (0..NCPUS as u64)
        .map(|t| {
            let (vms, running, loads) = (vms.clone(), running.clone(), loads.clone());
            let kvm_for_check = kvm.clone();
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0000 + t);
                // A small working set per thread hits the fast path too.
                let mut vcpus: Vec<_> = (0..NVMS).map(|_| None).collect();
                for _ in 0..iterations() {
                    let vm = if rng.random_bool(0.5) {
                        rng.random_range(0..8) + 8 * t as usize
                    } else {
                        rng.random_range(0..NVMS)
                    };
                    let vcpu = vcpus[vm].get_or_insert_with(|| vms[vm].create_vcpu());
                    let mut cpu = rng.random_range(0..NCPUS);
                    let u = loop {
                        match vcpu.load(cpu) {
                            Ok(u) => break u,
                            Err(VcpuError::CpuBusy { .. }) => cpu = (cpu + 1) % NCPUS,
                            Err(e) => panic!("{e}"),
                        }
                    };
                    loads.fetch_add(1, Ordering::Relaxed);
                    let hw = u.vmid.get();
                    assert_ne!(hw, 0);
                    assert_eq!(u64::from(hw), u.id & mask);
                    running[cpu].store(pack(vm, hw), Ordering::SeqCst);
                    if rng.random_bool(0.25) {
                        // While X is loaded on `cpu`, either its id is active there, or a
                        // rollover wiped the slot (0) and reserved X's id on that CPU: a
                        // vCPU never runs with a number nothing protects.
                        kvm_for_check.vmid_allocator().inspect(|snap| {
                            // Ids change only under the lock: read it inside.
                            let id = vms[vm].kvm_vmid().id();
                            let (active, reserved) = (snap.active[cpu], snap.reserved[cpu]);
                            assert!(
                                active == id || (active == 0 && reserved == id),
                                "VM {vm} on CPU {cpu} with id {id:#x}: active {active:#x}, \
                                 reserved {reserved:#x}"
                            );
                        });
                    }
                    running[cpu].store(0, Ordering::SeqCst);
                    // I6 / I4: while loaded, the VM's number never changed (a rollover in
                    // between reserved it, and a refresh keeps the index).
                    assert_eq!(vms[vm].kvm_vmid().id() & mask, u64::from(hw), "VM {vm}");
                    vcpu.put().unwrap();
                }
            })
        })
        .collect();

    let pinner = {
        let (vms, stop) = (vms.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(0x9199);
            let mut held = Vec::new();
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let vm = rng.random_range(0..NVMS);
                if let Ok(pin) = vms[vm].pin_vmid() {
                    held.push((vm, pin));
                }
                // I5: every pinned VM keeps its number, whatever rolled over since.
                for (vm, pin) in &held {
                    assert_eq!(
                        vms[*vm].kvm_vmid().id() & mask,
                        u64::from(pin.vmid().get()),
                        "pinned VM {vm} renumbered"
                    );
                }
                if (held.len() > 40 || rng.random_bool(0.3))
                    && let Some((_, pin)) = held.pop()
                {
                    pin.unpin(|_| Ok::<(), ()>(())).unwrap();
                }
                rounds += 1;
                std::thread::yield_now();
            }
            for (_, pin) in held {
                pin.unpin(|_| Ok::<(), ()>(())).unwrap();
            }
            rounds
        })
    };

    // The monitor: with the allocator lock held no rollover can happen, so any two VMs seen
    // running at once must have different VMIDs (see `inspect`).
    let mut checks = 0u64;
    while workers.iter().any(|w| !w.is_finished()) {
        kvm.vmid_allocator().inspect(|_snap| {
            let mut seen: Vec<(u64, u16)> = Vec::new();
            for slot in running.iter() {
                let v = slot.load(Ordering::SeqCst);
                if v == 0 {
                    continue;
                }
                let (vm, hw) = (v >> 16, (v & 0xffff) as u16);
                for &(other_vm, other_hw) in &seen {
                    assert!(
                        other_vm == vm || other_hw != hw,
                        "VMs {} and {} run with VMID {hw} at once",
                        other_vm - 1,
                        vm - 1
                    );
                }
                seen.push((vm, hw));
            }
        });
        kvm.vmid_allocator()
            .audit(vms.iter().map(|v| v.kvm_vmid()))
            .unwrap_or_else(|e| panic!("{e}"));
        checks += 1;
        std::thread::yield_now();
    }
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let pin_rounds = pinner.join().unwrap();

    kvm.vmid_allocator()
        .audit(vms.iter().map(|v| v.kvm_vmid()))
        .unwrap_or_else(|e| panic!("{e}"));
    let s = kvm.stats();
    let total = loads.load(Ordering::Relaxed);
    assert_eq!(total, NCPUS as u64 * iterations());
    assert_eq!(s.fast_paths + s.slow_paths, total);
    assert!(s.rollovers > 10, "too little rollover pressure: {s:?}");
    assert_eq!(s.rollovers, s.broadcasts);
    assert!(s.fast_paths > 0, "{s:?}");
    assert_eq!(s.nr_pinned, 0);
    assert_eq!(s.leaked_pins, 0);
    assert!(checks > 0 && pin_rounds > 0);
    eprintln!("stress: {s:?}, {checks} monitor checks, {pin_rounds} pin rounds");
}
