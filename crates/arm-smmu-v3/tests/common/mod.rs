//! A test machine: host RAM, the `hw` SMMU, the arm-smmu-v3 driver probed on it, a KVM, and
//! an iommufd context whose IOAS maps guest RAM (guest physical address g ↔ host physical
//! address GUEST_BASE + g). A guest model builds its CDs and stage-1 tables in guest memory
//! through IPAs, as a guest kernel does.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use twinmmu_arm_smmu_v3::*;
use twinmmu_hw::{FrameAllocator, PhysMem, Smmu, SmmuConfig, SparseMem};
use twinmmu_iommufd::*;
use twinmmu_kvm::{Kvm, KvmConfig, Vm, VmConfig, VmidBits};
use twinmmu_vmsa::{BumpAllocator, Granule, PaSize, S1LeafAttrs, TableBuilder, TableFormat};

pub const RAM: u64 = 0x4000_0000;
pub const RAM_SIZE: u64 = 0x8000_0000;
/// The driver's frames (stream table, queues, stage-2 tables, CDs, VINTF pages).
pub const FRAMES: u64 = RAM;
pub const FRAMES_SIZE: u64 = 0x1000_0000;
/// Guest RAM: guest PA g is host PA GUEST_BASE + g.
pub const GUEST_BASE: u64 = RAM + 0x4000_0000;
pub const GUEST_SIZE: u64 = 0x4000_0000;
/// Where the guest keeps its page tables and CDs (guest PAs).
pub const GUEST_TABLES: u64 = 0x200_0000;
pub const GUEST_TABLES_SIZE: u64 = 0x200_0000;
pub const RW: u32 = map_flags::READABLE | map_flags::WRITEABLE;
pub const FIXED: u32 = map_flags::FIXED_IOVA | RW;

pub struct Machine {
    pub mem: Arc<SparseMem>,
    pub smmu: Arc<Smmu>,
    pub drv: Arc<ArmSmmuV3>,
    pub frames: FrameAllocator,
    pub guest: Arc<PhysBacking<HwMemory>>,
}

impl Machine {
    pub fn new(cfg: SmmuConfig, opts: Options) -> Machine {
        Self::try_new(cfg, opts).unwrap()
    }

    pub fn try_new(cfg: SmmuConfig, opts: Options) -> Result<Machine, ProbeError> {
        let mem = Arc::new(SparseMem::with_range(RAM, RAM_SIZE).unwrap());
        let smmu = Smmu::new(cfg, Arc::clone(&mem) as Arc<dyn PhysMem>).unwrap();
        let frames = FrameAllocator::new(FRAMES..FRAMES + FRAMES_SIZE).unwrap();
        let drv = ArmSmmuV3::probe(Arc::clone(&smmu), frames.clone(), opts)?;
        let guest = Arc::new(PhysBacking::new(
            HwMemory(Arc::clone(&mem) as Arc<dyn PhysMem>),
            GUEST_BASE,
            GUEST_SIZE,
        ));
        Ok(Machine {
            mem,
            smmu,
            drv,
            frames,
            guest,
        })
    }

    pub fn r32(&self, off: u64) -> u32 {
        self.smmu.mmio_read(off, 4).unwrap() as u32
    }

    /// A map source for guest PA `gpa`.
    pub fn src(&self, gpa: u64) -> MapSource {
        MapSource {
            backing: Arc::clone(&self.guest) as Arc<dyn Backing>,
            addr: GUEST_BASE + gpa,
        }
    }

    pub fn hpa(&self, gpa: u64) -> u64 {
        GUEST_BASE + gpa
    }

    pub fn read(&self, pa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read(pa, &mut b).unwrap();
        b
    }

    pub fn write(&self, pa: u64, b: &[u8]) {
        self.mem.write(pa, b).unwrap();
    }

