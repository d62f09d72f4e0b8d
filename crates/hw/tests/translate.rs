//! qtest-style integration tests: tables in memory → registers → DMA → bytes, for stage 1,
//! stage 2 and nested translation with each granule, with both stream-table formats.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_hw::ste::SteDw0;
use twinmmu_hw::{AccessKind, Outcome, PhysMem, SmmuConfig, Transaction};
use twinmmu_vmsa::{
    BumpAllocator, Granule, MemError, Memory, MemoryMut, PaSize, S2LeafAttrs, TableBuilder,
    TableFormat,
};

const GRANULES: [Granule; 3] = [Granule::Size4K, Granule::Size16K, Granule::Size64K];
const IOVA: u64 = 0x7f12_3400_0000;

fn check_bytes(m: &Machine, sid: u32, ssid: Option<u32>, iova: u64, pa: u64, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    m.smmu.dma_write(sid, ssid, iova, &data, false).unwrap();
    let mut back = vec![0u8; len];
    m.mem.read(pa, &mut back).unwrap();
    assert_eq!(back, data, "bytes landed at the PA");
    let mut via = vec![0u8; len];
    m.smmu.dma_read(sid, ssid, iova, &mut via, false).unwrap();
    assert_eq!(via, data, "read back through the SMMU");
    // And through a DMA port (micro-TLB).
    let mut port = m.smmu.port();
    let mut via2 = vec![0u8; len];
    port.dma_read(sid, ssid, iova, &mut via2, false).unwrap();
    assert_eq!(via2, data);
    port.dma_read(sid, ssid, iova, &mut via2, false).unwrap();
    assert_eq!(via2, data);
}

#[test]
fn stage1_each_granule_both_stream_table_formats() {
    for two_level in [false, true] {
        for g in GRANULES {
            let mut m = Machine::new(SmmuConfig::default());
            m.bring_up(two_level);
            let gs = g.size();
            let mem = m.mem.clone();
            let mut b = s1_builder(&mem, m.alloc(0x40_0000), g, 48);
            let pa = DATA + 4 * gs;
            b.map(IOVA, pa, 4 * gs, urw()).unwrap();
            let cd = CDS;
            m.write_cd(cd, &s1_cd(g, 48, b.root(), 7));
            let sid = 0x123;
            m.set_ste(sid, &s1_ste(cd, 0, 1));
            assert!(m.cmdq_idle());
            check_bytes(&m, sid, None, IOVA + 0x10, pa + 0x10, 3 * gs as usize);
            match m.smmu.translate(Transaction::new(
                sid,
                None,
                IOVA + gs + 5,
                AccessKind::Read,
                false,
            )) {
                Outcome::Translated { pa: out } => assert_eq!(out, pa + gs + 5),
                o => panic!("{g:?}: {o:?}"),
            }
            assert!(m.events().is_empty(), "no events for good translations");
        }
    }
}

#[test]
fn stage2_each_granule() {
    for g in GRANULES {
        let mut m = Machine::new(SmmuConfig::default());
        let (ia, start) = match g {
            Granule::Size4K => (40, 1),
            Granule::Size16K => (40, 1),
            Granule::Size64K => (40, 2),
        };
        let gs = g.size();
        let mem = m.mem.clone();
        let mut b = s2_builder(&mem, m.alloc(0x40_0000), g, ia, start);
        let ipa = 0x80_0000_0000 & ((1u64 << ia) - 1) | 0x12_0000_0000;
        let pa = DATA + 2 * gs;
        b.map(ipa, pa, 4 * gs, S2LeafAttrs::rw().bits()).unwrap();
        let sid = 9;
        m.set_ste(sid, &s2_ste(g, ia, start, b.root(), 3));
        check_bytes(&m, sid, None, ipa + 8, pa + 8, 2 * gs as usize);
    }
}

/// Stage-1 table memory addressed by IPA: the builder writes through the stage-2 mapping
/// IPA_BASE + x → RAM + x.
struct Ipa<'a>(&'a twinmmu_hw::SparseMem);
const IPA_BASE: u64 = 0x80_0000_0000;
impl Memory for Ipa<'_> {
    fn read_u64(&self, ipa: u64) -> Result<u64, MemError> {
        Memory::read_u64(self.0, ipa - IPA_BASE + RAM)
    }
}
impl MemoryMut for Ipa<'_> {
    fn write_u64(&self, ipa: u64, v: u64) -> Result<(), MemError> {
        MemoryMut::write_u64(self.0, ipa - IPA_BASE + RAM, v)
    }
}

