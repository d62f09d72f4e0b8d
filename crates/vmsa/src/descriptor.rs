//! VMSAv8-64 descriptor formats: every field of table, block and page descriptors for both
//! stages (smmu_kvm.md §4.12; DDI0487 D8.3). Bit positions are the constants below; the
//! tests assert them as raw numbers.

use crate::geometry::Granule;

/// Bit 0: valid.
pub const VALID: u64 = 1 << 0;
/// Bit 1: table (levels 0–2) or page (level 3); 0 with VALID = block.
pub const TABLE_OR_PAGE: u64 = 1 << 1;

// ---- Stage-1 block/page (lower and upper attributes) ----
/// AttrIndx\[2:0\], bits \[4:2\]: index into MAIR.
pub const S1_ATTR_INDX_SHIFT: u32 = 2;
pub const S1_ATTR_INDX_MASK: u64 = 0b111 << S1_ATTR_INDX_SHIFT;
/// NS, bit 5.
pub const S1_NS: u64 = 1 << 5;
/// AP\[1\], bit 6: unprivileged (EL0) access allowed.
pub const S1_AP_EL0: u64 = 1 << 6;
/// AP\[2\], bit 7: read-only.
pub const S1_AP_RO: u64 = 1 << 7;
/// SH\[1:0\], bits \[9:8\] (both stages).
pub const SH_SHIFT: u32 = 8;
pub const SH_MASK: u64 = 0b11 << SH_SHIFT;
/// AF, bit 10 (both stages).
pub const AF: u64 = 1 << 10;
/// nG, bit 11: not global, the entry is tagged with the ASID.
pub const S1_NG: u64 = 1 << 11;
/// nT, bit 16 (block descriptors with FEAT_BBM): decoded only as part of the raw descriptor.
pub const NT: u64 = 1 << 16;
/// GP, bit 50 (BTI guarded page).
pub const S1_GP: u64 = 1 << 50;
/// DBM, bit 51 (both stages).
pub const DBM: u64 = 1 << 51;
/// Contiguous hint, bit 52 (both stages).
pub const CONTIGUOUS: u64 = 1 << 52;
/// PXN, bit 53.
pub const S1_PXN: u64 = 1 << 53;
/// UXN (XN), bit 54.
pub const S1_UXN: u64 = 1 << 54;
/// Software-defined bits \[58:55\] (both stages).
pub const SW_SHIFT: u32 = 55;
pub const SW_MASK: u64 = 0xF << SW_SHIFT;
/// PBHA bits \[62:59\] of stage-1 leaf descriptors.
pub const PBHA_SHIFT: u32 = 59;
pub const PBHA_MASK: u64 = 0xF << PBHA_SHIFT;

// ---- Stage-1 table descriptor hierarchical attributes (ignored under HADx) ----
/// PXNTable, bit 59.
pub const TABLE_PXN: u64 = 1 << 59;
/// UXNTable (XNTable), bit 60.
pub const TABLE_UXN: u64 = 1 << 60;
/// APTable\[0\], bit 61: no unprivileged access below.
pub const TABLE_AP_NO_EL0: u64 = 1 << 61;
/// APTable\[1\], bit 62: no write access below.
pub const TABLE_AP_RO: u64 = 1 << 62;
/// NSTable, bit 63.
pub const TABLE_NS: u64 = 1 << 63;

// ---- Stage-2 block/page ----
/// MemAttr\[3:0\], bits \[5:2\].
pub const S2_MEMATTR_SHIFT: u32 = 2;
pub const S2_MEMATTR_MASK: u64 = 0xF << S2_MEMATTR_SHIFT;
/// S2AP\[0\], bit 6: read allowed.
pub const S2_AP_READ: u64 = 1 << 6;
/// S2AP\[1\], bit 7: write allowed.
pub const S2_AP_WRITE: u64 = 1 << 7;
/// XN\[1:0\], bits \[54:53\] (FEAT_XNX; without it only bit 54 counts).
pub const S2_XN_SHIFT: u32 = 53;
pub const S2_XN_MASK: u64 = 0b11 << S2_XN_SHIFT;