    pub fn master(&self, sid: u32) -> Arc<Master> {
        self.drv.add_master(sid, MasterOptions::default()).unwrap()
    }
}

pub fn kvm16() -> Arc<Kvm> {
    Kvm::new(KvmConfig::new(4)).unwrap()
}

pub fn kvm_with(bits: VmidBits, ncpus: usize) -> Arc<Kvm> {
    Kvm::new(KvmConfig::new(ncpus).vmid_bits(bits)).unwrap()
}

pub fn vm(kvm: &Arc<Kvm>) -> Arc<Vm> {
    kvm.create_vm(VmConfig::default())
}

pub fn none_data() -> UserData<'static> {
    UserData {
        data_type: hwpt_data::NONE,
        len: 0,
        buf: None,
    }
}

/// Guest memory seen through guest physical addresses (the guest kernel's view).
#[derive(Clone)]
pub struct GuestMem {
    pub mem: Arc<SparseMem>,
}

impl twinmmu_vmsa::Memory for GuestMem {
    fn read_u64(&self, ipa: u64) -> Result<u64, twinmmu_vmsa::MemError> {
        self.mem
            .read_u64(GUEST_BASE + ipa)
            .map_err(|_| twinmmu_vmsa::MemError { addr: ipa })
    }
}

impl twinmmu_vmsa::MemoryMut for GuestMem {
    fn write_u64(&self, ipa: u64, v: u64) -> Result<(), twinmmu_vmsa::MemError> {
        self.mem
            .write_u64(GUEST_BASE + ipa, v)
            .map_err(|_| twinmmu_vmsa::MemError { addr: ipa })
    }
}

/// The guest's SMMU driver state: its stage-1 tables and CDs in guest memory.
pub struct GuestS1 {
    pub builder: TableBuilder<GuestMem, BumpAllocator>,
    pub asid: u16,
    /// Guest PA of the guest's CD.
    pub cd_ipa: u64,
}

/// Guest stage-1 leaf attributes: normal memory, RW, unprivileged access, ASID-tagged.
pub fn guest_leaf() -> u64 {
    S1LeafAttrs {
        attr_index: 1,
        el0: true,
        not_global: true,
        ..S1LeafAttrs::rw()
    }
    .bits()
}

impl GuestS1 {
    /// A guest stage 1 (4K, 48-bit VA) with its root and a CD at `cd_ipa`, ASID `asid`,
    /// tables allocated from `[tables, tables + 0x40_0000)` (guest PAs).
    pub fn new(m: &Machine, tables: u64, cd_ipa: u64, asid: u16) -> GuestS1 {
        let fmt = TableFormat::stage1(Granule::Size4K, 48, PaSize::Bits48).unwrap();
        let builder = TableBuilder::new(
            fmt,
            GuestMem {
                mem: Arc::clone(&m.mem),
            },
            BumpAllocator::new(tables, 0x3f_f000),
        )
        .unwrap();
        let g = GuestS1 {
            builder,
            asid,
            cd_ipa,
        };
        g.write_cd(m, false);
        g
    }

    /// The guest's CD: T0SZ 16, 4K, IPS 48 bits, EPD1, V, AA64, R, A, ASET = 0 (a guest ASID
    /// follows the guest's broadcast TLBIs), MAIR index 1 = write-back.
    pub fn write_cd(&self, m: &Machine, aset: bool) {
        let dw0 = 16u64
            | (1 << 30)
            | (1 << 31)
            | (5u64 << 32)
            | (1 << 41)
            | (1 << 45)
            | (1 << 46)
            | (u64::from(aset) << 47)
            | (u64::from(self.asid) << 48)
            | (1 << 8)
            | (1 << 10)
            | (3 << 12);
        let words = [
            dw0,
            self.builder.root() & ((1u64 << 52) - 16),
            0,
            0xff00,
            0,
            0,
            0,
            0,
        ];
        for (i, w) in words.iter().enumerate() {
            m.mem
                .write_u64(GUEST_BASE + self.cd_ipa + 8 * i as u64, *w)
                .unwrap();
        }
    }

