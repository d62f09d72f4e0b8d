//! The driver boundary: what an IOMMU driver (the mock here, arm-smmu-v3 in its own crate)
//! implements, and the services the core hands back to it.
//!
//! The split follows the kernel's `iommu_ops` / `iommu_domain_ops` / `iommufd_viommu_ops`
//! (iommufd.md §3.10–§3.21, §4; smmu_kvm.md §3, §5). Everything is object safe: a context holds
//! devices of several drivers at once, as the kernel does.
//!
//! Locking contract: the core calls a driver while holding its context lock, so a driver must
//! never call back into [`crate::Iommufd`] from these methods. The handles the core gives the
//! driver ([`ViommuCore`], [`DeviceEvents`]) have their own locks and may be used from any
//! thread at any time, e.g. from the driver's event-queue reader.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::eventq::{PageRequest, VeventqShared};
use crate::{Errno, InvalidateArray, IovaRange, ObjectId, PAGE_SIZE, Prot, UserData};

/// The KVM VM a device was bound with (RFC v3, threads/001: "struct kvm * is associated with
/// struct iommufd_device … established when idev is first allocated during
/// iommufd_device_bind()"). iommufd is not a user of KVM: it stores this handle on the DEVICE
/// object and passes it, untouched, to [`IommuDriver::viommu_alloc`].
///
/// Type safety without a dependency on the `kvm` crate: the handle is an `Arc` of any
/// `Send + Sync` type, created from the VMM's concrete VM type with [`KvmRef::new`], and a
/// driver gets its concrete type back with [`KvmRef::downcast`], which returns `None` (never a
/// wrong reference) if the handle holds something else. Cloning the handle clones the `Arc`,
/// so a vIOMMU that keeps it keeps the VM alive until it has released its VMID pin (smmu_kvm.md
/// §3.4 item 4, Jason's review of RFC v3).
#[derive(Clone)]
pub struct KvmRef(Arc<dyn Any + Send + Sync>);

impl KvmRef {
    pub fn new<T: Any + Send + Sync>(vm: Arc<T>) -> Self {
        KvmRef(vm)
    }

    /// The VM as its concrete type, if it is a `T`.
    pub fn downcast<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        Arc::clone(&self.0).downcast::<T>().ok()
    }

    /// Whether two handles refer to the same VM object.
    pub fn same_vm(&self, other: &KvmRef) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl fmt::Debug for KvmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KvmRef({:p})", Arc::as_ptr(&self.0))
    }
}

/// A device as the IOMMU driver that owns it presents it to the core (the kernel's `struct
/// device` with its `dev_iommu`). Created by the driver, bound to a context by a binder (VFIO
/// cdev, or the selftest op) with [`crate::Iommufd::bind_device`].
pub trait IommuDevice: Send + Sync + Any {
    fn as_any(&self) -> &dyn Any;

    /// The IOMMU instance the device sits behind (`__iommu_get_iommu_dev`).
    fn iommu(&self) -> Arc<dyn IommuDriver>;

    /// The device's iommu_group: devices sharing one attach together (iommufd.md §4.4).
    fn group(&self) -> u64;

    /// log2 of the number of PASIDs the device supports; 0 = no PASID support.
    fn max_pasid_log2(&self) -> u8 {
        0
    }

    /// `IOMMU_HW_CAP_*` bits reported by GET_HW_INFO; `hw_info::CAP_DIRTY_TRACKING` also
    /// gates HWPT_ALLOC with DIRTY_TRACKING.
    fn capabilities(&self) -> u64 {
        0
    }

    /// Reserved IOVA regions (e.g. a software MSI window) that attaching the device to a
    /// paging domain reserves in the IOAS.
    fn reserved_regions(&self) -> Vec<IovaRange> {
        Vec::new()
    }
}

/// Identity of a device handle (the `Arc` allocation).
pub(crate) fn dev_key(dev: &Arc<dyn IommuDevice>) -> usize {
    Arc::as_ptr(dev) as *const () as usize
}

