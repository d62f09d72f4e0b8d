//! Event records (IHI0070 7.3; smmu_kvm.md §4.9): 32-byte little-endian records written to
//! the event queue.

use bitfield_struct::bitfield;

/// Event record dword 0: Type\[7:0\], SSV 11, SubstreamID\[31:12\], StreamID\[63:32\].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct EvtDw0 {
    pub event_type: u8,
    #[bits(3)]
    pub __: u8,
    pub ssv: bool,
    #[bits(20)]
    pub ssid: u32,
    pub sid: u32,
}

/// Event record dword 1 for translation faults (IHI0070 7.3.12–7.3.16).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct EvtDw1 {
    pub stag: u16,
    #[bits(15)]
    pub __: u16,
    pub stall: bool,
    pub __: bool,
    pub pnu: bool,
    pub ind: bool,
    pub rnw: bool,
    #[bits(2)]
    pub __: u8,
    pub nsipa: bool,
    pub s2: bool,
    #[bits(2)]
    pub class: u8,
    #[bits(2)]
    pub __: u8,
    pub ttrnw: bool,
    #[bits(19)]
    pub __: u32,
}

/// Event record dword 3: IPA\[55:12\] for stage-2 faults.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct EvtIpa {
    #[bits(12)]
    pub __: u16,
    #[bits(44)]
    pub ipa: u64,
    #[bits(8)]
    pub __: u8,
}

/// Event record dword 3: FetchAddr\[55:3\] for F_STE_FETCH, F_CD_FETCH, F_WALK_EABT (IHI0070
/// 7.3.4, 7.3.10, 7.3.12: bits \[247:195\] of the record).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct EvtFetchAddr {
    #[bits(3)]
    pub __: u8,
    #[bits(53)]
    pub addr: u64,
    #[bits(8)]
    pub __: u8,
}

/// Event numbers (IHI0070 7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventType {
    FUut = 0x01,
    CBadStreamid = 0x02,
    FSteFetch = 0x03,
    CBadSte = 0x04,
    FBadAtsTreq = 0x05,
    FStreamDisabled = 0x06,
    FTranslForbidden = 0x07,
    CBadSubstreamid = 0x08,
    FCdFetch = 0x09,
    CBadCd = 0x0A,
    FWalkEabt = 0x0B,
    FTranslation = 0x10,
    FAddrSize = 0x11,
    FAccess = 0x12,
    FPermission = 0x13,
    FTlbConflict = 0x20,
    FCfgConflict = 0x21,
    EPageRequest = 0x24,
    FVmsFetch = 0x25,
}

impl EventType {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The architecture's name, as `twinmmu qtest` prints it.
    pub fn name(self) -> &'static str {
        match self {
            EventType::FUut => "F_UUT",
            EventType::CBadStreamid => "C_BAD_STREAMID",
            EventType::FSteFetch => "F_STE_FETCH",
            EventType::CBadSte => "C_BAD_STE",
            EventType::FBadAtsTreq => "F_BAD_ATS_TREQ",
            EventType::FStreamDisabled => "F_STREAM_DISABLED",
            EventType::FTranslForbidden => "F_TRANSL_FORBIDDEN",
            EventType::CBadSubstreamid => "C_BAD_SUBSTREAMID",
            EventType::FCdFetch => "F_CD_FETCH",
            EventType::CBadCd => "C_BAD_CD",
            EventType::FWalkEabt => "F_WALK_EABT",
            EventType::FTranslation => "F_TRANSLATION",
            EventType::FAddrSize => "F_ADDR_SIZE",
            EventType::FAccess => "F_ACCESS",
            EventType::FPermission => "F_PERMISSION",
            EventType::FTlbConflict => "F_TLB_CONFLICT",
            EventType::FCfgConflict => "F_CFG_CONFLICT",
            EventType::EPageRequest => "E_PAGE_REQUEST",
            EventType::FVmsFetch => "F_VMS_FETCH",
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        use EventType::*;
        [
            FUut,
            CBadStreamid,
            FSteFetch,
            CBadSte,
            FBadAtsTreq,
            FStreamDisabled,
            FTranslForbidden,
            CBadSubstreamid,
            FCdFetch,
            CBadCd,
            FWalkEabt,
            FTranslation,
            FAddrSize,
            FAccess,
            FPermission,
            FTlbConflict,
            FCfgConflict,
            EPageRequest,
            FVmsFetch,
        ]
        .into_iter()
        .find(|t| t.code() == code)
    }

