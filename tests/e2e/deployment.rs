//! The README's *Deploying a federation by hand*, run as written with the real binaries:
//! the operator creates a federation for a server name that is not `localhost` and listens on
//! a second loopback address; three merchants make their own keys, have them signed and
//! allowed, write the README's essential config (no `[adapter]`: they learn it from the
//! coordinator), and run `guild-client run` until a round commits; one of them then serves
//! the committed version to its shop. A merchant that connects by an address the server
//! certificate does not name gets the named TLS error within seconds.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guild_sim::federation::coordinator_binary;

const SERVER_NAME: &str = "coordinator.test";
/// Linux routes all of 127.0.0.0/8 to loopback: a second address on the same machine.
const COORDINATOR_ADDRESS: &str = "127.0.0.2";
const MERCHANTS: usize = 3;
const ITEMS: usize = 24;

/// A child process killed when the test ends, whatever happens.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary(name: &str) -> PathBuf {
    coordinator_binary().expect("binaries built by `cargo test --workspace`").with_file_name(name)
}

/// Runs one command to completion; returns stdout, panicking with stderr if it failed.
fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(binary(name)).args(args).output().expect("run a binary");
    assert!(out.status.success(), "{name} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `name args…` in the background, its standard error in `log`.
fn start(name: &str, args: &[&str], log: &Path) -> Running {
    let log = std::fs::File::create(log).expect("log file");
    Running(
        Command::new(binary(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}")),
    )
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).expect("bind").local_addr().expect("address").port()
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

/// A merchant's data in the README's format: the federation's catalogue (the same items in
/// the same order at every merchant) and `users` shoppers of its own.
fn write_data(dir: &Path, merchant: usize, users: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut items = String::from("item_id:token\ttitle:token_seq\n");
    let kinds = ["racing", "puzzle", "football", "space shooter", "farming", "chess"];
    for i in 0..ITEMS {
        items.push_str(&format!("{}\t{} game volume {}\n", 100 + i, kinds[i % kinds.len()], i / kinds.len()));
    }
    std::fs::write(dir.join("shop.item"), items).expect("write");
    let header = "user_id:token\titem_id_list:token_seq\titem_id:token\n";
    let (mut valid, mut test) = (header.to_owned(), header.to_owned());
    for u in 0..users {
        // Shoppers who stay within a kind of game, five to eight items each.
        let start = (u * 7 + merchant * 3) % ITEMS;
        let length = 5 + (u + merchant) % 4;
        let history: Vec<String> = (0..length).map(|k| (100 + (start + k * 6) % ITEMS).to_string()).collect();
        let (train, held) = history.split_at(length - 2);
        valid.push_str(&format!("{}\t{}\t{}\n", merchant * 1000 + u, train.join(" "), held[0]));
        test.push_str(&format!("{}\t{} {}\t{}\n", merchant * 1000 + u, train.join(" "), held[0], held[1]));
    }
    std::fs::write(dir.join("shop.valid.inter"), valid).expect("write");
    std::fs::write(dir.join("shop.test.inter"), test).expect("write");
}

/// The README's essential merchant config, reaching the coordinator by address and checking
/// its certificate for `server_name`.
fn merchant_config(
    dir: &Path,
    file: &str,
    name: &str,
    port: u16,
    server_name: Option<&str>,
    serve_port: u16,
) -> PathBuf {
    let server_name = server_name.map_or(String::new(), |n| format!("server_name = \"{n}\"\n"));
    let config = format!(
        "coordinator = \"https://{COORDINATOR_ADDRESS}:{port}\"\n\
         display_name = \"{name}\"\n\
         identity = \"keys/{name}.signing\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"{name}.pem\"\nkey = \"keys/{name}.key\"\n{server_name}\
         [data]\ndataset = \"data/\"\neval_users = 4\n\
         [model]\ncache = \"cache\"\n\
         [guards]\nmax_epsilon = 10.0\nmin_noise_multiplier = 0.5\nledger = \"{name}.privacy-ledger\"\nmax_rounds = 1\n\
         [serve]\nlisten = \"127.0.0.1:{serve_port}\"\n"
    );
    let path = dir.join(file);
    std::fs::write(&path, config).expect("write");
    path
}

fn status(config: &Path) -> serde_json::Value {
    serde_json::from_str(&run("guild-coordinator", &["status", "--config", &text(config)]))
        .expect("status JSON")
}

/// POSTs `body` to `path` on `address`; the answer's JSON, or `None` while nothing answers.
fn post(address: &str, path: &str, body: &str) -> Option<serde_json::Value> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    serde_json::from_str(answer.split_once("\r\n\r\n")?.1).ok()
}

#[test]
fn a_federation_deployed_by_the_readme_steps_trains_and_serves_across_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let fed = root.join("fed");
    let port = free_port(COORDINATOR_ADDRESS);
    let listen = format!("{COORDINATOR_ADDRESS}:{port}");

    // 1. The operator creates the federation, for the name merchants will check.
    run(
        "guild-coordinator",
        &["init-federation", "--out", &text(&fed), "--listen", &listen, "--server-name", SERVER_NAME],
    );
    let ca = fed.join("ca.pem");

    // 2.-3. Each merchant makes its keys; the operator signs the request and allows it.
    let mut configs = Vec::new();
    for m in 1..=MERCHANTS {
        let name = format!("shop-{m}");
        let home = root.join(&name);
        write_data(&home.join("data"), m, 12);
        run("guild-client", &["keygen", "--name", &name, "--out", &text(&home.join("keys"))]);
        let cert = home.join(format!("{name}.pem"));
        run(
            "guild-coordinator",
            &[
                "sign-csr",
                "--ca-cert",
                &text(&ca),
                "--ca-key",
                &text(&fed.join("ca.key")),
                "--csr",
                &text(&home.join("keys").join(format!("{name}.csr"))),
                "--out",
                &text(&cert),
            ],
        );
        run(
            "guild-coordinator",
            &[
                "allow",
                "--config",
                &text(&fed.join("guild.toml")),
                "--merchant",
                &name,
                "--cert",
                &text(&cert),
            ],
        );
        std::fs::copy(&ca, home.join("ca.pem")).expect("the CA certificate, returned to the merchant");
        let file = format!("{name}.toml");
        configs.push(merchant_config(&home, &file, &name, port, Some(SERVER_NAME), free_port("127.0.0.1")));
    }
    let allowed = run("guild-coordinator", &["allowed", "--config", &text(&fed.join("guild.toml"))]);
    assert!((1..=MERCHANTS).all(|m| allowed.contains(&format!("shop-{m}"))), "{allowed}");

    // 4. The operator states the adapter and the catalogue (the digest a merchant prints),
    // then starts the coordinator.
    let shown: serde_json::Value =
        serde_json::from_str(&run("guild-client", &["catalogue", "--config", &text(&configs[0])]))
            .expect("JSON");
    assert_eq!(shown["items"], ITEMS);
    let digest = shown["catalogue_sha256"].as_str().expect("digest").to_owned();
    let config_path = fed.join("guild.toml");
    let sample = std::fs::read_to_string(&config_path).expect("read guild.toml");
    let configured = sample
        .replace(
            "[adapter]\n",
            &format!("[adapter]\nfamily = \"sequence_tower\"\ncatalogue_sha256 = \"{digest}\"\n"),
        )
        .replace(
            "\n[rounds]\n",
            "\n[adapter.tower]\nhidden = 384\nhistory = 4\nzero_shot_items = 2\nitem_rank = 2\nwidth = 8\n\
             layers = 0\nheads = 2\n\n[rounds]\n",
        )
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{}", free_port("127.0.0.1")));
    assert_ne!(configured, sample, "the sample config has the sections the README names");
    std::fs::write(&config_path, configured).expect("write guild.toml");
    let _coordinator = start(
        "guild-coordinator",
        &["serve", "--config", &text(&config_path)],
        &root.join("coordinator.log"),
    );

    // A merchant that reaches the coordinator by address without naming the certificate's
    // server name is told so, and does not retry.
    let home = root.join("shop-1");
    let unnamed = merchant_config(&home, "unnamed.toml", "shop-1", port, None, free_port("127.0.0.1"));
    // (It waits for the coordinator to listen like any client; the named error comes at the handshake.)
    let started = Instant::now();
    let out = Command::new(binary("guild-client"))
        .args(["register", "--config", &text(&unnamed)])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("does not name \"127.0.0.2\"") && stderr.contains("tls.server_name"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "named within seconds: {:?}", started.elapsed());

    // A merchant whose catalogue holds the same items in another order stops at start, before
    // its model loads or it registers, naming both digests.
    let reordered = home.join("reordered");
    std::fs::create_dir_all(&reordered).expect("mkdir");
    for file in ["shop.valid.inter", "shop.test.inter"] {
        std::fs::copy(home.join("data").join(file), reordered.join(file)).expect("copy");
    }
    let items = std::fs::read_to_string(home.join("data").join("shop.item")).expect("read");
    let (header, rows) = items.split_once('\n').expect("a header");
    let mut rows: Vec<&str> = rows.lines().collect();
    rows.reverse();
    std::fs::write(reordered.join("shop.item"), format!("{header}\n{}\n", rows.join("\n"))).expect("write");
    let config =
        merchant_config(&home, "reordered.toml", "shop-1", port, Some(SERVER_NAME), free_port("127.0.0.1"));
    let text_of = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, text_of.replace("dataset = \"data/\"", "dataset = \"reordered/\""))
        .expect("write");
    let out =
        Command::new(binary("guild-client")).args(["run", "--config", &text(&config)]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not the federation's") && stderr.contains(&digest), "{stderr}");
    assert!(!stderr.contains("registered as"), "it stopped before registering: {stderr}");

    // 5. Each merchant runs its client until it has taken part in a committed round.
    let mut clients: Vec<Running> = configs
        .iter()
        .enumerate()
        .map(|(i, config)| {
            start(
                "guild-client",
                &["run", "--config", &text(config)],
                &root.join(format!("shop-{}.log", i + 1)),
            )
        })
        .collect();
    let logs = || {
        (1..=MERCHANTS)
            .map(|m| std::fs::read_to_string(root.join(format!("shop-{m}.log"))).unwrap_or_default())
            .chain(std::iter::once(std::fs::read_to_string(root.join("coordinator.log")).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let started = Instant::now();
    while status(&config_path)["rounds_completed"].as_u64().unwrap_or(0) < 1 {
        assert!(started.elapsed() < Duration::from_secs(240), "no round committed: {}", logs());
        for client in &mut clients {
            if let Ok(Some(exit)) = client.0.try_wait() {
                assert!(exit.success(), "a client stopped ({exit}) before a round committed: {}", logs());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let latest = status(&config_path)["latest_adapter_version"].as_u64().expect("version");
    assert!(latest >= 1, "a version was committed");
    // Each merchant stops after its one round (`guards.max_rounds = 1`), once it has scored
    // the committed version on its own validation shoppers and said so.
    let started = Instant::now();
    for client in &mut clients {
        let exit = loop {
            if let Ok(Some(exit)) = client.0.try_wait() {
                break exit;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "a client did not stop: {}", logs());
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(exit.success(), "a client failed ({exit}): {}", logs());
    }
    let client_logs = logs();
    assert!(
        client_logs.contains("training SequenceTower"),
        "the merchants learned the adapter: {client_logs}"
    );
    assert_eq!(
        client_logs.matches("validation NDCG@10").count(),
        MERCHANTS,
        "each merchant reports its own score of the version: {client_logs}"
    );
    drop(clients);
    // Each merchant kept the committed version as an export `serve` can read offline.
    let kept = guild_client::serve::newest_kept(&root.join("shop-2").join("adapters"));
    let manifest = guild_proto::adapter::read_tower_manifest(&kept).expect("a kept export").expect("stated");
    assert_eq!(manifest.catalogue_sha256.map(hex::encode).as_deref(), Some(digest.as_str()));
    assert!(kept.ends_with(format!("v{latest}")), "{}", kept.display());

    // The merchant serves the committed version to its shop.
    let serve_config = configs[0].clone();
    let serve_address = {
        let config = guild_client::config::ClientConfig::load(&serve_config).expect("config");
        config.serve.listen.to_string()
    };
    let _serving =
        start("guild-client", &["serve", "--config", &text(&serve_config)], &root.join("serve.log"));
    let started = Instant::now();
    let answer = loop {
        if let Some(answer) =
            post(&serve_address, "/v1/recommend", r#"{"history": [100, 106], "k": 5, "exclude_seen": true}"#)
        {
            break answer;
        }
        let served = std::fs::read_to_string(root.join("serve.log")).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(120), "serve did not answer: {served}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(answer["adapter_version"].as_u64().expect("version") >= latest, "{answer}");
    let items = answer["items"].as_array().expect("items");
    assert_eq!(items.len(), 5, "{answer}");
    assert!(
        items.iter().all(|h| h["item_id"] != 100 && h["item_id"] != 106),
        "the history is not recommended"
    );
}
