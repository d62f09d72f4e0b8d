//! The HW queue (Tegra241-CMDQV style, smmu_kvm.md §5, threads/003) end to end: a
//! TEGRA241_CMDQV vIOMMU with its VINTF page mapped by the VMM, a guest ring in the IOAS, the
//! guest enabling the queue and posting TLBIs on its page, the host consuming them on the
//! doorbell; an illegal command stopping the queue with CERROR_ILL, reported through the
//! vEVENTQ, and the guest's recovery; the §5.3 validation table.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use twinmmu_arm_smmu_v3::defs::{get, q};
use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::SmmuConfig;
use twinmmu_iommufd::*;

const VA: u64 = 0x7700_0000;
/// The guest ring (guest PA) and its size: 256 commands.
const RING: u64 = 0x1_0000;
const RING_LEN: u64 = 0x1000;

fn cmdqv_opts() -> Options {
    Options {
        cmdqv: Some(CmdqvConfig::default()),
        ..Options::default()
    }
}

struct Hq {
    m: Machine,
    c: Iommufd,
    dev_id: ObjectId,
    ioas: ObjectId,
    s2: ObjectId,
    viommu: ObjectId,
    page: MmapRegion,
    guest: GuestS1,
    evq: VeventqFd,
    prod: u32,
    _dev: Arc<Master>,
}

impl Hq {
    fn new() -> Hq {
        let m = Machine::new(SmmuConfig::default(), cmdqv_opts());
        let c = Iommufd::new();
        let dev = m.master(0x33);
        let vm = vm(&kvm16());
        let dev_id = c
            .bind_device(
                Arc::clone(&dev) as Arc<dyn IommuDevice>,
                Some(KvmRef::new(vm)),
            )
            .unwrap();
        let ioas = c.ioas_alloc(0).unwrap();
        for ipa in (0..GUEST_MAPPED).step_by(AREA as usize) {
            c.ioas_map(FIXED, ioas, m.src(ipa), AREA, ipa).unwrap();
        }
        let s2 = c
            .hwpt_alloc(
                hwpt_flags::NEST_PARENT,
                dev_id,
                ioas,
                &mut none_data(),
                ObjectId(0),
            )
            .unwrap();
        let mut data = [0u8; 16];
        let viommu = c
            .viommu_alloc(
                0,
                viommu_type::TEGRA241_CMDQV,
                dev_id,
                s2,
                &mut UserData::new(viommu_type::TEGRA241_CMDQV, &mut data),
            )
            .unwrap();
        let offset = u64::from_le_bytes(data[..8].try_into().unwrap());
        let length = u64::from_le_bytes(data[8..].try_into().unwrap());
        assert_eq!(length, VCMDQ_PAGE_SIZE);
        let page = c.mmap(offset, length, true, false).unwrap();
        c.vdevice_alloc(viommu, dev_id, 0x21).unwrap();
        let evq = c
            .veventq_alloc(0, viommu, veventq_type::TEGRA241_CMDQV, 4)
            .unwrap();
        let guest = GuestS1::new(&m, GUEST_TABLES, GUEST_TABLES + 0x3f_f000, 0x44);
        let mut vste = vste_bytes(guest.vste());
        let nested = c
            .hwpt_alloc(
                0,
                dev_id,
                viommu,
                &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut vste),
                ObjectId(0),
            )
            .unwrap();
        c.attach(dev_id, NO_PASID, nested).unwrap();
        Hq {
            m,
            c,
            dev_id,
            ioas,
            s2,
            viommu,
            page,
            guest,
            evq,
            prod: 0,
            _dev: dev,
        }
    }

    fn vsmmu(&self) -> Arc<dyn Viommu> {
        self.c.viommu_ops(self.viommu).unwrap()
    }

    fn kick(&self) -> usize {
        let v = self.vsmmu();
        v.as_any().downcast_ref::<VSmmu>().unwrap().kick()
    }

    /// The VMM/guest writes a register of queue `lidx` on the mapped page.
    fn wreg(&self, lidx: u32, off: u64, v: u32) {
        let a = self.page.base_pa() + u64::from(lidx) * vcmdq_reg::STRIDE + off;
        self.m.write(a, &v.to_le_bytes());
    }

    fn rreg(&self, lidx: u32, off: u64) -> u32 {
        let a = self.page.base_pa() + u64::from(lidx) * vcmdq_reg::STRIDE + off;
        u32::from_le_bytes(self.m.read(a, 4).try_into().unwrap())
    }

    /// The guest appends commands to queue 0's ring and bumps PROD (no doorbell yet).
    fn post(&mut self, cmds: &[[u64; 2]]) {
        let log2 = (RING_LEN / 16).trailing_zeros();
        for c in cmds {
            let idx = u64::from(self.prod & ((1 << log2) - 1));
            let b = cmd_bytes(&[*c]);
            self.m.write(self.m.hpa(RING + idx * 16), &b);
            self.prod = (self.prod + 1) & ((1 << (log2 + 1)) - 1);
        }
        self.wreg(0, vcmdq_reg::PROD, self.prod);
    }

    fn read_events(&self) -> Vec<(u32, Vec<u8>)> {
        let mut buf = [0u8; 4096];
        let n = self.evq.read(&mut buf).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        while at < n {
            let flags = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
            at += 8;
            if flags & veventq_type::FLAG_LOST_EVENTS != 0 {
                out.push((flags, Vec::new()));
                continue;
            }
            out.push((flags, buf[at..at + 16].to_vec()));
            at += 16;
        }
        out
    }
}

