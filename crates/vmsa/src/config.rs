//! Walk configurations, validated once from CD (stage 1) or STE (stage 2) fields so the walk
//! never re-validates. An illegal geometry is a [`ConfigError`] (the SMMU reports it as
//! C_BAD_CD / C_BAD_STE), never a walk.

use crate::geometry::{Geometry, Granule, PaSize};
use crate::perms::S1Controls;

/// The implementation's translation features (from SMMU_IDR0/3/5 or the PE's ID registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// SMMU_IDR5.OAS: the implemented output (physical) address size.
    pub oas: PaSize,
    /// The intermediate address size accepted at stage 2's input (IHI0070 3.4: capped to
    /// the IAS).
    pub ias: PaSize,
    /// SMMU_IDR5.GRAN4K / GRAN16K / GRAN64K.
    pub gran4k: bool,
    pub gran16k: bool,
    pub gran64k: bool,
    /// SMMU_IDR5.VAX = 0b01: 52-bit VAs with a 64K granule (TnSZ down to 12).
    pub vax52: bool,
    /// SMMU_IDR3.STT: small translation tables (TnSZ up to 48, or 47 with 64K).
    pub stt: bool,
    /// SMMU_IDR3.HAD: CD.HAD0/1 are honoured.
    pub had: bool,
    /// SMMU_IDR3.XNX: stage-2 XN\[0\] (bit 53) is honoured.
    pub xnx: bool,
    /// SMMU_IDR0.HTTU ≥ 1 (HA) and = 2 (HD).
    pub httu_ha: bool,
    pub httu_hd: bool,
    /// Stage 2 may start at level 3 with a 4K granule (SL0 = 0b11, FEAT_TTST).
    pub s2_sl0_l3_4k: bool,
}

impl Default for Features {
    /// A common SMMUv3.1 shape: 48-bit OAS and IAS, all granules, no optional features.
    fn default() -> Self {
        Features {
            oas: PaSize::Bits48,
            ias: PaSize::Bits48,
            gran4k: true,
            gran16k: true,
            gran64k: true,
            vax52: false,
            stt: false,
            had: false,
            xnx: false,
            httu_ha: false,
            httu_hd: false,
            s2_sl0_l3_4k: false,
        }
    }
}

impl Features {
    pub fn supports(&self, g: Granule) -> bool {
        match g {
            Granule::Size4K => self.gran4k,
            Granule::Size16K => self.gran16k,
            Granule::Size64K => self.gran64k,
        }
    }

    /// The implementation has 52-bit PAs: 64K descriptors carry OA\[51:48\] in bits \[15:12\] and
    /// 64K level-1 blocks exist (DDI0487, FEAT_LPA).
    pub fn pa52(&self) -> bool {
        self.oas == PaSize::Bits52
    }
}

/// Which stage-1 table base a walk used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ttb {
    Ttb0,
    Ttb1,
}

impl Ttb {
    pub const fn index(self) -> usize {
        match self {
            Ttb::Ttb0 => 0,
            Ttb::Ttb1 => 1,
        }
    }
}

impl std::fmt::Display for Ttb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ttb::Ttb0 => "TTB0",
            Ttb::Ttb1 => "TTB1",
        })
    }
}

/// A configuration that cannot be walked. `hw` maps these to C_BAD_CD (stage 1) and
/// C_BAD_STE (stage 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{ttb}: reserved granule encoding TG = {tg}")]
    ReservedGranule { ttb: Ttb, tg: u8 },
    #[error("{ttb}: granule {granule:?} not implemented")]
    UnsupportedGranule { ttb: Ttb, granule: Granule },
    #[error("{ttb}: TnSZ = {tsz} outside [{min}, {max}]")]
    TszOutOfRange { ttb: Ttb, tsz: u8, min: u8, max: u8 },
    #[error("{ttb}: table base {addr:#x} beyond the {bits}-bit output size")]
    TtbOutOfRange { ttb: Ttb, addr: u64, bits: u8 },
    #[error("reserved address size encoding {0}")]
    ReservedPaSize(u8),
    #[error("HA/HD set without HTTU support")]
    HttuUnsupported,
    #[error("S2TG = {0} is reserved")]
    S2ReservedGranule(u8),
    #[error("stage-2 granule {0:?} not implemented")]
    S2UnsupportedGranule(Granule),
    #[error("S2T0SZ = {t0sz} outside [{min}, {max}]")]
    S2TszOutOfRange { t0sz: u8, min: u8, max: u8 },
    #[error("S2SL0 = {sl0} is invalid for granule {granule:?}")]
    S2InvalidSl0 { sl0: u8, granule: Granule },
    #[error(
        "S2SL0 = {sl0} (start level {level}) inconsistent with S2T0SZ = {t0sz}: the start level \
         must resolve 1..=stride+4 bits (at most 16 concatenated tables)"
    )]
    S2InconsistentSl0 { sl0: u8, level: u8, t0sz: u8 },
    #[error("S2TTB {addr:#x} beyond the {bits}-bit output size")]
    S2TtbOutOfRange { addr: u64, bits: u8 },
}

