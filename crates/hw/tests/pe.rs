//! The PE model: what each TLBI removes from a PE TLB (against a predicate written from the
//! architecture's description, not from `Tlbi::scope`), the regime rules of TLBI
//! instructions, and translation through the TLB (stage 1, stage 2, combined).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;
use twinmmu_hw::cmd::TlbiRange;
use twinmmu_hw::mem::WalkMem;
use twinmmu_hw::tlb::{Ctx, EntryPerms, Kind, TlbEntry, World};
use twinmmu_hw::{
    Dvm, DvmConfig, DvmError, PeConfig, PeContext, Regime, SparseMem, Tlbi, TlbiInsn, TlbiOp,
};
use twinmmu_vmsa::{
    Access, AccessKind, BumpAllocator, FaultKind, Features, Granule, MemError, Memory, MemoryMut,
    PaSize, S1LeafAttrs, S2LeafAttrs, Stage, Stage1Config, Stage1Params, Stage2Config,
    Stage2Params, TableBuilder, TableFormat, TtbParams,
};

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 0x1000_0000;

fn mem() -> Arc<SparseMem> {
    Arc::new(SparseMem::with_range(RAM, RAM_SIZE).unwrap())
}

fn entry(world: World, kind: Kind, vmid: u16, asid: Option<u16>, base: u64, shift: u8) -> TlbEntry {
    let base = base & !((1u64 << shift) - 1);
    TlbEntry {
        ctx: Ctx::new(world, kind, vmid, asid, false),
        in_base: base,
        shift,
        out_base: RAM + (base & 0xfff_f000),
        ipa_base: base,
        tg_shift: 12,
        perms: EntryPerms { s1: None, s2: None },
    }
}

/// Whether TLBI `t` removes `e` from a PE's TLB, from the text of DDI0487 D8.13 and
/// smmu_kvm.md §4.11 (EL2 entries carry VMID 0, and only stage-1 kinds exist there).
fn architecture_says(e: &TlbEntry, t: &Tlbi, vhe: bool) -> bool {
    use TlbiOp::*;
    let c = e.ctx;
    let addr = t.addr & !0xfff;
    let (start, end) = match t.range {
        Some(r) if t.op.is_range() => {
            let bytes = ((u128::from(r.num) + 1) << r.scale) << r.tg_shift;
            (
                addr,
                (u128::from(addr) + bytes).min(u128::from(u64::MAX)) as u64,
            )
        }
        _ => (addr, addr + 1),
    };
    let size = 1u64 << e.shift;
    let overlaps = e.in_base < end && e.in_base.saturating_add(size) > start;
    let el1 = c.world() == World::NsEl1;
    let s1_info = c.kind() != Kind::S2;
    let this_vmid = c.vmid() == t.vmid;
    let asid_or_global = c.asid().is_none() || c.asid() == Some(t.asid);
    match t.op {
        Vmalle1is => el1 && s1_info && this_vmid,
        Aside1is => el1 && s1_info && this_vmid && c.asid() == Some(t.asid),
        Vae1is | Vale1is | Rvae1is | Rvale1is => {
            el1 && s1_info && this_vmid && asid_or_global && overlaps
        }
        Vaae1is | Vaale1is | Rvaae1is | Rvaale1is => el1 && s1_info && this_vmid && overlaps,
        Ipas2e1is | Ipas2le1is | Ripas2e1is | Ripas2le1is => {
            el1 && c.kind() == Kind::S2 && this_vmid && overlaps
        }
        Vmalls12e1is => el1 && this_vmid,
        Alle1is => el1,
        Alle2is => !el1,
        Vae2is | Vale2is | Rvae2is | Rvale2is => {
            if vhe {
                c.world() == World::El2E2h && asid_or_global && overlaps
            } else {
                c.world() == World::El2 && overlaps
            }
        }
        Aside2is => c.world() == World::El2E2h && c.asid() == Some(t.asid),
        // By VA for every ASID: the EL2&0 world with E2H (any ASID, global or not), the
        // EL2 world without.
        Vaae2is | Vaale2is | Rvaae2is | Rvaale2is => {
            let world = if vhe { World::El2E2h } else { World::El2 };
            c.world() == world && overlaps
        }
    }
}

