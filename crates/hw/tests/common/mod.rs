//! A test machine: RAM, an SMMU, and a "driver" that programs it only through MMIO and
//! memory (stream table, CDs, command queue, event queue), the way Linux does.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use twinmmu_hw::cd::{CdDw0, CdTtb, ContextDescriptor};
use twinmmu_hw::cmd::{CmdqEntry, build};
use twinmmu_hw::regs::{PAGE1, off};
use twinmmu_hw::ste::{L1Std, Ste, SteDw0, SteDw1, SteDw2, SteDw3};
use twinmmu_hw::{PhysMem, Smmu, SmmuConfig, SparseMem};
use twinmmu_vmsa::{
    BumpAllocator, Granule, MemError, Memory, MemoryMut, PaSize, S2LeafAttrs, TableBuilder,
    TableFormat,
};

pub const RAM: u64 = 0x4000_0000;
pub const RAM_SIZE: u64 = 0x1000_0000;
/// Layout inside RAM.
pub const STRTAB: u64 = RAM;
pub const L2STRTAB: u64 = RAM + 0x10_0000;
pub const CMDQ: u64 = RAM + 0x20_0000;
pub const EVTQ: u64 = RAM + 0x30_0000;
pub const CDS: u64 = RAM + 0x40_0000;
pub const TABLES: u64 = RAM + 0x100_0000;
pub const DATA: u64 = RAM + 0x800_0000;

pub const CMDQ_LOG2: u32 = 8;
pub const EVTQ_LOG2: u32 = 6;

pub struct Machine {
    pub mem: Arc<SparseMem>,
    pub smmu: Arc<Smmu>,
    pub alloc_next: u64,
    pub evtq_log2: u32,
}

pub fn ram() -> Arc<SparseMem> {
    Arc::new(SparseMem::with_range(RAM, RAM_SIZE).unwrap())
}

impl Machine {
    pub fn new(cfg: SmmuConfig) -> Self {
        Self::with_queues(cfg, EVTQ_LOG2)
    }

    pub fn with_queues(cfg: SmmuConfig, evtq_log2: u32) -> Self {
        let mem = ram();
        let smmu = Smmu::new(cfg, mem.clone()).unwrap();
        let mut m = Machine {
            mem,
            smmu,
            alloc_next: TABLES,
            evtq_log2,
        };
        m.bring_up(true);
        m
    }

    pub fn r32(&self, o: u64) -> u32 {
        self.smmu.mmio_read(o, 4).unwrap() as u32
    }
    pub fn w32(&self, o: u64, v: u32) {
        self.smmu.mmio_write(o, 4, u64::from(v)).unwrap()
    }
    pub fn r64(&self, o: u64) -> u64 {
        self.smmu.mmio_read(o, 8).unwrap()
    }
    pub fn w64(&self, o: u64, v: u64) {
        self.smmu.mmio_write(o, 8, v).unwrap()
    }

    /// Linux-style bring-up: tables and queues, CMDQEN, CFGI_ALL + TLBI_NSNH_ALL + SYNC,
    /// EVENTQEN, SMMUEN. `two_level` chooses the stream table format (SPLIT = 8).
    pub fn bring_up(&mut self, two_level: bool) {
        self.w32(off::CR0, 0);
        if two_level {
            // 16-bit StreamIDs, SPLIT 8: 256 L1 descriptors.
            self.w64(off::STRTAB_BASE, STRTAB);
            self.w32(off::STRTAB_BASE_CFG, 16 | (8 << 6) | (1 << 16));
        } else {
            self.w64(off::STRTAB_BASE, STRTAB);
            self.w32(off::STRTAB_BASE_CFG, 12);
        }
        self.w64(off::CMDQ_BASE, CMDQ | u64::from(CMDQ_LOG2));
        self.w32(off::CMDQ_PROD, 0);
        self.w32(off::CMDQ_CONS, 0);
        self.w64(off::EVENTQ_BASE, EVTQ | u64::from(self.evtq_log2));
        self.w32(PAGE1 + off::EVENTQ_PROD, 0);
        self.w32(PAGE1 + off::EVENTQ_CONS, 0);
        self.w32(off::CR0, 1 << 3);
        assert_eq!(self.r32(off::CR0ACK), 1 << 3);
        self.submit(&[build::cfgi_all(), build::tlbi_nsnh_all(), build::sync()]);
        self.w32(off::CR0, (1 << 3) | (1 << 2));
        self.w32(off::CR0, (1 << 3) | (1 << 2) | 1);
        assert_eq!(self.r32(off::CR0ACK), 0b1101);
    }