/// Identity of a driver instance.
pub(crate) fn driver_key(drv: &Arc<dyn IommuDriver>) -> usize {
    Arc::as_ptr(drv) as *const () as usize
}

/// A domain as attached to a device.
#[derive(Clone)]
pub enum Domain {
    Paging(Arc<dyn PagingDomain>),
    Nested(Arc<dyn NestedDomain>),
}

/// The result of a driver's `hw_info` (IOMMU_GET_HW_INFO, iommufd.md §3.11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HwInfo {
    pub data_type: u32,
    pub data: Vec<u8>,
}

/// A page response the core passes back to the driver (after user space answered through the
/// fault queue, or automatically with INVALID on detach/destroy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    pub pasid: Option<u32>,
    pub grpid: u32,
    /// `fault::RESP_SUCCESS` or `fault::RESP_INVALID`.
    pub code: u32,
}

/// An IOMMU instance (the kernel's `iommu_ops` plus the instance): the arm-smmu-v3 driver is
/// one, [`crate::mock::MockIommu`] another.
pub trait IommuDriver: Send + Sync + Any {
    fn as_any(&self) -> &dyn Any;

    /// GET_HW_INFO: the driver's info struct for `in_type` (`hw_info::TYPE_DEFAULT` = the
    /// driver's own type). An unsupported type is EOPNOTSUPP.
    fn hw_info(&self, dev: &Arc<dyn IommuDevice>, in_type: u32) -> Result<HwInfo, Errno>;

    /// Whether the driver keeps PASID tables in user (guest) memory, so a page request on a
    /// PASID with no attachment is routed to a *nested* RID attachment (iommufd.md §4.4).
    fn user_pasid_table(&self) -> bool {
        false
    }

    /// Called when a device is bound to a context; the driver keeps `events` to report page
    /// requests (from any thread) until [`IommuDriver::device_unbound`].
    fn device_bound(&self, _dev: &Arc<dyn IommuDevice>, _events: DeviceEvents) {}

    fn device_unbound(&self, _dev: &Arc<dyn IommuDevice>) {}

    /// A paging domain (`domain_alloc_paging_flags`). `flags` are the HWPT_ALLOC flags the
    /// driver must honour: NEST_PARENT (the driver builds a stage-2 that vIOMMUs nest on),
    /// DIRTY_TRACKING, PASID. `data` is driver-specific user data, if any. The domain is empty;
    /// the core then maps every IOAS area into it.
    fn domain_alloc_paging(
        &self,
        dev: &Arc<dyn IommuDevice>,
        flags: u32,
        data: Option<&mut UserData<'_>>,
    ) -> Result<Arc<dyn PagingDomain>, Errno>;

    /// Whether [`IommuDriver::domain_alloc_nested`] is implemented (kernel: the op exists).
    fn supports_nested(&self) -> bool {
        false
    }

    /// A nested domain on a NEST_PARENT paging domain from this driver (HWPT_ALLOC with a
    /// HWPT_PAGING `pt_id`). `flags` has FAULT_ID_VALID removed; the driver parses `data`
    /// (e.g. `iommu_hwpt_arm_smmuv3`, rejecting illegal guest fields with EIO).
    fn domain_alloc_nested(
        &self,
        _dev: &Arc<dyn IommuDevice>,
        _parent: &Arc<dyn PagingDomain>,
        _flags: u32,
        _data: &mut UserData<'_>,
    ) -> Result<Arc<dyn NestedDomain>, Errno> {
        Err(Errno::EOPNOTSUPP)
    }

    /// Whether this driver offers vIOMMU type `viommu_type` for `dev` (kernel:
    /// `get_viommu_size` returns non-zero). False → VIOMMU_ALLOC fails with EOPNOTSUPP.
    fn viommu_supported(&self, _dev: &Arc<dyn IommuDevice>, _viommu_type: u32) -> bool {
        false
    }

