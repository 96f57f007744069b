//! The `guild-client` binary's errors: each names what is wrong (the file, the line, the
//! address) and the binary exits non-zero, before any model is loaded or anything is sent.

use std::path::Path;
use std::process::Command;

/// Runs the binary; returns (success, stderr).
fn client(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_guild-client")).args(args).output().expect("run the binary");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs the client with `args`, expecting it to fail with every one of `named` in its
/// error output.
fn fails_naming(args: &[&str], named: &[&str]) {
    let (ok, stderr) = client(args);
    assert!(!ok, "{args:?} must fail");
    assert!(named.iter().all(|n| stderr.contains(n)), "{stderr:?} must name each of {named:?}");
}

/// Writes a RecBole interaction file: the typed header, then `rows`.
fn write_inter(path: &Path, rows: &str) {
    std::fs::write(path, format!("user_id:token\titem_id_list:token_seq\titem_id:token\n{rows}"))
        .expect("write");
}

/// The one user of the tiny dataset: history 0 1, test target 2.
const TEST_ROW: &str = "0\t0 1\t2\n";

/// A merchant folder with a real federation's credentials, a tiny valid dataset and a
/// config pointing at `coordinator`.
fn merchant(dir: &Path, coordinator: &str) -> std::path::PathBuf {
    let pki = guild_proto::pki::issue(1).expect("issue certificates");
    std::fs::write(dir.join("ca.pem"), &pki.ca.cert_pem).expect("write");
    std::fs::write(dir.join("m.pem"), &pki.merchants[0].cert_pem).expect("write");
    std::fs::write(dir.join("m.key"), &pki.merchants[0].key_pem).expect("write");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(
        data.join("tiny.item"),
        "item_id:token\ttitle:token_seq\n0\tA game\n1\tAnother game\n2\tA third\n",
    )
    .expect("write");
    write_inter(&data.join("tiny.test.inter"), TEST_ROW);
    write_inter(&data.join("tiny.valid.inter"), "0\t0\t1\n");
    let config = dir.join("merchant.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"{coordinator}\"\ndisplay_name = \"Shop\"\nidentity = \"m.signing\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"m.pem\"\nkey = \"m.key\"\n[data]\ndataset = \"data\"\n"
        ),
    )
    .expect("write");
    config
}

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.toml");
    fails_naming(&["run", "--config", path.to_str().expect("utf-8")], &["nope.toml"]);
}

#[test]
fn wrong_credential_files_are_named_before_anything_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = merchant(dir.path(), "https://127.0.0.1:1");
    let config = config.to_str().expect("utf-8");

    std::fs::write(dir.path().join("m.pem"), "not a certificate").expect("write");
    fails_naming(&["run", "--config", config], &["m.pem", "merchant certificate"]);

    // The certificate where the key should be.
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("read");
    std::fs::write(dir.path().join("m.pem"), &ca).expect("write");
    std::fs::write(dir.path().join("m.key"), &ca).expect("write");
    fails_naming(&["run", "--config", config], &["m.key", "CERTIFICATE"]);

    std::fs::remove_file(dir.path().join("ca.pem")).expect("remove");
    fails_naming(&["register", "--config", config], &["ca.pem"]);
}

#[test]
fn a_missing_or_corrupt_data_file_is_named_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = merchant(dir.path(), "https://127.0.0.1:1");
    let config = config.to_str().expect("utf-8");
    let data = dir.path().join("data");

    write_inter(&data.join("tiny.test.inter"), "0\t0 1\n");
    fails_naming(&["run", "--config", config], &["tiny.test.inter:2", "expected 3"]);

    write_inter(&data.join("tiny.test.inter"), "0\t0 7\t2\n");
    fails_naming(&["run", "--config", config], &["tiny.test.inter:2", "unknown item id 7"]);

    write_inter(&data.join("tiny.test.inter"), TEST_ROW);
    std::fs::remove_file(data.join("tiny.valid.inter")).expect("remove");
    fails_naming(&["run", "--config", config], &["tiny.valid.inter"]);

    std::fs::remove_dir_all(&data).expect("remove");
    fails_naming(&["run", "--config", config], &["data"]);
}

