//! A test host: RAM, PEs on a DVM interconnect, an SMMU attached to it (driven only through
//! MMIO and the structures in memory, as crates/hw/tests/common does), and KVM on it; plus
//! a guest with RAM, a stage 2, and its own stage-1 tables and CD in guest memory.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use twinmmu_hw::cd::{CdDw0, CdTtb, ContextDescriptor};
use twinmmu_hw::cmd::{CmdqEntry, build};
use twinmmu_hw::regs::{PAGE1, off};
use twinmmu_hw::ste::{Ste, SteDw0, SteDw1, SteDw2, SteDw3};
use twinmmu_hw::{
    AccessKind, Dvm, DvmConfig, FrameAllocator, Outcome, PeConfig, PhysMem, Smmu, SmmuConfig,
    SparseMem, Transaction,
};
use twinmmu_kvm::{GuestMemory, Kvm, KvmConfig, Machine, Vm, VmConfig, VmidBits};
use twinmmu_vmsa::{
    BumpAllocator, Features, Granule, MemoryMut, PaSize, S1LeafAttrs, Stage1Config, Stage1Params,
    TableBuilder, TableFormat, TtbParams,
};

pub const RAM: u64 = 0x4000_0000;
pub const RAM_SIZE: u64 = 0x4000_0000;
pub const STRTAB: u64 = RAM;
pub const CMDQ: u64 = RAM + 0x10_0000;
pub const EVTQ: u64 = RAM + 0x20_0000;
/// Host frames for KVM (guest RAM, stage-2 tables) start here.
pub const FRAMES: u64 = RAM + 0x100_0000;
pub const CMDQ_LOG2: u32 = 8;
pub const EVTQ_LOG2: u32 = 6;
/// Linear stream table of 2^8 STEs.
pub const SID_BITS: u32 = 8;

pub struct Host {
    pub mem: Arc<SparseMem>,
    pub frames: FrameAllocator,
    pub smmu: Arc<Smmu>,
    pub dvm: Arc<Dvm>,
    pub kvm: Arc<Kvm>,
}

impl Host {
    pub fn new(cpus: usize, bits: VmidBits, smmu: SmmuConfig) -> Host {
        Host::with_pe(cpus, bits, smmu, PeConfig::default())
    }

    pub fn with_pe(cpus: usize, bits: VmidBits, smmu_cfg: SmmuConfig, pe: PeConfig) -> Host {
        let mem = Arc::new(SparseMem::with_range(RAM, RAM_SIZE).unwrap());
        let frames = FrameAllocator::new(FRAMES..RAM + RAM_SIZE).unwrap();
        let smmu = Smmu::new(smmu_cfg, mem.clone()).unwrap();
        let dvm = Dvm::new(DvmConfig::new(cpus).pe(pe), mem.clone());
        dvm.attach_smmu(smmu.clone());
        let machine = Machine::new(dvm.clone()).with_memory(mem.clone(), frames.clone());
        let kvm = Kvm::with_machine(KvmConfig::new(cpus).vmid_bits(bits), machine).unwrap();
        let h = Host {
            mem,
            frames,
            smmu,
            dvm,
            kvm,
        };
        h.bring_up();
        // KVM and the SMMU share VMIDs for BTM only with equal widths.
        let idr0 = h.r32(off::IDR0);
        h.kvm
            .check_btm_vmid_width(VmidBits::from_smmu_idr0(idr0))
            .unwrap();
        h
    }

    pub fn r32(&self, o: u64) -> u32 {
        self.smmu.mmio_read(o, 4).unwrap() as u32
    }
    pub fn w32(&self, o: u64, v: u32) {
        self.smmu.mmio_write(o, 4, u64::from(v)).unwrap()
    }
    pub fn w64(&self, o: u64, v: u64) {
        self.smmu.mmio_write(o, 8, v).unwrap()
    }

