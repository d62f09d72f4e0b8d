//! Translation granules, output-address sizes and the shape of one table hierarchy
//! (smmu_kvm.md §4.12; DDI0487 D8.2).

/// A translation granule: the page size and, with it, the size of every table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granule {
    Size4K,
    Size16K,
    Size64K,
}

impl Granule {
    pub const ALL: [Granule; 3] = [Granule::Size4K, Granule::Size16K, Granule::Size64K];

    /// log2 of the granule size: 12, 14 or 16.
    #[inline(always)]
    pub const fn bits(self) -> u32 {
        match self {
            Granule::Size4K => 12,
            Granule::Size16K => 14,
            Granule::Size64K => 16,
        }
    }

    /// Granule (page and table) size in bytes.
    #[inline(always)]
    pub const fn size(self) -> u64 {
        1 << self.bits()
    }

    /// Input-address bits resolved per level: granule bits − 3 (9, 11, 13).
    #[inline(always)]
    pub const fn stride(self) -> u32 {
        self.bits() - 3
    }

    /// Descriptors in one table.
    #[inline(always)]
    pub const fn entries(self) -> u64 {
        1 << self.stride()
    }

    /// `shift(L) = G + (3 − L) × s` (smmu_kvm.md §4.12): log2 of the input range one
    /// descriptor at `level` covers. `level` must be 0..=3.
    #[inline(always)]
    pub const fn level_shift(self, level: u8) -> u32 {
        self.bits() + (3 - level as u32) * self.stride()
    }

    /// The lowest level a walk may start at without FEAT_LPA2 (64K tables start at L1: its
    /// L1 already resolves up to 52 bits).
    pub const fn first_level(self) -> u8 {
        match self {
            Granule::Size64K => 1,
            _ => 0,
        }
    }

    /// Whether a block descriptor (bits\[1:0\] = 0b01) is architecturally a block at `level`.
    /// 4K: L1, L2; 16K: L2; 64K: L2, and L1 when the implementation has 52-bit PAs
    /// (DDI0487 AArch64.BlockDescSupported; smmu_kvm.md §4.12). L0 for 4K and L1 for 16K need
    /// FEAT_LPA2 (DS = 1), which is not modelled. Anywhere else 0b01 is reserved.
    pub const fn block_allowed(self, level: u8, pa52: bool) -> bool {
        match self {
            Granule::Size4K => level == 1 || level == 2,
            Granule::Size16K => level == 2,
            Granule::Size64K => level == 2 || (level == 1 && pa52),
        }
    }

    /// Entries in one contiguous group at `level` (smmu_kvm.md §4.12): 16 for 4K; 128 at 16K
    /// L3 and 32 at 16K L2; 32 for 64K. `None` where the hint has no meaning.
    pub const fn contiguous_entries(self, level: u8) -> Option<u32> {
        match (self, level) {
            (Granule::Size4K, 1..=3) => Some(16),
            (Granule::Size16K, 3) => Some(128),
            (Granule::Size16K, 2) => Some(32),
            (Granule::Size64K, 2..=3) => Some(32),
            _ => None,
        }
    }

    /// CD.TG0 / TCR.TG0 encoding: 0 = 4K, 1 = 64K, 2 = 16K, 3 reserved (IHI0070 5.4).
    pub const fn from_tg0(tg: u8) -> Option<Granule> {
        match tg {
            0 => Some(Granule::Size4K),
            1 => Some(Granule::Size64K),
            2 => Some(Granule::Size16K),
            _ => None,
        }
    }

    /// CD.TG1 / TCR.TG1 encoding: 1 = 16K, 2 = 4K, 3 = 64K, 0 reserved (IHI0070 5.4).
    pub const fn from_tg1(tg: u8) -> Option<Granule> {
        match tg {
            1 => Some(Granule::Size16K),
            2 => Some(Granule::Size4K),
            3 => Some(Granule::Size64K),
            _ => None,
        }
    }

    /// STE.S2TG encoding: same as TG0 (smmu_kvm.md §4.4).
    pub const fn from_s2tg(tg: u8) -> Option<Granule> {
        Granule::from_tg0(tg)
    }

    pub const fn tg0(self) -> u8 {
        match self {
            Granule::Size4K => 0,
            Granule::Size64K => 1,
            Granule::Size16K => 2,
        }
    }

    pub const fn tg1(self) -> u8 {
        match self {
            Granule::Size16K => 1,
            Granule::Size4K => 2,
            Granule::Size64K => 3,
        }
    }

    pub const fn s2tg(self) -> u8 {
        self.tg0()
    }
}