pub fn nested_machine(g: Granule) -> (Machine, u32, u64, u64) {
    let mut m = Machine::new(SmmuConfig::default());
    // Stage 2: IPA_BASE.. (40-bit IPA space) → RAM, 256 MiB.
    let ia2 = 40;
    let start2 = if g == Granule::Size64K { 2 } else { 1 };
    let mem = m.mem.clone();
    let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), g, ia2, start2);
    s2.map(
        IPA_BASE & ((1 << ia2) - 1),
        RAM,
        RAM_SIZE,
        S2LeafAttrs::rw().bits(),
    )
    .unwrap();
    let s2_root = s2.root();
    drop(s2);
    // Stage 1 tables live in guest memory (allocated by IPA).
    let tables_ipa = IPA_BASE + (TABLES - RAM) + 0x800_0000;
    let fmt = TableFormat::stage1(g, 48, PaSize::Bits48).unwrap();
    let mut s1 =
        TableBuilder::new(fmt, Ipa(&m.mem), BumpAllocator::new(tables_ipa, 0x40_0000)).unwrap();
    let gs = g.size();
    let data_ipa = IPA_BASE + (DATA - RAM);
    s1.map(IOVA, data_ipa + 2 * gs, 4 * gs, urw()).unwrap();
    let cd_ipa = IPA_BASE + (CDS - RAM);
    m.write_cd(CDS, &s1_cd(g, 48, s1.root(), 5));
    let sid = 0x42;
    let mut ste = s2_ste(g, ia2, start2, s2_root, 11);
    ste.dw0 = SteDw0::new()
        .with_v(true)
        .with_config(0b111)
        .with_s1_context_ptr(cd_ipa >> 6);
    m.set_ste(sid, &ste);
    (m, sid, DATA + 2 * gs, gs)
}

#[test]
fn nested_each_granule() {
    for g in GRANULES {
        let (m, sid, pa, gs) = nested_machine(g);
        check_bytes(&m, sid, None, IOVA + 0x40, pa + 0x40, 2 * gs as usize);
        let st = m.smmu.stats();
        assert!(st.walks_s1 >= 1 && st.walks_s2 >= 1, "{st:?}");
        // The combined entry is cached as a nested entry.
        assert!(
            m.smmu
                .tlb_entries()
                .iter()
                .any(|e| e.ctx.kind() == twinmmu_hw::tlb::Kind::Nested)
        );
    }
}

#[test]
fn gbpa_bypass_and_abort_while_disabled() {
    let m = Machine::new(SmmuConfig::default());
    m.w32(twinmmu_hw::regs::off::CR0, 0b1100);
    let t = Transaction::new(1, None, DATA, AccessKind::Write, false);
    assert_eq!(m.smmu.translate(t), Outcome::Translated { pa: DATA });
    // GBPA.ABORT only takes effect with UPDATE.
    m.w32(twinmmu_hw::regs::off::GBPA, 1 << 20);
    assert_eq!(m.smmu.translate(t), Outcome::Translated { pa: DATA });
    m.w32(twinmmu_hw::regs::off::GBPA, (1 << 20) | (1 << 31));
    assert_eq!(
        m.r32(twinmmu_hw::regs::off::GBPA) >> 31,
        0,
        "UPDATE completes"
    );
    assert_eq!(m.smmu.translate(t), Outcome::Abort);
    assert!(m.events().is_empty());
}

#[test]
fn ste_bypass_and_abort() {
    let m = Machine::new(SmmuConfig::default());
    let mut ste = s1_ste(0, 0, 0);
    ste.dw0 = SteDw0::new().with_v(true).with_config(0b100);
    m.set_ste(4, &ste);
    let t = Transaction::new(4, None, DATA + 8, AccessKind::Read, false);
    assert_eq!(m.smmu.translate(t), Outcome::Translated { pa: DATA + 8 });
    ste.dw0 = SteDw0::new().with_v(true).with_config(0b000);
    m.set_ste(4, &ste);
    assert_eq!(m.smmu.translate(t), Outcome::Abort);
    assert!(m.events().is_empty(), "STE abort records nothing");
}

