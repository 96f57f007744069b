//! The report folder of a run: `summary.md` (the table, faults survived, per-phase
//! latency), `results.json`, and PNG plots (metric vs round for every arm, ε vs round,
//! per-phase latency), drawn with plotters and an embedded DejaVu font.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use guild_privacy::secagg::Phase;

use crate::results::{ArmResult, RunResults};
use crate::stats::Metric;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn register_font() {
    // Registering twice, or failing to, only costs the text of the plots.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// The Markdown summary.
pub fn markdown(results: &RunResults) -> String {
    let mut out = format!("# Scenario `{}`\n\n", results.scenario);
    if !results.description.is_empty() {
        out += &format!("{}\n\n", results.description.trim());
    }
    out += &format!(
        "{} merchants, {} shoppers, a catalogue of {} items; every arm ranks the held-out item of the same {} test users \
         against the full catalogue. Expected cohort {:.1}; adapter of {} parameters. Machine: {}. Wall time {:.0} s.\n\n",
        results.merchants,
        results.dataset_users,
        results.catalogue,
        results.eval_users,
        results.expected_cohort,
        results.adapter_parameters,
        results.machine,
        results.wall_seconds
    );
    out += "| arm | Recall@10 | NDCG@10 | MRR | ε spent (δ) | rounds | wall time (s) | bytes sent per client per round |\n";
    out += "|---|---|---|---|---|---|---|---|\n";
    for arm in &results.arms {
        let epsilon = match (arm.epsilon, arm.delta) {
            (Some(e), Some(d)) => format!("{e:.3} ({d:.0e})"),
            _ => "∞ (no DP)".into(),
        };
        let epsilon = if arm.rounds == 0 && arm.epsilon.is_none() { "–".into() } else { epsilon };
        out += &format!(
            "| {} | {:.4} | {:.4} | {:.4} | {} | {} | {:.0} | {} |\n",
            arm.arm,
            arm.test.recall_at_10,
            arm.test.ndcg_at_10,
            arm.test.mrr,
            epsilon,
            if arm.rounds > 0 { arm.rounds.to_string() } else { "–".into() },
            arm.wall_seconds,
            arm.bytes_per_client_round.map_or("–".into(), |b| format!("{:.0}", b)),
        );
        if let Some(w) = &arm.worst {
            out += &format!(
                "| ↳ worst local-only merchant | {:.4} | {:.4} | {:.4} | – | – | – | – |\n",
                w.recall_at_10, w.ndcg_at_10, w.mrr
            );
        }
    }
    out += "\nTest split (each user's last item). Validation scores (the item before it) are in `results.json`.\n\n";
    for arm in &results.arms {
        if let (Some(max), Some(mean), Some(delta)) =
            (arm.epsilon_against_coordinator_max, arm.epsilon_against_coordinator_mean, arm.delta)
            && arm.unit == Some(guild_privacy::PrivacyUnit::Shopper)
        {
            out += &format!(
                "**{}**: ε is shopper-level: every merchant took part in every round and sampled its own \
                 shoppers in secret, so the amplification holds against the coordinator too. The merchants' \
                 own ledgers (each charging its shoppers' rounds at its own rate) read ε = {max:.2} at most and \
                 {mean:.2} on average (δ = {delta:.0e}). A shopper-level round gives no merchant-level \
                 guarantee: a merchant's whole contribution is the sum of its shoppers'.{}\n\n",
                arm.arm,
                collusion(arm)
            );
        } else if let (Some(max), Some(mean), Some(delta)) =
            (arm.epsilon_against_coordinator_max, arm.epsilon_against_coordinator_mean, arm.delta)
        {
            out += &format!(
                "**{}**: ε spent is model-level (amplified by sampling: against whoever sees the released \
                 adapters). Against the coordinator, which knows whom it sampled, each merchant's own ledger \
                 (its participations composed, no amplification) reads ε = {max:.2} for the merchant that took \
                 part most and {mean:.2} on average over those that took part (δ = {delta:.0e}).{}\n\n",
                arm.arm,
                collusion(arm)
            );
        }
    }
    out += &comparisons(results);
    out += &shares(results);
    out += &search(results);
    out += &serving(results);
    // A paragraph, not a last row of the table before it.
    out += "\n";
    out += &verdict(results);
    out += "\n## Faults injected and survived\n\n";
    let eventful: Vec<&ArmResult> =
        results.arms.iter().filter(|a| !a.events.is_empty() || a.dropouts.values().any(|n| *n > 0)).collect();
    if eventful.is_empty() {
        out += "None: this scenario injects no faults.\n";
    }
    for arm in eventful {
        out += &format!("- **{}**: ", arm.arm);
        let mut parts = arm.events.clone();
        let dropped: Vec<String> =
            arm.dropouts.iter().filter(|(_, n)| **n > 0).map(|(p, n)| format!("{n} in {p}")).collect();
        if !dropped.is_empty() {
            parts.push(format!("clients dropped at the deadline: {}", dropped.join(", ")));
        }
        out += &format!("{}.\n", parts.join("; "));
    }
    out += "\n## Per-phase latency (mean seconds, from the coordinator's metrics)\n\n| arm | ";
    out += &Phase::ALL.map(Phase::name).join(" | ");
    out += " |\n|---|";
    out += &"---|".repeat(Phase::COUNT);
    out += "\n";
    for arm in results.arms.iter().filter(|a| !a.phase_seconds.is_empty()) {
        out += &format!("| {} |", arm.arm);
        for p in Phase::ALL {
            out += &format!(" {} |", cell(arm.phase_seconds.get(p.name()).copied(), 3));
        }
        out += "\n";
    }
    out += "\nPlots: `metric_vs_round.png`, `epsilon_vs_round.png`, `phase_latency.png`.\n";
    out
}

/// The paired differences of every arm against the reference arms, with their intervals.
fn comparisons(results: &RunResults) -> String {
    if let Some(error) = &results.comparisons_failed {
        return format!(
            "## Paired differences\n\nThe paired comparisons could not be made: {error}. Every arm's scores \
             above stand; `results.json` holds each arm's per-user ranks.\n\n"
        );
    }
    let compared: Vec<&ArmResult> = results.arms.iter().filter(|a| !a.comparisons.is_empty()).collect();
    if compared.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "## Paired differences on the same {} test users (95% paired-bootstrap intervals, {} resamples)\n\n\
         | arm | against | ΔNDCG@10 [95% CI] | relative | ΔRecall@10 [95% CI] | relative |\n|---|---|---|---|---|---|\n",
        results.eval_users,
        crate::stats::BOOTSTRAP_RESAMPLES
    );
    for arm in compared {
        for c in &arm.comparisons {
            out += &format!("| {} | {} |", arm.arm, c.against);
            for d in &c.differences {
                let mark = if d.significantly_positive() {
                    " **↑**"
                } else if d.ci_high < 0.0 {
                    " **↓**"
                } else {
                    ""
                };
                out += &format!(
                    " {:+.4} [{:+.4}, {:+.4}]{mark} | {:+.1}% |",
                    d.difference,
                    d.ci_low,
                    d.ci_high,
                    100.0 * d.relative
                );
            }
            out += "\n";
        }
    }
    out += "\n↑: the whole interval is above zero; ↓: below.\n\n";
    out
}