#[test]
fn hw_queue_flow_with_an_illegal_command_and_recovery() {
    let mut h = Hq::new();
    let q0 =
        h.c.hw_queue_alloc(
            0,
            h.viommu,
            hw_queue_type::TEGRA241_CMDQV,
            0,
            RING,
            RING_LEN,
        )
        .unwrap();
    // The ring's IOAS area is locked while the queue exists.
    let ioas = h.ioas;
    assert_eq!(h.c.ioas_unmap(ioas, 0, AREA), Err(Errno::EBUSY));
    // Not enabled until the guest sets CONFIG.EN; STATUS follows on the doorbell.
    assert_eq!(h.rreg(0, vcmdq_reg::STATUS), 0);
    h.wreg(0, vcmdq_reg::CONFIG, 1);
    h.kick();
    assert_eq!(h.rreg(0, vcmdq_reg::STATUS), 1);

    // A cached translation, a guest remap, and the invalidation through the HW queue.
    h.guest.map(VA, 0x20_0000, 0x1000);
    dma_write(&h.m, 0x33, VA, b"one").unwrap();
    h.guest.unmap(VA, 0x1000);
    h.guest.map(VA, 0x22_0000, 0x1000);
    dma_write(&h.m, 0x33, VA, b"two").unwrap();
    assert_eq!(
        h.m.read(h.m.hpa(0x20_0000), 3),
        b"two",
        "stale until invalidated"
    );
    let asid = h.guest.asid;
    h.post(&[gcmd::tlbi_nh_va(asid, VA), gcmd::sync()]);
    assert_eq!(h.kick(), 2);
    assert_eq!(
        h.rreg(0, vcmdq_reg::CONS),
        h.prod,
        "CONS caught up, no error"
    );
    dma_write(&h.m, 0x33, VA, b"three").unwrap();
    assert_eq!(h.m.read(h.m.hpa(0x22_0000), 5), b"three");

    // An illegal command (TLBI_NH_ALL is not a VCMDQ command) stops the queue at it.
    h.guest.unmap(VA, 0x1000);
    h.guest.map(VA, 0x24_0000, 0x1000);
    let before = h.prod;
    h.post(&[
        gcmd::tlbi_nh_asid(asid),
        gcmd::tlbi_nh_all(),
        gcmd::tlbi_nh_va(asid, VA),
        gcmd::sync(),
    ]);
    assert_eq!(h.kick(), 1, "the legal command before it is consumed");
    let cons = h.rreg(0, vcmdq_reg::CONS);
    assert_eq!(
        cons & 0x1ff,
        (before + 1) & 0x1ff,
        "CONS points at the bad command"
    );
    assert_eq!(get(q::CONS_ERR, u64::from(cons)), q::CERROR_ILL);
    let (g, gn) = (h.rreg(0, vcmdq_reg::GERROR), h.rreg(0, vcmdq_reg::GERRORN));
    assert_eq!((g ^ gn) & 1, 1, "GERROR toggled");
    // The NH_ASID before it took effect.
    dma_write(&h.m, 0x33, VA, b"four").unwrap();
    assert_eq!(h.m.read(h.m.hpa(0x24_0000), 4), b"four");
    // Reported: the LVCMDQ error map through the vEVENTQ.
    let ev = h.read_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, 0);
    assert_eq!(u64::from_le_bytes(ev[0].1[..8].try_into().unwrap()), 1);
    assert_eq!(u64::from_le_bytes(ev[0].1[8..].try_into().unwrap()), 0);
    // Nothing moves while the error is pending.
    assert_eq!(h.kick(), 0);
    // Recovery: the guest replaces the command with a CMD_SYNC and acknowledges.
    let bad = u64::from((before + 1) & 0xff);
    h.m.write(h.m.hpa(RING + bad * 16), &cmd_bytes(&[gcmd::sync()]));
    h.wreg(0, vcmdq_reg::GERRORN, g);
    h.guest.unmap(VA, 0x1000);
    h.guest.map(VA, 0x26_0000, 0x1000);
    assert_eq!(h.kick(), 3);
    assert_eq!(h.rreg(0, vcmdq_reg::CONS) & 0x1ff, h.prod);
    dma_write(&h.m, 0x33, VA, b"five").unwrap();
    assert_eq!(h.m.read(h.m.hpa(0x26_0000), 4), b"five");
    let v = h.vsmmu();
    assert_eq!(
        v.as_any().downcast_ref::<VSmmu>().unwrap().lvcmdq_err_map(),
        0
    );
    drop(v);

    // Unknown vSID in ATC_INV (and ATC_INV without ATS) is illegal too.
    h.post(&[gcmd::atc_inv(0x999)]);
    assert_eq!(h.kick(), 0);
    assert_eq!(
        get(q::CONS_ERR, u64::from(h.rreg(0, vcmdq_reg::CONS))),
        q::CERROR_ILL
    );
    h.c.destroy(q0).unwrap();
    assert_eq!(h.c.ioas_unmap(ioas, 0, AREA), Ok(AREA), "unlocked");
}

