//! End to end with the SMMU model and broadcast TLB maintenance (smmu_kvm.md §3.5, §4.11):
//! guests on PEs issue TLBIs that carry their VM's VMID over the DVM; an SMMU with BTM acts
//! on them for the streams whose STE holds that VMID. Why the VMID must be pinned is shown
//! by an unpinned one going stale.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_hw::regs::off;
use twinmmu_hw::tlb::Kind;
use twinmmu_hw::{DvmError, Regime, SmmuConfig, TlbiInsn, TlbiOp};
use twinmmu_kvm::{VcpuError, VmidBits};
use twinmmu_vmsa::{Access, AccessKind};

const SID_A: u32 = 1;
const SID_B: u32 = 2;

fn rd() -> Access {
    Access::new(AccessKind::Read, true)
}

#[test]
fn a_guest_vae1is_removes_the_smmu_entries_of_its_pinned_vmid_only() {
    let h = Host::new(2, VmidBits::Sixteen, SmmuConfig::default());
    // Both guests use ASID 5: only the VMID tells their entries apart.
    let mut a = Guest::new(&h.kvm, 5);
    let b = Guest::new(&h.kvm, 5);
    // Pin before the STE is written (smmu_kvm.md §3.3).
    let pin_a = a.vm.pin_vmid().unwrap();
    let pin_b = b.vm.pin_vmid().unwrap();
    let (va_, vb) = (pin_a.vmid().get(), pin_b.vmid().get());
    assert_ne!(va_, vb);
    for (g, sid, vmid) in [(&a, SID_A, va_), (&b, SID_B, vb)] {
        g.write_cd(false);
        h.set_ste(sid, &g.nested_ste(vmid));
    }
    assert_eq!(h.dma(SID_A, VA + 8), Some(a.data_pa(0) + 8));
    assert_eq!(h.dma(SID_B, VA + 8), Some(b.data_pa(0) + 8));
    assert_eq!(h.smmu_entries(va_, Kind::Nested), 1);
    assert_eq!(h.smmu_entries(vb, Kind::Nested), 1);

    // A vCPU of A runs on CPU 0 with A's pinned VMID, and caches the translation too.
    let mut vcpu = a.vm.create_vcpu();
    assert_eq!(vcpu.load(0).unwrap().vmid, pin_a.vmid());
    vcpu.set_guest_stage1(Some(a.stage1()));
    assert_eq!(h.dvm.pes()[0].context().vmid, va_);
    assert_eq!(vcpu.translate(VA, rd()).unwrap().pa, a.data_pa(0));

    // The guest moves VA to page 1; until its TLBI completes the device may still use
    // page 0 (it is allowed to), afterwards it must not.
    a.remap(1);
    assert_eq!(
        h.dma(SID_A, VA),
        Some(a.data_pa(0)),
        "cached until the TLBI"
    );
    let r = vcpu
        .tlbi_sync(TlbiInsn::new(TlbiOp::Vae1is).with_asid(5).with_addr(VA))
        .unwrap();
    assert_eq!((r.smmu_honoured, r.smmu_removed), (1, 1));
    assert_eq!(r.pe_removed, 1, "the vCPU's combined entry");
    assert_eq!(h.smmu_entries(va_, Kind::Nested), 0);
    assert_eq!(
        h.smmu_entries(vb, Kind::Nested),
        1,
        "B's VMID is not touched"
    );
    assert!(
        h.smmu_entries(va_, Kind::S2) > 0,
        "VAE1IS is a stage-1 operation"
    );
    assert_eq!(h.dma(SID_A, VA), Some(a.data_pa(1)));
    assert_eq!(vcpu.translate(VA, rd()).unwrap().pa, a.data_pa(1));
    assert_eq!(h.dma(SID_B, VA), Some(b.data_pa(0)));
    vcpu.put().unwrap();
    for p in [pin_a, pin_b] {
        p.unpin(|_| Ok::<(), ()>(())).unwrap();
    }
}

