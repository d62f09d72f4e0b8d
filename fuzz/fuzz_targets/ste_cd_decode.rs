//! Random memory under the stream table, CD tables and translation tables, random STE/CD
//! bytes and register values, random transactions: every translation ends in a translation,
//! a fault or an abort, never a panic; the pure decoders accept any 64 bytes. The SMMU's
//! ATS (Translation Requests, Translated traffic, Split-stage) and MPAM (the VMS) are
//! switched on by input bits, so their STE fields and fetches are fuzzed too.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use twinmmu_hw::cd::{ContextDescriptor, decode_cd};
use twinmmu_hw::regs::off;
use twinmmu_hw::ste::{Ste, StreamWorld, decode_ste};
use twinmmu_hw::ats::{AtsRequest, PageRequestHint};
use twinmmu_hw::{AccessKind, PhysMem, Smmu, SmmuConfig, SparseMem, Transaction};

const RAM: u64 = 0x4000_0000;

fn words(b: &[u8]) -> [u64; 8] {
    let mut w = [0u64; 8];
    for (i, c) in b.chunks(8).take(8).enumerate() {
        let mut x = [0u8; 8];
        x[..c.len()].copy_from_slice(c);
        w[i] = u64::from_le_bytes(x);
    }
    w
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 72 {
        return;
    }
    let feat = data[71];
    let cfg = SmmuConfig {
        ats: feat & 1 != 0,
        ns1ats: feat & 2 != 0,
        mpam: feat & 4 != 0,
        mpam_partid_max: if feat & 4 != 0 { 31 } else { 0 },
        attr_perms_ovr: feat & 8 == 0,
        ..SmmuConfig::default()
    };
    let _ = decode_ste(&Ste::from_dwords(words(&data[..64])), &cfg);
    let _ = decode_cd(
        &ContextDescriptor::from_dwords(words(&data[..64])),
        StreamWorld::NsEl1,
        &cfg,
    );
    let _ = decode_cd(
        &ContextDescriptor::from_dwords(words(&data[..64])),
        StreamWorld::El2,
        &cfg,
    );

    let Ok(mem) = SparseMem::with_range(RAM, 0x20_0000) else {
        return;
    };
    let mem = Arc::new(mem);
    let Ok(smmu) = Smmu::new(cfg, mem.clone()) else {
        return;
    };
    // The data, repeated, fills the first 2 MiB: stream table, CDs and tables all come
    // from it. Pointers inside land in RAM when their high bits happen to say so.
    let mut a = RAM;
    while a < RAM + 0x20_0000 {
        let _ = mem.write(a, &data[..data.len().min(0x1000)]);
        a += 0x1000;
    }
    let r = &data[64..72];
    let _ = smmu.mmio_write(off::STRTAB_BASE, 8, RAM | (u64::from(r[0]) << 6));
    let _ = smmu.mmio_write(
        off::STRTAB_BASE_CFG,
        4,
        u64::from(r[1] & 0x3f) | (u64::from(r[2] & 0x1f) << 6) | (u64::from(r[3] & 3) << 16),
    );
    let _ = smmu.mmio_write(off::EVENTQ_BASE, 8, (RAM + 0x1f_0000) | 4);
    let _ = smmu.mmio_write(off::CR2, 4, u64::from(r[4] & 7));
    // SMMUEN, EVENTQEN, and ATSCHK when the input says so.
    let _ = smmu.mmio_write(off::CR0, 4, 0b0101 | (u64::from(feat >> 4 & 1) << 4));
    let mut port = smmu.port();
    for (i, c) in data[72..].chunks(12).take(64).enumerate() {
        let mut x = [0u8; 12];
        x[..c.len()].copy_from_slice(c);
        let sid = u32::from_le_bytes([x[0], x[1], 0, 0]) & 0x1ff;
        let ssid = (x[2] & 1 != 0).then(|| u32::from(x[3]));
        let addr = u64::from_le_bytes([x[4], x[5], x[6], x[7], x[8], x[9], x[10], x[11]]);
        let kind = match x[2] >> 6 {
            0 => AccessKind::Read,
            1 => AccessKind::Write,
            _ => AccessKind::Execute,
        };
        let t = Transaction::new(sid, ssid, addr, kind, x[2] & 2 != 0);
        let _ = smmu.translate(t);
        let _ = port.translate(t);
        if i % 8 == 7 {
            let mut buf = [0u8; 64];
            let _ = smmu.dma_read(sid, ssid, addr, &mut buf, false);
            let _ = smmu.dma_read_translated(sid, addr, &mut buf);
        }
        let _ = smmu.translated(sid, addr, kind);
        let _ = smmu.ats_translation_request(&AtsRequest {
            sid,
            ssid,
            addr,
            no_write: x[2] & 4 != 0,
            exec: x[2] & 8 != 0,
            privileged: x[2] & 2 != 0,
        });
        if i % 16 == 15 {
            let _ = smmu.page_request_hint(&PageRequestHint {
                sid,
                ssid,
                addr,
                span: x[3],
                priv_read: x[2] & 4 != 0,
                priv_write: x[2] & 8 != 0,
                priv_exec: x[2] & 16 != 0,
                user_read: x[2] & 32 != 0,
                user_write: true,
                user_exec: false,
            });
        }
    }
});