fn arb_entry() -> impl Strategy<Value = TlbEntry> {
    (
        0u8..4,
        0u16..3,
        proptest::option::of(0u16..3),
        0u64..48,
        prop_oneof![Just(12u8), Just(14u8), Just(16u8), Just(21u8)],
    )
        .prop_map(|(w, vmid, asid, page, shift)| {
            let (world, kind, vmid, asid) = match w {
                0 => (World::NsEl1, Kind::S1, vmid, asid),
                1 => (World::NsEl1, Kind::Nested, vmid, asid),
                2 => (World::NsEl1, Kind::S2, vmid, None),
                // EL2 regimes: VMID 0; EL2 (no E2H) has no ASIDs.
                _ if vmid % 2 == 0 => (World::El2, Kind::S1, 0, None),
                _ => (World::El2E2h, Kind::S1, 0, asid),
            };
            entry(world, kind, vmid, asid, page << 13, shift)
        })
}

fn arb_tlbi() -> impl Strategy<Value = Tlbi> {
    (
        0usize..TlbiOp::ALL.len(),
        0u16..3,
        0u16..3,
        0u64..(48 << 13),
        (
            0u8..32,
            0u8..4,
            prop_oneof![Just(12u8), Just(14u8), Just(16u8)],
        ),
    )
        .prop_map(|(op, vmid, asid, addr, (num, scale, tg_shift))| {
            let op = TlbiOp::ALL[op];
            let mut t = Tlbi::new(op, vmid).with_asid(asid).with_addr(addr);
            if op.is_range() {
                t = t.with_range(TlbiRange {
                    tg_shift,
                    num,
                    scale,
                    ttl: 0,
                });
            }
            t
        })
}

fn key(e: &TlbEntry) -> (Ctx, u64, u8) {
    (e.ctx, e.in_base, e.shift)
}

proptest! {
    /// Every TLBI op, on random entries of every kind and regime: a PE's local application
    /// removes exactly what the architecture says, and says how many.
    #[test]
    fn each_tlbi_removes_what_the_architecture_says(
        entries in proptest::collection::vec(arb_entry(), 1..80),
        t in arb_tlbi(),
        vhe in any::<bool>(),
    ) {
        let dvm = Dvm::new(DvmConfig::new(1).pe(PeConfig::default().vhe(vhe)), mem());
        let pe = &dvm.pes()[0];
        for e in &entries {
            pe.tlb_insert(*e);
        }
        let before = pe.tlb_entries();
        let mut want: Vec<_> = before
            .iter()
            .filter(|e| !architecture_says(e, &t, vhe))
            .map(key)
            .collect();
        let removed = pe.tlbi_local(&t);
        let mut got: Vec<_> = pe.tlb_entries().iter().map(key).collect();
        want.sort();
        got.sort();
        prop_assert_eq!(removed, before.len() - want.len());
        prop_assert_eq!(got, want);
    }
}

/// One entry per (world, kind) for VMIDs 1 and 2, ASIDs 1 and 2, and globals.
fn populate(pe: &twinmmu_hw::Pe) {
    for vmid in [1u16, 2] {
        for asid in [Some(1u16), Some(2), None] {
            pe.tlb_insert(entry(World::NsEl1, Kind::S1, vmid, asid, 0x1000, 12));
            pe.tlb_insert(entry(World::NsEl1, Kind::Nested, vmid, asid, 0x2000, 12));
        }
        pe.tlb_insert(entry(World::NsEl1, Kind::S2, vmid, None, 0x1000, 12));
    }
    pe.tlb_insert(entry(World::El2, Kind::S1, 0, None, 0x1000, 12));
    pe.tlb_insert(entry(World::El2E2h, Kind::S1, 0, Some(1), 0x1000, 12));
}

