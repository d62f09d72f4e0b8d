//! `Kvm`, `Vm`, `Vcpu` and the VMID pin handle.
//!
//! On a [`Machine`] (PEs and their DVM interconnect, optionally host memory):
//! - a vCPU load programs its PE with the VM's VMID from the allocator (never before the
//!   allocation: smmu_kvm.md §1.5) and the VM's stage 2; a put restores the host context;
//! - a loaded vCPU's TLBI instructions carry that VMID over the DVM;
//! - rollovers broadcast `TLBI ALLE1IS` over the DVM from the CPU that rolled over;
//! - a VM has guest RAM and stage-2 tables in host memory, and unmapping does the TLB
//!   maintenance KVM does (`IPAS2E1IS` + `VMALLE1IS`, the range forms, or `VMALLS12E1IS`).
//!
//! Without a machine ([`Kvm::new`]) only the VMID allocator and the bookkeeping run.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use twinmmu_hw::{
    DvmError, DvmReport, Pe, PeContext, PeFault, PeTranslation, Tlbi, TlbiInsn, TlbiOp,
};
use twinmmu_vmsa::{Access, Granule, S2Translation, Stage1Config, Stage2Config, Stage2Params};

use crate::machine::{DvmRollover, KvmError, Machine};
use crate::stage2::{
    GuestMemory, MAX_TLBI_RANGE_PAGES, Stage2, Stage2Changes, Stage2Error, s2_range_tlbis,
};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmConfig {
    pub noncoherent_dma: NonCoherentDmaPolicy,
    /// IPA size in bits (`KVM_VM_TYPE_ARM_IPA_SIZE`; KVM's default is 40).
    pub ipa_bits: u8,
    /// The stage-2 granule (KVM uses the host's page size).
    pub granule: Granule,
}

impl Default for VmConfig {
    /// Dynamic non-coherent DMA tracking, 40-bit IPA, 4K stage-2 granule.
    fn default() -> Self {
        VmConfig {
            noncoherent_dma: NonCoherentDmaPolicy::default(),
            ipa_bits: 40,
            granule: Granule::Size4K,
        }
    }
}

impl VmConfig {
    pub fn noncoherent_dma(mut self, policy: NonCoherentDmaPolicy) -> Self {
        self.noncoherent_dma = policy;
        self
    }

    pub fn ipa_bits(mut self, bits: u8) -> Self {
        self.ipa_bits = bits;
        self
    }