    pub fn map(&mut self, va: u64, ipa: u64, len: u64) {
        self.builder.map(va, ipa, len, guest_leaf()).unwrap();
    }

    pub fn unmap(&mut self, va: u64, len: u64) {
        self.builder.unmap(va, len).unwrap();
    }

    /// The guest STE (`iommu_hwpt_arm_smmuv3`): V, Config = S1 translate, linear CD table of
    /// one CD at `cd_ipa`.
    pub fn vste(&self) -> [u64; 2] {
        [1 | (5 << 1) | (self.cd_ipa & !0x3f), 0]
    }
}

pub fn vste_bytes(s: [u64; 2]) -> Vec<u8> {
    let mut v = s[0].to_le_bytes().to_vec();
    v.extend_from_slice(&s[1].to_le_bytes());
    v
}

/// An `iommu_viommu_arm_smmuv3_invalidate` array.
pub fn cmd_bytes(cmds: &[[u64; 2]]) -> Vec<u8> {
    let mut v = Vec::new();
    for c in cmds {
        v.extend_from_slice(&c[0].to_le_bytes());
        v.extend_from_slice(&c[1].to_le_bytes());
    }
    v
}

/// Guest commands (the guest driver's view: VMID left 0, SIDs virtual).
pub mod gcmd {
    pub fn tlbi_nh_va(asid: u16, va: u64) -> [u64; 2] {
        [0x12 | (u64::from(asid) << 48), va & !0xfff]
    }
    pub fn tlbi_nh_asid(asid: u16) -> [u64; 2] {
        [0x11 | (u64::from(asid) << 48), 0]
    }
    pub fn tlbi_nh_all() -> [u64; 2] {
        [0x10, 0]
    }
    pub fn tlbi_nsnh_all() -> [u64; 2] {
        [0x30, 0]
    }
    pub fn cfgi_cd(vsid: u32) -> [u64; 2] {
        [0x05 | (u64::from(vsid) << 32), 1]
    }
    pub fn cfgi_cd_all(vsid: u32) -> [u64; 2] {
        [0x06 | (u64::from(vsid) << 32), 0]
    }
    pub fn atc_inv(vsid: u32) -> [u64; 2] {
        [0x40 | (u64::from(vsid) << 32), 52]
    }
    pub fn cfgi_ste(vsid: u32) -> [u64; 2] {
        [0x03 | (u64::from(vsid) << 32), 1]
    }
    pub fn tlbi_s12_vmall(vmid: u16) -> [u64; 2] {
        [0x28 | (u64::from(vmid) << 32), 0]
    }
    pub fn sync() -> [u64; 2] {
        [0x46, 0]
    }
}

/// A nested set-up: IOAS with guest RAM mapped at IPA 0.., a device bound (optionally with a
/// KVM), a NEST_PARENT HWPT, a vIOMMU, a vDEVICE and a nested HWPT from the guest's STE,
/// attached.
pub struct Nested {
    pub ictx: Iommufd,
    pub ioas: ObjectId,
    pub dev: Arc<Master>,
    pub dev_id: ObjectId,
    pub s2_hwpt: ObjectId,
    pub viommu: ObjectId,
    pub vdev: ObjectId,
    pub nested: ObjectId,
    pub guest: GuestS1,
    pub vsid: u32,
}

/// Guest RAM the IOAS maps (IPA 0 .. GUEST_MAPPED), in areas of AREA bytes.
pub const GUEST_MAPPED: u64 = 0x400_0000;
pub const AREA: u64 = 0x20_0000;

impl Nested {
    pub fn new(m: &Machine, sid: u32, vsid: u32, kvm: Option<KvmRef>) -> Nested {
        let ictx = Iommufd::new();
        Self::in_ctx(m, ictx, None, sid, vsid, kvm)
    }

