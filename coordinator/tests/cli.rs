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
    // DESIGN.md: z ≈ 1.80 gives ε = 3 at q = 0.1, T = 100, δ = 1e-5 (dp_accounting's
    // Poisson-subsampled Gaussian, add/remove neighbours: the shopper unit's accountant).
    let (ok, stdout, stderr) = coordinator(&[
        "privacy",
        "epsilon",
        "--unit",
        "shopper",
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
        "--unit",
        "shopper",
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

/// The unit changes who the sampling rate samples, and so the figure against the
/// coordinator: for shoppers (sampled by their merchants) it is the model-level ε; for
/// merchants (sampled by the coordinator) every round counts whole. DESIGN.md's
/// feasibility figure for the shopper unit: z ≈ 1.31 for ε = 3 at q = 0.02 over 1,000
/// rounds at δ = 1e-6.
#[test]
fn the_unit_decides_the_epsilon_against_the_coordinator() {
    let run = |unit: &str| {
        let (ok, stdout, stderr) = coordinator(&[
            "privacy",
            "noise-multiplier",
            "--unit",
            unit,
            "--sampling-rate",
            "0.02",
            "--rounds",
            "1000",
            "--delta",
            "1e-6",
            "--target-epsilon",
            "3",
        ]);
        assert!(ok, "{stderr}");
        json(&stdout)
    };
    let shopper = run("shopper");
    assert_eq!(shopper["unit"], "shopper");
    let z = shopper["noise_multiplier"].as_f64().expect("number");
    assert!((z - 1.31).abs() < 0.02, "DESIGN.md quotes z ≈ 1.31, got {z}");
    assert_eq!(shopper["epsilon_against_coordinator"], shopper["epsilon"]);
    let merchant = run("merchant");
    let against = merchant["epsilon_against_coordinator"].as_f64().expect("number");
    assert!(against > 5.0 * merchant["epsilon"].as_f64().expect("number"), "{merchant}");
    // A merchant takes its noise share with it when it is not sampled: its amplification is
    // the zero-out (joint-convexity) bound, which needs more noise for the same ε.
    assert!(merchant["noise_multiplier"].as_f64().expect("number") > z, "{merchant}");
    assert!(merchant["accountant"].as_str().expect("text").contains("zero-out"), "{merchant}");
    let (ok, _, stderr) = coordinator(&[
        "privacy",
        "epsilon",
        "--unit",
        "shop",
        "--sampling-rate",
        "0.1",
        "--noise-multiplier",
        "1",
        "--rounds",
        "1",
        "--delta",
        "1e-5",
    ]);
    assert!(!ok && stderr.contains("unknown privacy unit"), "{stderr}");
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

#[test]
fn init_federation_status_and_export_adapter_work_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("fed");
    let out_str = out.to_str().expect("utf-8 path");
    let (ok, stdout, stderr) = coordinator(&["init-federation", "--out", out_str, "--merchants", "2"]);
    assert!(ok, "{stderr}");
    assert_eq!(json(&stdout)["merchants"], serde_json::json!(["merchant-001", "merchant-002"]));
    for file in
        ["ca.pem", "server.pem", "server.key", "guild.toml", "guild.db", "merchants/merchant-002.toml"]
    {
        assert!(out.join(file).exists(), "{file} missing");
    }
    // Refuses to overwrite a federation.
    let (ok, _, stderr) = coordinator(&["init-federation", "--out", out_str, "--merchants", "2"]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");

    let config = out.join("guild.toml");
    let config = config.to_str().expect("utf-8");
    // `status` reads the store; the daemon has not run, so no adapter exists yet.
    let (ok, stdout, stderr) = coordinator(&["status", "--config", config]);
    assert!(ok, "{stderr}");
    let status = json(&stdout);
    assert_eq!(status["merchants_allowed"], 2);
    assert_eq!(status["rounds_completed"], 0);
    assert_eq!(status["epsilon_spent"], 0.0);
    assert_eq!(status["current_phase"], "idle");
    let (ok, _, stderr) =
        coordinator(&["export-adapter", "--config", config, "--version", "0", "--out", "x"]);
    assert!(!ok && stderr.contains("there is no adapter version 0; the store holds none"), "{stderr}");
    // A tail average of no versions is refused by name.
    let (ok, _, stderr) = coordinator(&[
        "export-adapter",
        "--config",
        config,
        "--version",
        "0",
        "--out",
        "x",
        "--average-last",
        "0",
    ]);
    assert!(!ok && stderr.contains("--average-last"), "{stderr}");

    // The allow-list is listed; a certificate is allowed only under the name it was issued
    // for and only from the federation's CA.
    let (ok, stdout, stderr) = coordinator(&["allowed", "--config", config]);
    assert!(ok, "{stderr}");
    let listed = json(&stdout)["allowed"].as_array().expect("a list").clone();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["merchant"], "merchant-001");
    assert_eq!(listed[0]["revoked"], false);
    let cert_of = |m: &str| out.join("merchants").join(format!("{m}.pem"));
    let second = cert_of("merchant-002");
    let allow_001 = |cert: &std::path::Path| {
        coordinator(&[
            "allow",
            "--config",
            config,
            "--merchant",
            "merchant-001",
            "--cert",
            cert.to_str().expect("utf-8"),
        ])
    };
    let (ok, _, stderr) = allow_001(&second);
    assert!(!ok && stderr.contains("was issued for \"merchant-002\", not \"merchant-001\""), "{stderr}");
    let foreign = guild_proto::pki::issue(1).expect("another CA");
    let foreign_path = dir.path().join("foreign.pem");
    std::fs::write(&foreign_path, &foreign.merchants[0].cert_pem).expect("write");
    let (ok, _, stderr) = allow_001(&foreign_path);
    // (Both CAs are named "Guild federation CA": the signature is what tells them apart.)
    assert!(!ok && stderr.contains("is refused") && stderr.contains("federation's CA"), "{stderr}");
    let (ok, _, stderr) = coordinator(&[
        "allow",
        "--config",
        config,
        "--merchant",
        "merchant-002",
        "--cert",
        second.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{stderr}");

    let (ok, _, stderr) = coordinator(&["revoke", "--config", config, "--merchant", "merchant-009"]);
    assert!(!ok && stderr.contains("not on the allow-list"), "{stderr}");
    let (ok, stdout, stderr) = coordinator(&["revoke", "--config", config, "--merchant", "merchant-002"]);
    assert!(ok, "{stderr}");
    assert_eq!(json(&stdout)["revoked"], "merchant-002");
    let (_, stdout, _) = coordinator(&["status", "--config", config]);
    assert_eq!(json(&stdout)["merchants_allowed"], 1);

    // A bad setting stops the daemon at start with the key named.
    let (ok, _, stderr) = Command::new(env!("CARGO_BIN_EXE_guild-coordinator"))
        .args(["serve", "--config", config])
        .env("GUILD_ROUNDS__TRAINING__SAMPLING_RATE", "2")
        .output()
        .map(|o| (o.status.success(), (), String::from_utf8_lossy(&o.stderr).into_owned()))
        .expect("run");
    assert!(!ok && stderr.contains("rounds.training.sampling_rate"), "{stderr}");
}

/// `sign-csr` signs a merchant's request into a certificate that binds its signing key, and
/// refuses a request that binds none, a name that is not a merchant id, and an existing
/// output file.
#[test]
fn sign_csr_issues_a_binding_certificate_and_refuses_requests_without_a_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = guild_proto::pki::issue(0).expect("a CA");
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), &pki.ca.cert_pem).expect("write");
    std::fs::write(path("ca.key"), &pki.ca.key_pem).expect("write");
    let key = [0x5a; 32];
    let request = guild_proto::certificate::merchant_request("shop-9", &key).expect("request");
    std::fs::write(path("shop-9.csr"), &request.csr_pem).expect("write");
    let sign = |csr: &str, out: &str| {
        let (ca_cert, ca_key, csr, out) = (path("ca.pem"), path("ca.key"), path(csr), path(out));
        coordinator(&[
            "sign-csr",
            "--ca-cert",
            ca_cert.to_str().expect("utf-8"),
            "--ca-key",
            ca_key.to_str().expect("utf-8"),
            "--csr",
            csr.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
        ])
    };
    let (ok, stdout, stderr) = sign("shop-9.csr", "shop-9.pem");
    assert!(ok, "{stderr}");
    assert_eq!(json(&stdout)["merchant"], "shop-9");
    let der = guild_proto::pki::read_cert_der(&path("shop-9.pem")).expect("certificate");
    assert_eq!(guild_proto::certificate::verify_member(&pki.ca.cert_der, &der), Ok(key));
    let (ok, _, stderr) = sign("shop-9.csr", "shop-9.pem");
    assert!(!ok && stderr.contains("must not exist"), "{stderr}");
    // Signing with a key that is not the CA's (the server's, say) is refused.
    std::fs::write(path("ca.key"), &guild_proto::pki::issue(0).expect("another").server.key_pem)
        .expect("write");
    let (ok, _, stderr) = sign("shop-9.csr", "other.pem");
    assert!(!ok && stderr.contains("not the CA certificate's key"), "{stderr}");
    assert!(!path("other.pem").exists());
    std::fs::write(path("ca.key"), &pki.ca.key_pem).expect("write");

    // A request without the binding (a plain client-certificate request).
    let plain_key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "shop-10");
    let plain = params.serialize_request(&plain_key).expect("csr").pem().expect("pem");
    std::fs::write(path("plain.csr"), plain).expect("write");
    let (ok, _, stderr) = sign("plain.csr", "plain.pem");
    assert!(!ok && stderr.contains("binds no SecAgg+ signing key"), "{stderr}");
    // A name that is not a merchant id.
    let odd = guild_proto::certificate::merchant_request("two words", &key).expect("request");
    std::fs::write(path("odd.csr"), &odd.csr_pem).expect("write");
    let (ok, _, stderr) = sign("odd.csr", "odd.pem");
    assert!(!ok && stderr.contains("is not a merchant id"), "{stderr}");
    assert!(
        !path("plain.pem").exists() && !path("odd.pem").exists(),
        "nothing written for a refused request"
    );
}