#[test]
fn aset_entries_survive_asid_scoped_broadcasts_but_not_vmalle1is() {
    let h = Host::new(2, VmidBits::Sixteen, SmmuConfig::default());
    let a = Guest::new(&h.kvm, 7);
    let pin = a.vm.pin_vmid().unwrap();
    let v = pin.vmid().get();
    a.write_cd(true);
    h.set_ste(SID_A, &a.nested_ste(v));
    let mut vcpu = a.vm.create_vcpu();
    vcpu.load(1).unwrap();
    vcpu.set_guest_stage1(Some(a.stage1()));
    for insn in [
        TlbiInsn::new(TlbiOp::Aside1is).with_asid(7),
        TlbiInsn::new(TlbiOp::Vae1is).with_asid(7).with_addr(VA),
        TlbiInsn::new(TlbiOp::Vale1is).with_asid(7).with_addr(VA),
    ] {
        h.dma(SID_A, VA).unwrap();
        vcpu.translate(VA, rd()).unwrap();
        let r = vcpu.tlbi_sync(insn).unwrap();
        assert_eq!(
            (r.smmu_honoured, r.smmu_removed),
            (1, 0),
            "{insn:?} skips ASET = 1"
        );
        assert_eq!(
            r.pe_removed, 1,
            "a PE has no ASET: {insn:?} removes its entry"
        );
        assert_eq!(h.smmu_entries(v, Kind::Nested), 1);
    }
    // Not ASID-scoped: VAAE1IS and VMALLE1IS do reach ASET = 1 entries.
    let r = vcpu
        .tlbi_sync(TlbiInsn::new(TlbiOp::Vaae1is).with_addr(VA))
        .unwrap();
    assert_eq!(r.smmu_removed, 1);
    h.dma(SID_A, VA).unwrap();
    let r = vcpu.tlbi_sync(TlbiInsn::new(TlbiOp::Vmalle1is)).unwrap();
    assert_eq!(r.smmu_removed, 1);
    assert_eq!(h.smmu_entries(v, Kind::Nested), 0);
    vcpu.put().unwrap();
    pin.unpin(|_| Ok::<(), ()>(())).unwrap();
}

/// Loads fresh VMs on `cpu` until one rolls the generation over; returns that VMID.
fn roll_over(h: &Host, cpu: usize) -> u16 {
    loop {
        let vm = h.kvm.create_vm(twinmmu_kvm::VmConfig::default());
        let mut v = vm.create_vcpu();
        let u = v.load(cpu).unwrap();
        assert_eq!(h.dvm.pes()[cpu].context().vmid, u.vmid.get());
        v.put().unwrap();
        if u.rolled_over {
            return u.vmid.get();
        }
    }
}

#[test]
fn a_rollover_broadcasts_alle1is_to_the_smmu_and_every_pe() {
    let h = Host::new(
        2,
        VmidBits::Eight,
        SmmuConfig {
            vmid16: false,
            ..SmmuConfig::default()
        },
    );
    let a = Guest::new(&h.kvm, 3);
    let pin = a.vm.pin_vmid().unwrap();
    a.write_cd(false);
    h.set_ste(SID_A, &a.nested_ste(pin.vmid().get()));
    h.dma(SID_A, VA).unwrap();
    let mut vcpu = a.vm.create_vcpu();
    vcpu.load(0).unwrap();
    vcpu.set_guest_stage1(Some(a.stage1()));
    vcpu.translate(VA, rd()).unwrap();
    assert!(h.dvm.pes()[0].tlb_len() > 0 && !h.smmu.tlb_entries().is_empty());
    let before = h.dvm.stats();
    roll_over(&h, 1);
    let s = h.dvm.stats();
    assert_eq!(h.kvm.stats().rollovers, 1);
    assert_eq!(
        s.by_op.iter().find(|(op, _)| *op == TlbiOp::Alle1is),
        Some(&(TlbiOp::Alle1is, 1))
    );
    assert_eq!(s.broadcasts, before.broadcasts + 1);
    assert!(h.smmu.tlb_entries().is_empty(), "ALLE1IS reached the SMMU");
    assert_eq!(s.smmus[0].acted, before.smmus[0].acted + 1);
    for (i, pe) in h.dvm.pes().iter().enumerate() {
        assert_eq!(pe.tlb_len(), 0, "ALLE1IS reached PE {i}");
        assert_eq!(s.pes[i].received, before.pes[i].received + 1);
    }
    // The vCPU loaded on CPU 0 through the rollover keeps its (pinned) VMID.
    assert_eq!(vcpu.vmid(), Some(pin.vmid()));
    vcpu.put().unwrap();
    pin.unpin(|_| Ok::<(), ()>(())).unwrap();
}

