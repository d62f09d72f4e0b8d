//! The DVM port: broadcast TLB maintenance from PEs (IHI0070 3.17; smmu_kvm.md §4.11).
//!
//! [`Tlbi`] names a PE `TLBI …IS` operation with its operands as a PE executes it: the
//! issuing context's VMID (VTTBR_EL2.VMID; 0 for an nVHE host), the ASID, the byte address
//! and the range form of FEAT_TLBIRANGE. A PE TLB model consumes the same type; the SMMU
//! maps it to its own invalidation scope when IDR0.BTM = 1 and CR2.PTM = 0.

use crate::cmd::{TlbiAddr, TlbiRange};
use crate::smmu::{Smmu, inc};
use crate::tlb::{AsidMatch, InvScope, Kind, World};

/// A PE TLB maintenance operation, Inner Shareable (DDI0487 C5.5; the §4.11 table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlbiOp {
    Vmalle1is,
    Aside1is,
    Vae1is,
    Vale1is,
    Vaae1is,
    Vaale1is,
    Ipas2e1is,
    Ipas2le1is,
    Vmalls12e1is,
    Alle1is,
    Alle2is,
    Vae2is,
    Vale2is,
    /// ASID-scoped EL2&0 invalidation of a VHE host (TLBI ASIDE1IS with HCR_EL2.{E2H,TGE}).
    Aside2is,
    Rvae1is,
    Rvale1is,
    Rvaae1is,
    Rvaale1is,
    Ripas2e1is,
    Ripas2le1is,
    Rvae2is,
    Rvale2is,
}

impl TlbiOp {
    /// The instruction name as `twinmmu qtest` accepts it.
    pub fn name(self) -> &'static str {
        use TlbiOp::*;
        match self {
            Vmalle1is => "VMALLE1IS",
            Aside1is => "ASIDE1IS",
            Vae1is => "VAE1IS",
            Vale1is => "VALE1IS",
            Vaae1is => "VAAE1IS",
            Vaale1is => "VAALE1IS",
            Ipas2e1is => "IPAS2E1IS",
            Ipas2le1is => "IPAS2LE1IS",
            Vmalls12e1is => "VMALLS12E1IS",
            Alle1is => "ALLE1IS",
            Alle2is => "ALLE2IS",
            Vae2is => "VAE2IS",
            Vale2is => "VALE2IS",
            Aside2is => "ASIDE2IS",
            Rvae1is => "RVAE1IS",
            Rvale1is => "RVALE1IS",
            Rvaae1is => "RVAAE1IS",
            Rvaale1is => "RVAALE1IS",
            Ripas2e1is => "RIPAS2E1IS",
            Ripas2le1is => "RIPAS2LE1IS",
            Rvae2is => "RVAE2IS",
            Rvale2is => "RVALE2IS",
        }
    }

    pub const ALL: [TlbiOp; 22] = {
        use TlbiOp::*;
        [
            Vmalle1is,
            Aside1is,
            Vae1is,
            Vale1is,
            Vaae1is,
            Vaale1is,
            Ipas2e1is,
            Ipas2le1is,
            Vmalls12e1is,
            Alle1is,
            Alle2is,
            Vae2is,
            Vale2is,
            Aside2is,
            Rvae1is,
            Rvale1is,
            Rvaae1is,
            Rvaale1is,
            Ripas2e1is,
            Ripas2le1is,
            Rvae2is,
            Rvale2is,
        ]
    };

    pub fn from_name(s: &str) -> Option<TlbiOp> {
        let u = s.to_ascii_uppercase();
        Self::ALL.into_iter().find(|o| o.name() == u)
    }

    /// A range form (FEAT_TLBIRANGE).
    pub fn is_range(self) -> bool {
        use TlbiOp::*;
        matches!(
            self,
            Rvae1is
                | Rvale1is
                | Rvaae1is
                | Rvaale1is
                | Ripas2e1is
                | Ripas2le1is
                | Rvae2is
                | Rvale2is
        )
    }

    /// Last-level only.
    pub fn is_leaf(self) -> bool {
        use TlbiOp::*;
        matches!(
            self,
            Vale1is
                | Vaale1is
                | Ipas2le1is
                | Vale2is
                | Rvale1is
                | Rvaale1is
                | Ripas2le1is
                | Rvale2is
        )
    }
}

/// One broadcast TLBI with the operands a PE provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tlbi {
    pub op: TlbiOp,
    /// VMID of the issuing context (VTTBR_EL2.VMID), for EL1 operations.
    pub vmid: u16,
    /// ASID operand (ASID-scoped operations).
    pub asid: u16,
    /// Byte address (VA or IPA) of address-based operations; the range base for range forms.
    pub addr: u64,
    /// The range of a range form: `(num + 1) << scale` granules of `tg` from `addr`.
    pub range: Option<TlbiRange>,
}

