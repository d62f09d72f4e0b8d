//! The kernel selftest's mock IOMMU driver (iommufd.md §5.3–§5.4), implementing the driver
//! traits, plus the IOMMU_TEST_CMD operations that inspect it (MD_CHECK_MAP, MD_CHECK_IOTLB,
//! DEV_CHECK_CACHE, DIRTY, TRIGGER_IOPF, TRIGGER_VEVENT, the access ops). The ABI layer exposes
//! these through IOMMU_TEST_CMD; this crate's tests use them directly.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use twinmmu_hw::SparseMem;

use crate::backing::PhysMemory;
use crate::driver::{
    DeviceEvents, Domain, HwInfo, HwQueueInit, IommuDevice, IommuDriver, KvmRef, NestedDomain,
    PageResponse, PagingDomain, Viommu, ViommuAlloc, ViommuCore,
};
use crate::eventq::PageRequest;
use crate::types::{fault, hw_info, hwpt_flags};
use crate::{
    AccessOps, Errno, InvalidateArray, Iommufd, IovaRange, NO_PASID, ObjectId, PAGE_SIZE, Prot,
    SelftestDomain, UserData,
};

pub const MOCK_APERTURE_START: u64 = 1 << 24;
pub const MOCK_APERTURE_LAST: u64 = (1 << 31) - 1;
/// The mock's IO page: half the host page.
pub const MOCK_IO_PAGE_SIZE: u64 = PAGE_SIZE / 2;
pub const MOCK_HUGE_PAGE_SIZE: u64 = 512 * MOCK_IO_PAGE_SIZE;

pub const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1 << 0;
pub const MOCK_FLAGS_DEVICE_HUGE_IOVA: u32 = 1 << 1;
pub const MOCK_FLAGS_DEVICE_PASID: u32 = 1 << 2;
pub const MOCK_PASID_WIDTH: u8 = 20;
/// PASID whose attach fails every other time with ENOMEM (the selftest quirk).
pub const IOMMU_TEST_PASID_RESERVED: u32 = 1024;

pub const IOMMU_HW_INFO_TYPE_SELFTEST: u32 = 0xfeed_beef;
pub const IOMMU_HW_INFO_SELFTEST_REGVAL: u32 = 0xdead_beef;
pub const IOMMU_HWPT_DATA_SELFTEST: u32 = 0xdead;
pub const IOMMU_TEST_IOTLB_DEFAULT: u32 = 0xbad_beef;
pub const IOMMU_TEST_DEV_CACHE_DEFAULT: u32 = 0xba_ddad;
pub const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;
pub const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID: u32 = 0xdad_beef;
pub const IOMMU_TEST_INVALIDATE_FLAG_ALL: u32 = 1 << 0;
pub const IOMMU_VIOMMU_TYPE_SELFTEST: u32 = 0xdead_beef;
pub const IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;
pub const IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID: u32 = 0xdad_beef;
pub const IOMMU_VEVENTQ_TYPE_SELFTEST: u32 = 0xbeef_beef;
pub const IOMMU_HW_QUEUE_TYPE_SELFTEST: u32 = 0xdead_beef;
pub const IOMMU_TEST_HW_QUEUE_MAX: u32 = 2;
pub const MOCK_NESTED_DOMAIN_IOTLB_ID_MAX: u32 = 3;
pub const MOCK_DEV_CACHE_ID_MAX: u32 = 3;
/// ACCESS_PAGES / ACCESS_RW refuse more than this (ENOMEM).
pub const MOCK_ACCESS_MAX: u64 = 16 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// The mock IOMMU instance. It owns a little memory for the vIOMMU's mmap pages.
pub struct MockIommu {
    me: Weak<MockIommu>,
    mem: Arc<SparseMem>,
    next_pa: Mutex<u64>,
    next_group: AtomicU64,
}

impl MockIommu {
    pub fn new() -> Arc<MockIommu> {
        Arc::new_cyclic(|me| MockIommu {
            me: me.clone(),
            // A constant, page-aligned map below 2^52: `with_range` cannot refuse it.
            mem: Arc::new(
                SparseMem::with_range(0, 1 << 32).expect("0..4 GiB is a valid memory map"),
            ),
            next_pa: Mutex::new(PAGE_SIZE),
            next_group: AtomicU64::new(1),
        })
    }

    /// A mock device (MOCK_DOMAIN_FLAGS' `dev_flags`): unknown flags → EINVAL. Each device
    /// has its own iommu_group.
    pub fn new_device(&self, flags: u32) -> Result<Arc<MockDevice>, Errno> {
        let valid =
            MOCK_FLAGS_DEVICE_NO_DIRTY | MOCK_FLAGS_DEVICE_HUGE_IOVA | MOCK_FLAGS_DEVICE_PASID;
        if flags & !valid != 0 {
            return Err(Errno::EINVAL);
        }
        let iommu = self.me.upgrade().ok_or(Errno::ENODEV)?;
        Ok(Arc::new(MockDevice {
            iommu,
            flags,
            group: self.next_group.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(MockDevState {
                cache: [IOMMU_TEST_DEV_CACHE_DEFAULT; 4],
                pasid_1024_fake_error: false,
                viommu: None,
                events: None,
                responses: Vec::new(),
            }),
        }))
    }

