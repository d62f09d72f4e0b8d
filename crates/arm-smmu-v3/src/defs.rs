//! The driver's own view of the SMMUv3 programming interface: register offsets, field masks
//! of the registers, the STE, the CD, commands and event records — what Linux keeps in
//! `arm-smmu-v3.h`. The driver deliberately does not reuse the `hw` crate's decoders: it
//! writes bits the way a driver does, and the tests check every mask against raw bit
//! positions (IHI0070 chapters 5–7, smmu_kvm.md §4) and against the `hw` model's decoders.

/// Bits `[h:l]` set (`GENMASK_ULL`).
pub const fn genmask(h: u32, l: u32) -> u64 {
    (!0u64 >> (63 - h)) & (!0u64 << l)
}

/// `FIELD_PREP`: `v` placed in `mask` (excess bits dropped).
pub const fn prep(mask: u64, v: u64) -> u64 {
    (v << mask.trailing_zeros()) & mask
}

/// `FIELD_GET`.
pub const fn get(mask: u64, v: u64) -> u64 {
    (v & mask) >> mask.trailing_zeros()
}

pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Register offsets (IHI0070 6.2; smmu_kvm.md §4.1). Event and PRI queue PROD/CONS are
/// reached through page 1, as Linux does.
pub mod reg {
    pub const IDR0: u64 = 0x00;
    pub const IDR1: u64 = 0x04;
    pub const IDR3: u64 = 0x0C;
    pub const IDR5: u64 = 0x14;
    pub const IIDR: u64 = 0x18;
    pub const AIDR: u64 = 0x1C;
    pub const CR0: u64 = 0x20;
    pub const CR0ACK: u64 = 0x24;
    pub const CR1: u64 = 0x28;
    pub const CR2: u64 = 0x2C;
    pub const GBPA: u64 = 0x44;
    pub const IRQ_CTRL: u64 = 0x50;
    pub const IRQ_CTRLACK: u64 = 0x54;
    pub const GERROR: u64 = 0x60;
    pub const GERRORN: u64 = 0x64;
    pub const STRTAB_BASE: u64 = 0x80;
    pub const STRTAB_BASE_CFG: u64 = 0x88;
    pub const CMDQ_BASE: u64 = 0x90;
    pub const CMDQ_PROD: u64 = 0x98;
    pub const CMDQ_CONS: u64 = 0x9C;
    pub const EVTQ_BASE: u64 = 0xA0;
    pub const PRIQ_BASE: u64 = 0xC0;
    pub const PAGE1: u64 = 0x1_0000;
    pub const EVTQ_PROD: u64 = PAGE1 + 0xA8;
    pub const EVTQ_CONS: u64 = PAGE1 + 0xAC;
    pub const PRIQ_PROD: u64 = PAGE1 + 0xC8;
    pub const PRIQ_CONS: u64 = PAGE1 + 0xCC;
}

/// SMMU_IDR0 (IHI0070 6.3.1).
pub mod idr0 {
    use super::*;
    pub const S2P: u64 = bit(0);
    pub const S1P: u64 = bit(1);
    pub const TTF: u64 = genmask(3, 2);
    pub const COHACC: u64 = bit(4);
    pub const BTM: u64 = bit(5);
    pub const HYP: u64 = bit(9);
    pub const ATS: u64 = bit(10);
    pub const ASID16: u64 = bit(12);
    pub const MSI: u64 = bit(13);
    pub const SEV: u64 = bit(14);
    pub const PRI: u64 = bit(16);
    pub const VMID16: u64 = bit(18);
    pub const CD2L: u64 = bit(19);
    pub const TTENDIAN: u64 = genmask(22, 21);
    pub const STALL_MODEL: u64 = genmask(25, 24);
    pub const TERM_MODEL: u64 = bit(26);
    pub const ST_LEVEL: u64 = genmask(28, 27);
}

