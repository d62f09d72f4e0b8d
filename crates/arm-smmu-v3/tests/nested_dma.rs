//! End to end: a device attached to a nested HWPT does DMA through the `hw` SMMU. The
//! guest's CD and stage-1 tables live in guest memory (IPAs, built with the vmsa builder),
//! stage 2 comes from the IOAS; the bytes land where the two stages say; a guest stage-1
//! change followed by a guest invalidation through HWPT_INVALIDATE is seen; an IOAS unmap is
//! seen at once by every vIOMMU sharing the stage 2.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{DmaError, EventType, SmmuConfig};
use twinmmu_iommufd::*;

const VA: u64 = 0x1_2340_0000;

fn machine(cfg: SmmuConfig) -> Machine {
    Machine::new(cfg, Options::default())
}

fn kvm_ref() -> KvmRef {
    KvmRef::new(vm(&kvm16()))
}

fn check_nested_dma(cfg: SmmuConfig) {
    let m = machine(cfg);
    let mut n = Nested::new(&m, 0x101, 7, Some(kvm_ref()));
    n.guest.map(VA, 0x10_0000, 0x1000);
    n.guest.map(VA + 0x1000, 0x30_0000, 0x1000);
    dma_write(&m, 0x101, VA + 0x10, b"hello").unwrap();
    dma_write(&m, 0x101, VA + 0x1ff8, b"world!!!").unwrap();
    assert_eq!(m.read(m.hpa(0x10_0010), 5), b"hello");
    assert_eq!(m.read(m.hpa(0x30_0ff8), 8), b"world!!!");
    assert_eq!(dma_read(&m, 0x101, VA + 0x10, 5).unwrap(), b"hello");
    // Stage 1 unmapped: a stage-1 translation fault, never host memory.
    assert!(matches!(
        dma_write(&m, 0x101, VA + 0x2000, b"x"),
        Err(DmaError::Fault {
            event: EventType::FTranslation,
            ..
        })
    ));
}

#[test]
fn nested_dma_lands_where_both_stages_say() {
    check_nested_dma(SmmuConfig::default());
}

#[test]
fn nested_dma_with_linear_stream_table_and_no_ril() {
    let cfg = SmmuConfig {
        st_level_2lvl: false,
        sidsize: 10,
        ril: false,
        ..SmmuConfig::default()
    };
    check_nested_dma(cfg);
}

#[test]
fn nested_dma_without_msi_sync_polls_cons() {
    let cfg = SmmuConfig {
        msi: false,
        ..SmmuConfig::default()
    };
    check_nested_dma(cfg);
}

#[test]
fn guest_stage1_change_is_seen_after_guest_invalidation() {
    let m = machine(SmmuConfig::default());
    let mut n = Nested::new(&m, 0x102, 3, Some(kvm_ref()));
    n.guest.map(VA, 0x20_0000, 0x1000);
    dma_write(&m, 0x102, VA, b"old").unwrap();
    assert_eq!(m.read(m.hpa(0x20_0000), 3), b"old");
    // The guest remaps VA without invalidating: the SMMU still has the old translation.
    n.guest.unmap(VA, 0x1000);
    n.guest.map(VA, 0x40_0000, 0x1000);
    dma_write(&m, 0x102, VA, b"stale").unwrap();
    assert_eq!(
        m.read(m.hpa(0x20_0000), 5),
        b"stale",
        "no invalidation yet: the cached translation is used"
    );
    // The guest invalidates through HWPT_INVALIDATE on its vIOMMU.
    let (r, num) = n.invalidate(&[gcmd::tlbi_nh_va(n.guest.asid, VA), gcmd::sync()]);
    // CMD_SYNC is not a command a guest may send through the trapped path: EIO at entry 1,
    // entry 0 handled.
    assert_eq!((r, num), (Err(Errno::EIO), 1));
    dma_write(&m, 0x102, VA, b"new").unwrap();
    assert_eq!(m.read(m.hpa(0x40_0000), 3), b"new");
    // By ASID and all: also seen.
    n.guest.unmap(VA, 0x1000);
    n.guest.map(VA, 0x60_0000, 0x1000);
    assert_eq!(
        n.invalidate(&[gcmd::tlbi_nh_asid(n.guest.asid)]),
        (Ok(()), 1)
    );
    dma_write(&m, 0x102, VA, b"asid").unwrap();
    assert_eq!(m.read(m.hpa(0x60_0000), 4), b"asid");
    n.guest.unmap(VA, 0x1000);
    n.guest.map(VA, 0x70_0000, 0x1000);
    assert_eq!(n.invalidate(&[gcmd::tlbi_nsnh_all()]), (Ok(()), 1));
    dma_write(&m, 0x102, VA, b"all").unwrap();
    assert_eq!(m.read(m.hpa(0x70_0000), 3), b"all");
}