    /// A device that shares `other`'s iommu_group.
    pub fn new_device_in_group(
        &self,
        flags: u32,
        other: &MockDevice,
    ) -> Result<Arc<MockDevice>, Errno> {
        let d = self.new_device(flags)?;
        let mut d = Arc::try_unwrap(d).map_err(|_| Errno::EBUSY)?;
        d.group = other.group;
        Ok(Arc::new(d))
    }

    /// The memory holding the vIOMMU mmap pages.
    pub fn memory(&self) -> &Arc<SparseMem> {
        &self.mem
    }

    fn alloc_pages(&self, n: u64) -> u64 {
        let mut p = self.next_pa.lock();
        let pa = *p;
        *p += n * PAGE_SIZE;
        pa
    }
}

struct MockDevState {
    cache: [u32; 4],
    pasid_1024_fake_error: bool,
    /// The vIOMMU and virtual id recorded at a RID attach to a vIOMMU-based nested domain.
    viommu: Option<(ViommuCore, u64)>,
    events: Option<DeviceEvents>,
    responses: Vec<PageResponse>,
}

/// A mock device.
pub struct MockDevice {
    iommu: Arc<MockIommu>,
    flags: u32,
    group: u64,
    state: Mutex<MockDevState>,
}

impl MockDevice {
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Cache word `idx` (DEV_CHECK_CACHE).
    pub fn cache(&self, idx: u32) -> Option<u32> {
        self.state.lock().cache.get(idx as usize).copied()
    }

    /// TRIGGER_IOPF: one page request with LAST_PAGE (and PASID_VALID when `pasid` ≠ 0).
    pub fn trigger_iopf(&self, pasid: u32, grpid: u32, perm: u32, addr: u64) {
        let events = self.state.lock().events.clone();
        if let Some(ev) = events {
            let mut flags = fault::FLAG_LAST_PAGE;
            if pasid != 0 {
                flags |= fault::FLAG_PASID_VALID;
            }
            ev.report_page_request(PageRequest {
                flags,
                pasid,
                grpid,
                perm,
                addr,
            });
        }
    }

    /// Report an arbitrary page request (partial groups included).
    pub fn report_page_request(&self, req: PageRequest) {
        let events = self.state.lock().events.clone();
        if let Some(ev) = events {
            ev.report_page_request(req);
        }
    }

    /// TRIGGER_VEVENT: report `{virt_id}` to the SELFTEST vEVENTQ of the vIOMMU this device is
    /// attached through. Not attached that way (or virt_id 0) → ENOENT; no queue → EOPNOTSUPP.
    pub fn trigger_vevent(&self) -> Result<(), Errno> {
        let (core, virt_id) = self.state.lock().viommu.clone().ok_or(Errno::ENOENT)?;
        if virt_id == 0 {
            return Err(Errno::ENOENT);
        }
        core.report_event(IOMMU_VEVENTQ_TYPE_SELFTEST, &(virt_id as u32).to_le_bytes())
    }

    /// Page responses the device received, oldest first.
    pub fn page_responses(&self) -> Vec<PageResponse> {
        self.state.lock().responses.clone()
    }

    /// The (vIOMMU id, virtual id) recorded at the last RID attach.
    pub fn viommu_binding(&self) -> Option<(ObjectId, u64)> {
        self.state.lock().viommu.as_ref().map(|(c, v)| (c.id(), *v))
    }
}

