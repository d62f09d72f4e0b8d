#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::single_range_in_vec_init,
        clippy::field_reassign_with_default
    )
)]
//! The machine under twinmmu: host physical memory and the Arm SMMUv3 (IHI0070).
//!
//! The SMMU is driven like silicon: only through its MMIO register pages and the structures
//! it reads from memory (stream table, context descriptors, queues, translation tables).
//! Its other ports are the DMA port (devices) and the DVM port (broadcast TLB maintenance
//! from PEs).

pub mod config;
pub mod mem;
pub mod regs;

pub use config::{SmmuConfig, StallModel};
pub use mem::{MemError, PhysMem, SparseMem};
pub mod cd;
pub mod cmd;
pub mod event;
pub mod ste;
pub mod tlb;
