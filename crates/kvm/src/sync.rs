//! The synchronisation primitives the VMID allocator is written against.
//!
//! The allocator's fast path is lock-free and its correctness rests on the ordering of
//! read-modify-write operations on the per-CPU `active` slots (smmu_kvm.md §1.4). To
//! model-check that code with loom *as it is* — not a copy — the allocator is generic over
//! the atomic word and the lock it uses. [`StdPrimitives`] (std atomics, a `parking_lot`
//! mutex) is the default and what [`crate::Kvm`] uses; a loom test supplies loom's types
//! through the same two traits.

use std::sync::atomic::{AtomicU64, Ordering};

/// A 64-bit atomic word: the operations the allocator needs, with the kernel's orderings
/// passed through unchanged.
pub trait AtomicWord: Send + Sync {
    fn new(value: u64) -> Self;
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn swap(&self, value: u64, order: Ordering) -> u64;
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
    fn fetch_add(&self, value: u64, order: Ordering) -> u64;
}

/// A mutual-exclusion lock around `T`, used through a closure so no guard type has to be
/// named.
pub trait LockCell<T>: Send + Sync {
    fn new(value: T) -> Self;
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

/// A family of primitives: one atomic word type and one lock type constructor.
pub trait Primitives: 'static {
    type Atomic: AtomicWord;
    type Lock<T: Send>: LockCell<T>;
}

/// std atomics and a `parking_lot` mutex (the kernel's `cpu_vmid_lock` is a raw spinlock;
/// parking_lot spins briefly before parking, which is the closest user-space equivalent).
#[derive(Debug, Clone, Copy, Default)]
pub struct StdPrimitives;

impl Primitives for StdPrimitives {
    type Atomic = AtomicU64;
    type Lock<T: Send> = parking_lot::Mutex<T>;
}

impl AtomicWord for AtomicU64 {
    #[inline]
    fn new(value: u64) -> Self {
        AtomicU64::new(value)
    }
    #[inline]
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    #[inline]
    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order)
    }
    #[inline]
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        AtomicU64::swap(self, value, order)
    }
    #[inline]
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        AtomicU64::compare_exchange(self, current, new, success, failure)
    }
    #[inline]
    fn fetch_add(&self, value: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_add(self, value, order)
    }
}

impl<T: Send> LockCell<T> for parking_lot::Mutex<T> {
    #[inline]
    fn new(value: T) -> Self {
        parking_lot::Mutex::new(value)
    }
    #[inline]
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.lock())
    }
}