#[test]
fn with_ptm_or_without_btm_nothing_reaches_the_smmu() {
    for btm in [true, false] {
        let h = Host::new(
            2,
            VmidBits::Eight,
            SmmuConfig {
                btm,
                vmid16: false,
                ..SmmuConfig::default()
            },
        );
        if btm {
            // CR2.PTM = 1 (IHI0070 6.3.12): private TLB maintenance.
            h.w32(off::CR2, 1 << 2);
        }
        let a = Guest::new(&h.kvm, 3);
        let pin = a.vm.pin_vmid().unwrap();
        let v = pin.vmid().get();
        a.write_cd(false);
        h.set_ste(SID_A, &a.nested_ste(v));
        h.dma(SID_A, VA).unwrap();
        let mut vcpu = a.vm.create_vcpu();
        vcpu.load(0).unwrap();
        vcpu.set_guest_stage1(Some(a.stage1()));
        for insn in [
            TlbiInsn::new(TlbiOp::Vae1is).with_asid(3).with_addr(VA),
            TlbiInsn::new(TlbiOp::Vmalle1is),
        ] {
            let r = vcpu.tlbi_sync(insn).unwrap();
            assert_eq!((r.smmu_honoured, r.smmu_removed), (0, 0), "btm {btm}");
        }
        a.vm.stage2_unmap(0, DATA_IPA + 0x10_0000, 0x1000).unwrap();
        vcpu.put().unwrap();
        roll_over(&h, 1);
        assert_eq!(h.smmu_entries(v, Kind::Nested), 1, "btm {btm}");
        let s = h.dvm.stats();
        assert!(s.smmus[0].received >= 4);
        assert_eq!(s.smmus[0].acted, 0);
        // Software maintenance through the command queue still works.
        h.submit(&[
            twinmmu_hw::cmd::build::tlbi_nh_asid(v, 3),
            twinmmu_hw::cmd::build::sync(),
        ]);
        assert_eq!(h.smmu_entries(v, Kind::Nested), 0);
        pin.unpin(|_| Ok::<(), ()>(())).unwrap();
    }
}

#[test]
fn stage2_broadcasts_hit_smmu_s2_entries_of_that_vmid_with_no_opt_out() {
    let h = Host::new(2, VmidBits::Sixteen, SmmuConfig::default());
    let a = Guest::new(&h.kvm, 4);
    let b = Guest::new(&h.kvm, 4);
    let (pa_, pb) = (a.vm.pin_vmid().unwrap(), b.vm.pin_vmid().unwrap());
    let (va_, vb) = (pa_.vmid().get(), pb.vmid().get());
    // A's stage 2 is shared by a stage-2 stream and a nested stream whose CD says ASET = 1;
    // B's by a stage-2 stream.
    const SID_A_NESTED: u32 = 3;
    a.write_cd(true);
    h.set_ste(SID_A, &a.s2_ste(va_));
    h.set_ste(SID_A_NESTED, &a.nested_ste(va_));
    h.set_ste(SID_B, &b.s2_ste(vb));
    let ipa = DATA_IPA;
    assert_eq!(h.dma(SID_A, ipa), a.vm.ram_pa(ipa));
    assert_eq!(h.dma(SID_A_NESTED, VA), a.vm.ram_pa(ipa));
    assert_eq!(h.dma(SID_B, ipa), b.vm.ram_pa(ipa));
    // A vCPU of A also holds the IPA (guest MMU off).
    let mut vcpu = a.vm.create_vcpu();
    vcpu.load(1).unwrap();
    vcpu.translate(ipa, rd()).unwrap();
    vcpu.put().unwrap();
    let s2_a = h.smmu_entries(va_, Kind::S2);
    let s2_b = h.smmu_entries(vb, Kind::S2);

    // KVM unmaps the page from A's stage 2 on CPU 0: IPAS2E1IS (the range form here) and
    // VMALLE1IS, carrying A's VMID.
    let r = a.vm.stage2_unmap(0, ipa, 0x1000).unwrap();
    assert_eq!(r.smmu_honoured, r.tlbis, "every message acted on");
    // The RAM was mapped with 2 MiB blocks: the block covering the IPA goes from the SMMU
    // (S2 stream), the nested stream's combined entry goes (ASET does not protect stage
    // 2), and the vCPU's entry on PE 1 goes.
    assert!(r.smmu_removed >= 2, "{r:?}");
    assert_eq!(h.smmu_entries(va_, Kind::Nested), 0, "no opt-out");
    assert!(h.smmu_entries(va_, Kind::S2) < s2_a);
    assert_eq!(h.smmu_entries(vb, Kind::S2), s2_b, "B's VMID untouched");
    assert_eq!(h.dvm.pes()[1].tlb_len(), 0);
    assert_eq!(h.dma(SID_A, ipa), None, "stage-2 fault after the unmap");
    assert_eq!(h.dma(SID_A, ipa + 0x1000), a.vm.ram_pa(ipa + 0x1000));
    assert_eq!(h.dma(SID_B, ipa), b.vm.ram_pa(ipa));
    for p in [pa_, pb] {
        p.unpin(|_| Ok::<(), ()>(())).unwrap();
    }
}

