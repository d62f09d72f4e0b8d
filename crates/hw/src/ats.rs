//! PCIe ATS at the SMMU (IHI0070 3.9.1, 5.2 EATS, 13.6, 13.7): Translation Requests
//! answered with a Translation Completion, and Translated transactions checked against
//! SMMU_CR0.ATSCHK and STE.EATS. Also the client-side hints that reach the Event queue
//! (E_PAGE_REQUEST, IHI0070 7.3.19).
//!
//! Choices where the architecture leaves one (IMPLEMENTATION DEFINED, made as a server
//! SMMU would and listed here so users can rely on them):
//! - Without IDR0.ATS there is no ATS interface: a Translation Request is answered UR
//!   with no event; a transaction marked Translated is an unsupported upstream
//!   transaction, aborted with F_UUT (IHI0070 7.3.2, 16.7.1).
//! - SMMU_CR2.REC_CFG_ATS is not implemented: configuration errors met by a Translation
//!   Request (Completer Abort) or by a Translated transaction (abort) record no event
//!   (IHI0070 3.9.1.2, 3.9.1.3).
//! - A Translated transaction whose address is beyond the OAS is aborted with no event
//!   (IHI0070 3.9.1.1 offers this or truncation).
//! - IDR3.PASIDTT = 0: a Translated transaction is Data, unprivileged, without a
//!   SubstreamID (IHI0070 3.9.1.3).
//! - ATSCHK is read when the traffic arrives, not cached with the STE (permitted).
//! - HTTU is not implemented, so a Completion grants Write exactly where the translation
//!   is writable, whatever NW says (permitted, IHI0070 13.7).
//! - Identity Completions (stage 1 skipped with no stage 2) and failed translations
//!   (R = W = 0) cover one STU, the smallest granule implemented.

use twinmmu_vmsa::{Access, AccessKind};

use crate::event::{Event, EventDetail, EventType, FaultClass};
use crate::smmu::Smmu;
use crate::ste::{AttrOverride, Eats, StreamConfig};
use crate::tlb::{EntryPerms, World};
use crate::xlate::{
    DmaError, Fail, Outcome, PendingOp, S1Sel, Termination, Transaction, XFault, perms_allow,
    s1_tag, tlb_world,
};

/// An ATS Translation Request as the Root Complex presents it (PCIe ATS; IHI0070 3.9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AtsRequest {
    pub sid: u32,
    /// The PASID, when the request carries a PASID TLP prefix.
    pub ssid: Option<u32>,
    /// The Untranslated Address.
    pub addr: u64,
    /// NW: the device does not intend to write.
    pub no_write: bool,
    /// Execute_Requested (carried in the PASID prefix; ignored without one).
    pub exec: bool,
    /// Privileged_Mode_Requested (carried in the PASID prefix; ignored without one).
    pub privileged: bool,
}

impl AtsRequest {
    /// A read/write request for `addr` without a PASID.
    pub fn new(sid: u32, addr: u64) -> Self {
        AtsRequest {
            sid,
            ssid: None,
            addr,
            no_write: false,
            exec: false,
            privileged: false,
        }
    }
}

/// One Translation Completion Data Entry of a successful Completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AtsTranslation {
    /// The Translated Address: the base of the translated region (a PA, or an IPA for
    /// Split-stage ATS). Meaningless when nothing is granted.
    pub addr: u64,
    /// Size of the region in bytes (a power of two, at least one STU).
    pub size: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// Priv: as the request supplied it (IHI0070 13.7.1), 0 without a PASID.
    pub privileged: bool,
}

impl AtsTranslation {
    /// Whether the Completion grants any access (R = W = 0 is "no access").
    pub fn grants_any(&self) -> bool {
        self.read || self.write || self.exec
    }

    /// The translated address of `addr` inside the region.
    pub fn translate(&self, addr: u64) -> u64 {
        self.addr | (addr & (self.size - 1))
    }
}