    /// Build the driver half of a vIOMMU (`viommu_init`): it receives the nesting parent, the
    /// KVM handle the device was bound with (if any), the user data, and the core services
    /// handle. The driver owns all per-vIOMMU state (the VMID, private or pinned from KVM, a
    /// reference on the VM, command-queue interfaces). Failing leaves no object behind.
    fn viommu_alloc(&self, _req: ViommuAlloc<'_, '_>) -> Result<Arc<dyn Viommu>, Errno> {
        Err(Errno::EOPNOTSUPP)
    }

    /// Attach `domain` to `dev` on `pasid` (`NO_PASID` = the RID), replacing `old` if given.
    /// EINVAL means "incompatible" (the core then tries another auto domain); on failure the
    /// old attachment must stay in place. A nested domain of a vIOMMU may require a vDEVICE of
    /// `dev` (mock: ENOENT otherwise). PASID range/support is the driver's to check (EINVAL).
    fn attach_dev(
        &self,
        dev: &Arc<dyn IommuDevice>,
        pasid: u32,
        domain: &Domain,
        old: Option<&Domain>,
    ) -> Result<(), Errno>;

    /// Detach `dev` from `old` on `pasid` (back to the blocking domain). Cannot fail.
    fn detach_dev(&self, dev: &Arc<dyn IommuDevice>, pasid: u32, old: &Domain);

    /// Deliver a page response for a page-request group of `dev`.
    fn page_response(&self, _dev: &Arc<dyn IommuDevice>, _resp: &PageResponse) {}
}

/// A paging (IOVA → PA) domain: a mock page table, or an SMMU stage-1/stage-2 table.
pub trait PagingDomain: Send + Sync + Any {
    fn as_any(&self) -> &dyn Any;

    /// The IOVA aperture (inclusive); the complement is reserved in the IOAS.
    fn aperture(&self) -> IovaRange {
        IovaRange::new(0, u64::MAX)
    }

    /// Page sizes the domain supports (bit n set = 2^n bytes). The lowest sets the IOAS
    /// alignment, which must not exceed PAGE_SIZE.
    fn pgsize_bitmap(&self) -> u64 {
        PAGE_SIZE
    }

