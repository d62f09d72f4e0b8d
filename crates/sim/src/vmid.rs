//! `twinmmu vmid [TRACE]`: replays a VMID allocation trace through the KVM VMID allocator.
//!
//! One operation per line, each answered with exactly one line:
//!
//! | line | answer |
//! |---|---|
//! | `cpus N`, `bits 8\|16`, `pinning on\|off` (settings, before the first operation; defaults 4, 16, on) | `OK` |
//! | `load CPU VM` — a vCPU of VM (any token) loads on CPU, after putting whatever was loaded there | `OK <vmid>`, plus ` rollover` if this load rolled the generation over |
//! | `put CPU` | `OK` |
//! | `pin VM` | `OK <vmid>` (plus ` rollover`), `ERR disabled` or `ERR exhausted` |
//! | `unpin VM` | `OK` or `ERR not-pinned` |
//!
//! A malformed line is answered `ERR <message>` and the session goes on. `#` starts a
//! comment; blank and comment-only lines get no answer. At the end one summary line starting
//! with `#` gives the rollovers, broadcasts, slow paths, fast paths and pins. The replay is
//! single-threaded and deterministic.
//!
//! KVM runs on a machine of `cpus` PEs joined by the DVM interconnect (no host memory: the
//! VMs have no stage 2). Each load programs its PE with the VMID; each rollover broadcasts
//! `TLBI ALLE1IS` over the interconnect, and `broadcasts` counts the interconnect's
//! messages.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use twinmmu_hw::{Dvm, DvmConfig, PeConfig, SparseMem};
use twinmmu_kvm::{
    Kvm, KvmConfig, Machine, PinError, Vcpu, Vm, VmConfig, Vmid, VmidBits, VmidInitError, VmidPin,
    VmidStats,
};

/// Replay a VMID allocation trace through the KVM VMID allocator (one answer per line).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The trace file; standard input when absent or `-`.
    pub trace: Option<PathBuf>,
}

