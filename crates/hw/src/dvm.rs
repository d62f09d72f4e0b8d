//! The DVM port: broadcast TLB maintenance from PEs (IHI0070 3.17; smmu_kvm.md §4.11).
//!
//! [`Tlbi`] names a PE `TLBI …IS` operation with its operands as a PE executes it: the
//! issuing context's VMID (VTTBR_EL2.VMID; 0 for an nVHE host), the ASID, the byte address
//! and the range form of FEAT_TLBIRANGE. A PE TLB model consumes the same type; the SMMU
//! maps it to its own invalidation scope when IDR0.BTM = 1 and CR2.PTM = 0.

use crate::cmd::{TlbiAddr, TlbiRange};
use crate::smmu::{Smmu, inc};
use crate::tlb::{AsidMatch, InvScope, Kind, World};

/// Defines [`TlbiOp`], its names and [`TlbiOp::ALL`] from one list.
macro_rules! tlbi_ops {
    ($($(#[$doc:meta])* $op:ident => $name:literal,)*) => {
        /// A PE TLB maintenance operation, Inner Shareable (DDI0487 C5.5; the §4.11 table).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum TlbiOp {
            $($(#[$doc])* $op,)*
        }

        impl TlbiOp {
            /// Every operation, in declaration order.
            pub const ALL: [TlbiOp; [$(TlbiOp::$op),*].len()] = [$(TlbiOp::$op),*];

            /// The instruction name as `twinmmu qtest` accepts it.
            pub fn name(self) -> &'static str {
                match self {
                    $(TlbiOp::$op => $name,)*
                }
            }
        }
    };
}

tlbi_ops! {
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
    /// ASID-scoped EL2&0 invalidation of a VHE host (TLBI ASIDE1IS with HCR_EL2.{E2H,TGE}).
    Aside2is => "ASIDE2IS",
    Rvae1is => "RVAE1IS",
    Rvale1is => "RVALE1IS",
    Rvaae1is => "RVAAE1IS",
    Rvaale1is => "RVAALE1IS",
    Ripas2e1is => "RIPAS2E1IS",
    Ripas2le1is => "RIPAS2LE1IS",
    Rvae2is => "RVAE2IS",
    Rvale2is => "RVALE2IS",
    /// EL2&0 invalidation by VA for every ASID of a VHE host (TLBI VAAE1IS with
    /// HCR_EL2.{E2H,TGE}); an SMMU acts on it as CMD_TLBI_EL2_VAA.
    Vaae2is => "VAAE2IS",
    /// The last-level form (TLBI VAALE1IS at EL2&0).
    Vaale2is => "VAALE2IS",
    /// The range form (TLBI RVAAE1IS at EL2&0).
    Rvaae2is => "RVAAE2IS",
    /// The last-level range form (TLBI RVAALE1IS at EL2&0).
    Rvaale2is => "RVAALE2IS",
}

impl TlbiOp {
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
                | Rvaae2is
                | Rvaale2is
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
                | Vaale2is
                | Rvaale2is
        )
    }
}

/// A TLBI operation and its operands. `V` is where the VMID is: the DVM message
/// ([`Tlbi`]) carries the issuing context's VTTBR_EL2.VMID (`u16`); the instruction as
/// software writes it ([`TlbiInsn`]) has none (`()`), the PE adds it when it executes the
/// instruction ([`crate::Dvm::tlbi`]). One type, so the two share their operands and
/// builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TlbiWith<V> {
    pub op: TlbiOp,
    /// VMID of the issuing context (VTTBR_EL2.VMID), for EL1 operations.
    pub vmid: V,
    /// ASID operand (ASID-scoped operations).
    pub asid: u16,
    /// Byte address (VA or IPA, bits \[11:0\] ignored) of address-based operations; the
    /// range base for range forms.
    pub addr: u64,
    /// The range of a range form (FEAT_TLBIRANGE), in the DVM message's encoding:
    /// `(num + 1) << scale` granules of `1 << tg_shift` bytes from `addr`.
    pub range: Option<TlbiRange>,
}

/// One broadcast TLBI with the operands a PE provides (the DVM message).
pub type Tlbi = TlbiWith<u16>;

/// A TLBI instruction as software writes it: the operation and its register operand. The
/// VMID is not an operand — it comes from the issuing PE's VTTBR_EL2 ([`crate::Dvm::tlbi`]).
pub type TlbiInsn = TlbiWith<()>;

