//! `SmmuConfig`: the implementation choices of one SMMU (what its ID registers report) and
//! the model's own sizes (TLB and configuration-cache capacity). Serde/TOML, so a scenario
//! or `twinmmu qtest --config` can describe the SMMU under test.

use serde::{Deserialize, Serialize};
use twinmmu_vmsa::PaSize;

use crate::regs::{Idr0, Idr1, Idr3, Idr5};

/// SMMU_IDR0.STALL_MODEL (IHI0070 6.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StallModel {
    /// 0b00: stall and terminate models both supported.
    StallAndTerminate,
    /// 0b01: only the terminate model.
    TerminateOnly,
    /// 0b10: stall forced for every fault that may stall (not allowed with PCIe).
    StallForced,
}

impl StallModel {
    pub fn encoding(self) -> u8 {
        match self {
            StallModel::StallAndTerminate => 0,
            StallModel::TerminateOnly => 1,
            StallModel::StallForced => 2,
        }
    }
}

/// What the model implements; every field feeds an ID register or a model size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmmuConfig {
    /// IDR0.S1P: stage 1 implemented.
    pub s1p: bool,
    /// IDR0.S2P: stage 2 implemented.
    pub s2p: bool,
    /// IDR0.TTF: 2 = AArch64 tables only (the model walks VMSAv8-64 only).
    pub ttf: u8,
    /// IDR0.COHACC: coherent access to tables and queues.
    pub cohacc: bool,
    /// IDR0.BTM: broadcast TLB maintenance.
    pub btm: bool,
    /// IDR0.HYP: EL2 stream world (and CR2.E2H).
    pub hyp: bool,
    /// IDR0.ATS: PCIe ATS (CMD_ATC_INV).
    pub ats: bool,
    /// IDR1.ATTR_PERMS_OVR: STE.PRIVCFG/INSTCFG override the incoming attributes; without
    /// it they are effectively "use incoming" (IHI0070 6.3.2, 5.2).
    pub attr_perms_ovr: bool,
    /// IDR0.NS1ATS: true = Split-stage ATS (STE.EATS = 0b10) is *not* implemented
    /// (IHI0070 6.3.1, 5.2 EATS).
    pub ns1ats: bool,
    /// IDR0.PRI: page request interface (PRI queue, CMD_PRI_RESP).
    pub pri: bool,
    /// IDR0.MSI: message-signalled interrupts (CMD_SYNC MSI, IRQ_CFG0 writes).
    pub msi: bool,
    /// IDR0.SEV: WFE wake-up events.
    pub sev: bool,
    /// IDR0.ASID16.
    pub asid16: bool,
    /// IDR0.VMID16.
    pub vmid16: bool,
    /// IDR0.CD2L: 2-level CD tables.
    pub cd2l: bool,
    /// IDR0.ST_LEVEL: 2-level stream tables supported.
    pub st_level_2lvl: bool,
    /// IDR0.STALL_MODEL.
    pub stall_model: StallModel,
    /// IDR0.TERM_MODEL: true = terminated transactions always abort.
    pub term_model: bool,
    /// IDR1.SIDSIZE (bits of StreamID, ≤ 32).
    pub sidsize: u8,
    /// IDR1.SSIDSIZE (bits of SubstreamID, ≤ 20).
    pub ssidsize: u8,
    /// IDR1.CMDQS (log2 entries, ≤ 19).
    pub cmdqs: u8,
    /// IDR1.EVENTQS (log2 entries, ≤ 19).
    pub eventqs: u8,
    /// IDR1.PRIQS (log2 entries, ≤ 19).
    pub priqs: u8,
    /// IDR3.MPAM: Memory System Resource Partitioning and Monitoring. With a non-zero
    /// `mpam_partid_max` and both stages, the SMMU supports the VMS (IHI0070 5.6.1) and
    /// fetches it for nested streams with STE.S1MPAM = 1.
    pub mpam: bool,
    /// SMMU_MPAMIDR.PARTID_MAX.
    pub mpam_partid_max: u16,
    /// SMMU_MPAMIDR.PMG_MAX.
    pub mpam_pmg_max: u8,
    /// IDR3.RIL: range invalidation and the TTL hint.
    pub ril: bool,
    /// IDR5.OAS as a number of bits: 32, 36, 40, 42, 44, 48 or 52.
    pub oas_bits: u8,
    pub gran4k: bool,
    pub gran16k: bool,
    pub gran64k: bool,
    /// AIDR: architecture minor revision (3.x); RIL is mandatory from 3.2.
    pub arch_minor: u8,
    /// Main TLB capacity in entries (bounded; replacement, never flush-all).
    pub tlb_capacity: usize,
    /// Configuration cache capacity (STEs plus CDs).
    pub cfg_cache_capacity: usize,
    /// Entries of each DMA port's micro-TLB (a power of two).
    pub utlb_entries: usize,
}