#[test]
fn counts_per_op_on_a_known_tlb() {
    let dvm = Dvm::new(DvmConfig::new(1), mem());
    let pe = &dvm.pes()[0];
    let cases: [(Tlbi, usize); 10] = [
        // S1 + nested of VMID 1, all ASIDs and globals: 3 + 3.
        (Tlbi::new(TlbiOp::Vmalle1is, 1), 6),
        // Non-global ASID 2 of VMID 1: one S1, one nested.
        (Tlbi::new(TlbiOp::Aside1is, 1).with_asid(2), 2),
        // VA 0x1000, ASID 1 or global, VMID 1: S1 only (nested are at 0x2000).
        (
            Tlbi::new(TlbiOp::Vae1is, 1).with_asid(1).with_addr(0x1000),
            2,
        ),
        // All ASIDs at 0x2000: the three nested entries.
        (Tlbi::new(TlbiOp::Vaae1is, 1).with_addr(0x2000), 3),
        // Stage 2 only: the S2 entry at 0x1000, not the S1 ones at the same address.
        (Tlbi::new(TlbiOp::Ipas2e1is, 1).with_addr(0x1000), 1),
        // Everything of VMID 1: 3 + 3 + 1.
        (Tlbi::new(TlbiOp::Vmalls12e1is, 1), 7),
        // Every NS-EL1 entry of every VMID.
        (Tlbi::new(TlbiOp::Alle1is, 0), 14),
        // Both EL2 regimes.
        (Tlbi::new(TlbiOp::Alle2is, 0), 2),
        // VHE: EL2&0 by ASID 1 or global.
        (
            Tlbi::new(TlbiOp::Vae2is, 0).with_asid(1).with_addr(0x1000),
            1,
        ),
        (Tlbi::new(TlbiOp::Aside2is, 0).with_asid(1), 1),
    ];
    for (t, n) in cases {
        pe.tlbi_local(&t);
        pe.tlbi_local(&Tlbi::new(TlbiOp::Alle1is, 0));
        pe.tlbi_local(&Tlbi::new(TlbiOp::Alle2is, 0));
        populate(pe);
        assert_eq!(pe.tlb_len(), 16);
        assert_eq!(pe.tlbi_local(&t), n, "{t:?}");
    }
}