/// Effective output size: `min(PS, OAS)`; with a 4K or 16K granule (and no FEAT_LPA2) a
/// descriptor cannot express more than 48 bits (IHI0070 5.4, CD.IPS note).
fn effective_oa(ps: PaSize, f: &Features, g: Granule) -> PaSize {
    let eff = ps.min(f.oas);
    if g != Granule::Size64K {
        eff.min(PaSize::Bits48)
    } else {
        eff
    }
}

/// Per-table-base fields of a CD (IHI0070 5.4): TTBx, TxSZ, TGx (raw encoding; TG0 and TG1
/// differ), EPDx, TBIx, HADx.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TtbParams {
    pub ttb: u64,
    pub tsz: u8,
    pub tg: u8,
    pub epd: bool,
    pub tbi: bool,
    pub had: bool,
}

/// The CD fields that configure a stage-1 walk (IHI0070 5.4; smmu_kvm.md §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stage1Params {
    /// `[TTB0, TTB1]`.
    pub ttb: [TtbParams; 2],
    /// CD.IPS raw encoding.
    pub ips: u8,
    pub affd: bool,
    pub ha: bool,
    pub hd: bool,
    pub wxn: bool,
    /// CD.UWXN: IGNORED for VMSAv8-64 CDs (IHI0070 5.4), accepted and not used.
    pub uwxn: bool,
    pub pan: bool,
    /// {CD.MAIR1, CD.MAIR0}.
    pub mair: u64,
}

/// One enabled stage-1 region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct S1Region {
    pub geometry: Geometry,
    /// Table base, aligned down to the start-level table size (IHI0070 5.4: bits below the
    /// table's alignment are treated as zero).
    pub ttb: u64,
    /// HADx in effect: APTable/PXNTable/UXNTable are ignored.
    pub had: bool,
}

/// A validated stage-1 walk configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage1Config {
    /// `None` where EPDx = 1 (a walk there is a Translation fault).
    pub(crate) regions: [Option<S1Region>; 2],
    pub(crate) tbi: [bool; 2],
    /// Effective IPS in bits, per region (the 48-bit descriptor limit depends on the granule).
    pub(crate) oa_bits: [u8; 2],
    pub(crate) af_fault: bool,
    pub(crate) pa52: bool,
    pub(crate) mair: u64,
    pub(crate) controls: S1Controls,
    pub(crate) ha: bool,
    pub(crate) hd: bool,
}

