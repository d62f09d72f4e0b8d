//! The vIOMMU VMID policy (threads 000–002, smmu_kvm.md §3): pinned KVM VMIDs under BTM with
//! the safe release order, KVM required, width checks, pin exhaustion, private VMIDs per
//! vIOMMU without BTM (several over one stage 2), and rollovers that leave a pin alone.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use twinmmu_arm_smmu_v3::defs::{cmd, get, ste};
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::SmmuConfig;
use twinmmu_iommufd::*;
use twinmmu_kvm::{Kvm, KvmConfig, VmidBits};

fn traced() -> Options {
    Options {
        trace: true,
        ..Options::default()
    }
}

fn s2vmid(m: &Machine, sid: u32) -> u16 {
    get(ste::S2VMID, m.drv.read_ste(sid).unwrap()[2]) as u16
}

#[test]
fn btm_viommu_shares_the_pinned_kvm_vmid_and_releases_it_in_the_safe_order() {
    let m = Machine::new(SmmuConfig::default(), traced());
    assert!(m.drv.btm_enabled());
    let kvm = kvm16();
    let vm = vm(&kvm);
    let n = Nested::new(&m, 0x40, 5, Some(KvmRef::new(Arc::clone(&vm))));
    let vmid = n.vmid();
    assert_eq!(vm.vmid_pin_count(), 1);
    assert_eq!(vm.last_vmid().map(|v| v.get()), Some(vmid));
    let v = n.vsmmu();
    let vs = v.as_any().downcast_ref::<VSmmu>().unwrap();
    assert_eq!(vs.vmid_source(), VmidSource::KvmPinned);
    // The physical nested STE carries the pinned VMID, Config = nested.
    assert_eq!(s2vmid(&m, 0x40), vmid);
    assert_eq!(
        get(ste::CFG, m.drv.read_ste(0x40).unwrap()[0]),
        ste::CFG_NESTED
    );
    // A vCPU of the VM runs with the same VMID.
    let mut vcpu = vm.create_vcpu();
    assert_eq!(vcpu.load(1).unwrap().vmid.get(), vmid);
    vcpu.put().unwrap();
    drop(v);
    m.drv.take_trace();
    // Tear down in iommufd's order: detach, nested HWPT, vDEVICE, vIOMMU.
    n.ictx.detach(n.dev_id, NO_PASID);
    n.ictx.destroy(n.nested).unwrap();
    n.ictx.destroy(n.vdev).unwrap();
    assert_eq!(
        vm.vmid_pin_count(),
        1,
        "the pin lives as long as the vIOMMU"
    );
    n.ictx.destroy(n.viommu).unwrap();
    assert_eq!(vm.vmid_pin_count(), 0);
    let trace = m.drv.take_trace();
    // STE off (abort) → … → TLBI_S12_VMALL(vmid) → SYNC done → unpin.
    let ste_off = trace
        .iter()
        .position(|e| matches!(e, TraceEvent::SteWrite { sid: 0x40, index: 0, value } if get(ste::CFG, *value) == ste::CFG_ABORT))
        .expect("STE switched to abort");
    let vmall = trace
        .iter()
        .position(|e| {
            matches!(e, TraceEvent::Cmd(c)
                if get(cmd::OP, c[0]) == cmd::OP_TLBI_S12_VMALL
                    && get(cmd::TLBI_0_VMID, c[0]) == u64::from(vmid))
        })
        .expect("TLBI_S12_VMALL of the VMID");
    let sync = vmall
        + trace[vmall..]
            .iter()
            .position(|e| *e == TraceEvent::SyncDone)
            .expect("its CMD_SYNC completed");
    let unpin = trace
        .iter()
        .position(|e| *e == TraceEvent::Unpin { vmid })
        .expect("unpinned");
    assert!(ste_off < vmall && vmall < sync && sync < unpin, "{trace:?}");
    // Nothing tagged with the VMID survives in the SMMU TLB.
    assert!(m.smmu.tlb_entries().iter().all(|e| e.ctx.vmid() != vmid));
    assert_eq!(kvm.stats().leaked_pins, 0);
}

#[test]
fn two_viommus_of_one_vm_share_one_pin_reference_each() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let kvm = kvm16();
    let vm = vm(&kvm);
    let a = Nested::new(&m, 0x41, 1, Some(KvmRef::new(Arc::clone(&vm))));
    let b = Nested::in_ctx(
        &m,
        a.ictx.clone(),
        Some((a.ioas, a.s2_hwpt)),
        0x42,
        2,
        Some(KvmRef::new(Arc::clone(&vm))),
    );
    assert_eq!(a.vmid(), b.vmid(), "one VM, one KVM VMID");
    assert_eq!(vm.vmid_pin_count(), 2);
    b.ictx.detach(b.dev_id, NO_PASID);
    for id in [b.nested, b.vdev, b.viommu] {
        b.ictx.destroy(id).unwrap();
    }
    assert_eq!(vm.vmid_pin_count(), 1);
    drop(b);
    drop(a);
    assert_eq!(
        vm.vmid_pin_count(),
        0,
        "closing the context releases the last pin"
    );
}