impl Tlbi {
    pub fn new(op: TlbiOp, vmid: u16) -> Self {
        TlbiWith {
            op,
            vmid,
            asid: 0,
            addr: 0,
            range: None,
        }
    }
}

impl TlbiInsn {
    pub fn new(op: TlbiOp) -> Self {
        TlbiWith {
            op,
            vmid: (),
            asid: 0,
            addr: 0,
            range: None,
        }
    }
}

impl<V> TlbiWith<V> {
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
}

impl Tlbi {
    /// What this TLBI removes from the TLB of `r` (smmu_kvm.md §4.11; DDI0487 D8.13;
    /// IHI0070 3.17): [`TlbiOp::scope`] with the message's operands.
    pub fn scope(&self, r: TlbiRecipient) -> InvScope {
        let addr = TlbiAddr {
            addr: self.addr & !0xfff,
            leaf: self.op.is_leaf(),
            range: if self.op.is_range() { self.range } else { None },
        };
        self.op.scope(self.vmid, self.asid, addr, r)
    }
}

impl TlbiOp {
    /// What this operation with these operands removes from the TLB of `r`. One mapping for
    /// every recipient, PE or SMMU, and for the SMMU's own TLBI commands, which act as the
    /// broadcast of the same operation ([`crate::cmd::Command`]); the real differences are
    /// [`TlbiRecipient`]'s fields, the rest is common:
    /// - EL1 forms act on NS-EL1 entries of `vmid` (stage-1 and combined;
    ///   `VMALLS12E1IS` stage 2 too), `ALLE1IS` on every VMID's (an SMMU: CMD_TLBI_NSNH_ALL).
    /// - `IPAS2E1IS` and its forms remove stage-2 entries only, on a PE as on an SMMU
    ///   (CMD_TLBI_S2_IPA: IHI0070 4.4.3.1 requires only stage-2-only entries to go): a
    ///   combined entry holding that IPA survives, which is why KVM follows it with
    ///   `VMALLE1IS`. Stage 2 has no ASET opt-out.
    /// - EL2 forms carry no VMID: `ALLE2IS` removes every EL2 and EL2&0 entry, the by-VA
    ///   and by-ASID forms act on the EL2&0 world by ASID with `e2h`, on the EL2 world
    ///   (entries without an ASID) without.
    ///
    /// `asid` and `addr` are read only by the forms that take them.
    pub fn scope(self, vmid: u16, asid: u16, addr: TlbiAddr, r: TlbiRecipient) -> InvScope {
        use TlbiOp::*;
        let base = InvScope {
            worlds: InvScope::world_bit(World::NsEl1),
            kinds: InvScope::S1_KINDS,
            vmid: Some(vmid),
            asid: AsidMatch::Any,
            skip_aset: false,
            range: None,
        };
        // EL2 scopes carry no VMID (IHI0070 3.17).
        let el2 = InvScope {
            worlds: if r.e2h {
                InvScope::world_bit(World::El2E2h)
            } else {
                InvScope::world_bit(World::El2)
            },
            kinds: InvScope::ALL_KINDS,
            vmid: None,
            ..base
        };
        match self {
            Vmalle1is => base,
            // ASID-scoped broadcasts skip ASET = 1 entries (IHI0070 3.17; 16.7.7).
            Aside1is => InvScope {
                asid: AsidMatch::NonGlobal(asid),
                skip_aset: r.aset,
                ..base
            },
            Vae1is | Vale1is | Rvae1is | Rvale1is => InvScope {
                asid: AsidMatch::AsidOrGlobal(asid),
                skip_aset: r.aset,
                range: Some(addr.span()),
                ..base
            },
            Vaae1is | Vaale1is | Rvaae1is | Rvaale1is => InvScope {
                range: Some(addr.span()),
                ..base
            },
            Ipas2e1is | Ipas2le1is | Ripas2e1is | Ripas2le1is => InvScope {
                kinds: InvScope::kind_bit(Kind::S2),
                range: Some(addr.span()),
                ..base
            },
            Vmalls12e1is => InvScope {
                kinds: InvScope::ALL_KINDS,
                ..base
            },
            Alle1is => InvScope {
                kinds: InvScope::ALL_KINDS,
                vmid: None,
                ..base
            },
            // Every EL2 entry, ASID-tagged or not (3.17: ASET = 1 EL2 entries too).
            Alle2is => InvScope {
                worlds: InvScope::world_bit(World::El2) | InvScope::world_bit(World::El2E2h),
                ..el2
            },
            // IHI0070 3.17.5: a PE in E2H mode supplies an ASID with its EL2 operations and
            // reaches the EL2-E2H world; without E2H the EL2 world, whose entries have no
            // ASID. Entries inserted with ASET = 1 need not follow VA-scoped broadcasts
            // (3.17), and do not.
            Vae2is | Vale2is | Rvae2is | Rvale2is => InvScope {
                asid: if r.e2h {
                    AsidMatch::AsidOrGlobal(asid)
                } else {
                    AsidMatch::Any
                },
                skip_aset: r.aset,
                range: Some(addr.span()),
                ..el2
            },
            // TLBI VAAE1IS from a VHE host: every ASID's EL2&0 entries at the address, as
            // CMD_TLBI_EL2_VAA (IHI0070 4.4.2.9: the EL2-E2H world with CR2.E2H, the EL2
            // world without). Not ASID-scoped: ASET = 1 entries follow it too.
            Vaae2is | Vaale2is | Rvaae2is | Rvaale2is => InvScope {
                range: Some(addr.span()),
                ..el2
            },
            // TLBI ASIDE1IS from a VHE host (HCR_EL2.{E2H,TGE} = {1,1}): non-global EL2-E2H
            // entries of the ASID; EL2 entries have no ASID.
            Aside2is => InvScope {
                worlds: InvScope::world_bit(World::El2E2h),
                asid: AsidMatch::NonGlobal(asid),
                skip_aset: r.aset,
                ..el2
            },
        }
    }
}