impl IommuDevice for MockDevice {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn iommu(&self) -> Arc<dyn IommuDriver> {
        Arc::clone(&self.iommu) as Arc<dyn IommuDriver>
    }
    fn group(&self) -> u64 {
        self.group
    }
    fn max_pasid_log2(&self) -> u8 {
        if self.flags & MOCK_FLAGS_DEVICE_PASID != 0 {
            MOCK_PASID_WIDTH
        } else {
            0
        }
    }
    fn capabilities(&self) -> u64 {
        if self.flags & MOCK_FLAGS_DEVICE_NO_DIRTY != 0 {
            0
        } else {
            hw_info::CAP_DIRTY_TRACKING
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct MockRun {
    pa: u64,
    len: u64,
    huge: bool,
}

#[derive(Default)]
struct MockPt {
    runs: BTreeMap<u64, MockRun>,
    /// Granule base IOVAs marked dirty.
    dirty: BTreeSet<u64>,
}

/// A mock paging domain: aperture [1<<24, (1<<31)-1], IO pages of PAGE_SIZE/2 (plus 1 MiB
/// with HUGE_IOVA devices). Mappings are kept as runs; dirty bits per IO page (or huge page).
pub struct MockDomain {
    huge: bool,
    dirty_ops: bool,
    nest_parent: bool,
    tracking: AtomicBool,
    pt: Mutex<MockPt>,
}

impl MockDomain {
    fn granule(&self, run: &MockRun) -> u64 {
        if run.huge {
            MOCK_HUGE_PAGE_SIZE
        } else {
            MOCK_IO_PAGE_SIZE
        }
    }

    /// Whether this is a NEST_PARENT domain.
    pub fn is_nest_parent(&self) -> bool {
        self.nest_parent
    }

    /// Bytes currently mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.pt.lock().runs.values().map(|r| r.len).sum()
    }

    /// Whether dirty tracking is on.
    pub fn dirty_tracking(&self) -> bool {
        self.tracking.load(Ordering::Relaxed)
    }

    /// IOMMU_TEST_OP_DIRTY: for every set bit i of `bitmap`, mark the IO page at
    /// `iova + i * page_size` dirty if mapped; returns how many were marked.
    pub fn mark_dirty(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &[u8],
    ) -> Result<u64, Errno> {
        if page_size == 0
            || length == 0
            || !iova.is_multiple_of(page_size)
            || !length.is_multiple_of(page_size)
        {
            return Err(Errno::EINVAL);
        }
        if !self.dirty_tracking() {
            return Err(Errno::EINVAL);
        }
        let nbits = length / page_size;
        if (bitmap.len() as u64) < nbits.div_ceil(8) {
            return Err(Errno::EFAULT);
        }
        let mut pt = self.pt.lock();
        let mut count = 0;
        for i in 0..nbits {
            if bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                continue;
            }
            let at = iova + i * page_size;
            let hit = pt
                .runs
                .range(..=at)
                .next_back()
                .filter(|&(&k, r)| at - k < r.len)
                .map(|(&k, r)| (k, *r));
            if let Some((k, r)) = hit {
                let g = self.granule(&r);
                let base = k + (at - k) / g * g;
                pt.dirty.insert(base);
                count += 1;
            }
        }
        Ok(count)
    }
}

impl PagingDomain for MockDomain {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn aperture(&self) -> IovaRange {
        IovaRange::new(MOCK_APERTURE_START, MOCK_APERTURE_LAST)
    }

    fn pgsize_bitmap(&self) -> u64 {
        MOCK_IO_PAGE_SIZE | if self.huge { MOCK_HUGE_PAGE_SIZE } else { 0 }
    }