    /// Writes commands at PROD and publishes them; returns CONS afterwards.
    pub fn submit(&self, cmds: &[CmdqEntry]) -> u32 {
        let mut prod = self.r32(off::CMDQ_PROD);
        let mask = (1u32 << (CMDQ_LOG2 + 1)) - 1;
        for c in cmds {
            let idx = prod & ((1 << CMDQ_LOG2) - 1);
            let a = CMDQ + u64::from(idx) * 16;
            self.mem.write_u64(a, c.0[0]).unwrap();
            self.mem.write_u64(a + 8, c.0[1]).unwrap();
            prod = (prod + 1) & mask;
        }
        self.w32(off::CMDQ_PROD, prod);
        self.r32(off::CMDQ_CONS)
    }

    /// Whether the command queue is drained without error.
    pub fn cmdq_idle(&self) -> bool {
        // CONS.ERR keeps the last error code; an error is active while GERROR.CMDQ_ERR
        // differs from GERRORN.CMDQ_ERR.
        let cons = self.r32(off::CMDQ_CONS);
        let active = (self.r32(off::GERROR) ^ self.r32(off::GERRORN)) & 1 != 0;
        !active && cons & 0x1ff == self.r32(off::CMDQ_PROD) & 0x1ff
    }

    /// Installs an STE for `sid` (allocating the L2 table of its span for 2-level tables).
    pub fn set_ste(&self, sid: u32, ste: &Ste) {
        let cfg = self.r32(off::STRTAB_BASE_CFG);
        let addr = if (cfg >> 16) & 3 == 1 {
            let l1 = STRTAB + u64::from(sid >> 8) * 8;
            let l2 = L2STRTAB + u64::from(sid >> 8) * 256 * 64;
            // Span 9: 2^(9-1) = 256 STEs.
            let d = L1Std::new().with_span(9).with_l2ptr(l2 >> 6);
            self.mem.write_u64(l1, d.into_bits()).unwrap();
            l2 + u64::from(sid & 0xff) * 64
        } else {
            STRTAB + u64::from(sid) * 64
        };
        for (i, w) in ste.to_dwords().iter().enumerate() {
            self.mem.write_u64(addr + 8 * i as u64, *w).unwrap();
        }
        self.submit(&[build::cfgi_ste(sid, false), build::sync()]);
    }

    pub fn write_cd(&self, addr: u64, cd: &ContextDescriptor) {
        for (i, w) in cd.to_dwords().iter().enumerate() {
            self.mem.write_u64(addr + 8 * i as u64, *w).unwrap();
        }
    }

    /// Allocates `size` bytes of table memory (aligned to `size`).
    pub fn alloc(&mut self, size: u64) -> u64 {
        let a = self.alloc_next.next_multiple_of(size);
        self.alloc_next = a + size;
        a
    }

    /// Event records between CONS and PROD; advances CONS.
    pub fn events(&self) -> Vec<[u64; 4]> {
        let mut out = Vec::new();
        let mask = (1u32 << (self.evtq_log2 + 1)) - 1;
        let mut cons = self.r32(PAGE1 + off::EVENTQ_CONS);
        let prod = self.r32(PAGE1 + off::EVENTQ_PROD);
        while cons & mask != prod & mask {
            let idx = cons & ((1 << self.evtq_log2) - 1);
            let a = EVTQ + u64::from(idx) * 32;
            let mut r = [0u64; 4];
            for (i, w) in r.iter_mut().enumerate() {
                *w = self.mem.read_u64(a + 8 * i as u64).unwrap();
            }
            out.push(r);
            cons = (cons & !mask) | ((cons + 1) & mask);
        }
        self.w32(PAGE1 + off::EVENTQ_CONS, cons);
        out
    }
}

pub fn tg0(g: Granule) -> u8 {
    g.tg0()
}

/// An S1 CD with TTB0 at `ttb`, T0SZ = 64 - `ia_bits`, recording faults, abort on terminate.
pub fn s1_cd(g: Granule, ia_bits: u8, ttb: u64, asid: u16) -> ContextDescriptor {
    ContextDescriptor {
        dw0: CdDw0::new()
            .with_v(true)
            .with_aa64(true)
            .with_t0sz(64 - ia_bits)
            .with_tg0(g.tg0())
            .with_epd1(true)
            .with_ips(5)
            .with_r(true)
            .with_a(true)
            .with_asid(asid),
        ttb0: CdTtb::new().with_ttb(ttb >> 4),
        mair: 0xff,
        ..ContextDescriptor::default()
    }
}