#[test]
fn hw_queue_validation_table() {
    let h = Hq::new();
    let c = &h.c;
    let ty = hw_queue_type::TEGRA241_CMDQV;
    // Index 1 before index 0: EIO.
    assert_eq!(
        c.hw_queue_alloc(0, h.viommu, ty, 1, RING, RING_LEN),
        Err(Errno::EIO)
    );
    // Index beyond the VINTF's queues: EINVAL.
    assert_eq!(
        c.hw_queue_alloc(0, h.viommu, ty, 2, RING, RING_LEN),
        Err(Errno::EINVAL)
    );
    // Length: not a power of two, below 32, above 2^(CMDQS + 4).
    for len in [0x1800, 16, 1 << 24] {
        assert_eq!(
            c.hw_queue_alloc(0, h.viommu, ty, 0, RING, len),
            Err(Errno::EINVAL),
            "length {len:#x}"
        );
    }
    // Base not aligned to the length.
    assert_eq!(
        c.hw_queue_alloc(0, h.viommu, ty, 0, RING + 0x800, RING_LEN),
        Err(Errno::EINVAL)
    );
    // Unknown type: EOPNOTSUPP (core: the driver does not support it).
    assert_eq!(
        c.hw_queue_alloc(0, h.viommu, 7, 0, RING, RING_LEN),
        Err(Errno::EOPNOTSUPP)
    );
    let q0 = c
        .hw_queue_alloc(0, h.viommu, ty, 0, RING, RING_LEN)
        .unwrap();
    // Slot taken: EEXIST.
    assert_eq!(
        c.hw_queue_alloc(0, h.viommu, ty, 0, RING + RING_LEN, RING_LEN),
        Err(Errno::EEXIST)
    );
    let q1 = c
        .hw_queue_alloc(0, h.viommu, ty, 1, RING + RING_LEN, 32)
        .unwrap();
    // Destroyed in reverse: queue 0 is busy while queue 1 depends on it; the vIOMMU too.
    assert_eq!(c.destroy(q0), Err(Errno::EBUSY));
    assert_eq!(c.destroy(h.viommu), Err(Errno::EBUSY));
    c.destroy(q1).unwrap();
    c.destroy(q0).unwrap();
    // An ARM_SMMUV3 vIOMMU has no HW queues.
    let plain = c
        .viommu_alloc(0, viommu_type::ARM_SMMUV3, h.dev_id, h.s2, &mut none_data())
        .unwrap();
    assert_eq!(
        c.hw_queue_alloc(0, plain, ty, 0, RING, RING_LEN),
        Err(Errno::EOPNOTSUPP)
    );
}

