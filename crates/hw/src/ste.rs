//! Stream table structures: the Level-1 Stream Table Descriptor and the Stream Table Entry
//! (IHI0070 5.1, 5.2; smmu_kvm.md §4.3–§4.4), their layouts and the legality checks that
//! turn an STE into a [`StreamConfig`] or a C_BAD_STE.

use bitfield_struct::bitfield;

use twinmmu_vmsa::{ConfigError, Stage2Config, Stage2Params};

use crate::config::{SmmuConfig, StallModel};

/// L1STD (IHI0070 5.1): Span\[4:0\], L2Ptr\[55:6\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct L1Std {
    #[bits(5)]
    pub span: u8,
    pub __: bool,
    #[bits(50)]
    pub l2ptr: u64,
    #[bits(8)]
    pub __: u8,
}

/// STE dword 0.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SteDw0 {
    pub v: bool,
    #[bits(3)]
    pub config: u8,
    #[bits(2)]
    pub s1fmt: u8,
    /// S1ContextPtr[55:6].
    #[bits(50)]
    pub s1_context_ptr: u64,
    #[bits(3)]
    pub __: u8,
    #[bits(5)]
    pub s1cdmax: u8,
}

/// STE dword 1.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SteDw1 {
    #[bits(2)]
    pub s1dss: u8,
    #[bits(2)]
    pub s1cir: u8,
    #[bits(2)]
    pub s1cor: u8,
    #[bits(2)]
    pub s1csh: u8,
    #[bits(4)]
    pub s2hwu: u8,
    pub dre: bool,
    #[bits(4)]
    pub cont: u8,
    pub dcp: bool,
    pub ppar: bool,
    pub mev: bool,
    #[bits(5)]
    pub __: u8,
    pub s2fwb: bool,
    pub s1mpam: bool,
    pub s1stalld: bool,
    #[bits(2)]
    pub eats: u8,
    #[bits(2)]
    pub strw: u8,
    #[bits(4)]
    pub memattr: u8,
    pub mtcfg: bool,
    #[bits(4)]
    pub alloccfg: u8,
    #[bits(3)]
    pub __: u8,
    #[bits(2)]
    pub shcfg: u8,
    #[bits(2)]
    pub nscfg: u8,
    #[bits(2)]
    pub privcfg: u8,
    #[bits(2)]
    pub instcfg: u8,
    #[bits(12)]
    pub __: u16,
}

/// STE dword 2.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SteDw2 {
    pub s2vmid: u16,
    pub __: u16,
    #[bits(6)]
    pub s2t0sz: u8,
    #[bits(2)]
    pub s2sl0: u8,
    #[bits(2)]
    pub s2ir0: u8,
    #[bits(2)]
    pub s2or0: u8,
    #[bits(2)]
    pub s2sh0: u8,
    #[bits(2)]
    pub s2tg: u8,
    #[bits(3)]
    pub s2ps: u8,
    pub s2aa64: bool,
    pub s2endi: bool,
    pub s2affd: bool,
    pub s2ptw: bool,
    pub s2hd: bool,
    pub s2ha: bool,
    pub s2s: bool,
    pub s2r: bool,
    #[bits(5)]
    pub __: u8,
}

/// STE dword 3.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SteDw3 {
    #[bits(4)]
    pub __: u8,
    /// S2TTB[55:4].
    #[bits(52)]
    pub s2ttb: u64,
    #[bits(8)]
    pub __: u8,
}

/// A Stream Table Entry as read from memory (64 bytes, little-endian dwords). Dwords 4–7
/// hold Secure, VMS and MPAM fields this non-secure model treats as RES0 (ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ste {
    pub dw0: SteDw0,
    pub dw1: SteDw1,
    pub dw2: SteDw2,
    pub dw3: SteDw3,
    pub rest: [u64; 4],
}

impl Ste {
    pub fn from_dwords(d: [u64; 8]) -> Self {
        Ste {
            dw0: SteDw0::from_bits(d[0]),
            dw1: SteDw1::from_bits(d[1]),
            dw2: SteDw2::from_bits(d[2]),
            dw3: SteDw3::from_bits(d[3]),
            rest: [d[4], d[5], d[6], d[7]],
        }
    }

