//! A master's context-descriptor table (linear, one CD: the model's masters have no
//! SubstreamIDs) and CD programming with the same update discipline as STEs, synchronised by
//! CFGI_CD + CMD_SYNC (`arm_smmu_write_cd_entry`).

use twinmmu_iommufd::Errno;

use crate::defs::{self, cd, cmd};
use crate::device::ArmSmmuV3;
use crate::memory::zero;
use crate::strtab::{Entry, cd_used, read_entry, write_entry_steps};
use crate::trace::TraceEvent;

#[derive(Debug)]
pub(crate) struct CdTable {
    pub(crate) pa: u64,
}

impl CdTable {
    pub(crate) fn new(drv: &ArmSmmuV3) -> Result<Self, Errno> {
        let pa = drv.frames.alloc(cd::SIZE).map_err(|_| Errno::ENOMEM)?;
        zero(&*drv.mem, pa, cd::SIZE).map_err(|_| Errno::EFAULT)?;
        Ok(CdTable { pa })
    }

    /// Writes CD 0 of `sid`'s table.
    pub(crate) fn write_cd(&self, drv: &ArmSmmuV3, sid: u32, target: &Entry) -> Result<(), Errno> {
        let cur = read_entry(&*drv.mem, self.pa);
        let mut now = cur;
        for step in write_entry_steps(&cur, target, cd_used) {
            for (i, (&old, &new)) in now.iter().zip(step.iter()).enumerate() {
                if old != new {
                    drv.mem
                        .write_u64(self.pa + 8 * i as u64, new)
                        .map_err(|_| Errno::EFAULT)?;
                    drv.trace.lock().push(TraceEvent::CdWrite {
                        pa: self.pa,
                        index: i as u8,
                        value: new,
                    });
                }
            }
            now = step;
            drv.issue_cmd_with_sync([
                cmd::OP_CFGI_CD | defs::prep(cmd::SSID, 0) | defs::prep(cmd::SID, u64::from(sid)),
                cmd::CFGI_1_LEAF,
            ])
            .map_err(|_| Errno::EIO)?;
        }
        Ok(())
    }

    pub(crate) fn free(self, drv: &ArmSmmuV3) {
        let _ = drv.frames.free(self.pa, cd::SIZE);
    }
}

/// The TCR-derived fields of a stage-1 CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct S1Tcr {
    pub(crate) t0sz: u64,
    /// CD.TG0 encoding (0 4K, 1 64K, 2 16K).
    pub(crate) tg0: u64,
    pub(crate) ips: u64,
    pub(crate) ttb: u64,
    pub(crate) mair: u64,
}

/// `arm_smmu_make_s1_cd`: a private DMA domain's CD, ASET = 1 (its ASID is the SMMU's own,
/// not a CPU one, so broadcast invalidations by ASID must not touch it).
pub(crate) fn make_s1_cd(t: &S1Tcr, asid: u16, stall: bool) -> Entry {
    let mut e = [0u64; 8];
    e[0] = defs::prep(cd::T0SZ, t.t0sz)
        | defs::prep(cd::TG0, t.tg0)
        | defs::prep(cd::IRGN0, 1)
        | defs::prep(cd::ORGN0, 1)
        | defs::prep(cd::SH0, 3)
        | cd::EPD1
        | cd::V
        | defs::prep(cd::IPS, t.ips)
        | cd::AA64
        | if stall { cd::S } else { 0 }
        | cd::R
        | cd::A
        | cd::ASET
        | defs::prep(cd::ASID, u64::from(asid));
    e[1] = t.ttb & cd::TTB0;
    e[3] = t.mair;
    e
}
