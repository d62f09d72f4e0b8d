//! The stream table (linear, or two-level with SPLIT 8 and level-2 tables allocated when a
//! device appears), the STE builders (`arm_smmu_make_*_ste`) and Linux's entry writer
//! (`arm_smmu_write_entry`), which updates an STE or CD in place without the SMMU ever seeing
//! a torn entry: a change confined to one 64-bit word the current configuration uses is made
//! hitless (unused words first, then the critical word, then the clean-up), anything else
//! breaks first (V = 0), rewrites, and makes (V = 1), with CFGI + CMD_SYNC after every step.

use twinmmu_hw::{FrameAllocator, PhysMem};

use crate::defs::{self, ste, strtab};
use crate::device::{Features, ProbeError};
use crate::memory::zero;

pub(crate) type Entry = [u64; ste::DWORDS];

#[derive(Debug)]
enum Format {
    Linear {
        base: u64,
        log2: u32,
    },
    TwoLevel {
        l1: u64,
        /// log2 of the StreamIDs the table covers (LOG2SIZE).
        log2: u32,
        /// Allocated level-2 tables by L1 index.
        l2: std::collections::BTreeMap<u32, u64>,
    },
}

#[derive(Debug)]
pub(crate) struct StreamTable {
    fmt: Format,
    /// The STE every not-yet-attached stream gets: abort, or bypass without disable_bypass.
    initial: Entry,
}

impl StreamTable {
    pub(crate) fn new(
        frames: &FrameAllocator,
        mem: &dyn PhysMem,
        feat: &Features,
        disable_bypass: bool,
    ) -> Result<Self, ProbeError> {
        let initial = if disable_bypass {
            make_abort_ste()
        } else {
            make_bypass_ste()
        };
        let fmt = if feat.two_level_strtab {
            // arm_smmu_init_strtab_2lvl: the L1 table is capped at 2^20 bytes.
            let l1_bits =
                (strtab::L1_SZ_SHIFT - 3).min(feat.sid_bits.saturating_sub(strtab::SPLIT));
            let ents = 1u64 << l1_bits;
            let l1 = frames
                .alloc(ents * 8)
                .map_err(|_| ProbeError::NoMemory("the L1 stream table"))?;
            zero(mem, l1, ents * 8).map_err(|_| ProbeError::Memory(l1))?;
            Format::TwoLevel {
                l1,
                log2: l1_bits + strtab::SPLIT,
                l2: Default::default(),
            }
        } else {
            let log2 = feat.sid_bits;
            let size = (1u64 << log2) * strtab::STE_SIZE;
            let base = frames
                .alloc(size)
                .map_err(|_| ProbeError::NoMemory("the linear stream table"))?;
            for i in 0..(1u64 << log2) {
                write_raw(mem, base + i * strtab::STE_SIZE, &initial)
                    .map_err(|_| ProbeError::Memory(base))?;
            }
            Format::Linear { base, log2 }
        };
        Ok(StreamTable { fmt, initial })
    }

    pub(crate) fn base_reg(&self) -> u64 {
        let base = match &self.fmt {
            Format::Linear { base, .. } => *base,
            Format::TwoLevel { l1, .. } => *l1,
        };
        strtab::BASE_RA | defs::prep(strtab::BASE_ADDR, base >> 6)
    }

    pub(crate) fn base_cfg_reg(&self) -> u32 {
        let v = match &self.fmt {
            Format::Linear { log2, .. } => {
                defs::prep(strtab::CFG_FMT, strtab::FMT_LINEAR)
                    | defs::prep(strtab::CFG_LOG2SIZE, u64::from(*log2))
            }
            Format::TwoLevel { log2, .. } => {
                defs::prep(strtab::CFG_FMT, strtab::FMT_2LVL)
                    | defs::prep(strtab::CFG_LOG2SIZE, u64::from(*log2))
                    | defs::prep(strtab::CFG_SPLIT, u64::from(strtab::SPLIT))
            }
        };
        v as u32
    }

    pub(crate) fn covers(&self, sid: u32) -> bool {
        let log2 = match &self.fmt {
            Format::Linear { log2, .. } | Format::TwoLevel { log2, .. } => *log2,
        };
        log2 >= 32 || u64::from(sid) >> log2 == 0
    }

