//! AArch64 VMSAv8-64 translation tables (IHI0070 §3.4, DDI0487 D8): descriptor formats, the
//! walker, and a table builder shared by every layer of twinmmu.
