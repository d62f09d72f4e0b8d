//! Command queue entries (IHI0070 chapter 4; smmu_kvm.md §4.7–§4.8): layouts and decoding
//! into [`Command`], with every CERROR_ILL rule that depends only on the entry and the
//! implementation.

use bitfield_struct::bitfield;

use crate::config::SmmuConfig;

pub mod op {
    //! Command opcodes (IHI0070 4.1.1).
    pub const PREFETCH_CONFIG: u8 = 0x01;
    pub const PREFETCH_ADDR: u8 = 0x02;
    pub const CFGI_STE: u8 = 0x03;
    /// Also CMD_CFGI_ALL, with Range = 31 (IHI0070 4.3.6).
    pub const CFGI_STE_RANGE: u8 = 0x04;
    pub const CFGI_CD: u8 = 0x05;
    pub const CFGI_CD_ALL: u8 = 0x06;
    pub const CFGI_VMS_PIDM: u8 = 0x07;
    pub const TLBI_NH_ALL: u8 = 0x10;
    pub const TLBI_NH_ASID: u8 = 0x11;
    pub const TLBI_NH_VA: u8 = 0x12;
    pub const TLBI_NH_VAA: u8 = 0x13;
    pub const TLBI_EL3_ALL: u8 = 0x18;
    pub const TLBI_EL3_VA: u8 = 0x1A;
    pub const TLBI_EL2_ALL: u8 = 0x20;
    pub const TLBI_EL2_ASID: u8 = 0x21;
    pub const TLBI_EL2_VA: u8 = 0x22;
    pub const TLBI_EL2_VAA: u8 = 0x23;
    pub const TLBI_S12_VMALL: u8 = 0x28;
    pub const TLBI_S2_IPA: u8 = 0x2A;
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    pub const ATC_INV: u8 = 0x40;
    pub const PRI_RESP: u8 = 0x41;
    pub const RESUME: u8 = 0x44;
    pub const STALL_TERM: u8 = 0x45;
    pub const SYNC: u8 = 0x46;
}

/// Dword 0 of stream-addressed commands (PREFETCH_*, CFGI_*, ATC_INV, PRI_RESP, RESUME,
/// STALL_TERM).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdStreamDw0 {
    pub opcode: u8,
    pub __: bool,
    /// ATC_INV Global.
    pub global: bool,
    pub ssec: bool,
    pub ssv: bool,
    /// SubstreamID[31:12]; for RESUME bits 12 and 13 are Ac (retry) and Ab (abort).
    #[bits(20)]
    pub ssid: u32,
    pub sid: u32,
}

/// Dword 0 of TLB invalidations (IHI0070 4.4.1).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdTlbiDw0 {
    pub opcode: u8,
    #[bits(4)]
    pub __: u8,
    #[bits(5)]
    pub num: u8,
    #[bits(3)]
    pub __: u8,
    #[bits(6)]
    pub scale: u8,
    #[bits(6)]
    pub __: u8,
    pub vmid: u16,
    pub asid: u16,
}

/// Dword 1 of TLB invalidations: Leaf, TTL\[9:8\], TG\[11:10\], Address\[63:12\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdTlbiDw1 {
    pub leaf: bool,
    #[bits(7)]
    pub __: u8,
    #[bits(2)]
    pub ttl: u8,
    #[bits(2)]
    pub tg: u8,
    #[bits(52)]
    pub addr: u64,
}

/// Dword 1 of CFGI_STE/CFGI_CD (Leaf, bit 0) and CFGI_STE_RANGE (Range\[4:0\]).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdCfgiDw1 {
    #[bits(5)]
    pub range: u8,
    #[bits(59)]
    pub __: u64,
}

/// Dword 0 of CMD_SYNC (IHI0070 4.7.3).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdSyncDw0 {
    pub opcode: u8,
    #[bits(4)]
    pub __: u8,
    #[bits(2)]
    pub cs: u8,
    #[bits(8)]
    pub __: u8,
    #[bits(2)]
    pub msh: u8,
    #[bits(4)]
    pub msiattr: u8,
    #[bits(4)]
    pub __: u8,
    pub msidata: u32,
}

/// Dword 1 of CMD_SYNC: MSIAddress\[55:2\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdSyncDw1 {
    #[bits(2)]
    pub __: u8,
    #[bits(54)]
    pub msiaddr: u64,
    #[bits(8)]
    pub __: u8,
}

