//! `twinmmu qtest [--config FILE] [SCRIPT]`: drive the SMMU model from any language with
//! QEMU's qtest line protocol (memory and MMIO), plus `dma`, `dmaread`, `dmawrite` (with a
//! `translated` flag for PCIe ATS Translated transactions), `ats` (an ATS Translation
//! Request), `pagehint` (a speculative page request hint), `tlbi` and `stats`. One answer
//! line per command; `#` starts a comment; a malformed line answers `ERR <message>` and
//! the session goes on.
//!
//! The SMMU's two register pages are mapped at `smmu_base` (default 0x09050000, as QEMU's
//! virt machine) and RAM at `ram_base` (default 1 GiB at 0x40000000); any other address is
//! outside memory. Every command's effects are complete before its answer: a CMDQ_PROD
//! write has consumed the commands, a CR0 or IRQ_CTRL write is acknowledged.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use twinmmu_hw::cmd::TlbiRange;
use twinmmu_hw::regs::MMIO_SIZE;
use twinmmu_hw::{
    AccessKind, AtsCompletion, AtsRequest, DmaError, Outcome, PageRequestHint, PhysMem, Smmu,
    SmmuConfig, SparseMem, Tlbi, TlbiOp, Transaction,
};

#[derive(clap::Args)]
pub struct Args {
    /// TOML machine description: `smmu_base`, `ram_base`, `ram_size` and an `[smmu]` table
    /// of SmmuConfig fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Script to run; standard input when absent.
    script: Option<PathBuf>,
}

/// The machine `qtest` builds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MachineConfig {
    pub smmu_base: u64,
    pub ram_base: u64,
    pub ram_size: u64,
    pub smmu: SmmuConfig,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            smmu_base: 0x0905_0000,
            ram_base: 0x4000_0000,
            ram_size: 0x4000_0000,
            smmu: SmmuConfig::default(),
        }
    }
}

/// Largest buffer a `read`/`dmaread` may ask for (the answer is one line).
const MAX_READ: u64 = 16 << 20;

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<MachineConfig>(&text)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => MachineConfig::default(),
    };
    let mut session = Session::new(cfg)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let input: Box<dyn BufRead> = match &args.script {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    for line in input.split(b'\n') {
        let line = line?;
        let text = String::from_utf8_lossy(&line);
        if let Some(answer) = session.line(&text) {
            writeln!(out, "{answer}")?;
            out.flush()?;
        }
    }
    Ok(())
}

/// One qtest session: a machine and its command interpreter.
pub struct Session {
    cfg: MachineConfig,
    mem: Arc<SparseMem>,
    smmu: Arc<Smmu>,
}

type Answer = Result<String, String>;

fn num(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        s.parse::<u64>()
    };
    r.map_err(|_| format!("bad number '{s}'"))
}

fn hex_bytes(s: &str) -> Result<Vec<u8>, String> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| format!("expected 0x<hexbytes>, got '{s}'"))?;
    if h.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    (0..h.len())
        .step_by(2)
        .map(|i| {
            h.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("bad hex bytes '{s}'"))
        })
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// The byte count qtest's `read<b|w|l|q>` / `write<b|w|l|q>` suffix names.
fn access_size(cmd: &str) -> u8 {
    match cmd.as_bytes().last() {
        Some(b'b') => 1,
        Some(b'w') => 2,
        Some(b'l') => 4,
        _ => 8,
    }
}

fn arg<'a>(w: &[&'a str], i: usize, what: &str) -> Result<&'a str, String> {
    w.get(i).copied().ok_or_else(|| format!("missing {what}"))
}

impl Session {
    pub fn new(cfg: MachineConfig) -> anyhow::Result<Self> {
        let mem = Arc::new(
            SparseMem::with_range(cfg.ram_base, cfg.ram_size)
                .map_err(|e| anyhow::anyhow!("RAM: {e}"))?,
        );
        let smmu = Smmu::new(cfg.smmu.clone(), mem.clone())?;
        Ok(Session { cfg, mem, smmu })
    }

    /// Handles one line; `None` for blank lines and comments.
    pub fn line(&mut self, line: &str) -> Option<String> {
        let code = line.split('#').next().unwrap_or("");
        let words: Vec<&str> = code.split_whitespace().collect();
        if words.is_empty() {
            return None;
        }
        Some(match self.command(&words) {
            Ok(a) => a,
            Err(e) => format!("ERR {e}"),
        })
    }

