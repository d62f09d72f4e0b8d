//! Identifiers, ABI constants and the user-memory views the driver boundary exchanges.

use std::fmt;

use crate::Errno;

/// The host page size the model uses (iommufd.md §7: the selftest's PAGE_SIZE on 4 KiB hosts).
pub const PAGE_SIZE: u64 = 4096;
/// The transparent huge page size, which caps automatic IOVA alignment (iommufd.md §3.5.1).
pub const HPAGE_SIZE: u64 = 2 << 20;
/// `ULONG_MAX` on a 64-bit kernel.
pub const ULONG_MAX: u64 = u64::MAX;
/// PASID value meaning "no PASID" (the RID attachment), `IOMMU_NO_PASID`.
pub const NO_PASID: u32 = 0;

/// An object ID in a context: lowest free value ≥ 1, reused after destroy (iommufd.md §1.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub u32);

impl ObjectId {
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Object types (the kernel's internal `enum iommufd_object_type`, iommufd.md §4.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum ObjectType {
    Device = 1,
    HwptPaging = 2,
    HwptNested = 3,
    Ioas = 4,
    Access = 5,
    Fault = 6,
    Viommu = 7,
    Vdevice = 8,
    Veventq = 9,
    HwQueue = 10,
    Selftest = 11,
}

/// An inclusive IOVA range, `struct iommu_iova_range {start, last}`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

impl IovaRange {
    pub const fn new(start: u64, last: u64) -> Self {
        IovaRange { start, last }
    }
}

/// IOMMU_IOAS_MAP / COPY flags.
pub mod map_flags {
    pub const FIXED_IOVA: u32 = 1 << 0;
    pub const WRITEABLE: u32 = 1 << 1;
    pub const READABLE: u32 = 1 << 2;
    pub const ALL: u32 = FIXED_IOVA | WRITEABLE | READABLE;
}

/// IOMMU_HWPT_ALLOC flags and data types.
pub mod hwpt_flags {
    pub const NEST_PARENT: u32 = 1 << 0;
    pub const DIRTY_TRACKING: u32 = 1 << 1;
    pub const FAULT_ID_VALID: u32 = 1 << 2;
    pub const PASID: u32 = 1 << 3;
}

/// `enum iommu_hwpt_data_type`.
pub mod hwpt_data {
    pub const NONE: u32 = 0;
    pub const VTD_S1: u32 = 1;
    pub const ARM_SMMUV3: u32 = 2;
}

/// `enum iommu_hw_info_type` and capabilities.
pub mod hw_info {
    pub const TYPE_DEFAULT: u32 = 0;
    pub const TYPE_INTEL_VTD: u32 = 1;
    pub const TYPE_ARM_SMMUV3: u32 = 2;
    pub const TYPE_TEGRA241_CMDQV: u32 = 3;
    pub const FLAG_INPUT_TYPE: u32 = 1 << 0;
    pub const CAP_DIRTY_TRACKING: u64 = 1 << 0;
    pub const CAP_PCI_PASID_EXEC: u64 = 1 << 1;
    pub const CAP_PCI_PASID_PRIV: u64 = 1 << 2;
}

/// IOMMU_OPTION ids and ops.
pub mod option {
    pub const RLIMIT_MODE: u32 = 0;
    pub const HUGE_PAGES: u32 = 1;
    pub const OP_SET: u16 = 0;
    pub const OP_GET: u16 = 1;
}

/// IOMMU_VFIO_IOAS ops.
pub mod vfio_ioas_op {
    pub const GET: u16 = 0;
    pub const SET: u16 = 1;
    pub const CLEAR: u16 = 2;
}

/// `enum iommu_viommu_type`.
pub mod viommu_type {
    pub const DEFAULT: u32 = 0;
    pub const ARM_SMMUV3: u32 = 1;
    pub const TEGRA241_CMDQV: u32 = 2;
}

/// `enum iommu_veventq_type` and the record header flag.
pub mod veventq_type {
    pub const DEFAULT: u32 = 0;
    pub const ARM_SMMUV3: u32 = 1;
    pub const TEGRA241_CMDQV: u32 = 2;
    /// `IOMMU_VEVENTQ_FLAG_LOST_EVENTS` in `iommufd_vevent_header.flags`.
    pub const FLAG_LOST_EVENTS: u32 = 1 << 0;
}

/// `enum iommu_hw_queue_type`.
pub mod hw_queue_type {
    pub const DEFAULT: u32 = 0;
    pub const TEGRA241_CMDQV: u32 = 1;
}

/// `enum iommu_hwpt_invalidate_data_type`.
pub mod invalidate_data {
    pub const VTD_S1: u32 = 0;
    pub const VIOMMU_ARM_SMMUV3: u32 = 1;
}

/// Dirty tracking flags.
pub mod dirty_flags {
    /// IOMMU_HWPT_DIRTY_TRACKING_ENABLE
    pub const ENABLE: u32 = 1 << 0;
    /// IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
    pub const NO_CLEAR: u32 = 1 << 0;
}

/// Page-request fault record fields (`struct iommu_hwpt_pgfault`) and responses.
pub mod fault {
    pub const FLAG_PASID_VALID: u32 = 1 << 0;
    pub const FLAG_LAST_PAGE: u32 = 1 << 1;
    pub const PERM_READ: u32 = 1 << 0;
    pub const PERM_WRITE: u32 = 1 << 1;
    pub const PERM_EXEC: u32 = 1 << 2;
    pub const PERM_PRIV: u32 = 1 << 3;
    pub const RESP_SUCCESS: u32 = 0;
    pub const RESP_INVALID: u32 = 1;
    /// sizeof(struct iommu_hwpt_pgfault)
    pub const RECORD_SIZE: usize = 40;
    /// sizeof(struct iommu_hwpt_page_response)
    pub const RESPONSE_SIZE: usize = 8;
}

/// `copy_struct_from_user(dst, ksize, src, usize)`: the kernel's extensible-struct copy.
///
/// `readable` is the prefix of the user buffer that can be read (a shorter slice than `user_len`
/// models a pointer whose tail faults; `None` a NULL pointer).
pub fn copy_struct_from_user(
    kernel_size: usize,
    readable: Option<&[u8]>,
    user_len: usize,
) -> Result<Vec<u8>, Errno> {
    let mut out = vec![0u8; kernel_size];
    let src = readable.ok_or(Errno::EFAULT)?;
    let copy = kernel_size.min(user_len);
    if user_len > kernel_size {
        // Every byte of the tail the kernel does not know must be zero (E2BIG), read first.
        let tail = src.get(kernel_size..user_len).ok_or(Errno::EFAULT)?;
        if tail.iter().any(|&b| b != 0) {
            return Err(Errno::E2BIG);
        }
    }
    let head = src.get(..copy).ok_or(Errno::EFAULT)?;
    out[..copy].copy_from_slice(head);
    Ok(out)
}

/// Driver-specific data passed with an allocation (`data_type`, `data_len`, `data_uptr` of
/// HWPT_ALLOC or VIOMMU_ALLOC), `struct iommu_user_data`.
///
/// `buf` is the user memory at `data_uptr`: `None` is a NULL pointer, and a slice shorter than
/// `len` is a pointer whose tail faults. Drivers copy in with [`UserData::copy_struct`] and may
/// write results back with [`UserData::copy_to_user`], exactly like the kernel helpers.
#[derive(Debug)]
pub struct UserData<'a> {
    pub data_type: u32,
    pub len: u32,
    pub buf: Option<&'a mut [u8]>,
}

