//! `Kvm`, `Vm`, `Vcpu` and the VMID pin handle.
//!
//! Not modelled yet: VMs have no stage 2 and vCPUs issue no TLB maintenance. The shapes
//! leave room for both: a [`Vm`] can own its stage-2 tables next to its [`KvmVmid`], and a
//! loaded [`Vcpu`] knows its physical CPU and programmed VMID, which is what a TLBI it issues
//! over the DVM must carry. [`KvmConfig`] and [`VmConfig`] are non-exhaustive so that such
//! settings can be added without breaking callers.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::noncoherent::{
    DmaSourceId, EptMemoryType, NonCoherentDma, NonCoherentDmaError, NonCoherentDmaPolicy,
    WbinvdEmulation,
};
use crate::sync::StdPrimitives;
use crate::vmid::{
    KvmVmid, NullTlbi, PinError, TlbiBroadcaster, Vmid, VmidAllocator, VmidBits, VmidError,
    VmidInitError, VmidStats, VmidUpdate, VmidWidthMismatch, check_btm_vmid_width,
};

/// How to build a [`Kvm`]: start from [`KvmConfig::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvmConfig {
    /// Physical CPUs (`num_possible_cpus()`).
    pub ncpus: usize,
    pub vmid_bits: VmidBits,
    /// Allocate the pinned-VMID map (RFC v3); without it every pin fails with
    /// [`PinError::Disabled`].
    pub pinning: bool,
}

impl KvmConfig {
    /// `ncpus` CPUs, 16-bit VMIDs, pinning on.
    pub fn new(ncpus: usize) -> Self {
        KvmConfig {
            ncpus,
            vmid_bits: VmidBits::Sixteen,
            pinning: true,
        }
    }

    pub fn vmid_bits(mut self, bits: VmidBits) -> Self {
        self.vmid_bits = bits;
        self
    }

    pub fn pinning(mut self, on: bool) -> Self {
        self.pinning = on;
        self
    }

    /// The allocator's init check ([`VmidAllocator::check_config`]) without building one.
    pub fn check(&self) -> Result<(), VmidInitError> {
        VmidAllocator::<StdPrimitives>::check_config(self.vmid_bits, self.ncpus)
    }
}

/// Options for a new VM: start from `VmConfig::default()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct VmConfig {
    pub noncoherent_dma: NonCoherentDmaPolicy,
}

impl VmConfig {
    pub fn noncoherent_dma(mut self, policy: NonCoherentDmaPolicy) -> Self {
        self.noncoherent_dma = policy;
        self
    }
}

/// Loading or putting a vCPU failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuError {
    #[error("physical CPU {cpu} does not exist ({ncpus} CPUs)")]
    CpuOutOfRange { cpu: usize, ncpus: usize },
    #[error("vCPU {vcpu} of VM {vm} is already loaded on CPU {cpu}")]
    AlreadyLoaded { vm: u64, vcpu: u32, cpu: usize },
    #[error("physical CPU {cpu} already has a vCPU loaded")]
    CpuBusy { cpu: usize },
    #[error("vCPU {vcpu} of VM {vm} is not loaded")]
    NotLoaded { vm: u64, vcpu: u32 },
    #[error(transparent)]
    Vmid(#[from] VmidError),
}

/// The hypervisor: physical CPUs, the VMID allocator, VMs.
pub struct Kvm {
    allocator: VmidAllocator,
    /// Per physical CPU: the serial of the vCPU loaded there, 0 when none.
    cpus: Box<[CachePadded<AtomicU64>]>,
    next_vm: AtomicU64,
    next_vcpu: AtomicU64,
}

impl Kvm {
    /// A KVM whose rollover broadcasts reach nothing (no PE model attached).
    pub fn new(config: KvmConfig) -> Result<Arc<Kvm>, VmidInitError> {
        Kvm::with_tlbi(config, Arc::new(NullTlbi))
    }

    /// A KVM whose rollovers broadcast `TLBI ALLE1IS` through `tlbi`.
    pub fn with_tlbi(
        config: KvmConfig,
        tlbi: Arc<dyn TlbiBroadcaster>,
    ) -> Result<Arc<Kvm>, VmidInitError> {
        let allocator = VmidAllocator::new(config.vmid_bits, config.ncpus, config.pinning, tlbi)?;
        Ok(Arc::new(Kvm {
            allocator,
            cpus: (0..config.ncpus)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
            next_vm: AtomicU64::new(1),
            next_vcpu: AtomicU64::new(1),
        }))
    }

