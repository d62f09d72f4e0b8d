//! The iommufd context: objects, their dependencies, and every operation of the ioctl set
//! (iommufd.md §3, §4). One lock guards the context; drivers are called under it and report
//! events through handles with their own locks (see `driver`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backing::{Backing, BackingKind};
use crate::driver::{
    Domain, HwQueueInit, IommuDevice, IommuDriver, KvmRef, MmapTable, MmapWindow, NestedDomain,
    PagingDomain, Viommu, ViommuAlloc, ViommuCore, ViommuShared, dev_key,
};
use crate::eventq::{FaultRoute, FaultShared, RouteEntry, VeventqShared};
use crate::iopt::{Iopt, PagesElm, ResvOwner, UnmapStop};
use crate::pages::Pages;
use crate::table::Table;
use crate::types::{
    dirty_flags, hw_info, hw_queue_type, hwpt_data, hwpt_flags, map_flags, option, veventq_type,
    vfio_ioas_op, viommu_type,
};
use crate::{
    Errno, InvalidateArray, IovaRange, NO_PASID, ObjectId, ObjectType, PAGE_SIZE, Prot, ULONG_MAX,
    UserData,
};

/// An in-kernel user of an IOAS that is not a domain (the kernel's `iommufd_access_ops`):
/// emulated devices, the selftest access, mdev-style drivers.
pub trait AccessOps: Send + Sync {
    /// `[iova, iova + length)` is being unmapped: release every pin taken inside it (through
    /// [`Iommufd::access_unpin_pages`]). Called without the context lock held.
    fn unmap(&self, ictx: &Iommufd, access: ObjectId, iova: u64, length: u64);
}

/// Where a mapping's memory comes from: a backing and the address of the first byte in it
/// (the user VA of IOMMU_IOAS_MAP, or the file offset of IOMMU_IOAS_MAP_FILE).
#[derive(Clone)]
pub struct MapSource {
    pub backing: Arc<dyn Backing>,
    pub addr: u64,
}

/// Result of IOMMU_IOAS_IOVA_RANGES.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IovaRanges {
    /// The entries written (at most the caller's capacity).
    pub ranges: Vec<IovaRange>,
    /// `num_iovas` written back: the total number of ranges.
    pub num_iovas: u32,
    pub out_iova_alignment: u64,
    /// EMSGSIZE when `num_iovas` exceeds the capacity (the struct is still written back).
    pub status: Result<(), Errno>,
}

/// Result of IOMMU_GET_HW_INFO (besides the bytes written to the caller's buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwInfoReply {
    /// The driver's data length (may exceed the caller's buffer).
    pub data_len: u32,
    pub out_data_type: u32,
    pub out_max_pasid_log2: u8,
    pub out_capabilities: u64,
}

/// IDs created by the selftest MOCK_DOMAIN op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelftestDomain {
    pub stdev_id: ObjectId,
    pub hwpt_id: ObjectId,
    pub dev_id: ObjectId,
}

struct Ioas {
    iopt: Iopt,
    /// HWPT_PAGING objects on this IOAS in creation order (the kernel's `hwpt_list`).
    hwpts: Vec<ObjectId>,
}

struct HwptPaging {
    ioas: ObjectId,
    domain: Arc<dyn PagingDomain>,
    driver: Arc<dyn IommuDriver>,
    nest_parent: bool,
    auto_domain: bool,
    pasid_compat: bool,
    fault: Option<ObjectId>,
}

struct HwptNested {
    /// The parent HWPT_PAGING (the vIOMMU's, for vIOMMU-based ones).
    parent: ObjectId,
    viommu: Option<ObjectId>,
    domain: Arc<dyn NestedDomain>,
    driver: Arc<dyn IommuDriver>,
    pasid_compat: bool,
    fault: Option<ObjectId>,
}

struct Device {
    dev: Arc<dyn IommuDevice>,
    driver: Arc<dyn IommuDriver>,
    kvm: Option<KvmRef>,
    group: (usize, u64),
    route: Arc<Mutex<FaultRoute>>,
    vdevice: Option<ObjectId>,
    /// pasid → HWPT this device is attached to.
    attaches: BTreeMap<u32, ObjectId>,
    /// IOASes holding this device's reserved regions (RID attachment to a paging parent).
    resv_ioas: Option<ObjectId>,
}

struct Access {
    ioas: Option<ObjectId>,
    ops: Option<Arc<dyn AccessOps>>,
    iova_alignment: u64,
    /// Set while the access moves or goes away: new pins are refused (ENOENT).
    pin_blocked: bool,
}

struct FaultObj {
    shared: Arc<FaultShared>,
}

struct ViommuObj {
    hwpt: ObjectId,
    /// The IOMMU instance of the device it was created for.
    instance: usize,
    ops: Arc<dyn Viommu>,
    core: ViommuCore,
    hw_queues: BTreeMap<u32, ObjectId>,
}

struct Vdevice {
    viommu: ObjectId,
    device: ObjectId,
    virt_id: u64,
}

struct Veventq {
    viommu: ObjectId,
    ty: u32,
    shared: Arc<VeventqShared>,
}

struct HwQueue {
    viommu: ObjectId,
    index: u32,
    access: ObjectId,
    /// Page-aligned IOVA range the internal access pinned and locked.
    pinned: (u64, u64),
    depends_on: Option<ObjectId>,
}

struct Selftest {
    device: ObjectId,
}

#[derive(Default)]
struct GroupAttach {
    hwpt: Option<ObjectId>,
    devices: BTreeSet<ObjectId>,
}

#[derive(Default)]
struct Group {
    pasid_attach: BTreeMap<u32, GroupAttach>,
}

struct Ctx {
    table: Table,
    ioas: HashMap<u32, Ioas>,
    hwpt_paging: HashMap<u32, HwptPaging>,
    hwpt_nested: HashMap<u32, HwptNested>,
    devices: HashMap<u32, Device>,
    accesses: HashMap<u32, Access>,
    faults: HashMap<u32, FaultObj>,
    viommus: HashMap<u32, ViommuObj>,
    vdevices: HashMap<u32, Vdevice>,
    veventqs: HashMap<u32, Veventq>,
    hw_queues: HashMap<u32, HwQueue>,
    selftests: HashMap<u32, Selftest>,
    groups: HashMap<(usize, u64), Group>,
    account_mm: bool,
    vfio_compat: Option<ObjectId>,
    next_handle: u64,
    mmap: Arc<Mutex<MmapTable>>,
}

pub(crate) struct Inner {
    ctx: Mutex<Ctx>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ctx.get_mut().release();
    }
}

/// An iommufd context (an open `/dev/iommu`). Cloning gives another handle to the same
/// context (a dup'd fd); the context is released (§4.5) when the last handle, fault fd,
/// vEVENTQ fd and mmap region are gone.
#[derive(Clone)]
pub struct Iommufd {
    inner: Arc<Inner>,
}

impl Default for Iommufd {
    fn default() -> Self {
        Self::new()
    }
}

/// (domain, driver, pasid compatible, fault) of a HWPT.
type HwptView = (Domain, Arc<dyn IommuDriver>, bool, Option<ObjectId>);

fn driver_type(d: &Arc<dyn IommuDriver>) -> std::any::TypeId {
    d.as_any().type_id()
}

impl Ctx {
    fn new() -> Self {
        Ctx {
            table: Table::default(),
            ioas: HashMap::new(),
            hwpt_paging: HashMap::new(),
            hwpt_nested: HashMap::new(),
            devices: HashMap::new(),
            accesses: HashMap::new(),
            faults: HashMap::new(),
            viommus: HashMap::new(),
            vdevices: HashMap::new(),
            veventqs: HashMap::new(),
            hw_queues: HashMap::new(),
            selftests: HashMap::new(),
            groups: HashMap::new(),
            account_mm: false,
            vfio_compat: None,
            next_handle: 1,
            mmap: Arc::new(Mutex::new(MmapTable::default())),
        }
    }

    fn ioas_mut(&mut self, id: ObjectId) -> Result<&mut Ioas, Errno> {
        self.table.check(id, ObjectType::Ioas)?;
        self.ioas.get_mut(&id.0).ok_or(Errno::ENOENT)
    }

    fn paging(&self, id: ObjectId) -> Result<&HwptPaging, Errno> {
        self.table.check(id, ObjectType::HwptPaging)?;
        self.hwpt_paging.get(&id.0).ok_or(Errno::ENOENT)
    }

    fn device(&self, id: ObjectId) -> Result<&Device, Errno> {
        self.table.check(id, ObjectType::Device)?;
        self.devices.get(&id.0).ok_or(Errno::ENOENT)
    }

    /// §4.5: destroy every object with users == 1, ascending, until nothing is left.
    fn release(&mut self) {
        loop {
            let ids = self.table.ids();
            if ids.is_empty() {
                break;
            }
            let mut destroyed = 0;
            let mut live = 0;
            for id in ids {
                match self.table.slots.get(&id.0) {
                    Some(crate::table::Slot::Tombstone) => {
                        self.table.release(id);
                        destroyed += 1;
                    }
                    Some(crate::table::Slot::Object { users: 1, .. }) => {
                        self.destroy_object(id);
                        destroyed += 1;
                    }
                    Some(_) => live += 1,
                    None => {}
                }
            }
            if destroyed == 0 && live != 0 {
                // A users-count cycle would be a bug; force the rest down rather than leak.
                for id in self.table.ids() {
                    self.destroy_object(id);
                }
            }
        }
    }