/// Output/next-table address bits \[47:12\] before granule alignment.
pub const OA_MASK_48: u64 = 0x0000_FFFF_FFFF_F000;
/// With a 64K granule and 52-bit PAs, descriptor bits \[15:12\] hold OA\[51:48\].
pub const OA_HI_64K_SHIFT: u32 = 12;
pub const OA_HI_64K_MASK: u64 = 0xF << OA_HI_64K_SHIFT;

/// What bits\[1:0\] of a descriptor mean at a given level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorKind {
    /// Bit 0 clear: Translation fault.
    Invalid,
    /// 0b01 where a block is allowed.
    Block,
    /// 0b11 at levels 0–2.
    Table,
    /// 0b11 at level 3.
    Page,
    /// 0b01 where no block is allowed (including level 3): Translation fault.
    Reserved,
}

/// One 64-bit translation table descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Descriptor(pub u64);

impl Descriptor {
    pub const INVALID: Descriptor = Descriptor(0);

    /// Decodes bits\[1:0\] at `level` (smmu_kvm.md §4.12).
    #[inline(always)]
    pub const fn kind(self, granule: Granule, level: u8, pa52: bool) -> DescriptorKind {
        if self.0 & VALID == 0 {
            DescriptorKind::Invalid
        } else if self.0 & TABLE_OR_PAGE != 0 {
            if level == 3 {
                DescriptorKind::Page
            } else {
                DescriptorKind::Table
            }
        } else if level < 3 && granule.block_allowed(level, pa52) {
            DescriptorKind::Block
        } else {
            DescriptorKind::Reserved
        }
    }

    /// The address field aligned to the granule: bits \[47:G\], plus OA\[51:48\] from bits
    /// \[15:12\] for a 64K granule when `pa52` (the implementation has 52-bit PAs).
    #[inline(always)]
    pub const fn address(self, granule: Granule, pa52: bool) -> u64 {
        let mut a = self.0 & OA_MASK_48 & !(granule.size() - 1);
        if pa52 && matches!(granule, Granule::Size64K) {
            a |= ((self.0 & OA_HI_64K_MASK) >> OA_HI_64K_SHIFT) << 48;
        }
        a
    }

    /// Encodes an address into the address field (inverse of [`Descriptor::address`]).
    pub const fn encode_address(addr: u64, granule: Granule) -> u64 {
        let mut d = addr & OA_MASK_48 & !(granule.size() - 1);
        if matches!(granule, Granule::Size64K) {
            d |= ((addr >> 48) & 0xF) << OA_HI_64K_SHIFT;
        }
        d
    }

    #[inline(always)]
    pub const fn is_valid(self) -> bool {
        self.0 & VALID != 0
    }
    #[inline(always)]
    pub const fn af(self) -> bool {
        self.0 & AF != 0
    }
    #[inline(always)]
    pub const fn contiguous(self) -> bool {
        self.0 & CONTIGUOUS != 0
    }
    #[inline(always)]
    pub const fn dbm(self) -> bool {
        self.0 & DBM != 0
    }
    #[inline(always)]
    pub const fn sh(self) -> u8 {
        ((self.0 & SH_MASK) >> SH_SHIFT) as u8
    }
    #[inline(always)]
    pub const fn sw(self) -> u8 {
        ((self.0 & SW_MASK) >> SW_SHIFT) as u8
    }
    #[inline(always)]
    pub const fn s1_attr_index(self) -> u8 {
        ((self.0 & S1_ATTR_INDX_MASK) >> S1_ATTR_INDX_SHIFT) as u8
    }
    #[inline(always)]
    pub const fn s1_ns(self) -> bool {
        self.0 & S1_NS != 0
    }
    #[inline(always)]
    pub const fn s1_ap_el0(self) -> bool {
        self.0 & S1_AP_EL0 != 0
    }
    #[inline(always)]
    pub const fn s1_ap_ro(self) -> bool {
        self.0 & S1_AP_RO != 0
    }
    #[inline(always)]
    pub const fn s1_ng(self) -> bool {
        self.0 & S1_NG != 0
    }
    #[inline(always)]
    pub const fn s1_pxn(self) -> bool {
        self.0 & S1_PXN != 0
    }
    #[inline(always)]
    pub const fn s1_uxn(self) -> bool {
        self.0 & S1_UXN != 0
    }
    #[inline(always)]
    pub const fn s1_gp(self) -> bool {
        self.0 & S1_GP != 0
    }
    #[inline(always)]
    pub const fn pbha(self) -> u8 {
        ((self.0 & PBHA_MASK) >> PBHA_SHIFT) as u8
    }
    #[inline(always)]
    pub const fn table_pxn(self) -> bool {
        self.0 & TABLE_PXN != 0
    }
    #[inline(always)]
    pub const fn table_uxn(self) -> bool {
        self.0 & TABLE_UXN != 0
    }
    #[inline(always)]
    pub const fn table_ap_no_el0(self) -> bool {
        self.0 & TABLE_AP_NO_EL0 != 0
    }
    #[inline(always)]
    pub const fn table_ap_ro(self) -> bool {
        self.0 & TABLE_AP_RO != 0
    }
    #[inline(always)]
    pub const fn table_ns(self) -> bool {
        self.0 & TABLE_NS != 0
    }
    #[inline(always)]
    pub const fn s2_mem_attr(self) -> u8 {
        ((self.0 & S2_MEMATTR_MASK) >> S2_MEMATTR_SHIFT) as u8
    }
    #[inline(always)]
    pub const fn s2_read(self) -> bool {
        self.0 & S2_AP_READ != 0
    }
    #[inline(always)]
    pub const fn s2_write(self) -> bool {
        self.0 & S2_AP_WRITE != 0
    }
    #[inline(always)]
    pub const fn s2_xn(self) -> u8 {
        ((self.0 & S2_XN_MASK) >> S2_XN_SHIFT) as u8
    }

