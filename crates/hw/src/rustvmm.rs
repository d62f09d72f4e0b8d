//! rust-vmm integration (`vm-memory` 0.18).
//!
//! - [`GuestPhysMem`] lets the SMMU use any `vm-memory` guest memory (for example a
//!   `GuestMemoryMmap`) as its host physical memory: the SMMU then walks tables in, and DMA
//!   lands in, the same memory a VMM's device models use.
//! - [`SmmuIommu`] implements `vm_memory::Iommu` for one (SMMU, StreamID[, SubstreamID])
//!   pair, so `vm_memory::IommuMemory` — and every rust-vmm device model written against
//!   `GuestMemory` — performs its DMA through the SMMU's translation.
//!
//! `IommuMemory` asks for translations through the `Iotlb` it reads; `SmmuIommu` fills that
//! IOTLB from the SMMU (4 KiB at a time, for exactly the access asked) and empties it
//! whenever the SMMU's invalidation epoch has moved, so a completed CMD_SYNC or broadcast
//! TLBI is honoured by the next access.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{RwLock, RwLockReadGuard};
use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, Iommu, Iotlb, Permissions};

use crate::mem::{MemError, PhysMem};
use crate::smmu::Smmu;
use crate::xlate::{Outcome, Transaction};
use twinmmu_vmsa::AccessKind;

/// Host physical memory backed by `vm-memory` guest memory.
#[derive(Debug)]
pub struct GuestPhysMem<M>(pub M);

impl<M: GuestMemoryBackend + Send + Sync> PhysMem for GuestPhysMem<M> {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0
            .read_slice(buf, GuestAddress(pa))
            .map_err(|_| MemError::Abort { addr: pa })
    }

    fn write(&self, pa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.0
            .write_slice(buf, GuestAddress(pa))
            .map_err(|_| MemError::Abort { addr: pa })
    }

    fn is_valid(&self, pa: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|l| {
            vm_memory::GuestMemory::check_range(
                &self.0,
                GuestAddress(pa),
                l,
                Permissions::ReadWrite,
            )
        })
    }
}

/// One stream of an SMMU as a `vm_memory::Iommu`.
pub struct SmmuIommu {
    smmu: Arc<Smmu>,
    sid: u32,
    ssid: Option<u32>,
    privileged: bool,
    iotlb: RwLock<Iotlb>,
    epoch: AtomicU64,
}

impl std::fmt::Debug for SmmuIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmmuIommu")
            .field("sid", &self.sid)
            .field("ssid", &self.ssid)
            .finish_non_exhaustive()
    }
}

impl SmmuIommu {
    /// The device behind `sid` (and `ssid`), issuing unprivileged accesses.
    pub fn new(smmu: Arc<Smmu>, sid: u32, ssid: Option<u32>) -> Self {
        SmmuIommu {
            smmu,
            sid,
            ssid,
            privileged: false,
            iotlb: RwLock::new(Iotlb::new()),
            epoch: AtomicU64::new(0),
        }
    }

    /// Accesses are presented as privileged (PnU = 1).
    pub fn privileged(mut self, p: bool) -> Self {
        self.privileged = p;
        self
    }

    fn fill(&self, iova: u64, length: usize, access: Permissions) -> Result<(), IommuError> {
        let kinds: &[AccessKind] = match access {
            Permissions::No => &[],
            Permissions::Read => &[AccessKind::Read],
            Permissions::Write => &[AccessKind::Write],
            Permissions::ReadWrite => &[AccessKind::Read, AccessKind::Write],
        };
        let end = iova.saturating_add(length as u64);
        let mut page = iova & !0xfff;
        let mut mappings = Vec::new();
        while page < end {
            let mut pa = None;
            for &k in kinds {
                let t = Transaction::new(self.sid, self.ssid, page, k, self.privileged);
                match self.smmu.translate(t) {
                    Outcome::Translated { pa: p } => pa = Some(p),
                    other => {
                        return Err(IommuError::CannotResolve {
                            iova_range: IovaRange {
                                base: GuestAddress(page),
                                length: 0x1000,
                            },
                            reason: format!("SMMU: {other:?}"),
                        });
                    }
                }
            }
            if let Some(pa) = pa {
                mappings.push((page, pa));
            }
            page = match page.checked_add(0x1000) {
                Some(p) => p,
                None => break,
            };
        }
        let mut tlb = self.iotlb.write();
        for (iova, pa) in mappings {
            tlb.set_mapping(GuestAddress(iova), GuestAddress(pa), 0x1000, access)?;
        }
        Ok(())
    }
}