/// Who applies a broadcast TLBI, as far as what it removes depends on it ([`Tlbi::scope`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbiRecipient {
    /// Its entries can carry ASET = 1 (an SMMU's CD.ASET), which ASID-scoped broadcasts
    /// skip (IHI0070 3.17, 16.7.7). A PE has no ASET: every ASID it holds is shared.
    pub aset: bool,
    /// EL2 by-VA and by-ASID forms act on the EL2&0 (EL2-E2H) world by ASID: a PE with
    /// HCR_EL2.E2H (VHE), an SMMU with CR2.E2H. Without, on the EL2 world.
    pub e2h: bool,
}

impl TlbiRecipient {
    /// A PE, VHE (HCR_EL2.E2H = 1) or not.
    pub fn pe(vhe: bool) -> Self {
        TlbiRecipient {
            aset: false,
            e2h: vhe,
        }
    }

    /// An SMMU with CR2.E2H = `e2h`.
    pub fn smmu(e2h: bool) -> Self {
        TlbiRecipient { aset: true, e2h }
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
        let scope = t.scope(TlbiRecipient::smmu(cr2.e2h()));
        // Complete when this returns: `invalidate` publishes the new epoch (Release) that
        // every later translation loads (Acquire).
        Some(self.invalidate(scope))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DVM counts operations by discriminant in an array of `ALL.len()`.
    #[test]
    fn all_is_in_discriminant_order() {
        for (i, op) in TlbiOp::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i, "{op:?}");
        }
    }

    /// A PE and an SMMU apply every broadcast alike but for ASET: only the SMMU's entries
    /// can opt out, and only of the ASID-scoped forms (IHI0070 3.17, 16.7.7; smmu_kvm.md
    /// §4.11).
    #[test]
    fn pe_and_smmu_scopes_differ_only_by_aset() {
        use TlbiOp::*;
        for op in TlbiOp::ALL {
            for e2h in [false, true] {
                let mut t = Tlbi::new(op, 3).with_asid(5).with_addr(0x4000);
                if op.is_range() {
                    t = t.with_range(TlbiRange {
                        tg_shift: 12,
                        num: 1,
                        scale: 0,
                        ttl: 0,
                    });
                }
                let pe = t.scope(TlbiRecipient::pe(e2h));
                let smmu = t.scope(TlbiRecipient::smmu(e2h));
                assert!(!pe.skip_aset, "{op:?}: a PE has no ASET");
                let asid_scoped = matches!(
                    op,
                    Aside1is
                        | Vae1is
                        | Vale1is
                        | Rvae1is
                        | Rvale1is
                        | Aside2is
                        | Vae2is
                        | Vale2is
                        | Rvae2is
                        | Rvale2is
                );
                assert_eq!(smmu.skip_aset, asid_scoped, "{op:?}");
                assert_eq!(
                    InvScope {
                        skip_aset: false,
                        ..smmu
                    },
                    pe,
                    "{op:?}, E2H {e2h}"
                );
            }
        }
    }
}
