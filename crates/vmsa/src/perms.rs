//! Permissions as small Copy values with the hierarchical table bits already folded in, and
//! the checks, separate from the walk so a TLB can re-check a cached entry on every hit.

use crate::descriptor::Descriptor;

/// What a transaction does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    Read,
    Write,
    /// Instruction fetch (IHI0070 InD = 1).
    Execute,
}

/// One access: kind and privilege (IHI0070 PnU, after STE.PRIVCFG/INSTCFG overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    pub kind: AccessKind,
    pub privileged: bool,
}

impl Access {
    pub const fn new(kind: AccessKind, privileged: bool) -> Self {
        Access { kind, privileged }
    }
}

/// Stage-1 controls applied at check time (from the CD): WXN and PAN. CD.UWXN is IGNORED
/// for VMSAv8-64 (IHI0070 5.4): every EL0-writable page is already PXN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct S1Controls {
    pub wxn: bool,
    pub pan: bool,
}

/// Stage-1 permissions of one translation, hierarchical attributes folded in:
/// read-only = AP\[2\] | APTable\[1\]; EL0 = AP\[1\] & !APTable\[0\]; PXN = PXN | PXNTable;
/// UXN = UXN | UXNTable (DDI0487 D8.4; the table bits are ignored under HADx).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct S1Perms(u8);

impl S1Perms {
    const RO: u8 = 1 << 0;
    const EL0: u8 = 1 << 1;
    const PXN: u8 = 1 << 2;
    const UXN: u8 = 1 << 3;

    pub const fn new(read_only: bool, el0: bool, pxn: bool, uxn: bool) -> Self {
        S1Perms(
            (if read_only { Self::RO } else { 0 })
                | (if el0 { Self::EL0 } else { 0 })
                | (if pxn { Self::PXN } else { 0 })
                | (if uxn { Self::UXN } else { 0 }),
        )
    }

    /// From a leaf descriptor and the accumulated table restrictions.
    #[inline(always)]
    pub const fn from_leaf(d: Descriptor, table: TableRestrictions) -> Self {
        S1Perms::new(
            d.s1_ap_ro() || table.read_only,
            d.s1_ap_el0() && !table.no_el0,
            d.s1_pxn() || table.pxn,
            d.s1_uxn() || table.uxn,
        )
    }

    pub const fn read_only(self) -> bool {
        self.0 & Self::RO != 0
    }
    pub const fn el0(self) -> bool {
        self.0 & Self::EL0 != 0
    }
    pub const fn pxn(self) -> bool {
        self.0 & Self::PXN != 0
    }
    pub const fn uxn(self) -> bool {
        self.0 & Self::UXN != 0
    }
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// APTable/PXNTable/UXNTable accumulated down a stage-1 walk (any level setting a bit
/// restricts everything below it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TableRestrictions {
    pub read_only: bool,
    pub no_el0: bool,
    pub pxn: bool,
    pub uxn: bool,
}

impl TableRestrictions {
    #[inline(always)]
    pub const fn add(self, table: Descriptor) -> Self {
        TableRestrictions {
            read_only: self.read_only || table.table_ap_ro(),
            no_el0: self.no_el0 || table.table_ap_no_el0(),
            pxn: self.pxn || table.table_pxn(),
            uxn: self.uxn || table.table_uxn(),
        }
    }
}

/// Stage-2 permissions of one translation: S2AP read/write and the execute-never decision
/// for each privilege, decoded from XN\[1:0\] at walk time (FEAT_XNX when the implementation
/// has it; otherwise only bit 54 counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct S2Perms(u8);

impl S2Perms {
    const R: u8 = 1 << 0;
    const W: u8 = 1 << 1;
    const PXN: u8 = 1 << 2;
    const UXN: u8 = 1 << 3;

    pub const fn new(read: bool, write: bool, priv_xn: bool, unpriv_xn: bool) -> Self {
        S2Perms(
            (if read { Self::R } else { 0 })
                | (if write { Self::W } else { 0 })
                | (if priv_xn { Self::PXN } else { 0 })
                | (if unpriv_xn { Self::UXN } else { 0 }),
        )
    }