    fn map(&self, iova: u64, pa: u64, len: u64, _prot: Prot) -> Result<(), Errno> {
        if len == 0
            || !iova.is_multiple_of(MOCK_IO_PAGE_SIZE)
            || !pa.is_multiple_of(MOCK_IO_PAGE_SIZE)
            || !len.is_multiple_of(MOCK_IO_PAGE_SIZE)
        {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(len - 1).ok_or(Errno::EOVERFLOW)?;
        let mut pt = self.pt.lock();
        let overlap = pt
            .runs
            .range(..=last)
            .next_back()
            .is_some_and(|(&k, r)| k + r.len > iova);
        if overlap {
            return Err(Errno::EEXIST);
        }
        let mut done = 0;
        while done < len {
            let (i, p, rem) = (iova + done, pa + done, len - done);
            let n = if self.huge
                && i % MOCK_HUGE_PAGE_SIZE == 0
                && p % MOCK_HUGE_PAGE_SIZE == 0
                && rem >= MOCK_HUGE_PAGE_SIZE
            {
                rem / MOCK_HUGE_PAGE_SIZE * MOCK_HUGE_PAGE_SIZE
            } else if self.huge {
                (MOCK_HUGE_PAGE_SIZE - i % MOCK_HUGE_PAGE_SIZE).min(rem)
            } else {
                rem
            };
            let huge = self.huge
                && n % MOCK_HUGE_PAGE_SIZE == 0
                && i % MOCK_HUGE_PAGE_SIZE == 0
                && p % MOCK_HUGE_PAGE_SIZE == 0;
            pt.runs.insert(
                i,
                MockRun {
                    pa: p,
                    len: n,
                    huge,
                },
            );
            done += n;
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let last = iova.saturating_add(len - 1);
        let mut pt = self.pt.lock();
        let first = pt
            .runs
            .range(..=iova)
            .next_back()
            .filter(|&(&k, r)| k + r.len > iova)
            .map(|(&k, _)| k)
            .unwrap_or(iova);
        let mut removed = 0;
        let mut cur = first;
        while let Some((&k, &r)) = pt.runs.range(cur..=last).next() {
            pt.runs.remove(&k);
            let r_last = k + r.len - 1;
            let lo = k.max(iova);
            let hi = r_last.min(last);
            removed += hi - lo + 1;
            if k < lo {
                pt.runs.insert(
                    k,
                    MockRun {
                        pa: r.pa,
                        len: lo - k,
                        huge: false,
                    },
                );
            }
            if r_last > hi {
                pt.runs.insert(
                    hi + 1,
                    MockRun {
                        pa: r.pa + (hi + 1 - k),
                        len: r_last - hi,
                        huge: false,
                    },
                );
            }
            match r_last.checked_add(1) {
                Some(n) if n <= last => cur = n,
                _ => break,
            }
        }
        if !pt.dirty.is_empty() {
            let dirty: Vec<u64> = pt.dirty.range(iova..=last).copied().collect();
            for d in dirty {
                pt.dirty.remove(&d);
            }
        }
        removed
    }

    fn supports_dirty_tracking(&self) -> bool {
        self.dirty_ops
    }

    fn set_dirty_tracking(&self, enable: bool) -> Result<(), Errno> {
        if !self.dirty_ops {
            return Err(Errno::EOPNOTSUPP);
        }
        self.tracking.store(enable, Ordering::Relaxed);
        Ok(())
    }

    fn read_and_clear_dirty(
        &self,
        iova: u64,
        len: u64,
        no_clear: bool,
        dirty: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<(), Errno> {
        if !self.dirty_ops {
            return Err(Errno::EOPNOTSUPP);
        }
        if dirty.is_some() && !self.dirty_tracking() {
            return Err(Errno::EINVAL);
        }
        if len == 0 {
            return Ok(());
        }
        let last = iova.saturating_add(len - 1);
        let mut pt = self.pt.lock();
        // A dirty huge page starting below `iova` still covers it.
        let from = iova.saturating_sub(MOCK_HUGE_PAGE_SIZE - 1);
        let hits: Vec<u64> = pt.dirty.range(from..=last).copied().collect();
        let mut dirty = dirty;
        for base in hits {
            let g = pt
                .runs
                .range(..=base)
                .next_back()
                .map(|(_, r)| self.granule(r))
                .unwrap_or(MOCK_IO_PAGE_SIZE);
            if base + g - 1 < iova {
                continue;
            }
            if let Some(f) = dirty.as_mut() {
                f(base, g);
            }
            if !no_clear {
                pt.dirty.remove(&base);
            }
        }
        Ok(())
    }

    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        let pt = self.pt.lock();
        let (&k, r) = pt.runs.range(..=iova).next_back()?;
        (iova - k < r.len).then(|| r.pa + (iova - k))
    }
}

/// A mock nested domain: four "IOTLB" words.
pub struct MockNested {
    viommu: Option<Arc<MockViommu>>,
    iotlb: Mutex<[u32; 4]>,
}

impl MockNested {
    pub fn iotlb(&self, idx: u32) -> Option<u32> {
        self.iotlb.lock().get(idx as usize).copied()
    }
}

/// `__mock_domain_alloc_nested`'s data parsing: type 0xdead (EOPNOTSUPP), exactly 4 bytes
/// (EINVAL), a readable pointer (EFAULT).
fn parse_nested_data(data: &UserData<'_>) -> Result<u32, Errno> {
    if data.data_type != IOMMU_HWPT_DATA_SELFTEST {
        return Err(Errno::EOPNOTSUPP);
    }
    if data.len != 4 {
        return Err(Errno::EINVAL);
    }
    let b = data.copy_struct(IOMMU_HWPT_DATA_SELFTEST, 4, 4)?;
    Ok(le32(&b, 0))
}

impl NestedDomain for MockNested {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn supports_cache_invalidate_user(&self) -> bool {
        true
    }

    fn cache_invalidate_user(&self, array: &mut InvalidateArray<'_>) -> Result<(), Errno> {
        let mut processed = 0;
        let r = (|| {
            if array.data_type != IOMMU_HWPT_INVALIDATE_DATA_SELFTEST {
                return Err(Errno::EINVAL);
            }
            for i in 0..array.entry_num {
                let e = array.copy_entry(i, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, 8)?;
                let (flags, id) = (le32(&e, 0), le32(&e, 4));
                if flags & !IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                if id > MOCK_NESTED_DOMAIN_IOTLB_ID_MAX {
                    return Err(Errno::EINVAL);
                }
                let mut t = self.iotlb.lock();
                if flags & IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                    *t = [0; 4];
                } else {
                    t[id as usize] = 0;
                }
                processed += 1;
            }
            Ok(())
        })();
        array.entry_num = processed;
        r
    }
}

/// The mock vIOMMU (type 0xdeadbeef).
pub struct MockViommu {
    me: Weak<MockViommu>,
    iommu: Arc<MockIommu>,
    core: ViommuCore,
    kvm: Option<KvmRef>,
    mmap_offset: Mutex<Option<u64>>,
    queues: Mutex<[Option<HwQueueInit>; IOMMU_TEST_HW_QUEUE_MAX as usize]>,
    destroyed: AtomicBool,
}

impl MockViommu {
    /// The KVM handle the vIOMMU was created with (from the device's bind).
    pub fn kvm(&self) -> Option<&KvmRef> {
        self.kvm.as_ref()
    }
    /// The core services handle this vIOMMU was created with.
    pub fn core(&self) -> &ViommuCore {
        &self.core
    }
    /// HW queue `index` as the driver set it up.
    pub fn hw_queue(&self, index: u32) -> Option<HwQueueInit> {
        self.queues.lock().get(index as usize).copied().flatten()
    }
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Relaxed)
    }
}

impl Viommu for MockViommu {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn destroy(&self) {
        if let Some(off) = self.mmap_offset.lock().take() {
            self.core.destroy_mmap(off);
        }
        self.destroyed.store(true, Ordering::Relaxed);
    }

    fn supports_nested(&self) -> bool {
        true
    }