/// SMMU_IDR1 (IHI0070 6.3.2).
pub mod idr1 {
    use super::*;
    pub const SIDSIZE: u64 = genmask(5, 0);
    pub const SSIDSIZE: u64 = genmask(10, 6);
    pub const PRIQS: u64 = genmask(15, 11);
    pub const EVTQS: u64 = genmask(20, 16);
    pub const CMDQS: u64 = genmask(25, 21);
    pub const REL: u64 = bit(28);
    pub const QUEUES_PRESET: u64 = bit(29);
    pub const TABLES_PRESET: u64 = bit(30);
}

/// SMMU_IDR3 (IHI0070 6.3.4).
pub mod idr3 {
    use super::*;
    pub const FWB: u64 = bit(8);
    pub const RIL: u64 = bit(10);
}

/// SMMU_IDR5 (IHI0070 6.3.6).
pub mod idr5 {
    use super::*;
    pub const OAS: u64 = genmask(2, 0);
    pub const GRAN4K: u64 = bit(4);
    pub const GRAN16K: u64 = bit(5);
    pub const GRAN64K: u64 = bit(6);
    pub const VAX: u64 = genmask(11, 10);
    pub const STALL_MAX: u64 = genmask(31, 16);
}

/// SMMU_CR0 / CR0ACK (IHI0070 6.3.9).
pub mod cr0 {
    use super::*;
    pub const SMMUEN: u64 = bit(0);
    pub const PRIQEN: u64 = bit(1);
    pub const EVTQEN: u64 = bit(2);
    pub const CMDQEN: u64 = bit(3);
    pub const ATSCHK: u64 = bit(4);
}

/// SMMU_CR1 (IHI0070 6.3.11): cacheability and shareability of table and queue accesses.
pub mod cr1 {
    use super::*;
    pub const QUEUE_IC: u64 = genmask(1, 0);
    pub const QUEUE_OC: u64 = genmask(3, 2);
    pub const QUEUE_SH: u64 = genmask(5, 4);
    pub const TABLE_IC: u64 = genmask(7, 6);
    pub const TABLE_OC: u64 = genmask(9, 8);
    pub const TABLE_SH: u64 = genmask(11, 10);
    /// Write-back cacheable.
    pub const CACHE_WB: u64 = 1;
    /// Inner shareable.
    pub const SH_ISH: u64 = 3;
}

/// SMMU_CR2 (IHI0070 6.3.12).
pub mod cr2 {
    use super::*;
    pub const E2H: u64 = bit(0);
    pub const RECINVSID: u64 = bit(1);
    pub const PTM: u64 = bit(2);
}

/// SMMU_GBPA (IHI0070 6.3.14).
pub mod gbpa {
    use super::*;
    pub const ABORT: u64 = bit(20);
    pub const UPDATE: u64 = bit(31);
}

/// SMMU_IRQ_CTRL (IHI0070 6.3.16).
pub mod irq_ctrl {
    use super::*;
    pub const GERROR_IRQEN: u64 = bit(0);
    pub const PRIQ_IRQEN: u64 = bit(1);
    pub const EVTQ_IRQEN: u64 = bit(2);
}

/// SMMU_GERROR / GERRORN (IHI0070 6.3.19).
pub mod gerror {
    use super::*;
    pub const CMDQ_ERR: u64 = bit(0);
    pub const EVTQ_ABT_ERR: u64 = bit(2);
    pub const PRIQ_ABT_ERR: u64 = bit(3);
    pub const MSI_CMDQ_ABT_ERR: u64 = bit(4);
    pub const ERR_MASK: u64 = 0x1fd;
}