    /// DDI0487 D8.4 stage 2 XN\[1:0\] with FEAT_XNX: 00 executable at EL1 and EL0; 01 not at
    /// EL1; 10 at neither; 11 not at EL0. Without XNX, XN\[1\] alone means execute-never.
    #[inline(always)]
    pub const fn from_leaf(d: Descriptor, xnx: bool) -> Self {
        let xn = d.s2_xn();
        let (pxn, uxn) = if xnx {
            match xn {
                0b00 => (false, false),
                0b01 => (true, false),
                0b10 => (true, true),
                _ => (false, true),
            }
        } else {
            let x = xn & 0b10 != 0;
            (x, x)
        };
        S2Perms::new(d.s2_read(), d.s2_write(), pxn, uxn)
    }

    pub const fn read(self) -> bool {
        self.0 & Self::R != 0
    }
    pub const fn write(self) -> bool {
        self.0 & Self::W != 0
    }
    pub const fn priv_xn(self) -> bool {
        self.0 & Self::PXN != 0
    }
    pub const fn unpriv_xn(self) -> bool {
        self.0 & Self::UXN != 0
    }
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// Why a permission check failed (the caller adds level and stage to make a
/// Permission fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PermissionDenied {
    #[error("no read permission")]
    Read,
    #[error("no write permission")]
    Write,
    #[error("execute never")]
    Execute,
    #[error("privileged access never (PAN)")]
    Pan,
}

/// Stage-1 direct permission check (DDI0487 D8.4, AArch64.S1DirectBasePermissions for the
/// EL1&0 regime): privileged read always; privileged write unless read-only; unprivileged
/// read/write only with AP\[1\] (write also needs !AP\[2\]); privileged execute unless PXN or
/// EL0-writable; unprivileged execute unless UXN (independent of AP\[1\]); WXN makes every
/// writable page execute-never at the privilege that can write it; PAN denies privileged
/// data accesses to pages unprivileged code may access.
#[inline]
pub const fn check_s1(p: S1Perms, access: Access, ctl: S1Controls) -> Result<(), PermissionDenied> {
    let pw = !p.read_only();
    let ur = p.el0();
    let uw = p.el0() && !p.read_only();
    match (access.kind, access.privileged) {
        (AccessKind::Read, true) => {
            if ctl.pan && ur {
                Err(PermissionDenied::Pan)
            } else {
                Ok(())
            }
        }
        (AccessKind::Write, true) => {
            if ctl.pan && ur {
                Err(PermissionDenied::Pan)
            } else if !pw {
                Err(PermissionDenied::Write)
            } else {
                Ok(())
            }
        }
        (AccessKind::Execute, true) => {
            if p.pxn() || uw || (ctl.wxn && pw) {
                Err(PermissionDenied::Execute)
            } else {
                Ok(())
            }
        }
        (AccessKind::Read, false) => {
            if ur {
                Ok(())
            } else {
                Err(PermissionDenied::Read)
            }
        }
        (AccessKind::Write, false) => {
            if uw {
                Ok(())
            } else {
                Err(PermissionDenied::Write)
            }
        }
        (AccessKind::Execute, false) => {
            if p.uxn() || (ctl.wxn && uw) {
                Err(PermissionDenied::Execute)
            } else {
                Ok(())
            }
        }
    }
}