    pub fn in_ctx(
        m: &Machine,
        ictx: Iommufd,
        s2: Option<(ObjectId, ObjectId)>,
        sid: u32,
        vsid: u32,
        kvm: Option<KvmRef>,
    ) -> Nested {
        let dev = m.master(sid);
        let dev_id = ictx
            .bind_device(Arc::clone(&dev) as Arc<dyn IommuDevice>, kvm)
            .unwrap();
        let (ioas, s2_hwpt) = match s2 {
            Some(x) => x,
            None => {
                let ioas = ictx.ioas_alloc(0).unwrap();
                // Guest RAM in 2 MiB areas, so one can be unmapped alone.
                for ipa in (0..GUEST_MAPPED).step_by(AREA as usize) {
                    ictx.ioas_map(FIXED, ioas, m.src(ipa), AREA, ipa).unwrap();
                }
                let s2 = ictx
                    .hwpt_alloc(
                        hwpt_flags::NEST_PARENT,
                        dev_id,
                        ioas,
                        &mut none_data(),
                        ObjectId(0),
                    )
                    .unwrap();
                (ioas, s2)
            }
        };
        let viommu = ictx
            .viommu_alloc(
                0,
                viommu_type::ARM_SMMUV3,
                dev_id,
                s2_hwpt,
                &mut none_data(),
            )
            .unwrap();
        let vdev = ictx.vdevice_alloc(viommu, dev_id, u64::from(vsid)).unwrap();
        // Each device's guest tables in its own 4 MiB of guest memory, the CD in its last page.
        let tables = GUEST_TABLES + u64::from(vsid % 8) * 0x40_0000;
        let guest = GuestS1::new(m, tables, tables + 0x3f_f000, 0x10 + vsid as u16);
        let mut data = vste_bytes(guest.vste());
        let nested = ictx
            .hwpt_alloc(
                0,
                dev_id,
                viommu,
                &mut UserData::new(hwpt_data::ARM_SMMUV3, &mut data),
                ObjectId(0),
            )
            .unwrap();
        ictx.attach(dev_id, NO_PASID, nested).unwrap();
        Nested {
            ictx,
            ioas,
            dev,
            dev_id,
            s2_hwpt,
            viommu,
            vdev,
            nested,
            guest,
            vsid,
        }
    }

    pub fn vsmmu(&self) -> Arc<dyn Viommu> {
        self.ictx.viommu_ops(self.viommu).unwrap()
    }

    pub fn vmid(&self) -> u16 {
        let v = self.vsmmu();
        v.as_any().downcast_ref::<VSmmu>().unwrap().vmid()
    }

    /// HWPT_INVALIDATE on the vIOMMU with guest commands; returns (result, entry_num).
    pub fn invalidate(&self, cmds: &[[u64; 2]]) -> (Result<(), Errno>, u32) {
        let bytes = cmd_bytes(cmds);
        let mut arr = InvalidateArray::new(
            invalidate_data::VIOMMU_ARM_SMMUV3,
            16,
            cmds.len() as u32,
            &bytes,
        );
        let r = self.ictx.hwpt_invalidate(self.viommu, &mut arr);
        (r, arr.entry_num)
    }
}

/// A device DMA write of `data` at `iova` through the SMMU (unprivileged, no SSID).
pub fn dma_write(
    m: &Machine,
    sid: u32,
    iova: u64,
    data: &[u8],
) -> Result<(), twinmmu_hw::DmaError> {
    m.smmu.dma_write(sid, None, iova, data, false)
}

pub fn dma_read(
    m: &Machine,
    sid: u32,
    iova: u64,
    len: usize,
) -> Result<Vec<u8>, twinmmu_hw::DmaError> {
    let mut b = vec![0u8; len];
    m.smmu.dma_read(sid, None, iova, &mut b, false)?;
    Ok(b)
}
