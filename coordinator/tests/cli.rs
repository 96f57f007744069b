//! The `guild-coordinator` command line, run as a user would.

use std::process::Command;

fn coordinator(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_guild-coordinator")).args(args).output().expect("run binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{stdout:?} is not JSON: {e}"))
}

#[test]
fn epsilon_matches_the_design_notes_figure() {
    // DESIGN.md: z ≈ 1.80 gives ε = 3 at q = 0.1, T = 100, δ = 1e-5 (dp_accounting).
    let (ok, stdout, stderr) = coordinator(&[
        "privacy",
        "epsilon",
        "--sampling-rate",
        "0.1",
        "--noise-multiplier",
        "1.8",
        "--rounds",
        "100",
        "--delta",
        "1e-5",
    ]);
    assert!(ok, "{stderr}");
    let epsilon = json(&stdout)["epsilon"].as_f64().expect("epsilon is a number");
    assert!((epsilon - 3.0).abs() < 0.05, "ε = {epsilon}");
}

#[test]
fn noise_multiplier_round_trips_through_epsilon() {
    let (ok, stdout, stderr) = coordinator(&[
        "privacy",
        "noise-multiplier",
        "--sampling-rate",
        "0.1",
        "--rounds",
        "100",
        "--delta",
        "1e-5",
        "--target-epsilon",
        "8",
    ]);
    assert!(ok, "{stderr}");
    let out = json(&stdout);
    let z = out["noise_multiplier"].as_f64().expect("number");
    assert!((z - 0.99).abs() < 0.02, "DESIGN.md quotes z ≈ 0.99, got {z}");
    assert!(out["epsilon"].as_f64().expect("number") <= 8.0);
}

#[test]
fn invalid_arguments_are_named_and_exit_non_zero() {
    let base = ["privacy", "epsilon", "--rounds", "10"];
    for (extra, expected) in [
        (
            ["--sampling-rate", "1.5", "--noise-multiplier", "1", "--delta", "1e-5"],
            "sampling rate must be in (0, 1]",
        ),
        (
            ["--sampling-rate", "0", "--noise-multiplier", "1", "--delta", "1e-5"],
            "sampling rate must be in (0, 1]",
        ),
        (["--sampling-rate", "0.1", "--noise-multiplier", "0", "--delta", "1e-5"], "must be positive"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "1", "--delta", "1"], "δ must be in (0, 1)"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "x", "--delta", "1e-5"], "is not a number"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let (ok, _, stderr) = coordinator(&args);
        assert!(!ok, "{args:?} must fail");
        assert!(stderr.contains(expected), "{args:?}: {stderr:?} does not say {expected:?}");
    }
}