#[test]
fn tlbi_instructions_follow_the_regime() {
    let dvm = Dvm::new(DvmConfig::new(2), mem());
    let pe = &dvm.pes()[0];
    // A guest (EL1&0, VMID 9): EL1 forms carry VMID 9; EL2 forms are UNDEFINED.
    pe.set_context(PeContext::guest(9, None));
    let t = dvm
        .tlbi(
            0,
            TlbiInsn::new(TlbiOp::Vae1is).with_asid(3).with_addr(0x5000),
        )
        .unwrap();
    assert_eq!(
        (t.op, t.vmid, t.asid, t.addr),
        (TlbiOp::Vae1is, 9, 3, 0x5000)
    );
    for op in [
        TlbiOp::Ipas2e1is,
        TlbiOp::Vmalls12e1is,
        TlbiOp::Alle1is,
        TlbiOp::Alle2is,
        TlbiOp::Vae2is,
        TlbiOp::Vaae2is,
    ] {
        assert_eq!(
            dvm.tlbi(0, TlbiInsn::new(op)),
            Err(DvmError::Undefined {
                op,
                regime: Regime::El1
            })
        );
    }
    // A VHE host: the EL1 forms act on EL2&0.
    pe.set_context(PeContext::host(true));
    let t = dvm
        .tlbi(
            0,
            TlbiInsn::new(TlbiOp::Vae1is).with_asid(4).with_addr(0x7000),
        )
        .unwrap();
    assert_eq!((t.op, t.asid), (TlbiOp::Vae2is, 4));
    assert_eq!(
        dvm.tlbi(0, TlbiInsn::new(TlbiOp::Aside1is).with_asid(4))
            .unwrap()
            .op,
        TlbiOp::Aside2is
    );
    // By VA for all ASIDs: the EL2&0 forms, not ALLE2IS (which would over-invalidate).
    let r = TlbiRange {
        tg_shift: 12,
        num: 3,
        scale: 0,
        ttl: 0,
    };
    for (op, el2) in [
        (TlbiInsn::new(TlbiOp::Vaae1is), TlbiOp::Vaae2is),
        (TlbiInsn::new(TlbiOp::Vaale1is), TlbiOp::Vaale2is),
        (
            TlbiInsn::new(TlbiOp::Rvaae1is).with_range(r),
            TlbiOp::Rvaae2is,
        ),
        (
            TlbiInsn::new(TlbiOp::Rvaale1is).with_range(r),
            TlbiOp::Rvaale2is,
        ),
    ] {
        let t = dvm.tlbi(0, op.with_addr(0x7000)).unwrap();
        assert_eq!((t.op, t.addr), (el2, 0x7000));
    }
    assert_eq!(
        dvm.tlbi(0, TlbiInsn::new(TlbiOp::Vmalle1is)).unwrap().op,
        TlbiOp::Alle2is
    );
    // ... and may issue stage-2 maintenance with VTTBR's VMID.
    let mut ctx = PeContext::host(true);
    ctx.vmid = 12;
    pe.set_context(ctx);
    let t = dvm
        .tlbi(0, TlbiInsn::new(TlbiOp::Ipas2e1is).with_addr(0x9000))
        .unwrap();
    assert_eq!((t.op, t.vmid), (TlbiOp::Ipas2e1is, 12));
    // An nVHE host kernel is EL1&0 with VMID 0.
    let dvm = Dvm::new(DvmConfig::new(1).pe(PeConfig::default().vhe(false)), mem());
    let t = dvm.tlbi(0, TlbiInsn::new(TlbiOp::Vmalle1is)).unwrap();
    assert_eq!((t.op, t.vmid), (TlbiOp::Vmalle1is, 0));
    // Range forms need FEAT_TLBIRANGE and a well-formed range.
    let r = TlbiRange {
        tg_shift: 12,
        num: 3,
        scale: 1,
        ttl: 0,
    };
    assert_eq!(
        dvm.tlbi(0, TlbiInsn::new(TlbiOp::Rvae1is)),
        Err(DvmError::RangeOperand {
            op: TlbiOp::Rvae1is
        })
    );
    assert!(
        dvm.tlbi(0, TlbiInsn::new(TlbiOp::Rvae1is).with_range(r))
            .is_ok()
    );
    let bad = TlbiRange { scale: 200, ..r };
    assert_eq!(
        dvm.tlbi(0, TlbiInsn::new(TlbiOp::Rvae1is).with_range(bad)),
        Err(DvmError::BadRange {
            op: TlbiOp::Rvae1is,
            range: bad
        })
    );
    let norange = Dvm::new(
        DvmConfig::new(1).pe(PeConfig::default().tlbi_range(false)),
        mem(),
    );
    assert!(matches!(
        norange.tlbi(0, TlbiInsn::new(TlbiOp::Rvae1is).with_range(r)),
        Err(DvmError::Undefined { .. })
    ));
    assert_eq!(
        dvm.tlbi(5, TlbiInsn::new(TlbiOp::Vmalle1is)),
        Err(DvmError::NoSuchPe { pe: 5, count: 1 })
    );
}

/// Guest memory at IPA `IPA0` = host `RAM` (a fixed offset), for building tables by IPA.
struct Ipa<'a>(&'a SparseMem);
const IPA0: u64 = 0x8000_0000;
impl Memory for Ipa<'_> {
    fn read_u64(&self, ipa: u64) -> Result<u64, MemError> {
        Memory::read_u64(self.0, ipa - IPA0 + RAM)
    }
}
impl MemoryMut for Ipa<'_> {
    fn write_u64(&self, ipa: u64, v: u64) -> Result<(), MemError> {
        MemoryMut::write_u64(self.0, ipa - IPA0 + RAM, v)
    }
}