/// Each arm's share of the centralised arm's NDCG@10 gain over zero-shot, with its 95%
/// paired-bootstrap interval (users resampled jointly for numerator and denominator), on
/// the users every arm was scored on; empty without both references.
fn shares(results: &RunResults) -> String {
    use crate::run::{CENTRALISED, ZERO_SHOT};
    use crate::stats::{BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, paired_share, per_user};
    let values = |name: &str| {
        let arm = results.arms.iter().find(|a| a.arm == name && !a.test_ranks.is_empty())?;
        per_user(Metric::NdcgAt10, &arm.test_ranks).ok()
    };
    let (Some(base), Some(top)) = (values(ZERO_SHOT), values(CENTRALISED)) else { return String::new() };
    let mut rows = String::new();
    for arm in results.arms.iter().filter(|a| ![ZERO_SHOT, CENTRALISED].contains(&a.arm.as_str())) {
        let Some(mine) = values(&arm.arm) else { continue };
        // An arm scored on a subsample pairs with the others' first n users.
        let n = mine.len().min(base.len()).min(top.len());
        if n < base.len().min(top.len()) {
            continue;
        }
        let Ok(s) = paired_share(&mine[..n], &base[..n], &top[..n], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        else {
            continue;
        };
        rows += &if s.ci_low.is_finite() {
            format!(
                "| {} | {:.0}% [{:.0}%, {:.0}%] |\n",
                arm.arm,
                100.0 * s.share,
                100.0 * s.ci_low,
                100.0 * s.ci_high
            )
        } else {
            format!("| {} | undefined (the centralised gain is not positive in every resample) |\n", arm.arm)
        };
    }
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "## Share of the centralised gain\n\nEach arm's NDCG@10 gain over zero-shot as a share of the \
         centralised arm's, on the same {} test users, with its 95% paired-bootstrap interval (users \
         resampled jointly for both gains, {} resamples).\n\n| arm | share [95% CI] |\n|---|---|\n{rows}\n",
        base.len().min(top.len()),
        BOOTSTRAP_RESAMPLES
    )
}

