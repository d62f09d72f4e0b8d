//! Register layouts and offsets of the SMMUv3 programming interface (IHI0070 chapter 6,
//! smmu_kvm.md §4.1–§4.2). Every field is declared with `bitfield-struct`, LSB first, so the
//! declaration order is the bit order; the tests at the bottom check each field by raw bit
//! position.

use bitfield_struct::bitfield;

/// Page 1 of the register map starts 64 KiB above page 0 (IHI0070 6.1).
pub const PAGE1: u64 = 0x1_0000;
/// The two register pages together.
pub const MMIO_SIZE: u64 = 0x2_0000;

pub mod off {
    //! Register offsets within page 0 (IHI0070 6.2.1) and page 1 (6.2.2).
    pub const IDR0: u64 = 0x00;
    pub const IDR1: u64 = 0x04;
    pub const IDR2: u64 = 0x08;
    pub const IDR3: u64 = 0x0C;
    pub const IDR4: u64 = 0x10;
    pub const IDR5: u64 = 0x14;
    pub const IIDR: u64 = 0x18;
    pub const AIDR: u64 = 0x1C;
    pub const CR0: u64 = 0x20;
    pub const CR0ACK: u64 = 0x24;
    pub const CR1: u64 = 0x28;
    pub const CR2: u64 = 0x2C;
    pub const STATUSR: u64 = 0x40;
    pub const GBPA: u64 = 0x44;
    pub const AGBPA: u64 = 0x48;
    /// MPAM (IDR3.MPAM = 1): capability, global and global-bypass MPAM (IHI0070 6.3.41–43).
    pub const MPAMIDR: u64 = 0x130;
    pub const GMPAM: u64 = 0x138;
    pub const GBPMPAM: u64 = 0x13C;
    pub const IRQ_CTRL: u64 = 0x50;
    pub const IRQ_CTRLACK: u64 = 0x54;
    pub const GERROR: u64 = 0x60;
    pub const GERRORN: u64 = 0x64;
    pub const GERROR_IRQ_CFG0: u64 = 0x68;
    pub const GERROR_IRQ_CFG1: u64 = 0x70;
    pub const GERROR_IRQ_CFG2: u64 = 0x74;
    pub const STRTAB_BASE: u64 = 0x80;
    pub const STRTAB_BASE_CFG: u64 = 0x88;
    pub const CMDQ_BASE: u64 = 0x90;
    pub const CMDQ_PROD: u64 = 0x98;
    pub const CMDQ_CONS: u64 = 0x9C;
    pub const EVENTQ_BASE: u64 = 0xA0;
    /// Page-0 alias of EVENTQ_PROD (page 1 + 0xA8 is the architected location).
    pub const EVENTQ_PROD: u64 = 0xA8;
    pub const EVENTQ_CONS: u64 = 0xAC;
    pub const EVENTQ_IRQ_CFG0: u64 = 0xB0;
    pub const EVENTQ_IRQ_CFG1: u64 = 0xB8;
    pub const EVENTQ_IRQ_CFG2: u64 = 0xBC;
    pub const PRIQ_BASE: u64 = 0xC0;
    pub const PRIQ_PROD: u64 = 0xC8;
    pub const PRIQ_CONS: u64 = 0xCC;
    pub const PRIQ_IRQ_CFG0: u64 = 0xD0;
    pub const PRIQ_IRQ_CFG1: u64 = 0xD8;
    pub const PRIQ_IRQ_CFG2: u64 = 0xDC;
    /// Peripheral and component ID registers (IHI0070 6.3.170).
    pub const PIDR4: u64 = 0xFD0;
    pub const PIDR0: u64 = 0xFE0;
    pub const PIDR1: u64 = 0xFE4;
    pub const PIDR2: u64 = 0xFE8;
    pub const PIDR3: u64 = 0xFEC;
    pub const CIDR0: u64 = 0xFF0;
    pub const CIDR1: u64 = 0xFF4;
    pub const CIDR2: u64 = 0xFF8;
    pub const CIDR3: u64 = 0xFFC;
}