    /// Tear down one object (its users are already down to the table's) and free its ID.
    fn destroy_object(&mut self, id: ObjectId) {
        let Some(crate::table::Slot::Object { ty, .. }) = self.table.slots.get(&id.0).copied()
        else {
            self.table.release(id);
            return;
        };
        match ty {
            ObjectType::Ioas => {
                if let Some(mut ioas) = self.ioas.remove(&id.0) {
                    let mut unmapped = 0;
                    let _ = ioas.iopt.unmap_range(0, ULONG_MAX, &mut unmapped);
                }
                if self.vfio_compat == Some(id) {
                    self.vfio_compat = None;
                }
            }
            ObjectType::HwptPaging => {
                if let Some(h) = self.hwpt_paging.remove(&id.0) {
                    if let Some(ioas) = self.ioas.get_mut(&h.ioas.0) {
                        ioas.iopt.remove_domain(id);
                        ioas.hwpts.retain(|&x| x != id);
                    }
                    self.table.put(h.ioas);
                    if let Some(f) = h.fault {
                        self.table.put(f);
                    }
                }
            }
            ObjectType::HwptNested => {
                if let Some(h) = self.hwpt_nested.remove(&id.0) {
                    match h.viommu {
                        Some(v) => self.table.put(v),
                        None => self.table.put(h.parent),
                    }
                    if let Some(f) = h.fault {
                        self.table.put(f);
                    }
                }
            }
            ObjectType::Fault => {
                if let Some(f) = self.faults.remove(&id.0) {
                    f.shared.auto_respond_all();
                }
            }
            ObjectType::Viommu => {
                if let Some(v) = self.viommus.remove(&id.0) {
                    v.ops.destroy();
                    // Windows the driver did not unregister die with it.
                    self.mmap.lock().windows.retain(|_, w| w.owner != id);
                    self.table.put(v.hwpt);
                }
            }
            ObjectType::Vdevice => self.vdevice_teardown(id),
            ObjectType::Veventq => {
                if let Some(q) = self.veventqs.remove(&id.0) {
                    q.shared.clear();
                    if let Some(v) = self.viommus.get(&q.viommu.0) {
                        v.core.inner.eventqs.lock().remove(&q.ty);
                    }
                    self.table.put(q.viommu);
                }
            }
            ObjectType::HwQueue => {
                if let Some(q) = self.hw_queues.remove(&id.0) {
                    if let Some(v) = self.viommus.get_mut(&q.viommu.0) {
                        v.ops.hw_queue_destroy(q.index);
                        v.hw_queues.remove(&q.index);
                    }
                    self.access_unpin_locked(q.access, q.pinned.0, q.pinned.1, true);
                    self.table.put(q.access);
                    self.access_teardown(q.access);
                    if let Some(prev) = q.depends_on {
                        self.table.put(prev);
                    }
                    self.table.put(q.viommu);
                }
            }
            ObjectType::Access => self.access_teardown(id),
            ObjectType::Selftest => {
                if let Some(s) = self.selftests.remove(&id.0) {
                    self.unbind_locked(s.device);
                }
            }
            ObjectType::Device => {
                self.unbind_locked(id);
            }
        }
        self.table.release(id);
    }

    fn vdevice_teardown(&mut self, id: ObjectId) {
        let Some(vd) = self.vdevices.remove(&id.0) else {
            return;
        };
        let dev = self.devices.get_mut(&vd.device.0);
        let handle = dev.map(|d| {
            d.vdevice = None;
            Arc::clone(&d.dev)
        });
        if let Some(v) = self.viommus.get(&vd.viommu.0) {
            if let Some(dev) = &handle {
                v.ops.vdevice_destroy(vd.virt_id, dev);
            }
            let mut t = v.core.inner.vdevs.lock();
            if let Some(dev) = t.by_virt.remove(&vd.virt_id) {
                t.by_dev.remove(&dev_key(&dev));
            }
        }
        self.table.put(vd.viommu);
    }

    fn access_teardown(&mut self, id: ObjectId) {
        if let Some(a) = self.accesses.remove(&id.0)
            && let Some(ioas_id) = a.ioas
        {
            if let Some(ioas) = self.ioas.get_mut(&ioas_id.0) {
                ioas.iopt.accesses.remove(&id);
                let _ = ioas.iopt.calculate_alignment();
            }
            self.table.put(ioas_id);
        }
        self.table.release(id);
    }

    /// Drop a HWPT reference taken by an attachment; an auto domain goes away with its last
    /// attachment (`iommufd_hw_pagetable_put`).
    fn hwpt_put(&mut self, id: ObjectId) {
        self.table.put(id);
        let auto = self.hwpt_paging.get(&id.0).is_some_and(|h| h.auto_domain);
        if auto && self.table.users(id) == 1 {
            self.destroy_object(id);
        }
    }

    fn hwpt_domain(&self, id: ObjectId) -> Option<HwptView> {
        if let Some(h) = self.hwpt_paging.get(&id.0) {
            return Some((
                Domain::Paging(Arc::clone(&h.domain)),
                Arc::clone(&h.driver),
                h.pasid_compat,
                h.fault,
            ));
        }
        self.hwpt_nested.get(&id.0).map(|h| {
            (
                Domain::Nested(Arc::clone(&h.domain)),
                Arc::clone(&h.driver),
                h.pasid_compat,
                h.fault,
            )
        })
    }

    /// The paging HWPT behind `id` (`find_hwpt_paging`): itself, or a nested one's parent.
    fn find_hwpt_paging(&self, id: ObjectId) -> Option<ObjectId> {
        if self.hwpt_paging.contains_key(&id.0) {
            return Some(id);
        }
        self.hwpt_nested.get(&id.0).map(|h| h.parent)
    }

    fn pasid_compat_of(&self, id: ObjectId) -> bool {
        self.hwpt_domain(id).is_some_and(|d| d.2)
    }

    /// `iommufd_hwpt_pasid_compat`.
    fn check_pasid_compat(
        &self,
        hwpt: ObjectId,
        group: (usize, u64),
        pasid: u32,
    ) -> Result<(), Errno> {
        let g = self.groups.get(&group);
        let compat = self.pasid_compat_of(hwpt);
        if pasid == NO_PASID {
            let any_pasid = g.is_some_and(|g| g.pasid_attach.keys().any(|&p| p != NO_PASID));
            if !compat && any_pasid {
                return Err(Errno::EINVAL);
            }
        } else {
            if !compat {
                return Err(Errno::EINVAL);
            }
            if let Some(rid) = g
                .and_then(|g| g.pasid_attach.get(&NO_PASID))
                .and_then(|a| a.hwpt)
                && !self.pasid_compat_of(rid)
            {
                return Err(Errno::EINVAL);
            }
        }
        Ok(())
    }

    fn route_update(
        &mut self,
        dev_id: ObjectId,
        pasid: u32,
        hwpt: Option<ObjectId>,
    ) -> Option<RouteEntry> {
        let entry = hwpt.map(|h| {
            let handle = self.next_handle;
            self.next_handle += 1;
            let nested = self.hwpt_nested.contains_key(&h.0);
            let fault = self
                .hwpt_domain(h)
                .and_then(|d| d.3)
                .and_then(|f| self.faults.get(&f.0))
                .map(|f| Arc::clone(&f.shared));
            RouteEntry {
                handle,
                nested,
                fault,
            }
        });
        let dev = self.devices.get(&dev_id.0)?;
        let mut r = dev.route.lock();
        let old = match entry {
            Some(e) => r.attaches.insert(pasid, e),
            None => r.attaches.remove(&pasid),
        };
        drop(r);
        // Groups still queued or awaiting a response through the old handle are answered.
        if let Some(old) = &old
            && let Some(f) = &old.fault
        {
            f.auto_respond_handle(old.handle);
        }
        old
    }

    /// Reserve the device's reserved regions in the IOAS of `hwpt_paging` (RID attach).
    fn attach_resv(&mut self, dev_id: ObjectId, hwpt_paging: ObjectId) -> Result<bool, Errno> {
        let Some(ioas_id) = self.hwpt_paging.get(&hwpt_paging.0).map(|h| h.ioas) else {
            return Ok(false);
        };
        let dev = self.device(dev_id)?;
        if dev.resv_ioas == Some(ioas_id) {
            return Ok(false);
        }
        let regions = dev.dev.reserved_regions();
        let ioas = self.ioas.get_mut(&ioas_id.0).ok_or(Errno::ENOENT)?;
        for r in regions {
            if let Err(e) = ioas
                .iopt
                .reserve(r.start, r.last, ResvOwner::Device(dev_id))
            {
                ioas.iopt.remove_reserved(ResvOwner::Device(dev_id));
                return Err(e);
            }
        }
        if let Some(d) = self.devices.get_mut(&dev_id.0) {
            d.resv_ioas = Some(ioas_id);
        }
        Ok(true)
    }

    fn remove_resv(&mut self, dev_id: ObjectId) {
        let Some(d) = self.devices.get_mut(&dev_id.0) else {
            return;
        };
        if let Some(ioas_id) = d.resv_ioas.take()
            && let Some(ioas) = self.ioas.get_mut(&ioas_id.0)
        {
            ioas.iopt.remove_reserved(ResvOwner::Device(dev_id));
        }
    }

    /// The driver call for a device joining `hwpt` on `pasid` (replacing `old`).
    fn driver_attach(
        &self,
        dev_id: ObjectId,
        pasid: u32,
        hwpt: ObjectId,
        old: Option<ObjectId>,
    ) -> Result<(), Errno> {
        let dev = self.device(dev_id)?;
        let (domain, hdrv, _, _) = self.hwpt_domain(hwpt).ok_or(Errno::ENOENT)?;
        // iommu core: a domain of another driver is incompatible.
        if driver_type(&hdrv) != driver_type(&dev.driver) {
            return Err(Errno::EINVAL);
        }
        if pasid != NO_PASID {
            let log2 = u32::from(dev.dev.max_pasid_log2());
            if log2 == 0 || (log2 < 32 && pasid >= (1u32 << log2)) {
                return Err(Errno::EINVAL);
            }
        }
        let old_domain = old.and_then(|o| self.hwpt_domain(o)).map(|d| d.0);
        dev.driver
            .attach_dev(&dev.dev, pasid, &domain, old_domain.as_ref())
    }

    /// `iommufd_hw_pagetable_attach`.
    fn hwpt_attach(&mut self, hwpt: ObjectId, dev_id: ObjectId, pasid: u32) -> Result<(), Errno> {
        let group = self.device(dev_id)?.group;
        let (old_hwpt, already) = {
            let g = self.groups.get(&group);
            let a = g.and_then(|g| g.pasid_attach.get(&pasid));
            (
                a.and_then(|a| a.hwpt),
                a.is_some_and(|a| a.devices.contains(&dev_id)),
            )
        };
        if already {
            return Err(Errno::EBUSY);
        }
        if old_hwpt.is_some_and(|o| o != hwpt) {
            return Err(Errno::EINVAL);
        }
        let paging = self.find_hwpt_paging(hwpt);
        let mut resv_added = false;
        if pasid == NO_PASID
            && let Some(p) = paging
        {
            resv_added = self.attach_resv(dev_id, p)?;
        }
        // iommufd_hwpt_attach_device runs for the group's first device only: the PASID
        // compatibility check, then the driver. The model asks the driver to attach every
        // device as it joins (a group is the set of its bound devices).
        let first = old_hwpt.is_none();
        let r = if first {
            self.check_pasid_compat(hwpt, group, pasid)
        } else {
            Ok(())
        };
        if let Err(e) = r.and_then(|_| self.driver_attach(dev_id, pasid, hwpt, None)) {
            if resv_added {
                self.remove_resv(dev_id);
            }
            return Err(e);
        }
        let g = self.groups.entry(group).or_default();
        let a = g.pasid_attach.entry(pasid).or_default();
        a.hwpt = Some(hwpt);
        a.devices.insert(dev_id);
        self.table.get(hwpt);
        if let Some(d) = self.devices.get_mut(&dev_id.0) {
            d.attaches.insert(pasid, hwpt);
        }
        self.route_update(dev_id, pasid, Some(hwpt));
        Ok(())
    }