/// The serving table: the federated arm's final version answering `Recommend` on loopback.
fn serving(results: &RunResults) -> String {
    let Some(serving) = &results.serving else { return String::new() };
    let mut out = format!(
        "\n## Serving the {} adapter\n\n`guild-client serve`'s router (its engine batches the \
         requests that arrive together) on loopback with the arm's final version; a gRPC client sends \
         `Recommend` (k = 10, the history's items left out) with each of {} evaluation users' test \
         histories, on each of the callers' own connections, after the arms on this machine.\n\n\
         | callers | requests/s | p50 (ms) | p99 (ms) |\n|---|---|---|---|\n",
        serving.arm, serving.requests
    );
    for load in &serving.loads {
        out += &format!(
            "| {} | {:.0} | {:.2} | {:.2} |\n",
            load.concurrency, load.requests_per_s, load.p50_ms, load.p99_ms
        );
    }
    out
}

/// The search table: each way of searching on the same test users, against text only.
fn search(results: &RunResults) -> String {
    let Some(first) = results.search.first() else { return String::new() };
    let mut out = format!(
        "## Search ({} test users)\n\n\
         The query is {} words of the held-out item's title (lower-cased, runs of letters and digits of at \
         least two characters, drawn per shopper with a seed from its id, kept in title order); the history \
         before it is the context; the whole catalogue is ranked with the history's other items masked \
         (`guild_client::retrieval::search`). Score: the query's MiniLM cosine with each item's MiniLM title \
         vector, plus w times the history's recommendation score; w chosen on validation from {:?}.\n\n\
         | search | w | NDCG@10 | Recall@10 | ΔNDCG@10 vs text only [95% CI] | ΔRecall@10 [95% CI] |\n\
         |---|---|---|---|---|---|\n",
        first.test.users,
        guild_client::retrieval::QUERY_WORDS,
        crate::run::SEARCH_WEIGHTS,
    );
    for s in &results.search {
        let weight = s.weight.map_or("–".into(), |w| format!("{w}"));
        out += &format!("| {} | {weight} | {:.4} | {:.4} |", s.name, s.test.ndcg_at_10, s.test.recall_at_10);
        if s.against_text_only.is_empty() {
            out += " – | – |\n";
        } else {
            for d in &s.against_text_only {
                out += &format!(" {:+.4} [{:+.4}, {:+.4}] |", d.difference, d.ci_low, d.ci_high);
            }
            out += "\n";
        }
    }
    out + "\n"
}

/// What a distributed arm's ε holds against: its tolerated colluding survivors.
fn collusion(arm: &ArmResult) -> String {
    match arm.tolerated_colluders {
        Some(c) => format!(
            " Both figures hold with up to {c} of a round's survivors colluding with the coordinator \
             (adding no noise, or revealing theirs): each merchant added σ²/(t − {c}) of the noise, not σ²/t."
        ),
        None => String::new(),
    }
}

/// Whether merchant-level federated DP at the largest ε beats zero-shot (the untrained start
/// every federated arm begins from), by its paired NDCG@10 difference and 95% interval on
/// the same test users; empty without such an arm or its comparison.
fn verdict(results: &RunResults) -> String {
    let dp = results
        .arms
        .iter()
        .filter(|a| a.arm.starts_with("federated DP"))
        .max_by(|a, b| a.epsilon.unwrap_or(0.0).total_cmp(&b.epsilon.unwrap_or(0.0)));
    let Some(dp) = dp else { return String::new() };
    let against = dp.comparisons.iter().find(|c| c.against == crate::run::ZERO_SHOT);
    let Some(d) = against.and_then(|c| c.differences.iter().find(|d| d.metric == Metric::NdcgAt10)) else {
        return String::new();
    };
    let shown = format!("{:+.4} NDCG@10 [{:+.4}, {:+.4}]", d.difference, d.ci_low, d.ci_high);
    let fix = format!(
        "Client-level DP adds noise of standard deviation z·c/cohort to every coordinate of the averaged \
         update; with an expected cohort of {:.0} it competes with the signal in all {} coordinates, and the \
         server's shrinkage and the statistics' noise threshold keep what does not clear its noise from moving \
         the model. What would close the gap: larger cohorts (hundreds to thousands of merchants per round: the \
         noise shrinks as 1/cohort), more rounds, and fewer trained parameters.",
        results.expected_cohort, results.adapter_parameters
    );
    let users = format!("on the same {} test users (paired, 95% bootstrap interval)", d.users);
    if d.significantly_positive() {
        format!("**{}** beats zero-shot, the untrained start, by {shown} {users}.\n", dp.arm)
    } else if d.ci_high < 0.0 {
        format!("**{}** falls below zero-shot, the untrained start, by {shown} {users}. {fix}\n", dp.arm)
    } else {
        format!("**{}** is within noise of zero-shot, the untrained start: {shown} {users}. {fix}\n", dp.arm)
    }
}