    fn mmio_offset(&self, addr: u64) -> Option<u64> {
        addr.checked_sub(self.cfg.smmu_base)
            .filter(|o| *o < MMIO_SIZE)
    }

    fn command(&mut self, w: &[&str]) -> Answer {
        let cmd = w[0].to_ascii_lowercase();
        match cmd.as_str() {
            "writeb" | "writew" | "writel" | "writeq" => {
                let size = access_size(&cmd);
                let addr = num(arg(w, 1, "ADDR")?)?;
                let value = num(arg(w, 2, "VALUE")?)?;
                if let Some(o) = self.mmio_offset(addr) {
                    self.smmu
                        .mmio_write(o, size, value)
                        .map_err(|e| e.to_string())?;
                } else {
                    let bytes = value.to_le_bytes();
                    self.mem
                        .write(addr, &bytes[..usize::from(size)])
                        .map_err(|e| e.to_string())?;
                }
                Ok("OK".into())
            }
            "readb" | "readw" | "readl" | "readq" => {
                let size = access_size(&cmd);
                let addr = num(arg(w, 1, "ADDR")?)?;
                let v = if let Some(o) = self.mmio_offset(addr) {
                    self.smmu.mmio_read(o, size).map_err(|e| e.to_string())?
                } else {
                    let mut b = [0u8; 8];
                    self.mem
                        .read(addr, &mut b[..usize::from(size)])
                        .map_err(|e| e.to_string())?;
                    u64::from_le_bytes(b)
                };
                // QEMU prints every read as 16 hex digits.
                Ok(format!("OK 0x{v:016x}"))
            }
            "write" => {
                let addr = num(arg(w, 1, "ADDR")?)?;
                let size = num(arg(w, 2, "SIZE")?)?;
                let data = hex_bytes(arg(w, 3, "DATA")?)?;
                if data.len() as u64 != size {
                    return Err(format!("SIZE {size} but {} bytes given", data.len()));
                }
                self.mem.write(addr, &data).map_err(|e| e.to_string())?;
                Ok("OK".into())
            }
            "read" => {
                let addr = num(arg(w, 1, "ADDR")?)?;
                let size = num(arg(w, 2, "SIZE")?)?;
                if size > MAX_READ {
                    return Err(format!("SIZE above {MAX_READ}"));
                }
                let mut b = vec![0u8; size as usize];
                self.mem.read(addr, &mut b).map_err(|e| e.to_string())?;
                Ok(format!("OK {}", to_hex(&b)))
            }
            "memset" => {
                let addr = num(arg(w, 1, "ADDR")?)?;
                let size = num(arg(w, 2, "SIZE")?)?;
                let byte = num(arg(w, 3, "BYTE")?)?;
                let byte = u8::try_from(byte).map_err(|_| "BYTE above 255".to_string())?;
                if !self.mem.is_valid(addr, size) {
                    return Err(format!(
                        "external abort: [{addr:#x}, +{size:#x}) is not memory"
                    ));
                }
                let chunk = vec![byte; 1 << 16];
                let mut done = 0u64;
                while done < size {
                    let n = (size - done).min(chunk.len() as u64) as usize;
                    self.mem
                        .write(addr + done, &chunk[..n])
                        .map_err(|e| e.to_string())?;
                    done += n as u64;
                }
                Ok("OK".into())
            }
            "dma" => {
                let (sid, ssid) = self.stream(w)?;
                let iova = num(arg(w, 3, "IOVA")?)?;
                let kind = match arg(w, 4, "ACCESS")? {
                    "r" => AccessKind::Read,
                    "w" => AccessKind::Write,
                    "x" => AccessKind::Execute,
                    o => return Err(format!("ACCESS must be r, w or x, not '{o}'")),
                };
                let f = flags(w, 5, ssid)?;
                let o = if f.translated {
                    self.smmu.translated(sid, iova, kind)
                } else {
                    self.smmu
                        .translate(Transaction::new(sid, ssid, iova, kind, f.privileged))
                };
                Ok(match o {
                    Outcome::Translated { pa } => format!("OK 0x{pa:016x}"),
                    Outcome::Fault { event, .. } => format!("FAULT {}", event.name()),
                    Outcome::Abort => "ABORT".into(),
                    Outcome::Stalled { stag, .. } => format!("STALL {stag}"),
                })
            }
            "dmaread" => {
                let (sid, ssid) = self.stream(w)?;
                let iova = num(arg(w, 3, "IOVA")?)?;
                let size = num(arg(w, 4, "SIZE")?)?;
                if size > MAX_READ {
                    return Err(format!("SIZE above {MAX_READ}"));
                }
                let f = flags(w, 5, ssid)?;
                let mut b = vec![0u8; size as usize];
                let r = if f.translated {
                    self.smmu.dma_read_translated(sid, iova, &mut b)
                } else {
                    self.smmu.dma_read(sid, ssid, iova, &mut b, f.privileged)
                };
                Ok(match r {
                    Ok(()) => format!("OK {}", to_hex(&b)),
                    Err(e) => dma_error(e),
                })
            }
            "dmawrite" => {
                let (sid, ssid) = self.stream(w)?;
                let iova = num(arg(w, 3, "IOVA")?)?;
                let data = hex_bytes(arg(w, 4, "DATA")?)?;
                let f = flags(w, 5, ssid)?;
                let r = if f.translated {
                    self.smmu.dma_write_translated(sid, iova, &data)
                } else {
                    self.smmu.dma_write(sid, ssid, iova, &data, f.privileged)
                };
                Ok(match r {
                    Ok(()) => "OK".into(),
                    Err(e) => dma_error(e),
                })
            }
            "ats" => {
                let (sid, ssid) = self.stream(w)?;
                let addr = num(arg(w, 3, "IOVA")?)?;
                let access = arg(w, 4, "ACCESS")?;
                if access.is_empty() || !access.chars().all(|c| matches!(c, 'r' | 'w' | 'x')) {
                    return Err(format!(
                        "ACCESS must be letters from r, w, x, not '{access}'"
                    ));
                }
                let privileged = match w.get(5) {
                    None => false,
                    Some(&"priv") => true,
                    Some(o) => return Err(format!("expected 'priv', got '{o}'")),
                };
                if w.len() > 6 {
                    return Err(format!("unexpected '{}'", w[6]));
                }
                if ssid.is_none() && (privileged || access.contains('x')) {
                    return Err("Exe and Priv travel in the PASID prefix: give an SSID".into());
                }
                let req = AtsRequest {
                    sid,
                    ssid,
                    addr,
                    no_write: !access.contains('w'),
                    exec: access.contains('x'),
                    privileged,
                };
                Ok(match self.smmu.ats_translation_request(&req) {
                    AtsCompletion::Success(t) => {
                        let perm: String = [
                            if t.read { 'r' } else { '-' },
                            if t.write { 'w' } else { '-' },
                            if t.exec { 'x' } else { '-' },
                            if t.privileged { 'p' } else { 'u' },
                        ]
                        .iter()
                        .collect();
                        format!("OK 0x{:016x} {perm} 0x{:x}", t.addr, t.size)
                    }
                    AtsCompletion::UnsupportedRequest { event: Some(e), .. } => {
                        format!("FAULT {}", e.name())
                    }
                    AtsCompletion::UnsupportedRequest { event: None, .. } => "ABORT".into(),
                    AtsCompletion::CompleterAbort { cause } => format!("FAULT {}", cause.name()),
                })
            }
            "pagehint" => {
                let (sid, ssid) = self.stream(w)?;
                let addr = num(arg(w, 3, "ADDR")?)?;
                let span = u8::try_from(num(arg(w, 4, "SPAN")?)?)
                    .map_err(|_| "SPAN above 255 pages".to_string())?;
                let mut h = PageRequestHint {
                    sid,
                    ssid,
                    addr,
                    span,
                    ..PageRequestHint::default()
                };
                let list = arg(w, 5, "FLAGS")?;
                if list != "-" {
                    for f in list.split(',') {
                        match f {
                            "pr" => h.priv_read = true,
                            "pw" => h.priv_write = true,
                            "px" => h.priv_exec = true,
                            "ur" => h.user_read = true,
                            "uw" => h.user_write = true,
                            "ux" => h.user_exec = true,
                            o => return Err(format!("unknown flag '{o}' (pr pw px ur uw ux)")),
                        }
                    }
                }
                if w.len() > 6 {
                    return Err(format!("unexpected '{}'", w[6]));
                }
                Ok(if self.smmu.page_request_hint(&h) {
                    "OK recorded".into()
                } else {
                    "OK dropped".into()
                })
            }
            "tlbi" => {
                let op = TlbiOp::from_name(arg(w, 1, "OP")?)
                    .ok_or_else(|| format!("unknown TLBI operation '{}'", w[1]))?;
                let mut t = Tlbi::new(op, 0);
                let (mut num_, mut scale, mut tg, mut ttl) = (None, None, None, None);
                for kv in &w[2..] {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| format!("expected key=value, got '{kv}'"))?;
                    let v = num(v)?;
                    let small = |max: u64| -> Result<u8, String> {
                        if v > max {
                            Err(format!("{k}={v} above {max}"))
                        } else {
                            Ok(v as u8)
                        }
                    };
                    match k {
                        "vmid" => t.vmid = u16::try_from(v).map_err(|_| "vmid above 65535")?,
                        "asid" => t.asid = u16::try_from(v).map_err(|_| "asid above 65535")?,
                        "addr" => t.addr = v,
                        "num" => num_ = Some(small(31)?),
                        "scale" => scale = Some(small(63)?),
                        "tg" => tg = Some(small(3)?),
                        "ttl" => ttl = Some(small(3)?),
                        _ => return Err(format!("unknown key '{k}'")),
                    }
                }
                if op.is_range() {
                    let tg_shift = match tg.unwrap_or(1) {
                        1 => 12,
                        2 => 14,
                        3 => 16,
                        _ => return Err("range forms need tg=1, 2 or 3".into()),
                    };
                    t.range = Some(TlbiRange {
                        tg_shift,
                        num: num_.unwrap_or(0),
                        scale: scale.unwrap_or(0),
                        ttl: ttl.unwrap_or(0),
                    });
                } else if num_.is_some() || scale.is_some() {
                    return Err(format!("{} is not a range operation", op.name()));
                }
                self.smmu.broadcast(t);
                Ok("OK".into())
            }
            "stats" => {
                let s = self.smmu.stats();
                let mut a = String::from("OK");
                for (k, v) in s.pairs() {
                    a.push_str(&format!(" {k}={v}"));
                }
                Ok(a)
            }
            other => Err(format!("unknown command '{other}'")),
        }
    }

    fn stream(&self, w: &[&str]) -> Result<(u32, Option<u32>), String> {
        let sid = u32::try_from(num(arg(w, 1, "SID")?)?).map_err(|_| "SID above 2^32")?;
        let ssid = match arg(w, 2, "SSID")? {
            "-" => None,
            s => Some(u32::try_from(num(s)?).map_err(|_| "SSID above 2^32")?),
        };
        Ok((sid, ssid))
    }
}

/// The optional words after a DMA's fixed arguments.
struct Flags {
    privileged: bool,
    translated: bool,
}

fn flags(w: &[&str], from: usize, ssid: Option<u32>) -> Result<Flags, String> {
    let mut f = Flags {
        privileged: false,
        translated: false,
    };
    for word in w.iter().skip(from) {
        match *word {
            "priv" if !f.privileged => f.privileged = true,
            "translated" if !f.translated => f.translated = true,
            o => return Err(format!("expected 'priv' or 'translated', got '{o}'")),
        }
    }
    // IDR3.PASIDTT = 0: a Translated transaction is Data, unprivileged, with no PASID
    // (IHI0070 3.9.1.3).
    if f.translated && (f.privileged || ssid.is_some()) {
        return Err("a translated transaction carries no PASID: SSID '-' and no 'priv'".into());
    }
    Ok(f)
}

fn dma_error(e: DmaError) -> String {
    match e {
        DmaError::Fault { event, .. } => format!("FAULT {}", event.name()),
        DmaError::Abort => "ABORT".into(),
        DmaError::Stalled { stag, .. } => format!("STALL {stag}"),
        DmaError::BusError { pa } => format!("ERR external abort from memory at {pa:#x}"),
    }
}