/// STRTAB_BASE, STRTAB_BASE_CFG (IHI0070 6.3.24–25).
pub mod strtab {
    use super::*;
    pub const BASE_RA: u64 = bit(62);
    pub const BASE_ADDR: u64 = genmask(51, 6);
    pub const CFG_LOG2SIZE: u64 = genmask(5, 0);
    pub const CFG_SPLIT: u64 = genmask(10, 6);
    pub const CFG_FMT: u64 = genmask(17, 16);
    pub const FMT_LINEAR: u64 = 0;
    pub const FMT_2LVL: u64 = 1;
    /// Linux's SPLIT: 256 STEs per level-2 table.
    pub const SPLIT: u32 = 8;
    /// Linux caps the level-1 table at 2^20 bytes.
    pub const L1_SZ_SHIFT: u32 = 20;
    /// L1STD (IHI0070 5.1): Span bits 4:0, L2Ptr bits 51:6.
    pub const L1_DESC_SPAN: u64 = genmask(4, 0);
    pub const L1_DESC_L2PTR: u64 = genmask(51, 6);
    pub const STE_SIZE: u64 = 64;
}

/// Queue base and pointer registers (IHI0070 6.3.26–28, 3.5.1).
pub mod q {
    use super::*;
    pub const BASE_RWA: u64 = bit(62);
    pub const BASE_ADDR: u64 = genmask(51, 5);
    pub const BASE_LOG2SIZE: u64 = genmask(4, 0);
    /// EVENTQ_PROD.OVFLG / EVENTQ_CONS.OVACKFLG (and the PRI queue's).
    pub const OVF: u64 = bit(31);
    /// CMDQ_CONS.ERR.
    pub const CONS_ERR: u64 = genmask(30, 24);
    pub const CERROR_NONE: u64 = 0;
    pub const CERROR_ILL: u64 = 1;
    pub const CERROR_ABT: u64 = 2;
    pub const CERROR_ATC_INV_SYNC: u64 = 3;
    pub const CMDQ_ENT_DWORDS: u64 = 2;
    pub const EVTQ_ENT_DWORDS: u64 = 4;
    pub const PRIQ_ENT_DWORDS: u64 = 2;
    /// log2 of a command's size in bytes (CMDQ_ENT_SZ_SHIFT).
    pub const CMDQ_ENT_SZ_SHIFT: u32 = 4;
}

/// Stream Table Entry (IHI0070 5.2; smmu_kvm.md §4.4), as Linux's STRTAB_STE_* masks.
pub mod ste {
    use super::*;
    pub const DWORDS: usize = 8;
    pub const V: u64 = bit(0);
    pub const CFG: u64 = genmask(3, 1);
    pub const CFG_ABORT: u64 = 0;
    pub const CFG_BYPASS: u64 = 4;
    pub const CFG_S1_TRANS: u64 = 5;
    pub const CFG_S2_TRANS: u64 = 6;
    pub const CFG_NESTED: u64 = 7;
    pub const S1FMT: u64 = genmask(5, 4);
    pub const S1FMT_LINEAR: u64 = 0;
    /// S1ContextPtr: Linux uses bits 51:6 (52-bit PAs); IHI0070 G.b declares 55:6.
    pub const S1CTXPTR: u64 = genmask(51, 6);
    pub const S1CDMAX: u64 = genmask(63, 59);
    /// The dword-0 fields a guest controls in a nested STE (Linux NESTING_ALLOWED).
    pub const DW0_NESTING_ALLOWED: u64 = V | CFG | S1FMT | S1CTXPTR | S1CDMAX;

