//! Paging domains: stage 1 (a private DMA domain with an SMMU ASID and an ASET = 1 CD) and
//! stage 2 (S2-only domains and nesting parents), their tables built with the `vmsa`
//! builder in host memory, and the invalidation after every unmap
//! (`arm_smmu_tlb_inv_range_domain`): TLBI_S2_IPA / TLBI_NH_VA (or EL2_VA) per changed range,
//! as range commands when IDR3.RIL, then for a nesting parent TLBI_NH_ALL, for every VMID
//! that may cache the stage 2: the domain's own (direct attachments) and each vIOMMU's.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use twinmmu_hw::FrameAllocator;
use twinmmu_iommufd::{Errno, IovaRange, PagingDomain, Prot};
use twinmmu_vmsa::{
    BuildError, Changes, Features as VmsaFeatures, Geometry, Granule, PaSize, S1LeafAttrs,
    S2LeafAttrs, Stage1Config, Stage1Params, Stage2Config, Stage2Params, TableBuilder, TableFormat,
    TtbParams,
};

use crate::cd::{S1Tcr, make_s1_cd};
use crate::defs::{self, cmd, ste};
use crate::device::ArmSmmuV3;
use crate::master::Master;
use crate::memory::TableMem;
use crate::strtab::{Entry, S2Cfg};

type Builder = TableBuilder<TableMem, FrameAllocator>;

/// Without RIL, a range of more than this many granules is invalidated as a whole
/// (Linux's CMDQ_MAX_TLBI_OPS).
const MAX_TLBI_OPS: u64 = 512;

/// io-pgtable's MAIR: index 0 non-cacheable, 1 write-back, 2 device, 3 inner NC outer WB.
const MAIR: u64 = 0x44 | (0xff << 8) | (0x04 << 16) | (0xf4 << 24);
const MAIR_IDX_CACHE: u8 = 1;

impl ArmSmmuV3 {
    /// The granule Linux's io-pgtable picks for a 4 KiB-page host: 4K when supported.
    pub(crate) fn granule(&self) -> Granule {
        if self.feat.gran4k {
            Granule::Size4K
        } else if self.feat.gran16k {
            Granule::Size16K
        } else {
            Granule::Size64K
        }
    }

    pub(crate) fn vmsa_features(&self) -> VmsaFeatures {
        let pa = |bits: u32| match bits {
            32 => PaSize::Bits32,
            36 => PaSize::Bits36,
            40 => PaSize::Bits40,
            42 => PaSize::Bits42,
            44 => PaSize::Bits44,
            48 => PaSize::Bits48,
            _ => PaSize::Bits52,
        };
        VmsaFeatures {
            oas: pa(self.feat.oas_bits),
            ias: pa(self.feat.ias_bits),
            gran4k: self.feat.gran4k,
            gran16k: self.feat.gran16k,
            gran64k: self.feat.gran64k,
            ..VmsaFeatures::default()
        }
    }

    pub(crate) fn pgsize_bitmap(&self) -> u64 {
        match self.granule() {
            Granule::Size4K => (1 << 12) | (1 << 21) | (1 << 30),
            Granule::Size16K => (1 << 14) | (1 << 25),
            Granule::Size64K => (1 << 16) | (1 << 29),
        }
    }

    /// TLBI commands for every range of `changes`: leaf invalidations for the written
    /// leaves, non-leaf ones for the freed tables. `false` when any range was too large to
    /// invalidate by address (see `tlbi_range`); every range is still emitted.
    fn tlbi_changes(&self, base: u64, changes: &Changes, out: &mut Vec<[u64; 2]>) -> bool {
        let leaves = changes.leaves.iter().map(|r| (r, true));
        let tables = changes.tables.iter().map(|r| (r, false));
        let mut ranged = true;
        for (r, leaf) in leaves.chain(tables) {
            ranged &= self.tlbi_range(base, r.start, r.end - r.start, leaf, out);
        }
        ranged
    }