    pub fn ncpus(&self) -> usize {
        self.cpus.len()
    }

    pub fn vmid_bits(&self) -> VmidBits {
        self.allocator.bits()
    }

    pub fn vmid_allocator(&self) -> &VmidAllocator {
        &self.allocator
    }

    pub fn stats(&self) -> VmidStats {
        self.allocator.stats()
    }

    /// Whether an SMMU supporting `smmu` VMIDs may share this KVM's VMIDs for BTM.
    pub fn check_btm_vmid_width(&self, smmu: VmidBits) -> Result<(), VmidWidthMismatch> {
        check_btm_vmid_width(self.vmid_bits(), smmu)
    }

    /// `KVM_CREATE_VM`. The VM has no VMID until a vCPU loads or a pin needs one.
    pub fn create_vm(self: &Arc<Self>, config: VmConfig) -> Arc<Vm> {
        Arc::new(Vm {
            kvm: Arc::clone(self),
            id: self.next_vm.fetch_add(1, Ordering::Relaxed),
            vmid: KvmVmid::new(),
            noncoherent: NonCoherentDma::new(config.noncoherent_dma),
            next_vcpu_index: AtomicU64::new(0),
        })
    }

    /// The serial of the vCPU loaded on `cpu`, if any.
    pub fn loaded_on(&self, cpu: usize) -> Option<u64> {
        self.cpus
            .get(cpu)
            .map(|c| c.load(Ordering::Acquire))
            .filter(|&s| s != 0)
    }
}

impl fmt::Debug for Kvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kvm")
            .field("ncpus", &self.ncpus())
            .field("vmid_bits", &self.vmid_bits())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A virtual machine: its VMID (one canonical stage-2 MMU) and its DMA coherency state.
pub struct Vm {
    kvm: Arc<Kvm>,
    id: u64,
    vmid: KvmVmid,
    noncoherent: NonCoherentDma,
    next_vcpu_index: AtomicU64,
}

impl Vm {
    /// The VM's number within its KVM (from 1).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    /// The `struct kvm_vmid` of the VM's stage-2 MMU.
    pub fn kvm_vmid(&self) -> &KvmVmid {
        &self.vmid
    }

    /// The hardware VMID the VM last received, of whatever generation; `None` if it never
    /// had one. Only a loaded vCPU ([`Vcpu::vmid`]) or a pin ([`VmidPin::vmid`]) guarantees
    /// the number is still the VM's.
    pub fn last_vmid(&self) -> Option<Vmid> {
        self.kvm.allocator.hw_vmid(self.vmid.id())
    }

    /// `KVM_CREATE_VCPU`.
    pub fn create_vcpu(self: &Arc<Self>) -> Vcpu {
        Vcpu {
            vm: Arc::clone(self),
            index: self.next_vcpu_index.fetch_add(1, Ordering::Relaxed) as u32,
            serial: self.kvm.next_vcpu.fetch_add(1, Ordering::Relaxed),
            loaded: None,
            wbinvd_dirty: vec![false; self.kvm.ncpus()].into_boxed_slice(),
        }
    }

    /// Pins the VM's VMID so that it keeps its number across rollovers, for an SMMU that
    /// shares it (BTM). Take it *before* writing the VMID into an STE.
    ///
    /// If the VM never ran, or its VMID is of an older generation, this allocates one (the
    /// old number when still free), which may roll the generation over. Fails with a typed
    /// error, never with VMID 0, when pinning is disabled or every pinnable VMID is pinned.
    /// Each pin is one reference; the handle keeps the VM alive.
    pub fn pin_vmid(self: &Arc<Self>) -> Result<VmidPin, PinError> {
        let outcome = self.kvm.allocator.pin(&self.vmid)?;
        Ok(VmidPin {
            vm: Arc::clone(self),
            vmid: outcome.vmid,
            rolled_over: outcome.rolled_over,
            released: false,
        })
    }

    /// Pin references held on the VM's VMID.
    pub fn vmid_pin_count(&self) -> u64 {
        self.vmid.pin_count()
    }

    /// Registers a DMA source that does not snoop CPU caches.
    pub fn register_noncoherent_dma(&self, source: DmaSourceId) -> Result<(), NonCoherentDmaError> {
        self.noncoherent.register(source)
    }

    pub fn unregister_noncoherent_dma(
        &self,
        source: DmaSourceId,
    ) -> Result<(), NonCoherentDmaError> {
        self.noncoherent.unregister(source)
    }