/// A 4K-granule, 48-bit stage 1 with TTB0 at `ttb` (TTB1 disabled).
fn s1_config(ttb: u64) -> Stage1Config {
    Stage1Config::new(
        &Stage1Params {
            ttb: [
                TtbParams {
                    ttb,
                    tsz: 16,
                    tg: Granule::Size4K.tg0(),
                    ..Default::default()
                },
                TtbParams {
                    epd: true,
                    ..Default::default()
                },
            ],
            ips: PaSize::Bits48.encoding(),
            ..Default::default()
        },
        &Features::default(),
    )
    .unwrap()
}

/// A 4K-granule stage 2 of 40-bit IPAs from level 1, tables at `root`.
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

/// A stage 2 mapping IPA0.. → RAM (40-bit IPA, 4K, start level 1) and a guest stage 1 in
/// guest memory mapping VA 0x10_0000 (4 pages) to IPA0 + 0x80_0000.
fn guest_tables(m: &SparseMem) -> (Stage2Config, Stage1Config, u64) {
    let walk = WalkMem(m);
    let fmt = TableFormat::stage2(Granule::Size4K, 40, 1, PaSize::Bits48).unwrap();
    let mut s2 =
        TableBuilder::new(fmt, &walk, BumpAllocator::new(RAM + 0xf00_0000, 0x40_0000)).unwrap();
    s2.map(IPA0, RAM, 0x200_0000, S2LeafAttrs::rw().bits())
        .unwrap();
    let s2cfg = s2_config(s2.root());
    let fmt1 = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
    let mut s1 = TableBuilder::new(
        fmt1,
        Ipa(m),
        BumpAllocator::new(IPA0 + 0x100_0000, 0x40_0000),
    )
    .unwrap();
    let data_ipa = IPA0 + 0x80_0000;
    let attrs = S1LeafAttrs {
        not_global: true,
        ..S1LeafAttrs::rw()
    };
    s1.map(0x10_0000, data_ipa, 0x4000, attrs.bits()).unwrap();
    let s1cfg = s1_config(s1.root());
    (s2cfg, s1cfg, data_ipa - IPA0 + RAM)
}