/// A stage-1-only STE pointing at a single CD (or a CD table with `cdmax`).
pub fn s1_ste(cd_ptr: u64, cdmax: u8, vmid: u16) -> Ste {
    Ste {
        dw0: SteDw0::new()
            .with_v(true)
            .with_config(0b101)
            .with_s1_context_ptr(cd_ptr >> 6)
            .with_s1cdmax(cdmax),
        dw1: SteDw1::new(),
        dw2: SteDw2::new().with_s2vmid(vmid),
        ..Ste::default()
    }
}

/// A stage-2 STE (config 0b110, or nested 0b111 with `s1`).
pub fn s2_ste(g: Granule, ia_bits: u8, start_level: u8, ttb: u64, vmid: u16) -> Ste {
    let sl0 = match (g, start_level) {
        (Granule::Size4K, 2) => 0,
        (Granule::Size4K, 1) => 1,
        (Granule::Size4K, 0) => 2,
        (_, 3) => 0,
        (_, 2) => 1,
        (_, 1) => 2,
        _ => 3,
    };
    Ste {
        dw0: SteDw0::new().with_v(true).with_config(0b110),
        dw1: SteDw1::new(),
        dw2: SteDw2::new()
            .with_s2vmid(vmid)
            .with_s2t0sz(64 - ia_bits)
            .with_s2sl0(sl0)
            .with_s2tg(g.s2tg())
            .with_s2ps(5)
            .with_s2aa64(true)
            .with_s2r(true),
        dw3: SteDw3::new().with_s2ttb(ttb >> 4),
        ..Ste::default()
    }
}

/// A stage-1 table builder with 4 MiB of table memory at `base`.
pub fn s1_builder(
    mem: &SparseMem,
    base: u64,
    g: Granule,
    ia_bits: u8,
) -> TableBuilder<&SparseMem, BumpAllocator> {
    let fmt = TableFormat::stage1(g, ia_bits, PaSize::Bits48).unwrap();
    TableBuilder::new(fmt, mem, BumpAllocator::new(base, 0x40_0000)).unwrap()
}

/// A stage-2 table builder with 4 MiB of table memory at `base`.
pub fn s2_builder(
    mem: &SparseMem,
    base: u64,
    g: Granule,
    ia_bits: u8,
    start_level: u8,
) -> TableBuilder<&SparseMem, BumpAllocator> {
    let fmt = TableFormat::stage2(g, ia_bits, start_level, PaSize::Bits48).unwrap();
    TableBuilder::new(fmt, mem, BumpAllocator::new(base, 0x40_0000)).unwrap()
}

/// Stage-1 leaf attributes: read/write at both privileges (devices issue unprivileged DMA).
pub fn urw() -> u64 {
    twinmmu_vmsa::S1LeafAttrs {
        el0: true,
        ..twinmmu_vmsa::S1LeafAttrs::rw()
    }
    .bits()
}

/// Stage-1 table memory addressed by IPA: IPA_BASE + x → RAM + x.
pub struct Ipa<'a>(pub &'a SparseMem);
pub const IPA_BASE: u64 = 0x80_0000_0000;
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

/// A nested stream's STE (not installed): stage 2 (VMID 11, S2R) maps IPA_BASE.. to RAM
/// (256 MiB), stage 1 (CD at the IPA of CDS, ASID 5) maps `iova`..+16K to the IPA of DATA.
pub fn nested_stream(m: &mut Machine, iova: u64) -> Ste {
    let mem = m.mem.clone();
    let mut s2 = s2_builder(&mem, m.alloc(0x40_0000), Granule::Size4K, 40, 1);
    s2.map(IPA_BASE, RAM, RAM_SIZE, S2LeafAttrs::rw().bits())
        .unwrap();
    let s2_root = s2.root();
    drop(s2);
    let tables_ipa = IPA_BASE + (TABLES - RAM) + 0x800_0000;
    let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
    let mut s1 =
        TableBuilder::new(fmt, Ipa(&m.mem), BumpAllocator::new(tables_ipa, 0x40_0000)).unwrap();
    s1.map(iova, IPA_BASE + (DATA - RAM), 0x4000, urw())
        .unwrap();
    m.write_cd(CDS, &s1_cd(Granule::Size4K, 48, s1.root(), 5));
    let mut ste = s2_ste(Granule::Size4K, 40, 1, s2_root, 11);
    ste.dw0 = SteDw0::new()
        .with_v(true)
        .with_config(0b111)
        .with_s1_context_ptr((IPA_BASE + (CDS - RAM)) >> 6);
    ste
}