    /// TLBI commands for `[iova, iova + size)` with `base` (opcode, VMID, ASID in dword 0)
    /// (`__arm_smmu_tlb_inv_range`). Returns `false` when the range is too large to be
    /// worth invalidating by address (no RIL): the caller invalidates the whole context.
    fn tlbi_range(
        &self,
        base: u64,
        iova: u64,
        size: u64,
        leaf: bool,
        out: &mut Vec<[u64; 2]>,
    ) -> bool {
        let tg = self.granule().bits();
        let addr_mask = if defs::get(cmd::OP, base) == cmd::OP_TLBI_S2_IPA {
            cmd::TLBI_1_IPA
        } else {
            cmd::TLBI_1_VA
        };
        let leaf_bit = if leaf { cmd::TLBI_1_LEAF } else { 0 };
        let mut num_pages = size >> tg;
        if num_pages == 0 {
            return true;
        }
        if self.feat.ril {
            // TG = 1/2/3 for 4K/16K/64K; TTL 0 ("any level"), so NUM = SCALE = 0 must be
            // avoided: invalidate one granule more (harmless over-invalidation).
            let tg_enc = u64::from((tg - 10) / 2);
            if num_pages & cmd::TLBI_RANGE_NUM_MAX == 1 {
                num_pages += 1;
            }
            let mut addr = iova;
            while num_pages > 0 {
                let scale = num_pages.trailing_zeros();
                if scale > 31 {
                    return false;
                }
                let num = (num_pages >> scale) & cmd::TLBI_RANGE_NUM_MAX;
                out.push([
                    base | defs::prep(cmd::TLBI_0_NUM, num - 1)
                        | defs::prep(cmd::TLBI_0_SCALE, u64::from(scale)),
                    leaf_bit | defs::prep(cmd::TLBI_1_TG, tg_enc) | (addr & addr_mask),
                ]);
                addr = addr.wrapping_add(num << (scale + tg));
                num_pages -= num << scale;
            }
            true
        } else {
            if num_pages > MAX_TLBI_OPS {
                return false;
            }
            for p in 0..num_pages {
                out.push([base, leaf_bit | ((iova + (p << tg)) & addr_mask)]);
            }
            true
        }
    }
}

fn build_err(e: BuildError) -> Errno {
    match e {
        BuildError::AlreadyMapped { .. } => Errno::EEXIST,
        BuildError::OutOfMemory { .. } => Errno::ENOMEM,
        BuildError::Misaligned { .. }
        | BuildError::InputOutOfRange { .. }
        | BuildError::OutputOutOfRange { .. } => Errno::EINVAL,
        BuildError::Malformed { .. } | BuildError::Memory(_) => Errno::EFAULT,
    }
}

/// Maps through a domain's table builder (ENODEV once the domain is being freed).
fn builder_map(
    b: &Mutex<Option<Builder>>,
    iova: u64,
    pa: u64,
    len: u64,
    attrs: u64,
) -> Result<(), Errno> {
    let mut b = b.lock();
    let b = b.as_mut().ok_or(Errno::ENODEV)?;
    b.map(iova, pa, len, attrs).map(|_| ()).map_err(build_err)
}

/// Unmaps through a domain's table builder; the descriptor changes to invalidate, also the
/// partial ones of an unmap that ran out of table memory part-way. `None`: nothing changed.
fn builder_unmap(b: &Mutex<Option<Builder>>, iova: u64, len: u64) -> Option<Changes> {
    let mut b = b.lock();
    match b.as_mut()?.unmap(iova, len) {
        Ok(c) => Some(c),
        Err(BuildError::OutOfMemory { changes }) => Some(changes),
        Err(_) => None,
    }
}

/// Who uses a stage 2.
#[derive(Debug, Default)]
struct S2Users {
    /// The domain's own VMID (for direct, non-nested attachments), allocated at first use.
    own_vmid: Option<u16>,
    /// VMIDs of vIOMMUs nesting on this stage 2 (refcounted: vIOMMUs of one VM share their
    /// pinned VMID).
    viommu_vmids: BTreeMap<u16, u32>,
    /// Attached StreamIDs (direct or nested) → ATS enabled.
    masters: BTreeMap<u32, bool>,
}