    fn alloc_domain_nested(
        &self,
        flags: u32,
        data: &mut UserData<'_>,
    ) -> Result<Arc<dyn NestedDomain>, Errno> {
        if flags & !hwpt_flags::PASID != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let iotlb = parse_nested_data(data)?;
        Ok(Arc::new(MockNested {
            viommu: self.me.upgrade(),
            iotlb: Mutex::new([iotlb; 4]),
        }))
    }

    fn supports_cache_invalidate(&self) -> bool {
        true
    }

    fn cache_invalidate(&self, array: &mut InvalidateArray<'_>) -> Result<(), Errno> {
        if array.entry_num == 0 && array.data_type == IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST {
            return Ok(());
        }
        let cmds = match array.copy_all(IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST, 12) {
            Ok(c) => c,
            Err(e) => {
                array.entry_num = 0;
                return Err(e);
            }
        };
        let mut done = 0;
        let r = (|| {
            for c in &cmds {
                let (flags, vdev_id, cache_id) = (le32(c, 0), le32(c, 4), le32(c, 8));
                if flags & !IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                if cache_id > MOCK_DEV_CACHE_ID_MAX {
                    return Err(Errno::EINVAL);
                }
                let dev = self
                    .core
                    .find_device(u64::from(vdev_id))
                    .ok_or(Errno::EINVAL)?;
                let m = dev
                    .as_any()
                    .downcast_ref::<MockDevice>()
                    .ok_or(Errno::EINVAL)?;
                let mut st = m.state.lock();
                if flags & IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                    st.cache = [0; 4];
                } else {
                    st.cache[cache_id as usize] = 0;
                }
                done += 1;
            }
            Ok(())
        })();
        array.entry_num = done;
        r
    }

    fn hw_queue_supported(&self, queue_type: u32) -> bool {
        queue_type == IOMMU_HW_QUEUE_TYPE_SELFTEST
    }

    fn hw_queue_init(&self, q: &HwQueueInit) -> Result<(), Errno> {
        if q.index >= IOMMU_TEST_HW_QUEUE_MAX {
            return Err(Errno::EINVAL);
        }
        let mut qs = self.queues.lock();
        let i = q.index as usize;
        if qs[i].is_some() {
            return Err(Errno::EEXIST);
        }
        if i > 0 && qs[i - 1].is_none() {
            return Err(Errno::EIO);
        }
        qs[i] = Some(*q);
        Ok(())
    }

    fn hw_queue_destroy(&self, index: u32) {
        if let Some(slot) = self.queues.lock().get_mut(index as usize) {
            *slot = None;
        }
    }
}

impl IommuDriver for MockIommu {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn hw_info(&self, _dev: &Arc<dyn IommuDevice>, in_type: u32) -> Result<HwInfo, Errno> {
        if in_type != hw_info::TYPE_DEFAULT && in_type != IOMMU_HW_INFO_TYPE_SELFTEST {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut data = vec![0u8; 8];
        data[4..8].copy_from_slice(&IOMMU_HW_INFO_SELFTEST_REGVAL.to_le_bytes());
        Ok(HwInfo {
            data_type: IOMMU_HW_INFO_TYPE_SELFTEST,
            data,
        })
    }

    fn user_pasid_table(&self) -> bool {
        true
    }

    fn device_bound(&self, dev: &Arc<dyn IommuDevice>, events: DeviceEvents) {
        if let Some(m) = dev.as_any().downcast_ref::<MockDevice>() {
            m.state.lock().events = Some(events);
        }
    }

    fn device_unbound(&self, dev: &Arc<dyn IommuDevice>) {
        if let Some(m) = dev.as_any().downcast_ref::<MockDevice>() {
            let mut st = m.state.lock();
            st.events = None;
            st.viommu = None;
        }
    }

    fn domain_alloc_paging(
        &self,
        dev: &Arc<dyn IommuDevice>,
        flags: u32,
        data: Option<&mut UserData<'_>>,
    ) -> Result<Arc<dyn PagingDomain>, Errno> {
        let valid = hwpt_flags::DIRTY_TRACKING | hwpt_flags::NEST_PARENT | hwpt_flags::PASID;
        if flags & !valid != 0 || data.is_some() {
            return Err(Errno::EOPNOTSUPP);
        }
        let m = dev
            .as_any()
            .downcast_ref::<MockDevice>()
            .ok_or(Errno::EINVAL)?;
        let dirty = flags & hwpt_flags::DIRTY_TRACKING != 0;
        if dirty && m.flags & MOCK_FLAGS_DEVICE_NO_DIRTY != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(Arc::new(MockDomain {
            huge: m.flags & MOCK_FLAGS_DEVICE_HUGE_IOVA != 0,
            dirty_ops: dirty,
            nest_parent: flags & hwpt_flags::NEST_PARENT != 0,
            tracking: AtomicBool::new(false),
            pt: Mutex::new(MockPt::default()),
        }))
    }

    fn supports_nested(&self) -> bool {
        true
    }