/// Dword 1 of CMD_RESUME: STAG\[15:0\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdResumeDw1 {
    pub stag: u16,
    #[bits(48)]
    pub __: u64,
}

/// Dword 1 of CMD_PRI_RESP: PRGIndex\[8:0\], Resp\[13:12\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdPriRespDw1 {
    #[bits(9)]
    pub prgindex: u16,
    #[bits(3)]
    pub __: u8,
    #[bits(2)]
    pub resp: u8,
    #[bits(50)]
    pub __: u64,
}

/// Dword 1 of CMD_ATC_INV and CMD_PREFETCH_ADDR: Size\[5:0\] (ATC_INV; \[4:0\] for prefetch),
/// Address\[63:12\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CmdAddrDw1 {
    #[bits(6)]
    pub size: u8,
    #[bits(6)]
    pub __: u8,
    #[bits(52)]
    pub addr: u64,
}

/// A command entry as it sits in the queue (16 bytes, little-endian dwords).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmdqEntry(pub [u64; 2]);

impl CmdqEntry {
    pub fn opcode(&self) -> u8 {
        self.0[0] as u8
    }
}

/// The range part of an address-based TLBI when IDR3.RIL and TG ≠ 0 (IHI0070 4.4.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TlbiRange {
    /// Granule shift of TG: 12, 14 or 16.
    pub tg_shift: u8,
    pub num: u8,
    pub scale: u8,
    /// Level hint (0 = any).
    pub ttl: u8,
}

/// The address operand of a TLBI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbiAddr {
    /// Byte address (VA or IPA), bits \[11:0\] zero.
    pub addr: u64,
    pub leaf: bool,
    pub range: Option<TlbiRange>,
}

impl TlbiAddr {
    /// The invalidated span `[start, end)`; for a non-range operation, the address itself
    /// (entries covering it match, whatever their size).
    pub fn span(&self) -> (u64, u64) {
        match self.range {
            None => (self.addr, self.addr.saturating_add(1)),
            Some(r) => {
                // Range = (NUM + 1) × 2^SCALE granules, no wrap past the top. A decoded
                // command's SCALE is 6 bits, but a broadcast built by a caller may carry
                // any u8: a span past the top of the address space saturates, never
                // overflows.
                let shift = u32::from(r.scale) + u32::from(r.tg_shift);
                let bytes = if shift >= 64 {
                    u128::MAX
                } else {
                    (u128::from(r.num) + 1) << shift
                };
                let end = u128::from(self.addr).saturating_add(bytes);
                (self.addr, end.min(u128::from(u64::MAX)) as u64)
            }
        }
    }
}

/// CMD_SYNC completion signal (IHI0070 4.7.3 CS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSignal {
    None,
    /// SIG_IRQ: write MSIData to MSIAddress (if non-zero).
    Irq {
        msi_addr: u64,
        msi_data: u32,
    },
    Sev,
}

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    PrefetchConfig {
        sid: u32,
        ssid: Option<u32>,
    },
    PrefetchAddr {
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
    },
    CfgiSte {
        sid: u32,
        leaf: bool,
    },
    /// `range` 31 is CMD_CFGI_ALL.
    CfgiSteRange {
        sid: u32,
        range: u8,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
        leaf: bool,
    },
    CfgiCdAll {
        sid: u32,
    },
    /// CMD_CFGI_VMS_PIDM: separately cached VMS.PARTID_MAPs of a VMID (IHI0070 4.3.5).
    CfgiVmsPidm {
        vmid: u16,
    },
    TlbiNhAll {
        vmid: u16,
    },
    TlbiNhAsid {
        vmid: u16,
        asid: u16,
    },
    TlbiNhVa {
        vmid: u16,
        asid: u16,
        addr: TlbiAddr,
    },
    TlbiNhVaa {
        vmid: u16,
        addr: TlbiAddr,
    },
    TlbiEl2All,
    TlbiEl2Asid {
        asid: u16,
    },
    TlbiEl2Va {
        asid: u16,
        addr: TlbiAddr,
    },
    TlbiEl2Vaa {
        addr: TlbiAddr,
    },
    TlbiS12Vmall {
        vmid: u16,
    },
    TlbiS2Ipa {
        vmid: u16,
        addr: TlbiAddr,
    },
    TlbiNsnhAll,
    AtcInv {
        sid: u32,
        ssid: Option<u32>,
        global: bool,
        addr: u64,
        size: u8,
    },
    PriResp {
        sid: u32,
        ssid: Option<u32>,
        prgindex: u16,
        resp: u8,
    },
    /// `retry` = Ac; otherwise terminated, with abort if `abort` (Ab) or TERM_MODEL.
    Resume {
        sid: u32,
        stag: u16,
        retry: bool,
        abort: bool,
    },
    StallTerm {
        sid: u32,
    },
    Sync {
        signal: SyncSignal,
    },
}