/// A stage-2 paging domain (S2-only when stage 1 is missing, or a NEST_PARENT).
pub struct S2Domain {
    pub(crate) me: Weak<S2Domain>,
    pub(crate) drv: Arc<ArmSmmuV3>,
    pub(crate) cfg: S2Cfg,
    pub(crate) nest_parent: bool,
    ias_bits: u32,
    walk: Stage2Config,
    builder: Mutex<Option<Builder>>,
    users: Mutex<S2Users>,
}

impl std::fmt::Debug for S2Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S2Domain")
            .field("ttb", &format_args!("{:#x}", self.cfg.ttb))
            .field("nest_parent", &self.nest_parent)
            .finish_non_exhaustive()
    }
}

impl S2Domain {
    /// `arm_smmu_domain_finalise_s2`: an empty stage-2 table over the SMMU's IAS.
    pub(crate) fn new(drv: &Arc<ArmSmmuV3>, nest_parent: bool) -> Result<Arc<S2Domain>, Errno> {
        let g = drv.granule();
        let ias = drv.feat.ias_bits.min(48) as u8;
        // Natural start level, then io-pgtable's concatenation: a start table of at most 16
        // entries becomes up to 16 concatenated tables one level down.
        let levels = (u32::from(ias) - g.bits()).div_ceil(g.stride());
        let mut start = (4 - levels) as u8;
        let top_bits = u32::from(ias) - g.level_shift(start);
        if start < 3 && top_bits <= 4 && Geometry::stage2(g, ias, start + 1).is_some() {
            start += 1;
        }
        let geo = Geometry::stage2(g, ias, start).ok_or(Errno::EINVAL)?;
        let fmt = TableFormat {
            stage: twinmmu_vmsa::Stage::Stage2,
            geometry: geo,
            oa_bits: drv.feat.oas_bits.min(52) as u8,
            pa52: drv.feat.oas_bits >= 52,
        };
        let builder = TableBuilder::new(fmt, TableMem(Arc::clone(&drv.mem)), drv.frames.clone())
            .map_err(build_err)?;
        let sl0 = match (g, start) {
            (Granule::Size4K, 2) => 0,
            (Granule::Size4K, 1) => 1,
            (Granule::Size4K, _) => 2,
            (_, 3) => 0,
            (_, 2) => 1,
            (_, 1) => 2,
            _ => 3,
        };
        let ps = twinmmu_hw::config::oas_encoding(drv.feat.oas_bits as u8).unwrap_or(5);
        let vtcr = defs::get(ste::VTCR, defs::prep(ste::S2T0SZ, 64 - u64::from(ias)))
            | defs::get(ste::VTCR, defs::prep(ste::S2SL0, sl0))
            | defs::get(ste::VTCR, defs::prep(ste::S2IR0, 1))
            | defs::get(ste::VTCR, defs::prep(ste::S2OR0, 1))
            | defs::get(ste::VTCR, defs::prep(ste::S2SH0, 3))
            | defs::get(ste::VTCR, defs::prep(ste::S2TG, u64::from(g.s2tg())))
            | defs::get(ste::VTCR, defs::prep(ste::S2PS, u64::from(ps)));
        let ttb = builder.root();
        // The configuration the SMMU will validate: refuse to build what it would reject.
        let walk = Stage2Config::new(
            &Stage2Params {
                s2ttb: ttb,
                s2t0sz: 64 - ias,
                s2sl0: sl0 as u8,
                s2tg: g.s2tg(),
                s2ps: ps,
                s2affd: false,
                s2ha: false,
                s2hd: false,
            },
            &drv.vmsa_features(),
        )
        .map_err(|_| Errno::EINVAL)?;
        Ok(Arc::new_cyclic(|me| S2Domain {
            me: me.clone(),
            drv: Arc::clone(drv),
            cfg: S2Cfg { vtcr, ttb },
            nest_parent,
            ias_bits: u32::from(ias),
            walk,
            builder: Mutex::new(Some(builder)),
            users: Mutex::new(S2Users::default()),
        }))
    }