    /// `arm_smmu_init_l2_strtab`: makes sure the STE of `sid` exists (allocating its level-2
    /// table of 256 initial STEs and publishing the L1 descriptor). Returns whether an L1
    /// descriptor was written (it then needs a CFGI_STE with Leaf = 0).
    pub(crate) fn ensure(
        &mut self,
        sid: u32,
        frames: &FrameAllocator,
        mem: &dyn PhysMem,
    ) -> Result<bool, StrtabError> {
        if !self.covers(sid) {
            return Err(StrtabError::OutOfRange);
        }
        let initial = self.initial;
        match &mut self.fmt {
            Format::Linear { .. } => Ok(false),
            Format::TwoLevel { l1, l2, .. } => {
                let idx = sid >> strtab::SPLIT;
                if l2.contains_key(&idx) {
                    return Ok(false);
                }
                let n = 1u64 << strtab::SPLIT;
                let size = n * strtab::STE_SIZE;
                let pa = frames.alloc(size).map_err(|_| StrtabError::NoMemory)?;
                for i in 0..n {
                    write_raw(mem, pa + i * strtab::STE_SIZE, &initial)
                        .map_err(|_| StrtabError::Memory)?;
                }
                // Span = SPLIT + 1: 2^(Span-1) STEs. The descriptor is one 64-bit write.
                let desc = defs::prep(strtab::L1_DESC_SPAN, u64::from(strtab::SPLIT) + 1)
                    | defs::prep(strtab::L1_DESC_L2PTR, pa >> 6);
                mem.write_u64(*l1 + u64::from(idx) * 8, desc)
                    .map_err(|_| StrtabError::Memory)?;
                l2.insert(idx, pa);
                Ok(true)
            }
        }
    }

    /// Address of the STE of `sid` (which `ensure` created).
    pub(crate) fn ste_addr(&self, sid: u32) -> Option<u64> {
        if !self.covers(sid) {
            return None;
        }
        match &self.fmt {
            Format::Linear { base, .. } => Some(base + u64::from(sid) * strtab::STE_SIZE),
            Format::TwoLevel { l2, .. } => {
                let t = l2.get(&(sid >> strtab::SPLIT))?;
                let i = u64::from(sid) & ((1 << strtab::SPLIT) - 1);
                Some(t + i * strtab::STE_SIZE)
            }
        }
    }