/// Why a command is CERROR_ILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IllegalCommand {
    #[error("reserved or unknown opcode {0:#04x}")]
    Opcode(u8),
    #[error("SSec = 1 on the Non-secure command queue")]
    Ssec,
    #[error("the command needs a feature the SMMU does not implement")]
    Unsupported,
    #[error("reserved field value")]
    Reserved,
}

fn ssid_opt(d0: CmdStreamDw0) -> Option<u32> {
    d0.ssv().then(|| d0.ssid())
}

fn tlbi_addr(
    d0: CmdTlbiDw0,
    d1: CmdTlbiDw1,
    c: &SmmuConfig,
    ipa: bool,
) -> Result<TlbiAddr, IllegalCommand> {
    let mut addr = d1.addr() << 12;
    if ipa {
        // IPA operands are Address[55:12].
        addr &= (1u64 << 56) - 1;
    }
    // Without RIL, TG/NUM/SCALE/TTL are RES0 and ignored.
    let range = if c.ril && d1.tg() != 0 {
        let tg_shift = match d1.tg() {
            1 => 12,
            2 => 14,
            _ => 16,
        };
        // A 16K TTL of 0b01 (level 1) needs 52-bit support (IDR5.DS); otherwise it is
        // treated as 0b00 (IHI0070 4.4.1.1).
        let ttl = if d1.tg() == 2 && d1.ttl() == 1 {
            0
        } else {
            d1.ttl()
        };
        // NUM = 0, SCALE = 0, TTL = 0 with TG ≠ 0 is reserved: CERROR_ILL.
        if d0.num() == 0 && d0.scale() == 0 && ttl == 0 {
            return Err(IllegalCommand::Reserved);
        }
        Some(TlbiRange {
            tg_shift,
            num: d0.num(),
            scale: d0.scale(),
            ttl,
        })
    } else {
        None
    };
    Ok(TlbiAddr {
        addr,
        leaf: d1.leaf(),
        range,
    })
}