/// The SMMU's answer to a Translation Request (IHI0070 3.9.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtsCompletion {
    /// Success status. A translation-related fault gives a Success with R = W = 0.
    Success(AtsTranslation),
    /// Unsupported Request: ATS disabled for the stream. `event` is F_BAD_ATS_TREQ when the
    /// architecture records one (not for STE.Config = 0b000), `recorded` whether it reached
    /// the Event queue.
    UnsupportedRequest {
        event: Option<EventType>,
        recorded: bool,
    },
    /// Completer Abort: a configuration error (ILLEGAL structure, fetch abort, …) that an
    /// ordinary transaction would have reported as `cause`. No event (no REC_CFG_ATS).
    CompleterAbort { cause: EventType },
}

/// A speculative page request hint from a client device (E_PAGE_REQUEST, IHI0070 7.3.19):
/// the span it expects to access soon and with which permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PageRequestHint {
    pub sid: u32,
    pub ssid: Option<u32>,
    pub addr: u64,
    /// Span in 4 KiB pages, at least 1.
    pub span: u8,
    pub priv_read: bool,
    pub priv_write: bool,
    pub priv_exec: bool,
    pub user_read: bool,
    pub user_write: bool,
    pub user_exec: bool,
}

/// Why a fault met by a Translation Request becomes a Success with no access and not a
/// Completer Abort (IHI0070 3.9.1.2: translation-related faults at either stage, including
/// stage 2 of a CD fetch or stage-1 walk).
fn denies(event: EventType) -> bool {
    event.is_translation_fault()
}

impl Smmu {
    /// The smallest granule implemented: the STU (IHI0070 3.9.1).
    fn stu(&self) -> u64 {
        if self.cfg.gran4k {
            0x1000
        } else if self.cfg.gran16k {
            0x4000
        } else {
            0x1_0000
        }
    }

    fn ats_denied(&self, privileged: bool) -> AtsCompletion {
        AtsCompletion::Success(AtsTranslation {
            addr: 0,
            size: self.stu(),
            read: false,
            write: false,
            exec: false,
            privileged,
        })
    }

    /// UR with F_BAD_ATS_TREQ (IHI0070 7.3.6): SMMUEN = 0, STE.Config = 0b100, or an
    /// effective STE.EATS of 0b00.
    fn bad_ats_treq(&self, req: &AtsRequest) -> AtsCompletion {
        let mut e = Event::stream(EventType::FBadAtsTreq, req.sid, req.ssid);
        e.input_addr = req.addr;
        e.detail = EventDetail::AtsRequest {
            // R is always 1 in a PCIe request; W = !NW.
            read: true,
            write: !req.no_write,
            exec: req.ssid.is_some() && req.exec,
            privileged: req.ssid.is_some() && req.privileged,
            span: 1,
        };
        let recorded = self.record_event(&e);
        AtsCompletion::UnsupportedRequest {
            event: Some(EventType::FBadAtsTreq),
            recorded,
        }
    }

