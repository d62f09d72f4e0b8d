//! Non-coherent DMA tracking, both policies (threads/004).

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use twinmmu_kvm::{
    DmaSourceId, Kvm, KvmConfig, MemType, NonCoherentDmaError, NonCoherentDmaPolicy, VmConfig,
    WbinvdEmulation,
};

fn vm(policy: NonCoherentDmaPolicy) -> std::sync::Arc<twinmmu_kvm::Vm> {
    let kvm = Kvm::new(KvmConfig::new(4)).unwrap();
    kvm.create_vm(VmConfig::default().noncoherent_dma(policy))
}

const GPU: DmaSourceId = DmaSourceId(7);
const NIC: DmaSourceId = DmaSourceId(9);

#[test]
fn coherent_vm_ignores_wbinvd_and_forces_write_back() {
    let vm = vm(NonCoherentDmaPolicy::default());
    assert_eq!(vm.noncoherent_dma_policy(), NonCoherentDmaPolicy::Dynamic);
    assert!(!vm.has_noncoherent_dma());
    assert_eq!(vm.wbinvd_emulation(), WbinvdEmulation::Nop);
    let mt = vm.memory_type(false);
    assert_eq!((mt.memtype, mt.ipat), (MemType::WriteBack, true));
    // (MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT
    assert_eq!(mt.bits(), (6 << 3) | (1 << 6));
    let mmio = vm.memory_type(true);
    assert_eq!((mmio.memtype, mmio.ipat), (MemType::Uncacheable, false));
}

#[test]
fn dynamic_policy_follows_the_sources_at_every_moment() {
    let vm = vm(NonCoherentDmaPolicy::Dynamic);
    let mut vcpu = vm.create_vcpu();
    vcpu.load(0).unwrap();
    vm.register_noncoherent_dma(GPU).unwrap();
    assert!(vm.has_noncoherent_dma());
    assert_eq!(vm.wbinvd_emulation(), WbinvdEmulation::FlushDirtyCpus);
    let mt = vm.memory_type(false);
    assert_eq!((mt.memtype, mt.ipat), (MemType::WriteBack, false));
    assert_eq!(
        vm.register_noncoherent_dma(GPU).unwrap_err(),
        NonCoherentDmaError::AlreadyRegistered(GPU)
    );
    vm.register_noncoherent_dma(NIC).unwrap();
    vm.unregister_noncoherent_dma(GPU).unwrap();
    assert!(vm.has_noncoherent_dma(), "NIC is still registered");
    vm.unregister_noncoherent_dma(NIC).unwrap();
    assert!(!vm.has_noncoherent_dma());
    assert_eq!(
        vm.unregister_noncoherent_dma(NIC).unwrap_err(),
        NonCoherentDmaError::NotRegistered(NIC)
    );
    assert!(!vm.noncoherent_dma_locked());
}

#[test]
fn dynamic_policy_shows_the_mixed_state_hazard() {
    // The hazard the one-shot policy removes: the vCPU ran on CPU 1 while the VM was
    // coherent, so CPU 1 was never recorded as dirty; once a source appears mid-run, the
    // emulated WBINVD flushes only the CPUs seen since.
    let vm = vm(NonCoherentDmaPolicy::Dynamic);
    let mut vcpu = vm.create_vcpu();
    vcpu.load(1).unwrap();
    assert_eq!(vcpu.emulate_wbinvd().unwrap(), Vec::<usize>::new());
    vcpu.put().unwrap();
    vcpu.load(2).unwrap();
    vm.register_noncoherent_dma(GPU).unwrap();
    vcpu.put().unwrap();
    vcpu.load(3).unwrap();
    assert_eq!(
        vcpu.emulate_wbinvd().unwrap(),
        vec![3],
        "CPUs 1 and 2 missed"
    );
    // From then on tracking is complete.
    vcpu.put().unwrap();
    vcpu.load(0).unwrap();
    assert_eq!(vcpu.emulate_wbinvd().unwrap(), vec![0]);
}

#[test]
fn one_shot_locks_coherent_at_first_vcpu_load() {
    let vm = vm(NonCoherentDmaPolicy::OneShot);
    // Before any vCPU ran, it behaves dynamically.
    vm.register_noncoherent_dma(GPU).unwrap();
    vm.unregister_noncoherent_dma(GPU).unwrap();
    assert!(!vm.noncoherent_dma_locked());
    let mut vcpu = vm.create_vcpu();
    vcpu.load(0).unwrap();
    assert!(vm.noncoherent_dma_locked());
    assert_eq!(
        vm.register_noncoherent_dma(GPU).unwrap_err(),
        NonCoherentDmaError::Locked
    );
    assert!(!vm.has_noncoherent_dma());
    assert_eq!(vm.wbinvd_emulation(), WbinvdEmulation::Nop);
    assert!(vm.memory_type(false).ipat);
    // Putting and dropping vCPUs does not unlock it.
    drop(vcpu);
    assert_eq!(
        vm.register_noncoherent_dma(NIC).unwrap_err(),
        NonCoherentDmaError::Locked
    );
    assert_eq!(vm.noncoherent_dma_sources(), 0);
}

#[test]
fn one_shot_locked_non_coherent_stays_set_after_unregistering() {
    let vm = vm(NonCoherentDmaPolicy::OneShot);
    vm.register_noncoherent_dma(GPU).unwrap();
    let mut vcpu = vm.create_vcpu();
    vcpu.load(2).unwrap();
    assert!(vm.noncoherent_dma_locked());
    vm.unregister_noncoherent_dma(GPU).unwrap();
    assert_eq!(vm.noncoherent_dma_sources(), 0);
    assert!(
        vm.has_noncoherent_dma(),
        "one-shot: unregistering leaves it set"
    );
    assert_eq!(vm.wbinvd_emulation(), WbinvdEmulation::FlushDirtyCpus);
    assert!(!vm.memory_type(false).ipat);
    // Registering a new source is rejected even though it would change nothing.
    assert_eq!(
        vm.register_noncoherent_dma(NIC).unwrap_err(),
        NonCoherentDmaError::Locked
    );
    assert_eq!(
        vm.unregister_noncoherent_dma(GPU).unwrap_err(),
        NonCoherentDmaError::NotRegistered(GPU)
    );
    // Every CPU the vCPU ran on is tracked from its first load: no mixed state.
    vcpu.put().unwrap();
    vcpu.load(1).unwrap();
    assert_eq!(vcpu.emulate_wbinvd().unwrap(), vec![1, 2]);
    vcpu.put().unwrap();
    assert!(matches!(
        vcpu.emulate_wbinvd(),
        Err(twinmmu_kvm::VcpuError::NotLoaded { .. })
    ));
}