    pub(crate) fn initial(&self) -> Entry {
        self.initial
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StrtabError {
    #[error("StreamID beyond the stream table")]
    OutOfRange,
    #[error("out of host memory for a level-2 stream table")]
    NoMemory,
    #[error("stream table memory is not writable")]
    Memory,
}

fn write_raw(mem: &dyn PhysMem, pa: u64, e: &Entry) -> Result<(), twinmmu_hw::MemError> {
    for (i, w) in e.iter().enumerate() {
        mem.write_u64(pa + 8 * i as u64, *w)?;
    }
    Ok(())
}

pub(crate) fn read_entry(mem: &dyn PhysMem, pa: u64) -> Entry {
    let mut e = [0u64; 8];
    for (i, w) in e.iter_mut().enumerate() {
        *w = mem.read_u64(pa + 8 * i as u64).unwrap_or(0);
    }
    e
}

// ---------------------------------------------------------------------- STE builders

/// `arm_smmu_make_abort_ste`: V = 1, Config = abort (no event).
pub(crate) fn make_abort_ste() -> Entry {
    let mut e = [0u64; 8];
    e[0] = ste::V | defs::prep(ste::CFG, ste::CFG_ABORT);
    e
}

/// `arm_smmu_make_bypass_ste`: both stages bypass, incoming shareability.
pub(crate) fn make_bypass_ste() -> Entry {
    let mut e = [0u64; 8];
    e[0] = ste::V | defs::prep(ste::CFG, ste::CFG_BYPASS);
    e[1] = defs::prep(ste::SHCFG, ste::SHCFG_INCOMING);
    e
}

/// The stage-2 part of an STE: what an S2 domain fixes (VTCR and S2TTB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct S2Cfg {
    pub(crate) vtcr: u64,
    pub(crate) ttb: u64,
}

/// `arm_smmu_make_s2_domain_ste`: Config = S2 translate with `vmid`.
pub(crate) fn make_s2_ste(s2: &S2Cfg, vmid: u16, ats: bool) -> Entry {
    let mut e = [0u64; 8];
    e[0] = ste::V | defs::prep(ste::CFG, ste::CFG_S2_TRANS);
    e[1] = defs::prep(ste::EATS, if ats { ste::EATS_TRANS } else { ste::EATS_ABT })
        | defs::prep(ste::SHCFG, ste::SHCFG_INCOMING);
    e[2] = defs::prep(ste::S2VMID, u64::from(vmid))
        | defs::prep(ste::VTCR, s2.vtcr)
        | ste::S2AA64
        | ste::S2PTW
        | ste::S2R;
    e[3] = s2.ttb & ste::S2TTB;
    e
}

/// `arm_smmu_make_cdtable_ste`: Config = S1 translate through a linear CD table of one CD
/// at `cd_pa`; StreamWorld EL2(-E2H) with FEAT_E2H, else NS-EL1 with VMID 0.
pub(crate) fn make_cdtable_ste(cd_pa: u64, e2h: bool, ats: bool, stall: bool) -> Entry {
    let mut e = [0u64; 8];
    e[0] = ste::V
        | defs::prep(ste::CFG, ste::CFG_S1_TRANS)
        | defs::prep(ste::S1FMT, ste::S1FMT_LINEAR)
        | (cd_pa & ste::S1CTXPTR)
        | defs::prep(ste::S1CDMAX, 0);
    e[1] = defs::prep(ste::S1DSS, ste::S1DSS_SSID0)
        | defs::prep(ste::S1CIR, ste::S1C_CACHE_WBRA)
        | defs::prep(ste::S1COR, ste::S1C_CACHE_WBRA)
        | defs::prep(ste::S1CSH, 3)
        | defs::prep(ste::EATS, if ats { ste::EATS_TRANS } else { ste::EATS_ABT })
        | if stall { 0 } else { ste::S1STALLD }
        | defs::prep(ste::STRW, if e2h { ste::STRW_EL2 } else { ste::STRW_NSEL1 });
    e
}

/// `arm_smmu_get_ste_used`: the bits the SMMU looks at in `e`'s configuration.
pub(crate) fn ste_used(e: &Entry) -> Entry {
    let mut u = [0u64; 8];
    u[0] = ste::V;
    if e[0] & ste::V == 0 {
        return u;
    }
    u[0] |= ste::CFG;
    let cfg = defs::get(ste::CFG, e[0]);
    if cfg & 1 != 0 {
        // Stage 1 translates.
        u[0] |= ste::S1FMT | ste::S1CTXPTR | ste::S1CDMAX;
        u[1] |= ste::S1DSS
            | ste::S1CIR
            | ste::S1COR
            | ste::S1CSH
            | ste::S1STALLD
            | ste::STRW
            | ste::EATS
            | ste::MEV;
        u[2] |= ste::S2VMID;
        if defs::get(ste::S1DSS, e[1]) == ste::S1DSS_BYPASS {
            u[1] |= ste::SHCFG;
        }
    }
    if cfg & 2 != 0 {
        // Stage 2 translates.
        u[1] |= ste::S2FWB | ste::EATS | ste::SHCFG | ste::MEV;
        u[2] |=
            ste::S2VMID | ste::VTCR | ste::S2AA64 | ste::S2ENDI | ste::S2PTW | ste::S2S | ste::S2R;
        u[3] |= ste::S2TTB;
    }
    if cfg == ste::CFG_BYPASS {
        u[1] |= ste::SHCFG;
    }
    u
}

/// `arm_smmu_get_cd_used`.
pub(crate) fn cd_used(e: &Entry) -> Entry {
    use crate::defs::cd;
    let mut u = [0u64; 8];
    u[0] = cd::V;
    if e[0] & cd::V == 0 {
        return u;
    }
    u = [u64::MAX; 8];
    if e[0] & cd::EPD0 != 0 {
        u[0] &= !(cd::T0SZ | cd::TG0 | cd::IRGN0 | cd::ORGN0 | cd::SH0);
        u[1] &= !cd::TTB0;
    }
    u
}

/// The steps of `arm_smmu_write_entry` that change `cur` into `target`: each element is the
/// full entry to be in memory after a step, and every step is followed by a sync (CFGI +
/// CMD_SYNC) before the next. At most three steps.
pub(crate) fn write_entry_steps(
    cur: &Entry,
    target: &Entry,
    used: fn(&Entry) -> Entry,
) -> Vec<Entry> {
    let cur_used = used(cur);
    let target_used = used(target);
    let mut unused_update = [0u64; 8];
    let mut diff = 0u8;
    for i in 0..8 {
        // Bits the current configuration ignores can take their new values at once.
        unused_update[i] = (cur[i] & cur_used[i]) | (target[i] & !cur_used[i]);
        if (unused_update[i] & target_used[i]) != target[i] {
            diff |= 1 << i;
        }
    }
    let mut steps = Vec::new();
    let mut mem = *cur;
    let set = |mem: &mut Entry, src: &Entry, start: usize, len: usize, steps: &mut Vec<Entry>| {
        let mut changed = false;
        for i in start..start + len {
            if mem[i] != src[i] {
                mem[i] = src[i];
                changed = true;
            }
        }
        if changed {
            steps.push(*mem);
        }
    };
    if diff.count_ones() == 1 {
        // Hitless: unused bits first, the critical word alone, then the clean-up.
        let critical = diff.trailing_zeros() as usize;
        unused_update[critical] = cur[critical];
        set(&mut mem, &unused_update, 0, 8, &mut steps);
        set(&mut mem, target, critical, 1, &mut steps);
        set(&mut mem, target, 0, 8, &mut steps);
    } else if diff != 0 {
        // Breaking: V = 0, rewrite words 1..7, then word 0.
        unused_update[0] = 0;
        set(&mut mem, &unused_update, 0, 1, &mut steps);
        set(&mut mem, target, 1, 7, &mut steps);
        set(&mut mem, target, 0, 1, &mut steps);
    } else {
        set(&mut mem, target, 0, 8, &mut steps);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s2(vmid: u16, ttb: u64) -> Entry {
        make_s2_ste(
            &S2Cfg {
                vtcr: 0x25_5510,
                ttb,
            },
            vmid,
            false,
        )
    }

    #[test]
    fn abort_to_s2_is_a_hitless_single_word_update() {
        // Abort uses only V and CFG: words 1..3 are written first, then word 0 switches.
        let steps = write_entry_steps(&make_abort_ste(), &s2(5, 0x8000_0000), ste_used);
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0][0], make_abort_ste()[0], "word 0 untouched first");
        assert_eq!(steps[0][2], s2(5, 0x8000_0000)[2]);
        assert_eq!(steps[1], s2(5, 0x8000_0000));
    }