    fn domain_alloc_nested(
        &self,
        _dev: &Arc<dyn IommuDevice>,
        parent: &Arc<dyn PagingDomain>,
        flags: u32,
        data: &mut UserData<'_>,
    ) -> Result<Arc<dyn NestedDomain>, Errno> {
        if flags & !hwpt_flags::PASID != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let iotlb = parse_nested_data(data)?;
        if parent.as_any().downcast_ref::<MockDomain>().is_none() {
            return Err(Errno::EINVAL);
        }
        Ok(Arc::new(MockNested {
            viommu: None,
            iotlb: Mutex::new([iotlb; 4]),
        }))
    }

    fn viommu_supported(&self, _dev: &Arc<dyn IommuDevice>, viommu_type: u32) -> bool {
        viommu_type == IOMMU_VIOMMU_TYPE_SELFTEST
    }

    fn viommu_alloc(&self, req: ViommuAlloc<'_, '_>) -> Result<Arc<dyn Viommu>, Errno> {
        let iommu = self.me.upgrade().ok_or(Errno::ENODEV)?;
        let v = Arc::new_cyclic(|me| MockViommu {
            me: me.clone(),
            iommu,
            core: req.core.clone(),
            kvm: req.kvm.cloned(),
            mmap_offset: Mutex::new(None),
            queues: Mutex::new([None; IOMMU_TEST_HW_QUEUE_MAX as usize]),
            destroyed: AtomicBool::new(false),
        });
        if let Some(data) = req.data {
            // iommu_viommu_selftest {in_data, out_data, out_mmap_offset, out_mmap_length}
            let b = data.copy_struct(IOMMU_VIOMMU_TYPE_SELFTEST, 8, 24)?;
            let in_data = le32(&b, 0);
            let pa = v.iommu.alloc_pages(2);
            let offset = req.core.alloc_mmap(pa, 2 * PAGE_SIZE)?;
            v.iommu.mem.write_phys(pa, &in_data.to_le_bytes())?;
            let mut out = [0u8; 24];
            out[0..4].copy_from_slice(&in_data.to_le_bytes());
            out[4..8].copy_from_slice(&in_data.to_le_bytes());
            out[8..16].copy_from_slice(&offset.to_le_bytes());
            out[16..24].copy_from_slice(&(2 * PAGE_SIZE).to_le_bytes());
            if let Err(e) = data.copy_to_user(IOMMU_VIOMMU_TYPE_SELFTEST, 8, &out) {
                req.core.destroy_mmap(offset);
                return Err(e);
            }
            *v.mmap_offset.lock() = Some(offset);
        }
        Ok(v)
    }

    fn attach_dev(
        &self,
        dev: &Arc<dyn IommuDevice>,
        pasid: u32,
        domain: &Domain,
        _old: Option<&Domain>,
    ) -> Result<(), Errno> {
        let m = dev
            .as_any()
            .downcast_ref::<MockDevice>()
            .ok_or(Errno::EINVAL)?;
        let mut new_viommu: Option<(ViommuCore, u64)> = None;
        match domain {
            Domain::Paging(d) => {
                let md = d
                    .as_any()
                    .downcast_ref::<MockDomain>()
                    .ok_or(Errno::EINVAL)?;
                if md.dirty_ops && m.flags & MOCK_FLAGS_DEVICE_NO_DIRTY != 0 {
                    return Err(Errno::EINVAL);
                }
            }
            Domain::Nested(n) => {
                let mn = n
                    .as_any()
                    .downcast_ref::<MockNested>()
                    .ok_or(Errno::EINVAL)?;
                if let Some(v) = &mn.viommu {
                    let id = v.core.virt_id_of(dev).ok_or(Errno::ENOENT)?;
                    new_viommu = Some((v.core.clone(), id));
                }
            }
        }
        let mut st = m.state.lock();
        if pasid == IOMMU_TEST_PASID_RESERVED {
            if st.pasid_1024_fake_error {
                st.pasid_1024_fake_error = false;
                return Err(Errno::ENOMEM);
            }
            st.pasid_1024_fake_error = true;
        }
        if pasid == NO_PASID {
            st.viommu = new_viommu;
        }
        Ok(())
    }

    fn detach_dev(&self, dev: &Arc<dyn IommuDevice>, pasid: u32, _old: &Domain) {
        if let Some(m) = dev.as_any().downcast_ref::<MockDevice>() {
            let mut st = m.state.lock();
            if pasid == IOMMU_TEST_PASID_RESERVED {
                st.pasid_1024_fake_error = false;
            }
            if pasid == NO_PASID {
                st.viommu = None;
            }
        }
    }