    pub fn to_dwords(&self) -> [u64; 8] {
        [
            self.dw0.into_bits(),
            self.dw1.into_bits(),
            self.dw2.into_bits(),
            self.dw3.into_bits(),
            self.rest[0],
            self.rest[1],
            self.rest[2],
            self.rest[3],
        ]
    }
}

/// The translation regime a stream's stage-1 entries belong to (IHI0070 3.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamWorld {
    NsEl1,
    El2,
    El2E2h,
}

/// Effective attribute overrides from the STE (IHI0070 5.2 PRIVCFG/INSTCFG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttrOverride {
    Incoming,
    Force(bool),
}

impl AttrOverride {
    fn from_cfg(v: u8) -> Self {
        match v {
            // 0b00 use incoming, 0b01 reserved (behaves as 0b00).
            0 | 1 => AttrOverride::Incoming,
            2 => AttrOverride::Force(false),
            _ => AttrOverride::Force(true),
        }
    }

    pub fn apply(self, incoming: bool) -> bool {
        match self {
            AttrOverride::Incoming => incoming,
            AttrOverride::Force(v) => v,
        }
    }
}

/// The stage-2 part of a decoded STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S2Config {
    pub vmid: u16,
    /// The validated walk configuration (geometry, S2TTB, effective S2PS, S2AFFD).
    pub walk: Stage2Config,
    pub ptw: bool,
    pub stall: bool,
    pub record: bool,
}

impl S2Config {
    /// Input (IPA) size in bits.
    pub fn ia_bits(&self) -> u32 {
        u32::from(self.walk.geometry().ia_bits())
    }
}

/// Substream behaviour of a stage-1 stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum S1Dss {
    /// 0b00: non-substream traffic terminates with F_STREAM_DISABLED.
    Terminate,
    /// 0b01: non-substream traffic bypasses stage 1.
    Bypass,
    /// 0b10: non-substream traffic uses CD 0; SSID 0 is then F_STREAM_DISABLED.
    Substream0,
}

/// The stage-1 part of a decoded STE: where the CDs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct S1Ctx {
    /// S1ContextPtr (a PA, or an IPA when stage 2 is enabled).
    pub context_ptr: u64,
    /// 0 = one CD, no substreams.
    pub cdmax: u8,
    /// 0 linear, 1 two-level 4 KiB leaves (64 CDs), 2 two-level 64 KiB leaves (1024 CDs).
    pub fmt: u8,
    pub dss: S1Dss,
    pub stalld: bool,
    pub world: StreamWorld,
}

/// STE.EATS as the SMMU applies it (IHI0070 5.2 EATS): which ATS traffic the stream
/// accepts. The effective value also depends on SMMU_CR0.ATSCHK, which is read when the
/// traffic arrives ([`Eats::effective`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Eats {
    /// 0b00 (and 0b11 without DPT, which is Reserved and behaves as 0b00; and any value
    /// while IDR0.ATS = 0, when the field is IGNORED).
    Disabled,
    /// 0b01: Translation Requests translate at every enabled stage; Translated traffic
    /// bypasses.
    Full,
    /// 0b10: Translation Requests answer the stage-1 IPA; Translated traffic goes through
    /// stage 2 (only with Config = 0b111, and only while ATSCHK = 1).
    Split,
}

impl Eats {
    /// The effective value under SMMU_CR0.ATSCHK: Split-stage behaves as 0b00 while
    /// ATSCHK = 0 (IHI0070 5.2 EATS, 3.9.2).
    pub fn effective(self, atschk: bool) -> Eats {
        match self {
            Eats::Split if !atschk => Eats::Disabled,
            e => e,
        }
    }
}

/// What a valid STE says about a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamConfig {
    /// Config = 0b000 (and the reserved 0b001–0b011): abort with no event.
    Abort,
    /// Config = 0b100: both stages bypass.
    Bypass {
        privcfg: AttrOverride,
        instcfg: AttrOverride,
    },
    /// Stage 1 and/or stage 2 translate.
    Translate {
        s1: Option<S1Ctx>,
        s2: Option<S2Config>,
        /// S2VMID, the TLB tag for this stream's entries (also for S1-only NS-EL1 streams
        /// when stage 2 is implemented, smmu_kvm.md §4.4).
        vmid: u16,
        privcfg: AttrOverride,
        instcfg: AttrOverride,
        mev: bool,
        /// STE.EATS as decoded (before ATSCHK).
        eats: Eats,
        /// STE.VMSPtr when the VMS is enabled for the stream (IHI0070 5.2 VMSPtr, 5.6).
        vms: Option<u64>,
    },
}