    /// `iommufd_hw_pagetable_detach`: returns the HWPT to put.
    fn hwpt_detach(&mut self, dev_id: ObjectId, pasid: u32) -> Option<ObjectId> {
        let dev = self.devices.get(&dev_id.0)?;
        let group = dev.group;
        let hwpt = *dev.attaches.get(&pasid)?;
        let (domain, _, _, _) = self.hwpt_domain(hwpt)?;
        dev.driver.detach_dev(&dev.dev, pasid, &domain);
        if let Some(g) = self.groups.get_mut(&group) {
            if let Some(a) = g.pasid_attach.get_mut(&pasid) {
                a.devices.remove(&dev_id);
                if a.devices.is_empty() {
                    g.pasid_attach.remove(&pasid);
                }
            }
            if g.pasid_attach.is_empty() {
                self.groups.remove(&group);
            }
        }
        if let Some(d) = self.devices.get_mut(&dev_id.0) {
            d.attaches.remove(&pasid);
        }
        if pasid == NO_PASID {
            self.remove_resv(dev_id);
        }
        self.route_update(dev_id, pasid, None);
        Some(hwpt)
    }

    /// `iommufd_device_do_replace`: returns the old HWPT to put (None for a no-op).
    fn hwpt_replace(
        &mut self,
        hwpt: ObjectId,
        dev_id: ObjectId,
        pasid: u32,
    ) -> Result<Option<ObjectId>, Errno> {
        let group = self.device(dev_id)?.group;
        let (old_hwpt, devices) = {
            let a = self
                .groups
                .get(&group)
                .and_then(|g| g.pasid_attach.get(&pasid))
                .ok_or(Errno::EINVAL)?;
            (a.hwpt, a.devices.clone())
        };
        if !devices.contains(&dev_id) {
            return Err(Errno::EINVAL);
        }
        let old = old_hwpt.ok_or(Errno::EINVAL)?;
        if old == hwpt {
            return Ok(None);
        }
        // Reserved regions move to the new paging parent's IOAS for RID replaces, then
        // iommufd_hwpt_replace_device checks PASID compatibility and asks the driver.
        let mut moved_resv: Vec<(ObjectId, Option<ObjectId>)> = Vec::new();
        if pasid == NO_PASID
            && let Some(p) = self.find_hwpt_paging(hwpt)
        {
            let new_ioas = self.hwpt_paging.get(&p.0).map(|h| h.ioas);
            for &d in &devices {
                let prev = self.devices.get(&d.0).and_then(|x| x.resv_ioas);
                if prev == new_ioas {
                    continue;
                }
                self.remove_resv(d);
                match self.attach_resv(d, p) {
                    Ok(_) => moved_resv.push((d, prev)),
                    Err(e) => {
                        self.remove_resv(d);
                        self.restore_resv(d, prev);
                        for (d, prev) in moved_resv {
                            self.remove_resv(d);
                            self.restore_resv(d, prev);
                        }
                        return Err(e);
                    }
                }
            }
        }
        if let Err(e) = self.check_pasid_compat(hwpt, group, pasid) {
            for (d, prev) in moved_resv {
                self.remove_resv(d);
                self.restore_resv(d, prev);
            }
            return Err(e);
        }
        let mut done: Vec<ObjectId> = Vec::new();
        for &d in &devices {
            if let Err(e) = self.driver_attach(d, pasid, hwpt, Some(old)) {
                for &p in &done {
                    let _ = self.driver_attach(p, pasid, old, Some(hwpt));
                }
                for (d, prev) in moved_resv {
                    self.remove_resv(d);
                    self.restore_resv(d, prev);
                }
                return Err(e);
            }
            done.push(d);
        }
        if let Some(a) = self
            .groups
            .get_mut(&group)
            .and_then(|g| g.pasid_attach.get_mut(&pasid))
        {
            a.hwpt = Some(hwpt);
        }
        for &d in &devices {
            self.table.get(hwpt);
            if let Some(x) = self.devices.get_mut(&d.0) {
                x.attaches.insert(pasid, hwpt);
            }
            self.route_update(d, pasid, Some(hwpt));
        }
        // The attachments' references move to the new HWPT; the caller puts one for us.
        for _ in 1..devices.len() {
            self.table.put(old);
        }
        Ok(Some(old))
    }

    fn restore_resv(&mut self, dev_id: ObjectId, ioas: Option<ObjectId>) {
        let Some(ioas_id) = ioas else { return };
        let Some(p) = self
            .ioas
            .get(&ioas_id.0)
            .and_then(|i| i.hwpts.first().copied())
        else {
            return;
        };
        let _ = self.attach_resv(dev_id, p);
    }

    /// `iommufd_hwpt_paging_alloc`: a reserved HWPT_PAGING with the domain loaded.
    fn hwpt_paging_alloc(
        &mut self,
        ioas_id: ObjectId,
        dev_id: ObjectId,
        flags: u32,
        data: Option<&mut UserData<'_>>,
        auto_domain: bool,
        immediate_attach: Option<u32>,
    ) -> Result<ObjectId, Errno> {
        let valid = hwpt_flags::NEST_PARENT
            | hwpt_flags::DIRTY_TRACKING
            | hwpt_flags::FAULT_ID_VALID
            | hwpt_flags::PASID;
        if flags & !valid != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let (dev, driver) = {
            let d = self.device(dev_id)?;
            (Arc::clone(&d.dev), Arc::clone(&d.driver))
        };
        if flags & hwpt_flags::DIRTY_TRACKING != 0
            && dev.capabilities() & hw_info::CAP_DIRTY_TRACKING == 0
        {
            return Err(Errno::EOPNOTSUPP);
        }
        if flags & hwpt_flags::FAULT_ID_VALID != 0 && flags & hwpt_flags::NEST_PARENT != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let id = self.table.reserve(ObjectType::HwptPaging)?;
        let domain =
            match driver.domain_alloc_paging(&dev, flags & !hwpt_flags::FAULT_ID_VALID, data) {
                Ok(d) => d,
                Err(e) => {
                    self.table.release(id);
                    return Err(e);
                }
            };
        if !self.ioas.contains_key(&ioas_id.0) {
            self.table.release(id);
            return Err(Errno::ENOENT);
        }
        self.table.get(ioas_id);
        self.hwpt_paging.insert(
            id.0,
            HwptPaging {
                ioas: ioas_id,
                domain: Arc::clone(&domain),
                driver,
                nest_parent: flags & hwpt_flags::NEST_PARENT != 0,
                auto_domain,
                pasid_compat: flags & hwpt_flags::PASID != 0,
                fault: None,
            },
        );
        let abort = |c: &mut Ctx| {
            c.hwpt_paging.remove(&id.0);
            c.table.put(ioas_id);
            c.table.release(id);
        };
        // immediate_attach: the attach-through-an-IOAS path attaches the device before the
        // domain is loaded (iommufd_hwpt_paging_alloc), so its errors come first.
        if let Some(pasid) = immediate_attach
            && let Err(e) = self.hwpt_attach(id, dev_id, pasid)
        {
            abort(self);
            return Err(e);
        }
        let added = match self.ioas.get_mut(&ioas_id.0) {
            Some(ioas) => ioas.iopt.add_domain(id, domain),
            None => Err(Errno::ENOENT),
        };
        if let Err(e) = added {
            if let Some(pasid) = immediate_attach
                && self.hwpt_detach(dev_id, pasid).is_some()
            {
                self.table.put(id);
            }
            abort(self);
            return Err(e);
        }
        if let Some(ioas) = self.ioas.get_mut(&ioas_id.0) {
            ioas.hwpts.push(id);
        }
        Ok(id)
    }

    /// Attach (or replace) through an IOAS: reuse an auto domain, else make one
    /// (`iommufd_device_auto_get_domain`).
    fn auto_get_domain(
        &mut self,
        dev_id: ObjectId,
        pasid: u32,
        ioas_id: ObjectId,
        replace: bool,
    ) -> Result<(ObjectId, Option<ObjectId>), Errno> {
        let candidates: Vec<ObjectId> = self
            .ioas
            .get(&ioas_id.0)
            .map(|i| i.hwpts.clone())
            .unwrap_or_default();
        for h in candidates {
            if !self.hwpt_paging.get(&h.0).is_some_and(|x| x.auto_domain) {
                continue;
            }
            let r = if replace {
                self.hwpt_replace(h, dev_id, pasid)
            } else {
                self.hwpt_attach(h, dev_id, pasid).map(|_| None)
            };
            match r {
                Ok(old) => return Ok((h, old)),
                Err(Errno::EINVAL) => continue,
                Err(e) => return Err(e),
            }
        }
        if !replace {
            let h = self.hwpt_paging_alloc(ioas_id, dev_id, 0, None, true, Some(pasid))?;
            self.table.finalize(h);
            return Ok((h, None));
        }
        let h = self.hwpt_paging_alloc(ioas_id, dev_id, 0, None, true, None)?;
        match self.hwpt_replace(h, dev_id, pasid) {
            Ok(old) => {
                self.table.finalize(h);
                Ok((h, old))
            }
            Err(e) => {
                self.destroy_object(h);
                Err(e)
            }
        }
    }

    /// `iommufd_device_change_pt`.
    fn change_pt(
        &mut self,
        dev_id: ObjectId,
        pasid: u32,
        pt_id: ObjectId,
        replace: bool,
    ) -> Result<ObjectId, Errno> {
        self.device(dev_id)?;
        let ty = self.table.type_of(pt_id).ok_or(Errno::ENOENT)?;
        let (hwpt, old) = match ty {
            ObjectType::HwptPaging | ObjectType::HwptNested => {
                if replace {
                    (pt_id, self.hwpt_replace(pt_id, dev_id, pasid)?)
                } else {
                    self.hwpt_attach(pt_id, dev_id, pasid)?;
                    (pt_id, None)
                }
            }
            ObjectType::Ioas => self.auto_get_domain(dev_id, pasid, pt_id, replace)?,
            _ => return Err(Errno::EINVAL),
        };
        if let Some(old) = old {
            self.hwpt_put(old);
        }
        Ok(hwpt)
    }

    fn unbind_locked(&mut self, dev_id: ObjectId) {
        let Some(dev) = self.devices.get(&dev_id.0) else {
            return;
        };
        let pasids: Vec<u32> = dev.attaches.keys().copied().collect();
        for p in pasids {
            if let Some(h) = self.hwpt_detach(dev_id, p) {
                self.hwpt_put(h);
                self.table.put(dev_id);
            }
        }
        if let Some(v) = self.devices.get(&dev_id.0).and_then(|d| d.vdevice) {
            // §3.17: the vDEVICE dies with its device and leaves a tombstone.
            self.vdevice_teardown(v);
            self.table.tombstone(v);
        }
        if let Some(d) = self.devices.remove(&dev_id.0) {
            d.route.lock().bound = false;
            d.driver.device_unbound(&d.dev);
        }
        self.table.release(dev_id);
    }

    fn access_unpin_locked(&mut self, access: ObjectId, iova: u64, length: u64, lock: bool) {
        let Some(ioas_id) = self.accesses.get(&access.0).and_then(|a| a.ioas) else {
            return;
        };
        let Some(ioas) = self.ioas.get_mut(&ioas_id.0) else {
            return;
        };
        let Some(last) = iova.checked_add(length.wrapping_sub(1)) else {
            return;
        };
        if length == 0 {
            return;
        }
        if let Ok(segs) = ioas.iopt.contig(iova, last) {
            for (k, cur, l) in segs {
                ioas.iopt.area_unpin_access(k, cur, l, lock);
            }
        }
    }