impl Tlbi {
    pub fn new(op: TlbiOp, vmid: u16) -> Self {
        Tlbi {
            op,
            vmid,
            asid: 0,
            addr: 0,
            range: None,
        }
    }
    pub fn with_asid(mut self, asid: u16) -> Self {
        self.asid = asid;
        self
    }
    pub fn with_addr(mut self, addr: u64) -> Self {
        self.addr = addr;
        self
    }
    pub fn with_range(mut self, r: TlbiRange) -> Self {
        self.range = Some(r);
        self
    }

    fn span(&self) -> (u64, u64) {
        TlbiAddr {
            addr: self.addr & !0xfff,
            leaf: self.op.is_leaf(),
            range: if self.op.is_range() { self.range } else { None },
        }
        .span()
    }
}

impl Smmu {
    /// Receives a broadcast TLBI. Honoured only when IDR0.BTM = 1 and CR2.PTM = 0; returns
    /// whether the SMMU acted on it. Completion is immediate (the interconnect's DSB sees
    /// it done).
    pub fn broadcast(&self, t: Tlbi) -> bool {
        self.broadcast_counted(t).is_some()
    }

    /// [`Smmu::broadcast`], returning how many main-TLB entries it removed, or `None` when
    /// the SMMU ignored it (IDR0.BTM = 0 or CR2.PTM = 1). The DVM interconnect counts what
    /// each recipient removed with this.
    pub fn broadcast_counted(&self, t: Tlbi) -> Option<usize> {
        let cr2 = self.tcu.read().live.cr2;
        if !self.cfg.btm || cr2.ptm() {
            return None;
        }
        inc(&self.counters.broadcasts);
        let ns = InvScope::world_bit(World::NsEl1);
        let el2 = if cr2.e2h() {
            InvScope::world_bit(World::El2E2h)
        } else {
            InvScope::world_bit(World::El2)
        };
        let base = InvScope {
            worlds: ns,
            kinds: InvScope::S1_KINDS,
            vmid: Some(t.vmid),
            asid: AsidMatch::Any,
            skip_aset: false,
            range: None,
        };
        use TlbiOp::*;
        let scope = match t.op {
            Vmalle1is => base,
            // ASID-scoped broadcasts skip ASET = 1 entries (IHI0070 3.17; 16.7.7).
            Aside1is => InvScope {
                asid: AsidMatch::NonGlobal(t.asid),
                skip_aset: true,
                ..base
            },
            Vae1is | Vale1is | Rvae1is | Rvale1is => InvScope {
                asid: AsidMatch::AsidOrGlobal(t.asid),
                skip_aset: true,
                range: Some(t.span()),
                ..base
            },
            Vaae1is | Vaale1is | Rvaae1is | Rvaale1is => InvScope {
                range: Some(t.span()),
                ..base
            },
            // Stage 2 has no opt-out: every S2 entry of the VMID is affected.
            Ipas2e1is | Ipas2le1is | Ripas2e1is | Ripas2le1is => InvScope {
                kinds: InvScope::kind_bit(Kind::S2),
                range: Some(t.span()),
                ..base
            },
            Vmalls12e1is => InvScope {
                kinds: InvScope::ALL_KINDS,
                ..base
            },
            // ALLE1IS acts as CMD_TLBI_NSNH_ALL (what a KVM VMID rollover sends).
            Alle1is => InvScope {
                kinds: InvScope::ALL_KINDS,
                vmid: None,
                ..base
            },
            // EL2 scopes carry no VMID (IHI0070 3.17). ALLE2IS removes every EL2 entry,
            // ASID-tagged or not (3.17: ASET = 1 EL2 entries too).
            Alle2is => InvScope {
                worlds: InvScope::world_bit(World::El2) | InvScope::world_bit(World::El2E2h),
                kinds: InvScope::ALL_KINDS,
                vmid: None,
                ..base
            },
            // IHI0070 3.17.5: a PE in E2H mode supplies an ASID with its EL2 operations and
            // reaches the EL2-E2H world; without E2H the EL2 world, whose entries have no
            // ASID. Entries inserted with ASET = 1 need not follow VA-scoped broadcasts
            // (3.17), and do not.
            Vae2is | Vale2is | Rvae2is | Rvale2is => InvScope {
                worlds: el2,
                kinds: InvScope::ALL_KINDS,
                vmid: None,
                asid: if cr2.e2h() {
                    AsidMatch::AsidOrGlobal(t.asid)
                } else {
                    AsidMatch::Any
                },
                skip_aset: true,
                range: Some(t.span()),
            },
            // TLBI ASIDE1IS from a VHE host (HCR_EL2.{E2H,TGE} = {1,1}): non-global EL2-E2H
            // entries of the ASID; EL2 entries have no ASID.
            Aside2is => InvScope {
                worlds: InvScope::world_bit(World::El2E2h),
                kinds: InvScope::ALL_KINDS,
                vmid: None,
                asid: AsidMatch::NonGlobal(t.asid),
                skip_aset: true,
                range: None,
            },
        };
        // Complete when this returns: `invalidate` publishes the new epoch (Release) that
        // every later translation loads (Acquire).
        Some(self.invalidate_counted(scope))
    }
}
