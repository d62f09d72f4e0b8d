//! Design invariant 5 (no panic on any input) for the object layer: random sequences of every
//! operation with random IDs, flags, addresses and driver data. Whatever the errors, nothing
//! panics, object counts stay consistent, and closing the context leaves nothing pinned.
//! `TWINMMU_LONG=1` runs many more cases.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use proptest::prelude::*;
use twinmmu_iommufd::mock::{self, *};
use twinmmu_iommufd::*;

#[derive(Clone, Debug)]
enum Op {
    IoasAlloc,
    Destroy(u32),
    Map {
        flags: u32,
        ioas: u32,
        addr: u64,
        len: u64,
        iova: u64,
    },
    Unmap {
        ioas: u32,
        iova: u64,
        len: u64,
    },
    Copy {
        flags: u32,
        dst: u32,
        src: u32,
        len: u64,
        dst_iova: u64,
        src_iova: u64,
    },
    Allow {
        ioas: u32,
        start: u64,
        last: u64,
    },
    Reserve {
        ioas: u32,
        start: u64,
        len: u64,
    },
    MockDomain {
        pt: u32,
        flags: u32,
    },
    HwptAlloc {
        flags: u32,
        dev: u32,
        pt: u32,
        data_type: u32,
        data: Vec<u8>,
        fault: u32,
    },
    Attach {
        dev: u32,
        pasid: u32,
        pt: u32,
    },
    Replace {
        dev: u32,
        pasid: u32,
        pt: u32,
    },
    Detach {
        dev: u32,
        pasid: u32,
    },
    Viommu {
        ty: u32,
        dev: u32,
        hwpt: u32,
        data: Vec<u8>,
    },
    Vdevice {
        viommu: u32,
        dev: u32,
        virt: u64,
    },
    Veventq {
        viommu: u32,
        ty: u32,
        depth: u32,
    },
    HwQueue {
        viommu: u32,
        ty: u32,
        index: u32,
        iova: u64,
        len: u64,
    },
    Invalidate {
        id: u32,
        data_type: u32,
        entry_len: u32,
        entry_num: u32,
        data: Vec<u8>,
    },
    Fault,
    TriggerIopf {
        dev: u32,
        pasid: u32,
    },
    TriggerVevent {
        dev: u32,
    },
    Dirty {
        hwpt: u32,
        flags: u32,
        iova: u64,
        len: u64,
        page: u64,
    },
    Option {
        id: u32,
        op: u16,
        obj: u32,
        val: u64,
    },
    HwInfo {
        flags: u32,
        dev: u32,
        ty: u32,
        len: u32,
    },
    Mmap {
        off: u64,
        len: u64,
    },
    CloseFd(u32),
}

/// An object selector: values below 16 pick an existing object of the type the operation
/// wants (so sequences go deep), larger ones are raw IDs (any type, absent, tombstones).
fn id() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..16, 1 => 16u32..40]
}

fn pick(c: &Iommufd, ty: ObjectType, sel: u32) -> ObjectId {
    if sel >= 16 {
        return ObjectId(sel - 16);
    }
    let of: Vec<ObjectId> = (1..64)
        .map(ObjectId)
        .filter(|&i| c.object_type(i) == Some(ty))
        .collect();
    if of.is_empty() {
        ObjectId(sel)
    } else {
        of[sel as usize % of.len()]
    }
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..64).prop_map(|k| BUFFER + k * 2048),
        1 => any::<u64>(),
        1 => Just(u64::MAX),
    ]
}

fn iova() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..64).prop_map(|k| MOCK_APERTURE_START + k * 2048),
        2 => (0u64..64).prop_map(|k| k * 2048),
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (1u64..16).prop_map(|k| k * 2048),
        1 => 0u64..10_000,
        1 => any::<u64>(),
    ]
}