impl<'a> UserData<'a> {
    pub fn new(data_type: u32, buf: &'a mut [u8]) -> Self {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        UserData {
            data_type,
            len,
            buf: Some(buf),
        }
    }

    /// `iommu_copy_struct_from_user`: type mismatch → EINVAL; `len < min_len` or
    /// `len > kernel_size` → EINVAL (`__iommu_copy_struct_from_user` refuses a user struct
    /// longer than the kernel's); then copied into a zeroed `kernel_size` buffer (EFAULT).
    pub fn copy_struct(
        &self,
        data_type: u32,
        min_len: usize,
        kernel_size: usize,
    ) -> Result<Vec<u8>, Errno> {
        if self.data_type != data_type {
            return Err(Errno::EINVAL);
        }
        if (self.len as usize) < min_len || (self.len as usize) > kernel_size {
            return Err(Errno::EINVAL);
        }
        copy_struct_from_user(kernel_size, self.buf.as_deref(), self.len as usize)
    }

    /// `iommu_copy_struct_to_user`: type mismatch → EINVAL, `len < min_len` or a user struct
    /// longer than `src` → EINVAL; copies the user's `len` bytes of `src` (EFAULT).
    pub fn copy_to_user(
        &mut self,
        data_type: u32,
        min_len: usize,
        src: &[u8],
    ) -> Result<(), Errno> {
        if self.data_type != data_type {
            return Err(Errno::EINVAL);
        }
        let len = self.len as usize;
        if len < min_len || len > src.len() {
            return Err(Errno::EINVAL);
        }
        let dst = self.buf.as_deref_mut().ok_or(Errno::EFAULT)?;
        let dst = dst.get_mut(..len).ok_or(Errno::EFAULT)?;
        let n = len.min(src.len());
        dst[..n].copy_from_slice(&src[..n]);
        dst[n..].fill(0);
        Ok(())
    }
}

