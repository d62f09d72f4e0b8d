//! Command queue consumption and command execution (IHI0070 chapter 4, 7.1; smmu_kvm.md
//! §4.6–§4.8).
//!
//! Commands are consumed synchronously when CMDQ_PROD is written, when CMDQEN is set, and
//! when GERRORN acknowledges a command error: while CMDQEN = 1, the queue is not empty and
//! no CMDQ_ERR is active. Every command takes effect before CONS moves past it, so a
//! consumed CMD_SYNC means everything before it has completed. On an error the SMMU stops
//! at the failing command (CONS.RD points at it, CONS.ERR holds the code), activates
//! GERROR.CMDQ_ERR and consumes nothing more until software acknowledges; it then re-reads
//! the command at CONS.

use std::sync::atomic::Ordering;

use crate::cmd::{CmdqEntry, Command, SyncSignal, TlbiAddr, decode};
use crate::dvm::{TlbiOp, TlbiRecipient};
use crate::regs::{Cr0, Gerror, QueueBase, QueueIndex};
use crate::smmu::{QPtr, Regs, Smmu, Tcu, inc};
use crate::tlb::InvScope;

/// CMDQ_CONS.ERR codes (IHI0070 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CmdError {
    None = 0,
    Ill = 1,
    Abt = 2,
    AtcInvSync = 3,
}

impl CmdError {
    pub fn from_code(c: u8) -> Self {
        match c {
            1 => CmdError::Ill,
            2 => CmdError::Abt,
            3 => CmdError::AtcInvSync,
            _ => CmdError::None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            CmdError::None => "CERROR_NONE",
            CmdError::Ill => "CERROR_ILL",
            CmdError::Abt => "CERROR_ABT",
            CmdError::AtcInvSync => "CERROR_ATC_INV_SYNC",
        }
    }
}

/// The address operand of commands without one ([`TlbiOp::scope`] does not read it).
const NO_ADDR: TlbiAddr = TlbiAddr {
    addr: 0,
    leaf: false,
    range: None,
};

impl Smmu {
    pub(crate) fn process_cmdq(&self, r: &mut Regs) {
        let cmdq_err = Gerror::new().with_cmdq_err(true).into_bits();
        let log2 = self.cmdq_log2(r);
        let q = QPtr { log2 };
        let base = QueueBase::from_bits(r.cmdq_base).addr() << 5;
        loop {
            if !Cr0::from_bits(r.cr0).cmdqen() || self.gerror_active(cmdq_err) {
                return;
            }
            if q.empty(r.cmdq_prod, r.cmdq_cons) {
                return;
            }
            let addr = base + u64::from(q.idx(r.cmdq_cons)) * 16;
            let entry = match (self.mem.read_u64(addr), self.mem.read_u64(addr + 8)) {
                (Ok(a), Ok(b)) => CmdqEntry([a, b]),
                _ => {
                    self.cmd_error(r, CmdError::Abt);
                    return;
                }
            };
            inc(&self.counters.commands);
            let cmd = match decode(entry, &self.cfg) {
                Ok(c) => c,
                Err(_) => {
                    self.cmd_error(r, CmdError::Ill);
                    return;
                }
            };
            if let Err(e) = self.execute(cmd, Cr0::from_bits(r.cr0).smmuen()) {
                self.cmd_error(r, e);
                return;
            }
            // Consumed: CONS moves past the command, keeping ERR (QEMU deposits only the
            // index and wrap bits).
            r.cmdq_cons = q.inc(r.cmdq_cons);
        }
    }

    fn cmd_error(&self, r: &mut Regs, e: CmdError) {
        inc(&self.counters.command_errors);
        // The code is visible before the global error (IHI0070 7.1).
        r.cmdq_cons = QueueIndex::from_bits(r.cmdq_cons)
            .with_err(e as u8)
            .into_bits();
        self.raise_gerror(Gerror::new().with_cmdq_err(true).into_bits());
    }