#[test]
fn cmdqv_viommu_alloc_errors_and_vintf_exhaustion() {
    let m = Machine::new(SmmuConfig::default(), cmdqv_opts());
    let c = Iommufd::new();
    let dev = m.master(1);
    let d = c
        .bind_device(
            Arc::clone(&dev) as Arc<dyn IommuDevice>,
            Some(KvmRef::new(vm(&kvm16()))),
        )
        .unwrap();
    let ioas = c.ioas_alloc(0).unwrap();
    let s2 = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            d,
            ioas,
            &mut none_data(),
            ObjectId(0),
        )
        .unwrap();
    let ty = viommu_type::TEGRA241_CMDQV;
    // No data: EINVAL; wrong data type or length: EINVAL.
    assert_eq!(
        c.viommu_alloc(0, ty, d, s2, &mut none_data()),
        Err(Errno::EINVAL)
    );
    let mut short = [0u8; 8];
    assert_eq!(
        c.viommu_alloc(0, ty, d, s2, &mut UserData::new(ty, &mut short)),
        Err(Errno::EINVAL)
    );
    let mut data = [0u8; 16];
    assert_eq!(
        c.viommu_alloc(0, ty, d, s2, &mut UserData::new(1, &mut data)),
        Err(Errno::EINVAL)
    );
    // VINTF 0 is the host's: 3 of 4 for vIOMMUs, then ENOSPC.
    let mut offsets = Vec::new();
    for _ in 0..3 {
        let mut data = [0u8; 16];
        c.viommu_alloc(0, ty, d, s2, &mut UserData::new(ty, &mut data))
            .unwrap();
        offsets.push(u64::from_le_bytes(data[..8].try_into().unwrap()));
    }
    offsets.dedup();
    assert_eq!(offsets.len(), 3, "distinct mmap windows");
    let objects = c.object_count();
    let mut data = [0u8; 16];
    assert_eq!(
        c.viommu_alloc(0, ty, d, s2, &mut UserData::new(ty, &mut data)),
        Err(Errno::ENOSPC)
    );
    assert_eq!(c.object_count(), objects);
    // GET_HW_INFO with the CMDQV type.
    let mut buf = [0u8; 8];
    let r = c
        .get_hw_info(
            hw_info::FLAG_INPUT_TYPE,
            d,
            hw_info::TYPE_TEGRA241_CMDQV,
            8,
            Some(&mut buf),
        )
        .unwrap();
    assert_eq!(r.out_data_type, hw_info::TYPE_TEGRA241_CMDQV);
    assert_eq!(r.data_len, 8);
    assert_eq!(buf[5], 1, "log2vcmdqs: 2 queues per VINTF");
    assert_eq!(buf[6], 4, "log2vsids: 16 SIDs per VINTF");
}