    /// Translation-class faults, recorded only under CD.R / STE.S2R (smmu_kvm.md §4.9).
    pub fn is_translation_fault(self) -> bool {
        matches!(
            self,
            EventType::FTranslation
                | EventType::FAddrSize
                | EventType::FAccess
                | EventType::FPermission
        )
    }
}

/// CLASS of the operation that faulted (IHI0070 7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultClass {
    /// CD fetch.
    Cd = 0,
    /// Stage-1 translation table fetch.
    Tt = 1,
    /// The input address of the stage.
    In = 2,
}

/// One event, before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub event_type: EventType,
    pub sid: u32,
    pub ssid: Option<u32>,
    /// `Some(stag)` for a stalled transaction (Stall = 1).
    pub stall: Option<u16>,
    pub pnu: bool,
    pub ind: bool,
    pub rnw: bool,
    pub s2: bool,
    pub class: FaultClass,
    /// For CLASS = TT stage-2 faults: the descriptor access was a read.
    pub ttrnw: bool,
    pub input_addr: u64,
    /// The faulting IPA of a stage-2 fault.
    pub ipa: u64,
    /// The fetch address of F_STE_FETCH, F_CD_FETCH, F_WALK_EABT.
    pub fetch_addr: u64,
}

impl Event {
    /// A configuration or fetch event carrying only the stream.
    pub fn stream(event_type: EventType, sid: u32, ssid: Option<u32>) -> Self {
        Event {
            event_type,
            sid,
            ssid,
            stall: None,
            pnu: false,
            ind: false,
            rnw: false,
            s2: false,
            class: FaultClass::In,
            ttrnw: false,
            input_addr: 0,
            ipa: 0,
            fetch_addr: 0,
        }
    }