    pub const S1DSS: u64 = genmask(1, 0);
    pub const S1DSS_TERMINATE: u64 = 0;
    pub const S1DSS_BYPASS: u64 = 1;
    pub const S1DSS_SSID0: u64 = 2;
    pub const S1CIR: u64 = genmask(3, 2);
    pub const S1COR: u64 = genmask(5, 4);
    pub const S1CSH: u64 = genmask(7, 6);
    /// Cacheability: 1 = write-back read-allocate (Linux STRTAB_STE_1_S1C_CACHE_WBRA).
    pub const S1C_CACHE_WBRA: u64 = 1;
    pub const MEV: u64 = bit(19);
    pub const S2FWB: u64 = bit(25);
    pub const S1STALLD: u64 = bit(27);
    pub const EATS: u64 = genmask(29, 28);
    pub const EATS_ABT: u64 = 0;
    pub const EATS_TRANS: u64 = 1;
    pub const EATS_S1CHK: u64 = 2;
    pub const STRW: u64 = genmask(31, 30);
    pub const STRW_NSEL1: u64 = 0;
    pub const STRW_EL2: u64 = 2;
    pub const SHCFG: u64 = genmask(45, 44);
    pub const SHCFG_INCOMING: u64 = 1;
    /// The dword-1 fields a guest controls in a nested STE.
    pub const DW1_NESTING_ALLOWED: u64 = S1DSS | S1CIR | S1COR | S1CSH | S1STALLD | EATS;

    pub const S2VMID: u64 = genmask(15, 0);
    pub const VTCR: u64 = genmask(50, 32);
    pub const S2T0SZ: u64 = genmask(37, 32);
    pub const S2SL0: u64 = genmask(39, 38);
    pub const S2IR0: u64 = genmask(41, 40);
    pub const S2OR0: u64 = genmask(43, 42);
    pub const S2SH0: u64 = genmask(45, 44);
    pub const S2TG: u64 = genmask(47, 46);
    pub const S2PS: u64 = genmask(50, 48);
    pub const S2AA64: u64 = bit(51);
    pub const S2ENDI: u64 = bit(52);
    pub const S2PTW: u64 = bit(54);
    pub const S2S: u64 = bit(57);
    pub const S2R: u64 = bit(58);

    pub const S2TTB: u64 = genmask(51, 4);
}

/// Context Descriptor (IHI0070 5.4; smmu_kvm.md §4.5), as Linux's CTXDESC_CD_* masks.
pub mod cd {
    use super::*;
    pub const DWORDS: usize = 8;
    pub const SIZE: u64 = 64;
    pub const T0SZ: u64 = genmask(5, 0);
    pub const TG0: u64 = genmask(7, 6);
    pub const IRGN0: u64 = genmask(9, 8);
    pub const ORGN0: u64 = genmask(11, 10);
    pub const SH0: u64 = genmask(13, 12);
    pub const EPD0: u64 = bit(14);
    pub const EPD1: u64 = bit(30);
    pub const V: u64 = bit(31);
    pub const IPS: u64 = genmask(34, 32);
    pub const AA64: u64 = bit(41);
    pub const S: u64 = bit(44);
    pub const R: u64 = bit(45);
    pub const A: u64 = bit(46);
    pub const ASET: u64 = bit(47);
    pub const ASID: u64 = genmask(63, 48);
    pub const TTB0: u64 = genmask(51, 4);
}

/// Command queue entries (IHI0070 chapter 4; smmu_kvm.md §4.7).
pub mod cmd {
    use super::*;
    pub const OP: u64 = genmask(7, 0);
    pub const OP_PREFETCH_CFG: u64 = 0x01;
    pub const OP_CFGI_STE: u64 = 0x03;
    /// CFGI_STE_RANGE; with Range = 31 this is CMD_CFGI_ALL.
    pub const OP_CFGI_ALL: u64 = 0x04;
    pub const OP_CFGI_CD: u64 = 0x05;
    pub const OP_CFGI_CD_ALL: u64 = 0x06;
    pub const OP_TLBI_NH_ALL: u64 = 0x10;
    pub const OP_TLBI_NH_ASID: u64 = 0x11;
    pub const OP_TLBI_NH_VA: u64 = 0x12;
    pub const OP_TLBI_NH_VAA: u64 = 0x13;
    pub const OP_TLBI_EL2_ALL: u64 = 0x20;
    pub const OP_TLBI_EL2_ASID: u64 = 0x21;
    pub const OP_TLBI_EL2_VA: u64 = 0x22;
    pub const OP_TLBI_S12_VMALL: u64 = 0x28;
    pub const OP_TLBI_S2_IPA: u64 = 0x2A;
    pub const OP_TLBI_NSNH_ALL: u64 = 0x30;
    pub const OP_ATC_INV: u64 = 0x40;
    pub const OP_PRI_RESP: u64 = 0x41;
    pub const OP_RESUME: u64 = 0x44;
    pub const OP_STALL_TERM: u64 = 0x45;
    pub const OP_SYNC: u64 = 0x46;