impl Stage1Config {
    /// Validates CD fields once (IHI0070 5.4 "Validity of CD" for what the walk needs):
    /// granules supported and not reserved, TnSZ in range, TTBx inside the effective IPS (and
    /// inside 48 bits for 4K/16K), HA/HD only with HTTU. Fields of a region with EPDx = 1 are
    /// IGNORED.
    pub fn new(p: &Stage1Params, f: &Features) -> Result<Stage1Config, ConfigError> {
        let ips = PaSize::from_encoding(p.ips).ok_or(ConfigError::ReservedPaSize(p.ips))?;
        if (p.ha && !f.httu_ha) || (p.hd && !f.httu_hd) {
            return Err(ConfigError::HttuUnsupported);
        }
        let mut regions = [None, None];
        let mut oa_bits = [ips.min(f.oas).bits(); 2];
        for (i, ttb) in [Ttb::Ttb0, Ttb::Ttb1].into_iter().enumerate() {
            let t = &p.ttb[i];
            if t.epd {
                continue;
            }
            let granule = match ttb {
                Ttb::Ttb0 => Granule::from_tg0(t.tg),
                Ttb::Ttb1 => Granule::from_tg1(t.tg),
            }
            .ok_or(ConfigError::ReservedGranule { ttb, tg: t.tg })?;
            if !f.supports(granule) {
                return Err(ConfigError::UnsupportedGranule { ttb, granule });
            }
            // smmu_kvm.md §4.12: TnSZ in [16, 39]; 12 with 52-bit VA and 64K; 48 (47 with
            // 64K) with small translation tables.
            let min = if f.vax52 && granule == Granule::Size64K {
                12
            } else {
                16
            };
            let max = match (f.stt, granule) {
                (false, _) => 39,
                (true, Granule::Size64K) => 47,
                (true, _) => 48,
            };
            if t.tsz < min || t.tsz > max {
                return Err(ConfigError::TszOutOfRange {
                    ttb,
                    tsz: t.tsz,
                    min,
                    max,
                });
            }
            let geometry =
                Geometry::stage1(granule, 64 - t.tsz).ok_or(ConfigError::TszOutOfRange {
                    ttb,
                    tsz: t.tsz,
                    min,
                    max,
                })?;
            let oa = effective_oa(ips, f, granule);
            oa_bits[i] = oa.bits();
            // IHI0070 5.4 CD.TTBx: ILLEGAL outside the effective IPS, or outside 48 bits
            // with a 4K/16K granule.
            if t.ttb >> oa.bits() != 0 {
                return Err(ConfigError::TtbOutOfRange {
                    ttb,
                    addr: t.ttb,
                    bits: oa.bits(),
                });
            }
            // Bits below the table alignment are treated as zero; with a 52-bit output the
            // minimum alignment is 64 bytes (IHI0070 5.4 CD.TTB0).
            let mut align = geometry.root_size();
            if oa.bits() == 52 {
                align = align.max(64);
            }
            regions[i] = Some(S1Region {
                geometry,
                ttb: t.ttb & !(align - 1),
                had: t.had && f.had,
            });
        }
        Ok(Stage1Config {
            regions,
            tbi: [p.ttb[0].tbi, p.ttb[1].tbi],
            oa_bits,
            af_fault: !(p.affd || p.ha),
            pa52: f.pa52(),
            mair: p.mair,
            controls: S1Controls {
                wxn: p.wxn,
                pan: p.pan,
            },
            ha: p.ha,
            hd: p.hd,
        })
    }

    /// The enabled region for TTB0 or TTB1 (`None` when EPDx = 1).
    pub fn region(&self, ttb: Ttb) -> Option<&S1Region> {
        self.regions[ttb.index()].as_ref()
    }

    /// Effective output size in bits for walks through `ttb`.
    pub fn oa_bits(&self, ttb: Ttb) -> u8 {
        self.oa_bits[ttb.index()]
    }

    pub fn tbi(&self, ttb: Ttb) -> bool {
        self.tbi[ttb.index()]
    }

    /// WXN and PAN, applied by [`crate::check_s1`] at check time.
    pub fn controls(&self) -> S1Controls {
        self.controls
    }

    pub fn mair(&self) -> u64 {
        self.mair
    }

    /// AF = 0 raises an Access flag fault (neither AFFD nor HA).
    pub fn af_faults(&self) -> bool {
        self.af_fault
    }

    /// CD.HA / CD.HD as accepted (hardware flag updates are the caller's to perform).
    pub fn httu(&self) -> (bool, bool) {
        (self.ha, self.hd)
    }
}

/// The STE fields that configure a stage-2 walk (IHI0070 5.2; smmu_kvm.md §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stage2Params {
    pub s2ttb: u64,
    pub s2t0sz: u8,
    pub s2sl0: u8,
    /// STE.S2TG raw encoding.
    pub s2tg: u8,
    /// STE.S2PS raw encoding.
    pub s2ps: u8,
    pub s2affd: bool,
    pub s2ha: bool,
    pub s2hd: bool,
}

/// A validated stage-2 walk configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Config {
    pub(crate) geometry: Geometry,
    pub(crate) ttb: u64,
    pub(crate) oa_bits: u8,
    pub(crate) af_fault: bool,
    pub(crate) pa52: bool,
    pub(crate) xnx: bool,
}