    /// `iommufd_access_pin_pages`, returning the physical address of each page.
    fn access_pin_locked(
        &mut self,
        access: ObjectId,
        iova: u64,
        length: u64,
        write: bool,
        lock: bool,
    ) -> Result<Vec<u64>, Errno> {
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
        let ioas_id = self
            .accesses
            .get(&access.0)
            .filter(|a| !a.pin_blocked)
            .and_then(|a| a.ioas)
            .ok_or(Errno::ENOENT)?;
        let ioas = self.ioas.get_mut(&ioas_id.0).ok_or(Errno::ENOENT)?;
        let segs = ioas.iopt.contig(iova, last);
        let mut out = Vec::new();
        let mut done: Vec<(u64, u64, u64)> = Vec::new();
        let res = (|| {
            let segs = segs?;
            let n = segs.len();
            for (i, &(k, cur, l)) in segs.iter().enumerate() {
                let a = &ioas.iopt.areas[&k];
                // iopt_area_contig_is_aligned: page aligned at the start, and a page end
                // where the range continues into the next area.
                let start_ok = a.start_byte_at(cur) % PAGE_SIZE == 0;
                let end_ok = i + 1 == n || a.start_byte_at(l) % PAGE_SIZE == PAGE_SIZE - 1;
                if a.prevent_access || !start_ok || !end_ok {
                    return Err(Errno::EINVAL);
                }
                if (write && !a.prot.write) || (!write && !a.prot.read) {
                    return Err(Errno::EPERM);
                }
                out.extend(ioas.iopt.area_pin_access(k, cur, l, lock)?);
                done.push((k, cur, l));
            }
            Ok(())
        })();
        if let Err(e) = res {
            for (k, cur, l) in done {
                ioas.iopt.area_unpin_access(k, cur, l, lock);
            }
            return Err(e);
        }
        Ok(out)
    }
}

/// A FAULT queue's file (`[iommufd-pgfault]`): holds the FAULT object and the context.
pub struct FaultFd {
    ctx: Arc<Inner>,
    id: ObjectId,
    shared: Arc<FaultShared>,
}

impl FaultFd {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    /// `read()` at file position `pos` (≠ 0 → ESPIPE).
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        if pos != 0 {
            return Err(Errno::ESPIPE);
        }
        self.shared.read(buf)
    }
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        self.read_at(0, buf)
    }
    pub fn write_at(&self, pos: u64, buf: &[u8]) -> Result<usize, Errno> {
        if pos != 0 {
            return Err(Errno::ESPIPE);
        }
        self.shared.write(buf)
    }
    pub fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        self.write_at(0, buf)
    }
    /// poll(): POLLIN when a group is queued (POLLOUT is always set).
    pub fn readable(&self) -> bool {
        self.shared.readable()
    }
    /// (queued groups, groups awaiting a response)
    pub fn pending(&self) -> (usize, usize) {
        self.shared.pending()
    }
}

impl Drop for FaultFd {
    fn drop(&mut self) {
        self.ctx.ctx.lock().table.put(self.id);
    }
}

/// A vEVENTQ's file (`[iommufd-viommu-event]`): holds the vEVENTQ object and the context.
pub struct VeventqFd {
    ctx: Arc<Inner>,
    id: ObjectId,
    shared: Arc<VeventqShared>,
}

impl VeventqFd {
    pub fn id(&self) -> ObjectId {
        self.id
    }
    /// `read()` at file position `pos` (≠ 0 → ESPIPE): whole records while they fit.
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        if pos != 0 {
            return Err(Errno::ESPIPE);
        }
        Ok(self.shared.read(buf))
    }
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        self.read_at(0, buf)
    }
    /// poll(): POLLIN when non-empty.
    pub fn readable(&self) -> bool {
        self.shared.readable()
    }
}

impl Drop for VeventqFd {
    fn drop(&mut self) {
        self.ctx.ctx.lock().table.put(self.id);
    }
}

/// A mapping of a driver's mmap window (the VMA): holds its owner (a vIOMMU) and the context.
pub struct MmapRegion {
    ctx: Arc<Inner>,
    window: MmapWindow,
}

impl MmapRegion {
    pub fn window(&self) -> MmapWindow {
        self.window
    }
    pub fn base_pa(&self) -> u64 {
        self.window.base_pa
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        self.ctx.ctx.lock().table.put(self.window.owner);
    }
}

impl Iommufd {
    /// Open a context.
    pub fn new() -> Self {
        Iommufd {
            inner: Arc::new(Inner {
                ctx: Mutex::new(Ctx::new()),
            }),
        }
    }

    /// IOMMU_DESTROY (§3.1, §4.3): ENOENT unless a live object; EBUSY while used.
    pub fn destroy(&self, id: ObjectId) -> Result<(), Errno> {
        let mut c = self.inner.ctx.lock();
        if c.table.type_of(id).is_none() {
            return Err(Errno::ENOENT);
        }
        if c.table.users(id) != 1 {
            return Err(Errno::EBUSY);
        }
        c.destroy_object(id);
        Ok(())
    }

    /// IOMMU_IOAS_ALLOC.
    pub fn ioas_alloc(&self, flags: u32) -> Result<ObjectId, Errno> {
        if flags != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut c = self.inner.ctx.lock();
        let id = c.table.reserve(ObjectType::Ioas)?;
        c.ioas.insert(
            id.0,
            Ioas {
                iopt: Iopt::default(),
                hwpts: Vec::new(),
            },
        );
        c.table.finalize(id);
        Ok(id)
    }

    /// IOMMU_IOAS_IOVA_RANGES with room for `capacity` entries (§3.3).
    pub fn ioas_iova_ranges(&self, ioas_id: ObjectId, capacity: u32) -> Result<IovaRanges, Errno> {
        let mut c = self.inner.ctx.lock();
        let ioas = c.ioas_mut(ioas_id)?;
        let holes = ioas.iopt.reserved_holes();
        let total = u32::try_from(holes.len()).unwrap_or(u32::MAX);
        Ok(IovaRanges {
            ranges: holes.into_iter().take(capacity as usize).collect(),
            num_iovas: total,
            out_iova_alignment: ioas.iopt.iova_alignment,
            status: if total > capacity {
                Err(Errno::EMSGSIZE)
            } else {
                Ok(())
            },
        })
    }

    /// IOMMU_IOAS_ALLOW_IOVAS (§3.4). `ranges` is what could be read of the user's array:
    /// fewer than `num_iovas` entries faults (EFAULT) at the first missing one.
    pub fn ioas_allow_iovas(
        &self,
        ioas_id: ObjectId,
        num_iovas: u32,
        ranges: &[IovaRange],
    ) -> Result<(), Errno> {
        let mut c = self.inner.ctx.lock();
        let ioas = c.ioas_mut(ioas_id)?;
        let mut new: BTreeMap<u64, u64> = BTreeMap::new();
        for i in 0..num_iovas as usize {
            let r = ranges.get(i).ok_or(Errno::EFAULT)?;
            if r.start >= r.last {
                return Err(Errno::EINVAL);
            }
            let overlaps = new
                .range(..=r.last)
                .next_back()
                .is_some_and(|(_, &l)| l >= r.start);
            if overlaps {
                return Err(Errno::EINVAL);
            }
            new.insert(r.start, r.last);
        }
        for (&s, &l) in &new {
            if ioas.iopt.reserved_intersects(s, l) {
                return Err(Errno::EADDRINUSE);
            }
        }
        ioas.iopt.allowed = new;
        Ok(())
    }

    /// IOMMU_IOAS_MAP (backing kind User) / IOMMU_IOAS_MAP_FILE (kind File), §3.5. Returns the
    /// IOVA. `iova` is only read with `map_flags::FIXED_IOVA`.
    pub fn ioas_map(
        &self,
        flags: u32,
        ioas_id: ObjectId,
        src: MapSource,
        length: u64,
        iova: u64,
    ) -> Result<u64, Errno> {
        if flags & !map_flags::ALL != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if iova == ULONG_MAX || length == ULONG_MAX {
            return Err(Errno::EOVERFLOW);
        }
        if flags & (map_flags::READABLE | map_flags::WRITEABLE) == 0 {
            return Err(Errno::EINVAL);
        }
        let mut c = self.inner.ctx.lock();
        let ioas = c.ioas_mut(ioas_id)?;
        if src.backing.kind() == BackingKind::File
            && length != 0
            && src.addr.checked_add(length - 1).is_none()
        {
            return Err(Errno::EOVERFLOW);
        }
        let pages = Pages::new(
            src.backing,
            src.addr,
            length,
            flags & map_flags::WRITEABLE != 0,
        )?;
        let elm = PagesElm {
            start_byte: pages.first_byte(),
            pages: Arc::new(pages),
            length,
        };
        let fixed = (flags & map_flags::FIXED_IOVA != 0).then_some(iova);
        ioas.iopt
            .map_pages(&[elm], length, fixed, Prot::from_map_flags(flags))
    }

    /// IOMMU_IOAS_COPY (§3.6). Returns the destination IOVA.
    #[allow(clippy::too_many_arguments)]
    pub fn ioas_copy(
        &self,
        flags: u32,
        dst_ioas_id: ObjectId,
        src_ioas_id: ObjectId,
        length: u64,
        dst_iova: u64,
        src_iova: u64,
    ) -> Result<u64, Errno> {
        if flags & !map_flags::ALL != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if length == ULONG_MAX || src_iova == ULONG_MAX || dst_iova == ULONG_MAX {
            return Err(Errno::EOVERFLOW);
        }
        if flags & (map_flags::READABLE | map_flags::WRITEABLE) == 0 {
            return Err(Errno::EINVAL);
        }
        let mut c = self.inner.ctx.lock();
        let elms = c.ioas_mut(src_ioas_id)?.iopt.get_pages(src_iova, length)?;
        let dst = c.ioas_mut(dst_ioas_id)?;
        let fixed = (flags & map_flags::FIXED_IOVA != 0).then_some(dst_iova);
        dst.iopt
            .map_pages(&elms, length, fixed, Prot::from_map_flags(flags))
    }