    /// `kvm_arch_has_noncoherent_dma()`.
    pub fn has_noncoherent_dma(&self) -> bool {
        self.noncoherent.has_noncoherent_dma()
    }

    pub fn noncoherent_dma_policy(&self) -> NonCoherentDmaPolicy {
        self.noncoherent.policy()
    }

    /// One-shot policy: the property has been locked by a vCPU load.
    pub fn noncoherent_dma_locked(&self) -> bool {
        self.noncoherent.is_locked()
    }

    /// Sources registered now (under one-shot, may be 0 while the VM stays non-coherent).
    pub fn noncoherent_dma_sources(&self) -> usize {
        self.noncoherent.registered()
    }

    /// `need_emulate_wbinvd()`: what a guest WBINVD requires.
    pub fn wbinvd_emulation(&self) -> WbinvdEmulation {
        self.noncoherent.wbinvd_emulation()
    }

    /// The memory type of a guest mapping (`vmx_get_mt_mask()`).
    pub fn memory_type(&self, is_mmio: bool) -> EptMemoryType {
        self.noncoherent.memory_type(is_mmio)
    }
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("vmid", &self.vmid)
            .field("noncoherent_dma", &self.has_noncoherent_dma())
            .finish()
    }
}

/// A virtual CPU. At most one physical CPU runs it, and a physical CPU runs at most one
/// vCPU; breaking either is a [`VcpuError`]. Dropping a loaded vCPU puts it.
pub struct Vcpu {
    vm: Arc<Vm>,
    index: u32,
    /// KVM-wide, never 0 (0 marks a free physical CPU).
    serial: u64,
    loaded: Option<Loaded>,
    /// Physical CPUs whose caches may hold this vCPU's dirty lines (`wbinvd_dirty_mask`).
    wbinvd_dirty: Box<[bool]>,
}

#[derive(Debug, Clone, Copy)]
struct Loaded {
    cpu: usize,
    vmid: Vmid,
}

impl Vcpu {
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The vCPU's index within its VM.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The physical CPU it is loaded on.
    pub fn loaded_cpu(&self) -> Option<usize> {
        self.loaded.map(|l| l.cpu)
    }

    /// The VMID programmed in VTTBR_EL2 while loaded.
    pub fn vmid(&self) -> Option<Vmid> {
        self.loaded.map(|l| l.vmid)
    }

    /// `kvm_arch_vcpu_load`: takes physical CPU `cpu` and runs the VMID update before
    /// anything can use the stage 2 (smmu_kvm.md §1.5: the Feb-2025 ordering fix). Returns
    /// what the update did; the VMID to program is `.vmid`.
    pub fn load(&mut self, cpu: usize) -> Result<VmidUpdate, VcpuError> {
        if let Some(l) = self.loaded {
            return Err(VcpuError::AlreadyLoaded {
                vm: self.vm.id,
                vcpu: self.index,
                cpu: l.cpu,
            });
        }
        let kvm = &self.vm.kvm;
        let Some(slot) = kvm.cpus.get(cpu) else {
            return Err(VcpuError::CpuOutOfRange {
                cpu,
                ncpus: kvm.ncpus(),
            });
        };
        if slot
            .compare_exchange(0, self.serial, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(VcpuError::CpuBusy { cpu });
        }
        // One-shot coherency locks before its first consumer (the dirty-CPU tracking just
        // below) reads it.
        self.vm.noncoherent.vcpu_loading();
        let update = match kvm.allocator.update(cpu, &self.vm.vmid) {
            Ok(u) => u,
            Err(e) => {
                slot.store(0, Ordering::Release);
                return Err(e.into());
            }
        };
        // Address WBINVD the guest may execute: this CPU may now hold our dirty lines.
        if self.vm.noncoherent.has_noncoherent_dma()
            && let Some(d) = self.wbinvd_dirty.get_mut(cpu)
        {
            *d = true;
        }
        self.loaded = Some(Loaded {
            cpu,
            vmid: update.vmid,
        });
        Ok(update)
    }

    /// `kvm_arch_vcpu_put`: clears the CPU's active VMID and frees the CPU.
    pub fn put(&mut self) -> Result<(), VcpuError> {
        let Some(l) = self.loaded.take() else {
            return Err(VcpuError::NotLoaded {
                vm: self.vm.id,
                vcpu: self.index,
            });
        };
        let kvm = &self.vm.kvm;
        kvm.allocator.clear_active(l.cpu)?;
        if let Some(slot) = kvm.cpus.get(l.cpu) {
            slot.store(0, Ordering::Release);
        }
        Ok(())
    }