    fn page_response(&self, dev: &Arc<dyn IommuDevice>, resp: &PageResponse) {
        if let Some(m) = dev.as_any().downcast_ref::<MockDevice>() {
            m.state.lock().responses.push(*resp);
        }
    }
}

/// IOMMU_TEST_OP_MOCK_DOMAIN(_FLAGS): a new mock device with `dev_flags`, bound and attached
/// to `pt_id` (§5.2).
pub fn mock_domain(
    ictx: &Iommufd,
    iommu: &Arc<MockIommu>,
    pt_id: ObjectId,
    dev_flags: u32,
) -> Result<(SelftestDomain, Arc<MockDevice>), Errno> {
    let dev = iommu.new_device(dev_flags)?;
    let ids = ictx.selftest_mock_domain(Arc::clone(&dev) as Arc<dyn IommuDevice>, pt_id)?;
    Ok((ids, dev))
}

/// The mock paging domain of a HWPT (ENOENT if not HWPT_PAGING, EINVAL if not the mock's).
pub fn mock_domain_of(ictx: &Iommufd, hwpt_id: ObjectId) -> Result<Arc<dyn PagingDomain>, Errno> {
    let d = ictx.paging_domain(hwpt_id)?;
    if d.as_any().downcast_ref::<MockDomain>().is_none() {
        return Err(Errno::EINVAL);
    }
    Ok(d)
}

/// IOMMU_TEST_OP_MD_CHECK_MAP: every mock IO page of `[iova, iova + length)` translates to
/// `pa + k` (the physical pages behind the caller's buffer).
pub fn md_check_map(
    ictx: &Iommufd,
    hwpt_id: ObjectId,
    iova: u64,
    length: u64,
    pa: u64,
) -> Result<(), Errno> {
    if !iova.is_multiple_of(MOCK_IO_PAGE_SIZE)
        || !length.is_multiple_of(MOCK_IO_PAGE_SIZE)
        || !pa.is_multiple_of(MOCK_IO_PAGE_SIZE)
        || pa.checked_add(length).is_none()
    {
        return Err(Errno::EINVAL);
    }
    let d = mock_domain_of(ictx, hwpt_id)?;
    let mut off = 0;
    while off < length {
        if d.iova_to_phys(iova + off) != Some(pa + off) {
            return Err(Errno::EINVAL);
        }
        off += MOCK_IO_PAGE_SIZE;
    }
    Ok(())
}

/// IOMMU_TEST_OP_DIRTY.
pub fn dirty(
    ictx: &Iommufd,
    hwpt_id: ObjectId,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &[u8],
) -> Result<u64, Errno> {
    if page_size == 0
        || length == 0
        || !iova.is_multiple_of(page_size)
        || !length.is_multiple_of(page_size)
        || bitmap.is_empty()
    {
        return Err(Errno::EINVAL);
    }
    let d = ictx.paging_domain(hwpt_id)?;
    let md = d
        .as_any()
        .downcast_ref::<MockDomain>()
        .ok_or(Errno::EINVAL)?;
    md.mark_dirty(iova, length, page_size, bitmap)
}

/// IOMMU_TEST_OP_MD_CHECK_IOTLB.
pub fn md_check_iotlb(
    ictx: &Iommufd,
    hwpt_id: ObjectId,
    idx: u32,
    expected: u32,
) -> Result<(), Errno> {
    let d = ictx.nested_domain(hwpt_id)?;
    let n = d
        .as_any()
        .downcast_ref::<MockNested>()
        .ok_or(Errno::EINVAL)?;
    match n.iotlb(idx) {
        Some(v) if idx <= MOCK_NESTED_DOMAIN_IOTLB_ID_MAX && v == expected => Ok(()),
        _ => Err(Errno::EINVAL),
    }
}

/// IOMMU_TEST_OP_DEV_CHECK_CACHE.
pub fn dev_check_cache(
    ictx: &Iommufd,
    dev_id: ObjectId,
    idx: u32,
    expected: u32,
) -> Result<(), Errno> {
    with_mock_device(ictx, dev_id, |m| match m.cache(idx) {
        Some(v) if idx <= MOCK_DEV_CACHE_ID_MAX && v == expected => Ok(()),
        _ => Err(Errno::EINVAL),
    })
}

/// `f` on the mock device behind `dev_id` (ENOENT if none, EINVAL if not the mock's).
fn with_mock_device<R>(
    ictx: &Iommufd,
    dev_id: ObjectId,
    f: impl FnOnce(&MockDevice) -> Result<R, Errno>,
) -> Result<R, Errno> {
    let d = ictx.device_handle(dev_id)?;
    let m = d
        .as_any()
        .downcast_ref::<MockDevice>()
        .ok_or(Errno::EINVAL)?;
    f(m)
}

/// IOMMU_TEST_OP_TRIGGER_IOPF (always succeeds once the device exists).
pub fn trigger_iopf(
    ictx: &Iommufd,
    dev_id: ObjectId,
    pasid: u32,
    grpid: u32,
    perm: u32,
    addr: u64,
) -> Result<(), Errno> {
    with_mock_device(ictx, dev_id, |m| {
        m.trigger_iopf(pasid, grpid, perm, addr);
        Ok(())
    })
}

/// IOMMU_TEST_OP_TRIGGER_VEVENT.
pub fn trigger_vevent(ictx: &Iommufd, dev_id: ObjectId) -> Result<(), Errno> {
    with_mock_device(ictx, dev_id, MockDevice::trigger_vevent)
}

/// The selftest's access (IOMMU_TEST_OP_CREATE_ACCESS): pinned items by id, released by its
/// unmap callback when the IOAS range goes away.
pub struct MockAccess {
    ictx: Iommufd,
    id: ObjectId,
    needs_pin: bool,
    items: Mutex<BTreeMap<u32, (u64, u64)>>,
    next_item: Mutex<u32>,
    /// Unmap callbacks received, for tests.
    pub unmaps: Mutex<Vec<(u64, u64)>>,
    /// When set, the unmap callback ignores requests (to exercise EDEADLK).
    pub stubborn: AtomicBool,
}

struct MockAccessOps(Weak<MockAccess>);

impl AccessOps for MockAccessOps {
    fn unmap(&self, ictx: &Iommufd, access: ObjectId, iova: u64, length: u64) {
        let Some(a) = self.0.upgrade() else { return };
        a.unmaps.lock().push((iova, length));
        if a.stubborn.load(Ordering::Relaxed) {
            return;
        }
        let last = iova.saturating_add(length.saturating_sub(1));
        let hit: Vec<(u32, (u64, u64))> = a
            .items
            .lock()
            .iter()
            .filter(|&(_, &(i, l))| i <= last && iova < i + l)
            .map(|(&k, &v)| (k, v))
            .collect();
        for (k, (i, l)) in hit {
            ictx.access_unpin_pages(access, i, l);
            a.items.lock().remove(&k);
        }
    }
}

/// MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES
pub const MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES: u32 = 1 << 0;
/// ACCESS_PAGES flag: pin for writing.
pub const MOCK_FLAGS_ACCESS_WRITE: u32 = 1 << 0;
pub const MOCK_FLAGS_ACCESS_SYZ: u32 = 1 << 16;
pub const MOCK_ACCESS_RW_WRITE: u32 = 1 << 0;
pub const MOCK_ACCESS_RW_SLOW_PATH: u32 = 1 << 2;

impl MockAccess {
    /// CREATE_ACCESS on `ioas_id` (flags ⊄ {NEEDS_PIN_PAGES} → EOPNOTSUPP).
    pub fn create(ictx: &Iommufd, ioas_id: ObjectId, flags: u32) -> Result<Arc<MockAccess>, Errno> {
        if flags & !MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let needs_pin = flags & MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES != 0;
        let mut result = Err(Errno::ENOENT);
        let a = Arc::new_cyclic(|me: &Weak<MockAccess>| {
            let ops: Arc<dyn AccessOps> = Arc::new(MockAccessOps(me.clone()));
            result = ictx
                .access_create(ioas_id, Some(ops), needs_pin)
                .map(|id| (id, needs_pin));
            MockAccess {
                ictx: ictx.clone(),
                id: result.map(|r| r.0).unwrap_or(ObjectId(0)),
                needs_pin,
                items: Mutex::new(BTreeMap::new()),
                next_item: Mutex::new(0),
                unmaps: Mutex::new(Vec::new()),
                stubborn: AtomicBool::new(false),
            }
        });
        result.map(|_| a)
    }

    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// ACCESS_PAGES: returns the item id and the pinned pages' physical addresses.
    pub fn pin_pages(&self, flags: u32, iova: u64, length: u64) -> Result<(u32, Vec<u64>), Errno> {
        if length > MOCK_ACCESS_MAX {
            return Err(Errno::ENOMEM);
        }
        if flags & !(MOCK_FLAGS_ACCESS_WRITE | MOCK_FLAGS_ACCESS_SYZ) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if !self.needs_pin {
            return Err(Errno::EOPNOTSUPP);
        }
        let pas = self.ictx.access_pin_pages(
            self.id,
            iova,
            length,
            flags & MOCK_FLAGS_ACCESS_WRITE != 0,
        )?;
        let mut next = self.next_item.lock();
        let item = *next;
        *next += 1;
        self.items.lock().insert(item, (iova, length));
        Ok((item, pas))
    }