/// An upper bound on the standard error of a mean over `n` users of a per-user metric in
/// [0, 1] whose mean is `mean` (its variance is at most E[x²] ≤ E[x] = `mean`): the band of
/// the per-round plot, conservative by construction.
fn se_bound(mean: f64, n: usize) -> f64 {
    (mean.max(0.0) / n.max(1) as f64).sqrt()
}

/// A line chart's frame: where it goes, its captions and where its legend sits.
struct Chart<'a> {
    path: &'a Path,
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    legend: SeriesLabelPosition,
}

/// A series' band: (x, lower, upper) at each point.
type Band = Vec<(f64, f64, f64)>;

fn line_chart(
    chart: Chart<'_>,
    series: &[(String, Vec<(f64, f64)>)],
    bands: &[Band],
    baselines: &[(String, f64)],
) -> anyhow::Result<()> {
    let Chart { path, title, x_label, y_label, legend } = chart;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).fold(1.0f64, f64::max);
    let values = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .chain(baselines.iter().map(|b| b.1))
        .chain(bands.iter().flatten().flat_map(|b| [b.1, b.2]));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(1e-6);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max + 0.5, (lo - pad)..(hi + pad))?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).label_style(("sans-serif", 14)).draw()?;
    for (i, band) in bands.iter().enumerate().filter(|(_, b)| b.len() > 1) {
        let color = PALETTE[i % PALETTE.len()];
        let outline: Vec<(f64, f64)> =
            band.iter().map(|b| (b.0, b.2)).chain(band.iter().rev().map(|b| (b.0, b.1))).collect();
        chart.draw_series(std::iter::once(Polygon::new(outline, color.mix(0.18).filled())))?;
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    for (j, (name, value)) in baselines.iter().enumerate() {
        let color = PALETTE[(series.len() + j) % PALETTE.len()];
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, *value), (x_max + 0.5, *value)],
                8,
                5,
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

fn federated(results: &RunResults) -> impl Iterator<Item = &ArmResult> {
    results.arms.iter().filter(|a| !a.curve.is_empty())
}

/// Reads a run's `results.json` back (to redraw a report).
pub fn read(path: &Path) -> anyhow::Result<RunResults> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a results file", path.display()))
}

