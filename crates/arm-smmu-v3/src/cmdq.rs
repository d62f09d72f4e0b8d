//! The command queue as Linux drives it (`arm_smmu_cmdq_issue_cmdlist`): commands written at
//! the shadow PROD, published with one CMDQ_PROD write per chunk, an optional CMD_SYNC at the
//! end whose completion is observed either by its MSI landing on the SYNC entry itself (IDR0.MSI
//! with coherent queues: Linux points the MSI at the command and polls its first word for 0)
//! or by CONS passing it. A command the SMMU stops on (GERROR.CMDQ_ERR) is recovered as
//! `arm_smmu_cmdq_skip_err` does (smmu_kvm.md §4.8): CERROR_ILL → the slot at CONS is
//! overwritten with a CMD_SYNC, CERROR_ABT and CERROR_ATC_INV_SYNC → retried as they are;
//! then GERRORN acknowledges and the SMMU restarts at CONS.
//!
//! One lock serialises producers (Linux's lock-free multi-producer scheme is an optimisation
//! of the same protocol).

use crate::defs::{self, cmd, gerror, q, reg};
use crate::device::ArmSmmuV3;
use crate::trace::TraceEvent;

/// A command could not be issued or did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CmdqError {
    #[error("command queue memory at {pa:#x} cannot be written")]
    Memory { pa: u64 },
    #[error("the command queue made no progress (CONS stuck at {cons:#x})")]
    Timeout { cons: u32 },
}

/// The shadow state of the main command queue.
#[derive(Debug)]
pub(crate) struct Cmdq {
    pub(crate) base: u64,
    pub(crate) log2: u32,
    /// Shadow PROD (index and wrap bit).
    pub(crate) prod: u32,
    /// Complete CMD_SYNC through an MSI written onto the SYNC entry.
    pub(crate) msi: bool,
    pub(crate) sev: bool,
}

/// Polls of a condition before the driver declares the queue stuck. The model consumes
/// commands synchronously, so progress shows on the first poll unless the SMMU is wedged.
const POLL_LIMIT: u32 = 64;

impl Cmdq {
    fn wrap_mask(&self) -> u32 {
        (1u32 << (self.log2 + 1)) - 1
    }
    fn idx(&self, p: u32) -> u32 {
        p & ((1u32 << self.log2) - 1)
    }
    fn wrp(&self, p: u32) -> u32 {
        p & (1u32 << self.log2)
    }
    fn used(&self, prod: u32, cons: u32) -> u32 {
        prod.wrapping_sub(cons) & self.wrap_mask()
    }
    fn inc(&self, p: u32) -> u32 {
        p.wrapping_add(1) & self.wrap_mask()
    }
    fn slot(&self, p: u32) -> u64 {
        self.base + u64::from(self.idx(p)) * 16
    }
    /// Linux `queue_consumed`: CONS has moved past `prod`.
    fn consumed(&self, cons: u32, prod: u32) -> bool {
        (self.wrp(cons) == self.wrp(prod) && self.idx(cons) > self.idx(prod))
            || (self.wrp(cons) != self.wrp(prod) && self.idx(cons) <= self.idx(prod))
    }
}

impl ArmSmmuV3 {
    /// Issues `cmds` in order, followed by a CMD_SYNC when `sync`, and returns once the SMMU
    /// has consumed them (with `sync`: once the SYNC has completed, so every command before it
    /// has taken effect).
    pub(crate) fn issue_cmdlist(&self, cmds: &[[u64; 2]], sync: bool) -> Result<(), CmdqError> {
        let mut qs = self.cmdq.lock();
        self.issue_locked(&mut qs, cmds, sync)
    }

    pub(crate) fn issue_cmd_with_sync(&self, c: [u64; 2]) -> Result<(), CmdqError> {
        self.issue_cmdlist(&[c], true)
    }

    fn issue_locked(&self, qs: &mut Cmdq, cmds: &[[u64; 2]], sync: bool) -> Result<(), CmdqError> {
        let total = cmds.len() + usize::from(sync);
        let size = 1u32 << qs.log2;
        let mut done = 0usize;
        let mut sync_slot = None;
        while done < total {
            // Space: CONS moves only when the SMMU consumes; wait (and recover) if full.
            let mut polls = 0;
            let free = loop {
                let cons = self.cmdq_cons_ptr(qs);
                let free = size - qs.used(qs.prod, cons);
                if free > 0 {
                    break free as usize;
                }
                polls += 1;
                if polls > POLL_LIMIT {
                    return Err(CmdqError::Timeout { cons });
                }
                self.recover_cmdq_error(qs);
                std::hint::spin_loop();
            };
            let n = free.min(total - done);
            {
                let mut tr = self.trace.lock();
                for k in done..done + n {
                    let slot = qs.slot(qs.prod);
                    let entry = match cmds.get(k) {
                        Some(c) => *c,
                        None => {
                            sync_slot = Some((qs.prod, slot));
                            self.build_sync(qs, slot)
                        }
                    };
                    self.mem
                        .write_u64(slot, entry[0])
                        .and_then(|_| self.mem.write_u64(slot + 8, entry[1]))
                        .map_err(|_| CmdqError::Memory { pa: slot })?;
                    tr.push(TraceEvent::Cmd(entry));
                    qs.prod = qs.inc(qs.prod);
                }
            }
            self.stats
                .commands
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            // Publish: the SMMU may consume everything up to PROD from here on.
            self.mmio_w32(reg::CMDQ_PROD, qs.prod);
            done += n;
        }
        match sync_slot {
            Some((p, slot)) => self.wait_sync(qs, p, slot),
            None => Ok(()),
        }
    }

