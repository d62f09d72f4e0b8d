//! The VMS (IHI0070 5.6) and F_VMS_FETCH (7.3.20): with MPAM implemented (IDR3.MPAM,
//! SMMU_MPAMIDR.PARTID_MAX != 0) and both stages, a nested STE with S1MPAM = 1 enables
//! STE.VMSPtr and the SMMU fetches the VMS's PARTID_MAP with the STE. An external abort on
//! that fetch is F_VMS_FETCH; the same STE with S1MPAM = 0, or an SMMU without MPAM, never
//! fetches it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_hw::cmd::build;
use twinmmu_hw::regs::off;
use twinmmu_hw::ste::Ste;
use twinmmu_hw::{AccessKind, EventType, Outcome, PhysMem, SmmuConfig, Termination, Transaction};

const IOVA: u64 = 0x10_0000;
const SID: u32 = 0x44;
/// The VMS: 4 KiB, 4 KiB aligned, in RAM.
const VMS: u64 = RAM + 0x50_0000;
/// Outside RAM: an external abort.
const NOWHERE: u64 = 0x10_0000_0000;

fn mpam_cfg() -> SmmuConfig {
    SmmuConfig {
        mpam: true,
        mpam_partid_max: 0x3f,
        mpam_pmg_max: 0xf,
        ..SmmuConfig::default()
    }
}

/// The nested STE with S1MPAM and VMSPtr (dword 5 bits [55:12]).
fn with_vms(ste: &Ste, s1mpam: bool, vms: u64) -> Ste {
    let mut s = *ste;
    s.dw1 = s.dw1.with_s1mpam(s1mpam);
    s.rest[1] = vms;
    s
}

fn read(ssid: Option<u32>) -> Transaction {
    Transaction::new(SID, ssid, IOVA + 0x10, AccessKind::Read, false)
}

#[test]
fn mpam_id_registers() {
    let m = Machine::new(mpam_cfg());
    assert_ne!(m.r32(off::IDR3) & (1 << 7), 0, "IDR3.MPAM");
    assert_eq!(m.r32(off::MPAMIDR), 0x3f | (0xf << 16));
    // GMPAM: a write without Update is ignored; with Update it takes (bits above the
    // widths RES0) and Update reads 0.
    m.w32(off::GMPAM, 0x5);
    assert_eq!(m.r32(off::GMPAM), 0);
    m.w32(off::GMPAM, (1 << 31) | (0xff << 16) | 0xffff);
    assert_eq!(m.r32(off::GMPAM), (0xf << 16) | 0x3f);
    m.w32(off::GBPMPAM, (1 << 31) | (3 << 16) | 7);
    assert_eq!(m.r32(off::GBPMPAM), (3 << 16) | 7);
    // Without MPAM they are RES0.
    let m = Machine::new(SmmuConfig::default());
    assert_eq!(m.r32(off::IDR3) & (1 << 7), 0);
    m.w32(off::GMPAM, (1 << 31) | 5);
    assert_eq!((m.r32(off::MPAMIDR), m.r32(off::GMPAM)), (0, 0));
}

#[test]
fn the_vms_is_fetched_with_the_ste_and_cached_by_streamid() {
    let mut m = Machine::new(mpam_cfg());
    let ste = nested_stream(&mut m, IOVA);
    // PARTID_MAP[i] = 0x10 + i.
    for i in 0..8u64 {
        let w = (0..4u64).fold(0, |w, j| w | ((0x10 + 4 * i + j) << (16 * j)));
        m.mem.write_u64(VMS + 8 * i, w).unwrap();
    }
    m.set_ste(SID, &with_vms(&ste, true, VMS));
    assert_eq!(
        m.smmu.translate(read(None)),
        Outcome::Translated { pa: DATA + 0x10 }
    );
    assert_eq!(m.smmu.stats().vms_fetches, 1);
    let map = m.smmu.cached_partid_map(SID).unwrap();
    assert_eq!(map[0], 0x10);
    assert_eq!(map[31], 0x10 + 31);
    assert!(m.events().is_empty());
    // CMD_CFGI_VMS_PIDM is legal with the VMS; CFGI_STE drops the cached map with the STE.
    m.submit(&[build::cfgi_vms_pidm(11), build::sync()]);
    assert!(m.cmdq_idle());
    m.submit(&[build::cfgi_ste(SID, true), build::sync()]);
    assert_eq!(m.smmu.cached_partid_map(SID), None);
}

#[test]
fn f_vms_fetch_on_an_external_abort() {
    let mut m = Machine::new(mpam_cfg());
    let ste = nested_stream(&mut m, IOVA);
    m.set_ste(SID, &with_vms(&ste, true, NOWHERE));
    match m.smmu.translate(read(Some(0))) {
        Outcome::Fault {
            event: EventType::FVmsFetch,
            recorded: true,
            termination: Termination::Abort,
        } => {}
        o => panic!("{o:?}"),
    }
    let evs = m.events();
    assert_eq!(evs.len(), 1, "{evs:x?}");
    let r = evs[0];
    // Type 0x25, SSV = 1 with SubstreamID 0, StreamID; FetchAddr[55:3] in bits [247:195].
    assert_eq!(r[0], 0x25 | (1 << 11) | (u64::from(SID) << 32));
    assert_eq!(r[1], 0, "Reason (IMPLEMENTATION DEFINED) 0");
    assert_eq!(r[2], 0);
    assert_eq!(r[3], NOWHERE, "FetchAddr of the first PARTID_MAP word");
    // Nothing was cached: the next transaction fetches (and faults) again.
    assert!(matches!(
        m.smmu.translate(read(None)),
        Outcome::Fault {
            event: EventType::FVmsFetch,
            ..
        }
    ));
    assert_eq!(m.events().len(), 1);
    // VMSPtr beyond the OAS (48 bits) makes the STE ILLEGAL: C_BAD_STE, not a fetch.
    m.set_ste(SID, &with_vms(&ste, true, 1 << 50));
    assert!(matches!(
        m.smmu.translate(read(None)),
        Outcome::Fault {
            event: EventType::CBadSte,
            ..
        }
    ));
    assert_eq!(m.events().len(), 1);
}

#[test]
fn no_vms_fetch_without_s1mpam_or_without_mpam() {
    // S1MPAM = 0: VMSPtr is not enabled and never read.
    let mut m = Machine::new(mpam_cfg());
    let ste = nested_stream(&mut m, IOVA);
    m.set_ste(SID, &with_vms(&ste, false, NOWHERE));
    assert_eq!(
        m.smmu.translate(read(None)),
        Outcome::Translated { pa: DATA + 0x10 }
    );
    // No MPAM: VMSPtr is RES0 (ignored), and CFGI_VMS_PIDM is CERROR_ILL.
    let mut m = Machine::new(SmmuConfig::default());
    let ste = nested_stream(&mut m, IOVA);
    m.set_ste(SID, &with_vms(&ste, true, NOWHERE));
    assert_eq!(
        m.smmu.translate(read(None)),
        Outcome::Translated { pa: DATA + 0x10 }
    );
    assert!(m.events().is_empty());
    assert_eq!(m.smmu.stats().vms_fetches, 0);
    m.submit(&[build::cfgi_vms_pidm(11)]);
    assert_eq!((m.r32(off::CMDQ_CONS) >> 24) & 0x7f, 1, "CERROR_ILL");
}