fn flags() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..16, 1 => any::<u32>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::IoasAlloc),
        2 => id().prop_map(Op::Destroy),
        4 => (flags(), id(), addr(), len(), iova()).prop_map(|(flags, ioas, addr, len, iova)| Op::Map { flags, ioas, addr, len, iova }),
        2 => (id(), iova(), len()).prop_map(|(ioas, iova, len)| Op::Unmap { ioas, iova, len }),
        2 => (flags(), id(), id(), len(), iova(), iova()).prop_map(|(flags, dst, src, len, dst_iova, src_iova)| Op::Copy { flags, dst, src, len, dst_iova, src_iova }),
        1 => (id(), iova(), iova()).prop_map(|(ioas, start, last)| Op::Allow { ioas, start, last }),
        1 => (id(), iova(), len()).prop_map(|(ioas, start, len)| Op::Reserve { ioas, start, len }),
        3 => (id(), 0u32..8).prop_map(|(pt, flags)| Op::MockDomain { pt, flags }),
        3 => (flags(), id(), id(), prop_oneof![Just(0u32), Just(IOMMU_HWPT_DATA_SELFTEST), any::<u32>()], prop::collection::vec(any::<u8>(), 0..8), id())
            .prop_map(|(flags, dev, pt, data_type, data, fault)| Op::HwptAlloc { flags, dev, pt, data_type, data, fault }),
        2 => (id(), prop_oneof![Just(0u32), 1u32..3000], id()).prop_map(|(dev, pasid, pt)| Op::Attach { dev, pasid, pt }),
        2 => (id(), prop_oneof![Just(0u32), 1u32..3000], id()).prop_map(|(dev, pasid, pt)| Op::Replace { dev, pasid, pt }),
        1 => (id(), prop_oneof![Just(0u32), 1u32..3000]).prop_map(|(dev, pasid)| Op::Detach { dev, pasid }),
        2 => (prop_oneof![Just(IOMMU_VIOMMU_TYPE_SELFTEST), any::<u32>()], id(), id(), prop::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(ty, dev, hwpt, data)| Op::Viommu { ty, dev, hwpt, data }),
        2 => (id(), id(), 0u64..4).prop_map(|(viommu, dev, virt)| Op::Vdevice { viommu, dev, virt }),
        1 => (id(), prop_oneof![Just(IOMMU_VEVENTQ_TYPE_SELFTEST), 0u32..3], 0u32..4).prop_map(|(viommu, ty, depth)| Op::Veventq { viommu, ty, depth }),
        2 => (id(), prop_oneof![Just(IOMMU_HW_QUEUE_TYPE_SELFTEST), 0u32..3], 0u32..3, iova(), len())
            .prop_map(|(viommu, ty, index, iova, len)| Op::HwQueue { viommu, ty, index, iova, len }),
        2 => (id(), prop_oneof![Just(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST), any::<u32>()], 0u32..20, 0u32..4, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(id, data_type, entry_len, entry_num, data)| Op::Invalidate { id, data_type, entry_len, entry_num, data }),
        1 => Just(Op::Fault),
        1 => (id(), prop_oneof![Just(0u32), 1u32..3000]).prop_map(|(dev, pasid)| Op::TriggerIopf { dev, pasid }),
        1 => id().prop_map(|dev| Op::TriggerVevent { dev }),
        1 => (id(), flags(), iova(), len(), prop_oneof![Just(0u64), Just(2048u64), Just(4096u64), any::<u64>()])
            .prop_map(|(hwpt, flags, iova, len, page)| Op::Dirty { hwpt, flags, iova, len, page }),
        1 => (0u32..3, 0u16..3, id(), 0u64..3).prop_map(|(id, op, obj, val)| Op::Option { id, op, obj, val }),
        1 => (0u32..3, id(), any::<u32>(), 0u32..32).prop_map(|(flags, dev, ty, len)| Op::HwInfo { flags, dev, ty, len }),
        1 => (prop_oneof![Just(4096u64), any::<u64>()], len()).prop_map(|(off, len)| Op::Mmap { off, len }),
        1 => id().prop_map(Op::CloseFd),
    ]
}