/// Writes `summary.md`, `results.json` and the plots into `dir`.
pub fn write(results: &RunResults, dir: &Path) -> anyhow::Result<()> {
    register_font();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(results)?)?;
    std::fs::write(dir.join("summary.md"), markdown(results))?;

    let metric: Vec<(String, Vec<(f64, f64)>)> = federated(results)
        .map(|a| (a.arm.clone(), a.curve.iter().map(|p| (p.round as f64, p.validation.ndcg_at_10)).collect()))
        .collect();
    let bands: Vec<Band> = federated(results)
        .map(|a| {
            a.curve
                .iter()
                .map(|p| {
                    let half = 1.96 * se_bound(p.validation.ndcg_at_10, p.validation.users as usize);
                    (p.round as f64, p.validation.ndcg_at_10 - half, p.validation.ndcg_at_10 + half)
                })
                .collect()
        })
        .collect();
    let baselines: Vec<(String, f64)> = results
        .arms
        .iter()
        .filter(|a| a.curve.is_empty())
        .map(|a| (a.arm.clone(), a.validation.ndcg_at_10))
        .collect();
    line_chart(
        Chart {
            path: &dir.join("metric_vs_round.png"),
            title: "Validation NDCG@10 by round (band: ±1.96·√(NDCG/users); dashed: baselines)",
            x_label: "round",
            y_label: "NDCG@10",
            legend: SeriesLabelPosition::LowerRight,
        },
        &metric,
        &bands,
        &baselines,
    )?;

    let epsilon: Vec<(String, Vec<(f64, f64)>)> = federated(results)
        .filter(|a| a.epsilon.is_some())
        .map(|a| (a.arm.clone(), a.curve.iter().map(|p| (p.round as f64, p.epsilon)).collect()))
        .collect();
    line_chart(
        Chart {
            path: &dir.join("epsilon_vs_round.png"),
            title: "Privacy spent by round (ε from the ledger)",
            x_label: "round",
            y_label: "ε",
            legend: SeriesLabelPosition::LowerRight,
        },
        &epsilon,
        &[],
        &[],
    )?;

    let latency: Vec<(String, Vec<(f64, f64)>)> = results
        .arms
        .iter()
        .filter(|a| !a.phase_seconds.is_empty())
        .map(|a| {
            let points = Phase::ALL
                .into_iter()
                .map(|p| ((p.index() + 1) as f64, a.phase_seconds.get(p.name()).copied().unwrap_or(0.0)));
            (a.arm.clone(), points.collect())
        })
        .collect();
    line_chart(
        Chart {
            path: &dir.join("phase_latency.png"),
            title: "Mean SecAgg+ phase latency",
            x_label: "phase: 1 AdvertiseKeys (with training), 2 ShareKeys, 3 MaskedInput, 4 ConsistencyCheck, 5 Unmask",
            y_label: "seconds",
            legend: SeriesLabelPosition::UpperRight,
        },
        &latency,
        &[],
        &[],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Comparisons that cannot be made (here an arm whose models ranked different numbers
    /// of users) keep every arm's scores, and the report says why there are no intervals.
    #[test]
    fn failed_comparisons_keep_the_arms_and_the_report_says_why() {
        let arm = |name: &str, ranks: Vec<Vec<u32>>| ArmResult {
            arm: name.into(),
            test: crate::results::Scores { ndcg_at_10: 0.5, ..Default::default() },
            test_ranks: ranks,
            ..Default::default()
        };
        let mut arms =
            vec![arm(crate::run::ZERO_SHOT, vec![vec![1, 2, 3]]), arm("federated", vec![vec![1, 2, 3]])];
        assert_eq!(crate::run::compare_or_keep(&mut arms), None);
        assert!(!arms[1].comparisons.is_empty(), "comparable arms are compared");
        arms.push(arm("local-only (mean)", vec![vec![1, 2, 3], vec![1]]));
        let error = crate::run::compare_or_keep(&mut arms).expect("a failure");
        assert!(error.contains("same users"), "{error}");
        assert_eq!(arms.len(), 3, "no arm lost");
        assert!(arms.iter().all(|a| a.comparisons.is_empty() && a.test.ndcg_at_10 == 0.5));
        let results = RunResults {
            scenario: "t".into(),
            description: String::new(),
            machine: String::new(),
            merchants: 1,
            dataset_users: 3,
            catalogue: 10,
            eval_users: 3,
            expected_cohort: 1.0,
            adapter_parameters: 1,
            wall_seconds: 1.0,
            arms,
            search: Vec::new(),
            serving: None,
            comparisons_failed: Some(error.clone()),
        };
        let text = markdown(&results);
        assert!(text.contains("could not be made") && text.contains(&error), "{text}");
    }

    #[test]
    fn the_verdict_compares_dp_with_zero_shot_by_its_paired_interval() {
        let difference = |difference: f64, ci_low: f64, ci_high: f64| crate::stats::PairedDifference {
            metric: Metric::NdcgAt10,
            users: 1000,
            difference,
            relative: f64::NAN,
            ci_low,
            ci_high,
        };
        let results = |d: crate::stats::PairedDifference| RunResults {
            scenario: "t".into(),
            description: String::new(),
            machine: String::new(),
            merchants: 10,
            dataset_users: 1000,
            catalogue: 100,
            eval_users: 1000,
            expected_cohort: 5.0,
            adapter_parameters: 10,
            wall_seconds: 1.0,
            arms: vec![
                ArmResult { arm: "local-only (mean)".into(), ..Default::default() },
                ArmResult {
                    arm: "federated DP ε=8".into(),
                    epsilon: Some(8.0),
                    comparisons: vec![crate::results::Comparison {
                        against: crate::run::ZERO_SHOT.into(),
                        differences: vec![d],
                    }],
                    ..Default::default()
                },
            ],
            search: Vec::new(),
            serving: None,
            comparisons_failed: None,
        };
        let above = verdict(&results(difference(0.002, 0.001, 0.003)));
        assert!(
            above.contains("beats zero-shot") && above.contains("+0.0020 NDCG@10 [+0.0010, +0.0030]"),
            "{above}"
        );
        assert!(verdict(&results(difference(0.0, -0.0001, 0.0001))).contains("within noise of zero-shot"));
        assert!(verdict(&results(difference(-0.004, -0.005, -0.003))).contains("falls below zero-shot"));
        // Without a comparison against zero-shot there is nothing to say.
        let mut none = results(difference(0.002, 0.001, 0.003));
        none.arms[1].comparisons.clear();
        assert_eq!(verdict(&none), "");
    }
}
