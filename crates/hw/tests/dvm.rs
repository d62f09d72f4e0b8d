//! The DVM interconnect: a TLBI …IS reaches every PE and every attached SMMU; the issuer's
//! DSB completes only when every recipient has applied it, also when many PEs issue at
//! once and others translate meanwhile; counts per recipient.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use twinmmu_hw::mem::WalkMem;
use twinmmu_hw::regs::off;
use twinmmu_hw::tlb::{Ctx, EntryPerms, Kind, TlbEntry, World};
use twinmmu_hw::{
    AccessKind, Dvm, DvmConfig, Outcome, PeContext, PhysMem, SmmuConfig, SparseMem, Tlbi, TlbiInsn,
    TlbiOp, Transaction,
};
use twinmmu_vmsa::{
    Access, FaultKind, Features, Granule, PaSize, S2LeafAttrs, Stage2Config, Stage2Params,
    TableBuilder, TableFormat,
};

fn long() -> bool {
    std::env::var_os("TWINMMU_LONG").is_some_and(|v| v == "1")
}

fn s1_entry(vmid: u16, asid: u16, va: u64) -> TlbEntry {
    TlbEntry {
        ctx: Ctx::new(World::NsEl1, Kind::S1, vmid, Some(asid), false),
        in_base: va,
        shift: 12,
        out_base: DATA,
        ipa_base: va,
        tg_shift: 12,
        perms: EntryPerms { s1: None, s2: None },
    }
}

/// A stage-1 stream (SID 1, VMID 5, ASID 9) with one page cached in the SMMU's TLB.
fn smmu_with_entry(cfg: SmmuConfig) -> Machine {
    let mut m = Machine::new(cfg);
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    let ng = twinmmu_vmsa::S1LeafAttrs {
        el0: true,
        not_global: true,
        ..twinmmu_vmsa::S1LeafAttrs::rw()
    };
    b.map(0x1000, DATA, 0x1000, ng.bits()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 9));
    m.set_ste(1, &s1_ste(CDS, 0, 5));
    let t = Transaction::new(1, None, 0x1000, AccessKind::Read, false);
    assert_eq!(m.smmu.translate(t), Outcome::Translated { pa: DATA });
    assert_eq!(m.smmu.tlb_entries().len(), 1);
    m
}

#[test]
fn a_tlbi_reaches_every_pe_and_the_smmu_and_is_counted_per_recipient() {
    let m = smmu_with_entry(SmmuConfig::default());
    let dvm = Dvm::new(DvmConfig::new(3), m.mem.clone());
    assert_eq!(dvm.attach_smmu(m.smmu.clone()), 0);
    for pe in dvm.pes() {
        pe.tlb_insert(s1_entry(5, 9, 0x1000));
        pe.tlb_insert(s1_entry(6, 9, 0x1000));
    }
    // A guest of VMID 5 on PE 1 executes TLBI VAE1IS.
    dvm.pes()[1].set_context(PeContext::guest(5, None));
    let r = dvm
        .tlbi_sync(
            1,
            TlbiInsn::new(TlbiOp::Vae1is).with_asid(9).with_addr(0x1000),
        )
        .unwrap();
    assert_eq!(r.tlbis, 1);
    assert_eq!(r.deliveries, 4, "3 PEs and 1 SMMU");
    assert_eq!((r.pe_removed, r.smmu_honoured, r.smmu_removed), (3, 1, 1));
    assert!(m.smmu.tlb_entries().is_empty());
    for pe in dvm.pes() {
        let e = pe.tlb_entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].ctx.vmid(), 6, "other VMIDs' entries stay");
    }
    let s = dvm.stats();
    assert_eq!(s.broadcasts, 1);
    assert_eq!(s.by_op, vec![(TlbiOp::Vae1is, 1)]);
    for p in &s.pes {
        assert_eq!((p.received, p.acted, p.removed, p.pending), (1, 1, 1, 0));
    }
    assert_eq!(
        (s.smmus[0].received, s.smmus[0].acted, s.smmus[0].removed),
        (1, 1, 1)
    );

    // CR2.PTM = 1: the SMMU's port still receives, but the SMMU does not act.
    let t = Transaction::new(1, None, 0x1000, AccessKind::Read, false);
    m.smmu.translate(t);
    m.w32(off::CR2, 1 << 2);
    let r = dvm
        .broadcast(Some(0), Tlbi::new(TlbiOp::Alle1is, 0))
        .unwrap();
    assert_eq!((r.pe_removed, r.smmu_honoured, r.smmu_removed), (3, 0, 0));
    assert_eq!(m.smmu.tlb_entries().len(), 1);
    let s = dvm.stats();
    assert_eq!((s.smmus[0].received, s.smmus[0].acted), (2, 1));
    assert_eq!(s.broadcasts, 2);
}

