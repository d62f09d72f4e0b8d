//! Runs `twinmmu qtest` as a process: the README example script, and malformed input.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

fn run(script: &str, config: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinmmu"));
    cmd.arg("qtest");
    let dir = std::env::temp_dir().join(format!("twinmmu-qtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(c) = config {
        let p = dir.join(format!("cfg-{}.toml", c.len()));
        std::fs::write(&p, c).unwrap();
        cmd.arg("--config").arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_example_script_translates_and_moves_bytes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/qtest-s1-dma.qtest"
    );
    let script = std::fs::read_to_string(path).unwrap();
    let answers = run(&script, None);
    let commands: Vec<&str> = script
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(answers.len(), commands.len(), "one answer per command");
    let answer = |cmd: &str| -> &str {
        let i = commands.iter().position(|c| *c == cmd).unwrap();
        &answers[i]
    };
    assert_eq!(
        answer("readl 0x09050024"),
        "OK 0x0000000000000008",
        "CR0ACK = CMDQEN"
    );
    assert_eq!(
        answer("readl 0x0905009c"),
        "OK 0x0000000000000003",
        "CONS caught up"
    );
    assert_eq!(answer("dma 1 - 0x80001234 r"), "OK 0x0000000040100234");
    assert_eq!(answer("dmaread 1 - 0x80001000 4"), "OK 0xdeadbeef");
    assert_eq!(answer("dmawrite 1 - 0x80001010 0x01020304"), "OK");
    assert_eq!(answer("read 0x40100010 4"), "OK 0x01020304");
    assert_eq!(answer("dma 1 - 0x90000000 r"), "FAULT F_TRANSLATION");
    assert_eq!(
        answer("readl 0x090600a8"),
        "OK 0x0000000000000001",
        "EVENTQ_PROD"
    );
    // The record: F_TRANSLATION (0x10) for StreamID 1, InputAddr 0x90000000.
    assert_eq!(answer("readq 0x40020000"), "OK 0x0000000100000010");
    assert_eq!(answer("readq 0x40020010"), "OK 0x0000000090000000");
    assert_eq!(answer("tlbi VAE1IS vmid=0 asid=1 addr=0x80001000"), "OK");
    let stats = answers.last().unwrap();
    assert!(stats.starts_with("OK translations="), "{stats}");
    assert!(stats.contains(" events=1 "), "{stats}");
    assert!(stats.contains(" broadcasts=1 "), "{stats}");
    assert!(answers.iter().all(|a| !a.starts_with("ERR")), "{answers:?}");
}

#[test]
fn malformed_lines_answer_err_and_the_session_goes_on() {
    let script = "\
bogus 1 2
writel
writel 0x40000000 zzz
readb 0x09050000
read 0x40000000 0x7fffffffffffffff
write 0x40000000 2 0x123
memset 0x0 16 0
dma 1 - 0x1000 q
dma 99999999999 - 0 r
tlbi NOPE
tlbi VAE1IS num=1
tlbi RVAE1IS tg=7
readq 0x10
   # only a comment

writel 0x40000000 0x12345678 # trailing comment
readl 0x40000000
dma 5 - 0x1000 r
stats
";
    let a = run(script, None);
    assert_eq!(a.len(), 17, "{a:?}");
    for (i, line) in a.iter().enumerate().take(13) {
        assert!(line.starts_with("ERR "), "line {i}: {line}");
    }
    assert_eq!(a[13], "OK");
    assert_eq!(a[14], "OK 0x0000000012345678");
    // SMMUEN = 0 and GBPA.ABORT = 0: bypass.
    assert_eq!(a[15], "OK 0x0000000000001000");
    assert!(a[16].starts_with("OK "));
}

#[test]
fn config_file_moves_the_map() {
    let cfg =
        "smmu_base = 0x2000000\nram_base = 0x80000000\nram_size = 0x100000\n[smmu]\nhyp = false\n";
    let a = run(
        "readl 0x2000000\nwritel 0x80000010 7\nreadl 0x80000010\nreadl 0x40000000\n",
        Some(cfg),
    );
    assert!(a[0].starts_with("OK 0x"), "{a:?}");
    let idr0 = u64::from_str_radix(a[0].trim_start_matches("OK 0x"), 16).unwrap();
    assert_eq!(idr0 & (1 << 9), 0, "HYP off from the config");
    assert_eq!(a[1], "OK");
    assert_eq!(a[2], "OK 0x0000000000000007");
    assert!(a[3].starts_with("ERR"), "old RAM base is not memory");
}

/// The example's setup, up to (not including) its DMA, as an EL2-E2H stream: a non-global
/// page (nG, bit 11), CD.ASID = 5, STE.STRW = EL2; and CR2.E2H = 1 before SMMUEN.
fn e2h_setup() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/qtest-s1-dma.qtest"
    );
    let example = std::fs::read_to_string(path).unwrap();
    example
        .lines()
        .take_while(|l| !l.starts_with("# Translate"))
        .map(|l| match l {
            "writeq 0x40043008 0x40100743" => "writeq 0x40043008 0x40100f43".to_owned(),
            "writeq 0x40030000 0x16205c0000010" => "writeq 0x40030000 0x56205c0000010".to_owned(),
            "writeq 0x40000040 0x4003000b" => {
                "writeq 0x40000040 0x4003000b\nwriteq 0x40000048 0x80000000\nwritel 0x0905002c 1"
                    .to_owned()
            }
            l => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `tlb_entries` of every `stats` answer.
fn tlb_entries(answers: &[String]) -> Vec<u64> {
    answers
        .iter()
        .filter(|a| a.starts_with("OK translations="))
        .map(|a| {
            let v = a
                .split(' ')
                .find_map(|kv| kv.strip_prefix("tlb_entries="))
                .unwrap();
            v.parse().unwrap()
        })
        .collect()
}

/// `tlbi` with the EL2 operations against an EL2-E2H stream (STRW = EL2, CR2.E2H = 1, CD
/// ASID 5, a non-global page): the ASID operand selects (IHI0070 3.17.5).
#[test]
fn el2_broadcasts_from_qtest_scope_by_asid_under_e2h() {
    let setup = e2h_setup();
    let script = format!(
        "{setup}
dma 1 - 0x80001234 r
stats
tlbi VAE2IS vmid=3 asid=6 addr=0x80001000
stats
tlbi VAE2IS vmid=3 asid=5 addr=0x80001000
stats
dma 1 - 0x80001234 r
tlbi RVALE2IS asid=5 addr=0x80000000 num=3 scale=0 tg=1
stats
dma 1 - 0x80001234 r
tlbi ASIDE2IS asid=6
stats
tlbi ASIDE2IS asid=5
stats
dma 1 - 0x80001234 r
tlbi ALLE2IS
stats
"
    );
    let answers = run(&script, None);
    assert!(answers.iter().all(|a| a.starts_with("OK")), "{answers:?}");
    let entries = tlb_entries(&answers);
    // Cached; another ASID leaves it; its ASID (any VMID operand) removes it; the range
    // form removes it; ASIDE2IS of another ASID leaves it, of its ASID removes it; ALLE2IS.
    assert_eq!(entries, vec![1, 1, 0, 0, 1, 0, 0]);
    let dmas: Vec<&String> = answers
        .iter()
        .filter(|a| a.starts_with("OK 0x0000000040100234"))
        .collect();
    assert_eq!(dmas.len(), 4, "{answers:?}");
}

/// A VHE host's by-VA-all-ASIDs TLBIs (`VAAE2IS`, `VAALE2IS`, `RVAAE2IS`, `RVAALE2IS`)
/// reach the SMMU as CMD_TLBI_EL2_VAA: the EL2-E2H entry at the address goes whatever its
/// ASID, an entry elsewhere stays.
#[test]
fn vaae2is_from_qtest_removes_every_asid_at_the_address() {
    let setup = e2h_setup();
    let script = format!(
        "{setup}
dma 1 - 0x80001234 r
tlbi VAAE2IS addr=0x80005000
stats
tlbi VAAE2IS addr=0x80001000
stats
dma 1 - 0x80001234 r
tlbi vaale2is addr=0x80001000
stats
dma 1 - 0x80001234 r
tlbi RVAAE2IS addr=0x80000000 num=3 scale=0 tg=1
stats
dma 1 - 0x80001234 r
tlbi RVAALE2IS addr=0x80000000 num=3 scale=0 tg=1
stats
tlbi VAAE2IS
"
    );
    let answers = run(&script, None);
    assert!(
        answers[..answers.len() - 1]
            .iter()
            .all(|a| a.starts_with("OK")),
        "{answers:?}"
    );
    assert_eq!(tlb_entries(&answers), vec![1, 0, 0, 0, 0]);
    assert_eq!(
        answers.last().map(String::as_str),
        Some("OK"),
        "addr defaults to 0"
    );
}

/// The example script's set-up (tables, CD, STE 1, queues, SMMUEN), with STE 1's EATS
/// set to Full ATS.
fn ats_setup() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/qtest-s1-dma.qtest"
    );
    let script = std::fs::read_to_string(path).unwrap();
    let end = script.find("# Translate, then move bytes").unwrap();
    // STE 1 dword 1: EATS[29:28] = 0b01.
    format!("writeq 0x40000048 0x10000000\n{}", &script[..end])
}