#[test]
fn a_pinned_vmid_keeps_matching_after_three_rollovers_an_unpinned_one_goes_stale() {
    let h = Host::new(
        2,
        VmidBits::Eight,
        SmmuConfig {
            vmid16: false,
            ..SmmuConfig::default()
        },
    );
    let mut p = Guest::new(&h.kvm, 9);
    let mut u = Guest::new(&h.kvm, 9);
    let pin = p.vm.pin_vmid().unwrap();
    let vp = pin.vmid().get();
    // The bug under study: the SMMU user copies U's current VMID into its STE without a
    // pin.
    let mut vcpu_u = u.vm.create_vcpu();
    let vu0 = vcpu_u.load(0).unwrap().vmid.get();
    vcpu_u.put().unwrap();
    p.write_cd(false);
    u.write_cd(false);
    h.set_ste(SID_A, &p.nested_ste(vp));
    h.set_ste(SID_B, &u.nested_ste(vu0));
    let mut vcpu_p = p.vm.create_vcpu();
    for round in 1..=3u64 {
        let taker = roll_over(&h, 1);
        assert_eq!(h.kvm.stats().rollovers, round);
        assert!(h.smmu.tlb_entries().is_empty(), "ALLE1IS reached the SMMU");

        // Pinned: the PEs use the STE's VMID, so the guest's TLBI reaches the SMMU.
        assert_eq!(vcpu_p.load(0).unwrap().vmid.get(), vp);
        assert_eq!(h.dvm.pes()[0].context().vmid, vp);
        vcpu_p.set_guest_stage1(Some(p.stage1()));
        assert_eq!(h.dma(SID_A, VA), Some(p.data_pa(p.page)));
        p.remap(round);
        let r = vcpu_p
            .tlbi_sync(TlbiInsn::new(TlbiOp::Vae1is).with_asid(9).with_addr(VA))
            .unwrap();
        assert_eq!(r.smmu_removed, 1);
        assert_eq!(h.dma(SID_A, VA), Some(p.data_pa(round)), "round {round}");
        vcpu_p.put().unwrap();

        // Unpinned: renumbered, its old VMID now another VM's (the rollover's load took
        // it), and the guest's TLBI carries the new one.
        let vu = vcpu_u.load(0).unwrap().vmid.get();
        assert_ne!(vu, vu0, "round {round}: U was renumbered");
        if round == 1 {
            assert_eq!(taker, vu0, "another VM now owns U's old VMID");
        }
        vcpu_u.set_guest_stage1(Some(u.stage1()));
        let old = u.data_pa(u.page);
        assert_eq!(h.dma(SID_B, VA), Some(old));
        u.remap(round);
        let r = vcpu_u
            .tlbi_sync(TlbiInsn::new(TlbiOp::Vae1is).with_asid(9).with_addr(VA))
            .unwrap();
        assert_eq!(
            (r.smmu_honoured, r.smmu_removed),
            (1, 0),
            "the SMMU's entry is tagged {vu0}, the TLBI {vu}"
        );
        // The stale translation: the device still reaches the page the guest unmapped.
        assert_eq!(h.dma(SID_B, VA), Some(old), "round {round}: stale");
        assert_ne!(old, u.data_pa(round));
        vcpu_u.put().unwrap();
    }
    assert_eq!(pin.vmid().get(), vp);
    pin.unpin(|_| Ok::<(), ()>(())).unwrap();
}