    /// Map `[iova, iova + len)` to the physically contiguous `[pa, pa + len)`. The core
    /// calls this with ranges aligned to the domain's smallest page size; the driver picks its
    /// page sizes (the core passes PAGE_SIZE pieces when large pages are disabled).
    fn map(&self, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<(), Errno>;

    /// Unmap `[iova, iova + len)` (always exactly what earlier `map` calls covered) and
    /// complete the invalidation before returning: for a stage-2 nesting parent that means
    /// TLBI_S2_IPA for every VMID using it plus the stage-1 follow-up. Returns bytes unmapped.
    fn unmap(&self, iova: u64, len: u64) -> u64;

    /// Whether the domain was allocated with dirty tracking support.
    fn supports_dirty_tracking(&self) -> bool {
        false
    }

    /// Turn hardware dirty tracking on or off.
    fn set_dirty_tracking(&self, _enable: bool) -> Result<(), Errno> {
        Err(Errno::EOPNOTSUPP)
    }

    /// Report dirty IOVA ranges within `[iova, iova + len)` through `dirty(iova, len)`,
    /// clearing the dirty state unless `no_clear`. A dirty block mapping reports all of it.
    /// `dirty` is `None` when the core only clears (before enabling tracking): that must
    /// work with tracking off; reading into a bitmap with tracking off may fail.
    fn read_and_clear_dirty(
        &self,
        _iova: u64,
        _len: u64,
        _no_clear: bool,
        _dirty: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<(), Errno> {
        Err(Errno::EOPNOTSUPP)
    }

    /// The physical address `iova` translates to, if mapped (for checks and tests).
    fn iova_to_phys(&self, _iova: u64) -> Option<u64> {
        None
    }
}

/// A nested (stage-1 over a stage-2 parent) domain.
pub trait NestedDomain: Send + Sync + Any {
    fn as_any(&self) -> &dyn Any;

    /// Whether [`NestedDomain::cache_invalidate_user`] is implemented.
    fn supports_cache_invalidate_user(&self) -> bool {
        false
    }

    /// HWPT_INVALIDATE on this nested HWPT. The driver copies entries with
    /// [`InvalidateArray::copy_entry`], stops at the first failing one and sets
    /// `array.entry_num` to the number handled.
    fn cache_invalidate_user(&self, _array: &mut InvalidateArray<'_>) -> Result<(), Errno> {
        Err(Errno::EOPNOTSUPP)
    }
}

/// What the core passes to [`IommuDriver::viommu_alloc`].
pub struct ViommuAlloc<'r, 'd> {
    pub dev: &'r Arc<dyn IommuDevice>,
    pub viommu_type: u32,
    /// The NEST_PARENT paging domain the vIOMMU nests on (never changes for its life).
    pub parent: &'r Arc<dyn PagingDomain>,
    /// The KVM the device was bound with.
    pub kvm: Option<&'r KvmRef>,
    /// Driver-specific data (`data_len` ≠ 0), in/out.
    pub data: Option<&'r mut UserData<'d>>,
    /// Core services for this vIOMMU: events, vDEVICE lookups, mmap windows.
    pub core: ViommuCore,
}

/// Parameters of a HW queue for [`Viommu::hw_queue_init`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwQueueInit {
    pub index: u32,
    pub queue_type: u32,
    /// `nesting_parent_iova`: the ring's address in the parent's IOAS (guest PA).
    pub iova: u64,
    pub length: u64,
    /// Host physical address of the ring's first byte; the pinned range is physically
    /// contiguous and stays pinned (and its IOAS areas locked) until the queue is destroyed.
    pub base_pa: u64,
}

/// The driver half of a vIOMMU (`iommufd_viommu_ops`).
pub trait Viommu: Send + Sync + Any {
    fn as_any(&self) -> &dyn Any;

    /// Called when the vIOMMU object is destroyed, after everything built on it is gone:
    /// the driver releases per-vIOMMU state here (VMID: STEs off, TLBI_S12_VMALL + SYNC, unpin).
    fn destroy(&self) {}

    /// Whether [`Viommu::alloc_domain_nested`] is implemented.
    fn supports_nested(&self) -> bool {
        false
    }

    /// A nested domain bound to this vIOMMU (HWPT_ALLOC with a VIOMMU `pt_id`).
    fn alloc_domain_nested(
        &self,
        _flags: u32,
        _data: &mut UserData<'_>,
    ) -> Result<Arc<dyn NestedDomain>, Errno> {
        Err(Errno::EOPNOTSUPP)
    }

    /// Whether [`Viommu::cache_invalidate`] is implemented.
    fn supports_cache_invalidate(&self) -> bool {
        false
    }

    /// HWPT_INVALIDATE on the vIOMMU (e.g. guest SMMU commands): same `entry_num` contract as
    /// [`NestedDomain::cache_invalidate_user`]; vIOMMU drivers usually copy the whole array
    /// with [`InvalidateArray::copy_all`].
    fn cache_invalidate(&self, _array: &mut InvalidateArray<'_>) -> Result<(), Errno> {
        Err(Errno::EOPNOTSUPP)
    }

    /// A vDEVICE (virtual id → device) was created; failing aborts it.
    fn vdevice_init(&self, _virt_id: u64, _dev: &Arc<dyn IommuDevice>) -> Result<(), Errno> {
        Ok(())
    }

    /// A vDEVICE is going away (destroy, or its device was unbound).
    fn vdevice_destroy(&self, _virt_id: u64, _dev: &Arc<dyn IommuDevice>) {}