/// Decodes one command for the Non-secure command queue of an SMMU configured as `c`.
pub fn decode(e: CmdqEntry, c: &SmmuConfig) -> Result<Command, IllegalCommand> {
    let [w0, w1] = e.0;
    let s0 = CmdStreamDw0::from_bits(w0);
    let t0 = CmdTlbiDw0::from_bits(w0);
    let t1 = CmdTlbiDw1::from_bits(w1);
    let opcode = e.opcode();
    let need = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(IllegalCommand::Unsupported)
        }
    };
    // Commands with an SSec field: a Non-secure queue must have SSec = 0 (IHI0070 4.1.6).
    let has_ssec = matches!(
        opcode,
        op::PREFETCH_CONFIG
            | op::PREFETCH_ADDR
            | op::CFGI_STE
            | op::CFGI_STE_RANGE
            | op::CFGI_CD
            | op::CFGI_CD_ALL
            | op::CFGI_VMS_PIDM
            | op::RESUME
            | op::STALL_TERM
    );
    if has_ssec && s0.ssec() {
        return Err(IllegalCommand::Ssec);
    }
    // A 16-bit ASID/VMID field on an 8-bit implementation has RES0 upper bits; the command is
    // not required to affect entries then. Keep the value: nothing is tagged with it.
    let vmid = t0.vmid();
    let asid = t0.asid();
    Ok(match opcode {
        op::PREFETCH_CONFIG => Command::PrefetchConfig {
            sid: s0.sid(),
            ssid: ssid_opt(s0),
        },
        op::PREFETCH_ADDR => Command::PrefetchAddr {
            sid: s0.sid(),
            ssid: ssid_opt(s0),
            addr: CmdAddrDw1::from_bits(w1).addr() << 12,
        },
        op::CFGI_STE => Command::CfgiSte {
            sid: s0.sid(),
            leaf: w1 & 1 != 0,
        },
        op::CFGI_STE_RANGE => Command::CfgiSteRange {
            sid: s0.sid(),
            range: CmdCfgiDw1::from_bits(w1).range(),
        },
        op::CFGI_CD => {
            // CFGI_CD* raise CERROR_ILL when stage 1 is not implemented (IHI0070 4.3.3).
            need(c.s1p)?;
            Command::CfgiCd {
                sid: s0.sid(),
                ssid: s0.ssid(),
                leaf: w1 & 1 != 0,
            }
        }
        op::CFGI_CD_ALL => {
            need(c.s1p)?;
            Command::CfgiCdAll { sid: s0.sid() }
        }
        op::TLBI_NH_ALL => {
            need(c.s1p)?;
            Command::TlbiNhAll { vmid }
        }
        op::TLBI_NH_ASID => {
            need(c.s1p)?;
            Command::TlbiNhAsid { vmid, asid }
        }
        op::TLBI_NH_VA => {
            need(c.s1p)?;
            Command::TlbiNhVa {
                vmid,
                asid,
                addr: tlbi_addr(t0, t1, c, false)?,
            }
        }
        op::TLBI_NH_VAA => {
            need(c.s1p)?;
            Command::TlbiNhVaa {
                vmid,
                addr: tlbi_addr(t0, t1, c, false)?,
            }
        }
        op::TLBI_EL2_ALL => {
            need(c.s1p && c.hyp)?;
            Command::TlbiEl2All
        }
        op::TLBI_EL2_ASID => {
            need(c.s1p && c.hyp)?;
            Command::TlbiEl2Asid { asid }
        }
        op::TLBI_EL2_VA => {
            need(c.s1p && c.hyp)?;
            Command::TlbiEl2Va {
                asid,
                addr: tlbi_addr(t0, t1, c, false)?,
            }
        }
        op::TLBI_EL2_VAA => {
            need(c.s1p && c.hyp)?;
            Command::TlbiEl2Vaa {
                addr: tlbi_addr(t0, t1, c, false)?,
            }
        }
        op::TLBI_S12_VMALL => {
            need(c.s2p)?;
            Command::TlbiS12Vmall { vmid }
        }
        op::TLBI_S2_IPA => {
            need(c.s2p)?;
            Command::TlbiS2Ipa {
                vmid,
                addr: tlbi_addr(t0, t1, c, true)?,
            }
        }
        op::TLBI_NSNH_ALL => Command::TlbiNsnhAll,
        op::ATC_INV => {
            need(c.ats)?;
            let a = CmdAddrDw1::from_bits(w1);
            Command::AtcInv {
                sid: s0.sid(),
                ssid: ssid_opt(s0),
                global: s0.global(),
                addr: a.addr() << 12,
                size: a.size(),
            }
        }
        op::PRI_RESP => {
            need(c.pri)?;
            let r = CmdPriRespDw1::from_bits(w1);
            if r.resp() == 3 {
                return Err(IllegalCommand::Reserved);
            }
            Command::PriResp {
                sid: s0.sid(),
                ssid: ssid_opt(s0),
                prgindex: r.prgindex(),
                resp: r.resp(),
            }
        }
        op::RESUME => {
            // No stall model: CERROR_ILL (IHI0070 4.7.1).
            need(c.can_stall())?;
            Command::Resume {
                sid: s0.sid(),
                stag: CmdResumeDw1::from_bits(w1).stag(),
                // Action Ac is bit 12, Abort Ab bit 13 (Linux: Resp[13:12] 0 TERM, 1 RETRY,
                // 2 ABORT — the same bits).
                retry: w0 & (1 << 12) != 0,
                abort: w0 & (1 << 13) != 0 || c.term_model,
            }
        }
        op::STALL_TERM => {
            need(c.can_stall())?;
            Command::StallTerm { sid: s0.sid() }
        }
        op::SYNC => {
            let s = CmdSyncDw0::from_bits(w0);
            let signal = match s.cs() {
                0 => SyncSignal::None,
                1 => SyncSignal::Irq {
                    msi_addr: CmdSyncDw1::from_bits(w1).msiaddr() << 2,
                    msi_data: s.msidata(),
                },
                2 => SyncSignal::Sev,
                _ => return Err(IllegalCommand::Reserved),
            };
            Command::Sync { signal }
        }
        // Needs the VMS (IHI0070 4.3.5).
        op::CFGI_VMS_PIDM if c.vms_supported() => Command::CfgiVmsPidm { vmid },
        // EL3 invalidations are valid only on the Secure queue.
        other => return Err(IllegalCommand::Opcode(other)),
    })
}

/// Builders used by tests, the qtest driver and drivers above this crate.
pub mod build {
    use super::*;