    /// Answers an ATS Translation Request (IHI0070 3.9.1.2, 13.6, 13.7.1). Records
    /// F_BAD_ATS_TREQ when ATS is disabled for the stream; no other event.
    pub fn ats_translation_request(&self, req: &AtsRequest) -> AtsCompletion {
        if !self.cfg.ats {
            return AtsCompletion::UnsupportedRequest {
                event: None,
                recorded: false,
            };
        }
        let live = self.tcu.read().live;
        if !live.cr0.smmuen() {
            return self.bad_ats_treq(req);
        }
        let cached = self.tcu.read().ste_get(req.sid);
        let ste = match cached {
            Some(s) => s,
            None => match self.fetch_ste(&live, req.sid) {
                Ok(s) => s,
                Err(Fail::Fault(x)) => return AtsCompletion::CompleterAbort { cause: x.event },
                Err(Fail::Silent) => {
                    return AtsCompletion::UnsupportedRequest {
                        event: None,
                        recorded: false,
                    };
                }
            },
        };
        let (s1, s2, vmid, privcfg, instcfg, eats) = match ste {
            // Config = 0b000: UR with no event (IHI0070 3.9.1.2).
            StreamConfig::Abort => {
                return AtsCompletion::UnsupportedRequest {
                    event: None,
                    recorded: false,
                };
            }
            // Config = 0b100: the effective EATS is 0b00.
            StreamConfig::Bypass { .. } => return self.bad_ats_treq(req),
            StreamConfig::Translate {
                s1,
                s2,
                vmid,
                privcfg,
                instcfg,
                eats,
                ..
            } => (s1, s2, vmid, privcfg, instcfg, eats),
        };
        let eats = eats.effective(live.cr0.atschk());
        if eats == Eats::Disabled {
            return self.bad_ats_treq(req);
        }
        // Without a PASID, Exe and Priv are 0 (IHI0070 13.7.1); the Completion's Priv is
        // the request's, whatever PRIVCFG says.
        let (exec_req, priv_req) = match req.ssid {
            Some(_) => (req.exec, req.privileged),
            None => (false, false),
        };
        let txn = Transaction::new(req.sid, req.ssid, req.addr, AccessKind::Read, priv_req);
        let ca = |f: Fail| match f {
            Fail::Fault(x) if denies(x.event) => self.ats_denied(priv_req),
            Fail::Fault(x) => AtsCompletion::CompleterAbort { cause: x.event },
            Fail::Silent => AtsCompletion::CompleterAbort {
                cause: EventType::CBadSte,
            },
        };
        // Substream selection and the CD, as for an ordinary transaction.
        let sel = match s1 {
            None => {
                if req.ssid.is_some() {
                    return AtsCompletion::CompleterAbort {
                        cause: EventType::CBadSubstreamid,
                    };
                }
                None
            }
            Some(s1c) => match self.select_cd(&txn, &s1c) {
                Err(f) => return ca(f),
                Ok(None) => None,
                Ok(Some(idx)) => {
                    let cd = match self.cd_config(&txn, &live, &s1c, s2.as_ref(), idx) {
                        Ok(cd) => cd,
                        Err(f) => return ca(f),
                    };
                    Some(S1Sel {
                        cd,
                        world: tlb_world(s1c.world, &live),
                        stalld: s1c.stalld,
                    })
                }
            },
        };
        // The privilege permissions are checked against (IHI0070 13.7.1); an EL2 stage 1
        // checks everything as privileged (13.4.1).
        let eff_priv = match &sel {
            Some(sel) if sel.world == World::El2 => true,
            _ => privcfg.apply(priv_req),
        };
        // What the walk checks at stage 1 before stage 2 of the output: the read (or the
        // instruction fetch, when INSTCFG makes every read one) the request implies.
        let probe_kind = if instcfg == AttrOverride::Force(true) {
            AccessKind::Execute
        } else {
            AccessKind::Read
        };
        let (perms, base, size) = match (sel, s2) {
            (None, None) => {
                // Full ATS with the only stage skipped (S1DSS = bypass): an identity
                // Completion, U = 0, R = W = 1 (IHI0070 13.6.4); the address must fit.
                if req.addr >> self.cfg.oas_bits != 0 {
                    return self.ats_denied(priv_req);
                }
                let stu = self.stu();
                return AtsCompletion::Success(AtsTranslation {
                    addr: req.addr & !(stu - 1),
                    size: stu,
                    read: true,
                    write: true,
                    exec: false,
                    privileged: false,
                });
            }
            (None, Some(s2c)) => {
                // Stage 2 only (Config = 0b110, or 0b111 with stage 1 skipped): the
                // request's address is an IPA (IHI0070 13.6.4, 13.6.5).
                if req.addr >> self.cfg.oas_bits != 0 {
                    return self.ats_denied(priv_req);
                }
                let h = match self.s2_entry(&s2c, req.addr, FaultClass::In, None) {
                    Ok(h) => h,
                    Err(f) => return ca(f),
                };
                let perms = EntryPerms {
                    s1: None,
                    s2: Some((h.perms, h.level, h.device)),
                };
                let size = 1u64 << h.shift;
                // Split-stage skipping stage 1 answers the IPA itself (13.6.5).
                let base = if eats == Eats::Split {
                    req.addr & !(size - 1)
                } else {
                    h.out_base
                };
                (perms, base, size)
            }
            (Some(sel), s2c) => {
                let tag = s1_tag(&sel, s2c.is_some(), vmid);
                let probe = Access::new(probe_kind, eff_priv);
                let e = match self.s1_entry(req.addr, &sel, s2c.as_ref(), tag, probe, None) {
                    Ok(e) => e,
                    Err(f) => return ca(f),
                };
                // Split-stage answers the stage-1 output IPA (13.6.3); the size is the
                // smaller of the two stages either way (the combined entry's).
                let base = if eats == Eats::Split {
                    e.ipa_base
                } else {
                    e.out_base
                };
                (e.perms, base, e.size())
            }
        };
        // IHI0070 13.7.1: what the final combined translation grants at the effective
        // privilege, under INSTCFG.
        let can = |k: AccessKind| perms_allow(&perms, Access::new(k, eff_priv)).is_ok();
        let (ttd_r, ttd_x, ttd_w) = (
            can(AccessKind::Read),
            can(AccessKind::Execute),
            can(AccessKind::Write),
        );
        let (read, exec) = match instcfg {
            AttrOverride::Incoming => (ttd_r, exec_req && ttd_r && ttd_x),
            // INST: every read is an instruction fetch.
            AttrOverride::Force(true) => (ttd_x, exec_req && ttd_x),
            // DATA: X is taken as R.
            AttrOverride::Force(false) => (ttd_r, exec_req && ttd_r),
        };
        if !read && !ttd_w && !exec {
            return self.ats_denied(priv_req);
        }
        AtsCompletion::Success(AtsTranslation {
            addr: base,
            size,
            read,
            write: ttd_w,
            exec,
            privileged: priv_req,
        })
    }