    /// Whether HW queues of `queue_type` are supported (else EOPNOTSUPP).
    fn hw_queue_supported(&self, _queue_type: u32) -> bool {
        false
    }

    /// Set up HW queue `index` on the pinned ring. The core allocates queues in order and
    /// makes queue `index` depend on `index - 1`, so they are destroyed in reverse.
    fn hw_queue_init(&self, _q: &HwQueueInit) -> Result<(), Errno> {
        Err(Errno::EOPNOTSUPP)
    }

    fn hw_queue_destroy(&self, _index: u32) {}
}

/// One mmap window a driver registered (iommufd.md §3.21).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapWindow {
    pub offset: u64,
    pub length: u64,
    pub base_pa: u64,
    pub owner: ObjectId,
}

/// Per-context registry of mmap windows: offsets from a lowest-fit allocator starting at
/// PAGE_SIZE, page granular.
#[derive(Default)]
pub(crate) struct MmapTable {
    pub(crate) windows: BTreeMap<u64, MmapWindow>,
}

impl MmapTable {
    fn alloc(&mut self, base_pa: u64, length: u64, owner: ObjectId) -> Result<u64, Errno> {
        if length == 0 || !length.is_multiple_of(PAGE_SIZE) || !base_pa.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let mut cursor = PAGE_SIZE;
        for w in self.windows.values() {
            if w.offset.saturating_sub(cursor) >= length {
                break;
            }
            cursor = w.offset.checked_add(w.length).ok_or(Errno::ENOSPC)?;
        }
        cursor.checked_add(length - 1).ok_or(Errno::ENOSPC)?;
        self.windows.insert(
            cursor,
            MmapWindow {
                offset: cursor,
                length,
                base_pa,
                owner,
            },
        );
        Ok(cursor)
    }

    /// The window containing `offset`.
    pub(crate) fn lookup(&self, offset: u64) -> Option<MmapWindow> {
        let (_, w) = self.windows.range(..=offset).next_back()?;
        (offset - w.offset < w.length).then_some(*w)
    }
}

#[derive(Default)]
pub(crate) struct VdevTable {
    pub(crate) by_virt: BTreeMap<u64, Arc<dyn IommuDevice>>,
    pub(crate) by_dev: HashMap<usize, u64>,
}

pub(crate) struct ViommuShared {
    pub(crate) id: ObjectId,
    pub(crate) vdevs: Mutex<VdevTable>,
    pub(crate) eventqs: Mutex<BTreeMap<u32, Arc<VeventqShared>>>,
    pub(crate) mmap: Arc<Mutex<MmapTable>>,
}

/// The core's services for one vIOMMU, handed to the driver at [`IommuDriver::viommu_alloc`].
/// Usable from any thread (its own locks), e.g. the driver's event-queue reader.
#[derive(Clone)]
pub struct ViommuCore {
    pub(crate) inner: Arc<ViommuShared>,
}

impl ViommuCore {
    /// The vIOMMU's object id.
    pub fn id(&self) -> ObjectId {
        self.inner.id
    }

    /// `iommufd_viommu_report_event`: queue `payload` on this vIOMMU's vEVENTQ of
    /// `event_type`. No such queue → EOPNOTSUPP. A full queue records a LOST_EVENTS marker.
    pub fn report_event(&self, event_type: u32, payload: &[u8]) -> Result<(), Errno> {
        let q = self
            .inner
            .eventqs
            .lock()
            .get(&event_type)
            .cloned()
            .ok_or(Errno::EOPNOTSUPP)?;
        q.push(payload);
        Ok(())
    }