    pub const SSV: u64 = bit(11);
    pub const SSID: u64 = genmask(31, 12);
    pub const SID: u64 = genmask(63, 32);
    pub const CFGI_1_LEAF: u64 = bit(0);
    pub const CFGI_1_RANGE: u64 = genmask(4, 0);

    pub const TLBI_0_NUM: u64 = genmask(16, 12);
    pub const TLBI_RANGE_NUM_MAX: u64 = 31;
    pub const TLBI_0_SCALE: u64 = genmask(24, 20);
    pub const TLBI_0_VMID: u64 = genmask(47, 32);
    pub const TLBI_0_ASID: u64 = genmask(63, 48);
    pub const TLBI_1_LEAF: u64 = bit(0);
    pub const TLBI_1_TTL: u64 = genmask(9, 8);
    pub const TLBI_1_TG: u64 = genmask(11, 10);
    pub const TLBI_1_VA: u64 = genmask(63, 12);
    pub const TLBI_1_IPA: u64 = genmask(51, 12);

    pub const ATC_0_GLOBAL: u64 = bit(9);
    pub const ATC_1_SIZE: u64 = genmask(5, 0);
    pub const ATC_1_ADDR: u64 = genmask(63, 12);
    /// Size 52: the whole address space.
    pub const ATC_INV_SIZE_ALL: u64 = 52;

    pub const PRI_1_GRPID: u64 = genmask(8, 0);
    pub const PRI_1_RESP: u64 = genmask(13, 12);
    pub const PRI_RESP_DENY: u64 = 0;
    pub const PRI_RESP_FAIL: u64 = 1;
    pub const PRI_RESP_SUCC: u64 = 2;

    pub const RESUME_0_RESP: u64 = genmask(13, 12);
    pub const RESUME_RESP_TERM: u64 = 0;
    pub const RESUME_RESP_RETRY: u64 = 1;
    pub const RESUME_RESP_ABORT: u64 = 2;
    pub const RESUME_1_STAG: u64 = genmask(15, 0);

    pub const SYNC_0_CS: u64 = genmask(13, 12);
    pub const SYNC_CS_NONE: u64 = 0;
    pub const SYNC_CS_IRQ: u64 = 1;
    pub const SYNC_CS_SEV: u64 = 2;
    pub const SYNC_0_MSH: u64 = genmask(23, 22);
    pub const SYNC_0_MSIATTR: u64 = genmask(27, 24);
    pub const SYNC_0_MSIDATA: u64 = genmask(63, 32);
    pub const SYNC_1_MSIADDR: u64 = genmask(51, 2);
    /// Inner shareable, outer write-back cacheable MSI write (Linux ARM_SMMU_MEMATTR_OIWB).
    pub const MEMATTR_OIWB: u64 = 0xf;
}

/// Event records (IHI0070 7.3; smmu_kvm.md §4.9).
pub mod evt {
    use super::*;
    pub const ID: u64 = genmask(7, 0);
    pub const SSV: u64 = bit(11);
    pub const SSID: u64 = genmask(31, 12);
    pub const SID: u64 = genmask(63, 32);
    pub const STAG: u64 = genmask(15, 0);
    pub const STALL: u64 = bit(31);
    pub const PNU: u64 = bit(33);
    pub const IND: u64 = bit(34);
    pub const RNW: u64 = bit(35);
    pub const S2: u64 = bit(39);
    pub const CLASS: u64 = genmask(41, 40);