fn run(ops: &[Op]) {
    let env = Env::new();
    let c = &env.ictx;
    let mut fds: HashMap<u32, Box<dyn std::any::Any>> = HashMap::new();
    // A starting point that reaches every object type.
    let ioas = env.ioas();
    env.map_fixed(ioas, BUFFER, BUFFER_SIZE, MOCK_APERTURE_START)
        .unwrap();
    let (d, _) = env.mock_domain(ioas, MOCK_FLAGS_DEVICE_PASID).unwrap();
    env.selftest_viommu(d.dev_id, ioas);
    for op in ops {
        use ObjectType as T;
        let ioas = |s: u32| pick(c, T::Ioas, s);
        let dev = |s: u32| pick(c, T::Device, s);
        let hwpt = |s: u32| {
            pick(
                c,
                if s.is_multiple_of(2) {
                    T::HwptPaging
                } else {
                    T::HwptNested
                },
                s,
            )
        };
        let viommu = |s: u32| pick(c, T::Viommu, s);
        let pt = |s: u32| match s % 4 {
            0 => ioas(s),
            1 => viommu(s),
            _ => hwpt(s),
        };
        match op.clone() {
            Op::IoasAlloc => {
                let _ = c.ioas_alloc(0);
            }
            Op::Destroy(i) => {
                let _ = c.destroy(pick(
                    c,
                    [
                        T::Ioas,
                        T::HwptPaging,
                        T::HwptNested,
                        T::Viommu,
                        T::Vdevice,
                        T::HwQueue,
                        T::Selftest,
                        T::Fault,
                    ][i as usize % 8],
                    i,
                ));
            }
            Op::Map {
                flags,
                ioas: i_ioas,
                addr,
                len,
                iova,
            } => {
                let _ = c.ioas_map(flags, ioas(i_ioas), env.src(addr), len, iova);
            }
            Op::Unmap {
                ioas: i_ioas,
                iova,
                len,
            } => {
                let _ = c.ioas_unmap(ioas(i_ioas), iova, len);
            }
            Op::Copy {
                flags,
                dst,
                src,
                len,
                dst_iova,
                src_iova,
            } => {
                let _ = c.ioas_copy(flags, ioas(dst), ioas(src), len, dst_iova, src_iova);
            }
            Op::Allow {
                ioas: i_ioas,
                start,
                last,
            } => {
                let _ = c.ioas_allow_iovas(ioas(i_ioas), 1, &[IovaRange::new(start, last)]);
            }
            Op::Reserve {
                ioas: i_ioas,
                start,
                len,
            } => {
                let _ = c.ioas_add_reserved(ioas(i_ioas), start, len);
            }
            Op::MockDomain { pt: i_pt, flags } => {
                let _ = env.mock_domain(pt(i_pt), flags);
            }
            Op::HwptAlloc {
                flags,
                dev: i_dev,
                pt: i_pt,
                data_type,
                mut data,
                fault,
            } => {
                let mut d = UserData::new(data_type, &mut data);
                let _ = c.hwpt_alloc(
                    flags,
                    dev(i_dev),
                    pt(i_pt),
                    &mut d,
                    pick(c, T::Fault, fault),
                );
            }
            Op::Attach {
                dev: i_dev,
                pasid,
                pt: i_pt,
            } => {
                let _ = c.attach(dev(i_dev), pasid, pt(i_pt));
            }
            Op::Replace {
                dev: i_dev,
                pasid,
                pt: i_pt,
            } => {
                let _ = c.replace(dev(i_dev), pasid, pt(i_pt));
            }
            Op::Detach { dev: i_dev, pasid } => c.detach(dev(i_dev), pasid),
            Op::Viommu {
                ty,
                dev: i_dev,
                hwpt: i_hwpt,
                mut data,
            } => {
                let mut d = UserData::new(ty, &mut data);
                let _ = c.viommu_alloc(0, ty, dev(i_dev), hwpt(i_hwpt), &mut d);
            }
            Op::Vdevice {
                viommu: i_v,
                dev: i_dev,
                virt,
            } => {
                let _ = c.vdevice_alloc(viommu(i_v), dev(i_dev), virt);
            }
            Op::Veventq {
                viommu: i_v,
                ty,
                depth,
            } => {
                if let Ok(q) = c.veventq_alloc(0, viommu(i_v), ty, depth) {
                    let mut b = [0u8; 64];
                    let _ = q.read(&mut b);
                    fds.insert(q.id().raw(), Box::new(q));
                }
            }
            Op::HwQueue {
                viommu: i_v,
                ty,
                index,
                iova,
                len,
            } => {
                let _ = c.hw_queue_alloc(0, viommu(i_v), ty, index, iova, len);
            }
            Op::Invalidate {
                id,
                data_type,
                entry_len,
                entry_num,
                data,
            } => {
                let mut a = InvalidateArray::new(data_type, entry_len, entry_num, &data);
                let target = if id % 2 == 0 { viommu(id) } else { hwpt(id) };
                let _ = c.hwpt_invalidate(target, &mut a);
                assert!(a.entry_num <= entry_num);
            }
            Op::Fault => {
                if let Ok(f) = c.fault_alloc(0) {
                    fds.insert(f.id().raw(), Box::new(f));
                }
            }
            Op::TriggerIopf { dev: i_dev, pasid } => {
                let _ = mock::trigger_iopf(c, dev(i_dev), pasid, 1, fault::PERM_READ, 0);
                for f in fds.values() {
                    if let Some(f) = f.downcast_ref::<FaultFd>() {
                        let mut b = [0u8; 80];
                        if let Ok(n) = f.read(&mut b)
                            && n >= 40
                        {
                            let mut r = b[36..40].to_vec();
                            r.extend_from_slice(&0u32.to_le_bytes());
                            let _ = f.write(&r);
                        }
                    }
                }
            }
            Op::TriggerVevent { dev: i_dev } => {
                let _ = mock::trigger_vevent(c, dev(i_dev));
            }
            Op::Dirty {
                hwpt: i_hwpt,
                flags,
                iova,
                len,
                page,
            } => {
                let mut bm = vec![0xffu8; 64];
                let h = hwpt(i_hwpt & !1);
                let _ = mock::dirty(c, h, iova, len, page, &bm.clone());
                let _ = c.hwpt_set_dirty_tracking(flags & 3, h);
                let _ = c.hwpt_get_dirty_bitmap(h, flags & 1, iova, len, page, &mut bm);
            }
            Op::Option { id, op, obj, val } => {
                let _ = c.option(id, op, obj, val, true);
            }
            Op::HwInfo {
                flags,
                dev: i_dev,
                ty,
                len,
            } => {
                let mut b = vec![0u8; 16];
                let _ = c.get_hw_info(flags, dev(i_dev), ty, len, Some(&mut b));
            }
            Op::Mmap { off, len } => {
                if let Ok(r) = c.mmap(off, len, true, false) {
                    fds.insert(1000 + r.window().offset as u32, Box::new(r));
                }
            }
            Op::CloseFd(i) => {
                fds.remove(&i);
            }
        }
    }
    drop(fds);
    env.teardown();
}

fn cases() -> u32 {
    if std::env::var("TWINMMU_LONG").is_ok_and(|v| v == "1") {
        3000
    } else {
        128
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_operations_never_panic_and_release_everything(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}