#[test]
fn an_smmu_without_btm_ignores_broadcasts() {
    let m = smmu_with_entry(SmmuConfig {
        btm: false,
        ..SmmuConfig::default()
    });
    let dvm = Dvm::new(DvmConfig::new(1), m.mem.clone());
    dvm.attach_smmu(m.smmu.clone());
    let r = dvm
        .broadcast(None, Tlbi::new(TlbiOp::Vmalls12e1is, 5))
        .unwrap();
    assert_eq!((r.deliveries, r.smmu_honoured), (2, 0));
    assert_eq!(m.smmu.tlb_entries().len(), 1);
}

#[test]
fn a_tlbi_completes_at_the_dsb_and_full_inboxes_push_back() {
    let dvm = Dvm::new(DvmConfig::new(2).inbox_capacity(3), ram());
    for pe in dvm.pes() {
        for asid in 0..4 {
            pe.tlb_insert(s1_entry(0, asid, 0x1000));
        }
    }
    // An nVHE host (EL1&0, VMID 0) on both PEs.
    for pe in dvm.pes() {
        pe.set_context(PeContext::host(false));
    }
    dvm.tlbi(0, TlbiInsn::new(TlbiOp::Aside1is).with_asid(0))
        .unwrap();
    let s = dvm.stats();
    assert_eq!(s.pes[1].pending, 1, "posted, not yet applied");
    // Two more fill PE 1's inbox (capacity 3): the poster drains it.
    dvm.tlbi(0, TlbiInsn::new(TlbiOp::Aside1is).with_asid(1))
        .unwrap();
    dvm.tlbi(0, TlbiInsn::new(TlbiOp::Aside1is).with_asid(2))
        .unwrap();
    let s = dvm.stats();
    assert_eq!((s.pes[1].pending, s.pes[1].removed), (0, 3));
    dvm.tlbi(0, TlbiInsn::new(TlbiOp::Aside1is).with_asid(3))
        .unwrap();
    let r = dvm.dsb(0).unwrap();
    assert_eq!((r.tlbis, r.deliveries, r.pe_removed), (4, 8, 8));
    assert!(dvm.pes().iter().all(|p| p.tlb_len() == 0));
    assert_eq!(dvm.dsb(0).unwrap().tlbis, 0, "nothing outstanding");
}

/// Many PEs issue at once, each for its own VMID, while every inbox is shared: when a DSB
/// returns, no recipient holds an entry of the issuer's VMID (only the issuer creates them).
#[test]
fn after_a_dsb_no_recipient_holds_a_matching_entry_under_concurrency() {
    const PES: usize = 6;
    let rounds = if long() { 20_000 } else { 400 };
    let m = Machine::new(SmmuConfig::default());
    let dvm = Dvm::new(DvmConfig::new(PES).inbox_capacity(4), m.mem.clone());
    dvm.attach_smmu(m.smmu.clone());
    std::thread::scope(|s| {
        for i in 0..PES {
            let dvm = &dvm;
            s.spawn(move || {
                let vmid = 10 + i as u16;
                dvm.pes()[i].set_context(PeContext::guest(vmid, None));
                for round in 0..rounds {
                    for pe in dvm.pes() {
                        pe.tlb_insert(s1_entry(vmid, 1, (round % 64) << 12));
                        pe.tlb_insert(s1_entry(vmid, 2, (round % 64) << 12));
                    }
                    let insn = if round % 2 == 0 {
                        TlbiInsn::new(TlbiOp::Vmalle1is)
                    } else {
                        TlbiInsn::new(TlbiOp::Rvaae1is).with_addr(0).with_range(
                            twinmmu_hw::cmd::TlbiRange {
                                tg_shift: 12,
                                num: 31,
                                scale: 1,
                                ttl: 0,
                            },
                        )
                    };
                    dvm.tlbi(i, insn).unwrap();
                    if round % 3 == 0 {
                        // Batched: a second TLBI before the DSB.
                        dvm.tlbi(i, TlbiInsn::new(TlbiOp::Aside1is).with_asid(1))
                            .unwrap();
                    }
                    dvm.dsb(i).unwrap();
                    for pe in dvm.pes() {
                        let stale = pe
                            .tlb_entries()
                            .iter()
                            .filter(|e| e.ctx.vmid() == vmid)
                            .count();
                        assert_eq!(stale, 0, "PE {} kept VMID {vmid} entries", pe.id());
                    }
                }
            });
        }
    });
    let s = dvm.stats();
    assert!(s.pes.iter().all(|p| p.pending == 0));
    assert_eq!(s.smmus[0].received, s.broadcasts);
    let removed: u64 = s.pes.iter().map(|p| p.removed).sum();
    assert_eq!(removed, (PES * PES * 2 * rounds as usize) as u64);
}