    /// The domain's own VMID, allocated on first use (ENOSPC when the SMMU has none left).
    pub(crate) fn own_vmid(&self) -> Result<u16, Errno> {
        let mut u = self.users.lock();
        if let Some(v) = u.own_vmid {
            return Ok(v);
        }
        let v = self.drv.alloc_private_vmid().ok_or(Errno::ENOSPC)?;
        u.own_vmid = Some(v);
        Ok(v)
    }

    /// Registers a vIOMMU's VMID: from now on unmaps invalidate it too.
    pub(crate) fn add_vmid(&self, vmid: u16) {
        *self.users.lock().viommu_vmids.entry(vmid).or_insert(0) += 1;
    }

    pub(crate) fn remove_vmid(&self, vmid: u16) {
        let mut u = self.users.lock();
        if let Some(c) = u.viommu_vmids.get_mut(&vmid) {
            *c -= 1;
            if *c == 0 {
                u.viommu_vmids.remove(&vmid);
            }
        }
    }

    pub(crate) fn add_master(&self, m: &Master, ats: bool) {
        self.users.lock().masters.insert(m.sid, ats);
    }

    pub(crate) fn remove_master(&self, m: &Master) {
        self.users.lock().masters.remove(&m.sid);
    }

    /// Every VMID whose TLB entries may hold this stage 2: the own VMID and the vIOMMUs'.
    pub fn vmids(&self) -> Vec<u16> {
        let u = self.users.lock();
        let mut v: Vec<u16> = u.own_vmid.into_iter().collect();
        v.extend(
            u.viommu_vmids
                .keys()
                .copied()
                .filter(|x| Some(*x) != u.own_vmid),
        );
        v
    }

    /// STE.S2TTB of this domain.
    pub fn ttb(&self) -> u64 {
        self.cfg.ttb
    }

    pub fn is_nest_parent(&self) -> bool {
        self.nest_parent
    }

    /// The stage-2 fields of an STE using this domain with `vmid`.
    pub(crate) fn ste(&self, vmid: u16, ats: bool) -> Entry {
        crate::strtab::make_s2_ste(&self.cfg, vmid, ats)
    }

    fn invalidate(&self, changes: &Changes) {
        let (vmids, ats_sids) = {
            let u = self.users.lock();
            let mut v: Vec<u16> = u.own_vmid.into_iter().collect();
            v.extend(
                u.viommu_vmids
                    .keys()
                    .copied()
                    .filter(|x| Some(*x) != u.own_vmid),
            );
            let ats: Vec<u32> = u
                .masters
                .iter()
                .filter(|(_, a)| **a)
                .map(|(s, _)| *s)
                .collect();
            (v, ats)
        };
        let mut cmds = Vec::new();
        for vmid in vmids {
            let base = cmd::OP_TLBI_S2_IPA | defs::prep(cmd::TLBI_0_VMID, u64::from(vmid));
            if !self.drv.tlbi_changes(base, changes, &mut cmds) {
                // Too many granules without RIL: everything of the VMID (S1 and S2).
                cmds.push([
                    cmd::OP_TLBI_S12_VMALL | defs::prep(cmd::TLBI_0_VMID, u64::from(vmid)),
                    0,
                ]);
            } else if self.nest_parent {
                // TLBI_S2_IPA need not remove combined nested entries (IHI0070 4.4.3.1):
                // the stage-1 follow-up for every ASID of the VMID.
                cmds.push([
                    cmd::OP_TLBI_NH_ALL | defs::prep(cmd::TLBI_0_VMID, u64::from(vmid)),
                    0,
                ]);
            }
        }
        for sid in ats_sids {
            cmds.push(atc_inv_all(sid));
        }
        if !cmds.is_empty() {
            let _ = self.drv.issue_cmdlist(&cmds, true);
        }
    }
}