/// An array of driver-specific invalidation entries, `struct iommu_user_data_array`, as
/// IOMMU_HWPT_INVALIDATE hands it to a nested domain or a vIOMMU.
///
/// `entry_num` is in/out: the driver sets it to the number of entries it handled, also on
/// failure (iommufd.md §3.14). `data` is the user memory at `data_uptr` (`None` = NULL; a
/// slice shorter than `entry_len * entry_num` faults past its end).
#[derive(Debug)]
pub struct InvalidateArray<'a> {
    pub data_type: u32,
    pub entry_len: u32,
    pub entry_num: u32,
    pub data: Option<&'a [u8]>,
}

impl<'a> InvalidateArray<'a> {
    pub fn new(data_type: u32, entry_len: u32, entry_num: u32, data: &'a [u8]) -> Self {
        InvalidateArray {
            data_type,
            entry_len,
            entry_num,
            data: Some(data),
        }
    }

    fn entry_bytes(&self, index: u32) -> Option<&[u8]> {
        let data = self.data?;
        let start = (index as usize).checked_mul(self.entry_len as usize)?;
        data.get(start.min(data.len())..)
    }

    /// `iommu_copy_struct_from_user_array` (one entry): index out of range, type mismatch,
    /// `entry_len < min_len` or `entry_len > kernel_size` → EINVAL (iommufd.md §3.14, the
    /// single-entry helper); then the entry is copied zero-extended (EFAULT on a fault).
    pub fn copy_entry(
        &self,
        index: u32,
        data_type: u32,
        min_len: usize,
        kernel_size: usize,
    ) -> Result<Vec<u8>, Errno> {
        if index >= self.entry_num {
            return Err(Errno::EINVAL);
        }
        if self.data_type != data_type {
            return Err(Errno::EINVAL);
        }
        let entry_len = self.entry_len as usize;
        if entry_len < min_len || entry_len > kernel_size {
            return Err(Errno::EINVAL);
        }
        if self.data.is_none() {
            return Err(Errno::EFAULT);
        }
        copy_struct_from_user(kernel_size, self.entry_bytes(index), entry_len)
    }

    /// `iommu_copy_struct_from_full_user_array`: type mismatch or `entry_num == 0` → EINVAL;
    /// every entry copied with `copy_struct_from_user` (shorter entries zero-extended, a
    /// non-zero tail → E2BIG, a fault → EFAULT). All or nothing.
    pub fn copy_all(&self, data_type: u32, kernel_size: usize) -> Result<Vec<Vec<u8>>, Errno> {
        if self.data_type != data_type {
            return Err(Errno::EINVAL);
        }
        if self.entry_num == 0 {
            return Err(Errno::EINVAL);
        }
        if self.data.is_none() {
            return Err(Errno::EFAULT);
        }
        (0..self.entry_num)
            .map(|i| {
                copy_struct_from_user(kernel_size, self.entry_bytes(i), self.entry_len as usize)
            })
            .collect()
    }
}