/// Stage-2 permission check (DDI0487 D8.4): S2AP for data, XN (per privilege) for fetches.
#[inline]
pub const fn check_s2(p: S2Perms, access: Access) -> Result<(), PermissionDenied> {
    match access.kind {
        AccessKind::Read => {
            if p.read() {
                Ok(())
            } else {
                Err(PermissionDenied::Read)
            }
        }
        AccessKind::Write => {
            if p.write() {
                Ok(())
            } else {
                Err(PermissionDenied::Write)
            }
        }
        AccessKind::Execute => {
            let xn = if access.privileged {
                p.priv_xn()
            } else {
                p.unpriv_xn()
            };
            if xn {
                Err(PermissionDenied::Execute)
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use AccessKind::*;

    const NONE: S1Controls = S1Controls {
        wxn: false,
        pan: false,
    };

    fn s1(ap: u64, pxn: bool, uxn: bool) -> S1Perms {
        // AP[2:1] at bits [7:6].
        let d = Descriptor((ap << 6) | ((pxn as u64) << 53) | ((uxn as u64) << 54) | 1);
        S1Perms::from_leaf(d, TableRestrictions::default())
    }

    fn ok(p: S1Perms, kind: AccessKind, privileged: bool, ctl: S1Controls) -> bool {
        check_s1(p, Access::new(kind, privileged), ctl).is_ok()
    }

    #[test]
    fn ap_encodings() {
        // 00: privileged RW, no EL0.
        let p = s1(0b00, false, false);
        assert!(ok(p, Read, true, NONE) && ok(p, Write, true, NONE));
        assert!(!ok(p, Read, false, NONE) && !ok(p, Write, false, NONE));
        // 01: RW at both; EL0-writable → implicitly PXN.
        let p = s1(0b01, false, false);
        assert!(ok(p, Read, false, NONE) && ok(p, Write, false, NONE));
        assert!(!ok(p, Execute, true, NONE) && ok(p, Execute, false, NONE));
        // 10: privileged RO.
        let p = s1(0b10, false, false);
        assert!(ok(p, Read, true, NONE) && !ok(p, Write, true, NONE));
        assert!(!ok(p, Read, false, NONE));
        // 11: RO at both.
        let p = s1(0b11, false, false);
        assert!(ok(p, Read, false, NONE) && !ok(p, Write, false, NONE));
        assert!(ok(p, Execute, true, NONE));
    }

    #[test]
    fn execute_never_wxn_and_pan() {
        let p = s1(0b00, true, false);
        assert_eq!(
            check_s1(p, Access::new(Execute, true), NONE),
            Err(PermissionDenied::Execute)
        );
        // EL0 may execute a privileged-only page unless UXN (execute-only memory).
        assert!(ok(p, Execute, false, NONE));
        assert!(!ok(s1(0b00, false, true), Execute, false, NONE));
        let wxn = S1Controls {
            wxn: true,
            pan: false,
        };
        assert!(!ok(s1(0b00, false, false), Execute, true, wxn));
        assert!(ok(s1(0b10, false, false), Execute, true, wxn));
        assert!(!ok(s1(0b01, false, false), Execute, false, wxn));
        assert!(ok(s1(0b11, false, false), Execute, false, wxn));
        let pan = S1Controls {
            wxn: false,
            pan: true,
        };
        assert_eq!(
            check_s1(s1(0b11, false, false), Access::new(Read, true), pan),
            Err(PermissionDenied::Pan)
        );
        assert!(ok(s1(0b10, false, false), Read, true, pan));
        // PAN does not apply to fetches.
        assert!(ok(s1(0b11, false, false), Execute, true, pan));
    }

    #[test]
    fn table_restrictions_fold_in() {
        let leaf = Descriptor((0b01 << 6) | 1);
        let t = TableRestrictions::default().add(Descriptor((1 << 62) | 3));
        let p = S1Perms::from_leaf(leaf, t);
        assert!(p.read_only() && p.el0());
        let t = t.add(Descriptor((1 << 61) | (1 << 59) | (1 << 60) | 3));
        let p = S1Perms::from_leaf(leaf, t);
        assert!(!p.el0() && p.pxn() && p.uxn());
    }

    #[test]
    fn stage2_xn_and_s2ap() {
        let d = |s2ap: u64, xn: u64| Descriptor((s2ap << 6) | (xn << 53) | 1);
        let x = |p: S2Perms, privileged| check_s2(p, Access::new(Execute, privileged)).is_ok();
        for (xn, xnx, pe, ue) in [
            (0b00, true, true, true),
            (0b01, true, false, true),
            (0b10, true, false, false),
            (0b11, true, true, false),
            (0b01, false, true, true),
            (0b10, false, false, false),
            (0b11, false, false, false),
        ] {
            let p = S2Perms::from_leaf(d(0b11, xn), xnx);
            assert_eq!((x(p, true), x(p, false)), (pe, ue), "xn={xn:#b} xnx={xnx}");
        }
        for (s2ap, r, w) in [
            (0b00, false, false),
            (0b01, true, false),
            (0b10, false, true),
            (0b11, true, true),
        ] {
            let p = S2Perms::from_leaf(d(s2ap, 0), false);
            assert_eq!(check_s2(p, Access::new(Read, false)).is_ok(), r);
            assert_eq!(check_s2(p, Access::new(Write, true)).is_ok(), w);
        }
    }
}
