//! AArch64 VMSAv8-64 translation tables (IHI0070 §3.4, DDI0487 D8): descriptor formats, the
//! walker, and a table builder shared by every layer of twinmmu.
//!
//! - [`Stage1Config::new`] / [`Stage2Config::new`] validate CD/STE fields once
//!   ([`ConfigError`] maps to C_BAD_CD / C_BAD_STE);
//! - [`walk_stage1`] (with a [`TableHook`] that sees every descriptor address, for nesting)
//!   and [`walk_stage2`] return a [`Translation`] or a typed [`Fault`];
//! - [`check_s1`] / [`check_s2`] check permissions separately from the walk;
//! - [`TableBuilder`] maps and unmaps ranges for both stages and all granules, reporting
//!   [`Changes`] for invalidation;
//! - [`SparseMemory`] is a simple memory for tests.

pub mod builder;
pub mod config;
pub mod descriptor;
pub mod geometry;
pub mod memory;
pub mod perms;
pub mod walk;

pub use builder::{
    AllocError, BuildError, BumpAllocator, Changes, PageAllocator, TableBuilder, TableFormat,
};
pub use config::{
    ConfigError, Features, S1Region, Stage1Config, Stage1Params, Stage2Config, Stage2Params, Ttb,
    TtbParams, s2_start_level,
};
pub use descriptor::{Descriptor, DescriptorKind, S1LeafAttrs, S2LeafAttrs};
pub use geometry::{Geometry, Granule, PaSize};
pub use memory::{MemError, Memory, MemoryMut, SparseMemory};
pub use perms::{
    Access, AccessKind, PermissionDenied, S1Controls, S1Perms, S2Perms, TableRestrictions,
    check_s1, check_s2,
};
pub use walk::{
    Direct, Fault, FaultKind, S1MemAttrs, S1Translation, S2MemAttrs, S2Translation, Stage,
    TableHook, Translation, WalkError, select_ttb, walk_stage1, walk_stage2, walk_stage2_with,
};