/// Mapping permissions of an area (IOMMU_READ / IOMMU_WRITE).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct Prot {
    pub read: bool,
    pub write: bool,
}

impl Prot {
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
    pub const RO: Prot = Prot {
        read: true,
        write: false,
    };
    pub(crate) fn from_map_flags(flags: u32) -> Prot {
        Prot {
            read: flags & map_flags::READABLE != 0,
            write: flags & map_flags::WRITEABLE != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_struct_extends_and_checks_tail() {
        assert_eq!(
            copy_struct_from_user(4, Some(&[1, 2]), 2).unwrap(),
            vec![1, 2, 0, 0]
        );
        assert_eq!(
            copy_struct_from_user(2, Some(&[1, 2, 0, 0]), 4).unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            copy_struct_from_user(2, Some(&[1, 2, 0, 9]), 4),
            Err(Errno::E2BIG)
        );
        assert_eq!(copy_struct_from_user(2, None, 4), Err(Errno::EFAULT));
        assert_eq!(copy_struct_from_user(4, Some(&[1]), 4), Err(Errno::EFAULT));
    }

    #[test]
    fn invalidate_array_entry_rules() {
        let bytes = [1u8, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0];
        let a = InvalidateArray::new(7, 4, 3, &bytes);
        assert_eq!(
            a.copy_entry(1, 7, 4, 8).unwrap(),
            vec![2, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(a.copy_entry(1, 8, 4, 8), Err(Errno::EINVAL));
        assert_eq!(a.copy_entry(3, 7, 4, 8), Err(Errno::EINVAL));
        assert_eq!(a.copy_entry(0, 7, 8, 8), Err(Errno::EINVAL));
        assert_eq!(a.copy_entry(0, 7, 2, 2), Err(Errno::EINVAL));
        // Entries longer than the kernel struct: a zero tail is fine, a non-zero one E2BIG.
        assert_eq!(
            a.copy_all(7, 2).unwrap(),
            vec![vec![1, 0], vec![2, 0], vec![3, 0]]
        );
        let wide = [1u8, 0, 0, 0, 2, 0, 0, 9];
        let w = InvalidateArray::new(7, 4, 2, &wide);
        assert_eq!(w.copy_all(7, 2), Err(Errno::E2BIG));
        assert_eq!(w.copy_all(8, 4), Err(Errno::EINVAL));
        let short = InvalidateArray::new(7, 4, 4, &bytes);
        assert_eq!(short.copy_all(7, 4), Err(Errno::EFAULT));
        assert_eq!(short.copy_entry(3, 7, 4, 4), Err(Errno::EFAULT));
    }

    #[test]
    fn user_data_copy_rules() {
        let mut buf = [0xffu8; 6];
        let mut d = UserData::new(5, &mut buf);
        // A user struct longer than the kernel's is refused, as is a type mismatch.
        assert_eq!(d.copy_to_user(5, 2, &[1, 2, 3]), Err(Errno::EINVAL));
        assert_eq!(d.copy_to_user(6, 2, &[0; 8]), Err(Errno::EINVAL));
        d.copy_to_user(5, 2, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(buf, [1, 2, 3, 4, 5, 6]);
        let mut small = [1u8, 2];
        let d = UserData::new(5, &mut small);
        assert_eq!(d.copy_struct(5, 2, 4).unwrap(), vec![1, 2, 0, 0]);
        assert_eq!(d.copy_struct(5, 3, 4), Err(Errno::EINVAL));
        assert_eq!(d.copy_struct(5, 1, 1), Err(Errno::EINVAL));
        let null = UserData {
            data_type: 5,
            len: 2,
            buf: None,
        };
        assert_eq!(null.copy_struct(5, 2, 4), Err(Errno::EFAULT));
    }
}