    /// A transaction marked Translated (PCIe AT = 0b10): checked per SMMU_CR0.ATSCHK and
    /// STE.EATS (IHI0070 3.9.1, 3.9.1.3). `Ok` is the output PA; `Err` the fault before the
    /// recording rules (F_UUT, F_TRANSL_FORBIDDEN, or a stage-2 fault of Split-stage ATS).
    pub(crate) fn resolve_translated(&self, txn: &Transaction) -> Result<u64, Fail> {
        if !self.cfg.ats {
            // No ATS interface: an unsupported upstream transaction (IHI0070 16.7.1).
            return Err(Fail::Fault(XFault::config(EventType::FUut)));
        }
        let live = self.tcu.read().live;
        let forbidden = || Err(Fail::Fault(XFault::config(EventType::FTranslForbidden)));
        if !live.cr0.smmuen() {
            return forbidden();
        }
        let pass = |addr: u64| {
            // Bits above the OAS: aborted with no event (IHI0070 3.9.1.1, IMPLEMENTATION
            // DEFINED).
            if addr >> self.cfg.oas_bits != 0 {
                Err(Fail::Silent)
            } else {
                Ok(addr)
            }
        };
        if !live.cr0.atschk() {
            // No checks beyond the address size: the configuration is not even read.
            return pass(txn.addr);
        }
        let cached = self.tcu.read().ste_get(txn.sid);
        let ste = match cached {
            Some(s) => s,
            // Configuration errors abort silently without REC_CFG_ATS (IHI0070 3.9.1.3).
            None => self.fetch_ste(&live, txn.sid).map_err(|_| Fail::Silent)?,
        };
        match ste {
            StreamConfig::Abort => Err(Fail::Silent),
            StreamConfig::Bypass { .. } => forbidden(),
            StreamConfig::Translate {
                s2,
                eats,
                privcfg,
                instcfg,
                ..
            } => match (eats.effective(true), s2) {
                (Eats::Disabled, _) => forbidden(),
                (Eats::Full, _) => pass(txn.addr),
                (Eats::Split, Some(s2c)) => {
                    // The address is an IPA. Beyond the IAS: F_ADDR_SIZE as a stage-1
                    // fault (IHI0070 3.9.1.3 item 10).
                    if txn.addr >> self.cfg.oas_bits != 0 {
                        return Err(Fail::Fault(XFault::config(EventType::FAddrSize)));
                    }
                    // The overrides apply before stage 2 (IHI0070 13.7).
                    let access =
                        crate::xlate::effective(txn.kind, txn.privileged, privcfg, instcfg);
                    self.s2_translate(&s2c, txn.addr, access, FaultClass::In, None)
                        .map(|h| h.pa)
                        .map_err(|f| match f {
                            // A Translated transaction is terminated with an abort; PCIe
                            // traffic never stalls.
                            Fail::Fault(mut x) => {
                                x.may_stall = false;
                                x.termination = Termination::Abort;
                                Fail::Fault(x)
                            }
                            f => f,
                        })
                }
                // Split-stage without stage 2 is ILLEGAL (decode_ste rejects it).
                (Eats::Split, None) => Err(Fail::Silent),
            },
        }
    }