impl Default for SmmuConfig {
    /// A modern server SMMU (issue 3): S1P+S2P, BTM, ASID16, VMID16, RIL, 2-level stream
    /// tables, OAS 48 bits, all three granules, SIDSIZE 16, SSIDSIZE 20, queues up to 2^19.
    fn default() -> Self {
        SmmuConfig {
            s1p: true,
            s2p: true,
            ttf: 2,
            cohacc: true,
            btm: true,
            hyp: true,
            ats: false,
            ns1ats: false,
            attr_perms_ovr: true,
            pri: false,
            msi: true,
            sev: true,
            asid16: true,
            vmid16: true,
            cd2l: true,
            st_level_2lvl: true,
            stall_model: StallModel::StallAndTerminate,
            term_model: false,
            sidsize: 16,
            ssidsize: 20,
            cmdqs: 19,
            eventqs: 19,
            priqs: 19,
            mpam: false,
            mpam_partid_max: 0,
            mpam_pmg_max: 0,
            ril: true,
            oas_bits: 48,
            gran4k: true,
            gran16k: true,
            gran64k: true,
            arch_minor: 2,
            tlb_capacity: 16384,
            cfg_cache_capacity: 4096,
            utlb_entries: 64,
        }
    }
}

/// A configuration the model cannot implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("config: {0}")]
    Toml(String),
}

/// The PA size of `bits` output-address bits, if it is one the architecture encodes.
fn pa_size(bits: u8) -> Option<PaSize> {
    (0..=6)
        .filter_map(PaSize::from_encoding)
        .find(|p| p.bits() == bits)
}

/// IDR5.OAS encoding of a number of output-address bits.
pub fn oas_encoding(bits: u8) -> Option<u8> {
    pa_size(bits).map(PaSize::encoding)
}

/// Number of bits of an IDR5.OAS / PS / IPS encoding (values above 6 are reserved and
/// treated as the largest implemented, per IHI0070 3.4).
pub fn pa_bits(encoding: u8) -> u8 {
    PaSize::from_encoding(encoding).map_or(52, PaSize::bits)
}