impl Iommu for SmmuIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        // An invalidation since the last call (epoch moved) empties the IOTLB.
        let epoch = self.smmu.epoch.load(Ordering::Acquire);
        if self.epoch.swap(epoch, Ordering::AcqRel) != epoch {
            self.iotlb.write().invalidate_all();
        }
        if let Ok(it) = Iotlb::lookup(self.iotlb.read(), iova, length, access) {
            return Ok(it);
        }
        self.fill(iova.0, length, access)?;
        Iotlb::lookup(self.iotlb.read(), iova, length, access).map_err(|f| {
            IommuError::CannotResolve {
                iova_range: IovaRange { base: iova, length },
                reason: format!("not accessible after translation: {f:?}"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SmmuConfig;
    use crate::cd::{CdDw0, CdTtb, ContextDescriptor};
    use crate::mem::WalkMem;
    use crate::ste::{Ste, SteDw0};
    use twinmmu_vmsa::{BumpAllocator, Granule, PaSize, S1LeafAttrs, TableBuilder, TableFormat};
    use vm_memory::{GuestMemoryMmap, IommuMemory};

    const RAM: u64 = 0x4000_0000;

    #[test]
    fn iommu_memory_dma_goes_through_the_smmu() {
        let gm: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM), 0x100_0000)]).unwrap();
        let phys = Arc::new(GuestPhysMem(gm.clone()));
        let smmu = Smmu::new(SmmuConfig::default(), phys.clone()).unwrap();
        // Stage-1 tables in guest memory: IOVA 0x10_0000 → RAM + 0x80_0000.
        let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
        let mut b = TableBuilder::new(
            fmt,
            WalkMem(&*phys),
            BumpAllocator::new(RAM + 0x40_0000, 0x10_0000),
        )
        .unwrap();
        let attrs = S1LeafAttrs {
            el0: true,
            ..S1LeafAttrs::rw()
        };
        b.map(0x10_0000, RAM + 0x80_0000, 0x2000, attrs.bits())
            .unwrap();
        let cd = ContextDescriptor {
            dw0: CdDw0::new()
                .with_v(true)
                .with_aa64(true)
                .with_t0sz(16)
                .with_epd1(true)
                .with_ips(5)
                .with_a(true)
                .with_r(true),
            ttb0: CdTtb::new().with_ttb(b.root() >> 4),
            ..ContextDescriptor::default()
        };
        for (i, w) in cd.to_dwords().iter().enumerate() {
            phys.write_u64(RAM + 0x1000 + 8 * i as u64, *w).unwrap();
        }
        let ste = Ste {
            dw0: SteDw0::new()
                .with_v(true)
                .with_config(0b101)
                .with_s1_context_ptr((RAM + 0x1000) >> 6),
            ..Ste::default()
        };
        for (i, w) in ste.to_dwords().iter().enumerate() {
            phys.write_u64(RAM + 64 * 3 + 8 * i as u64, *w).unwrap();
        }
        smmu.mmio_write(crate::regs::off::STRTAB_BASE, 8, RAM)
            .unwrap();
        smmu.mmio_write(crate::regs::off::STRTAB_BASE_CFG, 4, 4)
            .unwrap();
        smmu.mmio_write(crate::regs::off::CR0, 4, 1).unwrap();

        let iommu = SmmuIommu::new(smmu.clone(), 3, None);
        let mem = IommuMemory::new(gm.clone(), iommu, true, ());
        // A device model writes through IommuMemory at IOVA...
        mem.write_slice(&[9, 8, 7, 6], GuestAddress(0x10_0ffe))
            .unwrap();
        // ... and the bytes land at the translated guest-physical address.
        let mut back = [0u8; 4];
        gm.read_slice(&mut back, GuestAddress(RAM + 0x80_0ffe))
            .unwrap();
        assert_eq!(back, [9, 8, 7, 6]);
        let mut via = [0u8; 4];
        mem.read_slice(&mut via, GuestAddress(0x10_0ffe)).unwrap();
        assert_eq!(via, [9, 8, 7, 6]);
        // An unmapped IOVA is refused.
        assert!(mem.read_slice(&mut via, GuestAddress(0x20_0000)).is_err());
        // Disabling the SMMU (GBPA abort) is seen at once: the epoch moved.
        smmu.mmio_write(crate::regs::off::CR0, 4, 0).unwrap();
        smmu.mmio_write(crate::regs::off::GBPA, 4, (1 << 20) | (1 << 31))
            .unwrap();
        assert!(mem.read_slice(&mut via, GuestAddress(0x10_0ffe)).is_err());
    }
}
