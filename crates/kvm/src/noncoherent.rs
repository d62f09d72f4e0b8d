//! Non-coherent DMA tracking for a VM (threads/004, Kevin Tian on VFIO type1 domain reuse).
//!
//! KVM counts the DMA sources attached to a VM that can bypass CPU cache coherency (a VFIO
//! group whose IOMMU domain cannot enforce snooping). Two decisions depend on it:
//! - **WBINVD emulation**: with no non-coherent DMA a guest WBINVD can be ignored; with it,
//!   KVM must write back and invalidate the caches of every physical CPU the vCPU has dirtied
//!   (`need_emulate_wbinvd()` → `kvm_arch_has_noncoherent_dma()`). The property is also read
//!   at vCPU load, to track those dirty CPUs.
//! - **memory type of guest RAM mappings** (`vmx_get_mt_mask()` in the thread): with no
//!   non-coherent DMA, guest RAM is forced write-back and the guest's PAT ignored (WB +
//!   IPAT); with it, the guest's own memory types are honoured.
//!
//! The model answers both as queries. The names and encodings follow the x86 thread the
//! design comes from; on arm64 the same question decides stage-2 cacheability attributes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// When the VM's non-coherent DMA property may change.
///
/// # The mixed-state hazard
///
/// Upstream KVM re-reads the property at each of its consumers: at vCPU load (to record the
/// CPU as needing a flush on the next WBINVD), when a WBINVD exits, and when a stage-2 / EPT
/// entry is built (its memory type). Under [`Dynamic`](Self::Dynamic), a source registered
/// while vCPUs already run makes those consumers disagree: CPUs a vCPU ran on before the
/// change were never recorded as dirty, so the next emulated WBINVD flushes too few CPUs and
/// the device reads stale lines; mappings built before the change still say WB with the
/// guest's PAT ignored while the guest now relies on its own uncached types. Removing a
/// source mid-run leaves the opposite mix. The guest sees neither state consistently.
///
/// [`OneShot`](Self::OneShot) removes the hazard by fixing the property before its first
/// consumer runs: it is locked when a vCPU of the VM is first loaded. After that every
/// registration of a new source fails with [`NonCoherentDmaError::Locked`] (the set of
/// sources is frozen, even when the VM is already non-coherent, so the rule a caller must
/// follow does not depend on state it may not know), and unregistering the last source
/// leaves the VM non-coherent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonCoherentDmaPolicy {
    /// Upstream: the property follows the registered sources at every moment.
    #[default]
    Dynamic,
    /// Locked once a vCPU has run (Kevin Tian's proposal in threads/004).
    OneShot,
}

/// A non-coherent DMA source, named by the caller (e.g. a VFIO group number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmaSourceId(pub u64);

/// Registering or unregistering a non-coherent DMA source failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonCoherentDmaError {
    #[error("non-coherent DMA source {0:?} is already registered")]
    AlreadyRegistered(DmaSourceId),
    #[error("non-coherent DMA source {0:?} is not registered")]
    NotRegistered(DmaSourceId),
    /// One-shot policy: a vCPU has run; the property and the set of sources are locked.
    #[error("the VM's DMA coherency is locked (one-shot policy, a vCPU has run)")]
    Locked,
}

/// What emulating a guest WBINVD must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WbinvdEmulation {
    /// All DMA is coherent: the instruction can be skipped.
    Nop,
    /// Write back and invalidate the caches of every CPU the vCPU has dirtied.
    FlushDirtyCpus,
}

/// A memory type as encoded in an EPT entry's memory-type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MemType {
    /// MTRR_TYPE_UNCACHABLE.
    Uncacheable = 0,
    /// MTRR_TYPE_WRBACK.
    WriteBack = 6,
}

/// The memory type KVM gives a guest mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptMemoryType {
    pub memtype: MemType,
    /// Ignore the guest's PAT (force `memtype`).
    pub ipat: bool,
}

impl EptMemoryType {
    /// EPT entry bits: memory type in bits \[5:3\] (`VMX_EPT_MT_EPTE_SHIFT` = 3), IPAT bit 6.
    pub const fn bits(self) -> u64 {
        ((self.memtype as u64) << 3) | if self.ipat { 1 << 6 } else { 0 }
    }
}

