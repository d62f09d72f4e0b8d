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

/// F_BAD_ATS_TREQ dword 1 (IHI0070 7.3.6, record bits \[95:64\]): Span\[3:0\] (STUs
/// requested), P 28, X 29, W 30, R 31 — the Translation Request's permissions before the
/// STE overrides.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct AtsTreqDw1 {
    #[bits(4)]
    pub span: u8,
    #[bits(24)]
    pub __: u32,
    pub p: bool,
    pub x: bool,
    pub w: bool,
    pub r: bool,
    pub __: u32,
}

/// E_PAGE_REQUEST dword 1 (IHI0070 7.3.19, record bits \[127:64\]): uX 34, uW 35, uR 36,
/// pX 37, pW 38, pR 39, Span\[51:44\] (in 4 KiB pages).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct PageReqDw1 {
    #[bits(34)]
    pub __: u64,
    pub ux: bool,
    pub uw: bool,
    pub ur: bool,
    pub px: bool,
    pub pw: bool,
    pub pr: bool,
    #[bits(4)]
    pub __: u8,
    pub span: u8,
    #[bits(12)]
    pub __: u16,
}

/// Defines [`EventType`] with its codes and names from one list.
macro_rules! event_types {
    ($($ty:ident = $code:literal => $name:literal,)*) => {
        /// Event numbers (IHI0070 7.3).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum EventType {
            $($ty = $code,)*
        }

        impl EventType {
            /// The architecture's name, as `twinmmu qtest` prints it.
            pub fn name(self) -> &'static str {
                match self {
                    $(EventType::$ty => $name,)*
                }
            }

            pub fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(EventType::$ty),)*
                    _ => None,
                }
            }
        }
    };
}

event_types! {
    FUut = 0x01 => "F_UUT",
    CBadStreamid = 0x02 => "C_BAD_STREAMID",
    FSteFetch = 0x03 => "F_STE_FETCH",
    CBadSte = 0x04 => "C_BAD_STE",
    FBadAtsTreq = 0x05 => "F_BAD_ATS_TREQ",
    FStreamDisabled = 0x06 => "F_STREAM_DISABLED",
    FTranslForbidden = 0x07 => "F_TRANSL_FORBIDDEN",
    CBadSubstreamid = 0x08 => "C_BAD_SUBSTREAMID",
    FCdFetch = 0x09 => "F_CD_FETCH",
    CBadCd = 0x0A => "C_BAD_CD",
    FWalkEabt = 0x0B => "F_WALK_EABT",
    FTranslation = 0x10 => "F_TRANSLATION",
    FAddrSize = 0x11 => "F_ADDR_SIZE",
    FAccess = 0x12 => "F_ACCESS",
    FPermission = 0x13 => "F_PERMISSION",
    FTlbConflict = 0x20 => "F_TLB_CONFLICT",
    FCfgConflict = 0x21 => "F_CFG_CONFLICT",
    EPageRequest = 0x24 => "E_PAGE_REQUEST",
    FVmsFetch = 0x25 => "F_VMS_FETCH",
}