    #[test]
    fn changing_vmid_alone_is_hitless_but_vmid_and_ttb_breaks() {
        let a = s2(5, 0x8000_0000);
        let steps = write_entry_steps(&a, &s2(6, 0x8000_0000), ste_used);
        assert_eq!(steps, vec![s2(6, 0x8000_0000)]);
        // Two used words change: V=0 first, then the rest, then word 0.
        let b = s2(6, 0x9000_0000);
        let steps = write_entry_steps(&a, &b, ste_used);
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[0][0] & ste::V, 0, "break: V cleared");
        assert_eq!(steps[1][0] & ste::V, 0);
        assert_eq!(&steps[1][1..], &b[1..]);
        assert_eq!(steps[2], b);
    }

    #[test]
    fn no_change_no_steps() {
        let a = s2(5, 0x8000_0000);
        assert!(write_entry_steps(&a, &a, ste_used).is_empty());
    }

    #[test]
    fn used_bits_follow_the_config() {
        assert_eq!(ste_used(&[0; 8]), [ste::V, 0, 0, 0, 0, 0, 0, 0]);
        let u = ste_used(&make_bypass_ste());
        assert_eq!(u[1], ste::SHCFG);
        let u = ste_used(&s2(1, 0x1000));
        assert_eq!(u[3], ste::S2TTB);
        assert_ne!(u[2] & ste::S2VMID, 0);
        let u = ste_used(&make_cdtable_ste(0x4000, false, false, false));
        assert_ne!(u[0] & ste::S1CTXPTR, 0);
        assert_eq!(u[3], 0, "S2TTB unused by a stage-1 STE");
    }
}