    /// Linux-style bring-up with a linear stream table: queues, CMDQEN, CFGI_ALL +
    /// TLBI_NSNH_ALL + SYNC, EVENTQEN, SMMUEN. CR2 stays 0 (PTM = 0: broadcasts honoured).
    fn bring_up(&self) {
        self.w32(off::CR0, 0);
        self.w64(off::STRTAB_BASE, STRTAB);
        self.w32(off::STRTAB_BASE_CFG, SID_BITS);
        self.w64(off::CMDQ_BASE, CMDQ | u64::from(CMDQ_LOG2));
        self.w32(off::CMDQ_PROD, 0);
        self.w32(off::CMDQ_CONS, 0);
        self.w64(off::EVENTQ_BASE, EVTQ | u64::from(EVTQ_LOG2));
        self.w32(PAGE1 + off::EVENTQ_PROD, 0);
        self.w32(PAGE1 + off::EVENTQ_CONS, 0);
        self.w32(off::CR0, 1 << 3);
        self.submit(&[build::cfgi_all(), build::tlbi_nsnh_all(), build::sync()]);
        self.w32(off::CR0, (1 << 3) | (1 << 2) | 1);
        assert_eq!(self.r32(off::CR0ACK), 0b1101);
    }

    /// Writes commands at PROD and publishes them; they are consumed before this returns.
    pub fn submit(&self, cmds: &[CmdqEntry]) {
        let mut prod = self.r32(off::CMDQ_PROD);
        let mask = (1u32 << (CMDQ_LOG2 + 1)) - 1;
        for c in cmds {
            let a = CMDQ + u64::from(prod & ((1 << CMDQ_LOG2) - 1)) * 16;
            self.mem.write_u64(a, c.0[0]).unwrap();
            self.mem.write_u64(a + 8, c.0[1]).unwrap();
            prod = (prod + 1) & mask;
        }
        self.w32(off::CMDQ_PROD, prod);
        assert_eq!(self.r32(off::CMDQ_CONS) & 0x1ff, prod & 0x1ff, "drained");
    }

    pub fn set_ste(&self, sid: u32, ste: &Ste) {
        let a = STRTAB + u64::from(sid) * 64;
        for (i, w) in ste.to_dwords().iter().enumerate() {
            self.mem.write_u64(a + 8 * i as u64, *w).unwrap();
        }
        self.submit(&[build::cfgi_ste(sid, false), build::sync()]);
    }

    /// A device read of `addr` through stream `sid`: the PA, or `None` on any fault.
    pub fn dma(&self, sid: u32, addr: u64) -> Option<u64> {
        match self
            .smmu
            .translate(Transaction::new(sid, None, addr, AccessKind::Read, false))
        {
            Outcome::Translated { pa } => Some(pa),
            _ => None,
        }
    }

    /// SMMU main-TLB entries of `vmid` of the given kind.
    pub fn smmu_entries(&self, vmid: u16, kind: twinmmu_hw::tlb::Kind) -> usize {
        self.smmu
            .tlb_entries()
            .iter()
            .filter(|e| e.ctx.vmid() == vmid && e.ctx.kind() == kind)
            .count()
    }
}

/// Guest RAM: 16 MiB at this IPA.
pub const GUEST_RAM: u64 = 0x8000_0000;
pub const GUEST_RAM_SIZE: u64 = 0x100_0000;
/// In guest RAM: the CD, the guest's stage-1 tables, data pages.
pub const CD_IPA: u64 = GUEST_RAM + 0x1_0000;
pub const GUEST_PT: u64 = GUEST_RAM + 0x40_0000;
pub const DATA_IPA: u64 = GUEST_RAM + 0x80_0000;
/// The guest VA the device and the vCPU use.
pub const VA: u64 = 0x10_0000;

/// A guest: its VM, RAM mapped at stage 2, and stage-1 tables in its RAM mapping `VA` to
/// data page `page`.
pub struct Guest {
    pub vm: Arc<Vm>,
    pub gmem: GuestMemory,
    pub s1: TableBuilder<GuestMemory, BumpAllocator>,
    pub asid: u16,
    pub page: u64,
}

pub fn s1_attrs() -> u64 {
    S1LeafAttrs {
        el0: true,
        not_global: true,
        ..S1LeafAttrs::rw()
    }
    .bits()
}