/// Stage-2 start level for S2SL0 (smmu_kvm.md §4.12; DDI0487 VTCR_EL2.SL0).
pub fn s2_start_level(granule: Granule, sl0: u8, f: &Features) -> Option<u8> {
    // DDI0487 AArch64.S2InvalidSL: a start level that needs more PA bits than the
    // implementation has is invalid.
    let pa = f.oas.bits();
    match (granule, sl0) {
        (Granule::Size4K, 0) => Some(2),
        (Granule::Size4K, 1) => Some(1),
        (Granule::Size4K, 2) if pa >= 44 => Some(0),
        (Granule::Size4K, 3) if f.s2_sl0_l3_4k => Some(3),
        (Granule::Size16K | Granule::Size64K, 0) => Some(3),
        (Granule::Size16K | Granule::Size64K, 1) => Some(2),
        (Granule::Size16K, 2) if pa >= 42 => Some(1),
        (Granule::Size64K, 2) if pa >= 44 => Some(1),
        _ => None,
    }
}

impl Stage2Config {
    /// Validates STE fields once: granule, S2T0SZ range (capped to the IAS, and to 48 bits
    /// unless 64K), S2SL0 valid and consistent with S2T0SZ (at most 16 concatenated tables),
    /// S2TTB inside the effective S2PS, HA/HD only with HTTU.
    pub fn new(p: &Stage2Params, f: &Features) -> Result<Stage2Config, ConfigError> {
        let granule = Granule::from_s2tg(p.s2tg).ok_or(ConfigError::S2ReservedGranule(p.s2tg))?;
        if !f.supports(granule) {
            return Err(ConfigError::S2UnsupportedGranule(granule));
        }
        let ps = PaSize::from_encoding(p.s2ps).ok_or(ConfigError::ReservedPaSize(p.s2ps))?;
        if (p.s2ha && !f.httu_ha) || (p.s2hd && !f.httu_hd) {
            return Err(ConfigError::HttuUnsupported);
        }
        // IHI0070 3.4: the S2 input is capped to the IAS, and to 48 bits unless 64K.
        let max_ia = if granule == Granule::Size64K {
            f.ias.bits()
        } else {
            f.ias.bits().min(48)
        };
        let min = 64 - max_ia;
        let max = match (f.stt, granule) {
            (false, _) => 39,
            (true, Granule::Size64K) => 47,
            (true, _) => 48,
        };
        if p.s2t0sz < min || p.s2t0sz > max {
            return Err(ConfigError::S2TszOutOfRange {
                t0sz: p.s2t0sz,
                min,
                max,
            });
        }
        let level = s2_start_level(granule, p.s2sl0, f).ok_or(ConfigError::S2InvalidSl0 {
            sl0: p.s2sl0,
            granule,
        })?;
        let geometry = Geometry::stage2(granule, 64 - p.s2t0sz, level).ok_or(
            ConfigError::S2InconsistentSl0 {
                sl0: p.s2sl0,
                level,
                t0sz: p.s2t0sz,
            },
        )?;
        let oa = effective_oa(ps, f, granule);
        if p.s2ttb >> oa.bits() != 0 {
            return Err(ConfigError::S2TtbOutOfRange {
                addr: p.s2ttb,
                bits: oa.bits(),
            });
        }
        let mut align = geometry.root_size();
        if oa.bits() == 52 {
            align = align.max(64);
        }
        Ok(Stage2Config {
            geometry,
            ttb: p.s2ttb & !(align - 1),
            oa_bits: oa.bits(),
            af_fault: !(p.s2affd || p.s2ha),
            pa52: f.pa52(),
            xnx: f.xnx,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Start-level table base (aligned to the concatenated tables' total size).
    pub fn ttb(&self) -> u64 {
        self.ttb
    }

    pub fn oa_bits(&self) -> u8 {
        self.oa_bits
    }

    pub fn af_faults(&self) -> bool {
        self.af_fault
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s1(tsz: u8, tg: u8) -> Stage1Params {
        Stage1Params {
            ttb: [
                TtbParams {
                    ttb: 0x8000_0000,
                    tsz,
                    tg,
                    ..Default::default()
                },
                TtbParams {
                    epd: true,
                    ..Default::default()
                },
            ],
            ips: 5,
            ..Default::default()
        }
    }

    #[test]
    fn stage1_start_levels_from_tsz() {
        let f = Features::default();
        let start = |tsz, tg| {
            Stage1Config::new(&s1(tsz, tg), &f)
                .map(|c| c.region(Ttb::Ttb0).map(|r| r.geometry.start_level()))
        };
        assert_eq!(start(16, 0), Ok(Some(0))); // 4K/48 → L0
        assert_eq!(start(25, 0), Ok(Some(1))); // 4K/39 → L1
        assert_eq!(start(17, 2), Ok(Some(1))); // 16K/47 → L1
        assert_eq!(start(22, 1), Ok(Some(2))); // 64K/42 → L2
    }

    #[test]
    fn stage1_rejections() {
        let f = Features::default();
        assert_eq!(
            Stage1Config::new(&s1(15, 0), &f),
            Err(ConfigError::TszOutOfRange {
                ttb: Ttb::Ttb0,
                tsz: 15,
                min: 16,
                max: 39
            })
        );
        assert!(matches!(
            Stage1Config::new(&s1(40, 0), &f),
            Err(ConfigError::TszOutOfRange { .. })
        ));
        let stt = Features { stt: true, ..f };
        assert!(Stage1Config::new(&s1(48, 0), &stt).is_ok());
        assert!(Stage1Config::new(&s1(48, 1), &stt).is_err());
        assert_eq!(
            Stage1Config::new(&s1(16, 3), &f),
            Err(ConfigError::ReservedGranule {
                ttb: Ttb::Ttb0,
                tg: 3
            })
        );
        let no16 = Features {
            gran16k: false,
            ..f
        };
        assert!(matches!(
            Stage1Config::new(&s1(17, 2), &no16),
            Err(ConfigError::UnsupportedGranule { .. })
        ));
        // TTB beyond the effective IPS (min(IPS 40, OAS 48) = 40 bits).
        let mut p = s1(16, 0);
        p.ips = 2;
        p.ttb[0].ttb = 1 << 40;
        assert_eq!(
            Stage1Config::new(&p, &f),
            Err(ConfigError::TtbOutOfRange {
                ttb: Ttb::Ttb0,
                addr: 1 << 40,
                bits: 40
            })
        );
        // IPS above OAS is capped to OAS.
        p.ips = 6;
        p.ttb[0].ttb = 1 << 48;
        assert!(matches!(
            Stage1Config::new(&p, &f),
            Err(ConfigError::TtbOutOfRange { bits: 48, .. })
        ));
        // An EPD region's fields are ignored.
        let mut q = s1(16, 0);
        q.ttb[1] = TtbParams {
            epd: true,
            tg: 0,
            tsz: 0,
            ttb: u64::MAX,
            ..Default::default()
        };
        assert!(Stage1Config::new(&q, &f).is_ok());
        q.ha = true;
        assert_eq!(Stage1Config::new(&q, &f), Err(ConfigError::HttuUnsupported));
    }

    #[test]
    fn ttb_low_bits_are_treated_as_zero() {
        let mut p = s1(16, 0);
        p.ttb[0].ttb = 0x8000_0ff8;
        let c = Stage1Config::new(&p, &Features::default()).unwrap();
        assert_eq!(c.region(Ttb::Ttb0).map(|r| r.ttb), Some(0x8000_0000));
        // 4K/39 bits → L1 with 512 entries: 4 KiB alignment as well.
        let mut p = s1(25, 0);
        p.ttb[0].ttb = 0x8000_0ff8;
        let c = Stage1Config::new(&p, &Features::default()).unwrap();
        assert_eq!(c.region(Ttb::Ttb0).map(|r| r.ttb), Some(0x8000_0000));
        // 4K/36 bits → L1 with 64 entries: 512-byte alignment.
        let mut p = s1(28, 0);
        p.ttb[0].ttb = 0x8000_0ff8;
        let c = Stage1Config::new(&p, &Features::default()).unwrap();
        assert_eq!(c.region(Ttb::Ttb0).map(|r| r.ttb), Some(0x8000_0e00));
    }

    fn s2(t0sz: u8, sl0: u8, tg: u8) -> Stage2Params {
        Stage2Params {
            s2ttb: 0x4000_0000,
            s2t0sz: t0sz,
            s2sl0: sl0,
            s2tg: tg,
            s2ps: 5,
            ..Default::default()
        }
    }

    #[test]
    fn stage2_start_levels_and_concatenation() {
        let f = Features::default();
        let geo = |t0sz, sl0, tg| {
            Stage2Config::new(&s2(t0sz, sl0, tg), &f)
                .map(|c| (c.geometry().start_level(), c.geometry().concatenated()))
        };
        // 4K: SL0 0 → L2, 1 → L1, 2 → L0.
        assert_eq!(geo(16, 2, 0), Ok((0, 1)));
        assert_eq!(geo(25, 1, 0), Ok((1, 1)));
        assert_eq!(geo(24, 1, 0).map(|g| g.0), Ok(1));
        assert_eq!(
            Stage2Config::new(&s2(24, 1, 0), &f).map(|c| c.geometry().concatenated()),
            Ok(2)
        );
        // Concatenation of 2..=16 tables at 4K L1: IPA 40..=43 bits.
        for (t0sz, n) in [(24u8, 2u8), (23, 4), (22, 8), (21, 16)] {
            assert_eq!(geo(t0sz, 1, 0), Ok((1, n)));
        }
        // 4K L2 start with 34 bits: 16 tables.
        assert_eq!(geo(30, 0, 0), Ok((2, 16)));
        // 16K: SL0 0 → L3, 1 → L2, 2 → L1; 64K likewise.
        assert_eq!(geo(24, 1, 2), Ok((2, 16)));
        assert_eq!(geo(25, 1, 2), Ok((2, 8)));
        assert_eq!(geo(22, 1, 1), Ok((2, 1)));
        assert_eq!(geo(18, 1, 1), Ok((2, 16)));
        assert_eq!(geo(16, 2, 1), Ok((1, 1)));
    }

    #[test]
    fn stage2_illegal_geometries() {
        let f = Features::default();
        let err = |t0sz, sl0, tg| Stage2Config::new(&s2(t0sz, sl0, tg), &f).err();
        // 17 tables' worth at the start level (44 bits at 4K L1).
        assert_eq!(
            err(20, 1, 0),
            Some(ConfigError::S2InconsistentSl0 {
                sl0: 1,
                level: 1,
                t0sz: 20
            })
        );
        // Start level that resolves nothing (30-bit IPA at 4K L1).
        assert!(matches!(
            err(34, 1, 0),
            Some(ConfigError::S2InconsistentSl0 { .. })
        ));
        assert!(matches!(
            err(39, 1, 0),
            Some(ConfigError::S2InconsistentSl0 { .. })
        ));
        // 4K SL0 = 3 without TTST; 64K SL0 = 3; 16K SL0 = 3 (LPA2 only).
        assert_eq!(
            err(24, 3, 0),
            Some(ConfigError::S2InvalidSl0 {
                sl0: 3,
                granule: Granule::Size4K
            })
        );
        assert!(matches!(
            err(24, 3, 1),
            Some(ConfigError::S2InvalidSl0 { .. })
        ));
        assert!(matches!(
            err(24, 3, 2),
            Some(ConfigError::S2InvalidSl0 { .. })
        ));
        // S2T0SZ below 64 − IAS, reserved granule.
        assert!(matches!(
            err(15, 2, 0),
            Some(ConfigError::S2TszOutOfRange { .. })
        ));
        assert_eq!(err(24, 1, 3), Some(ConfigError::S2ReservedGranule(3)));
        // L0 start needs PAMax >= 44.
        let small = Features {
            oas: PaSize::Bits40,
            ias: PaSize::Bits40,
            ..f
        };
        assert!(matches!(
            Stage2Config::new(&s2(24, 2, 0), &small),
            Err(ConfigError::S2InvalidSl0 { .. })
        ));
        // S2TTB beyond the effective S2PS (40 bits).
        let mut p = s2(24, 1, 0);
        p.s2ps = 2;
        p.s2ttb = 1 << 40;
        assert_eq!(
            Stage2Config::new(&p, &f),
            Err(ConfigError::S2TtbOutOfRange {
                addr: 1 << 40,
                bits: 40
            })
        );
        // S2TTB is aligned to the whole concatenated root (2 tables = 8 KiB).
        let mut p = s2(24, 1, 0);
        p.s2ttb = 0x4000_1000;
        assert_eq!(Stage2Config::new(&p, &f).map(|c| c.ttb()), Ok(0x4000_0000));
    }
}
