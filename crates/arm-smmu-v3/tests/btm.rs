//! The BTM design (threads/000–001, smmu_kvm.md §3.5): with broadcast TLB maintenance the
//! guest's own `TLBI VAE1IS`, tagged with the VMID its vCPU runs with (VTTBR_EL2.VMID), must
//! reach the SMMU's nested entries. It does because the vIOMMU shares the VM's pinned KVM
//! VMID; rollovers do not change it. The negative control gives the vIOMMU a private SMMU VMID
//! under BTM (what the upstream vSMMU does today): the same TLBI misses and the device keeps
//! a stale translation.
//!
//! KVM runs on PEs joined to the SMMU by the DVM interconnect: a loaded vCPU executes
//! `TLBI VAE1IS; DSB ISH`, the message carries its VMID to every PE and to the SMMU, and
//! KVM's rollover `TLBI ALLE1IS` travels the same way.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{Dvm, DvmConfig, DvmReport, SmmuConfig, TlbiInsn, TlbiOp};
use twinmmu_iommufd::*;
use twinmmu_kvm::{Kvm, KvmConfig, Vcpu, VmidBits};

const VA: u64 = 0x6600_0000;
const CPUS: usize = 4;

/// KVM on `CPUS` PEs whose DVM reaches `m`'s SMMU.
fn kvm_for(m: &Machine, bits: VmidBits) -> Arc<Kvm> {
    let dvm = Dvm::new(
        DvmConfig::new(CPUS),
        Arc::clone(&m.mem) as Arc<dyn twinmmu_hw::PhysMem>,
    );
    dvm.attach_smmu(Arc::clone(&m.smmu));
    Kvm::with_machine(
        KvmConfig::new(CPUS).vmid_bits(bits),
        twinmmu_kvm::Machine::new(dvm),
    )
    .unwrap()
}

/// The loaded vCPU's `TLBI VAE1IS, (asid, va); DSB ISH`.
fn vcpu_tlbi_vae1is(vcpu: &Vcpu, asid: u16, va: u64) -> DvmReport {
    vcpu.tlbi_sync(TlbiInsn::new(TlbiOp::Vae1is).with_asid(asid).with_addr(va))
        .unwrap()
}

/// The guest remaps VA and invalidates only with its own broadcast TLBI; returns where the
/// device's next write landed (`true`: the new page).
fn remap_and_broadcast(m: &Machine, n: &mut Nested, vcpu: &Vcpu, from: u64, to: u64) -> bool {
    n.guest.unmap(VA, 0x1000);
    n.guest.map(VA, to, 0x1000);
    let r = vcpu_tlbi_vae1is(vcpu, n.guest.asid, VA);
    assert_eq!(
        r.smmu_honoured, 1,
        "BTM in use: the SMMU acts on the broadcast"
    );
    m.write(m.hpa(from), &[0; 8]);
    m.write(m.hpa(to), &[0; 8]);
    dma_write(m, n.dev.sid(), VA, b"after").unwrap();
    let new = m.read(m.hpa(to), 5) == b"after";
    let old = m.read(m.hpa(from), 5) == b"after";
    assert!(new ^ old);
    new
}

#[test]
fn a_vcpu_tlbi_invalidates_the_devices_nested_entries() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let kvm = kvm_for(&m, VmidBits::Sixteen);
    let vm = vm(&kvm);
    let mut n = Nested::new(&m, 0x80, 1, Some(KvmRef::new(Arc::clone(&vm))));
    n.guest.map(VA, 0x20_0000, 0x1000);
    dma_write(&m, 0x80, VA, b"before").unwrap();
    let mut vcpu = vm.create_vcpu();
    let vmid = vcpu.load(1).unwrap().vmid.get();
    assert_eq!(vmid, n.vmid(), "the vIOMMU shares the vCPU's VMID");
    assert!(remap_and_broadcast(&m, &mut n, &vcpu, 0x20_0000, 0x21_0000));
    // A TLBI from another VM (another VMID) leaves this device's entries alone.
    let other = vm_load(&kvm, 2);
    n.guest.unmap(VA, 0x1000);
    n.guest.map(VA, 0x22_0000, 0x1000);
    let r = vcpu_tlbi_vae1is(&other, n.guest.asid, VA);
    assert_eq!((r.smmu_honoured, r.smmu_removed), (1, 0));
    dma_write(&m, 0x80, VA, b"x").unwrap();
    assert_eq!(
        m.read(m.hpa(0x21_0000), 1),
        b"x",
        "another VM's TLBI does not reach it"
    );
    vcpu.put().unwrap();
}

