//! Benchmark support shared by every twinmmu crate.
//!
//! The project rule is that each benchmark prints, in the same run, its ratio to the physical
//! floor and to the peer a user would pick instead. Criterion measures; this crate configures
//! it with one output directory and, after the run, reads back the medians criterion wrote and
//! prints the ratios. A median that was not measured in this run (a filtered `cargo bench`
//! leaves older results on disk) is reported as such, never reused.
//!
//! ```no_run
//! use twinmmu_benchkit::{Report, criterion};
//! let mut c = criterion();
//! c.benchmark_group("walk").bench_function("floor", |b| b.iter(|| 1 + 1));
//! Report::new("vmsa walker")
//!     .ratio("walk / floor", "walk/s1_4k", "walk/floor", Some(3.0))
//!     .print();
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use criterion::Criterion;

/// Where criterion writes its results: `<workspace>/target/criterion`, or `$CRITERION_HOME`.
pub fn output_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("criterion")
}

/// A criterion instance with the project's settings: a fixed output directory (so reports
/// can find the medians) and sample counts that fit a shared two-core machine.
pub fn criterion() -> Criterion {
    let _ = run_start();
    Criterion::default()
        .output_directory(&output_dir())
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

fn run_start() -> SystemTime {
    static START: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    *START.get_or_init(SystemTime::now)
}

/// Criterion's sanitising of one path component (its `make_filename_safe`, minus Windows).
fn safe(component: &str) -> String {
    component.replace(['?', '"', '/', '\\', '*', '<', '>', ':', '|', '^'], "_")
}

/// The median, in nanoseconds, of the benchmark `id` ("group/function" or
/// "group/function/parameter"), if it was measured during this process's run.
pub fn median_ns(id: &str) -> Option<f64> {
    let mut path = output_dir();
    for part in id.split('/') {
        path.push(safe(part));
    }
    path.push("new");
    path.push("estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < run_start() {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("median")?.get("point_estimate")?.as_f64()
}

enum Row {
    Median {
        label: String,
        id: String,
    },
    Ratio {
        label: String,
        subject: String,
        base: String,
        target: Option<f64>,
    },
}

/// A table printed after the benchmarks: medians and ratios, with the target each ratio
/// must meet (a ratio is subject / base; a target `t` means "subject at most t × base").
pub struct Report {
    title: String,
    rows: Vec<Row>,
}

impl Report {
    pub fn new(title: &str) -> Self {
        Report {
            title: title.to_owned(),
            rows: Vec::new(),
        }
    }

    /// A plain median line.
    pub fn median(mut self, label: &str, id: &str) -> Self {
        self.rows.push(Row::Median {
            label: label.to_owned(),
            id: id.to_owned(),
        });
        self
    }

    /// `subject / base`, with an optional upper target for that ratio.
    pub fn ratio(mut self, label: &str, subject: &str, base: &str, target: Option<f64>) -> Self {
        self.rows.push(Row::Ratio {
            label: label.to_owned(),
            subject: subject.to_owned(),
            base: base.to_owned(),
            target,
        });
        self
    }

    /// Renders the report; `None` for a median means "not measured in this run".
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n== {} ==", self.title);
        for row in &self.rows {
            match row {
                Row::Median { label, id } => match median_ns(id) {
                    Some(ns) => {
                        let _ = writeln!(out, "{label:<48} median {}", fmt_ns(ns));
                    }
                    None => {
                        let _ = writeln!(out, "{label:<48} not measured in this run");
                    }
                },
                Row::Ratio {
                    label,
                    subject,
                    base,
                    target,
                } => match (median_ns(subject), median_ns(base)) {
                    (Some(s), Some(b)) if b > 0.0 => {
                        let r = s / b;
                        let verdict = match target {
                            Some(t) if r <= *t => format!("  (target <= {t}x: met)"),
                            Some(t) => format!("  (target <= {t}x: MISSED)"),
                            None => String::new(),
                        };
                        let _ = writeln!(
                            out,
                            "{label:<48} {r:>8.2}x  ({} / {}){verdict}",
                            fmt_ns(s),
                            fmt_ns(b)
                        );
                    }
                    _ => {
                        let _ = writeln!(out, "{label:<48} not measured in this run");
                    }
                },
            }
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.3} us", ns / 1e3)
    } else if ns >= 10.0 {
        format!("{ns:.1} ns")
    } else {
        format!("{ns:.2} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmeasured_benchmarks_are_reported_as_such() {
        let report = Report::new("t").median("m", "no_such_group/none").ratio(
            "r",
            "no_such_group/a",
            "no_such_group/b",
            Some(2.0),
        );
        let text = report.render();
        assert_eq!(
            text.matches("not measured in this run").count(),
            2,
            "{text}"
        );
    }

    #[test]
    fn formats_each_magnitude() {
        assert_eq!(fmt_ns(12.34), "12.3 ns");
        assert_eq!(fmt_ns(0.345), "0.34 ns");
        assert_eq!(fmt_ns(1_500.0), "1.500 us");
        assert_eq!(fmt_ns(2_500_000.0), "2.500 ms");
        assert_eq!(fmt_ns(3e9), "3.000 s");
    }

    #[test]
    fn sanitises_like_criterion() {
        assert_eq!(safe("a:b|c"), "a_b_c");
    }
}