#[test]
fn translation_through_the_tlb_by_kind() {
    let m = mem();
    let (s2, s1, data_pa) = guest_tables(&m);
    let dvm = Dvm::new(DvmConfig::new(1), m.clone());
    let pe = &dvm.pes()[0];
    let rd = Access::new(AccessKind::Read, true);

    // Stage 2 only: IPA → PA, cached as an S2 entry of the VMID.
    pe.set_context(PeContext::guest(7, Some(s2)));
    let t = pe.translate(IPA0 + 0x1234, rd).unwrap();
    assert_eq!(
        (t.pa, t.tlb_hit, t.kind),
        (RAM + 0x1234, false, Some(Kind::S2))
    );
    assert!(pe.translate(IPA0 + 0x1008, rd).unwrap().tlb_hit);
    let e = pe.tlb_entries();
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].ctx.vmid(), e[0].ctx.kind()), (7, Kind::S2));
    // Outside the stage 2: a stage-2 Translation fault with the IPA.
    let f = pe.translate(IPA0 + 0x300_0000, rd).unwrap_err();
    assert_eq!(
        (f.fault.kind, f.fault.stage, f.ipa),
        (
            FaultKind::Translation,
            Stage::Stage2,
            Some(IPA0 + 0x300_0000)
        )
    );

    // Nested: a combined entry tagged (VMID 7, ASID 3), plus the S2 entries of the walk.
    pe.set_context(PeContext::guest(7, Some(s2)).with_stage1(Some(s1), 3));
    let t = pe.translate(0x10_2010, rd).unwrap();
    assert_eq!((t.pa, t.kind), (data_pa + 0x2010, Some(Kind::Nested)));
    let nested: Vec<_> = pe
        .tlb_entries()
        .into_iter()
        .filter(|e| e.ctx.kind() == Kind::Nested)
        .collect();
    assert_eq!(nested.len(), 1);
    assert_eq!(
        (nested[0].ctx.vmid(), nested[0].ctx.asid(), nested[0].shift),
        (7, Some(3), 12),
        "combined size = min(4K page, 2M block)"
    );
    assert!(pe.translate(0x10_2ff8, rd).unwrap().tlb_hit);
    // Another ASID misses (and walks again).
    pe.set_context(PeContext::guest(7, Some(s2)).with_stage1(Some(s1), 4));
    assert!(!pe.translate(0x10_2010, rd).unwrap().tlb_hit);

    // IPAS2E1IS removes stage-2 entries only: the combined entry keeps translating — the
    // reason KVM follows it with VMALLE1IS.
    let ipa = IPA0 + 0x80_2000;
    assert_eq!(
        pe.tlbi_local(&Tlbi::new(TlbiOp::Ipas2e1is, 7).with_addr(ipa)),
        1
    );
    assert!(pe.translate(0x10_2010, rd).unwrap().tlb_hit);
    assert_eq!(pe.tlbi_local(&Tlbi::new(TlbiOp::Vmalle1is, 7)), 2);
    assert!(!pe.translate(0x10_2010, rd).unwrap().tlb_hit);

    // Another VMID's context does not hit VMID 7's entries.
    pe.set_context(PeContext::guest(8, Some(s2)).with_stage1(Some(s1), 4));
    assert!(!pe.translate(0x10_2010, rd).unwrap().tlb_hit);

    // Stage 1 only, at EL2&0 (VHE host): tagged EL2&0, VMID 0, by ASID.
    let host = PeContext::host(true).with_stage1(Some(s1_phys(&m)), 5);
    pe.set_context(host);
    let t = pe.translate(0x20_0040, rd).unwrap();
    assert_eq!((t.pa, t.kind), (RAM + 0x40_0040, Some(Kind::S1)));
    assert!(
        pe.tlb_entries()
            .iter()
            .any(|e| e.ctx.world() == World::El2E2h && e.ctx.asid() == Some(5))
    );
    // MMU off: flat.
    pe.set_context(PeContext::host(true));
    assert_eq!(pe.translate(RAM + 8, rd).unwrap().kind, None);
}

/// Host stage 1 (tables at physical addresses): VA 0x20_0000 → RAM + 0x40_0000.
fn s1_phys(m: &SparseMem) -> Stage1Config {
    let walk = WalkMem(m);
    let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
    let mut b =
        TableBuilder::new(fmt, &walk, BumpAllocator::new(RAM + 0xe00_0000, 0x40_0000)).unwrap();
    let attrs = S1LeafAttrs {
        not_global: true,
        ..S1LeafAttrs::rw()
    };
    b.map(0x20_0000, RAM + 0x40_0000, 0x1000, attrs.bits())
        .unwrap();
    s1_config(b.root())
}

#[test]
fn permissions_are_checked_on_hits_too() {
    let m = mem();
    let walk = WalkMem(&*m);
    let fmt = TableFormat::stage2(Granule::Size4K, 40, 1, PaSize::Bits48).unwrap();
    let mut s2 =
        TableBuilder::new(fmt, &walk, BumpAllocator::new(RAM + 0xf00_0000, 0x40_0000)).unwrap();
    let ro = S2LeafAttrs {
        write: false,
        ..S2LeafAttrs::rw()
    };
    s2.map(IPA0, RAM, 0x1000, ro.bits()).unwrap();
    let cfg = Stage2Config::new(
        &Stage2Params {
            s2ttb: s2.root(),
            s2t0sz: 24,
            s2sl0: 1,
            s2tg: 0,
            s2ps: PaSize::Bits48.encoding(),
            ..Default::default()
        },
        &Features::default(),
    )
    .unwrap();
    let dvm = Dvm::new(DvmConfig::new(1), m.clone());
    let pe = &dvm.pes()[0];
    pe.set_context(PeContext::guest(1, Some(cfg)));
    assert!(
        pe.translate(IPA0, Access::new(AccessKind::Read, true))
            .is_ok()
    );
    for _ in 0..2 {
        let f = pe
            .translate(IPA0 + 8, Access::new(AccessKind::Write, true))
            .unwrap_err();
        assert_eq!(
            (f.fault.kind, f.fault.stage),
            (FaultKind::Permission, Stage::Stage2)
        );
    }
    assert_eq!(pe.stats().tlb_hits, 2, "the write faults were TLB hits");
}