/// Runs the subcommand: reads the trace, writes the answers to standard output.
pub fn run(args: &Args) -> ExitCode {
    let input: Box<dyn BufRead> = match &args.trace {
        Some(path) if path.as_os_str() != "-" => match File::open(path) {
            Ok(f) => Box::new(BufReader::new(f)),
            Err(e) => {
                let _ = writeln!(
                    io::stderr(),
                    "twinmmu vmid: cannot open {}: {e}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        },
        _ => Box::new(io::stdin().lock()),
    };
    let mut out = BufWriter::new(io::stdout().lock());
    match replay(input, &mut out).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "twinmmu vmid: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Replays `input`, writing one answer per operation and the summary to `out`. Only I/O
/// errors end it early; anything a trace says is answered.
pub fn replay(mut input: impl BufRead, out: &mut impl Write) -> io::Result<()> {
    let mut session = Session::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let answer = match std::str::from_utf8(&line) {
            Ok(text) => session.line(text),
            Err(_) => Some(Err("line is not UTF-8".to_owned())),
        };
        match answer {
            None => {}
            Some(Ok(ok)) => writeln!(out, "{ok}")?,
            Some(Err(msg)) => writeln!(out, "ERR {msg}")?,
        }
    }
    let s = session.stats();
    writeln!(
        out,
        "# rollovers {} broadcasts {} slow-paths {} fast-paths {} pins {}",
        s.rollovers,
        session.broadcasts(),
        s.slow_paths,
        s.fast_paths,
        s.pins
    )
}

struct VmEntry {
    vm: Arc<Vm>,
    /// Pins taken by `pin` lines, released last-in first-out by `unpin`.
    pins: Vec<VmidPin>,
}

struct Session {
    config: KvmConfig,
    /// Built at the first operation; settings are refused after that.
    kvm: Option<Arc<Kvm>>,
    vms: HashMap<String, VmEntry>,
    /// The vCPU loaded on each physical CPU.
    loaded: Vec<Option<Vcpu>>,
}

type Answer = Result<String, String>;

impl Session {
    fn new() -> Self {
        Session {
            config: KvmConfig::new(4),
            kvm: None,
            vms: HashMap::new(),
            loaded: Vec::new(),
        }
    }

    fn stats(&self) -> VmidStats {
        self.kvm.as_ref().map(|k| k.stats()).unwrap_or_default()
    }

    /// `TLBI …IS` messages the interconnect carried.
    fn broadcasts(&self) -> u64 {
        self.kvm
            .as_ref()
            .and_then(|k| k.machine())
            .map_or(0, |m| m.dvm().stats().broadcasts)
    }

    /// The answer to one line, or `None` for a blank or comment line.
    fn line(&mut self, raw: &str) -> Option<Answer> {
        let text = raw.split('#').next().unwrap_or_default();
        let words: Vec<&str> = text.split_whitespace().collect();
        let (&op, args) = words.split_first()?;
        Some(match op {
            "cpus" | "bits" | "pinning" => self.setting(op, args),
            "load" | "put" | "pin" | "unpin" => self.operation(op, args),
            _ => Err(format!("unknown operation '{op}'")),
        })
    }

    fn setting(&mut self, op: &str, args: &[&str]) -> Answer {
        let [value] = args else {
            return Err(format!("{op}: expected one value"));
        };
        if self.kvm.is_some() {
            return Err(format!(
                "{op}: settings must come before the first operation"
            ));
        }
        let mut config = self.config;
        match op {
            "cpus" => {
                config.ncpus = value
                    .parse()
                    .map_err(|_| format!("cpus: '{value}' is not a CPU count"))?;
            }
            "bits" => {
                config.vmid_bits = value
                    .parse()
                    .ok()
                    .and_then(VmidBits::from_bits)
                    .ok_or_else(|| format!("bits: '{value}' is not 8 or 16"))?;
            }
            _ => {
                config.pinning = match *value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("pinning: '{value}' is not on or off")),
                };
            }
        }
        // Each setting is checked against the others, so the configuration stays valid.
        config.check().map_err(|e| match e {
            VmidInitError::TooManyCpus { .. } => format!(
                "{op} {value}: {} CPUs need more than {}-bit VMIDs",
                config.ncpus,
                config.vmid_bits.bits()
            ),
            e => format!("{op} {value}: {e}"),
        })?;
        self.config = config;
        Ok("OK".to_owned())
    }

    fn operation(&mut self, op: &str, args: &[&str]) -> Answer {
        // Parse fully before anything runs, so a malformed line changes nothing.
        match (op, args) {
            ("load", [cpu, vm]) => {
                let cpu = self.cpu(cpu)?;
                let kvm = self.start()?;
                self.put(cpu)?;
                let vm = self.vm(&kvm, vm);
                let mut vcpu = vm.create_vcpu();
                let u = vcpu.load(cpu).map_err(|e| e.to_string())?;
                if let Some(slot) = self.loaded.get_mut(cpu) {
                    *slot = Some(vcpu);
                }
                Ok(vmid_answer(u.vmid, u.rolled_over))
            }
            ("put", [cpu]) => {
                let cpu = self.cpu(cpu)?;
                self.start()?;
                self.put(cpu)?;
                Ok("OK".to_owned())
            }
            ("pin", [name]) => {
                let kvm = self.start()?;
                let vm = self.vm(&kvm, name);
                let pin = vm.pin_vmid().map_err(|e| match e {
                    PinError::Disabled => "disabled".to_owned(),
                    PinError::Exhausted { .. } => "exhausted".to_owned(),
                    PinError::NoFreeVmid => "no-free-vmid".to_owned(),
                })?;
                let answer = vmid_answer(pin.vmid(), pin.rolled_over());
                if let Some(entry) = self.vms.get_mut(*name) {
                    entry.pins.push(pin);
                }
                Ok(answer)
            }
            ("unpin", [vm]) => {
                self.start()?;
                let pin = self
                    .vms
                    .get_mut(*vm)
                    .and_then(|e| e.pins.pop())
                    .ok_or_else(|| "not-pinned".to_owned())?;
                // No SMMU in a replay: nothing caches the VMID, retiring it is immediate.
                pin.unpin(|_| Ok::<(), std::convert::Infallible>(()))
                    .map_err(|e| e.to_string())?;
                Ok("OK".to_owned())
            }
            ("load", _) => Err("load: expected 'load CPU VM'".to_owned()),
            ("put", _) => Err("put: expected 'put CPU'".to_owned()),
            (_, _) => Err(format!("{op}: expected '{op} VM'")),
        }
    }

    fn cpu(&self, word: &str) -> Result<usize, String> {
        let cpu: usize = word
            .parse()
            .map_err(|_| format!("'{word}' is not a CPU number"))?;
        if cpu >= self.config.ncpus {
            return Err(format!(
                "CPU {cpu} out of range ({} CPUs)",
                self.config.ncpus
            ));
        }
        Ok(cpu)
    }

    /// The KVM, built from the settings at the first operation.
    fn start(&mut self) -> Result<Arc<Kvm>, String> {
        if let Some(kvm) = &self.kvm {
            return Ok(Arc::clone(kvm));
        }
        // PEs with small TLBs (nothing translates in a replay) and a page of memory they
        // never walk.
        let mem = SparseMem::with_range(0, 0x1000).map_err(|e| e.to_string())?;
        let dvm = Dvm::new(
            DvmConfig::new(self.config.ncpus).pe(PeConfig::default().tlb_capacity(16)),
            Arc::new(mem),
        );
        let kvm = Kvm::with_machine(self.config, Machine::new(dvm)).map_err(|e| e.to_string())?;
        self.loaded = (0..self.config.ncpus).map(|_| None).collect();
        self.kvm = Some(Arc::clone(&kvm));
        Ok(kvm)
    }

    fn put(&mut self, cpu: usize) -> Result<(), String> {
        if let Some(mut vcpu) = self.loaded.get_mut(cpu).and_then(Option::take) {
            vcpu.put().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn vm(&mut self, kvm: &Arc<Kvm>, name: &str) -> Arc<Vm> {
        let entry = self.vms.entry(name.to_owned()).or_insert_with(|| VmEntry {
            vm: kvm.create_vm(VmConfig::default()),
            pins: Vec::new(),
        });
        Arc::clone(&entry.vm)
    }
}

/// `OK <vmid>`, plus ` rollover` when getting it rolled the generation over.
fn vmid_answer(vmid: Vmid, rolled_over: bool) -> String {
    if rolled_over {
        format!("OK {vmid} rollover")
    } else {
        format!("OK {vmid}")
    }
}