    /// A table descriptor pointing at `table` (no hierarchical attributes).
    pub const fn table(table: u64, granule: Granule) -> Descriptor {
        Descriptor(Descriptor::encode_address(table, granule) | VALID | TABLE_OR_PAGE)
    }

    /// A leaf at `level`: a page at level 3, a block elsewhere. `attrs` are the attribute
    /// bits (everything but the type bits and the address; see [`S1LeafAttrs`] and
    /// [`S2LeafAttrs`]).
    pub const fn leaf(oa: u64, level: u8, granule: Granule, attrs: u64) -> Descriptor {
        let ty = if level == 3 {
            VALID | TABLE_OR_PAGE
        } else {
            VALID
        };
        let attrs = attrs & !(VALID | TABLE_OR_PAGE | OA_MASK_48);
        Descriptor(Descriptor::encode_address(oa, granule) | attrs | ty)
    }
}

/// Attribute bits a leaf (block or page) descriptor may carry; everything else belongs to the
/// type and address fields.
pub const LEAF_ATTR_MASK: u64 = !(VALID | TABLE_OR_PAGE | OA_MASK_48);

/// Stage-1 leaf attributes, for building descriptors (the walker decodes the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct S1LeafAttrs {
    /// AttrIndx\[2:0\]: the MAIR byte to use.
    pub attr_index: u8,
    /// SH\[1:0\]: 0 non-shareable, 2 outer, 3 inner.
    pub sh: u8,
    /// AP\[2\]: read-only.
    pub read_only: bool,
    /// AP\[1\]: unprivileged access allowed.
    pub el0: bool,
    pub pxn: bool,
    pub uxn: bool,
    /// nG: tagged with the ASID (not global).
    pub not_global: bool,
    /// AF; set it unless the caller wants Access flag faults.
    pub af: bool,
    pub ns: bool,
    pub dbm: bool,
    pub contiguous: bool,
    /// Software bits \[58:55\].
    pub sw: u8,
}

impl S1LeafAttrs {
    /// Normal memory (MAIR index 0), inner shareable, privileged RW, AF set: a common default.
    pub const fn rw() -> Self {
        S1LeafAttrs {
            attr_index: 0,
            sh: 3,
            read_only: false,
            el0: false,
            pxn: false,
            uxn: false,
            not_global: false,
            af: true,
            ns: false,
            dbm: false,
            contiguous: false,
            sw: 0,
        }
    }

    pub const fn bits(&self) -> u64 {
        ((self.attr_index as u64 & 7) << S1_ATTR_INDX_SHIFT)
            | ((self.sh as u64 & 3) << SH_SHIFT)
            | if self.read_only { S1_AP_RO } else { 0 }
            | if self.el0 { S1_AP_EL0 } else { 0 }
            | if self.pxn { S1_PXN } else { 0 }
            | if self.uxn { S1_UXN } else { 0 }
            | if self.not_global { S1_NG } else { 0 }
            | if self.af { AF } else { 0 }
            | if self.ns { S1_NS } else { 0 }
            | if self.dbm { DBM } else { 0 }
            | if self.contiguous { CONTIGUOUS } else { 0 }
            | ((self.sw as u64 & 0xF) << SW_SHIFT)
    }
}