#[test]
fn a_coordinator_that_is_down_is_named_with_its_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let address = format!("https://localhost:{}", closed_port());
    let config = merchant(dir.path(), &address);
    fails_naming(
        &["register", "--config", config.to_str().expect("utf-8")],
        &["cannot reach the coordinator", &address],
    );
}

/// `keygen` makes the merchant's keys and a request that the federation's CA signs into a
/// certificate binding the signing key; it never overwrites a merchant's keys, and keeps the
/// private ones readable by the owner only.
#[test]
fn keygen_makes_keys_and_a_request_the_ca_signs_into_a_binding_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8 path");
    let (ok, stderr) = client(&["keygen", "--name", "shop-7", "--out", out]);
    assert!(ok, "{stderr}");
    let read = |name: &str| std::fs::read(dir.path().join(name)).expect("read");
    let identity = guild_client::identity::Identity::load_or_create(&dir.path().join("shop-7.signing"))
        .expect("the signing key");
    let pki = guild_proto::pki::issue(0).expect("a CA");
    let issuer = guild_proto::pki::issuer_from_pem(&pki.ca.cert_pem, &pki.ca.key_pem).expect("issuer");
    let csr = String::from_utf8(read("shop-7.csr")).expect("PEM");
    let issued = guild_proto::pki::sign_merchant_request(&csr, &issuer).expect("signed");
    assert_eq!(issued.name, "shop-7");
    assert_eq!(
        guild_proto::certificate::verify_member(&pki.ca.cert_der, &issued.cert_der),
        Ok(identity.public_key()),
        "the certificate binds the key in shop-7.signing and verifies under the CA"
    );
    assert!(String::from_utf8(read("shop-7.key")).expect("PEM").contains("PRIVATE KEY"));
    #[cfg(unix)]
    for private in ["shop-7.key", "shop-7.signing"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(private)).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{private} is readable by others: {mode:o}");
    }
    let before = read("shop-7.key");
    let (ok, stderr) = client(&["keygen", "--name", "shop-7", "--out", out]);
    assert!(!ok && stderr.contains("refusing to overwrite"), "{stderr}");
    assert_eq!(read("shop-7.key"), before, "nothing was overwritten");
    let (ok, stderr) = client(&["keygen", "--name", "not a name", "--out", out]);
    assert!(!ok && stderr.contains("must be 1 to 128 ASCII letters"), "{stderr}");
}

#[test]
fn catalogue_prints_the_digest_the_coordinator_states() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = merchant(dir.path(), "https://127.0.0.1:1");
    let out = Command::new(env!("CARGO_BIN_EXE_guild-client"))
        .args(["catalogue", "--config", &config.display().to_string()])
        .output()
        .expect("run the binary");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(shown["items"], 3);
    let expected = hex::encode(guild_proto::domain::catalogue_sha256(&[0, 1, 2]));
    assert_eq!(shown["catalogue_sha256"], expected.as_str());
}

/// A `guild-client` copied to a fresh folder with libtorch's `lib` folder beside it (in
/// `libtorch/lib`) loads that libtorch, not the build tree's: the dynamic loader's trace
/// (glibc's `LD_DEBUG=libs`) shows it found there first.
#[cfg(target_os = "linux")]
#[test]
fn a_client_copied_with_its_libtorch_loads_the_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let install = dir.path().join("guild");
    std::fs::create_dir_all(install.join("libtorch")).expect("mkdir");
    let binary = install.join("guild-client");
    std::fs::copy(env!("CARGO_BIN_EXE_guild-client"), &binary).expect("copy the binary");
    // A link stands for the copied folder (libtorch is several GB).
    std::os::unix::fs::symlink(env!("GUILD_BUILD_LIBTORCH_LIB"), install.join("libtorch").join("lib"))
        .expect("link libtorch");
    let config = merchant(dir.path(), "https://127.0.0.1:1");
    let out = Command::new(&binary)
        .args(["catalogue", "--config", &config.display().to_string()])
        .env("LD_DEBUG", "libs")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run the copy");
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{trace}");
    let copied = install.join("libtorch").join("lib").join("libtorch_cpu.so");
    let first_try = trace.lines().find(|l| l.contains("trying file=") && l.contains("libtorch_cpu.so"));
    assert!(
        first_try.is_some_and(|l| l.contains(&copied.display().to_string())),
        "libtorch_cpu.so was first looked for at {first_try:?}, not {}",
        copied.display()
    );
}