fn bind(m: &Machine, c: &Iommufd, sid: u32, kvm: Option<KvmRef>) -> (Arc<Master>, ObjectId) {
    let dev = m.master(sid);
    let id = c
        .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, kvm)
        .unwrap();
    (dev, id)
}

fn nest_parent(c: &Iommufd, dev: ObjectId) -> (ObjectId, ObjectId) {
    let ioas = c.ioas_alloc(0).unwrap();
    let h = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            dev,
            ioas,
            &mut none_data(),
            ObjectId(0),
        )
        .unwrap();
    (ioas, h)
}

fn viommu(c: &Iommufd, dev: ObjectId, s2: ObjectId) -> Result<ObjectId, Errno> {
    c.viommu_alloc(0, viommu_type::ARM_SMMUV3, dev, s2, &mut none_data())
}

#[test]
fn btm_requires_a_kvm_of_the_right_type_and_width() {
    let m = Machine::new(SmmuConfig::default(), Options::default());
    let c = Iommufd::new();
    // No KVM at bind: EINVAL, nothing left behind.
    let (_d0, d) = bind(&m, &c, 1, None);
    let (_, s2) = nest_parent(&c, d);
    let objects = c.object_count();
    assert_eq!(viommu(&c, d, s2), Err(Errno::EINVAL));
    assert_eq!(c.object_count(), objects);
    // A KVM handle of another type: EINVAL.
    let (_d1, d) = bind(&m, &c, 2, Some(KvmRef::new(Arc::new(42u32))));
    assert_eq!(viommu(&c, d, s2), Err(Errno::EINVAL));
    // An 8-bit KVM with a 16-bit SMMU: widths differ, EOPNOTSUPP, no pin taken.
    let vm8 = vm(&kvm_with(VmidBits::Eight, 4));
    let (_d2, d) = bind(&m, &c, 3, Some(KvmRef::new(Arc::clone(&vm8))));
    assert_eq!(viommu(&c, d, s2), Err(Errno::EOPNOTSUPP));
    assert_eq!(vm8.vmid_pin_count(), 0);
    // Pinning disabled in KVM: EOPNOTSUPP.
    let nopin = Kvm::new(KvmConfig::new(4).pinning(false)).unwrap();
    let (_d3, d) = bind(&m, &c, 4, Some(KvmRef::new(vm(&nopin))));
    assert_eq!(viommu(&c, d, s2), Err(Errno::EOPNOTSUPP));
    assert_eq!(
        c.object_count(),
        objects + 3,
        "only the three DEVICEs were added"
    );

    // A 16-bit KVM with an 8-bit SMMU: EOPNOTSUPP too.
    let m8 = Machine::new(
        SmmuConfig {
            vmid16: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    let c8 = Iommufd::new();
    let vm16 = vm(&kvm16());
    let (_d4, d) = bind(&m8, &c8, 1, Some(KvmRef::new(Arc::clone(&vm16))));
    let (_, s2) = nest_parent(&c8, d);
    assert_eq!(viommu(&c8, d, s2), Err(Errno::EOPNOTSUPP));
    assert_eq!(vm16.vmid_pin_count(), 0);
}

#[test]
fn pin_exhaustion_fails_the_alloc_and_leaves_nothing_behind() {
    // 8-bit VMIDs on both sides, 200 CPUs: 256 - 200 - 2 = 54 pinnable VMIDs.
    let m = Machine::new(
        SmmuConfig {
            vmid16: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    let kvm = kvm_with(VmidBits::Eight, 200);
    let c = Iommufd::new();
    let (_p, d0) = bind(&m, &c, 0x7ff, None);
    let (_, s2) = nest_parent(&c, d0);
    let mut devs = Vec::new();
    let mut vms = Vec::new();
    let mut viommus = Vec::new();
    for i in 0..54u32 {
        let vm = vm(&kvm);
        let (dev, d) = bind(&m, &c, i, Some(KvmRef::new(Arc::clone(&vm))));
        viommus.push(viommu(&c, d, s2).unwrap());
        devs.push(dev);
        vms.push(vm);
    }
    assert_eq!(kvm.stats().nr_pinned, 54);
    let extra = vm(&kvm);
    let (_e, d) = bind(&m, &c, 100, Some(KvmRef::new(Arc::clone(&extra))));
    let objects = c.object_count();
    assert_eq!(viommu(&c, d, s2), Err(Errno::ENOSPC));
    assert_eq!(c.object_count(), objects, "no object left behind");
    assert_eq!(extra.vmid_pin_count(), 0);
    assert_eq!(kvm.stats().nr_pinned, 54);
    // Every pinned VMID is distinct and non-zero.
    let mut seen: Vec<u16> = viommus
        .iter()
        .map(|v| {
            let ops = c.viommu_ops(*v).unwrap();
            ops.as_any().downcast_ref::<VSmmu>().unwrap().vmid()
        })
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 54);
    assert!(!seen.contains(&0));
    // One vIOMMU goes: its pin is released and the next alloc succeeds.
    c.destroy(viommus[10]).unwrap();
    assert_eq!(vms[10].vmid_pin_count(), 0);
    assert!(viommu(&c, d, s2).is_ok());
    assert_eq!(extra.vmid_pin_count(), 1);
}

#[test]
fn pinned_vmid_survives_rollovers() {
    // 8-bit VMIDs, 4 CPUs: 250 VMs running one after the other roll the generation over.
    let m = Machine::new(
        SmmuConfig {
            vmid16: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    let kvm = kvm_with(VmidBits::Eight, 4);
    let guest_vm = vm(&kvm);
    let mut n = Nested::new(&m, 0x50, 4, Some(KvmRef::new(Arc::clone(&guest_vm))));
    let vmid = n.vmid();
    n.guest.map(0x1000_0000, 0x30_0000, 0x1000);
    let others: Vec<_> = (0..600).map(|_| vm(&kvm)).collect();
    for o in &others {
        let mut c = o.create_vcpu();
        c.load(0).unwrap();
        c.put().unwrap();
    }
    assert!(kvm.stats().rollovers >= 2, "{:?}", kvm.stats());
    let mut vcpu = guest_vm.create_vcpu();
    assert_eq!(
        vcpu.load(2).unwrap().vmid.get(),
        vmid,
        "pinned: same number"
    );
    vcpu.put().unwrap();
    // No other VM was given the pinned number.
    for o in &others {
        if let Some(v) = o.last_vmid() {
            let current = o.kvm_vmid().id() >> 8 == guest_vm.kvm_vmid().id() >> 8;
            assert!(!(current && v.get() == vmid));
        }
    }
    assert_eq!(s2vmid(&m, 0x50), vmid);
    dma_write(&m, 0x50, 0x1000_0000, b"still").unwrap();
    assert_eq!(m.read(m.hpa(0x30_0000), 5), b"still");
}

#[test]
fn private_vmids_per_viommu_over_one_s2() {
    // threads/002: hwpt_alloc(deva, NEST_PARENT) = shared_s2; viommu1, viommu2 on it; devc
    // attached to shared_s2 directly: three different VMIDs for the same S2 page table.
    let m = Machine::new(
        SmmuConfig {
            btm: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    assert!(!m.drv.btm_enabled());
    let a = Nested::new(&m, 0x60, 1, None);
    let b = Nested::in_ctx(&m, a.ictx.clone(), Some((a.ioas, a.s2_hwpt)), 0x61, 2, None);
    let (_devc, c_id) = bind(&m, &a.ictx, 0x62, None);
    a.ictx.attach(c_id, NO_PASID, a.s2_hwpt).unwrap();
    let vc = s2vmid(&m, 0x62);
    let mut all = vec![a.vmid(), b.vmid(), vc];
    assert_eq!(s2vmid(&m, 0x60), a.vmid());
    assert_eq!(s2vmid(&m, 0x61), b.vmid());
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 3, "three VMIDs for one S2");
    assert!(!all.contains(&0));
    // The S2 domain invalidates all three.
    let s2 = a.ictx.paging_domain(a.s2_hwpt).unwrap();
    let mut vm = s2.as_any().downcast_ref::<S2Domain>().unwrap().vmids();
    vm.sort_unstable();
    assert_eq!(vm, all);
    // Same physical S2 tables in all three STEs.
    let ttb = |sid| m.drv.read_ste(sid).unwrap()[3] & ste::S2TTB;
    assert_eq!(ttb(0x60), ttb(0x61));
    assert_eq!(ttb(0x60), ttb(0x62));
    drop(s2);
    let before = m.drv.stats().private_vmids;
    a.ictx.detach(b.dev_id, NO_PASID);
    for id in [b.nested, b.vdev, b.viommu] {
        a.ictx.destroy(id).unwrap();
    }
    assert_eq!(m.drv.stats().private_vmids, before - 1, "freed on destroy");
}

#[test]
fn private_vmid_exhaustion_is_enospc() {
    let m = Machine::new(
        SmmuConfig {
            btm: false,
            vmid16: false,
            ..SmmuConfig::default()
        },
        Options::default(),
    );
    let c = Iommufd::new();
    let (_d, d) = bind(&m, &c, 1, None);
    let (_, s2) = nest_parent(&c, d);
    // 255 VMIDs (1..=255).
    for _ in 0..255 {
        viommu(&c, d, s2).unwrap();
    }
    let objects = c.object_count();
    assert_eq!(viommu(&c, d, s2), Err(Errno::ENOSPC));
    assert_eq!(c.object_count(), objects);
}

#[test]
fn force_private_vmid_under_btm_is_the_negative_control_knob() {
    let m = Machine::new(
        SmmuConfig::default(),
        Options {
            force_private_vmid: true,
            ..Options::default()
        },
    );
    assert!(m.drv.btm_enabled());
    let vm = vm(&kvm16());
    let n = Nested::new(&m, 0x70, 1, Some(KvmRef::new(Arc::clone(&vm))));
    let v = n.vsmmu();
    let vs = v.as_any().downcast_ref::<VSmmu>().unwrap();
    assert_eq!(vs.vmid_source(), VmidSource::Private);
    assert_eq!(vm.vmid_pin_count(), 0);
}