/// Stage-2 leaf attributes, for building descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct S2LeafAttrs {
    /// MemAttr\[3:0\] (0b1111 = Normal write-back inner and outer).
    pub mem_attr: u8,
    pub sh: u8,
    /// S2AP\[0\].
    pub read: bool,
    /// S2AP\[1\].
    pub write: bool,
    /// XN\[1:0\] (bits 54:53).
    pub xn: u8,
    pub af: bool,
    pub dbm: bool,
    pub contiguous: bool,
    pub sw: u8,
}

impl S2LeafAttrs {
    /// Normal write-back memory, inner shareable, read/write, executable, AF set.
    pub const fn rw() -> Self {
        S2LeafAttrs {
            mem_attr: 0b1111,
            sh: 3,
            read: true,
            write: true,
            xn: 0,
            af: true,
            dbm: false,
            contiguous: false,
            sw: 0,
        }
    }

    pub const fn bits(&self) -> u64 {
        ((self.mem_attr as u64 & 0xF) << S2_MEMATTR_SHIFT)
            | ((self.sh as u64 & 3) << SH_SHIFT)
            | if self.read { S2_AP_READ } else { 0 }
            | if self.write { S2_AP_WRITE } else { 0 }
            | ((self.xn as u64 & 3) << S2_XN_SHIFT)
            | if self.af { AF } else { 0 }
            | if self.dbm { DBM } else { 0 }
            | if self.contiguous { CONTIGUOUS } else { 0 }
            | ((self.sw as u64 & 0xF) << SW_SHIFT)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every field at its raw bit position (smmu_kvm.md §4.12), not through our accessors.
    #[test]
    fn field_positions_are_the_architectural_ones() {
        assert_eq!(VALID, 1 << 0);
        assert_eq!(TABLE_OR_PAGE, 1 << 1);
        assert_eq!(S1_ATTR_INDX_MASK, 0b11100);
        assert_eq!(S1_NS, 1 << 5);
        assert_eq!(S1_AP_EL0, 1 << 6);
        assert_eq!(S1_AP_RO, 1 << 7);
        assert_eq!(SH_MASK, 0b11 << 8);
        assert_eq!(AF, 1 << 10);
        assert_eq!(S1_NG, 1 << 11);
        assert_eq!(DBM, 1 << 51);
        assert_eq!(CONTIGUOUS, 1 << 52);
        assert_eq!(S1_PXN, 1 << 53);
        assert_eq!(S1_UXN, 1 << 54);
        assert_eq!(SW_MASK, 0xF << 55);
        assert_eq!(TABLE_PXN, 1 << 59);
        assert_eq!(TABLE_UXN, 1 << 60);
        assert_eq!(TABLE_AP_NO_EL0, 1 << 61);
        assert_eq!(TABLE_AP_RO, 1 << 62);
        assert_eq!(TABLE_NS, 1 << 63);
        assert_eq!(S2_MEMATTR_MASK, 0b111100);
        assert_eq!(S2_AP_READ, 1 << 6);
        assert_eq!(S2_AP_WRITE, 1 << 7);
        assert_eq!(S2_XN_MASK, (1 << 53) | (1 << 54));
        assert_eq!(OA_MASK_48, ((1u64 << 48) - 1) & !0xFFF);
        assert_eq!(NT, 1 << 16);
        assert_eq!(S1_GP, 1 << 50);
        assert_eq!(PBHA_MASK, 0xF << 59);
        assert_eq!(OA_HI_64K_MASK, 0xF << 12);
    }

    #[test]
    fn accessors_read_the_raw_bits() {
        let d = Descriptor(
            (5 << 2)
                | (1 << 5)
                | (1 << 6)
                | (1 << 7)
                | (2 << 8)
                | (1 << 10)
                | (1 << 11)
                | (1 << 51)
                | (1 << 52)
                | (1 << 53)
                | (1 << 54)
                | (0xA << 55)
                | 1,
        );
        assert_eq!(d.s1_attr_index(), 5);
        assert!(d.s1_ns() && d.s1_ap_el0() && d.s1_ap_ro() && d.af() && d.s1_ng());
        assert_eq!(d.sh(), 2);
        assert!(d.dbm() && d.contiguous() && d.s1_pxn() && d.s1_uxn());
        assert_eq!(d.sw(), 0xA);
        assert_eq!(d.s2_xn(), 0b11);
        // MemAttr[3:0] = bits [5:2]: NS (bit 5) doubles as MemAttr[3].
        assert_eq!(d.s2_mem_attr(), 0b1101);
        let t = Descriptor((1 << 59) | (1 << 60) | (1 << 61) | (1 << 62) | (1 << 63) | 3);
        assert!(t.table_pxn() && t.table_uxn() && t.table_ap_no_el0() && t.table_ap_ro());
        assert!(t.table_ns());
        assert!(!Descriptor(1 << 59).table_uxn());
    }

    #[test]
    fn kinds_by_level() {
        use DescriptorKind::*;
        let block = Descriptor(0b01);
        let tp = Descriptor(0b11);
        assert_eq!(Descriptor(0b10).kind(Granule::Size4K, 1, false), Invalid);
        assert_eq!(block.kind(Granule::Size4K, 0, false), Reserved);
        assert_eq!(block.kind(Granule::Size4K, 1, false), Block);
        assert_eq!(block.kind(Granule::Size4K, 2, false), Block);
        assert_eq!(block.kind(Granule::Size4K, 3, false), Reserved);
        assert_eq!(block.kind(Granule::Size16K, 1, false), Reserved);
        assert_eq!(block.kind(Granule::Size16K, 2, false), Block);
        assert_eq!(block.kind(Granule::Size64K, 1, false), Reserved);
        assert_eq!(block.kind(Granule::Size64K, 1, true), Block);
        assert_eq!(block.kind(Granule::Size64K, 2, false), Block);
        assert_eq!(tp.kind(Granule::Size4K, 2, false), Table);
        assert_eq!(tp.kind(Granule::Size4K, 3, false), Page);
    }

    #[test]
    fn addresses() {
        let d = Descriptor(0x0000_8765_4321_0000 | 0xF003 | (0xF << 12));
        // 4K: bits [47:12] (bits 15:12 are address bits here).
        assert_eq!(d.address(Granule::Size4K, true), 0x0000_8765_4321_F000);
        // 64K without 52-bit PAs: bits [47:16] only.
        assert_eq!(d.address(Granule::Size64K, false), 0x0000_8765_4321_0000);
        // 64K with 52-bit PAs: bits [15:12] are OA[51:48].
        assert_eq!(d.address(Granule::Size64K, true), 0x000F_8765_4321_0000);
        let enc = Descriptor::encode_address(0x000A_0000_1234_0000, Granule::Size64K);
        assert_eq!(enc, 0x0000_0000_1234_0000 | (0xA << 12));
        let leaf = Descriptor::leaf(0x4000_0000, 1, Granule::Size4K, AF);
        assert_eq!(leaf.0, 0x4000_0000 | (1 << 10) | 0b01);
        let page = Descriptor::leaf(0x4000_1000, 3, Granule::Size4K, AF);
        assert_eq!(page.0, 0x4000_1000 | (1 << 10) | 0b11);
    }

    #[test]
    fn leaf_attr_encoders() {
        let a = S1LeafAttrs {
            attr_index: 3,
            sh: 3,
            read_only: true,
            el0: true,
            pxn: true,
            uxn: false,
            not_global: true,
            af: true,
            ns: false,
            dbm: false,
            contiguous: true,
            sw: 1,
        };
        assert_eq!(
            a.bits(),
            (3 << 2)
                | (3 << 8)
                | (1 << 7)
                | (1 << 6)
                | (1 << 53)
                | (1 << 11)
                | (1 << 10)
                | (1 << 52)
                | (1 << 55)
        );
        let s2 = S2LeafAttrs {
            mem_attr: 0xF,
            sh: 2,
            read: true,
            write: false,
            xn: 0b10,
            af: true,
            dbm: true,
            contiguous: false,
            sw: 0,
        };
        assert_eq!(
            s2.bits(),
            (0xF << 2) | (2 << 8) | (1 << 6) | (1 << 54) | (1 << 10) | (1 << 51)
        );
    }
}