/// SMMU_IDR0 (IHI0070 6.3.1).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr0 {
    pub s2p: bool,
    pub s1p: bool,
    #[bits(2)]
    pub ttf: u8,
    pub cohacc: bool,
    pub btm: bool,
    #[bits(2)]
    pub httu: u8,
    pub dormhint: bool,
    pub hyp: bool,
    pub ats: bool,
    pub ns1ats: bool,
    pub asid16: bool,
    pub msi: bool,
    pub sev: bool,
    pub atos: bool,
    pub pri: bool,
    pub vmw: bool,
    pub vmid16: bool,
    pub cd2l: bool,
    pub vatos: bool,
    #[bits(2)]
    pub ttendian: u8,
    pub atsrecerr: bool,
    #[bits(2)]
    pub stall_model: u8,
    pub term_model: bool,
    #[bits(2)]
    pub st_level: u8,
    pub __: bool,
    pub rme_impl: bool,
    pub __: bool,
}

/// SMMU_IDR1 (IHI0070 6.3.2).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr1 {
    #[bits(6)]
    pub sidsize: u8,
    #[bits(5)]
    pub ssidsize: u8,
    #[bits(5)]
    pub priqs: u8,
    #[bits(5)]
    pub eventqs: u8,
    #[bits(5)]
    pub cmdqs: u8,
    pub attr_perms_ovr: bool,
    pub attr_types_ovr: bool,
    pub rel: bool,
    pub queues_preset: bool,
    pub tables_preset: bool,
    pub ecmdq: bool,
}

/// SMMU_IDR3 (IHI0070 6.3.4).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr3 {
    #[bits(2)]
    pub __: u8,
    pub had: bool,
    pub pbha: bool,
    pub xnx: bool,
    pub pps: bool,
    pub __: bool,
    pub mpam: bool,
    pub fwb: bool,
    pub stt: bool,
    pub ril: bool,
    #[bits(2)]
    pub bbml: u8,
    pub e0pd: bool,
    pub ptwnnc: bool,
    pub dpt: bool,
    #[bits(16)]
    pub __: u16,
}

/// SMMU_IDR5 (IHI0070 6.3.6).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr5 {
    #[bits(3)]
    pub oas: u8,
    pub __: bool,
    pub gran4k: bool,
    pub gran16k: bool,
    pub gran64k: bool,
    #[bits(3)]
    pub __: u8,
    #[bits(2)]
    pub vax: u8,
    #[bits(4)]
    pub __: u8,
    pub stall_max: u16,
}

/// SMMU_CR0 (IHI0070 6.3.9); also the layout of CR0ACK.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Cr0 {
    pub smmuen: bool,
    pub priqen: bool,
    pub eventqen: bool,
    pub cmdqen: bool,
    pub atschk: bool,
    pub __: bool,
    #[bits(3)]
    pub vmw: u8,
    #[bits(23)]
    pub __: u32,
}

/// SMMU_CR1 (IHI0070 6.3.11): cacheability of queue and table accesses. The model keeps the
/// value (software reads it back) but memory has no cache to honour it.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Cr1 {
    #[bits(2)]
    pub queue_ic: u8,
    #[bits(2)]
    pub queue_oc: u8,
    #[bits(2)]
    pub queue_sh: u8,
    #[bits(2)]
    pub table_ic: u8,
    #[bits(2)]
    pub table_oc: u8,
    #[bits(2)]
    pub table_sh: u8,
    #[bits(20)]
    pub __: u32,
}

/// SMMU_CR2 (IHI0070 6.3.12).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Cr2 {
    pub e2h: bool,
    pub recinvsid: bool,
    pub ptm: bool,
    #[bits(29)]
    pub __: u32,
}

