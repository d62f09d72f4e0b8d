//! Context descriptors (IHI0070 5.3, 5.4; smmu_kvm.md §4.5): the L1CD, the CD layout and its
//! legality checks (C_BAD_CD).

use bitfield_struct::bitfield;

use twinmmu_vmsa::{ConfigError, Stage1Config, Stage1Params, TtbParams};

use crate::config::SmmuConfig;
use crate::ste::StreamWorld;

/// L1CD (IHI0070 5.3): V bit 0, L2Ptr\[55:12\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct L1Cd {
    pub v: bool,
    #[bits(11)]
    pub __: u16,
    #[bits(44)]
    pub l2ptr: u64,
    #[bits(8)]
    pub __: u8,
}

/// CD dword 0.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CdDw0 {
    #[bits(6)]
    pub t0sz: u8,
    #[bits(2)]
    pub tg0: u8,
    #[bits(2)]
    pub ir0: u8,
    #[bits(2)]
    pub or0: u8,
    #[bits(2)]
    pub sh0: u8,
    pub epd0: bool,
    pub endi: bool,
    #[bits(6)]
    pub t1sz: u8,
    #[bits(2)]
    pub tg1: u8,
    #[bits(2)]
    pub ir1: u8,
    #[bits(2)]
    pub or1: u8,
    #[bits(2)]
    pub sh1: u8,
    pub epd1: bool,
    pub v: bool,
    #[bits(3)]
    pub ips: u8,
    pub affd: bool,
    pub wxn: bool,
    pub uwxn: bool,
    pub tbi0: bool,
    pub tbi1: bool,
    pub pan: bool,
    pub aa64: bool,
    pub hd: bool,
    pub ha: bool,
    pub s: bool,
    pub r: bool,
    pub a: bool,
    pub aset: bool,
    pub asid: u16,
}

/// CD dwords 1 and 2: NSCFGx bit 0, HADx bit 1, TTBx\[55:4\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CdTtb {
    pub nscfg: bool,
    pub had: bool,
    #[bits(2)]
    pub __: u8,
    #[bits(52)]
    pub ttb: u64,
    #[bits(8)]
    pub __: u8,
}

/// A context descriptor as read from memory (64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContextDescriptor {
    pub dw0: CdDw0,
    pub ttb0: CdTtb,
    pub ttb1: CdTtb,
    pub mair: u64,
    pub amair: u64,
    pub rest: [u64; 3],
}

impl ContextDescriptor {
    pub fn from_dwords(d: [u64; 8]) -> Self {
        ContextDescriptor {
            dw0: CdDw0::from_bits(d[0]),
            ttb0: CdTtb::from_bits(d[1]),
            ttb1: CdTtb::from_bits(d[2]),
            mair: d[3],
            amair: d[4],
            rest: [d[5], d[6], d[7]],
        }
    }

    pub fn to_dwords(&self) -> [u64; 8] {
        [
            self.dw0.into_bits(),
            self.ttb0.into_bits(),
            self.ttb1.into_bits(),
            self.mair,
            self.amair,
            self.rest[0],
            self.rest[1],
            self.rest[2],
        ]
    }
}

/// A decoded, legal CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdConfig {
    /// The validated stage-1 walk configuration (regions, TBI, IPS, AFFD, WXN, PAN, MAIR).
    pub walk: Stage1Config,
    pub asid: u16,
    pub aset: bool,
    pub stall: bool,
    pub record: bool,
    /// Terminate by abort (CD.A, or TERM_MODEL = 1); otherwise RAZ/WI.
    pub abort: bool,
}

/// Why a CD is ILLEGAL (C_BAD_CD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadCd {
    #[error("CD.V is 0")]
    NotValid,
    #[error("CD.AA64 = 0 (VMSAv8-32 not implemented)")]
    Aarch32,
    #[error("stage 1: {0}")]
    Walk(ConfigError),
    #[error("ENDI set on a little-endian-only SMMU")]
    Endian,
    #[error("A = 0 with TERM_MODEL = 1")]
    TermModel,
    #[error("S = 1 without stall support")]
    Stall,
    #[error("ASID wider than 8 bits without ASID16")]
    AsidRange,
}

