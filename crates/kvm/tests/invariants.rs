//! Invariants I1–I6 of smmu_kvm.md §1.6 as property tests over random traces of vCPU loads
//! and puts, pins and unpins (and leaked pins), with 8- and 16-bit VMIDs.
//!
//! I1, I2, I3 and the pinned-map half of I5 are checked on the allocator's state after every
//! operation (`VmidAllocator::audit`). I4, I6 and I5 ("forever") are about history, so the
//! test records what each load and pin returned and checks later states against it.
//! `TWINMMU_LONG=1` runs many more cases.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngSeed};
use twinmmu_kvm::{Kvm, KvmConfig, PinError, Vcpu, Vm, VmConfig, VmidBits, VmidPin, VmidStats};

#[derive(Debug, Clone)]
enum Op {
    Load {
        cpu: usize,
        vm: usize,
    },
    Put {
        cpu: usize,
    },
    Pin {
        vm: usize,
    },
    Unpin {
        vm: usize,
        retire_fails: bool,
    },
    /// Drop a pin handle without unpinning: the VMID must stay pinned for good.
    Leak {
        vm: usize,
    },
    /// Pin VMs `first..first + n` (drives pinning to exhaustion).
    PinRange {
        first: usize,
        n: usize,
    },
    /// `n` short-lived VMs each load and put once on `cpu` (drives 16-bit rollovers).
    Churn {
        cpu: usize,
        n: u32,
    },
}

fn op(ncpus: usize, nvms: usize, churn_max: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..ncpus, 0..nvms).prop_map(|(cpu, vm)| Op::Load { cpu, vm }),
        3 => (0..ncpus).prop_map(|cpu| Op::Put { cpu }),
        2 => (0..nvms).prop_map(|vm| Op::Pin { vm }),
        2 => (0..nvms, proptest::bool::weighted(0.2))
            .prop_map(|(vm, retire_fails)| Op::Unpin { vm, retire_fails }),
        1 => (0..nvms).prop_map(|vm| Op::Leak { vm }),
        1 => (0..nvms, 1..=nvms).prop_map(|(first, n)| Op::PinRange { first, n }),
        1 => (0..ncpus, 1..=churn_max).prop_map(|(cpu, n)| Op::Churn { cpu, n }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    bits: VmidBits,
    ncpus: usize,
    pinning: bool,
    nvms: usize,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(VmidBits::Eight), Just(VmidBits::Sixteen)],
        1usize..=6,
        proptest::bool::weighted(0.85),
    )
        .prop_flat_map(|(bits, ncpus, pinning)| {
            let (nvms, churn_max) = match bits {
                // More VMs than 8-bit VMIDs: loads alone roll over.
                VmidBits::Eight => (1usize..=400, 300u32),
                // 16-bit rollovers come from churn.
                VmidBits::Sixteen => (1usize..=64, 70_000u32),
            };
            (
                Just(bits),
                Just(ncpus),
                Just(pinning),
                nvms,
                Just(churn_max),
            )
        })
        .prop_flat_map(|(bits, ncpus, pinning, nvms, churn_max)| {
            let len = if bits == VmidBits::Eight {
                50..400
            } else {
                20..60
            };
            proptest::collection::vec(op(ncpus, nvms, churn_max), len).prop_map(move |ops| Case {
                bits,
                ncpus,
                pinning,
                nvms,
                ops,
            })
        })
}

/// The test's record of what it was told.
struct Harness {
    kvm: Arc<Kvm>,
    bits: VmidBits,
    vms: Vec<Arc<Vm>>,
    /// Per CPU: the loaded vCPU, its VM, and the VMID its load returned (programmed in
    /// VTTBR).
    loaded: Vec<Option<(Vcpu, usize, u16)>>,
    pins: Vec<Vec<VmidPin>>,
    /// I5: the index each pinned VM had when its first pin was taken.
    pinned_index: HashMap<usize, u16>,
    /// I4: VMs loaded at a rollover must come back with this index in that generation.
    keep: HashMap<usize, (u16, u64)>,
}