/// Memory whose reads sometimes stall after returning their value, as a busy memory system
/// would: it widens the window between a walk reading a descriptor and inserting what it
/// read, where a missed invalidation would leave a stale entry.
struct SlowMem {
    inner: Arc<SparseMem>,
    reads: AtomicU64,
}

impl PhysMem for SlowMem {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), twinmmu_hw::MemError> {
        self.inner.read(pa, buf)
    }
    fn write(&self, pa: u64, buf: &[u8]) -> Result<(), twinmmu_hw::MemError> {
        self.inner.write(pa, buf)
    }
    fn read_u64(&self, pa: u64) -> Result<u64, twinmmu_hw::MemError> {
        let v = self.inner.read_u64(pa);
        if self.reads.fetch_add(1, Ordering::Relaxed).is_multiple_of(7) {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        v
    }
    fn is_valid(&self, pa: u64, len: u64) -> bool {
        self.inner.is_valid(pa, len)
    }
}

/// Stops the other threads however the scope's own closure ends (a panic included).
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

const IPA: u64 = 0x8000_0000;
const FRAMES: u64 = RAM + 0x400_0000;

fn s2_config(root: u64) -> Stage2Config {
    Stage2Config::new(
        &Stage2Params {
            s2ttb: root,
            s2t0sz: 24,
            s2sl0: 1,
            s2tg: Granule::Size4K.s2tg(),
            s2ps: PaSize::Bits48.encoding(),
            ..Default::default()
        },
        &Features::default(),
    )
    .unwrap()
}

/// One PE remaps an IPA to a new frame again and again (unmap, TLBI IPAS2E1IS, DSB, map)
/// while the others translate it: a translation that starts after a DSB completed never
/// returns a frame that DSB retired, and no TLB ends up holding one.
#[test]
fn no_translation_after_a_dsb_sees_what_it_retired() {
    const PES: usize = 4;
    let versions: u64 = if long() { 20_000 } else { 1_500 };
    let mem: Arc<SparseMem> = ram();
    let slow = Arc::new(SlowMem {
        inner: mem.clone(),
        reads: AtomicU64::new(0),
    });
    let dvm = Dvm::new(DvmConfig::new(PES), slow);
    let walk = WalkMem(&*mem);
    let fmt = TableFormat::stage2(Granule::Size4K, 40, 1, PaSize::Bits48).unwrap();
    let mut b = TableBuilder::new(
        fmt,
        &walk,
        twinmmu_vmsa::BumpAllocator::new(RAM + 0x100_0000, 0x40_0000),
    )
    .unwrap();
    let frame = |k: u64| FRAMES + k * 0x1000;
    b.map(IPA, frame(0), 0x1000, S2LeafAttrs::rw().bits())
        .unwrap();
    let cfg = s2_config(b.root());
    let published = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let checked = AtomicU64::new(0);
    std::thread::scope(|s| {
        for i in 1..PES {
            let (dvm, published, stop, checked) = (&dvm, &published, &stop, &checked);
            s.spawn(move || {
                let pe = &dvm.pes()[i];
                pe.set_context(PeContext::guest(5, Some(cfg)));
                let rd = Access::new(twinmmu_vmsa::AccessKind::Read, false);
                while !stop.load(Ordering::Acquire) {
                    let v = published.load(Ordering::Acquire);
                    match pe.translate(IPA + 0x10, rd) {
                        Ok(t) => {
                            let k = (t.pa - 0x10 - FRAMES) / 0x1000;
                            assert!(
                                k >= v,
                                "PE {i}: frame of version {k} after version {v} completed"
                            );
                        }
                        Err(f) => assert_eq!(f.fault.kind, FaultKind::Translation),
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // The remapping PE runs the hypervisor with VMID 5 in VTTBR_EL2 (KVM's
        // enter_vmid_context): IPAS2E1IS is an EL2 instruction.
        let _stop = StopOnDrop(&stop);
        let mut hyp = PeContext::host(true);
        hyp.vmid = 5;
        dvm.pes()[0].set_context(hyp);
        for k in 1..versions {
            b.unmap(IPA, 0x1000).unwrap();
            dvm.tlbi(0, TlbiInsn::new(TlbiOp::Ipas2e1is).with_addr(IPA))
                .unwrap();
            dvm.dsb(0).unwrap();
            b.map(IPA, frame(k), 0x1000, S2LeafAttrs::rw().bits())
                .unwrap();
            published.store(k, Ordering::Release);
            if k % 16 == 0 {
                std::thread::yield_now();
            }
        }
    });
    let last = frame(versions - 1);
    for pe in dvm.pes() {
        for e in pe.tlb_entries() {
            assert_eq!(e.out_base, last, "PE {} holds a retired frame", pe.id());
        }
    }
    assert!(checked.load(Ordering::Relaxed) > 0);
}
