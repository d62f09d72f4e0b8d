//! KVM arm64, as far as the IOMMU side cares: the VMID allocator with rollover and pinning,
//! VMs and vCPUs that load and put on physical CPUs, and non-coherent DMA tracking.
//!
//! - [`VmidAllocator`]: `arch/arm64/kvm/vmid.c` (smmu_kvm.md §1) with RFC v3 pinning (§3),
//!   generic over its atomics and lock ([`sync`]) so loom checks the real code.
//! - [`Kvm`], [`Vm`], [`Vcpu`]: the owners of the allocator's callers; [`VmidPin`] is a pin
//!   whose release runs the SMMU's retire step first.
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
mod noncoherent;
pub mod sync;
mod vmid;

pub use kvm::{Kvm, KvmConfig, UnpinError, Vcpu, VcpuError, Vm, VmConfig, VmidPin};
pub use noncoherent::{
    DmaSourceId, EptMemoryType, MemType, NonCoherentDmaError, NonCoherentDmaPolicy, WbinvdEmulation,
};
pub use vmid::{
    BroadcastTlbi, InvariantViolation, KvmVmid, NotPinned, NullTlbi, PinError, PinOutcome,
    TlbiBroadcaster, Vmid, VmidAllocator, VmidBits, VmidError, VmidInitError, VmidPath,
    VmidSnapshot, VmidStats, VmidUpdate, VmidWidthMismatch, check_btm_vmid_width,
};