/// A physical (or intermediate physical) address size, as encoded in CD.IPS, STE.S2PS,
/// SMMU_IDR5.OAS and TCR.PS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PaSize {
    Bits32,
    Bits36,
    Bits40,
    Bits42,
    Bits44,
    Bits48,
    Bits52,
}

impl PaSize {
    /// Decodes the 3-bit PS encoding. 0b111 is reserved in SMMUv3.1–3.3 and behaves as 0b110
    /// (IHI0070 5.4, CD.IPS); its SMMUv3.4 meaning (56 bits) needs VMSAv9-128, not modelled.
    pub const fn from_encoding(ps: u8) -> Option<PaSize> {
        Some(match ps {
            0 => PaSize::Bits32,
            1 => PaSize::Bits36,
            2 => PaSize::Bits40,
            3 => PaSize::Bits42,
            4 => PaSize::Bits44,
            5 => PaSize::Bits48,
            6 | 7 => PaSize::Bits52,
            _ => return None,
        })
    }

    pub const fn encoding(self) -> u8 {
        match self {
            PaSize::Bits32 => 0,
            PaSize::Bits36 => 1,
            PaSize::Bits40 => 2,
            PaSize::Bits42 => 3,
            PaSize::Bits44 => 4,
            PaSize::Bits48 => 5,
            PaSize::Bits52 => 6,
        }
    }

    pub const fn bits(self) -> u8 {
        match self {
            PaSize::Bits32 => 32,
            PaSize::Bits36 => 36,
            PaSize::Bits40 => 40,
            PaSize::Bits42 => 42,
            PaSize::Bits44 => 44,
            PaSize::Bits48 => 48,
            PaSize::Bits52 => 52,
        }
    }

    pub const fn min(self, other: PaSize) -> PaSize {
        if self.bits() <= other.bits() {
            self
        } else {
            other
        }
    }
}

/// The shape of one translation table hierarchy: granule, input size, start level and the
/// number of concatenated tables at the start level (stage 2 only; 1 for stage 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    granule: Granule,
    ia_bits: u8,
    start_level: u8,
    concat: u8,
}

impl Geometry {
    /// Stage-1 shape for an input of `ia_bits` = 64 − TnSZ bits:
    /// `levels = ceil((IA − G) / s)`, `start = 4 − levels` (smmu_kvm.md §4.12). Returns `None`
    /// when that needs more than four levels (or a start above the granule's first level)
    /// or when the input is no larger than one page.
    pub const fn stage1(granule: Granule, ia_bits: u8) -> Option<Geometry> {
        let g = granule.bits();
        let s = granule.stride();
        if (ia_bits as u32) <= g || ia_bits > 64 {
            return None;
        }
        let levels = (ia_bits as u32 - g).div_ceil(s);
        if levels > 4 || 4 - levels < granule.first_level() as u32 {
            return None;
        }
        Some(Geometry {
            granule,
            ia_bits,
            start_level: (4 - levels) as u8,
            concat: 1,
        })
    }

    /// Stage-2 shape for a given start level: the start level must resolve between 1 and
    /// `s + 4` bits (up to 16 concatenated tables), DDI0487 AArch64.S2InconsistentSL;
    /// smmu_kvm.md §4.12. Returns `None` otherwise.
    pub const fn stage2(granule: Granule, ia_bits: u8, start_level: u8) -> Option<Geometry> {
        if start_level > 3 || start_level < granule.first_level() || ia_bits > 64 {
            return None;
        }
        let shift = granule.level_shift(start_level);
        if (ia_bits as u32) <= shift {
            return None;
        }
        let bits = ia_bits as u32 - shift;
        let s = granule.stride();
        if bits > s + 4 {
            return None;
        }
        let concat = if bits > s { 1u8 << (bits - s) } else { 1 };
        Some(Geometry {
            granule,
            ia_bits,
            start_level,
            concat,
        })
    }

    #[inline(always)]
    pub const fn granule(&self) -> Granule {
        self.granule
    }

    /// Input address bits (64 − TnSZ).
    #[inline(always)]
    pub const fn ia_bits(&self) -> u8 {
        self.ia_bits
    }

    #[inline(always)]
    pub const fn start_level(&self) -> u8 {
        self.start_level
    }

    /// Concatenated tables at the start level (1..=16; always 1 at stage 1).
    #[inline(always)]
    pub const fn concatenated(&self) -> u8 {
        self.concat
    }

    /// Input bits resolved at the start level (including the concatenation bits).
    #[inline(always)]
    pub const fn root_index_bits(&self) -> u32 {
        self.ia_bits as u32 - self.granule.level_shift(self.start_level)
    }