pub(crate) fn atc_inv_all(sid: u32) -> [u64; 2] {
    [
        cmd::OP_ATC_INV | defs::prep(cmd::SID, u64::from(sid)),
        defs::prep(cmd::ATC_1_SIZE, cmd::ATC_INV_SIZE_ALL),
    ]
}

impl PagingDomain for S2Domain {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn aperture(&self) -> IovaRange {
        IovaRange::new(0, (1u64 << self.ias_bits) - 1)
    }

    fn pgsize_bitmap(&self) -> u64 {
        self.drv.pgsize_bitmap()
    }

    fn map(&self, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<(), Errno> {
        let attrs = S2LeafAttrs {
            mem_attr: 0b1111,
            sh: 3,
            read: prot.read,
            write: prot.write,
            xn: 0,
            af: true,
            dbm: false,
            contiguous: false,
            sw: 0,
        };
        builder_map(&self.builder, iova, pa, len, attrs.bits())
    }

    fn unmap(&self, iova: u64, len: u64) -> u64 {
        let Some(changes) = builder_unmap(&self.builder, iova, len) else {
            return 0;
        };
        self.invalidate(&changes);
        len
    }

    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        twinmmu_vmsa::walk_stage2(&self.walk, &TableMem(Arc::clone(&self.drv.mem)), iova)
            .ok()
            .map(|t| t.output)
    }
}

impl Drop for S2Domain {
    fn drop(&mut self) {
        // arm_smmu_domain_free: nothing attached any more; invalidate and free the VMID, then
        // the tables.
        let own = self.users.get_mut().own_vmid.take();
        if let Some(v) = own {
            self.drv.free_private_vmid(v);
        }
        if let Some(b) = self.builder.get_mut().take() {
            let _ = b.destroy();
        }
    }
}

/// A stage-1 DMA domain: its own ASID from the SMMU's allocator, one CD with ASET = 1.
pub struct S1Domain {
    pub(crate) me: Weak<S1Domain>,
    pub(crate) drv: Arc<ArmSmmuV3>,
    pub(crate) asid: u16,
    tcr: S1Tcr,
    walk: Stage1Config,
    builder: Mutex<Option<Builder>>,
    masters: Mutex<BTreeMap<u32, bool>>,
}

impl std::fmt::Debug for S1Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S1Domain")
            .field("asid", &self.asid)
            .finish_non_exhaustive()
    }
}

/// Stage-1 input size: 48-bit VAs (Linux uses VA_BITS, 52 only with IDR5.VAX).
const S1_IAS: u8 = 48;

