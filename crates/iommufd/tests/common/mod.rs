//! Test support shared by the integration tests: the selftest's global buffer as host memory,
//! a file-kind backing, and short helpers over the API.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use twinmmu_hw::SparseMem;
use twinmmu_iommufd::mock::{self, MockDevice, MockIommu};
use twinmmu_iommufd::*;

/// Host memory: one sparse physical memory; "user memory" is the identity-mapped physical
/// range [0, MEM_SIZE) of a PhysBacking, like the selftest's process memory.
pub const MEM_SIZE: u64 = 512 << 20;
/// The selftest's global `buffer`: 16 pages, huge-page aligned.
pub const BUFFER: u64 = 4 << 20;
pub const BUFFER_SIZE: u64 = 16 * PAGE_SIZE;
pub const RW: u32 = map_flags::READABLE | map_flags::WRITEABLE;
pub const FIXED: u32 = map_flags::FIXED_IOVA | RW;

/// A backing whose addresses are file offsets (MAP_FILE of a memfd).
pub struct FileBacking(pub PhysBacking<Arc<SparseMem>>);

impl Backing for FileBacking {
    fn kind(&self) -> BackingKind {
        BackingKind::File
    }
    fn pin(&self, addr: u64, npages: u64, write: bool) -> Result<Vec<PhysRun>, Errno> {
        // A memfd range past the file size is EINVAL rather than EFAULT (§3.5 step 9).
        if addr.saturating_add(npages * PAGE_SIZE) > self.0.base() + self.0.len() {
            return Err(Errno::EINVAL);
        }
        self.0.pin(addr, npages, write)
    }
    fn unpin(&self, addr: u64, npages: u64) {
        self.0.unpin(addr, npages)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
        self.0.write(addr, buf)
    }
}

pub struct Env {
    pub ictx: Iommufd,
    pub iommu: Arc<MockIommu>,
    pub mem: Arc<SparseMem>,
    pub user: Arc<PhysBacking<Arc<SparseMem>>>,
    pub file: Arc<FileBacking>,
}

impl Env {
    pub fn new() -> Env {
        let mem = Arc::new(SparseMem::with_range(0, MEM_SIZE * 2).unwrap());
        let user = Arc::new(PhysBacking::new(Arc::clone(&mem), 0, MEM_SIZE));
        let file = Arc::new(FileBacking(PhysBacking::new(
            Arc::clone(&mem),
            0,
            BUFFER + BUFFER_SIZE,
        )));
        Env {
            ictx: Iommufd::new(),
            iommu: MockIommu::new(),
            mem,
            user,
            file,
        }
    }

    pub fn src(&self, addr: u64) -> MapSource {
        MapSource {
            backing: Arc::clone(&self.user) as Arc<dyn Backing>,
            addr,
        }
    }

    pub fn file_src(&self, addr: u64) -> MapSource {
        MapSource {
            backing: Arc::clone(&self.file) as Arc<dyn Backing>,
            addr,
        }
    }

    pub fn ioas(&self) -> ObjectId {
        self.ictx.ioas_alloc(0).unwrap()
    }

    pub fn map_fixed(&self, ioas: ObjectId, addr: u64, len: u64, iova: u64) -> Result<u64, Errno> {
        self.ictx.ioas_map(FIXED, ioas, self.src(addr), len, iova)
    }

    pub fn map_auto(&self, ioas: ObjectId, addr: u64, len: u64) -> Result<u64, Errno> {
        self.ictx.ioas_map(RW, ioas, self.src(addr), len, 0)
    }

    pub fn unmap(&self, ioas: ObjectId, iova: u64, len: u64) -> Result<u64, Errno> {
        self.ictx.ioas_unmap(ioas, iova, len)
    }

    /// A NEST_PARENT HWPT of `dev_id` on `ioas` and a SELFTEST vIOMMU over it, without
    /// driver data: (parent, vIOMMU).
    pub fn selftest_viommu(&self, dev_id: ObjectId, ioas: ObjectId) -> (ObjectId, ObjectId) {
        let c = &self.ictx;
        let parent = c
            .hwpt_alloc(
                hwpt_flags::NEST_PARENT,
                dev_id,
                ioas,
                &mut none_data(),
                ObjectId(0),
            )
            .unwrap();
        let v = c
            .viommu_alloc(
                0,
                mock::IOMMU_VIOMMU_TYPE_SELFTEST,
                dev_id,
                parent,
                &mut none_data(),
            )
            .unwrap();
        (parent, v)
    }

    pub fn mock_domain(
        &self,
        pt: ObjectId,
        flags: u32,
    ) -> Result<(SelftestDomain, Arc<MockDevice>), Errno> {
        mock::mock_domain(&self.ictx, &self.iommu, pt, flags)
    }

    /// MD_CHECK_REFS over `[addr, addr + len)`: long-term pins per page.
    pub fn check_refs(&self, addr: u64, len: u64, refs: u32) {
        let mut a = addr & !(PAGE_SIZE - 1);
        while a < addr + len {
            assert_eq!(self.user.pin_count(a), refs, "pins of page {a:#x}");
            a += PAGE_SIZE;
        }
    }

    /// The fixture teardown: close the context, then every page must be unpinned.
    pub fn teardown(self) {
        let Env { ictx, user, .. } = self;
        drop(ictx);
        assert_eq!(user.total_pins(), 0, "pages left pinned after close");
    }
}

pub fn none_data() -> UserData<'static> {
    UserData {
        data_type: hwpt_data::NONE,
        len: 0,
        buf: None,
    }
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A nested-HWPT data buffer (`iommu_hwpt_selftest {iotlb}`).
pub fn selftest_data(iotlb: u32) -> [u8; 4] {
    iotlb.to_le_bytes()
}

/// An `iommu_hwpt_invalidate_selftest {flags, iotlb_id}` entry.
pub fn inv_entry(flags: u32, id: u32) -> Vec<u8> {
    let mut v = flags.to_le_bytes().to_vec();
    v.extend_from_slice(&id.to_le_bytes());
    v
}

/// An `iommu_viommu_invalidate_selftest {flags, vdev_id, cache_id}` entry.
pub fn vinv_entry(flags: u32, vdev_id: u32, cache_id: u32) -> Vec<u8> {
    let mut v = flags.to_le_bytes().to_vec();
    v.extend_from_slice(&vdev_id.to_le_bytes());
    v.extend_from_slice(&cache_id.to_le_bytes());
    v
}

/// Nested-HWPT user data of the selftest type over `b`.
pub fn sdata(b: &mut [u8]) -> UserData<'_> {
    UserData::new(twinmmu_iommufd::mock::IOMMU_HWPT_DATA_SELFTEST, b)
}