    /// Descriptors in the start-level table (all concatenated tables together).
    #[inline(always)]
    pub const fn root_entries(&self) -> u64 {
        1 << self.root_index_bits()
    }

    /// Bytes of the start-level table(s): at least 8 (one descriptor); a root with fewer
    /// entries than a granule still occupies less than a page and is aligned to its size.
    #[inline(always)]
    pub const fn root_size(&self) -> u64 {
        self.root_entries() * 8
    }

    /// Size of the whole input range, `2^ia_bits` (saturating at 2^64 − 1 for 64 bits).
    pub const fn input_size(&self) -> u64 {
        if self.ia_bits >= 64 {
            u64::MAX
        } else {
            1 << self.ia_bits
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn level_shifts_match_the_notes() {
        // smmu_kvm.md §4.12
        let k4: Vec<u32> = (0..4).map(|l| Granule::Size4K.level_shift(l)).collect();
        assert_eq!(k4, [39, 30, 21, 12]);
        let k16: Vec<u32> = (0..4).map(|l| Granule::Size16K.level_shift(l)).collect();
        assert_eq!(k16, [47, 36, 25, 14]);
        let k64: Vec<u32> = (1..4).map(|l| Granule::Size64K.level_shift(l)).collect();
        assert_eq!(k64, [42, 29, 16]);
    }

    #[test]
    fn stage1_start_levels() {
        let start = |g, ia| Geometry::stage1(g, ia).map(|x| x.start_level());
        assert_eq!(start(Granule::Size4K, 48), Some(0));
        assert_eq!(start(Granule::Size4K, 39), Some(1));
        assert_eq!(start(Granule::Size4K, 25), Some(2));
        assert_eq!(start(Granule::Size16K, 48), Some(0));
        assert_eq!(
            Geometry::stage1(Granule::Size16K, 48).map(|g| g.root_entries()),
            Some(2)
        );
        assert_eq!(start(Granule::Size16K, 47), Some(1));
        assert_eq!(start(Granule::Size64K, 48), Some(1));
        assert_eq!(
            Geometry::stage1(Granule::Size64K, 48).map(|g| g.root_entries()),
            Some(64)
        );
        assert_eq!(start(Granule::Size64K, 42), Some(2));
        assert_eq!(start(Granule::Size64K, 52), Some(1));
        // 4K with 49+ bits needs five levels (FEAT_LPA2), not modelled.
        assert_eq!(start(Granule::Size4K, 49), None);
        assert_eq!(start(Granule::Size4K, 12), None);
    }

    #[test]
    fn stage2_concatenation_limits() {
        // 4K, start L1, 40-bit IPA: 10 bits at L1 = 2 tables.
        let g = Geometry::stage2(Granule::Size4K, 40, 1).unwrap();
        assert_eq!((g.concatenated(), g.root_entries()), (2, 1024));
        // 4K, start L1, 43-bit IPA: 13 bits = 16 tables; 44 bits would be 32: illegal.
        assert_eq!(
            Geometry::stage2(Granule::Size4K, 43, 1)
                .unwrap()
                .concatenated(),
            16
        );
        assert_eq!(Geometry::stage2(Granule::Size4K, 44, 1), None);
        // Start level that resolves no bits.
        assert_eq!(Geometry::stage2(Granule::Size4K, 30, 1), None);
        // 16K start L2 with 40 bits: 15 bits = 16 tables.
        assert_eq!(
            Geometry::stage2(Granule::Size16K, 40, 2)
                .unwrap()
                .concatenated(),
            16
        );
        // 64K start L2 with 46 bits: 17 bits = 16 tables.
        assert_eq!(
            Geometry::stage2(Granule::Size64K, 46, 2)
                .unwrap()
                .concatenated(),
            16
        );
        assert_eq!(Geometry::stage2(Granule::Size64K, 47, 2), None);
        assert_eq!(Geometry::stage2(Granule::Size64K, 40, 0), None);
    }

    #[test]
    fn encodings_round_trip() {
        for g in Granule::ALL {
            assert_eq!(Granule::from_tg0(g.tg0()), Some(g));
            assert_eq!(Granule::from_tg1(g.tg1()), Some(g));
            assert_eq!(Granule::from_s2tg(g.s2tg()), Some(g));
        }
        assert_eq!(Granule::from_tg0(3), None);
        assert_eq!(Granule::from_tg1(0), None);
        assert_eq!(PaSize::from_encoding(7), Some(PaSize::Bits52));
        assert_eq!(PaSize::from_encoding(8), None);
        for e in 0..7 {
            assert_eq!(PaSize::from_encoding(e).map(PaSize::encoding), Some(e));
        }
    }
}