/// Why an STE is ILLEGAL (reported as C_BAD_STE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadSte {
    #[error("STE.V is 0")]
    NotValid,
    #[error("a stage the SMMU does not implement is enabled")]
    UnsupportedStage,
    #[error("bad S1Fmt/S1CDMax")]
    BadCdTable,
    #[error("S1ContextPtr beyond the output address size")]
    ContextPtrRange,
    #[error("reserved S1DSS")]
    BadS1Dss,
    #[error("bad StreamWorld")]
    BadStrw,
    #[error("S1STALLD with a forced stall model")]
    BadStalld,
    #[error("S2AA64 = 0 (VMSAv8-32 not implemented)")]
    S2Aarch32,
    #[error("S2ENDI set on a little-endian-only SMMU")]
    S2Endian,
    #[error("stage 2: {0}")]
    S2Walk(ConfigError),
    #[error("S2VMID wider than 8 bits without VMID16")]
    VmidRange,
    #[error("S2S set without stall support")]
    S2Stall,
    #[error("EATS not allowed with this configuration")]
    BadEats,
    #[error("VMSPtr beyond the output address size")]
    VmsPtrRange,
}

/// IHI0070 5.2 / 5.2.2: validate an STE and extract what translation needs.
pub fn decode_ste(ste: &Ste, c: &SmmuConfig) -> Result<StreamConfig, BadSte> {
    let d0 = ste.dw0;
    let d1 = ste.dw1;
    let d2 = ste.dw2;
    if !d0.v() {
        return Err(BadSte::NotValid);
    }
    let config = d0.config();
    // Config 0b0xx: no traffic; 0b001–0b011 are reserved and behave as 0b000 (IHI0070 5.2).
    if config & 0b100 == 0 {
        return Ok(StreamConfig::Abort);
    }
    let s1_en = config & 0b001 != 0;
    let s2_en = config & 0b010 != 0;
    if (s1_en && !c.s1p) || (s2_en && !c.s2p) {
        return Err(BadSte::UnsupportedStage);
    }
    // Without IDR1.ATTR_PERMS_OVR the override fields act as "use incoming" (IHI0070 5.2).
    let (privcfg, instcfg) = if c.attr_perms_ovr {
        (
            AttrOverride::from_cfg(d1.privcfg()),
            AttrOverride::from_cfg(d1.instcfg()),
        )
    } else {
        (AttrOverride::Incoming, AttrOverride::Incoming)
    };
    if !s1_en && !s2_en {
        return Ok(StreamConfig::Bypass { privcfg, instcfg });
    }
    // S2VMID is used (as the TLB tag) whenever stage 2 is implemented, even if bypassed.
    let vmid = if c.s2p { d2.s2vmid() } else { 0 };
    if c.s2p && !c.vmid16 && vmid > 0xff {
        return Err(BadSte::VmidRange);
    }
    let s2 = if s2_en {
        if !d2.s2aa64() {
            return Err(BadSte::S2Aarch32);
        }
        if d2.s2endi() {
            return Err(BadSte::S2Endian);
        }
        // Granule, S2T0SZ range, S2SL0 consistency (at most 16 concatenated tables), S2TTB
        // inside the effective S2PS and S2HA/S2HD without HTTU: vmsa validates the walk
        // configuration once (IHI0070 5.2.2).
        let walk = Stage2Config::new(
            &Stage2Params {
                s2ttb: ste.dw3.s2ttb() << 4,
                s2t0sz: d2.s2t0sz(),
                s2sl0: d2.s2sl0(),
                s2tg: d2.s2tg(),
                // S2PS encodings above 0b110 are reserved; treat as the largest (OAS caps).
                s2ps: d2.s2ps().min(6),
                s2affd: d2.s2affd(),
                s2ha: d2.s2ha(),
                s2hd: d2.s2hd(),
            },
            &c.features(),
        )
        .map_err(BadSte::S2Walk)?;
        if d2.s2s() && !c.can_stall() {
            return Err(BadSte::S2Stall);
        }
        Some(S2Config {
            vmid,
            walk,
            ptw: d2.s2ptw(),
            stall: d2.s2s() && c.can_stall(),
            record: d2.s2r(),
        })
    } else {
        None
    };
    let s1 = if s1_en {
        let cdmax = if c.ssidsize == 0 { 0 } else { d0.s1cdmax() };
        if cdmax > c.ssidsize {
            return Err(BadSte::BadCdTable);
        }
        let fmt = if cdmax == 0 { 0 } else { d0.s1fmt() };
        if fmt == 3 || (fmt != 0 && !c.cd2l) {
            return Err(BadSte::BadCdTable);
        }
        let context_ptr = d0.s1_context_ptr() << 6;
        // SMMUv3.1+: a stage-1-only S1ContextPtr beyond the OAS is C_BAD_STE (IHI0070 3.4.3).
        if !s2_en && context_ptr >> c.oas_bits != 0 {
            return Err(BadSte::ContextPtrRange);
        }
        let dss = if cdmax == 0 {
            S1Dss::Substream0
        } else {
            match d1.s1dss() {
                0 => S1Dss::Terminate,
                1 => S1Dss::Bypass,
                2 => S1Dss::Substream0,
                _ => return Err(BadSte::BadS1Dss),
            }
        };
        let world = match d1.strw() {
            0 => StreamWorld::NsEl1,
            // EL2 needs IDR0.HYP and stage 2 bypassed (an EL2 regime has no stage 2).
            2 if c.hyp && !s2_en => StreamWorld::El2,
            _ => return Err(BadSte::BadStrw),
        };
        if d1.s1stalld() && c.stall_model == StallModel::StallForced {
            return Err(BadSte::BadStalld);
        }
        Some(S1Ctx {
            context_ptr,
            cdmax,
            fmt,
            dss,
            stalld: d1.s1stalld(),
            world,
        })
    } else {
        None
    };
    // IHI0070 5.2 EATS: IGNORED without IDR0.ATS. 0b01 is ILLEGAL with stage 2 enabled and
    // S2S = 1 (SMMUv3.1+); 0b10 is ILLEGAL unless Config = 0b111, S2S = 0 and Split-stage
    // is implemented (IDR0.NS1ATS = 0); 0b11 (Full ATS with DPT checks) is Reserved without
    // IDR3.DPT and behaves as 0b00.
    let eats = if !c.ats {
        Eats::Disabled
    } else {
        match d1.eats() {
            1 if s2_en && d2.s2s() => return Err(BadSte::BadEats),
            1 => Eats::Full,
            2 if config != 0b111 || d2.s2s() || c.ns1ats => return Err(BadSte::BadEats),
            2 => Eats::Split,
            _ => Eats::Disabled,
        }
    };
    // IHI0070 5.2 VMSPtr (dword 5 bits [55:12]): enabled when the VMS is supported, Config
    // = 0b111 and S1MPAM = 1; beyond the OAS it makes the STE ILLEGAL.
    let vms = if c.vms_supported() && config == 0b111 && d1.s1mpam() {
        let ptr = ste.rest[1] & 0x00ff_ffff_ffff_f000;
        if ptr >> c.oas_bits != 0 {
            return Err(BadSte::VmsPtrRange);
        }
        Some(ptr)
    } else {
        None
    };
    Ok(StreamConfig::Translate {
        s1,
        s2,
        vmid,
        privcfg,
        instcfg,
        mev: d1.mev(),
        eats,
        vms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1std_fields_by_bit_position() {
        assert_eq!(L1Std::new().with_span(0x1f).into_bits(), 0x1f);
        assert_eq!(
            L1Std::new().with_l2ptr((1 << 50) - 1).into_bits(),
            ((1u64 << 56) - 1) & !0x3f
        );
    }

    #[test]
    fn ste_dword0_fields_by_bit_position() {
        assert_eq!(SteDw0::new().with_v(true).into_bits(), 1);
        assert_eq!(SteDw0::new().with_config(7).into_bits(), 7 << 1);
        assert_eq!(SteDw0::new().with_s1fmt(3).into_bits(), 3 << 4);
        assert_eq!(
            SteDw0::new().with_s1_context_ptr(1).into_bits(),
            1 << 6,
            "S1ContextPtr starts at bit 6"
        );
        assert_eq!(
            SteDw0::new().with_s1_context_ptr((1 << 50) - 1).into_bits(),
            ((1u64 << 56) - 1) & !0x3f
        );
        assert_eq!(SteDw0::new().with_s1cdmax(0x1f).into_bits(), 0x1f << 59);
    }

    #[test]
    fn ste_dword1_fields_by_bit_position() {
        assert_eq!(SteDw1::new().with_s1dss(3).into_bits(), 3);
        assert_eq!(SteDw1::new().with_s1cir(3).into_bits(), 3 << 2);
        assert_eq!(SteDw1::new().with_s1cor(3).into_bits(), 3 << 4);
        assert_eq!(SteDw1::new().with_s1csh(3).into_bits(), 3 << 6);
        assert_eq!(SteDw1::new().with_s2hwu(0xf).into_bits(), 0xf << 8);
        assert_eq!(SteDw1::new().with_dre(true).into_bits(), 1 << 12);
        assert_eq!(SteDw1::new().with_cont(0xf).into_bits(), 0xf << 13);
        assert_eq!(SteDw1::new().with_dcp(true).into_bits(), 1 << 17);
        assert_eq!(SteDw1::new().with_ppar(true).into_bits(), 1 << 18);
        assert_eq!(SteDw1::new().with_mev(true).into_bits(), 1 << 19);
        assert_eq!(SteDw1::new().with_s2fwb(true).into_bits(), 1 << 25);
        assert_eq!(SteDw1::new().with_s1mpam(true).into_bits(), 1 << 26);
        assert_eq!(SteDw1::new().with_s1stalld(true).into_bits(), 1 << 27);
        assert_eq!(SteDw1::new().with_eats(3).into_bits(), 3 << 28);
        assert_eq!(SteDw1::new().with_strw(3).into_bits(), 3 << 30);
        assert_eq!(SteDw1::new().with_memattr(0xf).into_bits(), 0xf << 32);
        assert_eq!(SteDw1::new().with_mtcfg(true).into_bits(), 1 << 36);
        assert_eq!(SteDw1::new().with_alloccfg(0xf).into_bits(), 0xf << 37);
        assert_eq!(SteDw1::new().with_shcfg(3).into_bits(), 3 << 44);
        assert_eq!(SteDw1::new().with_nscfg(3).into_bits(), 3 << 46);
        assert_eq!(SteDw1::new().with_privcfg(3).into_bits(), 3 << 48);
        assert_eq!(SteDw1::new().with_instcfg(3).into_bits(), 3 << 50);
    }

    #[test]
    fn ste_dword2_and_3_fields_by_bit_position() {
        assert_eq!(SteDw2::new().with_s2vmid(0xffff).into_bits(), 0xffff);
        assert_eq!(SteDw2::new().with_s2t0sz(0x3f).into_bits(), 0x3f << 32);
        assert_eq!(SteDw2::new().with_s2sl0(3).into_bits(), 3 << 38);
        assert_eq!(SteDw2::new().with_s2ir0(3).into_bits(), 3 << 40);
        assert_eq!(SteDw2::new().with_s2or0(3).into_bits(), 3 << 42);
        assert_eq!(SteDw2::new().with_s2sh0(3).into_bits(), 3 << 44);
        assert_eq!(SteDw2::new().with_s2tg(3).into_bits(), 3 << 46);
        assert_eq!(SteDw2::new().with_s2ps(7).into_bits(), 7 << 48);
        assert_eq!(SteDw2::new().with_s2aa64(true).into_bits(), 1 << 51);
        assert_eq!(SteDw2::new().with_s2endi(true).into_bits(), 1 << 52);
        assert_eq!(SteDw2::new().with_s2affd(true).into_bits(), 1 << 53);
        assert_eq!(SteDw2::new().with_s2ptw(true).into_bits(), 1 << 54);
        assert_eq!(SteDw2::new().with_s2hd(true).into_bits(), 1 << 55);
        assert_eq!(SteDw2::new().with_s2ha(true).into_bits(), 1 << 56);
        assert_eq!(SteDw2::new().with_s2s(true).into_bits(), 1 << 57);
        assert_eq!(SteDw2::new().with_s2r(true).into_bits(), 1 << 58);
        assert_eq!(SteDw3::new().with_s2ttb(1).into_bits(), 1 << 4);
        assert_eq!(
            SteDw3::new().with_s2ttb((1 << 52) - 1).into_bits(),
            ((1u64 << 56) - 1) & !0xf
        );
    }

    fn s2_ste(tg: u8, sl0: u8, t0sz: u8) -> Ste {
        let mut s = Ste::default();
        s.dw0 = SteDw0::new().with_v(true).with_config(0b110);
        s.dw2 = SteDw2::new()
            .with_s2vmid(5)
            .with_s2tg(tg)
            .with_s2sl0(sl0)
            .with_s2t0sz(t0sz)
            .with_s2ps(5)
            .with_s2aa64(true);
        s.dw3 = SteDw3::new().with_s2ttb(0x8000_0000 >> 4);
        s
    }

    #[test]
    fn decodes_stage2_geometry_and_rejects_illegal_ones() {
        let c = SmmuConfig::default();
        // 4K, 40-bit IPA, SL0=1 → level 1 resolving 10 bits (2 concatenated tables).
        match decode_ste(&s2_ste(0, 1, 24), &c).unwrap() {
            StreamConfig::Translate {
                s2: Some(s2),
                vmid,
                s1: None,
                ..
            } => {
                assert_eq!(s2.walk.geometry().start_level(), 1);
                assert_eq!(s2.walk.geometry().concatenated(), 2);
                assert_eq!(s2.ia_bits(), 40);
                assert_eq!(vmid, 5);
                assert_eq!(s2.walk.ttb(), 0x8000_0000);
            }
            other => panic!("{other:?}"),
        }
        // 4K, 48-bit IPA, SL0=0 (level 2) would need 2^18 concatenated tables.
        assert!(matches!(
            decode_ste(&s2_ste(0, 0, 16), &c),
            Err(BadSte::S2Walk(ConfigError::S2InconsistentSl0 { .. }))
        ));
        // 4K SL0=3 is reserved.
        assert!(matches!(
            decode_ste(&s2_ste(0, 3, 25), &c),
            Err(BadSte::S2Walk(ConfigError::S2InvalidSl0 { .. }))
        ));
        // S2TG = 3 is reserved.
        assert_eq!(
            decode_ste(&s2_ste(3, 0, 25), &c),
            Err(BadSte::S2Walk(ConfigError::S2ReservedGranule(3)))
        );
        // T0SZ above 39.
        assert!(matches!(
            decode_ste(&s2_ste(0, 0, 40), &c),
            Err(BadSte::S2Walk(ConfigError::S2TszOutOfRange { .. }))
        ));
        let mut s = s2_ste(0, 1, 24);
        s.dw2 = s.dw2.with_s2aa64(false);
        assert_eq!(decode_ste(&s, &c), Err(BadSte::S2Aarch32));
        // No stage 2 implemented.
        let c1 = SmmuConfig {
            s2p: false,
            ..SmmuConfig::default()
        };
        assert_eq!(
            decode_ste(&s2_ste(0, 1, 24), &c1),
            Err(BadSte::UnsupportedStage)
        );
    }

    #[test]
    fn config_encodings() {
        let c = SmmuConfig::default();
        let mut s = Ste::default();
        assert_eq!(decode_ste(&s, &c), Err(BadSte::NotValid));
        s.dw0 = SteDw0::new().with_v(true);
        assert_eq!(decode_ste(&s, &c), Ok(StreamConfig::Abort));
        // Reserved 0b001–0b011 behave as abort (IHI0070 5.2 Config).
        for cfg in 1..4 {
            s.dw0 = SteDw0::new().with_v(true).with_config(cfg);
            assert_eq!(decode_ste(&s, &c), Ok(StreamConfig::Abort));
        }
        s.dw0 = SteDw0::new().with_v(true).with_config(0b100);
        s.dw1 = SteDw1::new().with_privcfg(3).with_instcfg(2);
        assert_eq!(
            decode_ste(&s, &c),
            Ok(StreamConfig::Bypass {
                privcfg: AttrOverride::Force(true),
                instcfg: AttrOverride::Force(false)
            })
        );
        // Without IDR1.ATTR_PERMS_OVR the same STE uses the incoming attributes.
        let plain = SmmuConfig {
            attr_perms_ovr: false,
            ..SmmuConfig::default()
        };
        assert_eq!(plain.idr1().into_bits() & (1 << 26), 0);
        assert_ne!(c.idr1().into_bits() & (1 << 26), 0);
        assert_eq!(
            decode_ste(&s, &plain),
            Ok(StreamConfig::Bypass {
                privcfg: AttrOverride::Incoming,
                instcfg: AttrOverride::Incoming
            })
        );
    }

    #[test]
    fn stage1_fields() {
        let c = SmmuConfig::default();
        let mut s = Ste::default();
        s.dw0 = SteDw0::new()
            .with_v(true)
            .with_config(0b101)
            .with_s1_context_ptr(0x4000_0000 >> 6)
            .with_s1cdmax(8)
            .with_s1fmt(1);
        s.dw1 = SteDw1::new().with_s1dss(1);
        s.dw2 = SteDw2::new().with_s2vmid(9);
        match decode_ste(&s, &c).unwrap() {
            StreamConfig::Translate {
                s1: Some(s1),
                s2: None,
                vmid,
                ..
            } => {
                assert_eq!(s1.context_ptr, 0x4000_0000);
                assert_eq!(s1.cdmax, 8);
                assert_eq!(s1.fmt, 1);
                assert_eq!(s1.dss, S1Dss::Bypass);
                assert_eq!(vmid, 9);
                assert_eq!(s1.world, StreamWorld::NsEl1);
            }
            other => panic!("{other:?}"),
        }
        s.dw1 = SteDw1::new().with_s1dss(3);
        assert_eq!(decode_ste(&s, &c), Err(BadSte::BadS1Dss));
        s.dw1 = SteDw1::new().with_strw(1);
        assert_eq!(decode_ste(&s, &c), Err(BadSte::BadStrw));
        s.dw1 = SteDw1::new();
        s.dw0 = s.dw0.with_s1fmt(3);
        assert_eq!(decode_ste(&s, &c), Err(BadSte::BadCdTable));
        s.dw0 = s.dw0.with_s1fmt(0).with_s1cdmax(21);
        assert_eq!(decode_ste(&s, &c), Err(BadSte::BadCdTable));
        s.dw0 = s.dw0.with_s1cdmax(0).with_s1_context_ptr(1 << 43);
        assert_eq!(decode_ste(&s, &c), Err(BadSte::ContextPtrRange));
    }

    #[test]
    fn eats_legality() {
        let c = SmmuConfig {
            ats: true,
            ..SmmuConfig::default()
        };
        let eats_of = |s: &Ste, c: &SmmuConfig| match decode_ste(s, c) {
            Ok(StreamConfig::Translate { eats, .. }) => Ok(eats),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let mut s = s2_ste(0, 1, 24);
        // Stage 2 only: Full is legal, Split is not (Config != 0b111).
        s.dw1 = SteDw1::new().with_eats(1);
        assert_eq!(eats_of(&s, &c), Ok(Eats::Full));
        s.dw1 = SteDw1::new().with_eats(2);
        assert_eq!(eats_of(&s, &c), Err(BadSte::BadEats));
        // Full with S2S = 1 and stage 2 enabled is ILLEGAL.
        s.dw1 = SteDw1::new().with_eats(1);
        s.dw2 = s.dw2.with_s2s(true);
        assert_eq!(eats_of(&s, &c), Err(BadSte::BadEats));
        s.dw2 = s.dw2.with_s2s(false);
        // 0b11 without DPT is Reserved and behaves as 0b00 (not ILLEGAL).
        s.dw1 = SteDw1::new().with_eats(3);
        assert_eq!(eats_of(&s, &c), Ok(Eats::Disabled));
        // Nested: Split is legal unless NS1ATS says Split-stage is not implemented.
        s.dw0 = s.dw0.with_config(0b111);
        s.dw1 = SteDw1::new().with_eats(2);
        assert_eq!(eats_of(&s, &c), Ok(Eats::Split));
        let no_split = SmmuConfig {
            ns1ats: true,
            ..c.clone()
        };
        assert_eq!(eats_of(&s, &no_split), Err(BadSte::BadEats));
        // Without IDR0.ATS the field is IGNORED.
        assert_eq!(eats_of(&s, &SmmuConfig::default()), Ok(Eats::Disabled));
        assert_eq!(Eats::Split.effective(false), Eats::Disabled);
        assert_eq!(Eats::Split.effective(true), Eats::Split);
        assert_eq!(Eats::Full.effective(false), Eats::Full);
    }
}