    pub const ID_BAD_STE: u64 = 0x04;
    pub const ID_STREAM_DISABLED: u64 = 0x06;
    pub const ID_BAD_SUBSTREAMID: u64 = 0x08;
    pub const ID_BAD_CD: u64 = 0x0a;
    pub const ID_TRANSLATION: u64 = 0x10;
    pub const ID_ADDR_SIZE: u64 = 0x11;
    pub const ID_ACCESS: u64 = 0x12;
    pub const ID_PERMISSION: u64 = 0x13;

    /// The event types iommufd forwards to a vEVENTQ (smmu_kvm.md §4.9, end).
    pub const fn forwarded(id: u64) -> bool {
        matches!(
            id,
            ID_BAD_STE
                | ID_STREAM_DISABLED
                | ID_BAD_SUBSTREAMID
                | ID_BAD_CD
                | ID_TRANSLATION
                | ID_ADDR_SIZE
                | ID_ACCESS
                | ID_PERMISSION
        )
    }
}

/// PRI queue entries (Linux PRIQ_0/PRIQ_1).
pub mod priq {
    use super::*;
    pub const SID: u64 = genmask(31, 0);
    pub const SSID: u64 = genmask(51, 32);
    pub const PERM_PRIV: u64 = bit(58);
    pub const PERM_EXEC: u64 = bit(59);
    pub const PERM_READ: u64 = bit(60);
    pub const PERM_WRITE: u64 = bit(61);
    pub const PRG_LAST: u64 = bit(62);
    pub const SSID_V: u64 = bit(63);
    pub const PRG_IDX: u64 = genmask(8, 0);
    pub const ADDR: u64 = genmask(63, 12);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(genmask(3, 1), 0b1110);
        assert_eq!(genmask(63, 0), u64::MAX);
        assert_eq!(genmask(0, 0), 1);
        assert_eq!(prep(genmask(7, 4), 0x1f), 0xf0);
        assert_eq!(get(genmask(7, 4), 0xab), 0xa);
    }

    /// Every field at its architectural bit position, written out independently.
    #[test]
    fn ste_fields_by_bit_position() {
        assert_eq!(ste::V, 1 << 0);
        assert_eq!(ste::CFG, 0b111 << 1);
        assert_eq!(ste::S1FMT, 0b11 << 4);
        assert_eq!(ste::S1CTXPTR, ((1u64 << 52) - 1) & !0x3f);
        assert_eq!(ste::S1CDMAX, 0x1f << 59);
        assert_eq!(ste::S1DSS, 0b11);
        assert_eq!(ste::S1CIR, 0b11 << 2);
        assert_eq!(ste::S1COR, 0b11 << 4);
        assert_eq!(ste::S1CSH, 0b11 << 6);
        assert_eq!(ste::MEV, 1 << 19);
        assert_eq!(ste::S2FWB, 1 << 25);
        assert_eq!(ste::S1STALLD, 1 << 27);
        assert_eq!(ste::EATS, 0b11 << 28);
        assert_eq!(ste::STRW, 0b11 << 30);
        assert_eq!(ste::SHCFG, 0b11 << 44);
        assert_eq!(ste::S2VMID, 0xffff);
        assert_eq!(ste::S2T0SZ, 0x3f << 32);
        assert_eq!(ste::S2SL0, 0b11 << 38);
        assert_eq!(ste::S2IR0, 0b11 << 40);
        assert_eq!(ste::S2OR0, 0b11 << 42);
        assert_eq!(ste::S2SH0, 0b11 << 44);
        assert_eq!(ste::S2TG, 0b11 << 46);
        assert_eq!(ste::S2PS, 0b111 << 48);
        assert_eq!(ste::VTCR, 0x7ffff << 32);
        assert_eq!(ste::S2AA64, 1 << 51);
        assert_eq!(ste::S2ENDI, 1 << 52);
        assert_eq!(ste::S2PTW, 1 << 54);
        assert_eq!(ste::S2S, 1 << 57);
        assert_eq!(ste::S2R, 1 << 58);
        assert_eq!(ste::S2TTB, ((1u64 << 52) - 1) & !0xf);
    }

    #[test]
    fn cd_fields_by_bit_position() {
        assert_eq!(cd::T0SZ, 0x3f);
        assert_eq!(cd::TG0, 0b11 << 6);
        assert_eq!(cd::IRGN0, 0b11 << 8);
        assert_eq!(cd::ORGN0, 0b11 << 10);
        assert_eq!(cd::SH0, 0b11 << 12);
        assert_eq!(cd::EPD0, 1 << 14);
        assert_eq!(cd::EPD1, 1 << 30);
        assert_eq!(cd::V, 1 << 31);
        assert_eq!(cd::IPS, 0b111 << 32);
        assert_eq!(cd::AA64, 1 << 41);
        assert_eq!(cd::S, 1 << 44);
        assert_eq!(cd::R, 1 << 45);
        assert_eq!(cd::A, 1 << 46);
        assert_eq!(cd::ASET, 1 << 47);
        assert_eq!(cd::ASID, 0xffff << 48);
        assert_eq!(cd::TTB0, ((1u64 << 52) - 1) & !0xf);
    }

    #[test]
    fn command_fields_by_bit_position() {
        assert_eq!(cmd::SSV, 1 << 11);
        assert_eq!(cmd::SSID, 0xf_ffff << 12);
        assert_eq!(cmd::SID, 0xffff_ffff << 32);
        assert_eq!(cmd::TLBI_0_NUM, 0x1f << 12);
        assert_eq!(cmd::TLBI_0_SCALE, 0x1f << 20);
        assert_eq!(cmd::TLBI_0_VMID, 0xffff << 32);
        assert_eq!(cmd::TLBI_0_ASID, 0xffff << 48);
        assert_eq!(cmd::TLBI_1_TTL, 0b11 << 8);
        assert_eq!(cmd::TLBI_1_TG, 0b11 << 10);
        assert_eq!(cmd::ATC_0_GLOBAL, 1 << 9);
        assert_eq!(cmd::SYNC_0_CS, 0b11 << 12);
        assert_eq!(cmd::SYNC_0_MSH, 0b11 << 22);
        assert_eq!(cmd::SYNC_0_MSIATTR, 0xf << 24);
        assert_eq!(cmd::SYNC_0_MSIDATA, 0xffff_ffff << 32);
        assert_eq!(cmd::SYNC_1_MSIADDR, ((1u64 << 52) - 1) & !3);
        assert_eq!(cmd::RESUME_0_RESP, 0b11 << 12);
        assert_eq!(cmd::PRI_1_RESP, 0b11 << 12);
    }

    #[test]
    fn register_fields_by_bit_position() {
        assert_eq!(idr0::BTM, 1 << 5);
        assert_eq!(idr0::HYP, 1 << 9);
        assert_eq!(idr0::VMID16, 1 << 18);
        assert_eq!(idr0::ST_LEVEL, 0b11 << 27);
        assert_eq!(idr1::CMDQS, 0x1f << 21);
        assert_eq!(idr1::EVTQS, 0x1f << 16);
        assert_eq!(idr1::PRIQS, 0x1f << 11);
        assert_eq!(idr3::RIL, 1 << 10);
        assert_eq!(cr2::PTM, 1 << 2);
        assert_eq!(gbpa::ABORT, 1 << 20);
        assert_eq!(gbpa::UPDATE, 1 << 31);
        assert_eq!(strtab::CFG_FMT, 0b11 << 16);
        assert_eq!(strtab::CFG_SPLIT, 0x1f << 6);
        assert_eq!(q::CONS_ERR, 0x7f << 24);
        assert_eq!(q::BASE_ADDR, ((1u64 << 52) - 1) & !0x1f);
        assert_eq!(evt::S2, 1 << 39);
        assert_eq!(evt::STALL, 1 << 31);
    }
}