#[test]
fn descriptor_reads_are_counted_per_level_exactly() {
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(0x1000, DATA, 0x1000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 1));
    m.set_ste(1, &s1_ste(CDS, 0, 1));
    let t = |va| Transaction::new(1, None, va, AccessKind::Read, false);
    // A 4-level walk: one read at each level.
    assert!(matches!(
        m.smmu.translate(t(0x1000)),
        Outcome::Translated { .. }
    ));
    assert_eq!(m.smmu.stats().desc_reads, [[1, 1, 1, 1], [0; 4]]);
    // An invalid level-0 descriptor: one read, at level 0.
    assert!(matches!(
        m.smmu.translate(t(1 << 40)),
        Outcome::Fault { .. }
    ));
    assert_eq!(m.smmu.stats().desc_reads, [[2, 1, 1, 1], [0; 4]]);
    // Outside the 48-bit range: a level-0 Translation fault before any read.
    assert!(matches!(
        m.smmu.translate(t(1 << 50)),
        Outcome::Fault { .. }
    ));
    assert_eq!(m.smmu.stats().desc_reads, [[2, 1, 1, 1], [0; 4]]);

    // Nested (4K S2 from level 0, identity): the CD fetch and each of the 4 S1 table
    // addresses take a 4-read S2 walk; the S1 output one more; 4 S1 reads.
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48, 0);
    let s1_tables = m.alloc(0x40_0000);
    s2.map(s1_tables, s1_tables, 0x40_0000, S2LeafAttrs::rw().bits())
        .unwrap();
    s2.map(CDS, CDS, 0x1000, S2LeafAttrs::rw().bits()).unwrap();
    s2.map(DATA, DATA, 0x1000, S2LeafAttrs::rw().bits())
        .unwrap();
    let mut s1 = s1_builder(&mem, s1_tables, Granule::Size4K, 48);
    s1.map(0x1000, DATA, 0x1000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, s1.root(), 1));
    let mut ste = s2_ste(Granule::Size4K, 48, 0, s2.root(), 3);
    ste.dw0 = SteDw0::new()
        .with_v(true)
        .with_config(0b111)
        .with_s1_context_ptr(CDS >> 6);
    m.set_ste(1, &ste);
    assert!(matches!(m.smmu.translate(t(0x1000)), Outcome::Translated { pa } if pa == DATA));
    let st = m.smmu.stats();
    assert_eq!(st.desc_reads[0], [1, 1, 1, 1]);
    // S2 walks for the CD page, the S1 table pages (the builder maps their 4 MiB with 2 MiB
    // blocks, so they share S2 entries and end at level 2) and the output page (level 3):
    // one read per level down to where each walk ended.
    assert_eq!(st.walks_s2, 3);
    assert_eq!(st.desc_reads[1], [3, 3, 3, 2]);

    // A stage-2 fault on the level-2 table's IPA: stage 1 read levels 0 and 1 before it.
    let mut m = Machine::new(SmmuConfig::default());
    let mem = m.mem.clone();
    let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48, 0);
    let s1_tables = m.alloc(0x40_0000);
    let mut s1 = s1_builder(&mem, s1_tables, Granule::Size4K, 48);
    s1.map(0x1000, DATA, 0x1000, urw()).unwrap();
    // The builder took the root, then the level-1, -2 and -3 tables, in that order.
    s2.map(s1_tables, s1_tables, 0x2000, S2LeafAttrs::rw().bits())
        .unwrap();
    s2.map(CDS, CDS, 0x1000, S2LeafAttrs::rw().bits()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, s1.root(), 1));
    let mut ste = s2_ste(Granule::Size4K, 48, 0, s2.root(), 3);
    ste.dw0 = SteDw0::new()
        .with_v(true)
        .with_config(0b111)
        .with_s1_context_ptr(CDS >> 6);
    m.set_ste(1, &ste);
    assert!(matches!(
        m.smmu.translate(t(0x1000)),
        Outcome::Fault {
            event: twinmmu_hw::EventType::FTranslation,
            ..
        }
    ));
    let st = m.smmu.stats();
    assert_eq!(st.desc_reads[0], [1, 1, 0, 0]);
    // The CD, the root, the level-1 table and the failing level-2 table IPA.
    assert_eq!(st.walks_s2, 4);
    assert_eq!(st.desc_reads[1], [4, 4, 4, 4]);
}

#[test]
fn entries_hit_through_the_lock_free_path_get_their_clock_second_chance() {
    let mut m = Machine::new(SmmuConfig {
        tlb_capacity: 8,
        ..SmmuConfig::default()
    });
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    for p in 0..16u64 {
        b.map(0x10_0000 + p * 0x1000, DATA + p * 0x1000, 0x1000, urw())
            .unwrap();
    }
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 1));
    m.set_ste(1, &s1_ste(CDS, 0, 1));
    let t = |p: u64| {
        m.smmu.translate(Transaction::new(
            1,
            None,
            0x10_0000 + p * 0x1000,
            AccessKind::Read,
            false,
        ))
    };
    for p in 0..8 {
        assert!(matches!(t(p), Outcome::Translated { .. }));
    }
    // Page 0 is hot, served by the hit path only.
    for _ in 0..4 {
        assert!(matches!(t(0), Outcome::Translated { .. }));
    }
    // Four new pages: CLOCK evicts four entries, not the hot one.
    for p in 8..12 {
        assert!(matches!(t(p), Outcome::Translated { .. }));
    }
    assert_eq!(m.smmu.stats().tlb_entries, 8);
    let walks = m.smmu.stats().walks_s1;
    assert!(matches!(t(0), Outcome::Translated { pa } if pa == DATA));
    assert_eq!(m.smmu.stats().walks_s1, walks, "page 0 was still cached");
    assert!(matches!(t(1), Outcome::Translated { .. }));
    assert_eq!(
        m.smmu.stats().walks_s1,
        walks + 1,
        "page 1 had been evicted"
    );
}