#[test]
fn guest_cd_change_is_seen_after_cfgi_cd() {
    let m = machine(SmmuConfig::default());
    let mut n = Nested::new(&m, 0x103, 9, Some(kvm_ref()));
    n.guest.map(VA, 0x20_0000, 0x1000);
    dma_write(&m, 0x103, VA, b"a").unwrap();
    // The guest switches its CD to a new table (new ASID) and invalidates the CD by vSID.
    let mut g2 = GuestS1::new(&m, 0x100_0000, 0x1f0_0000, 0x77);
    g2.map(VA, 0x50_0000, 0x1000);
    // Point the old CD slot at the new tables: rewrite the guest CD in place.
    let moved = GuestS1 {
        builder: g2.builder,
        asid: 0x77,
        cd_ipa: n.guest.cd_ipa,
    };
    moved.write_cd(&m, false);
    assert_eq!(n.invalidate(&[gcmd::cfgi_cd(9)]), (Ok(()), 1));
    // The old translation may still be cached under the old ASID: the guest also flushes it.
    assert_eq!(
        n.invalidate(&[gcmd::tlbi_nh_asid(n.guest.asid)]),
        (Ok(()), 1)
    );
    dma_write(&m, 0x103, VA, b"cd").unwrap();
    assert_eq!(m.read(m.hpa(0x50_0000), 2), b"cd");
}

#[test]
fn ioas_unmap_is_seen_by_every_viommu_sharing_the_s2() {
    // BTM off: each vIOMMU gets a private VMID (three VMIDs over one S2, threads/002).
    let cfg = SmmuConfig {
        btm: false,
        ..SmmuConfig::default()
    };
    let m = machine(cfg);
    let mut a = Nested::new(&m, 0x110, 1, None);
    let mut b = Nested::in_ctx(
        &m,
        a.ictx.clone(),
        Some((a.ioas, a.s2_hwpt)),
        0x111,
        2,
        None,
    );
    assert_ne!(a.vmid(), b.vmid());
    assert_ne!(a.vmid(), 0);
    // Both guests map their VA to IPA 0x50_0000 (inside the area [0x40_0000, 0x60_0000)).
    a.guest.map(VA, 0x50_0000, 0x1000);
    b.guest.map(VA, 0x50_1000, 0x1000);
    dma_write(&m, 0x110, VA, b"A").unwrap();
    dma_write(&m, 0x111, VA, b"B").unwrap();
    assert_eq!(m.read(m.hpa(0x50_0000), 1), b"A");
    assert_eq!(m.read(m.hpa(0x50_1000), 1), b"B");
    // Both nested translations are cached now; unmap the area from the IOAS.
    let tlb_before = m.smmu.tlb_entries().len();
    assert!(tlb_before >= 2);
    assert_eq!(a.ictx.ioas_unmap(a.ioas, 0x40_0000, AREA), Ok(AREA));
    for sid in [0x110, 0x111] {
        let r = dma_write(&m, sid, VA, b"!");
        assert!(
            matches!(
                r,
                Err(DmaError::Fault {
                    event: EventType::FTranslation,
                    ..
                })
            ),
            "sid {sid:#x}: stale translation after IOAS unmap: {r:?}"
        );
    }
    assert_eq!(m.read(m.hpa(0x50_0000), 1), b"A");
    assert_eq!(m.read(m.hpa(0x50_1000), 1), b"B");
    // The S2 fault is the host's: not forwarded to any vEVENTQ.
    assert!(m.drv.process_events() >= 2);
    assert_eq!(m.drv.stats().events_forwarded, 0);
    // No TLB entry with either VMID translates into the unmapped range.
    for e in m.smmu.tlb_entries() {
        let out = e.out_base;
        assert!(
            !(m.hpa(0x40_0000)..m.hpa(0x60_0000)).contains(&out),
            "stale entry {e:?}"
        );
    }
    drop(b);
}

#[test]
fn s1_and_s2_dma_domains_translate_and_unmap() {
    // Plain DMA domains (no vIOMMU): flags 0 → stage 1 with an SMMU ASID; an S2-only SMMU →
    // stage 2 with a private VMID.
    for s1p in [true, false] {
        let cfg = SmmuConfig {
            s1p,
            ..SmmuConfig::default()
        };
        let m = machine(cfg);
        let dev = m.master(0x20);
        let c = Iommufd::new();
        let d = c
            .bind_device(
                std::sync::Arc::clone(&dev) as std::sync::Arc<dyn IommuDevice>,
                None,
            )
            .unwrap();
        let ioas = c.ioas_alloc(0).unwrap();
        let iova = 0x1234_0000;
        c.ioas_map(FIXED, ioas, m.src(0x80_0000), 0x4000, iova)
            .unwrap();
        let hwpt = c.attach(d, NO_PASID, ioas).unwrap();
        let dom = c.paging_domain(hwpt).unwrap();
        assert_eq!(
            dom.as_any().downcast_ref::<S1Domain>().is_some(),
            s1p,
            "stage 1 preferred when implemented"
        );
        assert_eq!(dom.iova_to_phys(iova + 0x1234), Some(m.hpa(0x80_1234)));
        dma_write(&m, 0x20, iova + 0x3ffc, b"dma!").unwrap();
        assert_eq!(m.read(m.hpa(0x80_3ffc), 4), b"dma!");
        c.ioas_unmap(ioas, iova, 0x4000).unwrap();
        assert!(
            dma_write(&m, 0x20, iova, b"x").is_err(),
            "no stale translation"
        );
        assert_eq!(dom.iova_to_phys(iova), None);
        drop(dom);
        c.detach(d, NO_PASID);
        c.unbind_device(d).unwrap();
        drop(c);
        assert_eq!(
            m.drv.stats().private_vmids + m.drv.stats().asids,
            0,
            "domain freed its ASID/VMID"
        );
    }
}