    /// DESTROY_ACCESS_PAGES: unknown item → ENOENT.
    pub fn destroy_pages(&self, item: u32) -> Result<(), Errno> {
        let (iova, len) = self.items.lock().remove(&item).ok_or(Errno::ENOENT)?;
        self.ictx.access_unpin_pages(self.id, iova, len);
        Ok(())
    }

    /// ACCESS_RW.
    pub fn rw(&self, iova: u64, buf: &mut [u8], flags: u32) -> Result<(), Errno> {
        if buf.len() as u64 > MOCK_ACCESS_MAX {
            return Err(Errno::ENOMEM);
        }
        if flags & !(MOCK_ACCESS_RW_WRITE | MOCK_ACCESS_RW_SLOW_PATH | MOCK_FLAGS_ACCESS_SYZ) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        self.ictx
            .access_rw(self.id, iova, buf, flags & MOCK_ACCESS_RW_WRITE != 0)
    }

    /// ACCESS_REPLACE_IOAS.
    pub fn replace_ioas(&self, ioas_id: ObjectId) -> Result<(), Errno> {
        self.ictx.access_replace_ioas(self.id, ioas_id)
    }

    /// Items currently pinned.
    pub fn items(&self) -> usize {
        self.items.lock().len()
    }

    /// close() of the access fd: unpin every item and destroy the access.
    pub fn close(&self) -> Result<(), Errno> {
        let items: Vec<(u64, u64)> = std::mem::take(&mut *self.items.lock())
            .into_values()
            .collect();
        for (i, l) in items {
            self.ictx.access_unpin_pages(self.id, i, l);
        }
        self.ictx.access_destroy(self.id)
    }
}
