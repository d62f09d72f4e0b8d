//! Loom model of the VMID fast path racing a rollover (smmu_kvm.md §1.4, §6).
//!
//! The allocator is generic over its atomics and lock (`twinmmu_kvm::sync`); here it is
//! instantiated with loom's, so loom explores every interleaving of the *real* `update`,
//! `clear_active` and rollover code. The property: a vCPU whose lock-free compare-and-swap
//! loses to a rollover's exchange-to-0 must take the slow path, so two contexts running at
//! the same time never share a hardware VMID.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::sync::Arc as StdArc;
use std::sync::atomic::Ordering;

use loom::sync::Arc;
use loom::thread;
use twinmmu_kvm::sync::{AtomicWord, LockCell, Primitives};
use twinmmu_kvm::{KvmVmid, NullTlbi, VmidAllocator, VmidBits, VmidPath};

struct LoomAtomic(loom::sync::atomic::AtomicU64);

impl AtomicWord for LoomAtomic {
    fn new(value: u64) -> Self {
        LoomAtomic(loom::sync::atomic::AtomicU64::new(value))
    }
    fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: Ordering) {
        self.0.store(value, order)
    }
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        self.0.swap(value, order)
    }
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        self.0.compare_exchange(current, new, success, failure)
    }
    fn fetch_add(&self, value: u64, order: Ordering) -> u64 {
        self.0.fetch_add(value, order)
    }
}

struct LoomLock<T>(loom::sync::Mutex<T>);

impl<T: Send> LockCell<T> for LoomLock<T> {
    fn new(value: T) -> Self {
        LoomLock(loom::sync::Mutex::new(value))
    }
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
}

struct Loom;

impl Primitives for Loom {
    type Atomic = LoomAtomic;
    type Lock<T: Send> = LoomLock<T>;
}

type Alloc = VmidAllocator<Loom>;
type Mmu = KvmVmid<Loom>;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    // The set-up fills the 8-bit map on one thread before any other starts; its operations
    // count against the branch limit without adding interleavings.
    b.max_branches = 100_000;
    b.check(f);
}

/// 8-bit VMIDs, 2 CPUs. VM A holds index 1 in generation 1 and is put on CPU 0 (active =
/// INVALID, so its next load may take the fast path). Every other index is used, so the next
/// allocation rolls over. Returns the allocator, A, and a fresh VM B.
fn full_allocator() -> (Arc<Alloc>, Arc<Mmu>, Arc<Mmu>) {
    let alloc = Arc::new(Alloc::new(VmidBits::Eight, 2, true, StdArc::new(NullTlbi)).unwrap());
    let a = Arc::new(Mmu::new());
    assert_eq!(alloc.update(0, &a).unwrap().vmid.get(), 1);
    alloc.clear_active(0).unwrap();
    for _ in 2..256 {
        let filler = Mmu::new();
        alloc.update(1, &filler).unwrap();
    }
    alloc.clear_active(1).unwrap();
    assert_eq!(alloc.stats().rollovers, 0);
    (alloc, a, Arc::new(Mmu::new()))
}

#[test]
fn fast_path_cas_that_loses_to_a_rollover_takes_the_slow_path() {
    model(|| {
        let (alloc, a, b) = full_allocator();
        let t = {
            let (alloc, a) = (alloc.clone(), a.clone());
            // CPU 0: VM A's vCPU loads; generation matches, so it tries the fast path.
            thread::spawn(move || alloc.update(0, &a).unwrap())
        };
        // CPU 1: VM B never ran; the map is full, so this rolls over.
        let ub = alloc.update(1, &b).unwrap();
        let ua = t.join().unwrap();

        assert!(ub.rolled_over);
        assert_eq!(alloc.stats().rollovers, 1);
        // Both run now: they must not share a hardware VMID, and neither has VMID 0.
        assert_ne!(ua.vmid, ub.vmid, "A {ua:?} and B {ub:?} share a VMID");
        let snap = alloc.snapshot();
        if alloc.gen_match(ua.id) {
            // A came after the rollover (its CAS saw 0 and went slow, or it read the new
            // generation first): it was given a current id under the lock.
            assert!(ua.path == VmidPath::Slow || snap.active[0] == ua.id);
        } else {
            // A's CAS won before the rollover's exchange: the exchange saw A's id and
            // reserved it, so A keeps running with a number nobody else can get.
            assert_eq!(ua.path, VmidPath::Fast);
            assert_eq!(snap.reserved[0], ua.id);
            assert_eq!(snap.active[0], 0);
        }
        alloc.audit([&*a, &*b]).unwrap();
    });
}

#[test]
fn put_racing_a_rollover_keeps_the_running_vmid_reserved_or_releases_it() {
    model(|| {
        let (alloc, a, b) = full_allocator();
        // A is running on CPU 0 (slow path, active = its id).
        let ua = alloc.update(0, &a).unwrap();
        let t = {
            let alloc = alloc.clone();
            // CPU 0 puts A while CPU 1 rolls over.
            thread::spawn(move || alloc.clear_active(0).unwrap())
        };
        let ub = alloc.update(1, &b).unwrap();
        t.join().unwrap();
        assert!(ub.rolled_over);
        let snap = alloc.snapshot();
        // Either the exchange saw A's id (reserved, so B cannot take it) or the put came
        // first (INVALID reserved: bit 0, harmless). The slot ends INVALID (put after the
        // exchange) or 0 (exchange after the put); both are safe, as 0 only sends CPU 0's next
        // load to the slow path. (We assert only these safety facts: loom 0.7 can let a
        // plain store fall between the read and write of a concurrent swap — loom issue #254
        // — which real hardware cannot, and which only ever leaves the slot 0.)
        let invalid = alloc.active_invalid();
        assert!(
            snap.reserved[0] == ua.id || snap.reserved[0] == invalid,
            "reserved {:#x}",
            snap.reserved[0]
        );
        assert!(snap.active[0] == invalid || snap.active[0] == 0);
        if snap.reserved[0] == ua.id {
            assert_ne!(ub.vmid, ua.vmid);
        }
        alloc.audit([&*a, &*b]).unwrap();
    });
}

#[test]
fn two_fast_paths_and_a_rollover_never_share_a_vmid() {
    model(|| {
        let alloc = Arc::new(Alloc::new(VmidBits::Eight, 3, true, StdArc::new(NullTlbi)).unwrap());
        let a = Arc::new(Mmu::new());
        let c = Arc::new(Mmu::new());
        alloc.update(0, &a).unwrap();
        alloc.update(2, &c).unwrap();
        for _ in 3..256 {
            alloc.update(1, &Mmu::new()).unwrap();
        }
        alloc.clear_active(1).unwrap();
        let b = Arc::new(Mmu::new());
        let ta = {
            let (alloc, a) = (alloc.clone(), a.clone());
            thread::spawn(move || alloc.update(0, &a).unwrap())
        };
        let tc = {
            let (alloc, c) = (alloc.clone(), c.clone());
            thread::spawn(move || alloc.update(2, &c).unwrap())
        };
        let ub = alloc.update(1, &b).unwrap();
        let (ua, uc) = (ta.join().unwrap(), tc.join().unwrap());
        assert!(ub.rolled_over);
        assert_ne!(ua.vmid, ub.vmid);
        assert_ne!(uc.vmid, ub.vmid);
        assert_ne!(ua.vmid, uc.vmid);
        alloc.audit([&*a, &*b, &*c]).unwrap();
    });
}
