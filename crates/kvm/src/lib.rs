//! KVM arm64, as far as the IOMMU side cares: the VMID allocator with rollover and pinning,
//! VMs with guest RAM and a stage 2, vCPUs that load and put on physical CPUs (the PEs of
//! `twinmmu_hw`), TLB maintenance over the DVM interconnect, and non-coherent DMA tracking.
//!
//! - [`VmidAllocator`]: `arch/arm64/kvm/vmid.c` (smmu_kvm.md §1) with RFC v3 pinning (§3),
//!   generic over its atomics and lock ([`sync`]) so loom checks the real code.
//! - [`Kvm`], [`Vm`], [`Vcpu`]: the owners of the allocator's callers; [`VmidPin`] is a pin
//!   whose release runs the SMMU's retire step first. On a [`Machine`] a loaded vCPU runs on
//!   a PE with its VM's VMID, its TLBIs carry that VMID over the DVM, rollovers broadcast
//!   `TLBI ALLE1IS`, and stage-2 unmaps do KVM's maintenance ([`Vm::stage2_flush`]).
//! - Non-coherent DMA ([`NonCoherentDmaPolicy`]): the dynamic upstream behaviour and the
//!   one-shot lock (threads/004).
//!
//! ```
//! use twinmmu_kvm::{Kvm, KvmConfig, VmConfig, VmidBits};
//! let kvm = Kvm::new(KvmConfig::new(4).vmid_bits(VmidBits::Eight)).unwrap();
//! let vm = kvm.create_vm(VmConfig::default());
//! let mut vcpu = vm.create_vcpu();
//! let vmid = vcpu.load(0).unwrap().vmid;
//! let pin = vm.pin_vmid().unwrap();
//! assert_eq!(pin.vmid(), vmid);
//! vcpu.put().unwrap();
//! // Release: stop the SMMU using the VMID and invalidate it, then the pin goes.
//! pin.unpin(|_vmid| Ok::<(), std::convert::Infallible>(())).unwrap();
//! ```

mod bitmap;
mod kvm;
mod machine;
mod noncoherent;
mod stage2;
pub mod sync;
mod vmid;

pub use kvm::{Kvm, KvmConfig, UnpinError, Vcpu, VcpuError, Vm, VmConfig, VmidPin};
pub use machine::{KvmError, Machine};
pub use noncoherent::{
    DmaSourceId, EptMemoryType, MemType, NonCoherentDmaError, NonCoherentDmaPolicy, WbinvdEmulation,
};
pub use stage2::{GuestMemory, MAX_TLBI_RANGE_PAGES, Stage2Changes, Stage2Error, s2_range_tlbis};
pub use vmid::{
    BroadcastTlbi, InvariantViolation, KvmVmid, NotPinned, NullTlbi, PinError, PinOutcome,
    TlbiBroadcaster, Vmid, VmidAllocator, VmidBits, VmidError, VmidInitError, VmidPath,
    VmidSnapshot, VmidStats, VmidUpdate, VmidWidthMismatch, check_btm_vmid_width,
};