    /// Executes one decoded command.
    pub(crate) fn execute(&self, cmd: Command, smmuen: bool) -> Result<(), CmdError> {
        use TlbiOp::*;
        match cmd {
            // Prefetches are hints (IHI0070 4.2).
            Command::PrefetchConfig { .. } | Command::PrefetchAddr { .. } => {}
            // CFGI_STE* also drop every CD cached through those StreamIDs (IHI0070 4.3.1),
            // and a contiguous-span entry covering any of them (over-invalidation is
            // allowed: STE.CONT does not change what software must invalidate, IHI0070 5.2).
            Command::CfgiSte { sid, .. } => self.cfgi(|t| t.drop_stes(|s| s == sid)),
            Command::CfgiSteRange { sid, range } => {
                if range >= 31 {
                    // CMD_CFGI_ALL.
                    self.cfgi(|t| t.drop_stes(|_| true));
                } else {
                    let span = 1u64 << (range + 1);
                    let start = u64::from(sid) & !(span - 1);
                    self.cfgi(|t| t.drop_stes(|s| (u64::from(s) & !(span - 1)) == start));
                }
            }
            Command::CfgiCd { sid, ssid, .. } => self.cfgi(|t| {
                t.cd.remove(&(sid, ssid));
            }),
            Command::CfgiCdAll { sid } => self.cfgi(|t| t.cd.retain(|k, _| k.0 != sid)),
            // PARTID_MAP is cached only with the STE, by StreamID (IHI0070 5.6.2 allows
            // it): there is no separate cache for this command to invalidate.
            Command::CfgiVmsPidm { .. } => {}
            // A TLBI command removes what the broadcast of the same operation removes.
            Command::TlbiNhAll { vmid } => {
                self.command_tlbi(Vmalle1is, self.cmd_vmid(vmid), 0, NO_ADDR)
            }
            Command::TlbiNhAsid { vmid, asid } => {
                self.command_tlbi(Aside1is, self.cmd_vmid(vmid), asid, NO_ADDR)
            }
            Command::TlbiNhVa { vmid, asid, addr } => {
                self.command_tlbi(Vae1is, self.cmd_vmid(vmid), asid, addr)
            }
            Command::TlbiNhVaa { vmid, addr } => {
                self.command_tlbi(Vaae1is, self.cmd_vmid(vmid), 0, addr)
            }
            // IHI0070 4.4.2.7: every EL2 entry, ASID-tagged (EL2-E2H) or not.
            Command::TlbiEl2All => self.command_tlbi(Alle2is, 0, 0, NO_ADDR),
            // IHI0070 4.4.2.10: non-global EL2-E2H entries of the ASID; EL2 entries have no
            // ASID and are not required to be touched.
            Command::TlbiEl2Asid { asid } => self.command_tlbi(Aside2is, 0, asid, NO_ADDR),
            // IHI0070 4.4.2.8/9: CR2.E2H selects the EL2-E2H world (ASID matched, or global)
            // or the EL2 world (ASID ignored); neither has a VMID.
            Command::TlbiEl2Va { asid, addr } => self.command_tlbi(Vae2is, 0, asid, addr),
            Command::TlbiEl2Vaa { addr } => self.command_tlbi(Vaae2is, 0, 0, addr),
            Command::TlbiS12Vmall { vmid } => self.command_tlbi(Vmalls12e1is, vmid, 0, NO_ADDR),
            // Stage-2-only entries covering the IPA; combined nested entries need not be
            // removed (IHI0070 4.4.3.1), and are not: software follows with NH_ALL or
            // S12_VMALL, as on a PE.
            Command::TlbiS2Ipa { vmid, addr } => self.command_tlbi(Ipas2e1is, vmid, 0, addr),
            Command::TlbiNsnhAll => self.command_tlbi(Alle1is, 0, 0, NO_ADDR),
            Command::AtcInv {
                sid,
                ssid,
                addr,
                size,
                ..
            } => {
                // IGNORED while SMMUEN = 0 (IHI0070 4.5.1).
                if smmuen {
                    let ep = self.ats.read().get(&sid).cloned();
                    if let Some(ep) = ep
                        && ep.invalidate(ssid, addr, size) == crate::smmu::AtcResponse::Timeout
                    {
                        self.atc_failed.store(true, Ordering::Release);
                    }
                }
            }
            // The response goes to the endpoint; nothing to model beyond consumption.
            Command::PriResp { .. } => {}
            Command::Resume {
                sid,
                stag,
                retry,
                abort,
            } => self.resume(sid, stag, retry, abort),
            Command::StallTerm { sid } => self.stall_term(sid),
            Command::Sync { signal } => {
                // A CMD_SYNC cannot complete an ATC invalidation that timed out: it stays at
                // CONS with CERROR_ATC_INV_SYNC and is retried after the acknowledge.
                if self.atc_failed.swap(false, Ordering::AcqRel) {
                    return Err(CmdError::AtcInvSync);
                }
                inc(&self.counters.syncs);
                match signal {
                    SyncSignal::None => {}
                    SyncSignal::Irq { msi_addr, msi_data } => {
                        inc(&self.counters.irqs[3]);
                        if self.cfg.msi && msi_addr != 0 {
                            let a = msi_addr & ((1u64 << self.cfg.oas_bits) - 1);
                            if self.mem.write_u32(a, msi_data).is_err() {
                                self.raise_gerror(
                                    Gerror::new().with_msi_cmdq_abt_err(true).into_bits(),
                                );
                            }
                        }
                    }
                    SyncSignal::Sev => {
                        if self.cfg.sev {
                            inc(&self.counters.irqs[4]);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// VMID parameters are matched only when stage 2 is implemented (IHI0070 4.4.2);
    /// a stage-1-only SMMU tags everything with VMID 0.
    fn cmd_vmid(&self, vmid: u16) -> u16 {
        if self.cfg.s2p { vmid } else { 0 }
    }

    /// Applies a TLBI command as [`TlbiOp::scope`] of the same operation on this SMMU.
    /// CD.ASET opts entries out of broadcasts only (IHI0070 3.17, 16.7.7): a command reaches
    /// them too.
    fn command_tlbi(&self, op: TlbiOp, vmid: u16, asid: u16, addr: TlbiAddr) {
        let e2h = self.tcu.read().live.cr2.e2h();
        self.invalidate(op.scope(vmid, asid, addr, TlbiRecipient { aset: false, e2h }));
    }

    /// A configuration invalidation: `remove` drops the cached structures; the new
    /// configuration generation keeps fetches already in flight from caching theirs, and
    /// the hit paths see the change.
    fn cfgi(&self, remove: impl FnOnce(&mut Tcu)) {
        let mut t = self.tcu.write();
        remove(&mut t);
        t.cfg_gen += 1;
        drop(t);
        self.config_changed();
        self.bump_epoch();
    }

    /// Removes every TLB entry in `scope` (from the store, then from the lookup array), then
    /// publishes the change to the micro-TLBs. Returns how many entries it removed.
    pub(crate) fn invalidate(&self, scope: InvScope) -> usize {
        let removed = {
            let mut t = self.tlb.lock();
            let drops = t.whole_context_drops();
            let n = t.invalidate(&scope);
            // Entries removed one by one leave the lookup array; a context removed whole
            // retired its id, so its array slots are dead once no hit context names it.
            for (e, id) in t.drain_removed() {
                self.hit.remove(id, &e);
            }
            self.tlb_gen.fetch_add(1, Ordering::AcqRel);
            if t.whole_context_drops() != drops {
                // Hit contexts and the id cache may name a retired id: a new generation,
                // bumped under the store lock, makes them all stale (each stream takes the
                // slow path once, which refreshes its ids).
                self.config_changed();
            }
            n
        };
        self.bump_epoch();
        removed
    }

    /// CMDQ_CONS.ERR as an enum.
    pub fn cmdq_error(&self) -> CmdError {
        CmdError::from_code(QueueIndex::from_bits(self.regs.lock().cmdq_cons).err())
    }
}