#[test]
fn ats_requests_translated_traffic_and_page_hints_from_qtest() {
    let script = format!(
        "{}\
ats 1 - 0x80001234 rw
ats 1 - 0x90000000 r
dma 1 - 0x40100008 r translated
writel 0x40100000 0xcafef00d
dmaread 1 - 0x40100000 4 translated
writel 0x09050020 0x1d
readl 0x09050024
dmawrite 1 - 0x40100004 0x0102 translated
read 0x40100004 2
writeq 0x40000080 0x9
writeq 0x40000088 0x10000000
ats 2 - 0x1000 r
dma 2 - 0x1000 w translated
pagehint 1 - 0x80001000 4 pr,ur
pagehint 1 - 0x80001000 0 -
readl 0x090600a8
readq 0x40020000
readq 0x40020008
readq 0x40020020
readq 0x40020030
readq 0x40020040
readq 0x40020048
readq 0x40020050
",
        ats_setup()
    );
    let cfg = "[smmu]\nats = true\n";
    let a = run(&script, Some(cfg));
    let n = a.len();
    let tail: Vec<&str> = a[n - 23..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            // R/W page: PA of the page, rw, unprivileged, one 4 KiB region.
            "OK 0x0000000040100000 rw-u 0x1000",
            // Unmapped: Success with no access (no event).
            "OK 0x0000000000000000 ---u 0x1000",
            // ATSCHK = 0: Translated traffic passes as a PA.
            "OK 0x0000000040100008",
            "OK",
            "OK 0x0df0feca",
            "OK",
            "OK 0x000000000000001d",
            // ATSCHK = 1 and EATS = Full: still passes.
            "OK",
            "OK 0x0102",
            "OK",
            "OK",
            // A bypass STE: ATS is disabled for it.
            "FAULT F_BAD_ATS_TREQ",
            "FAULT F_TRANSL_FORBIDDEN",
            "OK recorded",
            "OK dropped",
            // Three records.
            "OK 0x0000000000000003",
            // F_BAD_ATS_TREQ for StreamID 2: R, W = !NW = 0, Span 1; InputAddr[63:12].
            "OK 0x0000000200000005",
            "OK 0x0000000080000001",
            // F_TRANSL_FORBIDDEN for StreamID 2: RnW = 0 (write), InputAddr.
            "OK 0x0000000200000007",
            "OK 0x0000000000001000",
            // E_PAGE_REQUEST for StreamID 1: pR (39), uR (36), Span 4 (51:44).
            "OK 0x0000000100000024",
            "OK 0x0000409000000000",
            "OK 0x0000000080001000",
        ]
    );
    assert!(a.iter().all(|l| !l.starts_with("ERR")), "{a:?}");
}