    /// The transaction a Translated TLP presents: IDR3.PASIDTT = 0, so Data, unprivileged,
    /// with no SubstreamID (IHI0070 3.9.1.3).
    fn translated_txn(sid: u32, addr: u64, kind: AccessKind) -> Transaction {
        let kind = match kind {
            AccessKind::Write => AccessKind::Write,
            _ => AccessKind::Read,
        };
        Transaction::new(sid, None, addr, kind, false)
    }

    /// Presents a transaction marked Translated and returns its output address without
    /// moving data (the `dma ... translated` command of `twinmmu qtest`).
    pub fn translated(&self, sid: u32, addr: u64, kind: AccessKind) -> Outcome {
        let txn = Self::translated_txn(sid, addr, kind);
        match self.resolve_translated(&txn) {
            Ok(pa) => Outcome::Translated { pa },
            Err(f) => self.fail(&txn, f, PendingOp::Translate),
        }
    }

    fn translated_chunk(&self, sid: u32, addr: u64, kind: AccessKind) -> Result<u64, DmaError> {
        match self.translated(sid, addr, kind) {
            Outcome::Translated { pa } => Ok(pa),
            Outcome::Fault {
                event,
                recorded,
                termination,
            } => Err(DmaError::Fault {
                event,
                recorded,
                termination,
            }),
            Outcome::Abort => Err(DmaError::Abort),
            Outcome::Stalled { stag, event } => Err(DmaError::Stalled {
                stag,
                event,
                done: 0,
            }),
        }
    }

    /// Runs `io` on each 4 KiB-bounded piece of `len` bytes at `addr`, with the PA a
    /// Translated transaction gives it (split as for ordinary DMA).
    fn translated_io(
        &self,
        sid: u32,
        addr: u64,
        len: usize,
        kind: AccessKind,
        mut io: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), crate::MemError>,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < len {
            let a = addr.wrapping_add(done as u64);
            let chunk = ((0x1000 - (a & 0xfff)) as usize).min(len - done);
            let pa = self.translated_chunk(sid, a, kind)?;
            io(pa, done..done + chunk).map_err(|_| DmaError::BusError { pa })?;
            done += chunk;
        }
        Ok(())
    }

    /// A read by Translated transactions.
    pub fn dma_read_translated(&self, sid: u32, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.translated_io(sid, addr, buf.len(), AccessKind::Read, |pa, r| {
            self.mem.read(pa, &mut buf[r])
        })
    }

    /// A write by Translated transactions.
    pub fn dma_write_translated(&self, sid: u32, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.translated_io(sid, addr, data.len(), AccessKind::Write, |pa, r| {
            self.mem.write(pa, &data[r])
        })
    }

    /// A speculative page request hint from the device behind `sid` (IHI0070 7.3.19):
    /// recorded as E_PAGE_REQUEST when the SMMU is enabled. No response is due. Returns
    /// whether the record reached the Event queue; a hint with Span 0 (no pages) or sent
    /// while SMMUEN = 0 is dropped.
    pub fn page_request_hint(&self, h: &PageRequestHint) -> bool {
        if h.span == 0 || !self.tcu.read().live.cr0.smmuen() {
            return false;
        }
        let mut e = Event::stream(EventType::EPageRequest, h.sid, h.ssid);
        e.input_addr = h.addr;
        e.detail = EventDetail::PageRequest {
            span: h.span,
            priv_read: h.priv_read,
            priv_write: h.priv_write,
            priv_exec: h.priv_exec,
            user_read: h.user_read,
            user_write: h.user_write,
            user_exec: h.user_exec,
        };
        self.record_event(&e)
    }
}