    fn stream(opcode: u8, sid: u32, ssid: Option<u32>) -> u64 {
        CmdStreamDw0::new()
            .with_opcode(opcode)
            .with_ssv(ssid.is_some())
            .with_ssid(ssid.unwrap_or(0))
            .with_sid(sid)
            .into_bits()
    }

    pub fn cfgi_ste(sid: u32, leaf: bool) -> CmdqEntry {
        CmdqEntry([stream(op::CFGI_STE, sid, None), u64::from(leaf)])
    }
    pub fn cfgi_ste_range(sid: u32, range: u8) -> CmdqEntry {
        CmdqEntry([stream(op::CFGI_STE_RANGE, sid, None), u64::from(range & 31)])
    }
    /// CMD_CFGI_ALL: CFGI_STE_RANGE with Range = 31.
    pub fn cfgi_all() -> CmdqEntry {
        cfgi_ste_range(0, 31)
    }
    pub fn cfgi_cd(sid: u32, ssid: u32, leaf: bool) -> CmdqEntry {
        CmdqEntry([stream(op::CFGI_CD, sid, Some(ssid)), u64::from(leaf)])
    }
    pub fn cfgi_cd_all(sid: u32) -> CmdqEntry {
        CmdqEntry([stream(op::CFGI_CD_ALL, sid, None), 0])
    }
    pub fn cfgi_vms_pidm(vmid: u16) -> CmdqEntry {
        CmdqEntry([tlbi(op::CFGI_VMS_PIDM, vmid, 0), 0])
    }
    fn tlbi(opcode: u8, vmid: u16, asid: u16) -> u64 {
        CmdTlbiDw0::new()
            .with_opcode(opcode)
            .with_vmid(vmid)
            .with_asid(asid)
            .into_bits()
    }
    fn addr_dw1(addr: u64, leaf: bool) -> u64 {
        CmdTlbiDw1::new()
            .with_leaf(leaf)
            .with_addr(addr >> 12)
            .into_bits()
    }
    pub fn tlbi_nh_all(vmid: u16) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_NH_ALL, vmid, 0), 0])
    }
    pub fn tlbi_nh_asid(vmid: u16, asid: u16) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_NH_ASID, vmid, asid), 0])
    }
    pub fn tlbi_nh_va(vmid: u16, asid: u16, va: u64, leaf: bool) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_NH_VA, vmid, asid), addr_dw1(va, leaf)])
    }
    pub fn tlbi_nh_vaa(vmid: u16, va: u64, leaf: bool) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_NH_VAA, vmid, 0), addr_dw1(va, leaf)])
    }
    pub fn tlbi_s2_ipa(vmid: u16, ipa: u64, leaf: bool) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_S2_IPA, vmid, 0), addr_dw1(ipa, leaf)])
    }
    /// A range form: `(num + 1) << scale` granules of `tg` (1 = 4K, 2 = 16K, 3 = 64K).
    pub fn with_range(mut e: CmdqEntry, tg: u8, num: u8, scale: u8, ttl: u8) -> CmdqEntry {
        let d0 = CmdTlbiDw0::from_bits(e.0[0])
            .with_num(num)
            .with_scale(scale);
        let d1 = CmdTlbiDw1::from_bits(e.0[1]).with_tg(tg).with_ttl(ttl);
        e.0 = [d0.into_bits(), d1.into_bits()];
        e
    }
    pub fn tlbi_s12_vmall(vmid: u16) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_S12_VMALL, vmid, 0), 0])
    }
    pub fn tlbi_nsnh_all() -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_NSNH_ALL, 0, 0), 0])
    }
    pub fn tlbi_el2_all() -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_EL2_ALL, 0, 0), 0])
    }
    pub fn tlbi_el2_asid(asid: u16) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_EL2_ASID, 0, asid), 0])
    }
    pub fn tlbi_el2_va(asid: u16, va: u64, leaf: bool) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_EL2_VA, 0, asid), addr_dw1(va, leaf)])
    }
    pub fn tlbi_el2_vaa(va: u64, leaf: bool) -> CmdqEntry {
        CmdqEntry([tlbi(op::TLBI_EL2_VAA, 0, 0), addr_dw1(va, leaf)])
    }
    pub fn sync() -> CmdqEntry {
        CmdqEntry([u64::from(op::SYNC), 0])
    }
    pub fn sync_msi(addr: u64, data: u32) -> CmdqEntry {
        CmdqEntry([
            CmdSyncDw0::new()
                .with_opcode(op::SYNC)
                .with_cs(1)
                .with_msidata(data)
                .into_bits(),
            CmdSyncDw1::new().with_msiaddr(addr >> 2).into_bits(),
        ])
    }
    pub fn resume(sid: u32, stag: u16, retry: bool, abort: bool) -> CmdqEntry {
        let w0 =
            stream(op::RESUME, sid, None) | (u64::from(retry) << 12) | (u64::from(abort) << 13);
        CmdqEntry([w0, CmdResumeDw1::new().with_stag(stag).into_bits()])
    }
    pub fn stall_term(sid: u32) -> CmdqEntry {
        CmdqEntry([stream(op::STALL_TERM, sid, None), 0])
    }
    pub fn atc_inv(sid: u32, ssid: Option<u32>, addr: u64, size: u8) -> CmdqEntry {
        CmdqEntry([
            stream(op::ATC_INV, sid, ssid),
            CmdAddrDw1::new()
                .with_size(size)
                .with_addr(addr >> 12)
                .into_bits(),
        ])
    }
    pub fn pri_resp(sid: u32, prgindex: u16, resp: u8) -> CmdqEntry {
        CmdqEntry([
            stream(op::PRI_RESP, sid, None),
            CmdPriRespDw1::new()
                .with_prgindex(prgindex)
                .with_resp(resp)
                .into_bits(),
        ])
    }
    pub fn prefetch_config(sid: u32) -> CmdqEntry {
        CmdqEntry([stream(op::PREFETCH_CONFIG, sid, None), 0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StallModel;

    #[test]
    fn range_spans_saturate_instead_of_overflowing() {
        let at = |addr, num, scale, tg_shift| {
            TlbiAddr {
                addr,
                leaf: false,
                range: Some(TlbiRange {
                    tg_shift,
                    num,
                    scale,
                    ttl: 0,
                }),
            }
            .span()
        };
        assert_eq!(at(0x1000, 3, 1, 12), (0x1000, 0x1000 + 8 * 0x1000));
        assert_eq!(at(0x1000, 255, 255, 16), (0x1000, u64::MAX));
        assert_eq!(at(!0xfffu64, 0, 52, 12), (!0xfffu64, u64::MAX));
        assert_eq!(at(0, 0, 51, 12), (0, 1 << 63));
    }

    #[test]
    fn stream_dword0_fields_by_bit_position() {
        assert_eq!(CmdStreamDw0::new().with_opcode(0xff).into_bits(), 0xff);
        assert_eq!(CmdStreamDw0::new().with_global(true).into_bits(), 1 << 9);
        assert_eq!(CmdStreamDw0::new().with_ssec(true).into_bits(), 1 << 10);
        assert_eq!(CmdStreamDw0::new().with_ssv(true).into_bits(), 1 << 11);
        assert_eq!(
            CmdStreamDw0::new().with_ssid(0xf_ffff).into_bits(),
            0xf_ffff << 12
        );
        assert_eq!(
            CmdStreamDw0::new().with_sid(u32::MAX).into_bits(),
            0xffff_ffff << 32
        );
    }

    #[test]
    fn tlbi_fields_by_bit_position() {
        assert_eq!(CmdTlbiDw0::new().with_num(0x1f).into_bits(), 0x1f << 12);
        // IHI0070 4.4.1.1: SCALE is [25:20], six bits (smmu_kvm.md says [24:20]).
        assert_eq!(CmdTlbiDw0::new().with_scale(0x3f).into_bits(), 0x3f << 20);
        assert_eq!(
            CmdTlbiDw0::new().with_vmid(0xffff).into_bits(),
            0xffff << 32
        );
        assert_eq!(
            CmdTlbiDw0::new().with_asid(0xffff).into_bits(),
            0xffff << 48
        );
        assert_eq!(CmdTlbiDw1::new().with_leaf(true).into_bits(), 1);
        assert_eq!(CmdTlbiDw1::new().with_ttl(3).into_bits(), 3 << 8);
        assert_eq!(CmdTlbiDw1::new().with_tg(3).into_bits(), 3 << 10);
        assert_eq!(CmdTlbiDw1::new().with_addr(1).into_bits(), 1 << 12);
        assert_eq!(CmdCfgiDw1::new().with_range(31).into_bits(), 31);
    }

    #[test]
    fn other_fields_by_bit_position() {
        assert_eq!(CmdSyncDw0::new().with_cs(3).into_bits(), 3 << 12);
        assert_eq!(CmdSyncDw0::new().with_msh(3).into_bits(), 3 << 22);
        assert_eq!(CmdSyncDw0::new().with_msiattr(0xf).into_bits(), 0xf << 24);
        assert_eq!(
            CmdSyncDw0::new().with_msidata(u32::MAX).into_bits(),
            0xffff_ffff << 32
        );
        assert_eq!(CmdSyncDw1::new().with_msiaddr(1).into_bits(), 1 << 2);
        assert_eq!(
            CmdSyncDw1::new().with_msiaddr((1 << 54) - 1).into_bits(),
            ((1u64 << 56) - 1) & !3
        );
        assert_eq!(CmdResumeDw1::new().with_stag(0xffff).into_bits(), 0xffff);
        assert_eq!(CmdPriRespDw1::new().with_prgindex(0x1ff).into_bits(), 0x1ff);
        assert_eq!(CmdPriRespDw1::new().with_resp(3).into_bits(), 3 << 12);
        assert_eq!(CmdAddrDw1::new().with_size(0x3f).into_bits(), 0x3f);
        assert_eq!(CmdAddrDw1::new().with_addr(1).into_bits(), 1 << 12);
    }

    #[test]
    fn decodes_each_command() {
        let c = SmmuConfig {
            ats: true,
            pri: true,
            ..SmmuConfig::default()
        };
        let d = |e| decode(e, &c);
        assert_eq!(
            d(build::cfgi_all()),
            Ok(Command::CfgiSteRange { sid: 0, range: 31 })
        );
        assert_eq!(
            d(build::cfgi_ste(7, true)),
            Ok(Command::CfgiSte { sid: 7, leaf: true })
        );
        assert_eq!(
            d(build::cfgi_cd(7, 3, false)),
            Ok(Command::CfgiCd {
                sid: 7,
                ssid: 3,
                leaf: false
            })
        );
        assert_eq!(d(build::cfgi_cd_all(9)), Ok(Command::CfgiCdAll { sid: 9 }));
        assert_eq!(d(build::tlbi_nh_all(3)), Ok(Command::TlbiNhAll { vmid: 3 }));
        assert_eq!(
            d(build::tlbi_nh_asid(3, 4)),
            Ok(Command::TlbiNhAsid { vmid: 3, asid: 4 })
        );
        assert_eq!(
            d(build::tlbi_nh_va(3, 4, 0x1234_5000, true)),
            Ok(Command::TlbiNhVa {
                vmid: 3,
                asid: 4,
                addr: TlbiAddr {
                    addr: 0x1234_5000,
                    leaf: true,
                    range: None
                }
            })
        );
        assert_eq!(d(build::tlbi_nsnh_all()), Ok(Command::TlbiNsnhAll));
        assert_eq!(
            d(build::tlbi_s12_vmall(2)),
            Ok(Command::TlbiS12Vmall { vmid: 2 })
        );
        assert_eq!(d(build::tlbi_el2_all()), Ok(Command::TlbiEl2All));
        assert_eq!(
            d(build::resume(5, 9, true, false)),
            Ok(Command::Resume {
                sid: 5,
                stag: 9,
                retry: true,
                abort: false
            })
        );
        assert_eq!(d(build::stall_term(5)), Ok(Command::StallTerm { sid: 5 }));
        assert_eq!(
            d(build::sync_msi(0x4000_0040, 0xabcd)),
            Ok(Command::Sync {
                signal: SyncSignal::Irq {
                    msi_addr: 0x4000_0040,
                    msi_data: 0xabcd
                }
            })
        );
        assert_eq!(
            d(build::atc_inv(1, Some(2), 0x10000, 4)),
            Ok(Command::AtcInv {
                sid: 1,
                ssid: Some(2),
                global: false,
                addr: 0x10000,
                size: 4
            })
        );
        assert_eq!(
            d(build::pri_resp(1, 7, 2)),
            Ok(Command::PriResp {
                sid: 1,
                ssid: None,
                prgindex: 7,
                resp: 2
            })
        );
        assert_eq!(
            d(build::prefetch_config(1)),
            Ok(Command::PrefetchConfig { sid: 1, ssid: None })
        );
    }

    #[test]
    fn range_invalidation_span_and_reserved_encoding() {
        let c = SmmuConfig::default();
        // 4K granule, NUM=1, SCALE=2: (1+1) << 2 = 8 pages.
        let e = build::with_range(build::tlbi_nh_vaa(1, 0x20_0000, false), 1, 1, 2, 0);
        match decode(e, &c).unwrap() {
            Command::TlbiNhVaa { addr, .. } => {
                assert_eq!(addr.span(), (0x20_0000, 0x20_0000 + 8 * 4096));
            }
            other => panic!("{other:?}"),
        }
        // NUM = SCALE = TTL = 0 with TG ≠ 0 is reserved.
        let e = build::with_range(build::tlbi_nh_vaa(1, 0, false), 1, 0, 0, 0);
        assert_eq!(decode(e, &c), Err(IllegalCommand::Reserved));
        // 16K with TTL=1 is treated as TTL=0, hence also reserved.
        let e = build::with_range(build::tlbi_nh_vaa(1, 0, false), 2, 0, 0, 1);
        assert_eq!(decode(e, &c), Err(IllegalCommand::Reserved));
        // Without RIL the range fields are ignored.
        let norange = SmmuConfig {
            ril: false,
            ..SmmuConfig::default()
        };
        let e = build::with_range(build::tlbi_nh_vaa(1, 0x1000, false), 1, 0, 0, 0);
        match decode(e, &norange).unwrap() {
            Command::TlbiNhVaa { addr, .. } => assert!(addr.range.is_none()),
            other => panic!("{other:?}"),
        }
        // A huge range saturates instead of wrapping.
        let e = build::with_range(build::tlbi_nh_vaa(1, !0xfff, false), 3, 31, 63, 0);
        match decode(e, &c).unwrap() {
            Command::TlbiNhVaa { addr, .. } => assert_eq!(addr.span().1, u64::MAX),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn illegal_commands() {
        let c = SmmuConfig::default();
        assert_eq!(
            decode(CmdqEntry([0, 0]), &c),
            Err(IllegalCommand::Opcode(0))
        );
        assert_eq!(
            decode(CmdqEntry([0x18, 0]), &c),
            Err(IllegalCommand::Opcode(0x18))
        );
        assert_eq!(
            decode(CmdqEntry([0x50, 0]), &c),
            Err(IllegalCommand::Opcode(0x50))
        );
        assert_eq!(
            decode(
                CmdqEntry([build::cfgi_ste(1, false).0[0] | (1 << 10), 0]),
                &c
            ),
            Err(IllegalCommand::Ssec)
        );
        assert_eq!(
            decode(build::atc_inv(1, None, 0, 0), &c),
            Err(IllegalCommand::Unsupported),
            "ATC_INV without ATS"
        );
        assert_eq!(
            decode(build::pri_resp(1, 0, 0), &c),
            Err(IllegalCommand::Unsupported)
        );
        let s1only = SmmuConfig {
            s2p: false,
            ..SmmuConfig::default()
        };
        assert_eq!(
            decode(build::tlbi_s12_vmall(1), &s1only),
            Err(IllegalCommand::Unsupported)
        );
        assert_eq!(
            decode(build::tlbi_s2_ipa(1, 0, false), &s1only),
            Err(IllegalCommand::Unsupported)
        );
        let s2only = SmmuConfig {
            s1p: false,
            ..SmmuConfig::default()
        };
        assert_eq!(
            decode(build::tlbi_nh_all(1), &s2only),
            Err(IllegalCommand::Unsupported)
        );
        assert_eq!(
            decode(build::cfgi_cd_all(1), &s2only),
            Err(IllegalCommand::Unsupported)
        );
        let nohyp = SmmuConfig {
            hyp: false,
            ..SmmuConfig::default()
        };
        assert_eq!(
            decode(build::tlbi_el2_all(), &nohyp),
            Err(IllegalCommand::Unsupported)
        );
        let nostall = SmmuConfig {
            stall_model: StallModel::TerminateOnly,
            ..SmmuConfig::default()
        };
        assert_eq!(
            decode(build::resume(1, 1, true, false), &nostall),
            Err(IllegalCommand::Unsupported)
        );
        assert_eq!(
            decode(build::stall_term(1), &nostall),
            Err(IllegalCommand::Unsupported)
        );
        // CMD_SYNC with CS = 0b11 is reserved.
        assert_eq!(
            decode(CmdqEntry([0x46 | (3 << 12), 0]), &c),
            Err(IllegalCommand::Reserved)
        );
        let pri = SmmuConfig {
            ats: true,
            pri: true,
            ..SmmuConfig::default()
        };
        assert_eq!(
            decode(build::pri_resp(1, 0, 3), &pri),
            Err(IllegalCommand::Reserved)
        );
    }
}