/// SMMU_GBPA (IHI0070 6.3.14).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Gbpa {
    #[bits(4)]
    pub memattr: u8,
    pub mtcfg: bool,
    #[bits(3)]
    pub __: u8,
    #[bits(4)]
    pub alloccfg: u8,
    #[bits(2)]
    pub shcfg: u8,
    #[bits(2)]
    pub __: u8,
    #[bits(2)]
    pub privcfg: u8,
    #[bits(2)]
    pub instcfg: u8,
    pub abort: bool,
    #[bits(10)]
    pub __: u16,
    pub update: bool,
}

/// SMMU_IRQ_CTRL (IHI0070 6.3.16); also the layout of IRQ_CTRLACK.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct IrqCtrl {
    pub gerror_irqen: bool,
    pub priq_irqen: bool,
    pub eventq_irqen: bool,
    #[bits(29)]
    pub __: u32,
}

/// SMMU_GERROR / SMMU_GERRORN (IHI0070 6.3.19–6.3.20). Bit 1 is reserved.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Gerror {
    pub cmdq_err: bool,
    pub __: bool,
    pub eventq_abt_err: bool,
    pub priq_abt_err: bool,
    pub msi_cmdq_abt_err: bool,
    pub msi_eventq_abt_err: bool,
    pub msi_priq_abt_err: bool,
    pub msi_gerror_abt_err: bool,
    pub sfm_err: bool,
    #[bits(23)]
    pub __: u32,
}

/// The implemented CR0 bits (reserved bits read as zero).
pub const CR0_MASK: u32 = 0x1DF;

/// The implemented GERROR bits.
pub const GERROR_MASK: u32 = 0x1FD;

/// SMMU_STRTAB_BASE (IHI0070 6.3.24).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct StrtabBase {
    #[bits(6)]
    pub __: u8,
    #[bits(46)]
    pub addr: u64,
    #[bits(10)]
    pub __: u16,
    pub ra: bool,
    pub __: bool,
}

/// SMMU_STRTAB_BASE_CFG (IHI0070 6.3.25).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct StrtabBaseCfg {
    #[bits(6)]
    pub log2size: u8,
    #[bits(5)]
    pub split: u8,
    #[bits(5)]
    pub __: u8,
    #[bits(2)]
    pub fmt: u8,
    #[bits(14)]
    pub __: u16,
}

/// SMMU_CMDQ_BASE, SMMU_EVENTQ_BASE, SMMU_PRIQ_BASE (IHI0070 6.3.26, 6.3.29, 6.3.33).
/// Bit 62 is RA for the command queue and WA for the event and PRI queues.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct QueueBase {
    #[bits(5)]
    pub log2size: u8,
    #[bits(47)]
    pub addr: u64,
    #[bits(10)]
    pub __: u16,
    pub ra_wa: bool,
    pub __: bool,
}

/// Queue index registers: CMDQ_CONS has ERR\[30:24\]; EVENTQ_PROD and PRIQ_PROD have OVFLG at
/// bit 31; EVENTQ_CONS and PRIQ_CONS have OVACKFLG at bit 31. The low 20 bits hold the
/// index and wrap bit (`LOG2SIZE + 1` bits used).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct QueueIndex {
    #[bits(20)]
    pub ptr: u32,
    #[bits(4)]
    pub __: u8,
    #[bits(7)]
    pub err: u8,
    pub ovflg: bool,
}

/// IRQ_CFG0 registers: the MSI target address ADDR\[51:2\] (IHI0070 6.3.21).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct IrqCfg0 {
    #[bits(2)]
    pub __: u8,
    #[bits(50)]
    pub addr: u64,
    #[bits(12)]
    pub __: u16,
}

