#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::single_range_in_vec_init,
        clippy::field_reassign_with_default
    )
)]
//! The machine under twinmmu: host physical memory, the PEs with their TLBs and the DVM
//! interconnect between them, and the Arm SMMUv3 (IHI0070).
//!
//! The SMMU is driven like silicon: only through its MMIO register pages and the structures
//! it reads from memory (stream table, context descriptors, queues, translation tables).
//! Its other ports are the DMA port (devices) and the DVM port (broadcast TLB maintenance
//! from PEs).

pub mod config;
pub mod frames;
pub mod mem;
pub mod regs;

pub use config::{SmmuConfig, StallModel};
pub use frames::{FrameAllocator, FrameError};
pub use mem::{MemError, PhysMem, SparseMem};
pub mod ats;
pub mod cd;
pub mod cmd;
pub mod cmdq;
pub mod dvm;
pub mod event;
mod hitpath;
pub mod interconnect;
pub mod pe;
pub mod port;
pub mod smmu;
pub mod ste;
pub mod tlb;
pub mod xlate;

pub use ats::{AtsCompletion, AtsRequest, AtsTranslation, PageRequestHint};
pub use cmd::{CmdqEntry, Command};
pub use cmdq::CmdError;
pub use dvm::{Tlbi, TlbiOp, TlbiRecipient, TlbiWith};
pub use event::{Event, EventDetail, EventType, FaultClass};
pub use interconnect::{Dvm, DvmConfig, DvmError, DvmReport, DvmStats, RecipientStats, TlbiInsn};
pub use pe::{Pe, PeConfig, PeContext, PeFault, PeStats, PeTranslation, Regime};
pub use port::DmaPort;
pub use rustvmm::{GuestPhysMem, SmmuIommu};
pub use smmu::{AtcResponse, AtsEndpoint, MmioError, Smmu, SmmuStats};
pub use twinmmu_vmsa::AccessKind;
pub use xlate::{DmaError, Outcome, StallResult, Termination, Transaction};
pub mod rustvmm;