impl EventType {
    pub fn code(self) -> u8 {
        self as u8
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

/// The fields of an event type that carries more than the common ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventDetail {
    #[default]
    None,
    /// F_BAD_ATS_TREQ: what the ATS Translation Request asked for, before the STE
    /// PRIVCFG/INSTCFG overrides (IHI0070 7.3.6). `read` is always 1 for PCIe.
    AtsRequest {
        read: bool,
        write: bool,
        exec: bool,
        privileged: bool,
        /// Number of STUs requested (4 bits in the record).
        span: u8,
    },
    /// E_PAGE_REQUEST: the anticipated accesses and the span in 4 KiB pages (IHI0070
    /// 7.3.19).
    PageRequest {
        span: u8,
        priv_read: bool,
        priv_write: bool,
        priv_exec: bool,
        user_read: bool,
        user_write: bool,
        user_exec: bool,
    },
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
    /// The fetch address of F_STE_FETCH, F_CD_FETCH, F_VMS_FETCH, F_WALK_EABT.
    pub fetch_addr: u64,
    /// Type-specific fields (F_BAD_ATS_TREQ, E_PAGE_REQUEST).
    pub detail: EventDetail,
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
            detail: EventDetail::None,
        }
    }

    /// PnU, InD and RnW of dword 1. InD is 0 for writes (IHI0070 7.3.13).
    fn attrs(&self) -> EvtDw1 {
        EvtDw1::new()
            .with_pnu(self.pnu)
            .with_ind(self.ind && self.rnw)
            .with_rnw(self.rnw)
    }

    /// The 32-byte record (IHI0070 7.3).
    pub fn encode(&self) -> [u64; 4] {
        let t = self.event_type;
        let mut d0 = EvtDw0::new().with_event_type(t.code()).with_sid(self.sid);
        match (t, self.ssid) {
            // C_BAD_SUBSTREAMID always carries a valid SubstreamID (IHI0070 7.3.9, no SSV).
            (EventType::CBadSubstreamid, s) => d0 = d0.with_ssid(s.unwrap_or(0)),
            // F_STREAM_DISABLED and F_TRANSL_FORBIDDEN have no SSV/SubstreamID fields: bits
            // [31:8] are RES0 (IHI0070 7.3.7, 7.3.8).
            (EventType::FStreamDisabled | EventType::FTranslForbidden, _) => {}
            (_, Some(s)) => d0 = d0.with_ssv(true).with_ssid(s),
            (_, None) => {}
        }
        let mut rec = [d0.into_bits(), 0, 0, 0];
        let fetch = EvtFetchAddr::new()
            .with_addr(self.fetch_addr >> 3)
            .into_bits();
        match t {
            EventType::FSteFetch | EventType::FCdFetch | EventType::FVmsFetch => {
                rec[3] = fetch;
            }
            EventType::FUut => {
                // IHI0070 7.3.2: RnW 99, InD 98, PnU 97 (the incoming attributes, not the
                // post-override ones), InputAddr[63:0]; Reason[79:64] is IMPLEMENTATION
                // DEFINED and left 0.
                rec[1] = self.attrs().into_bits();
                rec[2] = self.input_addr;
            }
            EventType::FBadAtsTreq => {
                // IHI0070 7.3.6: R/W/X/P and Span in dword 1, InputAddr[63:12] in dword 2.
                if let EventDetail::AtsRequest {
                    read,
                    write,
                    exec,
                    privileged,
                    span,
                } = self.detail
                {
                    rec[1] = AtsTreqDw1::new()
                        .with_r(read)
                        .with_w(write)
                        .with_x(exec)
                        .with_p(privileged)
                        .with_span(span.min(15))
                        .into_bits();
                }
                rec[2] = self.input_addr & !0xfff;
            }
            EventType::FTranslForbidden => {
                // IHI0070 7.3.8: RnW 99 and InputAddr[63:0] only.
                rec[1] = EvtDw1::new().with_rnw(self.rnw).into_bits();
                rec[2] = self.input_addr;
            }
            EventType::FTlbConflict => {
                // IHI0070 7.3.17: RnW/InD/PnU (post-override), S2, InputAddr, and the IPA
                // when S2 == 1; Reason is IMPLEMENTATION DEFINED and left 0.
                rec[1] = self.attrs().with_s2(self.s2).into_bits();
                rec[2] = self.input_addr;
                if self.s2 {
                    rec[3] = EvtIpa::new().with_ipa(self.ipa >> 12).into_bits();
                }
            }
            EventType::EPageRequest => {
                // IHI0070 7.3.19: the flags and Span in dword 1, InputAddr[63:12].
                if let EventDetail::PageRequest {
                    span,
                    priv_read,
                    priv_write,
                    priv_exec,
                    user_read,
                    user_write,
                    user_exec,
                } = self.detail
                {
                    rec[1] = PageReqDw1::new()
                        .with_pr(priv_read)
                        .with_pw(priv_write)
                        .with_px(priv_exec)
                        .with_ur(user_read)
                        .with_uw(user_write)
                        .with_ux(user_exec)
                        .with_span(span)
                        .into_bits();
                }
                rec[2] = self.input_addr & !0xfff;
            }
            EventType::FWalkEabt
            | EventType::FTranslation
            | EventType::FAddrSize
            | EventType::FAccess
            | EventType::FPermission => {
                let mut d1 = self.attrs().with_s2(self.s2).with_class(self.class as u8);
                if let Some(stag) = self.stall {
                    d1 = d1.with_stall(true).with_stag(stag);
                }
                if t == EventType::FPermission && self.class == FaultClass::Tt {
                    d1 = d1.with_ttrnw(self.ttrnw);
                }
                rec[1] = d1.into_bits();
                rec[2] = self.input_addr;
                rec[3] = if t == EventType::FWalkEabt {
                    fetch
                } else if self.s2 {
                    EvtIpa::new().with_ipa(self.ipa >> 12).into_bits()
                } else {
                    0
                };
            }
            // C_BAD_STREAMID, C_BAD_STE, F_STREAM_DISABLED, C_BAD_SUBSTREAMID, C_BAD_CD,
            // F_CFG_CONFLICT (Reason IMPLEMENTATION DEFINED, left 0): the stream only.
            EventType::CBadStreamid
            | EventType::CBadSte
            | EventType::FStreamDisabled
            | EventType::CBadSubstreamid
            | EventType::CBadCd
            | EventType::FCfgConflict => {}
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
            detail: EventDetail::None,
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
    #[test]
    fn new_dword1_layouts_by_bit_position() {
        assert_eq!(AtsTreqDw1::new().with_span(0xf).into_bits(), 0xf);
        assert_eq!(AtsTreqDw1::new().with_p(true).into_bits(), 1 << 28);
        assert_eq!(AtsTreqDw1::new().with_x(true).into_bits(), 1 << 29);
        assert_eq!(AtsTreqDw1::new().with_w(true).into_bits(), 1 << 30);
        assert_eq!(AtsTreqDw1::new().with_r(true).into_bits(), 1 << 31);
        assert_eq!(PageReqDw1::new().with_ux(true).into_bits(), 1 << 34);
        assert_eq!(PageReqDw1::new().with_uw(true).into_bits(), 1 << 35);
        assert_eq!(PageReqDw1::new().with_ur(true).into_bits(), 1 << 36);
        assert_eq!(PageReqDw1::new().with_px(true).into_bits(), 1 << 37);
        assert_eq!(PageReqDw1::new().with_pw(true).into_bits(), 1 << 38);
        assert_eq!(PageReqDw1::new().with_pr(true).into_bits(), 1 << 39);
        assert_eq!(PageReqDw1::new().with_span(0xff).into_bits(), 0xff << 44);
    }

    fn full(t: EventType) -> Event {
        Event {
            event_type: t,
            sid: 7,
            ssid: Some(9),
            stall: Some(3),
            pnu: true,
            ind: true,
            rnw: true,
            s2: true,
            class: FaultClass::Tt,
            ttrnw: true,
            input_addr: 0xffff_8000_1234_5678,
            ipa: 0x8765_4000,
            fetch_addr: 0x4000_0040,
            detail: EventDetail::None,
        }
    }

    #[test]
    fn the_seven_rare_records() {
        // F_UUT: SSV/SSID, PnU/InD/RnW, the whole InputAddr; no Stall, S2 or CLASS.
        let r = full(EventType::FUut).encode();
        assert_eq!(r[0], 0x01 | (1 << 11) | (9 << 12) | (7 << 32));
        assert_eq!(r[1], (1 << 33) | (1 << 34) | (1 << 35));
        assert_eq!(r[2], 0xffff_8000_1234_5678);
        assert_eq!(r[3], 0);
        // F_BAD_ATS_TREQ: R/W/X/P and Span; InputAddr[63:12].
        let mut e = full(EventType::FBadAtsTreq);
        e.detail = EventDetail::AtsRequest {
            read: true,
            write: false,
            exec: true,
            privileged: true,
            span: 1,
        };
        let r = e.encode();
        assert_eq!(r[0], 0x05 | (1 << 11) | (9 << 12) | (7 << 32));
        assert_eq!(r[1], (1 << 31) | (1 << 29) | (1 << 28) | 1);
        assert_eq!(r[2], 0xffff_8000_1234_5000);
        assert_eq!(r[3], 0);
        // F_TRANSL_FORBIDDEN: no SubstreamID, RnW and InputAddr only.
        let r = full(EventType::FTranslForbidden).encode();
        assert_eq!(r[0], 0x07 | (7 << 32));
        assert_eq!(r[1], 1 << 35);
        assert_eq!(r[2], 0xffff_8000_1234_5678);
        assert_eq!(r[3], 0);
        // F_TLB_CONFLICT: attributes, S2, InputAddr, IPA; no Stall, STAG or CLASS.
        let r = full(EventType::FTlbConflict).encode();
        assert_eq!(r[0], 0x20 | (1 << 11) | (9 << 12) | (7 << 32));
        assert_eq!(r[1], (1 << 33) | (1 << 34) | (1 << 35) | (1 << 39));
        assert_eq!(r[2], 0xffff_8000_1234_5678);
        assert_eq!(r[3], 0x8765_4000);
        // F_CFG_CONFLICT: the stream only.
        let r = full(EventType::FCfgConflict).encode();
        assert_eq!(r, [0x21 | (1 << 11) | (9 << 12) | (7 << 32), 0, 0, 0]);
        // E_PAGE_REQUEST: flags, Span, InputAddr[63:12].
        let mut e = full(EventType::EPageRequest);
        e.detail = EventDetail::PageRequest {
            span: 0x10,
            priv_read: true,
            priv_write: false,
            priv_exec: false,
            user_read: true,
            user_write: true,
            user_exec: false,
        };
        let r = e.encode();
        assert_eq!(r[0], 0x24 | (1 << 11) | (9 << 12) | (7 << 32));
        assert_eq!(r[1], (1 << 39) | (1 << 36) | (1 << 35) | (0x10 << 44));
        assert_eq!(r[2], 0xffff_8000_1234_5000);
        assert_eq!(r[3], 0);
        // F_VMS_FETCH: SubstreamID and FetchAddr[55:3] in dword 3.
        let r = full(EventType::FVmsFetch).encode();
        assert_eq!(
            r,
            [0x25 | (1 << 11) | (9 << 12) | (7 << 32), 0, 0, 0x4000_0040]
        );
        // F_STREAM_DISABLED has no SubstreamID field.
        let r = full(EventType::FStreamDisabled).encode();
        assert_eq!(r, [0x06 | (7 << 32), 0, 0, 0]);
    }
}