impl SmmuConfig {
    /// Parses TOML; fields left out take the default.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: SmmuConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the combination is architecturally possible and within the model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if !self.s1p && !self.s2p {
            return bad("at least one of s1p and s2p must be implemented");
        }
        if self.ttf != 2 {
            return bad("ttf must be 2: the model walks AArch64 (VMSAv8-64) tables only");
        }
        if self.sidsize > 32 {
            return bad("sidsize is at most 32");
        }
        if self.ssidsize > 20 {
            return bad("ssidsize is at most 20");
        }
        if self.cmdqs > 19 || self.eventqs > 19 || self.priqs > 19 {
            return bad("queue sizes are at most 2^19 entries");
        }
        if oas_encoding(self.oas_bits).is_none() {
            return bad("oas_bits must be one of 32, 36, 40, 42, 44, 48, 52");
        }
        if !self.gran4k && !self.gran16k && !self.gran64k {
            return bad("at least one granule must be supported");
        }
        if self.pri && !self.ats {
            return bad("pri requires ats");
        }
        if !self.mpam && (self.mpam_partid_max != 0 || self.mpam_pmg_max != 0) {
            return bad("mpam_partid_max and mpam_pmg_max need mpam");
        }
        if self.tlb_capacity == 0 || self.cfg_cache_capacity == 0 {
            return bad("cache capacities must be non-zero");
        }
        if !self.utlb_entries.is_power_of_two() {
            return bad("utlb_entries must be a power of two");
        }
        Ok(())
    }

    pub fn idr0(&self) -> Idr0 {
        Idr0::new()
            .with_s2p(self.s2p)
            .with_s1p(self.s1p)
            .with_ttf(self.ttf)
            .with_cohacc(self.cohacc)
            .with_btm(self.btm)
            .with_hyp(self.hyp)
            .with_ats(self.ats)
            // NS1ATS is meaningful only with ATS.
            .with_ns1ats(self.ats && self.ns1ats)
            .with_asid16(self.asid16)
            .with_msi(self.msi)
            .with_sev(self.sev)
            .with_pri(self.pri)
            .with_vmid16(self.vmid16)
            .with_cd2l(self.cd2l)
            // Little-endian translation tables only (IHI0070 6.3.1 TTENDIAN = 0b10).
            .with_ttendian(2)
            .with_stall_model(self.stall_model.encoding())
            .with_term_model(self.term_model)
            .with_st_level(u8::from(self.st_level_2lvl))
    }

    pub fn idr1(&self) -> Idr1 {
        Idr1::new()
            .with_sidsize(self.sidsize)
            .with_ssidsize(self.ssidsize)
            .with_priqs(if self.pri { self.priqs } else { 0 })
            .with_eventqs(self.eventqs)
            .with_cmdqs(self.cmdqs)
            .with_attr_perms_ovr(self.attr_perms_ovr)
    }

    pub fn idr3(&self) -> Idr3 {
        Idr3::new().with_ril(self.ril).with_mpam(self.mpam)
    }

    /// SMMU_MPAMIDR: PARTID_MAX\[15:0\], PMG_MAX\[23:16\] (IHI0070 6.3.41).
    pub fn mpamidr(&self) -> u32 {
        if self.mpam {
            u32::from(self.mpam_partid_max) | (u32::from(self.mpam_pmg_max) << 16)
        } else {
            0
        }
    }

    /// Whether the SMMU supports the VMS in Non-secure state (IHI0070 5.6.1).
    pub fn vms_supported(&self) -> bool {
        self.mpam && self.s1p && self.s2p && self.mpam_partid_max != 0
    }

    pub fn idr5(&self) -> Idr5 {
        Idr5::new()
            .with_oas(oas_encoding(self.oas_bits).unwrap_or(5))
            .with_gran4k(self.gran4k)
            .with_gran16k(self.gran16k)
            .with_gran64k(self.gran64k)
            // STALL_MAX: how many transactions may be stalled at once.
            .with_stall_max(if self.can_stall() { 256 } else { 0 })
    }

    /// The stall model allows stalling at all.
    pub fn can_stall(&self) -> bool {
        self.stall_model != StallModel::TerminateOnly
    }

    /// The translation features the walker needs (vmsa's view of IDR0/3/5). IAS = OAS for
    /// an AArch64-only SMMU (IHI0070 3.4).
    pub fn features(&self) -> twinmmu_vmsa::Features {
        let oas = pa_size(self.oas_bits).unwrap_or(PaSize::Bits48);
        twinmmu_vmsa::Features {
            oas,
            ias: oas,
            gran4k: self.gran4k,
            gran16k: self.gran16k,
            gran64k: self.gran64k,
            vax52: false,
            stt: false,
            had: false,
            xnx: false,
            httu_ha: false,
            httu_hd: false,
            s2_sl0_l3_4k: false,
        }
    }

    pub fn asid_bits(&self) -> u32 {
        if self.asid16 { 16 } else { 8 }
    }

    pub fn vmid_bits(&self) -> u32 {
        if self.vmid16 { 16 } else { 8 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_a_modern_server_smmu() {
        let c = SmmuConfig::default();
        c.validate().unwrap();
        let idr0 = c.idr0().into_bits();
        assert_eq!(idr0 & 0b11, 0b11, "S1P and S2P");
        assert_ne!(idr0 & (1 << 5), 0, "BTM");
        assert_ne!(idr0 & (1 << 12), 0, "ASID16");
        assert_ne!(idr0 & (1 << 18), 0, "VMID16");
        assert_eq!((idr0 >> 27) & 3, 1, "two-level stream tables");
        let idr1 = c.idr1().into_bits();
        assert_eq!(idr1 & 0x3f, 16, "SIDSIZE");
        assert_eq!((idr1 >> 6) & 0x1f, 20, "SSIDSIZE");
        assert_eq!((idr1 >> 16) & 0x1f, 19, "EVENTQS");
        assert_eq!((idr1 >> 21) & 0x1f, 19, "CMDQS");
        assert_ne!(c.idr3().into_bits() & (1 << 10), 0, "RIL");
        let idr5 = c.idr5().into_bits();
        assert_eq!(idr5 & 7, 5, "OAS 48 bits");
        assert_eq!((idr5 >> 4) & 7, 7, "all granules");
    }

    #[test]
    fn oas_encodings() {
        let table = [
            (32, 0),
            (36, 1),
            (40, 2),
            (42, 3),
            (44, 4),
            (48, 5),
            (52, 6),
        ];
        for (bits, enc) in table {
            assert_eq!(oas_encoding(bits), Some(enc), "{bits} bits");
            assert_eq!(pa_bits(enc), bits, "encoding {enc}");
        }
        assert_eq!(oas_encoding(47), None);
        assert_eq!(pa_bits(7), 52, "reserved: the largest");
        assert_eq!(pa_bits(0xff), 52);
    }

    #[test]
    fn toml_round_trip_and_partial_files() {
        let c =
            SmmuConfig::from_toml("s2p = false\noas_bits = 44\nstall_model = \"terminate_only\"\n")
                .unwrap();
        assert!(!c.s2p && c.s1p);
        assert_eq!(c.idr5().oas(), 4);
        assert_eq!(c.idr0().stall_model(), 1);
        let text = toml::to_string(&c).unwrap();
        assert_eq!(SmmuConfig::from_toml(&text).unwrap(), c);
        assert!(SmmuConfig::from_toml("oas_bits = 47").is_err());
        assert!(SmmuConfig::from_toml("s1p = false\ns2p = false").is_err());
        assert!(SmmuConfig::from_toml("no_such_field = 1").is_err());
    }
}