    /// Emulates a guest WBINVD (KVM with WBINVD exiting): the physical CPUs whose caches must
    /// be written back and invalidated, the current one included. Empty when the VM's DMA is
    /// coherent. The dirty set is cleared.
    pub fn emulate_wbinvd(&mut self) -> Result<Vec<usize>, VcpuError> {
        let Some(l) = self.loaded else {
            return Err(VcpuError::NotLoaded {
                vm: self.vm.id,
                vcpu: self.index,
            });
        };
        if self.vm.wbinvd_emulation() == WbinvdEmulation::Nop {
            return Ok(Vec::new());
        }
        if let Some(d) = self.wbinvd_dirty.get_mut(l.cpu) {
            *d = true;
        }
        let cpus = self
            .wbinvd_dirty
            .iter()
            .enumerate()
            .filter_map(|(c, &d)| d.then_some(c))
            .collect();
        self.wbinvd_dirty.fill(false);
        Ok(cpus)
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        if self.loaded.is_some() {
            let _ = self.put();
        }
    }
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("vm", &self.vm.id)
            .field("index", &self.index)
            .field("loaded", &self.loaded)
            .finish()
    }
}

/// One pin reference on a VM's VMID (RFC v3 `kvm_arm_pinned_vmid_get`), held by an SMMU
/// user such as a vIOMMU. The VMID keeps its number across every rollover while any pin is
/// held, and the handle keeps its VM alive (smmu_kvm.md §3.4 item 4).
///
/// # Releasing
///
/// The only way to release it is [`unpin`](VmidPin::unpin), which first runs the caller's
/// *retire* step: stop using the VMID in STEs (rewrite them, CFGI_STE) and invalidate the
/// SMMU's entries for it (CMD_TLBI_S12_VMALL + CMD_SYNC). Only if that succeeds is the pin
/// reference dropped; if it fails, the pin comes back in the error. KVM may hand the number
/// to another VM once the last pin is gone, so an SMMU that still cached it would alias that
/// VM (Jean-Philippe Brucker, smmu_kvm.md §3.3).
///
/// Dropping the handle without `unpin` **leaks** the pin: the VMID stays pinned for the life
/// of the [`Kvm`] (even after its VM is gone), one pinnable VMID fewer, counted in
/// [`VmidStats::leaked_pins`]. The model cannot know whether an SMMU still caches the number,
/// so it never frees it silently.
pub struct VmidPin {
    vm: Arc<Vm>,
    vmid: Vmid,
    rolled_over: bool,
    released: bool,
}

/// The retire step of [`VmidPin::unpin`] failed; the pin is still held and comes back here.
#[derive(Debug, thiserror::Error)]
#[error("retiring VMID {} failed, the pin is kept", pin.vmid)]
pub struct UnpinError<E> {
    pub pin: VmidPin,
    #[source]
    pub error: E,
}

impl VmidPin {
    /// The pinned hardware VMID, for STE.S2VMID.
    pub fn vmid(&self) -> Vmid {
        self.vmid
    }

    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Taking this pin allocated a VMID and rolled the generation over.
    pub fn rolled_over(&self) -> bool {
        self.rolled_over
    }

    /// Releases the pin in the safe order: `retire(vmid)` must stop the SMMU using the VMID
    /// and complete an invalidation of it (STE rewritten, CFGI_STE, TLBI_S12_VMALL,
    /// CMD_SYNC). If it fails, the pin is kept and returned in the error.
    pub fn unpin<E>(
        mut self,
        retire: impl FnOnce(Vmid) -> Result<(), E>,
    ) -> Result<(), UnpinError<E>> {
        if let Err(error) = retire(self.vmid) {
            return Err(UnpinError { pin: self, error });
        }
        self.released = true;
        let released = self.vm.kvm.allocator.unpin(&self.vm.vmid);
        // Each live handle owns one reference, so the count cannot be 0 here.
        debug_assert!(released.is_ok(), "VmidPin without a pin reference");
        Ok(())
    }
}

impl Drop for VmidPin {
    fn drop(&mut self) {
        if !self.released {
            self.vm.kvm.allocator.note_leaked_pin();
        }
    }
}

impl fmt::Debug for VmidPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmidPin")
            .field("vm", &self.vm.id)
            .field("vmid", &self.vmid)
            .finish()
    }
}