impl S1Domain {
    /// `arm_smmu_domain_finalise_s1`: an ASID (ENOSPC when exhausted) and an empty table.
    pub(crate) fn new(drv: &Arc<ArmSmmuV3>) -> Result<Arc<S1Domain>, Errno> {
        let g = drv.granule();
        let oa_bits = drv.feat.oas_bits.min(52) as u8;
        let fmt = TableFormat::stage1(g, S1_IAS, drv.vmsa_features().oas).ok_or(Errno::EINVAL)?;
        let asid = drv.asid_ida.lock().alloc().ok_or(Errno::ENOSPC)? as u16;
        let builder =
            match TableBuilder::new(fmt, TableMem(Arc::clone(&drv.mem)), drv.frames.clone()) {
                Ok(b) => b,
                Err(e) => {
                    drv.asid_ida.lock().free(u32::from(asid));
                    return Err(build_err(e));
                }
            };
        let ips = u64::from(twinmmu_hw::config::oas_encoding(oa_bits).unwrap_or(5));
        let tcr = S1Tcr {
            t0sz: 64 - u64::from(S1_IAS),
            tg0: u64::from(g.tg0()),
            ips,
            ttb: builder.root(),
            mair: MAIR,
        };
        let walk = Stage1Config::new(
            &Stage1Params {
                ttb: [
                    TtbParams {
                        ttb: tcr.ttb,
                        tsz: 64 - S1_IAS,
                        tg: g.tg0(),
                        epd: false,
                        tbi: false,
                        had: false,
                    },
                    TtbParams {
                        epd: true,
                        ..TtbParams::default()
                    },
                ],
                ips: ips as u8,
                mair: MAIR,
                ..Stage1Params::default()
            },
            &drv.vmsa_features(),
        );
        let walk = match walk {
            Ok(w) => w,
            Err(_) => {
                let _ = builder.destroy();
                drv.asid_ida.lock().free(u32::from(asid));
                return Err(Errno::EINVAL);
            }
        };
        Ok(Arc::new_cyclic(|me| S1Domain {
            me: me.clone(),
            drv: Arc::clone(drv),
            asid,
            tcr,
            walk,
            builder: Mutex::new(Some(builder)),
            masters: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn asid(&self) -> u16 {
        self.asid
    }

    pub(crate) fn make_cd(&self, stall: bool) -> Entry {
        make_s1_cd(&self.tcr, self.asid, stall)
    }

    pub(crate) fn add_master(&self, m: &Master) {
        self.masters.lock().insert(m.sid, m.ats_enabled_for(true));
    }

    pub(crate) fn remove_master(&self, m: &Master) {
        self.masters.lock().remove(&m.sid);
    }

    fn asid_cmds(&self) -> (u64, u64) {
        let asid = defs::prep(cmd::TLBI_0_ASID, u64::from(self.asid));
        if self.drv.feat.e2h {
            (cmd::OP_TLBI_EL2_VA | asid, cmd::OP_TLBI_EL2_ASID | asid)
        } else {
            (cmd::OP_TLBI_NH_VA | asid, cmd::OP_TLBI_NH_ASID | asid)
        }
    }

    fn invalidate(&self, changes: &Changes) {
        let (va, all) = self.asid_cmds();
        let mut cmds = Vec::new();
        if !self.drv.tlbi_changes(va, changes, &mut cmds) {
            cmds.clear();
            cmds.push([all, 0]);
        }
        for (sid, ats) in self.masters.lock().iter() {
            if *ats {
                cmds.push(atc_inv_all(*sid));
            }
        }
        if !cmds.is_empty() {
            let _ = self.drv.issue_cmdlist(&cmds, true);
        }
    }
}

impl PagingDomain for S1Domain {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn aperture(&self) -> IovaRange {
        IovaRange::new(0, (1u64 << S1_IAS) - 1)
    }

    fn pgsize_bitmap(&self) -> u64 {
        self.drv.pgsize_bitmap()
    }

    fn map(&self, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<(), Errno> {
        let attrs = S1LeafAttrs {
            attr_index: MAIR_IDX_CACHE,
            sh: 3,
            read_only: !prot.write,
            el0: true,
            not_global: true,
            af: true,
            ..S1LeafAttrs::default()
        };
        builder_map(&self.builder, iova, pa, len, attrs.bits())
    }

    fn unmap(&self, iova: u64, len: u64) -> u64 {
        let Some(changes) = builder_unmap(&self.builder, iova, len) else {
            return 0;
        };
        self.invalidate(&changes);
        len
    }

    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        let mut hook = twinmmu_vmsa::Direct;
        twinmmu_vmsa::walk_stage1(
            &self.walk,
            &TableMem(Arc::clone(&self.drv.mem)),
            &mut hook,
            iova,
        )
        .ok()
        .map(|t| t.output)
    }
}

impl Drop for S1Domain {
    fn drop(&mut self) {
        let (_, all) = self.asid_cmds();
        if self.drv.issue_cmd_with_sync([all, 0]).is_ok() {
            self.drv.asid_ida.lock().free(u32::from(self.asid));
        }
        if let Some(b) = self.builder.get_mut().take() {
            let _ = b.destroy();
        }
    }
}