#[test]
fn vintf_sid_slots_run_out() {
    let m = Machine::new(
        SmmuConfig::default(),
        Options {
            cmdqv: Some(CmdqvConfig {
                sids_per_vintf: 2,
                ..CmdqvConfig::default()
            }),
            ..Options::default()
        },
    );
    let c = Iommufd::new();
    let kvm = kvm16();
    let vm = vm(&kvm);
    let mut devs = Vec::new();
    let mut ids = Vec::new();
    for sid in 0..3 {
        let dev = m.master(sid);
        ids.push(
            c.bind_device(
                Arc::clone(&dev) as Arc<dyn IommuDevice>,
                Some(KvmRef::new(Arc::clone(&vm))),
            )
            .unwrap(),
        );
        devs.push(dev);
    }
    let ioas = c.ioas_alloc(0).unwrap();
    let s2 = c
        .hwpt_alloc(
            hwpt_flags::NEST_PARENT,
            ids[0],
            ioas,
            &mut none_data(),
            ObjectId(0),
        )
        .unwrap();
    let ty = viommu_type::TEGRA241_CMDQV;
    let mut data = [0u8; 16];
    let v = c
        .viommu_alloc(0, ty, ids[0], s2, &mut UserData::new(ty, &mut data))
        .unwrap();
    let a = c.vdevice_alloc(v, ids[0], 1).unwrap();
    c.vdevice_alloc(v, ids[1], 2).unwrap();
    assert_eq!(c.vdevice_alloc(v, ids[2], 3), Err(Errno::ENOSPC));
    c.destroy(a).unwrap();
    c.vdevice_alloc(v, ids[2], 3).unwrap();
}

#[test]
fn a_consumer_thread_drains_the_ring_on_the_doorbell() {
    let mut h = Hq::new();
    h.c.hw_queue_alloc(
        0,
        h.viommu,
        hw_queue_type::TEGRA241_CMDQV,
        0,
        RING,
        RING_LEN,
    )
    .unwrap();
    let v = h.vsmmu();
    let consumer = v
        .as_any()
        .downcast_ref::<VSmmu>()
        .unwrap()
        .spawn_consumer()
        .unwrap();
    h.wreg(0, vcmdq_reg::CONFIG, 1);
    consumer.ring();
    let wait = |h: &Hq, off: u64, want: u32| {
        for _ in 0..2000 {
            if h.rreg(0, off) & 0xfffff == want {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("register {off:#x} never became {want:#x}");
    };
    wait(&h, vcmdq_reg::STATUS, 1);
    h.guest.map(VA, 0x20_0000, 0x1000);
    dma_write(&h.m, 0x33, VA, b"one").unwrap();
    h.guest.unmap(VA, 0x1000);
    h.guest.map(VA, 0x22_0000, 0x1000);
    let asid = h.guest.asid;
    for _ in 0..100 {
        // The guest waits for room in its ring (CONS is its view of the consumer).
        for _ in 0..2000 {
            let used = h.prod.wrapping_sub(h.rreg(0, vcmdq_reg::CONS)) & 0x1ff;
            if used <= 256 - 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        h.post(&[
            gcmd::tlbi_nh_va(asid, VA),
            gcmd::tlbi_nh_asid(asid),
            gcmd::sync(),
        ]);
        consumer.ring();
    }
    wait(&h, vcmdq_reg::CONS, h.prod);
    dma_write(&h.m, 0x33, VA, b"two").unwrap();
    assert_eq!(h.m.read(h.m.hpa(0x22_0000), 3), b"two");
    drop(consumer);
}