/// IRQ_CFG2 registers: MSI memory attributes and shareability (IHI0070 6.3.23).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct IrqCfg2 {
    #[bits(4)]
    pub memattr: u8,
    #[bits(2)]
    pub sh: u8,
    #[bits(26)]
    pub __: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idr0_fields_by_bit_position() {
        assert_eq!(Idr0::new().with_s2p(true).into_bits(), 1 << 0);
        assert_eq!(Idr0::new().with_s1p(true).into_bits(), 1 << 1);
        assert_eq!(Idr0::new().with_ttf(3).into_bits(), 3 << 2);
        assert_eq!(Idr0::new().with_cohacc(true).into_bits(), 1 << 4);
        assert_eq!(Idr0::new().with_btm(true).into_bits(), 1 << 5);
        assert_eq!(Idr0::new().with_httu(3).into_bits(), 3 << 6);
        assert_eq!(Idr0::new().with_dormhint(true).into_bits(), 1 << 8);
        assert_eq!(Idr0::new().with_hyp(true).into_bits(), 1 << 9);
        assert_eq!(Idr0::new().with_ats(true).into_bits(), 1 << 10);
        assert_eq!(Idr0::new().with_ns1ats(true).into_bits(), 1 << 11);
        assert_eq!(Idr0::new().with_asid16(true).into_bits(), 1 << 12);
        assert_eq!(Idr0::new().with_msi(true).into_bits(), 1 << 13);
        assert_eq!(Idr0::new().with_sev(true).into_bits(), 1 << 14);
        assert_eq!(Idr0::new().with_atos(true).into_bits(), 1 << 15);
        assert_eq!(Idr0::new().with_pri(true).into_bits(), 1 << 16);
        assert_eq!(Idr0::new().with_vmw(true).into_bits(), 1 << 17);
        assert_eq!(Idr0::new().with_vmid16(true).into_bits(), 1 << 18);
        assert_eq!(Idr0::new().with_cd2l(true).into_bits(), 1 << 19);
        assert_eq!(Idr0::new().with_vatos(true).into_bits(), 1 << 20);
        assert_eq!(Idr0::new().with_ttendian(3).into_bits(), 3 << 21);
        assert_eq!(Idr0::new().with_atsrecerr(true).into_bits(), 1 << 23);
        assert_eq!(Idr0::new().with_stall_model(3).into_bits(), 3 << 24);
        assert_eq!(Idr0::new().with_term_model(true).into_bits(), 1 << 26);
        assert_eq!(Idr0::new().with_st_level(3).into_bits(), 3 << 27);
        assert_eq!(Idr0::new().with_rme_impl(true).into_bits(), 1 << 30);
    }

    #[test]
    fn idr1_idr3_idr5_fields_by_bit_position() {
        assert_eq!(Idr1::new().with_sidsize(0x3f).into_bits(), 0x3f);
        assert_eq!(Idr1::new().with_ssidsize(0x1f).into_bits(), 0x1f << 6);
        assert_eq!(Idr1::new().with_priqs(0x1f).into_bits(), 0x1f << 11);
        assert_eq!(Idr1::new().with_eventqs(0x1f).into_bits(), 0x1f << 16);
        assert_eq!(Idr1::new().with_cmdqs(0x1f).into_bits(), 0x1f << 21);
        assert_eq!(Idr1::new().with_attr_perms_ovr(true).into_bits(), 1 << 26);
        assert_eq!(Idr1::new().with_attr_types_ovr(true).into_bits(), 1 << 27);
        assert_eq!(Idr1::new().with_rel(true).into_bits(), 1 << 28);
        assert_eq!(Idr1::new().with_queues_preset(true).into_bits(), 1 << 29);
        assert_eq!(Idr1::new().with_tables_preset(true).into_bits(), 1 << 30);
        assert_eq!(Idr1::new().with_ecmdq(true).into_bits(), 1 << 31);

        assert_eq!(Idr3::new().with_had(true).into_bits(), 1 << 2);
        assert_eq!(Idr3::new().with_pbha(true).into_bits(), 1 << 3);
        assert_eq!(Idr3::new().with_xnx(true).into_bits(), 1 << 4);
        assert_eq!(Idr3::new().with_pps(true).into_bits(), 1 << 5);
        assert_eq!(Idr3::new().with_mpam(true).into_bits(), 1 << 7);
        assert_eq!(Idr3::new().with_fwb(true).into_bits(), 1 << 8);
        assert_eq!(Idr3::new().with_stt(true).into_bits(), 1 << 9);
        assert_eq!(Idr3::new().with_ril(true).into_bits(), 1 << 10);
        assert_eq!(Idr3::new().with_bbml(3).into_bits(), 3 << 11);
        assert_eq!(Idr3::new().with_e0pd(true).into_bits(), 1 << 13);
        assert_eq!(Idr3::new().with_ptwnnc(true).into_bits(), 1 << 14);
        assert_eq!(Idr3::new().with_dpt(true).into_bits(), 1 << 15);

        assert_eq!(Idr5::new().with_oas(7).into_bits(), 7);
        assert_eq!(Idr5::new().with_gran4k(true).into_bits(), 1 << 4);
        assert_eq!(Idr5::new().with_gran16k(true).into_bits(), 1 << 5);
        assert_eq!(Idr5::new().with_gran64k(true).into_bits(), 1 << 6);
        assert_eq!(Idr5::new().with_vax(3).into_bits(), 3 << 10);
        assert_eq!(Idr5::new().with_stall_max(0xffff).into_bits(), 0xffff << 16);
    }

    #[test]
    fn control_registers_by_bit_position() {
        assert_eq!(Cr0::new().with_smmuen(true).into_bits(), 1 << 0);
        assert_eq!(Cr0::new().with_priqen(true).into_bits(), 1 << 1);
        assert_eq!(Cr0::new().with_eventqen(true).into_bits(), 1 << 2);
        assert_eq!(Cr0::new().with_cmdqen(true).into_bits(), 1 << 3);
        assert_eq!(Cr0::new().with_atschk(true).into_bits(), 1 << 4);
        assert_eq!(Cr0::new().with_vmw(7).into_bits(), 7 << 6);
        // Implemented fields: bits 4:0 and VMW[8:6]. (QEMU's reserved mask 0xFFFFFC20 also
        // leaves bit 9 writable; no CR0 field of this model lives there.)
        let all = Cr0::new()
            .with_smmuen(true)
            .with_priqen(true)
            .with_eventqen(true)
            .with_cmdqen(true)
            .with_atschk(true)
            .with_vmw(7)
            .into_bits();
        assert_eq!(all, !0xFFFF_FC20 & !(1 << 9));
        assert_eq!(all, CR0_MASK);

        assert_eq!(Cr1::new().with_queue_ic(3).into_bits(), 3);
        assert_eq!(Cr1::new().with_queue_oc(3).into_bits(), 3 << 2);
        assert_eq!(Cr1::new().with_queue_sh(3).into_bits(), 3 << 4);
        assert_eq!(Cr1::new().with_table_ic(3).into_bits(), 3 << 6);
        assert_eq!(Cr1::new().with_table_oc(3).into_bits(), 3 << 8);
        assert_eq!(Cr1::new().with_table_sh(3).into_bits(), 3 << 10);

        assert_eq!(Cr2::new().with_e2h(true).into_bits(), 1 << 0);
        assert_eq!(Cr2::new().with_recinvsid(true).into_bits(), 1 << 1);
        assert_eq!(Cr2::new().with_ptm(true).into_bits(), 1 << 2);

        assert_eq!(Gbpa::new().with_memattr(0xf).into_bits(), 0xf);
        assert_eq!(Gbpa::new().with_mtcfg(true).into_bits(), 1 << 4);
        assert_eq!(Gbpa::new().with_alloccfg(0xf).into_bits(), 0xf << 8);
        assert_eq!(Gbpa::new().with_shcfg(3).into_bits(), 3 << 12);
        assert_eq!(Gbpa::new().with_privcfg(3).into_bits(), 3 << 16);
        assert_eq!(Gbpa::new().with_instcfg(3).into_bits(), 3 << 18);
        assert_eq!(Gbpa::new().with_abort(true).into_bits(), 1 << 20);
        assert_eq!(Gbpa::new().with_update(true).into_bits(), 1 << 31);

        assert_eq!(IrqCtrl::new().with_gerror_irqen(true).into_bits(), 1);
        assert_eq!(IrqCtrl::new().with_priq_irqen(true).into_bits(), 2);
        assert_eq!(IrqCtrl::new().with_eventq_irqen(true).into_bits(), 4);
    }

    #[test]
    fn gerror_bits_by_position() {
        assert_eq!(Gerror::new().with_cmdq_err(true).into_bits(), 1 << 0);
        assert_eq!(Gerror::new().with_eventq_abt_err(true).into_bits(), 1 << 2);
        assert_eq!(Gerror::new().with_priq_abt_err(true).into_bits(), 1 << 3);
        assert_eq!(
            Gerror::new().with_msi_cmdq_abt_err(true).into_bits(),
            1 << 4
        );
        assert_eq!(
            Gerror::new().with_msi_eventq_abt_err(true).into_bits(),
            1 << 5
        );
        assert_eq!(
            Gerror::new().with_msi_priq_abt_err(true).into_bits(),
            1 << 6
        );
        assert_eq!(
            Gerror::new().with_msi_gerror_abt_err(true).into_bits(),
            1 << 7
        );
        assert_eq!(Gerror::new().with_sfm_err(true).into_bits(), 1 << 8);
        let all = Gerror::new()
            .with_cmdq_err(true)
            .with_eventq_abt_err(true)
            .with_priq_abt_err(true)
            .with_msi_cmdq_abt_err(true)
            .with_msi_eventq_abt_err(true)
            .with_msi_priq_abt_err(true)
            .with_msi_gerror_abt_err(true)
            .with_sfm_err(true)
            .into_bits();
        assert_eq!(all, GERROR_MASK);
    }

    #[test]
    fn table_and_queue_registers_by_bit_position() {
        assert_eq!(
            StrtabBase::new().with_addr((1 << 46) - 1).into_bits(),
            ((1u64 << 52) - 1) & !0x3f
        );
        assert_eq!(StrtabBase::new().with_ra(true).into_bits(), 1 << 62);
        assert_eq!(StrtabBaseCfg::new().with_log2size(0x3f).into_bits(), 0x3f);
        assert_eq!(StrtabBaseCfg::new().with_split(0x1f).into_bits(), 0x1f << 6);
        assert_eq!(StrtabBaseCfg::new().with_fmt(3).into_bits(), 3 << 16);

        assert_eq!(QueueBase::new().with_log2size(0x1f).into_bits(), 0x1f);
        assert_eq!(
            QueueBase::new().with_addr((1 << 47) - 1).into_bits(),
            ((1u64 << 52) - 1) & !0x1f
        );
        assert_eq!(QueueBase::new().with_ra_wa(true).into_bits(), 1 << 62);

        assert_eq!(QueueIndex::new().with_ptr(0xf_ffff).into_bits(), 0xf_ffff);
        assert_eq!(QueueIndex::new().with_err(0x7f).into_bits(), 0x7f << 24);
        assert_eq!(QueueIndex::new().with_ovflg(true).into_bits(), 1 << 31);

        assert_eq!(
            IrqCfg0::new().with_addr((1 << 50) - 1).into_bits(),
            ((1u64 << 52) - 1) & !3
        );
        assert_eq!(IrqCfg2::new().with_memattr(0xf).into_bits(), 0xf);
        assert_eq!(IrqCfg2::new().with_sh(3).into_bits(), 3 << 4);
    }
}
