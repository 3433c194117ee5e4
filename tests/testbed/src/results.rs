//! What a benchmark measured, for `cargo xtask bench` to gather: each figure a row of
//! `bench,figure,value,unit,baseline,ratio` appended to the CSV file named by
//! `ENFORCER_BENCH_RESULTS` (nothing is written without it: a bench run alone only prints).
//! `ENFORCER_BENCH_QUICK` asks for the reduced form (`cargo xtask bench --quick`).

use std::{fs::OpenOptions, io::Write as _};

/// The middle of `samples` (the upper one of an even count): what a benchmark reports of
/// several runs.
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The CSV header of the rows [`record`] writes.
pub const CSV_HEADER: &str = "bench,figure,value,unit,baseline,ratio";

/// Whether the benchmark runs in its reduced form.
pub fn quick() -> bool {
    std::env::var_os("ENFORCER_BENCH_QUICK").is_some()
}

/// One figure of `bench`, with the baseline it is compared against (its name) and the ratio,
/// if it has one.
pub fn record(bench: &str, figure: &str, value: f64, unit: &str, against: Option<(&str, f64)>) {
    let Some(path) = std::env::var_os("ENFORCER_BENCH_RESULTS") else {
        return;
    };
    let (baseline, ratio) = match against {
        Some((baseline, ratio)) => (baseline.to_owned(), format!("{ratio:.2}")),
        None => (String::new(), String::new()),
    };
    let row = [bench, figure, &format_value(value), unit, &baseline, &ratio]
        .map(csv_field)
        .join(",");
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{row}"));
    if let Err(error) = written {
        eprintln!(
            "results: cannot append to {}: {error}",
            path.to_string_lossy()
        );
    }
}

fn format_value(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// A field quoted as RFC 4180 wants when it holds a comma, a quote or a line break.
pub fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_with_commas_or_quotes_are_quoted() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a, b"), "\"a, b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    }
}