    /// IOMMU_IOAS_UNMAP (§3.7). `iova == 0 && length == u64::MAX` unmaps everything. Returns
    /// the bytes unmapped. Accesses pinning an area are asked to unmap (without the lock)
    /// and the walk retried; EDEADLK after 100 futile tries.
    pub fn ioas_unmap(&self, ioas_id: ObjectId, iova: u64, length: u64) -> Result<u64, Errno> {
        let all = iova == 0 && length == u64::MAX;
        let range = if all {
            Ok((0, ULONG_MAX))
        } else if iova == ULONG_MAX || length == ULONG_MAX {
            Err(Errno::EOVERFLOW)
        } else if length == 0 {
            Err(Errno::EINVAL)
        } else {
            iova.checked_add(length - 1)
                .map(|last| (iova, last))
                .ok_or(Errno::EOVERFLOW)
        };
        // The IOAS lookup (ENOENT) comes before the argument checks; it is repeated on
        // every pass below, under the same lock as the walk.
        let (mut start, last) = match range {
            Ok(r) => r,
            Err(e) => {
                self.inner.ctx.lock().ioas_mut(ioas_id)?;
                return Err(e);
            }
        };
        let mut unmapped = 0u64;
        let mut tries = 0u32;
        loop {
            let stop = {
                let mut c = self.inner.ctx.lock();
                let ioas = c.ioas_mut(ioas_id)?;
                match ioas.iopt.unmap_range(start, last, &mut unmapped) {
                    Ok(()) => return Ok(unmapped),
                    Err(UnmapStop::Err(Errno::ENOENT)) if all && unmapped == 0 => return Ok(0),
                    Err(UnmapStop::Err(e)) => return Err(e),
                    Err(UnmapStop::NotifyAccesses {
                        iova: a_iova,
                        length: a_len,
                    }) => {
                        if a_iova != start {
                            tries = 0;
                        }
                        start = a_iova;
                        let ids: Vec<ObjectId> = ioas.iopt.accesses.keys().copied().collect();
                        let ops: Vec<(ObjectId, Arc<dyn AccessOps>)> = ids
                            .iter()
                            .filter_map(|id| {
                                c.accesses
                                    .get(&id.0)
                                    .and_then(|a| a.ops.clone())
                                    .map(|o| (*id, o))
                            })
                            .collect();
                        (ops, a_iova, a_len)
                    }
                }
            };
            let (ops, a_iova, a_len) = stop;
            for (id, op) in ops {
                op.unmap(self, id, a_iova, a_len);
            }
            tries += 1;
            if tries > 100 {
                return Err(Errno::EDEADLK);
            }
        }
    }