    /// CMD_SYNC: with MSIs, signal completion by writing 0 over the SYNC's own first word;
    /// otherwise no signal (CONS is polled).
    fn build_sync(&self, qs: &Cmdq, slot: u64) -> [u64; 2] {
        if qs.msi {
            [
                cmd::OP_SYNC
                    | defs::prep(cmd::SYNC_0_CS, cmd::SYNC_CS_IRQ)
                    | defs::prep(cmd::SYNC_0_MSH, 3)
                    | defs::prep(cmd::SYNC_0_MSIATTR, cmd::MEMATTR_OIWB),
                defs::prep(cmd::SYNC_1_MSIADDR, slot >> 2),
            ]
        } else {
            [
                cmd::OP_SYNC | defs::prep(cmd::SYNC_0_CS, cmd::SYNC_CS_NONE),
                0,
            ]
        }
    }

    fn wait_sync(&self, qs: &mut Cmdq, prod: u32, slot: u64) -> Result<(), CmdqError> {
        let mut polls = 0;
        loop {
            let done = if qs.msi {
                // The MSI writes MSIData (0) over the command's low word.
                let mut w = [0u8; 4];
                self.mem.read(slot, &mut w).is_ok() && u32::from_le_bytes(w) == 0
            } else {
                let cons = self.cmdq_cons_ptr(qs);
                qs.consumed(cons, prod)
            };
            if done {
                self.trace.lock().push(TraceEvent::SyncDone);
                self.stats
                    .syncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
            polls += 1;
            if polls > POLL_LIMIT {
                return Err(CmdqError::Timeout {
                    cons: self.mmio_r32(reg::CMDQ_CONS),
                });
            }
            if !self.recover_cmdq_error(qs) {
                std::hint::spin_loop();
            }
        }
    }

    /// CMDQ_CONS without the ERR field.
    fn cmdq_cons_ptr(&self, qs: &Cmdq) -> u32 {
        self.mmio_r32(reg::CMDQ_CONS) & qs.wrap_mask()
    }

    /// `arm_smmu_cmdq_skip_err` + the GERRORN acknowledge: returns whether an error was
    /// active (and is now acknowledged).
    fn recover_cmdq_error(&self, qs: &Cmdq) -> bool {
        let g = u64::from(self.mmio_r32(reg::GERROR));
        let gn = u64::from(self.mmio_r32(reg::GERRORN));
        if (g ^ gn) & gerror::CMDQ_ERR == 0 {
            return false;
        }
        let cons = self.mmio_r32(reg::CMDQ_CONS);
        let code = defs::get(q::CONS_ERR, u64::from(cons));
        self.trace
            .lock()
            .push(TraceEvent::CmdError { code: code as u8 });
        self.stats
            .cmd_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if code == q::CERROR_ILL {
            // Convert the erroneous command into a CMD_SYNC (no signal).
            let slot = qs.slot(cons & qs.wrap_mask());
            let cs = if qs.sev {
                cmd::SYNC_CS_SEV
            } else {
                cmd::SYNC_CS_NONE
            };
            let _ = self
                .mem
                .write_u64(slot, cmd::OP_SYNC | defs::prep(cmd::SYNC_0_CS, cs));
            let _ = self.mem.write_u64(slot + 8, 0);
        }
        // CERROR_ABT: retry the fetch; CERROR_ATC_INV_SYNC: CONS still points at the SYNC,
        // which is retried. Acknowledge only the command-queue error.
        let ack = (gn & !gerror::CMDQ_ERR) | (g & gerror::CMDQ_ERR);
        self.mmio_w32(reg::GERRORN, ack as u32);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pointer_arithmetic() {
        let q = Cmdq {
            base: 0x1000,
            log2: 2,
            prod: 0,
            msi: false,
            sev: false,
        };
        assert_eq!(q.wrap_mask(), 0b111);
        assert_eq!(q.used(0b101, 0b011), 2);
        assert_eq!(q.used(0b001, 0b110), 3);
        assert_eq!(q.used(0b100, 0b000), 4, "full: same index, wrap differs");
        assert_eq!(q.inc(0b111), 0);
        assert_eq!(q.slot(0b110), 0x1000 + 2 * 16);
        // CONS past PROD 1 (same wrap) or wrapped with index ≤ PROD.
        assert!(q.consumed(2, 1));
        assert!(!q.consumed(1, 1));
        assert!(q.consumed(0b100, 0b001));
        assert!(!q.consumed(0b110, 0b001));
    }
}