    /// Report an event about `dev` (e.g. an SMMU event record whose StreamID must become the
    /// guest's virtual StreamID): `build` receives the virtual id of `dev`'s vDEVICE and
    /// returns the payload. ENOENT if `dev` has no vDEVICE on this vIOMMU (the kernel's
    /// arm-smmu-v3 drops such events), EOPNOTSUPP if there is no vEVENTQ of `event_type`.
    pub fn report_device_event(
        &self,
        dev: &Arc<dyn IommuDevice>,
        event_type: u32,
        build: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<(), Errno> {
        let virt_id = self.virt_id_of(dev).ok_or(Errno::ENOENT)?;
        self.report_event(event_type, &build(virt_id))
    }

    /// `iommufd_viommu_get_vdev_id`: the virtual id of `dev`'s vDEVICE on this vIOMMU.
    pub fn virt_id_of(&self, dev: &Arc<dyn IommuDevice>) -> Option<u64> {
        self.inner.vdevs.lock().by_dev.get(&dev_key(dev)).copied()
    }

    /// `iommufd_viommu_find_dev`: the device whose vDEVICE has `virt_id`.
    pub fn find_device(&self, virt_id: u64) -> Option<Arc<dyn IommuDevice>> {
        self.inner.vdevs.lock().by_virt.get(&virt_id).cloned()
    }

    /// `iommufd_viommu_alloc_mmap`: expose `[base_pa, base_pa + length)` (page aligned) to
    /// user space through mmap of the context; returns the mmap offset.
    pub fn alloc_mmap(&self, base_pa: u64, length: u64) -> Result<u64, Errno> {
        self.inner.mmap.lock().alloc(base_pa, length, self.inner.id)
    }

    /// `iommufd_viommu_destroy_mmap`.
    pub fn destroy_mmap(&self, offset: u64) {
        let mut t = self.inner.mmap.lock();
        if t.windows
            .get(&offset)
            .is_some_and(|w| w.owner == self.inner.id)
        {
            t.windows.remove(&offset);
        }
    }
}

/// A bound device's channel for page requests (the kernel's `iommu_report_device_fault`),
/// handed to the driver at [`IommuDriver::device_bound`]. Usable from any thread.
#[derive(Clone)]
pub struct DeviceEvents {
    pub(crate) inner: Arc<Mutex<crate::eventq::FaultRoute>>,
}

impl DeviceEvents {
    /// Report one page request. Requests without `LAST_PAGE` are held until the last request
    /// of their group arrives; the group then goes to the FAULT queue of the HWPT attached on
    /// the request's PASID (iommufd.md §4.4), or is answered INVALID when there is none.
    pub fn report_page_request(&self, req: PageRequest) {
        crate::eventq::route_page_request(&self.inner, req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ref_downcasts_only_to_its_type() {
        struct Vm(u32);
        let vm = Arc::new(Vm(7));
        let k = KvmRef::new(Arc::clone(&vm));
        assert_eq!(k.downcast::<Vm>().map(|v| v.0), Some(7));
        assert!(k.downcast::<u32>().is_none());
        assert!(k.same_vm(&k.clone()));
        assert!(!k.same_vm(&KvmRef::new(Arc::new(Vm(7)))));
    }

    #[test]
    fn mmap_offsets_are_lowest_fit_from_page_size() {
        let mut t = MmapTable::default();
        let o = ObjectId(1);
        assert_eq!(t.alloc(0, 2 * PAGE_SIZE, o), Ok(PAGE_SIZE));
        assert_eq!(t.alloc(0, PAGE_SIZE, o), Ok(3 * PAGE_SIZE));
        t.windows.remove(&PAGE_SIZE);
        assert_eq!(t.alloc(0, PAGE_SIZE, o), Ok(PAGE_SIZE));
        assert_eq!(t.alloc(0, 2 * PAGE_SIZE, o), Ok(4 * PAGE_SIZE));
        assert_eq!(
            t.lookup(3 * PAGE_SIZE + 5).map(|w| w.offset),
            Some(3 * PAGE_SIZE)
        );
        assert_eq!(t.lookup(2 * PAGE_SIZE), None);
        assert_eq!(t.alloc(0, 100, o), Err(Errno::EINVAL));
    }
}