#[test]
fn ats_commands_without_ats_and_malformed_ones() {
    let script = "\
ats 1 - 0x1000 r
dma 1 - 0x1000 r translated
ats 1 - 0x1000 q
ats 1 - 0x1000 x
ats 1 - 0x1000 r priv
ats 1 - 0x1000 r priv extra
dma 1 3 0x1000 r translated
dma 1 - 0x1000 r translated priv
dma 1 - 0x1000 r bogus
dmaread 1 - 0x1000 4 translated translated
pagehint 1 - 0 300 pr
pagehint 1 - 0 1 zz
pagehint 1 - 0 1
dma 1 - 0x1000 r
";
    let a = run(script, None);
    assert_eq!(a.len(), 14, "{a:?}");
    // No ATS interface: a Translation Request gets UR with no event.
    assert_eq!(a[0], "ABORT");
    // A Translated transaction is an unsupported upstream transaction.
    assert_eq!(a[1], "FAULT F_UUT");
    for (i, line) in a.iter().enumerate().take(13).skip(2) {
        assert!(line.starts_with("ERR "), "line {i}: {line}");
    }
    assert_eq!(a[13], "OK 0x0000000000001000");
}

#[test]
fn each_access_width_touches_exactly_its_bytes() {
    let a = run(
        "writeq 0x40000000 0xffffffffffffffff\nwriteb 0x40000000 0x11\n\
         writew 0x40000002 0x2233\nwritel 0x40000004 0x44556677\n\
         readq 0x40000000\nreadb 0x40000001\nreadw 0x40000002\nreadl 0x40000004\n",
        None,
    );
    assert_eq!(
        a,
        [
            "OK",
            "OK",
            "OK",
            "OK",
            "OK 0x445566772233ff11",
            "OK 0x00000000000000ff",
            "OK 0x0000000000002233",
            "OK 0x0000000044556677",
        ]
    );
}