    /// IOMMU_OPTION (§3.8). Returns `val64` (written back on success).
    pub fn option(
        &self,
        option_id: u32,
        op: u16,
        object_id: u32,
        val64: u64,
        cap_sys_resource: bool,
    ) -> Result<u64, Errno> {
        let mut c = self.inner.ctx.lock();
        match option_id {
            option::RLIMIT_MODE => {
                if object_id != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                match op {
                    option::OP_GET => Ok(u64::from(c.account_mm)),
                    option::OP_SET => {
                        if !cap_sys_resource {
                            return Err(Errno::EPERM);
                        }
                        if !c.table.is_empty() {
                            return Err(Errno::EBUSY);
                        }
                        match val64 {
                            0 => c.account_mm = false,
                            1 => c.account_mm = true,
                            _ => return Err(Errno::EINVAL),
                        }
                        Ok(val64)
                    }
                    _ => Err(Errno::EOPNOTSUPP),
                }
            }
            option::HUGE_PAGES => {
                let ioas = c.ioas_mut(ObjectId(object_id))?;
                match op {
                    option::OP_GET => Ok(u64::from(!ioas.iopt.disable_large_pages)),
                    option::OP_SET => match val64 {
                        0 => {
                            let iopt = &mut ioas.iopt;
                            if iopt.disable_large_pages {
                                return Ok(0);
                            }
                            if !iopt.domains.is_empty() && !iopt.areas.is_empty() {
                                return Err(Errno::EINVAL);
                            }
                            iopt.disable_large_pages = true;
                            if let Err(e) = iopt.calculate_alignment() {
                                iopt.disable_large_pages = false;
                                return Err(e);
                            }
                            Ok(0)
                        }
                        1 => {
                            ioas.iopt.disable_large_pages = false;
                            let _ = ioas.iopt.calculate_alignment();
                            Ok(1)
                        }
                        _ => Err(Errno::EINVAL),
                    },
                    _ => Err(Errno::EOPNOTSUPP),
                }
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// IOMMU_VFIO_IOAS (§3.9). GET returns the compat IOAS id.
    pub fn vfio_ioas(&self, op: u16, ioas_id: ObjectId) -> Result<ObjectId, Errno> {
        let mut c = self.inner.ctx.lock();
        match op {
            vfio_ioas_op::GET => c.vfio_compat.ok_or(Errno::ENODEV),
            vfio_ioas_op::SET => {
                c.ioas_mut(ioas_id)?;
                c.vfio_compat = Some(ioas_id);
                Ok(ioas_id)
            }
            vfio_ioas_op::CLEAR => {
                c.vfio_compat = None;
                Ok(ioas_id)
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// The VFIO compat IOAS, if set.
    pub fn vfio_compat_ioas(&self) -> Option<ObjectId> {
        self.inner.ctx.lock().vfio_compat
    }

    /// IOMMU_IOAS_CHANGE_PROCESS (§3.18): EINVAL unless every area is a file mapping. This
    /// model keeps no per-process pin accounting, so success changes nothing else.
    pub fn ioas_change_process(&self) -> Result<(), Errno> {
        let c = self.inner.ctx.lock();
        for ioas in c.ioas.values() {
            if ioas
                .iopt
                .areas
                .values()
                .any(|a| a.pages.kind() != BackingKind::File)
            {
                return Err(Errno::EINVAL);
            }
        }
        Ok(())
    }

    /// IOMMU_TEST_OP_ADD_RESERVED (§5.2): reserve `[start, start + length - 1]` (no overflow
    /// check, as in the kernel); EADDRINUSE if an area or allowed range meets it.
    pub fn ioas_add_reserved(
        &self,
        ioas_id: ObjectId,
        start: u64,
        length: u64,
    ) -> Result<(), Errno> {
        let mut c = self.inner.ctx.lock();
        let ioas = c.ioas_mut(ioas_id)?;
        ioas.iopt.reserve(
            start,
            start.wrapping_add(length).wrapping_sub(1),
            ResvOwner::Test,
        )
    }

    /// Bind a device to this context (VFIO_DEVICE_BIND_IOMMUFD / the selftest op), with the
    /// KVM of the VM it will be assigned to (RFC v3). Returns the DEVICE id. The binder holds
    /// a reference until [`Iommufd::unbind_device`], so IOMMU_DESTROY of a DEVICE is EBUSY.
    pub fn bind_device(
        &self,
        dev: Arc<dyn IommuDevice>,
        kvm: Option<KvmRef>,
    ) -> Result<ObjectId, Errno> {
        let mut c = self.inner.ctx.lock();
        self.bind_locked(&mut c, dev, kvm)
    }

    fn bind_locked(
        &self,
        c: &mut Ctx,
        dev: Arc<dyn IommuDevice>,
        kvm: Option<KvmRef>,
    ) -> Result<ObjectId, Errno> {
        let key = dev_key(&dev);
        if c.devices.values().any(|d| dev_key(&d.dev) == key) {
            // iommu_device_claim_dma_owner: already owned.
            return Err(Errno::EBUSY);
        }
        let driver = dev.iommu();
        let id = c.table.reserve(ObjectType::Device)?;
        let route = Arc::new(Mutex::new(FaultRoute::new(
            id,
            Arc::clone(&dev),
            Arc::clone(&driver),
        )));
        driver.device_bound(
            &dev,
            crate::driver::DeviceEvents {
                inner: Arc::clone(&route),
            },
        );
        let group = (crate::driver::driver_key(&driver), dev.group());
        c.devices.insert(
            id.0,
            Device {
                dev,
                driver,
                kvm,
                group,
                route,
                vdevice: None,
                attaches: BTreeMap::new(),
                resv_ioas: None,
            },
        );
        c.table.finalize(id);
        c.table.get(id); // the binder's reference
        Ok(id)
    }

    /// Unbind a device bound with [`Iommufd::bind_device`]: detach every PASID, destroy its
    /// vDEVICE (leaving a tombstone), free the DEVICE object. ENOENT if not a DEVICE; EBUSY for
    /// a device a SELFTEST object bound (destroy that object instead).
    pub fn unbind_device(&self, dev_id: ObjectId) -> Result<(), Errno> {
        let mut c = self.inner.ctx.lock();
        c.device(dev_id)?;
        // A device bound by a SELFTEST object is unbound by destroying that object.
        if c.selftests.values().any(|s| s.device == dev_id) {
            return Err(Errno::EBUSY);
        }
        c.unbind_locked(dev_id);
        Ok(())
    }

    /// Attach a device (RID with `NO_PASID`, or a PASID) to a HWPT or, through an auto
    /// domain, to an IOAS (§4.4). Returns the HWPT id now attached.
    pub fn attach(&self, dev_id: ObjectId, pasid: u32, pt_id: ObjectId) -> Result<ObjectId, Errno> {
        let mut c = self.inner.ctx.lock();
        let h = c.change_pt(dev_id, pasid, pt_id, false)?;
        c.table.get(dev_id); // the "attached" reference (pairs with detach)
        Ok(h)
    }

    /// Replace the HWPT attached on `pasid` (§4.4): EINVAL if nothing is attached there.
    pub fn replace(
        &self,
        dev_id: ObjectId,
        pasid: u32,
        pt_id: ObjectId,
    ) -> Result<ObjectId, Errno> {
        let mut c = self.inner.ctx.lock();
        c.change_pt(dev_id, pasid, pt_id, true)
    }

    /// Detach `pasid`; a silent no-op if it is not attached.
    pub fn detach(&self, dev_id: ObjectId, pasid: u32) {
        let mut c = self.inner.ctx.lock();
        if let Some(h) = c.hwpt_detach(dev_id, pasid) {
            c.hwpt_put(h);
            c.table.put(dev_id);
        }
    }

    /// The HWPT attached to `dev_id` on `pasid`, if any.
    pub fn attached_hwpt(&self, dev_id: ObjectId, pasid: u32) -> Option<ObjectId> {
        let c = self.inner.ctx.lock();
        c.devices.get(&dev_id.0)?.attaches.get(&pasid).copied()
    }

    /// IOMMU_HWPT_ALLOC (§3.10). `data` carries `data_type`, `data_len` and the user buffer
    /// (`UserData { data_type: hwpt_data::NONE, len: 0, buf: None }` for none).
    pub fn hwpt_alloc(
        &self,
        flags: u32,
        dev_id: ObjectId,
        pt_id: ObjectId,
        data: &mut UserData<'_>,
        fault_id: ObjectId,
    ) -> Result<ObjectId, Errno> {
        if (data.data_type == hwpt_data::NONE && data.len != 0)
            || (data.data_type != hwpt_data::NONE && data.len == 0)
        {
            return Err(Errno::EINVAL);
        }
        let mut c = self.inner.ctx.lock();
        let (dev, driver) = {
            let d = c.device(dev_id)?;
            (Arc::clone(&d.dev), Arc::clone(&d.driver))
        };
        let ty = c.table.type_of(pt_id).ok_or(Errno::EINVAL)?;
        let id = match ty {
            ObjectType::Ioas => {
                let data = (data.len != 0).then_some(data);
                c.hwpt_paging_alloc(pt_id, dev_id, flags, data, false, None)?
            }
            ObjectType::HwptPaging => {
                if flags & !(hwpt_flags::FAULT_ID_VALID | hwpt_flags::PASID) != 0
                    || data.len == 0
                    || !driver.supports_nested()
                {
                    return Err(Errno::EOPNOTSUPP);
                }
                let parent = c.hwpt_paging.get(&pt_id.0).ok_or(Errno::ENOENT)?;
                if parent.auto_domain
                    || !parent.nest_parent
                    || driver_type(&parent.driver) != driver_type(&driver)
                {
                    return Err(Errno::EINVAL);
                }
                let parent_domain = Arc::clone(&parent.domain);
                let id = c.table.reserve(ObjectType::HwptNested)?;
                let domain = match driver.domain_alloc_nested(
                    &dev,
                    &parent_domain,
                    flags & !hwpt_flags::FAULT_ID_VALID,
                    data,
                ) {
                    Ok(d) => d,
                    Err(e) => {
                        c.table.release(id);
                        return Err(e);
                    }
                };
                c.table.get(pt_id);
                c.hwpt_nested.insert(
                    id.0,
                    HwptNested {
                        parent: pt_id,
                        viommu: None,
                        domain,
                        driver: Arc::clone(&driver),
                        pasid_compat: flags & hwpt_flags::PASID != 0,
                        fault: None,
                    },
                );
                id
            }
            ObjectType::Viommu => {
                let v = c.viommus.get(&pt_id.0).ok_or(Errno::ENOENT)?;
                if v.instance != crate::driver::driver_key(&driver) {
                    return Err(Errno::EINVAL);
                }
                if flags & !(hwpt_flags::FAULT_ID_VALID | hwpt_flags::PASID) != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                if data.len == 0 || !v.ops.supports_nested() {
                    return Err(Errno::EOPNOTSUPP);
                }
                let (ops, parent) = (Arc::clone(&v.ops), v.hwpt);
                let id = c.table.reserve(ObjectType::HwptNested)?;
                let domain =
                    match ops.alloc_domain_nested(flags & !hwpt_flags::FAULT_ID_VALID, data) {
                        Ok(d) => d,
                        Err(e) => {
                            c.table.release(id);
                            return Err(e);
                        }
                    };
                c.table.get(pt_id);
                c.hwpt_nested.insert(
                    id.0,
                    HwptNested {
                        parent,
                        viommu: Some(pt_id),
                        domain,
                        driver: Arc::clone(&driver),
                        pasid_compat: flags & hwpt_flags::PASID != 0,
                        fault: None,
                    },
                );
                id
            }
            _ => return Err(Errno::EINVAL),
        };
        if flags & hwpt_flags::FAULT_ID_VALID != 0 {
            if c.table.check(fault_id, ObjectType::Fault).is_err() {
                c.destroy_object(id);
                return Err(Errno::ENOENT);
            }
            c.table.get(fault_id);
            if let Some(h) = c.hwpt_paging.get_mut(&id.0) {
                h.fault = Some(fault_id);
            } else if let Some(h) = c.hwpt_nested.get_mut(&id.0) {
                h.fault = Some(fault_id);
            }
        }
        c.table.finalize(id);
        Ok(id)
    }

    /// IOMMU_GET_HW_INFO (§3.11). The driver's data is copied into `buf` (the first
    /// `data_len` bytes; the tail of the caller's `data_len` zero-filled; EFAULT if `buf`
    /// is shorter than `data_len`).
    pub fn get_hw_info(
        &self,
        flags: u32,
        dev_id: ObjectId,
        in_data_type: u32,
        data_len: u32,
        buf: Option<&mut [u8]>,
    ) -> Result<HwInfoReply, Errno> {
        if flags & !hw_info::FLAG_INPUT_TYPE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let in_type = if flags & hw_info::FLAG_INPUT_TYPE != 0 {
            in_data_type
        } else {
            hw_info::TYPE_DEFAULT
        };
        let c = self.inner.ctx.lock();
        let dev = c.device(dev_id)?;
        let info = dev.driver.hw_info(&dev.dev, in_type)?;
        if info.data_type == hw_info::TYPE_DEFAULT {
            return Err(Errno::EOPNOTSUPP);
        }
        let want = data_len as usize;
        if want != 0 {
            let dst = buf.and_then(|b| b.get_mut(..want)).ok_or(Errno::EFAULT)?;
            let n = want.min(info.data.len());
            dst[..n].copy_from_slice(&info.data[..n]);
            dst[n..].fill(0);
        }
        let log2 = dev.dev.max_pasid_log2();
        let mut caps = dev.dev.capabilities() & hw_info::CAP_DIRTY_TRACKING;
        if log2 != 0 {
            caps |= dev.dev.capabilities()
                & (hw_info::CAP_PCI_PASID_EXEC | hw_info::CAP_PCI_PASID_PRIV);
        }
        Ok(HwInfoReply {
            data_len: u32::try_from(info.data.len()).unwrap_or(u32::MAX),
            out_data_type: info.data_type,
            out_max_pasid_log2: log2,
            out_capabilities: caps,
        })
    }

    /// IOMMU_HWPT_SET_DIRTY_TRACKING (§3.12).
    pub fn hwpt_set_dirty_tracking(&self, flags: u32, hwpt_id: ObjectId) -> Result<(), Errno> {
        if flags & !dirty_flags::ENABLE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut c = self.inner.ctx.lock();
        let h = c.paging(hwpt_id)?;
        if !h.domain.supports_dirty_tracking() {
            return Err(Errno::EOPNOTSUPP);
        }
        let domain = Arc::clone(&h.domain);
        let ioas_id = h.ioas;
        if flags & dirty_flags::ENABLE != 0 {
            // iopt_clear_dirty_data: clear what is recorded, then turn tracking on.
            let ioas = c.ioas_mut(ioas_id)?;
            for a in ioas.iopt.areas.values() {
                let _ = domain.read_and_clear_dirty(a.iova, a.length(), false, None);
            }
            domain.set_dirty_tracking(true)
        } else {
            domain.set_dirty_tracking(false)
        }
    }

    /// IOMMU_HWPT_GET_DIRTY_BITMAP (§3.13): sets bit i of `bitmap` for each dirty
    /// `page_size` unit at `iova + i * page_size` (bits are only set). Errors found during the
    /// walk stop it but are not returned, as in the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn hwpt_get_dirty_bitmap(
        &self,
        hwpt_id: ObjectId,
        flags: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), Errno> {
        if flags & !dirty_flags::NO_CLEAR != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut c = self.inner.ctx.lock();
        let h = c.paging(hwpt_id)?;
        let domain = Arc::clone(&h.domain);
        let ioas_id = h.ioas;
        let ioas = c.ioas_mut(ioas_id)?;
        let align = ioas.iopt.iova_alignment;
        let last = iova
            .checked_add(length.wrapping_sub(1))
            .ok_or(Errno::EOVERFLOW)?;
        let end = last.wrapping_add(1);
        if iova & (align - 1) != 0 || end & (align - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        if page_size == 0 {
            return Err(Errno::EINVAL);
        }
        if iova & (page_size - 1) != 0 || end & (page_size - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        if !domain.supports_dirty_tracking() {
            return Err(Errno::EOPNOTSUPP);
        }
        let nbits = length.div_ceil(page_size);
        if (bitmap.len() as u64) < nbits.div_ceil(8) {
            return Err(Errno::EFAULT);
        }
        let no_clear = flags & dirty_flags::NO_CLEAR != 0;
        let Ok(segs) = ioas.iopt.contig(iova, last) else {
            return Ok(());
        };
        let mut record = |d_iova: u64, d_len: u64| {
            if d_len == 0 {
                return;
            }
            let lo = d_iova.max(iova);
            let hi = d_iova.saturating_add(d_len - 1).min(last);
            if lo > hi {
                return;
            }
            for bit in (lo - iova) / page_size..=(hi - iova) / page_size {
                bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        };
        for (_, cur, l) in segs {
            if domain
                .read_and_clear_dirty(cur, l - cur + 1, no_clear, Some(&mut record))
                .is_err()
            {
                break;
            }
        }
        Ok(())
    }

    /// IOMMU_HWPT_INVALIDATE (§3.14). `array.entry_num` is set to the number of entries
    /// handled, also on failure (0 on the early errors).
    pub fn hwpt_invalidate(
        &self,
        hwpt_id: ObjectId,
        array: &mut InvalidateArray<'_>,
    ) -> Result<(), Errno> {
        let requested = array.entry_num;
        array.entry_num = 0;
        if requested != 0 && (array.data.is_none() || array.entry_len == 0) {
            return Err(Errno::EINVAL);
        }
        let c = self.inner.ctx.lock();
        let ty = c.table.type_of(hwpt_id).ok_or(Errno::ENOENT)?;
        // The driver reports how many entries it handled; without a driver call it is 0.
        array.entry_num = requested;
        let ran = match ty {
            ObjectType::HwptNested => c
                .hwpt_nested
                .get(&hwpt_id.0)
                .map(|h| Arc::clone(&h.domain))
                .filter(|d| d.supports_cache_invalidate_user())
                .map(|d| d.cache_invalidate_user(array)),
            ObjectType::Viommu => c
                .viommus
                .get(&hwpt_id.0)
                .map(|v| Arc::clone(&v.ops))
                .filter(|v| v.supports_cache_invalidate())
                .map(|v| v.cache_invalidate(array)),
            _ => {
                array.entry_num = 0;
                return Err(Errno::EINVAL);
            }
        };
        match ran {
            Some(r) => r,
            None => {
                array.entry_num = 0;
                Err(Errno::EOPNOTSUPP)
            }
        }
    }

    /// IOMMU_FAULT_QUEUE_ALLOC (§3.15): a FAULT object and its fd.
    pub fn fault_alloc(&self, flags: u32) -> Result<FaultFd, Errno> {
        if flags != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut c = self.inner.ctx.lock();
        let id = c.table.reserve(ObjectType::Fault)?;
        let shared = Arc::new(FaultShared::default());
        c.faults.insert(
            id.0,
            FaultObj {
                shared: Arc::clone(&shared),
            },
        );
        c.table.finalize(id);
        c.table.get(id); // the fd's reference
        Ok(FaultFd {
            ctx: Arc::clone(&self.inner),
            id,
            shared,
        })
    }

    /// IOMMU_VIOMMU_ALLOC (§3.16). `data.len == 0` means no driver data.
    pub fn viommu_alloc(
        &self,
        flags: u32,
        viommu_type: u32,
        dev_id: ObjectId,
        hwpt_id: ObjectId,
        data: &mut UserData<'_>,
    ) -> Result<ObjectId, Errno> {
        if flags != 0 || viommu_type == viommu_type::DEFAULT {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut c = self.inner.ctx.lock();
        let (dev, driver, kvm) = {
            let d = c.device(dev_id)?;
            (Arc::clone(&d.dev), Arc::clone(&d.driver), d.kvm.clone())
        };
        if !driver.viommu_supported(&dev, viommu_type) {
            return Err(Errno::EOPNOTSUPP);
        }
        let parent = c.paging(hwpt_id)?;
        if !parent.nest_parent {
            return Err(Errno::EINVAL);
        }
        let parent_domain = Arc::clone(&parent.domain);
        let id = c.table.reserve(ObjectType::Viommu)?;
        let core = ViommuCore {
            inner: Arc::new(ViommuShared {
                id,
                vdevs: Mutex::new(Default::default()),
                eventqs: Mutex::new(BTreeMap::new()),
                mmap: Arc::clone(&c.mmap),
            }),
        };
        let req = ViommuAlloc {
            dev: &dev,
            viommu_type,
            parent: &parent_domain,
            kvm: kvm.as_ref(),
            data: if data.len != 0 { Some(data) } else { None },
            core: core.clone(),
        };
        let ops = match driver.viommu_alloc(req) {
            Ok(v) => v,
            Err(e) => {
                c.mmap.lock().windows.retain(|_, w| w.owner != id);
                c.table.release(id);
                return Err(e);
            }
        };
        c.table.get(hwpt_id);
        c.viommus.insert(
            id.0,
            ViommuObj {
                hwpt: hwpt_id,
                instance: crate::driver::driver_key(&driver),
                ops,
                core,
                hw_queues: BTreeMap::new(),
            },
        );
        c.table.finalize(id);
        Ok(id)
    }

    /// IOMMU_VDEVICE_ALLOC (§3.17).
    pub fn vdevice_alloc(
        &self,
        viommu_id: ObjectId,
        dev_id: ObjectId,
        virt_id: u64,
    ) -> Result<ObjectId, Errno> {
        // virt_id > ULONG_MAX cannot happen with a 64-bit unsigned long.
        let mut c = self.inner.ctx.lock();
        c.table.check(viommu_id, ObjectType::Viommu)?;
        let (dev, driver, existing) = {
            let d = c.device(dev_id)?;
            (Arc::clone(&d.dev), Arc::clone(&d.driver), d.vdevice)
        };
        let v = c.viommus.get(&viommu_id.0).ok_or(Errno::ENOENT)?;
        if v.instance != crate::driver::driver_key(&driver) {
            return Err(Errno::EINVAL);
        }
        if existing.is_some() {
            return Err(Errno::EEXIST);
        }
        let (ops, core) = (Arc::clone(&v.ops), v.core.clone());
        let id = c.table.reserve(ObjectType::Vdevice)?;
        {
            let mut t = core.inner.vdevs.lock();
            if t.by_virt.contains_key(&virt_id) {
                drop(t);
                c.table.release(id);
                return Err(Errno::EEXIST);
            }
            t.by_virt.insert(virt_id, Arc::clone(&dev));
            t.by_dev.insert(dev_key(&dev), virt_id);
        }
        if let Err(e) = ops.vdevice_init(virt_id, &dev) {
            let mut t = core.inner.vdevs.lock();
            t.by_virt.remove(&virt_id);
            t.by_dev.remove(&dev_key(&dev));
            drop(t);
            c.table.release(id);
            return Err(e);
        }
        c.table.get(viommu_id);
        c.vdevices.insert(
            id.0,
            Vdevice {
                viommu: viommu_id,
                device: dev_id,
                virt_id,
            },
        );
        if let Some(d) = c.devices.get_mut(&dev_id.0) {
            d.vdevice = Some(id);
        }
        c.table.finalize(id);
        Ok(id)
    }

    /// IOMMU_VEVENTQ_ALLOC (§3.19): a vEVENTQ object and its fd.
    pub fn veventq_alloc(
        &self,
        flags: u32,
        viommu_id: ObjectId,
        ty: u32,
        depth: u32,
    ) -> Result<VeventqFd, Errno> {
        if flags != 0 || ty == veventq_type::DEFAULT {
            return Err(Errno::EOPNOTSUPP);
        }
        if depth == 0 {
            return Err(Errno::EINVAL);
        }
        let mut c = self.inner.ctx.lock();
        c.table.check(viommu_id, ObjectType::Viommu)?;
        let core = c
            .viommus
            .get(&viommu_id.0)
            .map(|v| v.core.clone())
            .ok_or(Errno::ENOENT)?;
        if core.inner.eventqs.lock().contains_key(&ty) {
            return Err(Errno::EEXIST);
        }
        let id = c.table.reserve(ObjectType::Veventq)?;
        let shared = Arc::new(VeventqShared::new(depth));
        core.inner.eventqs.lock().insert(ty, Arc::clone(&shared));
        c.table.get(viommu_id);
        c.veventqs.insert(
            id.0,
            Veventq {
                viommu: viommu_id,
                ty,
                shared: Arc::clone(&shared),
            },
        );
        c.table.finalize(id);
        c.table.get(id); // the fd's reference
        Ok(VeventqFd {
            ctx: Arc::clone(&self.inner),
            id,
            shared,
        })
    }

    /// IOMMU_HW_QUEUE_ALLOC (§3.20). Consumes two IDs: the queue, then its internal access.
    #[allow(clippy::too_many_arguments)]
    pub fn hw_queue_alloc(
        &self,
        flags: u32,
        viommu_id: ObjectId,
        ty: u32,
        index: u32,
        nesting_parent_iova: u64,
        length: u64,
    ) -> Result<ObjectId, Errno> {
        if flags != 0 || ty == hw_queue_type::DEFAULT {
            return Err(Errno::EOPNOTSUPP);
        }
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        nesting_parent_iova
            .checked_add(length - 1)
            .ok_or(Errno::EOVERFLOW)?;
        let mut c = self.inner.ctx.lock();
        c.table.check(viommu_id, ObjectType::Viommu)?;
        let (ops, parent_hwpt) = {
            let v = c.viommus.get(&viommu_id.0).ok_or(Errno::ENOENT)?;
            (Arc::clone(&v.ops), v.hwpt)
        };
        if !ops.hw_queue_supported(ty) {
            return Err(Errno::EOPNOTSUPP);
        }
        let ioas_id = c
            .hwpt_paging
            .get(&parent_hwpt.0)
            .map(|h| h.ioas)
            .ok_or(Errno::ENOENT)?;
        let id = c.table.reserve(ObjectType::HwQueue)?;
        // iommufd_hw_queue_alloc_phys: pin the page-aligned covering range through an
        // internal access and require physical contiguity.
        let offset = nesting_parent_iova % PAGE_SIZE;
        let aligned = nesting_parent_iova - offset;
        let npages = offset
            .checked_add(length)
            .map(|end| end.div_ceil(PAGE_SIZE))
            .unwrap_or(u64::MAX);
        let Some(pin_len) = npages.checked_mul(PAGE_SIZE) else {
            c.table.release(id);
            return Err(Errno::ERANGE);
        };
        let access = match c.table.reserve(ObjectType::Access) {
            Ok(a) => a,
            Err(e) => {
                c.table.release(id);
                return Err(e);
            }
        };
        c.accesses.insert(
            access.0,
            Access {
                ioas: Some(ioas_id),
                ops: None,
                iova_alignment: PAGE_SIZE,
                pin_blocked: false,
            },
        );
        c.table.get(ioas_id);
        let undo_access = |c: &mut Ctx| {
            c.access_teardown(access);
            c.table.release(id);
        };
        {
            let Some(ioas) = c.ioas.get_mut(&ioas_id.0) else {
                undo_access(&mut c);
                return Err(Errno::ENOENT);
            };
            ioas.iopt.accesses.insert(access, PAGE_SIZE);
            if let Err(e) = ioas.iopt.calculate_alignment() {
                undo_access(&mut c);
                return Err(e);
            }
        }
        let pas = match c.access_pin_locked(access, aligned, pin_len, false, true) {
            Ok(p) => p,
            Err(e) => {
                undo_access(&mut c);
                return Err(e);
            }
        };
        let contiguous = pas.windows(2).all(|w| w[1] == w[0] + PAGE_SIZE);
        if !contiguous || pas.len() as u64 != npages {
            c.access_unpin_locked(access, aligned, pin_len, true);
            undo_access(&mut c);
            return Err(Errno::EFAULT);
        }
        let base_pa = pas.first().copied().unwrap_or(0) + offset;
        let init = HwQueueInit {
            index,
            queue_type: ty,
            iova: nesting_parent_iova,
            length,
            base_pa,
        };
        if let Err(e) = ops.hw_queue_init(&init) {
            c.access_unpin_locked(access, aligned, pin_len, true);
            undo_access(&mut c);
            return Err(e);
        }
        // Queue index depends on index - 1, so destruction goes in reverse order.
        let depends_on = index
            .checked_sub(1)
            .and_then(|p| c.viommus.get(&viommu_id.0)?.hw_queues.get(&p).copied());
        if let Some(p) = depends_on {
            c.table.get(p);
        }
        if let Some(v) = c.viommus.get_mut(&viommu_id.0) {
            v.hw_queues.insert(index, id);
        }
        c.table.get(viommu_id);
        c.table.get(access); // the queue holds its internal access
        c.hw_queues.insert(
            id.0,
            HwQueue {
                viommu: viommu_id,
                index,
                access,
                pinned: (aligned, pin_len),
                depends_on,
            },
        );
        c.table.finalize(id);
        c.table.finalize(access);
        Ok(id)
    }

    /// mmap() of the context (§3.21): `offset`/`length` must name a registered window
    /// exactly. The region holds its owner until dropped (munmap).
    pub fn mmap(
        &self,
        offset: u64,
        length: u64,
        shared: bool,
        exec: bool,
    ) -> Result<MmapRegion, Errno> {
        if !length.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        if !shared {
            return Err(Errno::EINVAL);
        }
        if exec {
            return Err(Errno::EPERM);
        }
        let mut c = self.inner.ctx.lock();
        let w = c.mmap.lock().lookup(offset).ok_or(Errno::ENXIO)?;
        if w.offset != offset || w.length != length {
            return Err(Errno::ENXIO);
        }
        c.table.get(w.owner);
        Ok(MmapRegion {
            ctx: Arc::clone(&self.inner),
            window: w,
        })
    }

    /// Create an access on an IOAS (`iommufd_access_create` + attach). A `pin_capable`
    /// access forces the IOAS alignment to PAGE_SIZE (§4.6); `ops` receives unmap requests.
    /// The creator holds the access: IOMMU_DESTROY on it is EBUSY. Release with
    /// [`Iommufd::access_destroy`].
    pub fn access_create(
        &self,
        ioas_id: ObjectId,
        ops: Option<Arc<dyn AccessOps>>,
        pin_capable: bool,
    ) -> Result<ObjectId, Errno> {
        let mut c = self.inner.ctx.lock();
        c.ioas_mut(ioas_id)?;
        let id = c.table.reserve(ObjectType::Access)?;
        let align = if pin_capable { PAGE_SIZE } else { 1 };
        let ioas = c.ioas_mut(ioas_id)?;
        ioas.iopt.accesses.insert(id, align);
        if let Err(e) = ioas.iopt.calculate_alignment() {
            ioas.iopt.accesses.remove(&id);
            c.table.release(id);
            return Err(e);
        }
        c.table.get(ioas_id);
        c.accesses.insert(
            id.0,
            Access {
                ioas: Some(ioas_id),
                ops,
                iova_alignment: align,
                pin_blocked: false,
            },
        );
        c.table.finalize(id);
        c.table.get(id); // the creator's reference
        Ok(id)
    }

    /// Destroy an access created with [`Iommufd::access_create`] (its pins must be gone).
    pub fn access_destroy(&self, access: ObjectId) -> Result<(), Errno> {
        // iommufd_access_destroy_object: detaching from the IOAS first asks the access to
        // unmap everything (without the lock), so no pin outlives it.
        let ops = {
            let mut c = self.inner.ctx.lock();
            c.table.check(access, ObjectType::Access)?;
            let a = c.accesses.get_mut(&access.0).ok_or(Errno::ENOENT)?;
            a.pin_blocked = true;
            a.ops.clone()
        };
        if let Some(ops) = ops {
            ops.unmap(self, access, 0, ULONG_MAX);
        }
        let mut c = self.inner.ctx.lock();
        c.access_teardown(access);
        Ok(())
    }

    /// `iommufd_access_replace`: move the access to another IOAS. The new IOAS takes it first
    /// (its alignment may refuse: EADDRINUSE, nothing changes); then the access is asked to
    /// unmap everything of the old one, and leaves it. Pins are refused (ENOENT) meanwhile.
    pub fn access_replace_ioas(&self, access: ObjectId, ioas_id: ObjectId) -> Result<(), Errno> {
        let (old, ops) = {
            let mut c = self.inner.ctx.lock();
            c.table.check(access, ObjectType::Access)?;
            let a = c.accesses.get(&access.0).ok_or(Errno::ENOENT)?;
            let (old, ops, align) = (
                a.ioas.ok_or(Errno::ENOENT)?,
                a.ops.clone(),
                a.iova_alignment,
            );
            c.ioas_mut(ioas_id)?;
            if old == ioas_id {
                return Ok(());
            }
            let ioas = c.ioas_mut(ioas_id)?;
            ioas.iopt.accesses.insert(access, align);
            if let Err(e) = ioas.iopt.calculate_alignment() {
                ioas.iopt.accesses.remove(&access);
                return Err(e);
            }
            c.table.get(ioas_id);
            if let Some(a) = c.accesses.get_mut(&access.0) {
                a.pin_blocked = true;
            }
            (old, ops)
        };
        if let Some(ops) = ops {
            ops.unmap(self, access, 0, ULONG_MAX);
        }
        let mut c = self.inner.ctx.lock();
        if let Some(o) = c.ioas.get_mut(&old.0) {
            o.iopt.accesses.remove(&access);
            let _ = o.iopt.calculate_alignment();
        }
        c.table.put(old);
        if let Some(a) = c.accesses.get_mut(&access.0) {
            a.ioas = Some(ioas_id);
            a.pin_blocked = false;
        }
        Ok(())
    }

    /// `iommufd_access_pin_pages` (§4.6): pin `[iova, iova + length)` (page aligned within the
    /// backing) and return each page's physical address.
    pub fn access_pin_pages(
        &self,
        access: ObjectId,
        iova: u64,
        length: u64,
        write: bool,
    ) -> Result<Vec<u64>, Errno> {
        let mut c = self.inner.ctx.lock();
        c.table.check(access, ObjectType::Access)?;
        c.access_pin_locked(access, iova, length, write, false)
    }

    /// `iommufd_access_unpin_pages`.
    pub fn access_unpin_pages(&self, access: ObjectId, iova: u64, length: u64) {
        let mut c = self.inner.ctx.lock();
        c.access_unpin_locked(access, iova, length, false);
    }

    /// `iommufd_access_rw` (§4.6): copy between `buf` and the memory mapped at `iova`.
    pub fn access_rw(
        &self,
        access: ObjectId,
        iova: u64,
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), Errno> {
        let mut c = self.inner.ctx.lock();
        c.table.check(access, ObjectType::Access)?;
        let length = buf.len() as u64;
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
        let ioas_id = c
            .accesses
            .get(&access.0)
            .and_then(|a| a.ioas)
            .ok_or(Errno::ENOENT)?;
        let ioas = c.ioas_mut(ioas_id)?;
        let mut done = 0usize;
        let mut cur = iova;
        loop {
            let Some((_, a)) = ioas.iopt.areas.range(..=cur).next_back() else {
                return Err(Errno::ENOENT);
            };
            if a.last < cur {
                return Err(Errno::ENOENT);
            }
            let seg_last = a.last.min(last);
            let n = (seg_last - cur + 1) as usize;
            if a.prevent_access {
                return Err(Errno::EINVAL);
            }
            if (write && !a.prot.write) || (!write && !a.prot.read) {
                return Err(Errno::EPERM);
            }
            a.pages
                .rw(a.start_byte_at(cur), &mut buf[done..done + n], write)?;
            done += n;
            if seg_last == last {
                return Ok(());
            }
            cur = seg_last + 1;
        }
    }

    /// The selftest MOCK_DOMAIN op's core (§5.2): a SELFTEST object owning a bound device
    /// attached to `pt_id`. Consumes 2 IDs, 3 if an auto HWPT is created. Undone on failure.
    pub fn selftest_mock_domain(
        &self,
        dev: Arc<dyn IommuDevice>,
        pt_id: ObjectId,
    ) -> Result<SelftestDomain, Errno> {
        let mut c = self.inner.ctx.lock();
        let stdev = c.table.reserve(ObjectType::Selftest)?;
        let dev_id = match self.bind_locked(&mut c, dev, None) {
            Ok(d) => d,
            Err(e) => {
                c.table.release(stdev);
                return Err(e);
            }
        };
        // The SELFTEST object is the binder.
        match c.change_pt(dev_id, NO_PASID, pt_id, false) {
            Ok(hwpt_id) => {
                c.table.get(dev_id);
                c.selftests.insert(stdev.0, Selftest { device: dev_id });
                c.table.finalize(stdev);
                Ok(SelftestDomain {
                    stdev_id: stdev,
                    hwpt_id,
                    dev_id,
                })
            }
            Err(e) => {
                c.unbind_locked(dev_id);
                c.table.release(stdev);
                Err(e)
            }
        }
    }

    /// The DEVICE behind a SELFTEST object (ENOENT if absent, EINVAL if another type).
    pub fn selftest_device(&self, stdev_id: ObjectId) -> Result<ObjectId, Errno> {
        let c = self.inner.ctx.lock();
        match c.table.type_of(stdev_id) {
            None => Err(Errno::ENOENT),
            Some(ObjectType::Selftest) => c
                .selftests
                .get(&stdev_id.0)
                .map(|s| s.device)
                .ok_or(Errno::ENOENT),
            Some(_) => Err(Errno::EINVAL),
        }
    }

    // ----- introspection (tests, the selftest ops, the ABI layer) -----

    /// The type of a live object.
    pub fn object_type(&self, id: ObjectId) -> Option<ObjectType> {
        self.inner.ctx.lock().table.type_of(id)
    }

    /// Long-term users of an object (the table's own reference included).
    pub fn object_users(&self, id: ObjectId) -> u32 {
        self.inner.ctx.lock().table.users(id)
    }

    /// Whether the ID is a tombstone.
    pub fn is_tombstone(&self, id: ObjectId) -> bool {
        matches!(
            self.inner.ctx.lock().table.slots.get(&id.0),
            Some(crate::table::Slot::Tombstone)
        )
    }

    /// Number of IDs in use (objects of any state and tombstones).
    pub fn object_count(&self) -> usize {
        self.inner.ctx.lock().table.slots.len()
    }

    /// The areas of an IOAS as `(iova, length)`, ascending.
    pub fn ioas_areas(&self, ioas_id: ObjectId) -> Result<Vec<(u64, u64)>, Errno> {
        let mut c = self.inner.ctx.lock();
        Ok(c.ioas_mut(ioas_id)?
            .iopt
            .areas
            .values()
            .map(|a| (a.iova, a.length()))
            .collect())
    }

    /// The IOAS alignment.
    pub fn ioas_alignment(&self, ioas_id: ObjectId) -> Result<u64, Errno> {
        let mut c = self.inner.ctx.lock();
        Ok(c.ioas_mut(ioas_id)?.iopt.iova_alignment)
    }

    /// The allowed ranges of an IOAS.
    pub fn ioas_allowed(&self, ioas_id: ObjectId) -> Result<Vec<IovaRange>, Errno> {
        let mut c = self.inner.ctx.lock();
        Ok(c.ioas_mut(ioas_id)?
            .iopt
            .allowed
            .iter()
            .map(|(&s, &l)| IovaRange::new(s, l))
            .collect())
    }

    /// The domain of a HWPT_PAGING (ENOENT if not one).
    pub fn paging_domain(&self, hwpt_id: ObjectId) -> Result<Arc<dyn PagingDomain>, Errno> {
        let c = self.inner.ctx.lock();
        c.paging(hwpt_id).map(|h| Arc::clone(&h.domain))
    }

    /// The domain of a HWPT_NESTED (ENOENT if not one).
    pub fn nested_domain(&self, hwpt_id: ObjectId) -> Result<Arc<dyn NestedDomain>, Errno> {
        let c = self.inner.ctx.lock();
        c.table.check(hwpt_id, ObjectType::HwptNested)?;
        c.hwpt_nested
            .get(&hwpt_id.0)
            .map(|h| Arc::clone(&h.domain))
            .ok_or(Errno::ENOENT)
    }

    /// The driver half of a vIOMMU (ENOENT if not one).
    pub fn viommu_ops(&self, viommu_id: ObjectId) -> Result<Arc<dyn Viommu>, Errno> {
        let c = self.inner.ctx.lock();
        c.table.check(viommu_id, ObjectType::Viommu)?;
        c.viommus
            .get(&viommu_id.0)
            .map(|v| Arc::clone(&v.ops))
            .ok_or(Errno::ENOENT)
    }

    /// The device behind a DEVICE object.
    pub fn device_handle(&self, dev_id: ObjectId) -> Result<Arc<dyn IommuDevice>, Errno> {
        let c = self.inner.ctx.lock();
        c.device(dev_id).map(|d| Arc::clone(&d.dev))
    }

    /// Whether a HWPT_PAGING is an auto domain.
    pub fn hwpt_is_auto(&self, hwpt_id: ObjectId) -> bool {
        self.inner
            .ctx
            .lock()
            .hwpt_paging
            .get(&hwpt_id.0)
            .is_some_and(|h| h.auto_domain)
    }

    /// Whether the RLIMIT mode is "mm".
    pub fn account_mm(&self) -> bool {
        self.inner.ctx.lock().account_mm
    }
}