fn vm_load(kvm: &Arc<Kvm>, cpu: usize) -> Vcpu {
    let vm = vm(kvm);
    let mut v = vm.create_vcpu();
    v.load(cpu).unwrap();
    v
}

#[test]
fn rollovers_do_not_break_it() {
    let m = Machine::new(
        SmmuConfig {
            vmid16: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    let kvm = kvm_for(&m, VmidBits::Eight);
    let vm = vm(&kvm);
    let mut n = Nested::new(&m, 0x81, 2, Some(KvmRef::new(Arc::clone(&vm))));
    n.guest.map(VA, 0x30_0000, 0x1000);
    let mut at = 0x30_0000;
    for round in 0..3 {
        // Enough other VMs run to roll the 8-bit VMID space over.
        let before = kvm.stats().rollovers;
        for _ in 0..300 {
            let mut v = vm_load(&kvm, 0);
            v.put().unwrap();
        }
        assert!(kvm.stats().rollovers > before, "round {round}");
        // The rollover's ALLE1IS emptied the SMMU TLB; warm it again.
        dma_write(&m, 0x81, VA, b"warm").unwrap();
        let mut vcpu = vm.create_vcpu();
        assert_eq!(
            vcpu.load(3).unwrap().vmid.get(),
            n.vmid(),
            "pinned across rollovers"
        );
        let to = at + 0x1000;
        assert!(remap_and_broadcast(&m, &mut n, &vcpu, at, to));
        at = to;
        vcpu.put().unwrap();
    }
    assert!(
        m.smmu.stats().broadcasts > 0,
        "ALLE1IS and VAE1IS reached the SMMU"
    );
}

#[test]
fn negative_control_private_vmid_under_btm_keeps_a_stale_translation() {
    let m = Machine::new(
        SmmuConfig::default(),
        Options {
            force_private_vmid: true,
            ..Options::default()
        },
    );
    let kvm = kvm_for(&m, VmidBits::Sixteen);
    // Other VMs run first, so the guest's KVM VMID is not the SMMU's first private one.
    let _others: Vec<Vcpu> = (0..3).map(|c| vm_load(&kvm, c)).collect();
    let vm = vm(&kvm);
    let mut n = Nested::new(&m, 0x82, 3, Some(KvmRef::new(Arc::clone(&vm))));
    n.guest.map(VA, 0x40_0000, 0x1000);
    dma_write(&m, 0x82, VA, b"before").unwrap();
    let mut vcpu = vm.create_vcpu();
    let vmid = vcpu.load(3).unwrap().vmid.get();
    assert_ne!(vmid, n.vmid(), "private VMID, not the VM's");
    assert!(
        !remap_and_broadcast(&m, &mut n, &vcpu, 0x40_0000, 0x41_0000),
        "the guest's TLBI missed the device's entries: stale translation"
    );
    // Only a trapped invalidation (with the private VMID) fixes it.
    assert_eq!(
        n.invalidate(&[gcmd::tlbi_nh_va(n.guest.asid, VA)]),
        (Ok(()), 1)
    );
    dma_write(&m, 0x82, VA, b"fixed").unwrap();
    assert_eq!(m.read(m.hpa(0x41_0000), 5), b"fixed");
    vcpu.put().unwrap();
}

#[test]
fn without_btm_the_smmu_ignores_broadcasts() {
    let m = Machine::new(
        SmmuConfig::default(),
        Options {
            enable_btm: false,
            ..Options::default()
        },
    );
    assert!(!m.drv.btm_enabled());
    let kvm = kvm_for(&m, VmidBits::Sixteen);
    let vm = vm(&kvm);
    let mut n = Nested::new(&m, 0x83, 4, Some(KvmRef::new(Arc::clone(&vm))));
    n.guest.map(VA, 0x50_0000, 0x1000);
    dma_write(&m, 0x83, VA, b"x").unwrap();
    let mut vcpu = vm.create_vcpu();
    vcpu.load(0).unwrap();
    n.guest.unmap(VA, 0x1000);
    n.guest.map(VA, 0x51_0000, 0x1000);
    // CR2.PTM = 1: the broadcast is not acted on.
    assert_eq!(vcpu_tlbi_vae1is(&vcpu, n.guest.asid, VA).smmu_honoured, 0);
    dma_write(&m, 0x83, VA, b"y").unwrap();
    assert_eq!(
        m.read(m.hpa(0x50_0000), 1),
        b"y",
        "only trapped invalidation works"
    );
    vcpu.put().unwrap();
}