#[test]
fn loads_program_the_allocated_vmid_and_puts_restore_the_host() {
    let h = Host::new(2, VmidBits::Sixteen, SmmuConfig::default());
    let a = Guest::new(&h.kvm, 1);
    let pin = a.vm.pin_vmid().unwrap();
    let mut v0 = a.vm.create_vcpu();
    let mut v1 = a.vm.create_vcpu();
    for (v, cpu) in [(&mut v0, 0usize), (&mut v1, 1)] {
        let u = v.load(cpu).unwrap();
        let ctx = h.dvm.pes()[cpu].context();
        assert_eq!((ctx.regime, ctx.vmid), (Regime::El1, pin.vmid().get()));
        assert_eq!(u.vmid, pin.vmid());
        assert!(ctx.stage2_enabled && ctx.stage2 == a.vm.stage2_config());
    }
    // A guest cannot issue EL2 maintenance.
    assert_eq!(
        v0.tlbi(TlbiInsn::new(TlbiOp::Alle1is)).unwrap_err(),
        VcpuError::Dvm(DvmError::Undefined {
            op: TlbiOp::Alle1is,
            regime: Regime::El1
        })
    );
    for (v, cpu) in [(&mut v0, 0usize), (&mut v1, 1)] {
        v.put().unwrap();
        let ctx = h.dvm.pes()[cpu].context();
        // The default PE is VHE: the host runs at EL2&0, VMID 0.
        assert_eq!((ctx.regime, ctx.vmid), (Regime::El2E2h, 0));
    }
    // Another vCPU of the VM loading on a CPU flushes the VM's stage-1 entries there
    // locally (kvm_arch_vcpu_load's last_vcpu_ran check); the same vCPU again does not.
    let local = |cpu: usize| h.dvm.pes()[cpu].stats().local_tlbis;
    let n = local(0);
    v1.load(0).unwrap();
    v1.put().unwrap();
    assert_eq!(local(0), n + 1);
    v1.load(0).unwrap();
    v1.put().unwrap();
    assert_eq!(local(0), n + 1);
    pin.unpin(|_| Ok::<(), ()>(())).unwrap();
}

/// Once a vCPU is put, its CPU runs the VHE host (EL2&0). The host's `TLBI VAAE1IS` is the
/// EL2&0 "by VA, all ASIDs" operation (VAAE2IS on the DVM, CMD_TLBI_EL2_VAA on an SMMU):
/// it removes every ASID's entry at the address on every PE and nothing else — not every
/// EL2&0 entry, as an ALLE2IS stand-in would.
#[test]
fn a_vhe_hosts_vaae1is_removes_only_that_address() {
    use twinmmu_hw::tlb::{Ctx, EntryPerms, TlbEntry, World};
    let h = Host::new(2, VmidBits::Sixteen, SmmuConfig::default());
    let a = Guest::new(&h.kvm, 5);
    let mut vcpu = a.vm.create_vcpu();
    vcpu.load(1).unwrap();
    vcpu.put().unwrap();
    assert_eq!(h.dvm.pes()[1].context().regime, Regime::El2E2h);
    const HVA: u64 = 0x7f00_0000_0000;
    let host_entry = |asid: u16, va: u64| TlbEntry {
        ctx: Ctx::new(World::El2E2h, Kind::S1, 0, Some(asid), false),
        in_base: va,
        shift: 12,
        out_base: RAM,
        ipa_base: RAM,
        tg_shift: 12,
        perms: EntryPerms::default(),
    };
    for pe in h.dvm.pes() {
        for (asid, va) in [(1, HVA), (2, HVA), (1, HVA + 0x10_0000)] {
            pe.tlb_insert(host_entry(asid, va));
        }
    }
    let t = h
        .dvm
        .tlbi(1, TlbiInsn::new(TlbiOp::Vaae1is).with_addr(HVA + 0x80))
        .unwrap();
    assert_eq!(t.op, TlbiOp::Vaae2is);
    let r = h.dvm.dsb(1).unwrap();
    assert_eq!(r.pe_removed, 4, "both ASIDs' entries at HVA, on both PEs");
    for pe in h.dvm.pes() {
        assert_eq!(pe.tlb_entries(), vec![host_entry(1, HVA + 0x10_0000)]);
    }
    let ops = h.dvm.stats().by_op;
    assert!(ops.contains(&(TlbiOp::Vaae2is, 1)), "{ops:?}");
    assert!(!ops.iter().any(|(op, _)| *op == TlbiOp::Alle2is), "{ops:?}");
}