impl Guest {
    pub fn new(kvm: &Arc<Kvm>, asid: u16) -> Guest {
        let vm = kvm.create_vm(VmConfig::default());
        vm.add_ram(GUEST_RAM, GUEST_RAM_SIZE).unwrap();
        vm.stage2_map(GUEST_RAM, GUEST_RAM_SIZE).unwrap();
        let gmem = vm.guest_memory().unwrap();
        let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
        let mut s1 =
            TableBuilder::new(fmt, gmem.clone(), BumpAllocator::new(GUEST_PT, 0x40_0000)).unwrap();
        s1.map(VA, DATA_IPA, 0x1000, s1_attrs()).unwrap();
        Guest {
            vm,
            gmem,
            s1,
            asid,
            page: 0,
        }
    }

    /// The host PA of data page `n`.
    pub fn data_pa(&self, n: u64) -> u64 {
        self.vm.ram_pa(DATA_IPA + n * 0x1000).unwrap()
    }

    /// The guest points `VA` at data page `n` (no TLB maintenance: the guest's to do).
    pub fn remap(&mut self, n: u64) {
        self.s1.unmap(VA, 0x1000).unwrap();
        self.s1
            .map(VA, DATA_IPA + n * 0x1000, 0x1000, s1_attrs())
            .unwrap();
        self.page = n;
    }

    /// The guest's stage 1 as its vCPU runs it (TTBR0_EL1/TCR_EL1).
    pub fn stage1(&self) -> (Stage1Config, u16) {
        Guest::stage1_of(self.s1.root(), self.asid)
    }

    /// A 48-bit 4K stage 1 with TTB0 at `root` (an IPA), ASID `asid`.
    pub fn stage1_of(root: u64, asid: u16) -> (Stage1Config, u16) {
        let cfg = Stage1Config::new(
            &Stage1Params {
                ttb: [
                    TtbParams {
                        ttb: root,
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
                mair: 0xff,
                ..Default::default()
            },
            &Features::default(),
        )
        .unwrap();
        (cfg, asid)
    }

    /// Writes the guest's CD (in its RAM) for the same stage 1, with `aset`.
    pub fn write_cd(&self, aset: bool) {
        let cd = ContextDescriptor {
            dw0: CdDw0::new()
                .with_v(true)
                .with_aa64(true)
                .with_t0sz(16)
                .with_tg0(Granule::Size4K.tg0())
                .with_epd1(true)
                .with_ips(5)
                .with_r(true)
                .with_a(true)
                .with_aset(aset)
                .with_asid(self.asid),
            ttb0: CdTtb::new().with_ttb(self.s1.root() >> 4),
            mair: 0xff,
            ..ContextDescriptor::default()
        };
        for (i, w) in cd.to_dwords().iter().enumerate() {
            self.gmem.write_u64(CD_IPA + 8 * i as u64, *w).unwrap();
        }
    }

    /// A nested STE (config 0b111): the guest's CD at an IPA, the VM's stage 2 shared with
    /// KVM, tagged `vmid`.
    pub fn nested_ste(&self, vmid: u16) -> Ste {
        let mut ste = self.s2_ste(vmid);
        ste.dw0 = SteDw0::new()
            .with_v(true)
            .with_config(0b111)
            .with_s1_context_ptr(CD_IPA >> 6);
        ste
    }

    /// A stage-2-only STE (config 0b110) over the VM's stage 2, tagged `vmid`.
    pub fn s2_ste(&self, vmid: u16) -> Ste {
        let p = self.vm.stage2_params().unwrap();
        Ste {
            dw0: SteDw0::new().with_v(true).with_config(0b110),
            dw1: SteDw1::new(),
            dw2: SteDw2::new()
                .with_s2vmid(vmid)
                .with_s2t0sz(p.s2t0sz)
                .with_s2sl0(p.s2sl0)
                .with_s2tg(p.s2tg)
                .with_s2ps(p.s2ps)
                .with_s2aa64(true)
                .with_s2r(true),
            dw3: SteDw3::new().with_s2ttb(p.s2ttb >> 4),
            ..Ste::default()
        }
    }
}