    /// The 32-byte record (IHI0070 7.3).
    pub fn encode(&self) -> [u64; 4] {
        let t = self.event_type;
        let mut d0 = EvtDw0::new().with_event_type(t.code()).with_sid(self.sid);
        // C_BAD_SUBSTREAMID always carries a valid SubstreamID (IHI0070 7.3.9, no SSV).
        match (t, self.ssid) {
            (EventType::CBadSubstreamid, s) => d0 = d0.with_ssid(s.unwrap_or(0)),
            (_, Some(s)) => d0 = d0.with_ssv(true).with_ssid(s),
            (_, None) => {}
        }
        let mut rec = [d0.into_bits(), 0, 0, 0];
        match t {
            EventType::FSteFetch | EventType::FCdFetch | EventType::FVmsFetch => {
                rec[3] = EvtFetchAddr::new()
                    .with_addr(self.fetch_addr >> 3)
                    .into_bits();
            }
            EventType::FWalkEabt
            | EventType::FTranslation
            | EventType::FAddrSize
            | EventType::FAccess
            | EventType::FPermission
            | EventType::FUut
            | EventType::FBadAtsTreq
            | EventType::FTranslForbidden => {
                let mut d1 = EvtDw1::new()
                    .with_pnu(self.pnu)
                    // InD is 0 for writes (IHI0070 7.3.13).
                    .with_ind(self.ind && self.rnw)
                    .with_rnw(self.rnw)
                    .with_s2(self.s2)
                    .with_class(self.class as u8);
                if let Some(stag) = self.stall {
                    d1 = d1.with_stall(true).with_stag(stag);
                }
                if t == EventType::FPermission && self.class == FaultClass::Tt {
                    d1 = d1.with_ttrnw(self.ttrnw);
                }
                rec[1] = d1.into_bits();
                rec[2] = self.input_addr;
                rec[3] = if t == EventType::FWalkEabt {
                    EvtFetchAddr::new()
                        .with_addr(self.fetch_addr >> 3)
                        .into_bits()
                } else if self.s2 {
                    EvtIpa::new().with_ipa(self.ipa >> 12).into_bits()
                } else {
                    0
                };
            }
            _ => {}
        }
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_by_bit_position() {
        assert_eq!(EvtDw0::new().with_event_type(0xff).into_bits(), 0xff);
        assert_eq!(EvtDw0::new().with_ssv(true).into_bits(), 1 << 11);
        assert_eq!(
            EvtDw0::new().with_ssid(0xf_ffff).into_bits(),
            0xf_ffff << 12
        );
        assert_eq!(
            EvtDw0::new().with_sid(u32::MAX).into_bits(),
            0xffff_ffff << 32
        );
        assert_eq!(EvtDw1::new().with_stag(0xffff).into_bits(), 0xffff);
        assert_eq!(EvtDw1::new().with_stall(true).into_bits(), 1 << 31);
        assert_eq!(EvtDw1::new().with_pnu(true).into_bits(), 1 << 33);
        assert_eq!(EvtDw1::new().with_ind(true).into_bits(), 1 << 34);
        assert_eq!(EvtDw1::new().with_rnw(true).into_bits(), 1 << 35);
        assert_eq!(EvtDw1::new().with_nsipa(true).into_bits(), 1 << 38);
        assert_eq!(EvtDw1::new().with_s2(true).into_bits(), 1 << 39);
        assert_eq!(EvtDw1::new().with_class(3).into_bits(), 3 << 40);
        assert_eq!(EvtDw1::new().with_ttrnw(true).into_bits(), 1 << 44);
        assert_eq!(EvtIpa::new().with_ipa(1).into_bits(), 1 << 12);
        assert_eq!(
            EvtIpa::new().with_ipa((1 << 44) - 1).into_bits(),
            ((1u64 << 56) - 1) & !0xfff
        );
        assert_eq!(EvtFetchAddr::new().with_addr(1).into_bits(), 1 << 3);
    }

    #[test]
    fn encodes_a_stage2_permission_fault() {
        let e = Event {
            event_type: EventType::FPermission,
            sid: 0x42,
            ssid: Some(3),
            stall: Some(7),
            pnu: true,
            ind: false,
            rnw: false,
            s2: true,
            class: FaultClass::Tt,
            ttrnw: true,
            input_addr: 0xdead_b000,
            ipa: 0x8000_1234,
            fetch_addr: 0,
        };
        let r = e.encode();
        assert_eq!(r[0], 0x13 | (1 << 11) | (3 << 12) | (0x42 << 32));
        assert_eq!(
            r[1],
            7 | (1 << 31) | (1 << 33) | (1 << 39) | (1 << 40) | (1 << 44)
        );
        assert_eq!(r[2], 0xdead_b000);
        assert_eq!(r[3], 0x8000_1000);
    }

    #[test]
    fn fetch_addresses_go_to_dword3() {
        let mut e = Event::stream(EventType::FCdFetch, 1, None);
        e.fetch_addr = 0x1_2345_6788;
        let r = e.encode();
        assert_eq!(r[0], 0x09 | (1 << 32));
        assert_eq!(
            r[2], 0,
            "F_CD_FETCH has no InputAddr (QEMU wrongly used dword 2)"
        );
        assert_eq!(r[3], 0x1_2345_6788);
        let mut e = Event::stream(EventType::CBadSubstreamid, 1, Some(5));
        e.fetch_addr = 0;
        assert_eq!(e.encode()[0], 0x08 | (5 << 12) | (1 << 32), "no SSV bit");
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..=255u8 {
            if let Some(t) = EventType::from_code(code) {
                assert_eq!(t.code(), code);
                assert!(t.name().starts_with(['F', 'C', 'E']));
            }
        }
        assert_eq!(EventType::from_code(0x13), Some(EventType::FPermission));
        assert_eq!(EventType::from_code(0x14), None);
    }
}