impl Harness {
    fn new(c: &Case) -> Self {
        let kvm = Kvm::new(KvmConfig::new(c.ncpus).vmid_bits(c.bits).pinning(c.pinning)).unwrap();
        let vms = (0..c.nvms)
            .map(|_| kvm.create_vm(VmConfig::default()))
            .collect();
        Harness {
            kvm,
            bits: c.bits,
            vms,
            loaded: (0..c.ncpus).map(|_| None).collect(),
            pins: (0..c.nvms).map(|_| Vec::new()).collect(),
            pinned_index: HashMap::new(),
            keep: HashMap::new(),
        }
    }

    fn mask(&self) -> u64 {
        self.bits.num_vmids() - 1
    }

    fn stats(&self) -> VmidStats {
        self.kvm.stats()
    }

    /// Called just before an operation that may roll over: remembers which VMs are loaded
    /// and must keep their number (I4) if it does.
    fn loaded_now(&self) -> Vec<(usize, u16)> {
        self.loaded
            .iter()
            .flatten()
            .map(|(_, vm, hw)| (*vm, *hw))
            .collect()
    }

    fn after_possible_rollover(&mut self, before: &VmidStats, was_loaded: &[(usize, u16)]) {
        let after = self.stats();
        if after.rollovers > before.rollovers {
            assert_eq!(after.broadcasts, after.rollovers);
            for &(vm, hw) in was_loaded {
                self.keep.insert(vm, (hw, after.generation));
            }
        }
    }

    fn put(&mut self, cpu: usize) {
        if let Some((mut vcpu, _, _)) = self.loaded[cpu].take() {
            vcpu.put().unwrap();
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Load { cpu, vm } => {
                self.put(cpu);
                let was = self.loaded_now();
                let before = self.stats();
                let mut vcpu = self.vms[vm].create_vcpu();
                let u = vcpu.load(cpu).unwrap();
                assert_eq!(u.rolled_over, self.stats().rollovers > before.rollovers);
                // I3 / I6: a non-zero VMID within the width, equal to id & mask.
                let hw = u.vmid.get();
                assert_ne!(hw, 0);
                assert!(u64::from(hw) <= self.mask());
                assert_eq!(u64::from(hw), u.id & self.mask());
                assert_eq!(self.vms[vm].kvm_vmid().id(), u.id);
                self.after_possible_rollover(&before, &was);
                self.loaded[cpu] = Some((vcpu, vm, hw));
            }
            Op::Put { cpu } => self.put(cpu),
            Op::Pin { vm } => {
                let was = self.loaded_now();
                let before = self.stats();
                let already = self.vms[vm].vmid_pin_count() > 0;
                match self.vms[vm].pin_vmid() {
                    Ok(pin) => {
                        assert!(self.kvm.vmid_allocator().pinning_enabled());
                        assert!(already || before.nr_pinned < before.max_pinned);
                        let hw = pin.vmid().get();
                        assert_ne!(hw, 0);
                        assert_eq!(u64::from(hw), self.vms[vm].kvm_vmid().id() & self.mask());
                        if let Some(&first) = self.pinned_index.get(&vm) {
                            assert_eq!(hw, first, "I5: a pinned VMID changed number");
                        } else {
                            assert!(!already);
                            self.pinned_index.insert(vm, hw);
                        }
                        assert_eq!(pin.rolled_over(), self.stats().rollovers > before.rollovers);
                        self.pins[vm].push(pin);
                    }
                    Err(PinError::Disabled) => {
                        assert!(!self.kvm.vmid_allocator().pinning_enabled())
                    }
                    Err(PinError::Exhausted { max_pinned }) => {
                        // Fails at exactly max_pinned, and never for an extra reference.
                        assert!(!already);
                        assert_eq!(max_pinned, before.max_pinned);
                        assert_eq!(before.nr_pinned, before.max_pinned);
                    }
                    Err(e) => panic!("unexpected pin error {e}"),
                }
                self.after_possible_rollover(&before, &was);
            }
            Op::PinRange { first, n } => {
                for vm in first..(first + n).min(self.vms.len()) {
                    self.apply(&Op::Pin { vm });
                }
            }
            Op::Unpin { vm, retire_fails } => {
                let Some(pin) = self.pins[vm].pop() else {
                    return;
                };
                let expected = pin.vmid();
                let mut seen = None;
                let r = pin.unpin(|v| {
                    seen = Some(v);
                    if retire_fails {
                        Err("cmdq timeout")
                    } else {
                        Ok(())
                    }
                });
                assert_eq!(seen, Some(expected));
                match r {
                    Ok(()) => assert!(!retire_fails),
                    Err(e) => {
                        assert!(retire_fails);
                        self.pins[vm].push(e.pin);
                    }
                }
                if self.vms[vm].vmid_pin_count() == 0 {
                    self.pinned_index.remove(&vm);
                }
            }
            Op::Leak { vm } => {
                let before = self.stats().leaked_pins;
                if self.pins[vm].pop().is_some() {
                    assert_eq!(self.stats().leaked_pins, before + 1);
                }
            }
            Op::Churn { cpu, n } => {
                self.put(cpu);
                for _ in 0..n {
                    let was = self.loaded_now();
                    let before = self.stats();
                    let vm = self.kvm.create_vm(VmConfig::default());
                    let mut vcpu = vm.create_vcpu();
                    let u = vcpu.load(cpu).unwrap();
                    assert_ne!(u.vmid.get(), 0);
                    vcpu.put().unwrap();
                    if u.rolled_over {
                        self.after_possible_rollover(&before, &was);
                    }
                }
            }
        }
    }