/// IHI0070 5.4 / 5.4.2: validate a CD for a stream of `world`.
pub fn decode_cd(
    cd: &ContextDescriptor,
    world: StreamWorld,
    c: &SmmuConfig,
) -> Result<CdConfig, BadCd> {
    let d = cd.dw0;
    if !d.v() {
        return Err(BadCd::NotValid);
    }
    if !d.aa64() {
        return Err(BadCd::Aarch32);
    }
    // EPDx are ignored (effective 0) for an EL2 (non-E2H) stream, which also has only the
    // TTB0 region (IHI0070 5.4 EPD0).
    let (epd0, epd1) = match world {
        StreamWorld::El2 => (false, true),
        _ => (d.epd0(), d.epd1()),
    };
    if d.endi() && !(epd0 && epd1) {
        return Err(BadCd::Endian);
    }
    if c.term_model && !d.a() {
        return Err(BadCd::TermModel);
    }
    if d.s() && !c.can_stall() {
        return Err(BadCd::Stall);
    }
    if !c.asid16 && d.asid() > 0xff && world != StreamWorld::El2 {
        return Err(BadCd::AsidRange);
    }
    // Granules, TxSZ ranges, TTBx inside the effective IPS, HA/HD without HTTU: vmsa
    // validates the walk configuration once (IHI0070 5.4.2).
    let ttb = |t: CdTtb, tsz: u8, tg: u8, epd: bool, tbi: bool| TtbParams {
        ttb: t.ttb() << 4,
        tsz,
        tg,
        epd,
        tbi,
        had: t.had(),
    };
    let walk = Stage1Config::new(
        &Stage1Params {
            ttb: [
                ttb(cd.ttb0, d.t0sz(), d.tg0(), epd0, d.tbi0()),
                ttb(cd.ttb1, d.t1sz(), d.tg1(), epd1, d.tbi1()),
            ],
            // IPS encodings above 0b110 are reserved; the OAS caps the effective size.
            ips: d.ips().min(6),
            affd: d.affd(),
            ha: d.ha(),
            hd: d.hd(),
            wxn: d.wxn(),
            uwxn: d.uwxn(),
            pan: d.pan(),
            mair: cd.mair,
        },
        &c.features(),
    )
    .map_err(BadCd::Walk)?;
    let asid = if world == StreamWorld::El2 {
        0
    } else {
        d.asid()
    };
    Ok(CdConfig {
        walk,
        asid,
        aset: d.aset(),
        stall: d.s() && c.can_stall(),
        record: d.r(),
        abort: d.a() || c.term_model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinmmu_vmsa::Ttb;

    #[test]
    fn l1cd_fields_by_bit_position() {
        assert_eq!(L1Cd::new().with_v(true).into_bits(), 1);
        assert_eq!(L1Cd::new().with_l2ptr(1).into_bits(), 1 << 12);
        assert_eq!(
            L1Cd::new().with_l2ptr((1 << 44) - 1).into_bits(),
            ((1u64 << 56) - 1) & !0xfff
        );
    }

    #[test]
    fn cd_dword0_fields_by_bit_position() {
        assert_eq!(CdDw0::new().with_t0sz(0x3f).into_bits(), 0x3f);
        assert_eq!(CdDw0::new().with_tg0(3).into_bits(), 3 << 6);
        assert_eq!(CdDw0::new().with_ir0(3).into_bits(), 3 << 8);
        assert_eq!(CdDw0::new().with_or0(3).into_bits(), 3 << 10);
        assert_eq!(CdDw0::new().with_sh0(3).into_bits(), 3 << 12);
        assert_eq!(CdDw0::new().with_epd0(true).into_bits(), 1 << 14);
        assert_eq!(CdDw0::new().with_endi(true).into_bits(), 1 << 15);
        assert_eq!(CdDw0::new().with_t1sz(0x3f).into_bits(), 0x3f << 16);
        assert_eq!(CdDw0::new().with_tg1(3).into_bits(), 3 << 22);
        assert_eq!(CdDw0::new().with_ir1(3).into_bits(), 3 << 24);
        assert_eq!(CdDw0::new().with_or1(3).into_bits(), 3 << 26);
        assert_eq!(CdDw0::new().with_sh1(3).into_bits(), 3 << 28);
        assert_eq!(CdDw0::new().with_epd1(true).into_bits(), 1 << 30);
        assert_eq!(CdDw0::new().with_v(true).into_bits(), 1 << 31);
        assert_eq!(CdDw0::new().with_ips(7).into_bits(), 7 << 32);
        assert_eq!(CdDw0::new().with_affd(true).into_bits(), 1 << 35);
        assert_eq!(CdDw0::new().with_wxn(true).into_bits(), 1 << 36);
        assert_eq!(CdDw0::new().with_uwxn(true).into_bits(), 1 << 37);
        assert_eq!(CdDw0::new().with_tbi0(true).into_bits(), 1 << 38);
        assert_eq!(CdDw0::new().with_tbi1(true).into_bits(), 1 << 39);
        assert_eq!(CdDw0::new().with_pan(true).into_bits(), 1 << 40);
        assert_eq!(CdDw0::new().with_aa64(true).into_bits(), 1 << 41);
        assert_eq!(CdDw0::new().with_hd(true).into_bits(), 1 << 42);
        assert_eq!(CdDw0::new().with_ha(true).into_bits(), 1 << 43);
        assert_eq!(CdDw0::new().with_s(true).into_bits(), 1 << 44);
        assert_eq!(CdDw0::new().with_r(true).into_bits(), 1 << 45);
        assert_eq!(CdDw0::new().with_a(true).into_bits(), 1 << 46);
        assert_eq!(CdDw0::new().with_aset(true).into_bits(), 1 << 47);
        assert_eq!(CdDw0::new().with_asid(0xffff).into_bits(), 0xffff << 48);
    }

    #[test]
    fn cd_ttb_fields_by_bit_position() {
        assert_eq!(CdTtb::new().with_nscfg(true).into_bits(), 1);
        assert_eq!(CdTtb::new().with_had(true).into_bits(), 2);
        assert_eq!(CdTtb::new().with_ttb(1).into_bits(), 1 << 4);
        assert_eq!(
            CdTtb::new().with_ttb((1 << 52) - 1).into_bits(),
            ((1u64 << 56) - 1) & !0xf
        );
        let cd = ContextDescriptor::from_dwords([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(cd.mair, 4, "MAIR is dword 3");
        assert_eq!(cd.to_dwords(), [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    fn good_cd() -> ContextDescriptor {
        ContextDescriptor {
            dw0: CdDw0::new()
                .with_v(true)
                .with_aa64(true)
                .with_t0sz(16)
                .with_tg0(0)
                .with_epd1(true)
                .with_ips(5)
                .with_r(true)
                .with_a(true)
                .with_asid(0x1234),
            ttb0: CdTtb::new().with_ttb(0x4010_0000 >> 4),
            ..ContextDescriptor::default()
        }
    }

    #[test]
    fn decodes_a_legal_cd() {
        let c = SmmuConfig::default();
        let d = decode_cd(&good_cd(), StreamWorld::NsEl1, &c).unwrap();
        let r = d.walk.region(Ttb::Ttb0).unwrap();
        assert_eq!(r.ttb, 0x4010_0000);
        assert_eq!(r.geometry.granule(), twinmmu_vmsa::Granule::Size4K);
        assert_eq!(r.geometry.ia_bits(), 48);
        assert!(d.walk.region(Ttb::Ttb1).is_none());
        assert_eq!(d.asid, 0x1234);
        assert!(d.record && d.abort && !d.stall);
        assert_eq!(d.walk.oa_bits(Ttb::Ttb0), 48);
    }

    #[test]
    fn rejects_illegal_cds() {
        let c = SmmuConfig::default();
        let w = StreamWorld::NsEl1;
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_v(false);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::NotValid));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_aa64(false);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::Aarch32));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_t0sz(40);
        assert!(matches!(
            decode_cd(&cd, w, &c),
            Err(BadCd::Walk(ConfigError::TszOutOfRange { .. }))
        ));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_tg0(3);
        assert!(matches!(
            decode_cd(&cd, w, &c),
            Err(BadCd::Walk(ConfigError::ReservedGranule { .. }))
        ));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_epd1(false).with_tg1(0).with_t1sz(16);
        assert!(matches!(
            decode_cd(&cd, w, &c),
            Err(BadCd::Walk(ConfigError::ReservedGranule { .. }))
        ));
        let mut cd = good_cd();
        cd.ttb0 = CdTtb::new().with_ttb(1 << 45);
        assert!(matches!(
            decode_cd(&cd, w, &c),
            Err(BadCd::Walk(ConfigError::TtbOutOfRange { .. }))
        ));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_ips(2);
        cd.ttb0 = CdTtb::new().with_ttb((1 << 41) >> 4);
        assert!(
            matches!(
                decode_cd(&cd, w, &c),
                Err(BadCd::Walk(ConfigError::TtbOutOfRange { bits: 40, .. }))
            ),
            "IPS 40 bits"
        );
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_endi(true);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::Endian));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_ha(true);
        assert_eq!(
            decode_cd(&cd, w, &c),
            Err(BadCd::Walk(ConfigError::HttuUnsupported))
        );
        let tm = SmmuConfig {
            term_model: true,
            ..SmmuConfig::default()
        };
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_a(false);
        assert_eq!(decode_cd(&cd, w, &tm), Err(BadCd::TermModel));
        let nostall = SmmuConfig {
            stall_model: crate::StallModel::TerminateOnly,
            ..SmmuConfig::default()
        };
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_s(true);
        assert_eq!(decode_cd(&cd, w, &nostall), Err(BadCd::Stall));
        let a8 = SmmuConfig {
            asid16: false,
            ..SmmuConfig::default()
        };
        assert_eq!(decode_cd(&good_cd(), w, &a8), Err(BadCd::AsidRange));
    }
}