/// The lock-free lookup array gives up entries the store keeps when a set is full (dead
/// slots of contexts dropped whole fill sets over time). The slow path skips the store
/// when the array answers for a whole context; once a context has lost an entry that way
/// its misses go to the store again, so a cached translation is still a TLB hit, not a
/// second walk.
#[test]
fn entries_the_lookup_array_gave_up_still_hit_in_the_store() {
    let mut m = Machine::new(SmmuConfig {
        tlb_capacity: 64,
        ..SmmuConfig::default()
    });
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(0x10_0000, DATA, 64 * 0x1000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 1));
    m.set_ste(1, &s1_ste(CDS, 0, 1));
    let t = |p: u64| {
        let o = m.smmu.translate(Transaction::new(
            1,
            None,
            0x10_0000 + p * 0x1000,
            AccessKind::Read,
            false,
        ));
        assert_eq!(
            o,
            Outcome::Translated {
                pa: DATA + p * 0x1000
            }
        );
    };
    // Rounds of 64 (global) entries, each dropped whole by VMID: the array (128 slots) fills with
    // the dead slots of retired contexts, and the third round's inserts give up live
    // entries as well as dead ones (with this hash, one).
    for _ in 0..2 {
        for p in 0..64 {
            t(p);
        }
        m.submit(&[
            twinmmu_hw::cmd::build::tlbi_nh_all(1),
            twinmmu_hw::cmd::build::sync(),
        ]);
        assert_eq!(m.smmu.stats().tlb_entries, 0);
    }
    for p in 0..64 {
        t(p);
    }
    let before = m.smmu.stats();
    assert_eq!(before.tlb_entries, 64);
    for _ in 0..2 {
        for p in 0..64 {
            t(p);
        }
    }
    let after = m.smmu.stats();
    assert_eq!(after.walks_s1, before.walks_s1, "every page still cached");
    assert_eq!(after.tlb_hits - before.tlb_hits, 128);
}

/// An entry hot only in a micro-TLB (every access a `DmaPort` hit, none reaching the main
/// TLB) still gets CLOCK's second chance in the main TLB: the port marks it referenced
/// every few hits, without writing a shared line on each.
#[test]
fn entries_hot_in_a_micro_tlb_get_their_clock_second_chance() {
    let mut m = Machine::new(SmmuConfig {
        tlb_capacity: 8,
        ..SmmuConfig::default()
    });
    let mem = m.mem.clone();
    let mut b = s1_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 48);
    b.map(0x10_0000, DATA, 16 * 0x1000, urw()).unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, b.root(), 1));
    m.set_ste(1, &s1_ste(CDS, 0, 1));
    let txn = |p: u64| Transaction::new(1, None, 0x10_0000 + p * 0x1000, AccessKind::Read, false);
    let mut port = m.smmu.port();
    for p in 0..8 {
        assert!(matches!(port.translate(txn(p)), Outcome::Translated { .. }));
    }
    // Page 0 is hot in the micro-TLB only.
    let before = m.smmu.stats();
    for _ in 0..300 {
        assert_eq!(port.translate(txn(0)), Outcome::Translated { pa: DATA });
    }
    let after = m.smmu.stats();
    assert_eq!(after.utlb_hits - before.utlb_hits, 300);
    assert_eq!(after.tlb_hits, before.tlb_hits, "no main-TLB hit counted");
    // A new page through the SMMU: CLOCK, its hand at page 0, spares it and evicts page 1.
    assert!(matches!(
        m.smmu.translate(txn(8)),
        Outcome::Translated { .. }
    ));
    assert_eq!(m.smmu.stats().tlb_entries, 8);
    let walks = m.smmu.stats().walks_s1;
    assert_eq!(m.smmu.translate(txn(0)), Outcome::Translated { pa: DATA });
    assert_eq!(m.smmu.stats().walks_s1, walks, "page 0 was still cached");
    assert!(matches!(
        m.smmu.translate(txn(1)),
        Outcome::Translated { .. }
    ));
    assert_eq!(
        m.smmu.stats().walks_s1,
        walks + 1,
        "page 1 had been evicted"
    );
}