    pub fn granule(mut self, granule: Granule) -> Self {
        self.granule = granule;
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
    /// The operation needs PEs ([`Kvm::with_machine`]).
    #[error("no machine: vCPUs do not run on PEs")]
    NoMachine,
    #[error(transparent)]
    Stage2(#[from] Stage2Error),
    #[error(transparent)]
    Dvm(#[from] DvmError),
    /// A translation by the vCPU faulted.
    #[error("translation fault: {0}")]
    Fault(PeFault),
}

/// The hypervisor: physical CPUs, the VMID allocator, VMs.
pub struct Kvm {
    allocator: VmidAllocator,
    machine: Option<Machine>,
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
        Ok(Kvm::build(config, allocator, None))
    }

    /// A KVM running on `machine`: its physical CPUs are the machine's PEs (their number
    /// must equal `config.ncpus`), and its rollovers broadcast `TLBI ALLE1IS` over the
    /// machine's DVM interconnect.
    pub fn with_machine(config: KvmConfig, machine: Machine) -> Result<Arc<Kvm>, KvmError> {
        let pes = machine.dvm().pes().len();
        if pes != config.ncpus {
            return Err(KvmError::CpuCount {
                ncpus: config.ncpus,
                pes,
            });
        }
        let tlbi = Arc::new(DvmRollover(Arc::clone(machine.dvm())));
        let allocator = VmidAllocator::new(config.vmid_bits, config.ncpus, config.pinning, tlbi)?;
        Ok(Kvm::build(config, allocator, Some(machine)))
    }

    fn build(config: KvmConfig, allocator: VmidAllocator, machine: Option<Machine>) -> Arc<Kvm> {
        Arc::new(Kvm {
            allocator,
            machine,
            cpus: (0..config.ncpus)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
            next_vm: AtomicU64::new(1),
            next_vcpu: AtomicU64::new(1),
        })
    }

    /// The machine this KVM runs on, if any.
    pub fn machine(&self) -> Option<&Machine> {
        self.machine.as_ref()
    }

    /// The PE that is physical CPU `cpu`.
    pub fn pe(&self, cpu: usize) -> Option<&Arc<Pe>> {
        self.machine.as_ref()?.dvm().pes().get(cpu)
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

    /// `KVM_CREATE_VM`. The VM has no VMID until a vCPU loads or a pin needs one. With host
    /// memory, its stage-2 tables are allocated at the first vCPU load or RAM operation.
    pub fn create_vm(self: &Arc<Self>, config: VmConfig) -> Arc<Vm> {
        Arc::new(Vm {
            kvm: Arc::clone(self),
            id: self.next_vm.fetch_add(1, Ordering::Relaxed),
            vmid: KvmVmid::new(),
            noncoherent: NonCoherentDma::new(config.noncoherent_dma),
            next_vcpu_index: AtomicU64::new(0),
            config,
            stage2: Mutex::new(None),
            last_vcpu_ran: (0..self.ncpus())
                .map(|_| AtomicU64::new(u64::MAX))
                .collect(),
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

/// A virtual machine: its VMID (one canonical stage-2 MMU), its guest RAM and stage 2,
/// and its DMA coherency state.
pub struct Vm {
    kvm: Arc<Kvm>,
    id: u64,
    vmid: KvmVmid,
    noncoherent: NonCoherentDma,
    next_vcpu_index: AtomicU64,
    config: VmConfig,
    /// The stage 2 and its memory slots, under the lock KVM calls `mmu_lock`.
    stage2: Mutex<Option<Stage2>>,
    /// Per physical CPU, the index of the vCPU of this VM that ran there last
    /// (`mmu->last_vcpu_ran`); `u64::MAX` = none.
    last_vcpu_ran: Box<[AtomicU64]>,
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
            guest_stage1: None,
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

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Runs `f` on the stage 2, creating it (its start-level tables) first if needed.
    fn with_stage2<R>(
        &self,
        f: impl FnOnce(&mut Stage2) -> Result<R, Stage2Error>,
    ) -> Result<R, Stage2Error> {
        let mut g = self.stage2.lock();
        if g.is_none() {
            let m = self.kvm.machine.as_ref().ok_or(Stage2Error::NoMemory)?;
            let (mem, frames) = m.memory().zip(m.frames()).ok_or(Stage2Error::NoMemory)?;
            let features = m
                .dvm()
                .pes()
                .first()
                .map(|p| p.config().features)
                .unwrap_or_default();
            *g = Some(Stage2::new(
                Arc::clone(mem),
                frames.clone(),
                self.config.granule,
                self.config.ipa_bits,
                &features,
            )?);
        }
        match g.as_mut() {
            Some(s2) => f(s2),
            None => Err(Stage2Error::NoMemory),
        }
    }

    /// The stage-2 configuration a PE runs this VM with (VTTBR_EL2.BADDR, VTCR_EL2); `None`
    /// without host memory.
    pub fn stage2_config(&self) -> Option<Stage2Config> {
        self.with_stage2(|s| Ok(s.config())).ok()
    }

    /// The stage 2 as STE fields (S2TTB, S2T0SZ, S2SL0, S2TG, S2PS), for an SMMU stream
    /// that shares it.
    pub fn stage2_params(&self) -> Option<Stage2Params> {
        self.with_stage2(|s| Ok(s.params())).ok()
    }

    /// Adds guest RAM (a memory slot): `size` bytes at `ipa`, backed by host frames, not
    /// yet mapped at stage 2.
    pub fn add_ram(&self, ipa: u64, size: u64) -> Result<(), Stage2Error> {
        self.with_stage2(|s| s.add_ram(ipa, size))
    }

    /// Removes the RAM region that starts at `ipa`: unmaps it from stage 2 with the TLB
    /// maintenance, issued from physical CPU `cpu`, then frees its frames.
    pub fn remove_ram(&self, cpu: usize, ipa: u64) -> Result<DvmReport, Stage2Error> {
        self.check_cpu(cpu)?;
        self.with_stage2(|s| {
            let size = s.slot_size(ipa)?;
            let report = self.unmap_flush(s, cpu, ipa, size)?;
            s.remove_slot(ipa);
            Ok(report)
        })
    }

    /// The host PA backing guest RAM at `ipa` (through the memory slots, not stage 2).
    pub fn ram_pa(&self, ipa: u64) -> Option<u64> {
        self.with_stage2(|s| Ok(s.ram_pa(ipa))).ok().flatten()
    }

    /// Guest RAM by IPA: a snapshot view of the memory slots.
    pub fn guest_memory(&self) -> Result<GuestMemory, Stage2Error> {
        let mem = self
            .kvm
            .machine
            .as_ref()
            .and_then(|m| m.memory())
            .ok_or(Stage2Error::NoMemory)?;
        let chunks = self.with_stage2(|s| Ok(s.chunks()))?;
        Ok(GuestMemory::new(Arc::clone(mem), chunks))
    }

    /// Maps `[ipa, ipa + size)` of guest RAM at stage 2, as KVM's stage-2 fault handler
    /// does: read/write/executable Normal memory, with blocks where the RAM allows. No TLB
    /// maintenance is needed (the range was invalid).
    pub fn stage2_map(&self, ipa: u64, size: u64) -> Result<(), Stage2Error> {
        self.with_stage2(|s| s.map(ipa, size))
    }

    /// Unmaps `[ipa, ipa + size)` from stage 2 and does the TLB maintenance KVM does, from
    /// physical CPU `cpu`, before returning ([`Vm::stage2_flush`]).
    pub fn stage2_unmap(&self, cpu: usize, ipa: u64, size: u64) -> Result<DvmReport, Stage2Error> {
        self.check_cpu(cpu)?;
        self.with_stage2(|s| self.unmap_flush(s, cpu, ipa, size))
    }

    /// Unmaps `[ipa, ipa + size)` from stage 2 **without** TLB maintenance: PEs and SMMUs
    /// sharing the stage 2 may go on using the old translation until
    /// [`Vm::stage2_flush`] runs with the returned changes. For studying the hazard; KVM
    /// never leaves it out.
    pub fn stage2_unmap_unflushed(
        &self,
        ipa: u64,
        size: u64,
    ) -> Result<Stage2Changes, Stage2Error> {
        self.with_stage2(|s| s.unmap(ipa, size))
    }

    /// The TLB maintenance KVM does after an unmap, from physical CPU `cpu` at EL2 with the
    /// VM's VMID in VTTBR_EL2 (`enter_vmid_context`), each step complete (DSB ISH) before
    /// the next:
    /// - with FEAT_TLBIRANGE (`stage2_unmap_defer_tlb_flush`): for each table freed, then
    ///   once for the whole range, `kvm_tlb_flush_vmid_range` — `RIPAS2E1IS` (and
    ///   `IPAS2E1IS` for a last single page) in chunks of at most
    ///   [`MAX_TLBI_RANGE_PAGES`], then `VMALLE1IS`;
    /// - without: `__kvm_tlb_flush_vmid_ipa` per leaf that was valid — `IPAS2E1IS`, then
    ///   `VMALLE1IS` (stage-1 and combined entries hold no IPA, so all of the VMID's go);
    ///   and for each table freed `__kvm_tlb_flush_vmid` — `VMALLS12E1IS`.
    ///
    /// A VM that never had a VMID has nothing cached anywhere: no maintenance. A VM whose
    /// VMID is of an older generation is flushed under that number, as KVM does (at worst
    /// over-invalidating the VM that has it now).
    pub fn stage2_flush(
        &self,
        cpu: usize,
        changes: &Stage2Changes,
    ) -> Result<DvmReport, Stage2Error> {
        // flush checks `cpu` before it issues anything.
        self.flush(cpu, changes, self.config.granule)
    }

    /// For an unmap: refuses a bad `cpu` before the tables change.
    fn check_cpu(&self, cpu: usize) -> Result<(), Stage2Error> {
        let m = self.kvm.machine.as_ref().ok_or(Stage2Error::NoMemory)?;
        m.dvm().pe(cpu)?;
        Ok(())
    }

    /// Unmap then flush, under the stage-2 lock (so no map can come between them).
    fn unmap_flush(
        &self,
        s: &mut Stage2,
        cpu: usize,
        ipa: u64,
        size: u64,
    ) -> Result<DvmReport, Stage2Error> {
        match s.unmap(ipa, size) {
            Ok(changes) => self.flush(cpu, &changes, s.granule()),
            Err(Stage2Error::PartialUnmap { changes }) => {
                self.flush(cpu, &changes, s.granule())?;
                Err(Stage2Error::OutOfMemory)
            }
            Err(e) => Err(e),
        }
    }

    fn flush(
        &self,
        cpu: usize,
        ch: &Stage2Changes,
        granule: Granule,
    ) -> Result<DvmReport, Stage2Error> {
        let m = self.kvm.machine.as_ref().ok_or(Stage2Error::NoMemory)?;
        let dvm = m.dvm();
        let range = dvm.pe(cpu)?.config().tlbi_range;
        // dsb(ishst): the descriptor writes are visible before the TLBIs.
        std::sync::atomic::fence(Ordering::SeqCst);
        let Some(vmid) = self.last_vmid() else {
            return Ok(DvmReport::default());
        };
        let v = vmid.get();
        let g = granule.bits() as u8;
        let mut total = DvmReport::default();
        let mut run = |ts: &[Tlbi]| -> Result<(), Stage2Error> {
            let r = dvm.broadcast_all(Some(cpu), ts)?;
            total.tlbis += r.tlbis;
            total.deliveries += r.deliveries;
            total.pe_removed += r.pe_removed;
            total.smmu_honoured += r.smmu_honoured;
            total.smmu_removed += r.smmu_removed;
            Ok(())
        };
        let vmalle1 = Tlbi::new(TlbiOp::Vmalle1is, v);
        if range {
            let mut vmid_range = |start: u64, size: u64| -> Result<(), Stage2Error> {
                let mut pages = size >> g;
                let mut addr = start;
                while pages > 0 {
                    let n = pages.min(MAX_TLBI_RANGE_PAGES);
                    run(&s2_range_tlbis(v, addr, n, g))?;
                    run(&[vmalle1])?;
                    addr = addr.saturating_add(n << g);
                    pages -= n;
                }
                Ok(())
            };
            for t in &ch.tables {
                vmid_range(t.start, t.end - t.start)?;
            }
            vmid_range(ch.ipa, ch.size)?;
        } else {
            for &(addr, _level) in &ch.leaves {
                run(&[Tlbi::new(TlbiOp::Ipas2e1is, v).with_addr(addr)])?;
                run(&[vmalle1])?;
            }
            for _ in &ch.tables {
                run(&[Tlbi::new(TlbiOp::Vmalls12e1is, v)])?;
            }
        }
        Ok(total)
    }

    /// A TLB-less walk of the stage-2 tables: the reference for what any TLB may hold.
    pub fn stage2_walk(&self, ipa: u64) -> Result<S2Translation, Stage2Error> {
        self.with_stage2(|s| s.walk(ipa))
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

impl Drop for Vm {
    /// Frees the stage-2 tables and guest RAM. PE TLBs may still hold entries tagged with
    /// the VM's VMID; nobody can use them, because KVM never hands the VMID out again
    /// before a rollover, whose `TLBI ALLE1IS` removes them (a pinned VMID keeps its VM
    /// alive).
    fn drop(&mut self) {
        if let Some(s2) = self.stage2.get_mut().take() {
            s2.destroy();
        }
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
    /// The guest's stage 1 (TTBRn_EL1/TCR_EL1) and ASID, saved across put and load.
    guest_stage1: Option<(Stage1Config, u16)>,
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

    /// Where it is loaded, or the `NotLoaded` error the operations that need it return.
    fn loaded(&self) -> Result<Loaded, VcpuError> {
        self.loaded.ok_or(VcpuError::NotLoaded {
            vm: self.vm.id,
            vcpu: self.index,
        })
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
        // The stage-2 tables exist before anything can run on them.
        let stage2 = match &kvm.machine {
            Some(m) if m.memory().is_some() => match self.vm.with_stage2(|s| Ok(s.config())) {
                Ok(c) => Some(c),
                Err(e) => {
                    slot.store(0, Ordering::Release);
                    return Err(e.into());
                }
            },
            _ => None,
        };
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
        // VTTBR_EL2 is programmed only now, with the VMID just allocated (smmu_kvm.md §1.5:
        // never an unallocated VMID).
        if let Some(pe) = kvm.pe(cpu) {
            let v = update.vmid.get();
            // kvm_arch_vcpu_load: another vCPU of this VM ran on this CPU last, and may
            // have left stage-1 entries under the shared VMID: __kvm_flush_cpu_context
            // (a local TLBI VMALLE1).
            if let Some(last) = self.vm.last_vcpu_ran.get(cpu)
                && last.swap(u64::from(self.index), Ordering::Relaxed) != u64::from(self.index)
            {
                pe.tlbi_local(&Tlbi::new(TlbiOp::Vmalle1is, v));
            }
            pe.set_context(self.guest_context(v, stage2));
        }
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
        let l = self.loaded()?;
        self.loaded = None;
        let kvm = &self.vm.kvm;
        if let Some(pe) = kvm.pe(l.cpu) {
            pe.set_context(pe.host_context());
        }
        kvm.allocator.clear_active(l.cpu)?;
        if let Some(slot) = kvm.cpus.get(l.cpu) {
            slot.store(0, Ordering::Release);
        }
        Ok(())
    }

    fn guest_context(&self, vmid: u16, stage2: Option<Stage2Config>) -> PeContext {
        let ctx = PeContext::guest(vmid, stage2);
        match self.guest_stage1 {
            Some((s1, asid)) => ctx.with_stage1(Some(s1), asid),
            None => ctx,
        }
    }

    /// The guest programs its stage 1 (TTBR0/1_EL1, TCR_EL1) with ASID `asid`, or turns
    /// its MMU off with `None`. Kept across put and load, as KVM saves the EL1 registers.
    pub fn set_guest_stage1(&mut self, stage1: Option<(Stage1Config, u16)>) {
        self.guest_stage1 = stage1;
        if let Some(l) = self.loaded
            && let Some(pe) = self.vm.kvm.pe(l.cpu)
        {
            let ctx = pe.context();
            let ctx = match stage1 {
                Some((s1, asid)) => ctx.with_stage1(Some(s1), asid),
                None => ctx.with_stage1(None, 0),
            };
            pe.set_context(ctx);
        }
    }

    /// The PE this vCPU is loaded on.
    pub fn pe(&self) -> Result<&Arc<Pe>, VcpuError> {
        let l = self.loaded()?;
        self.vm.kvm.pe(l.cpu).ok_or(VcpuError::NoMachine)
    }

    /// The guest accesses `va` (an IPA with its MMU off): a translation by its PE, through
    /// the PE's TLB.
    pub fn translate(&self, va: u64, access: Access) -> Result<PeTranslation, VcpuError> {
        self.pe()?.translate(va, access).map_err(VcpuError::Fault)
    }

    /// The guest executes `TLBI <op>IS`: the message carries the VM's VMID (the PE's
    /// VTTBR_EL2) over the DVM. EL2 forms are UNDEFINED for a guest. Complete only after
    /// [`Vcpu::dsb`].
    pub fn tlbi(&self, insn: TlbiInsn) -> Result<Tlbi, VcpuError> {
        let l = self.loaded()?;
        let m = self.vm.kvm.machine.as_ref().ok_or(VcpuError::NoMachine)?;
        Ok(m.dvm().tlbi(l.cpu, insn)?)
    }

    /// The guest executes `DSB ISH`: its TLBIs are complete on every PE and SMMU.
    pub fn dsb(&self) -> Result<DvmReport, VcpuError> {
        let l = self.loaded()?;
        let m = self.vm.kvm.machine.as_ref().ok_or(VcpuError::NoMachine)?;
        Ok(m.dvm().dsb(l.cpu)?)
    }

    /// `TLBI <op>IS; DSB ISH` by the guest.
    pub fn tlbi_sync(&self, insn: TlbiInsn) -> Result<DvmReport, VcpuError> {
        self.tlbi(insn)?;
        self.dsb()
    }

    /// Emulates a guest WBINVD (KVM with WBINVD exiting): the physical CPUs whose caches must
    /// be written back and invalidated, the current one included. Empty when the VM's DMA is
    /// coherent. The dirty set is cleared.
    pub fn emulate_wbinvd(&mut self) -> Result<Vec<usize>, VcpuError> {
        let l = self.loaded()?;
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