/// A stage-1 Permission fault is found on the final stage-1 descriptor, before stage 2
/// translates the output IPA, so it is the fault reported when that IPA would also fault
/// at stage 2 (DDI0487 fault prioritisation, as IHI0070 7.3.22 for the SMMU): on a walk
/// (output IPA unmapped at stage 2) and on a hit of a combined entry (stage 2 read-only).
#[test]
fn stage1_permission_fault_comes_before_stage2_of_the_output() {
    let m = mem();
    let walk = WalkMem(&*m);
    let fmt = TableFormat::stage2(Granule::Size4K, 40, 1, PaSize::Bits48).unwrap();
    let mut s2 =
        TableBuilder::new(fmt, &walk, BumpAllocator::new(RAM + 0xf00_0000, 0x40_0000)).unwrap();
    s2.map(IPA0, RAM, 0x200_0000, S2LeafAttrs::rw().bits())
        .unwrap();
    let s2_ro = S2LeafAttrs {
        write: false,
        ..S2LeafAttrs::rw()
    };
    s2.map(IPA0 + 0x200_0000, RAM + 0x300_0000, 0x1000, s2_ro.bits())
        .unwrap();
    let s2cfg = s2_config(s2.root());
    let fmt1 = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
    let mut s1 = TableBuilder::new(
        fmt1,
        Ipa(&m),
        BumpAllocator::new(IPA0 + 0x100_0000, 0x40_0000),
    )
    .unwrap();
    let s1_ro = S1LeafAttrs {
        not_global: true,
        read_only: true,
        ..S1LeafAttrs::rw()
    };
    // VA 0x10_0000 → an IPA stage 2 does not map; VA 0x10_1000 → the read-only IPA page.
    s1.map(0x10_0000, IPA0 + 0x400_0000, 0x1000, s1_ro.bits())
        .unwrap();
    s1.map(0x10_1000, IPA0 + 0x200_0000, 0x1000, s1_ro.bits())
        .unwrap();
    let s1cfg = s1_config(s1.root());
    let dvm = Dvm::new(DvmConfig::new(1), m.clone());
    let pe = &dvm.pes()[0];
    pe.set_context(PeContext::guest(2, Some(s2cfg)).with_stage1(Some(s1cfg), 1));
    let rd = Access::new(AccessKind::Read, true);
    let wr = Access::new(AccessKind::Write, true);

    // A read: stage 1 grants it; stage 2 of the output IPA faults.
    let f = pe.translate(0x10_0010, rd).unwrap_err();
    assert_eq!(
        (f.fault.kind, f.fault.stage, f.ipa),
        (
            FaultKind::Translation,
            Stage::Stage2,
            Some(IPA0 + 0x400_0010)
        )
    );
    // A write, on a walk: the stage-1 Permission fault, and no stage-2 walk of the output.
    let before = pe.stats();
    let f = pe.translate(0x10_0010, wr).unwrap_err();
    let after = pe.stats();
    assert_eq!(
        (f.fault.kind, f.fault.stage, f.ipa),
        (FaultKind::Permission, Stage::Stage1, None)
    );
    assert_eq!(after.walks_s1 - before.walks_s1, 1);
    assert_eq!(after.walks_s2, before.walks_s2, "output IPA not walked");

    // A write, on a hit of the combined entry whose stage 2 is read-only too: stage 1.
    assert!(pe.translate(0x10_1010, rd).is_ok());
    let f = pe.translate(0x10_1010, wr).unwrap_err();
    assert_eq!(
        (f.fault.kind, f.fault.stage, f.ipa),
        (FaultKind::Permission, Stage::Stage1, None)
    );
    assert!(pe.translate(0x10_1010, rd).unwrap().tlb_hit);
}