    fn check(&mut self) {
        let alloc = self.kvm.vmid_allocator();
        // I1, I2, I3, pinned maps.
        alloc
            .audit(self.vms.iter().map(|v| v.kvm_vmid()))
            .unwrap_or_else(|e| panic!("{e}"));
        let snap = alloc.snapshot();
        // I6: every loaded vCPU still owns the VMID it programmed.
        for (cpu, l) in self.loaded.iter().enumerate() {
            if let Some((vcpu, vm, hw)) = l {
                assert_eq!(vcpu.loaded_cpu(), Some(cpu));
                assert_eq!(vcpu.vmid().map(|v| v.get()), Some(*hw));
                let id = self.vms[*vm].kvm_vmid().id();
                assert_eq!(id & self.mask(), u64::from(*hw), "I6 on CPU {cpu}");
                let active = snap.active[cpu];
                assert!(
                    active == id
                        || (active == 0 && snap.reserved[cpu] & self.mask() == u64::from(*hw)),
                    "CPU {cpu}: active {active:#x}, VM id {id:#x}"
                );
            }
        }
        // I5: pinned VMs keep their index, whatever their generation.
        for (&vm, &hw) in &self.pinned_index {
            assert!(self.vms[vm].vmid_pin_count() > 0);
            assert_eq!(
                self.vms[vm].kvm_vmid().id() & self.mask(),
                u64::from(hw),
                "I5"
            );
            assert!(snap.is_pinned(u64::from(hw)));
            for p in &self.pins[vm] {
                assert_eq!(p.vmid().get(), hw);
            }
        }
        // I4: a VM loaded at a rollover has its old index in that generation.
        let generation = self.stats().generation;
        let bits = self.bits.bits();
        self.keep.retain(|_, &mut (_, g)| g == generation);
        for (&vm, &(hw, g)) in &self.keep {
            let id = self.vms[vm].kvm_vmid().id();
            if id >> bits == g {
                assert_eq!(id & self.mask(), u64::from(hw), "I4: VM {vm} renumbered");
            }
        }
        let s = self.stats();
        assert_eq!(s.rollovers, s.broadcasts);
        assert_eq!(s.nr_pinned as usize, snap.pinned_indices().len());
    }
}

/// Short runs replay a fixed seed; `TWINMMU_LONG=1` explores with a random one. Failures
/// are saved beside this file either way.
fn config() -> ProptestConfig {
    let long = std::env::var_os("TWINMMU_LONG").is_some();
    ProptestConfig {
        cases: if long { 1024 } else { 48 },
        rng_seed: if long {
            RngSeed::Random
        } else {
            RngSeed::Fixed(0x7717_4d4d_0004)
        },
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn invariants_hold_over_random_traces(c in case()) {
        let mut h = Harness::new(&c);
        for op in &c.ops {
            h.apply(op);
            h.check();
        }
    }
}