#[derive(Debug, Default)]
struct NcState {
    sources: BTreeSet<DmaSourceId>,
    /// One-shot: the value fixed at the first vCPU load.
    locked: Option<bool>,
}

/// A VM's non-coherent DMA state.
#[derive(Debug)]
pub(crate) struct NonCoherentDma {
    policy: NonCoherentDmaPolicy,
    state: Mutex<NcState>,
    /// The answer of `has_noncoherent_dma()`, kept in step with `state` so the queries on
    /// the vCPU load path take no lock.
    effective: AtomicBool,
    /// One-shot: the property is locked (checked on every vCPU load without the mutex).
    locked: AtomicBool,
}

impl NonCoherentDma {
    pub(crate) fn new(policy: NonCoherentDmaPolicy) -> Self {
        NonCoherentDma {
            policy,
            state: Mutex::new(NcState::default()),
            effective: AtomicBool::new(false),
            locked: AtomicBool::new(false),
        }
    }

    pub(crate) fn policy(&self) -> NonCoherentDmaPolicy {
        self.policy
    }

    pub(crate) fn register(&self, source: DmaSourceId) -> Result<(), NonCoherentDmaError> {
        let mut st = self.state.lock();
        if st.sources.contains(&source) {
            return Err(NonCoherentDmaError::AlreadyRegistered(source));
        }
        // threads/004: once locked, adding a source is rejected outright.
        if st.locked.is_some() {
            return Err(NonCoherentDmaError::Locked);
        }
        st.sources.insert(source);
        self.effective.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn unregister(&self, source: DmaSourceId) -> Result<(), NonCoherentDmaError> {
        let mut st = self.state.lock();
        if !st.sources.remove(&source) {
            return Err(NonCoherentDmaError::NotRegistered(source));
        }
        if st.locked.is_none() {
            self.effective
                .store(!st.sources.is_empty(), Ordering::Release);
        }
        Ok(())
    }

    /// A vCPU of the VM is being loaded: under one-shot, lock the property now, before any
    /// consumer reads it.
    #[inline]
    pub(crate) fn vcpu_loading(&self) {
        if self.policy == NonCoherentDmaPolicy::OneShot && !self.locked.load(Ordering::Acquire) {
            let mut st = self.state.lock();
            if st.locked.is_none() {
                let value = !st.sources.is_empty();
                st.locked = Some(value);
                self.effective.store(value, Ordering::Release);
                self.locked.store(true, Ordering::Release);
            }
        }
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Acquire)
    }

    pub(crate) fn registered(&self) -> usize {
        self.state.lock().sources.len()
    }

    #[inline]
    pub(crate) fn has_noncoherent_dma(&self) -> bool {
        self.effective.load(Ordering::Acquire)
    }

    pub(crate) fn wbinvd_emulation(&self) -> WbinvdEmulation {
        if self.has_noncoherent_dma() {
            WbinvdEmulation::FlushDirtyCpus
        } else {
            WbinvdEmulation::Nop
        }
    }

    pub(crate) fn memory_type(&self, is_mmio: bool) -> EptMemoryType {
        if is_mmio {
            EptMemoryType {
                memtype: MemType::Uncacheable,
                ipat: false,
            }
        } else if !self.has_noncoherent_dma() {
            // threads/004: coherent → (MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | IPAT.
            EptMemoryType {
                memtype: MemType::WriteBack,
                ipat: true,
            }
        } else {
            // Non-coherent: write-back with the guest's PAT honoured, so the guest's own
            // uncached mappings for the device's buffers take effect.
            EptMemoryType {
                memtype: MemType::WriteBack,
                ipat: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_memory_type_bits_sit_where_the_sdm_puts_them() {
        let wb_ipat = EptMemoryType {
            memtype: MemType::WriteBack,
            ipat: true,
        };
        assert_eq!(wb_ipat.bits(), (6 << 3) | (1 << 6));
        assert_eq!(wb_ipat.bits(), 0x70);
        let uc = EptMemoryType {
            memtype: MemType::Uncacheable,
            ipat: false,
        };
        assert_eq!(uc.bits(), 0);
    }
}
