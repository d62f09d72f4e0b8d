//! `twinmmu vmid`: trace in, exact lines out.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::io::Write;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngSeed};
use twinmmu_sim::vmid::replay;

fn run(trace: &str) -> String {
    let mut out = Vec::new();
    replay(trace.as_bytes(), &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vmid-rollover.trace");

#[test]
fn the_example_trace_gives_exactly_these_answers() {
    let out = run(&std::fs::read_to_string(EXAMPLE).unwrap());
    let mut want: Vec<String> = ["OK", "OK", "OK"].map(String::from).to_vec();
    // web: 1 (slow path, first allocation); pin: 1; put; db: 2; web again: fast path.
    want.extend(["OK 1", "OK 1", "OK", "OK 2", "OK 1"].map(String::from));
    // Generation 1 fills up in order from index 3.
    want.extend((3..=255).map(|i| format!("OK {i}")));
    // Rollover: pinned 1 and reserved 2 are kept, so the new VM gets 3.
    want.push("OK 3 rollover".into());
    want.extend(
        [
            "OK 1", // web: pinned, survives the rollover
            "OK",   // put 1
            "OK 2", // db: reserved at the rollover, keeps its number
            "OK 4", // ghost never ran: the pin allocates
            "OK",
            "OK",
            "ERR not-pinned",
            "ERR bits: settings must come before the first operation",
            "ERR CPU 2 out of range (2 CPUs)",
            "ERR unknown operation 'frobnicate'",
            "OK",
            // 255 + 1 + web + db allocations on the slow path, plus the pins' none.
            "# rollovers 1 broadcasts 1 slow-paths 258 fast-paths 1 pins 2",
        ]
        .map(String::from),
    );
    assert_eq!(lines(&out), want);
}

#[test]
fn the_binary_reads_a_file_or_stdin_and_answers_the_same() {
    let bin = env!("CARGO_BIN_EXE_twinmmu");
    let from_file = Command::new(bin).args(["vmid", EXAMPLE]).output().unwrap();
    assert!(from_file.status.success());
    let mut child = Command::new(bin)
        .arg("vmid")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(EXAMPLE).unwrap())
        .unwrap();
    let from_stdin = child.wait_with_output().unwrap();
    assert!(from_stdin.status.success());
    assert_eq!(from_file.stdout, from_stdin.stdout);
    let dash = Command::new(bin)
        .args(["vmid", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(dash.stdout).unwrap(),
        "# rollovers 0 broadcasts 0 slow-paths 0 fast-paths 0 pins 0\n"
    );
}

#[test]
fn a_missing_trace_file_is_an_error_not_a_crash() {
    let out = Command::new(env!("CARGO_BIN_EXE_twinmmu"))
        .args(["vmid", "/nonexistent/trace"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open /nonexistent/trace"));
}

#[test]
fn defaults_are_four_cpus_sixteen_bits_pinning_on() {
    let out = run("load 3 a\nload 4 b\npin b\n");
    assert_eq!(
        lines(&out),
        [
            "OK 1",
            "ERR CPU 4 out of range (4 CPUs)",
            "OK 2",
            "# rollovers 0 broadcasts 0 slow-paths 1 fast-paths 0 pins 1"
        ]
    );
    // 16 bits: 65535 VMs fit in one generation.
    let mut t = String::new();
    for i in 0..65_536 {
        t.push_str(&format!("load 0 v{i}\n"));
    }
    let out = run(&t);
    let l = lines(&out);
    assert_eq!(l[65_534], "OK 65535");
    assert_eq!(l[65_535], "OK 1 rollover");
}

#[test]
fn settings_are_checked_against_each_other() {
    let out = run(
        "bits 8\ncpus 255\ncpus 254\ncpus 0\nbits 12\nbits 16\ncpus 300\npinning maybe\npinning off\ncpus\npin a\n",
    );
    assert_eq!(
        lines(&out),
        [
            "OK",
            "ERR cpus 255: 255 CPUs need more than 8-bit VMIDs",
            "OK",
            "ERR cpus 0: a VMID allocator needs at least one CPU",
            "ERR bits: '12' is not 8 or 16",
            "OK",
            "OK",
            "ERR pinning: 'maybe' is not on or off",
            "OK",
            "ERR cpus: expected one value",
            "ERR disabled",
            "# rollovers 0 broadcasts 0 slow-paths 0 fast-paths 0 pins 0"
        ]
    );
}

#[test]
fn pinning_exhausts_at_max_pinned() {
    // 8 bits, 250 CPUs: max_pinned = 256 - 250 - 2 = 4.
    let mut t = String::from("bits 8\ncpus 250\n");
    for i in 0..6 {
        t.push_str(&format!("pin p{i}\n"));
    }
    t.push_str("pin p0\nunpin p1\npin p5\n");
    let out = run(&t);
    assert_eq!(
        lines(&out),
        [
            "OK",
            "OK",
            "OK 1",
            "OK 2",
            "OK 3",
            "OK 4",
            "ERR exhausted",
            "ERR exhausted",
            "OK 1",
            "OK",
            // A refused pin allocated nothing: p5 gets the next index.
            "OK 5",
            "# rollovers 0 broadcasts 0 slow-paths 0 fast-paths 0 pins 6"
        ]
    );
}

#[test]
fn malformed_lines_get_one_err_each_and_the_session_goes_on() {
    let bad = [
        "load",
        "load 0",
        "load x a",
        "load -1 a",
        "load 0 a b",
        "load 99999999999999999999999 a",
        "put",
        "put a",
        "put 4",
        "pin",
        "pin a b",
        "unpin",
        "LOAD 0 a",
        "cpus 4 4",
        "bits sixteen",
        "\u{7f}",
    ];
    let mut t = String::new();
    for b in bad {
        t.push_str(b);
        t.push('\n');
        t.push_str("load 0 ok\n");
    }
    t.push_str("   # indented comment\n\n\t\n# comment\nput 0 # trailing comment\n");
    let out = run(&t);
    let l = lines(&out);
    assert_eq!(l.len(), 2 * bad.len() + 2, "{out}");
    for (i, b) in bad.iter().enumerate() {
        assert!(
            l[2 * i].starts_with("ERR "),
            "{b:?} answered {:?}",
            l[2 * i]
        );
        assert!(!l[2 * i].contains('\n'));
        assert_eq!(l[2 * i + 1], "OK 1", "after {b:?}");
    }
    assert_eq!(l[2 * bad.len()], "OK");
    assert!(l[2 * bad.len() + 1].starts_with("# rollovers 0 "));
}

#[test]
fn a_line_that_is_not_utf8_is_an_error() {
    let mut out = Vec::new();
    replay(&b"load 0 \xff\xfe\nload 0 a\n"[..], &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(lines(&out)[..2], ["ERR line is not UTF-8", "OK 1"]);
}

#[test]
fn the_summary_counts_rollovers_broadcasts_slow_paths_and_pins() {
    // 8 bits, 1 CPU: 255 VMs per generation, so 600 fresh VMs roll over twice.
    let mut t = String::from("bits 8\ncpus 1\npin a\npin a\n");
    for i in 0..600 {
        t.push_str(&format!("load 0 v{i}\n"));
    }
    t.push_str("load 0 a\nput 0\nload 0 a\n");
    let out = run(&t);
    let l = lines(&out);
    assert_eq!(l.iter().filter(|s| s.ends_with(" rollover")).count(), 2);
    assert_eq!(
        *l.last().unwrap(),
        "# rollovers 2 broadcasts 2 slow-paths 601 fast-paths 1 pins 2"
    );
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "load", "put", "pin", "unpin", "cpus", "bits", "pinning", "on", "off", "8", "16",
            "#", "0", "1", "2", "3", "a", "b", "c",
        ])
        .prop_map(String::from),
        1 => "[a-z0-9#\\- ]{0,6}",
        1 => any::<String>(),
    ]
}

fn config() -> ProptestConfig {
    let long = std::env::var_os("TWINMMU_LONG").is_some();
    ProptestConfig {
        cases: if long { 4096 } else { 128 },
        rng_seed: if long {
            RngSeed::Random
        } else {
            RngSeed::Fixed(0x7717_4d4d_5133)
        },
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Nothing a trace says crashes the replay; every non-blank, non-comment line gets
    /// exactly one answer, and replaying twice gives the same output.
    #[test]
    fn any_trace_is_answered_line_for_line_and_deterministically(
        trace in prop::collection::vec(prop::collection::vec(token(), 0..5), 0..80)
    ) {
        let text: String = trace.iter().map(|l| l.join(" ") + "\n").collect();
        let out = run(&text);
        let answered = text
            .lines()
            .filter(|l| !l.split('#').next().unwrap_or_default().trim().is_empty())
            .count();
        prop_assert_eq!(out.lines().count(), answered + 1);
        prop_assert!(out.lines().last().unwrap().starts_with("# rollovers "));
        for l in out.lines().take(answered) {
            prop_assert!(l == "OK" || l.starts_with("OK ") || l.starts_with("ERR "), "{}", l);
        }
        prop_assert_eq!(out.clone(), run(&text));
    }
}
