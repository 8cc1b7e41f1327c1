//! `cargo xtask bench detectors`: runs every detector over the seeded, labelled corpus in
//! `interlock_agent::detect::corpus` and prints precision and recall per detector, each
//! misclassified series by name, and, as its last line, the same figures as one JSON object.
//!
//! Pure computation: no I/O besides stdout, no clock except to time the run itself.

use std::time::Instant;

use interlock_agent::detect::corpus::{self, Outcome};

fn main() {
    let started = Instant::now();
    let outcomes = corpus::outcomes();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let scores = corpus::score(&outcomes);

    println!(
        "{:<14} {:>6} {:>4} {:>4} {:>4} {:>4} {:>9} {:>7} {:>14}",
        "detector", "series", "tp", "fp", "fn", "tn", "precision", "recall", "median_delay_s"
    );
    let mut rows = Vec::new();
    for s in &scores {
        let latency = median_latency_s(&outcomes, s.detector);
        println!(
            "{:<14} {:>6} {:>4} {:>4} {:>4} {:>4} {:>9.3} {:>7.3} {:>14}",
            s.detector,
            s.series,
            s.true_pos,
            s.false_pos,
            s.false_neg,
            s.true_neg,
            s.precision,
            s.recall,
            latency.map_or_else(|| "-".to_string(), |l| format!("{l:.0}")),
        );
        rows.push(serde_json::json!({
            "detector": s.detector,
            "series": s.series,
            "true_pos": s.true_pos,
            "false_pos": s.false_pos,
            "false_neg": s.false_neg,
            "true_neg": s.true_neg,
            "precision": s.precision,
            "recall": s.recall,
            "median_delay_s": latency,
        }));
    }
    let wrong: Vec<&Outcome> = outcomes.iter().filter(|o| o.positive != o.fired).collect();
    for o in &wrong {
        println!(
            "misclassified {}: {} (labelled {})",
            o.detector,
            o.series,
            if o.positive { "positive" } else { "negative" }
        );
    }
    println!(
        "{} series, {} misclassified, evaluated in {elapsed_ms:.1} ms",
        outcomes.len(),
        wrong.len()
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "detectors",
            "series": outcomes.len(),
            "misclassified": wrong.len(),
            "elapsed_ms": elapsed_ms,
            "detectors": rows,
        })
    );
}

/// Median time from a true positive's onset to its first finding, in seconds.
fn median_latency_s(outcomes: &[Outcome], detector: &str) -> Option<f64> {
    let mut latencies: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.detector == detector && o.positive)
        .filter_map(|o| Some(o.first_finding_ms?.saturating_sub(o.onset_ms?)))
        .collect();
    latencies.sort_unstable();
    let mid = latencies.get(latencies.len() / 2)?;
    Some(*mid as f64 / 1000.0)
}
