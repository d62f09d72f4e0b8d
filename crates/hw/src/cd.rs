//! Context descriptors (IHI0070 5.3, 5.4; smmu_kvm.md §4.5): the L1CD, the CD layout and its
//! legality checks (C_BAD_CD).

use bitfield_struct::bitfield;

use crate::config::{SmmuConfig, pa_bits};
use crate::ste::{Granule, StreamWorld};

/// L1CD (IHI0070 5.3): V bit 0, L2Ptr[55:12].
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

/// CD dwords 1 and 2: NSCFGx bit 0, HADx bit 1, TTBx[55:4].
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

/// One VA region (TTB0 or TTB1) of a stage-1 context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct S1Region {
    pub granule: Granule,
    pub tsz: u8,
    pub ttb: u64,
    pub tbi: bool,
    pub had: bool,
}

impl S1Region {
    pub fn ia_bits(&self) -> u32 {
        64 - u32::from(self.tsz)
    }
}

/// A decoded, legal CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CdConfig {
    /// None = region disabled (EPDx = 1): a miss there is a Translation fault.
    pub ttb0: Option<S1Region>,
    pub ttb1: Option<S1Region>,
    /// TBI of each region, needed even when the region is disabled (for selection).
    pub tbi0: bool,
    pub tbi1: bool,
    /// Effective output size: min(IPS, OAS).
    pub ips_bits: u8,
    pub asid: u16,
    pub aset: bool,
    pub affd: bool,
    pub wxn: bool,
    pub uwxn: bool,
    pub pan: bool,
    pub stall: bool,
    pub record: bool,
    pub abort: bool,
    pub mair: u64,
}

/// Why a CD is ILLEGAL (C_BAD_CD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadCd {
    #[error("CD.V is 0")]
    NotValid,
    #[error("CD.AA64 = 0 (VMSAv8-32 not implemented)")]
    Aarch32,
    #[error("T{0}SZ out of range")]
    Tsz(u8),
    #[error("TG{0} reserved or unsupported")]
    Granule(u8),
    #[error("TTB{0} beyond the IPS")]
    TtbRange(u8),
    #[error("ENDI set on a little-endian-only SMMU")]
    Endian,
    #[error("HA/HD set without HTTU")]
    Httu,
    #[error("A = 0 with TERM_MODEL = 1")]
    TermModel,
    #[error("S = 1 without stall support")]
    Stall,
    #[error("ASID wider than 8 bits without ASID16")]
    AsidRange,
}

fn region(
    c: &SmmuConfig,
    idx: u8,
    tsz: u8,
    tg: Granule,
    ttb: CdTtb,
    tbi: bool,
    ips_bits: u8,
) -> Result<S1Region, BadCd> {
    if !tg.supported(c) {
        return Err(BadCd::Granule(idx));
    }
    // IHI0070 5.4 T0SZ: at most 39 without STT; at least 16 (12 only with 52-bit VAs, which
    // this model does not advertise).
    if !(16..=39).contains(&tsz) {
        return Err(BadCd::Tsz(idx));
    }
    let addr = ttb.ttb() << 4;
    if addr >> ips_bits != 0 {
        return Err(BadCd::TtbRange(idx));
    }
    Ok(S1Region {
        granule: tg,
        tsz,
        ttb: addr,
        tbi,
        had: false,
    })
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
    if d.ha() || d.hd() {
        return Err(BadCd::Httu);
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
    let ips_bits = pa_bits(d.ips()).min(c.oas_bits);
    let ttb0 = if epd0 {
        None
    } else {
        let tg = match d.tg0() {
            0 => Granule::K4,
            1 => Granule::K64,
            2 => Granule::K16,
            _ => return Err(BadCd::Granule(0)),
        };
        Some(region(c, 0, d.t0sz(), tg, cd.ttb0, d.tbi0(), ips_bits)?)
    };
    let ttb1 = if epd1 {
        None
    } else {
        // TG1 has a different encoding: 1 = 16K, 2 = 4K, 3 = 64K (IHI0070 5.4 TG1).
        let tg = match d.tg1() {
            1 => Granule::K16,
            2 => Granule::K4,
            3 => Granule::K64,
            _ => return Err(BadCd::Granule(1)),
        };
        Some(region(c, 1, d.t1sz(), tg, cd.ttb1, d.tbi1(), ips_bits)?)
    };
    let asid = if world == StreamWorld::El2 {
        0
    } else {
        d.asid()
    };
    Ok(CdConfig {
        ttb0,
        ttb1,
        tbi0: d.tbi0(),
        tbi1: d.tbi1(),
        ips_bits,
        asid,
        aset: d.aset(),
        affd: d.affd(),
        wxn: d.wxn(),
        uwxn: d.uwxn(),
        pan: d.pan(),
        stall: d.s() && c.can_stall(),
        record: d.r(),
        abort: d.a() || c.term_model,
        mair: cd.mair,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let r = d.ttb0.unwrap();
        assert_eq!(r.ttb, 0x4010_0000);
        assert_eq!(r.granule, Granule::K4);
        assert_eq!(r.ia_bits(), 48);
        assert!(d.ttb1.is_none());
        assert_eq!(d.asid, 0x1234);
        assert!(d.record && d.abort && !d.stall);
        assert_eq!(d.ips_bits, 48);
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
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::Tsz(0)));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_tg0(3);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::Granule(0)));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_epd1(false).with_tg1(0).with_t1sz(16);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::Granule(1)));
        let mut cd = good_cd();
        cd.ttb0 = CdTtb::new().with_ttb(1 << 45);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::TtbRange(0)));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_ips(2);
        cd.ttb0 = CdTtb::new().with_ttb((1 << 41) >> 4);
        assert_eq!(
            decode_cd(&cd, w, &c),
            Err(BadCd::TtbRange(0)),
            "IPS 40 bits"
        );
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_endi(true);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::Endian));
        let mut cd = good_cd();
        cd.dw0 = cd.dw0.with_ha(true);
        assert_eq!(decode_cd(&cd, w, &c), Err(BadCd::Httu));
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
