//! SecAgg+ at n = 100, d = 2^20, b = 32, k = 20, t = 11, with 0% and 10% dropouts: client
//! and server time per phase, mask generation against the raw AES-256-CTR keystream rate of
//! this machine measured in the same run, and the process's peak memory.
//!
//! `cargo bench -p guild-privacy --bench secagg`
//!
//! Masked inputs are handed to the server one at a time and dropped, as the coordinator
//! does, so the peak memory shows the server's working set (its running sum) rather than
//! n copies of the input.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ctr::cipher::{KeyIvInit, StreamCipher};
use guild_privacy::secagg::Phase;
use guild_privacy::secagg::client;
use guild_privacy::secagg::crypto::{self, MaskSign};
use guild_privacy::secagg::message::ClientIndex;
use guild_privacy::secagg::server::Server;
use guild_privacy::secagg::testkit::{TestCohort, index};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const N: u32 = 100;
const D: usize = 1 << 20;
const K: u32 = 20;
const T: u32 = 11;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Raw keystream rate of the mask generator's cipher (AES-256 in counter mode), in GB/s.
fn keystream_rate() -> f64 {
    let mut buffer = vec![0u8; 4 << 20];
    let mut cipher = crypto::MaskCipher::new(&[1u8; 32].into(), &[0u8; 16].into());
    cipher.apply_keystream(&mut buffer); // warm up
    let start = Instant::now();
    for _ in 0..32 {
        cipher.apply_keystream(&mut buffer);
    }
    (32 * buffer.len()) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// The rate at which masks are added to a vector, in GB of keystream per second.
fn mask_rate() -> f64 {
    let mut words = vec![0u32; D];
    crypto::apply_mask(&mut words, &[2u8; 32], MaskSign::Add, 32);
    let start = Instant::now();
    for _ in 0..16 {
        crypto::apply_mask(&mut words, &[2u8; 32], MaskSign::Add, 32);
    }
    (16 * D * 4) as f64 / start.elapsed().as_secs_f64() / 1e9
}

#[derive(Default)]
struct Timings {
    client: [Duration; 5],
    /// Clients that took part in each phase.
    participants: [u32; 5],
    server: [Duration; 5],
    /// Masks the server removed at the end: survivors' self masks, and pairwise masks
    /// between survivors and clients that dropped after sharing their keys.
    masks_removed: usize,
}

fn run(dropout_fraction: f64, seed: u64) -> Timings {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let TestCohort { config, signing, identities } = TestCohort::new(1, N, T, K, D, 32, &mut rng);
    // Dropouts are spread evenly over the phases, a client each time.
    let dropped = (f64::from(N) * dropout_fraction).round() as u32;
    let drops_before: BTreeMap<ClientIndex, usize> =
        (0..dropped).map(|i| (index(1 + i * 7 % N), (i % 5) as usize)).collect();
    let talks = |c: &ClientIndex, phase: usize| drops_before.get(c).is_none_or(|&p| p > phase);

    let mut t = Timings::default();
    let mut server = Server::new(config.clone(), identities.clone()).expect("config");
    let mut states = BTreeMap::new();
    for c in (1..=N).map(index).filter(|c| talks(c, 0)) {
        let start = Instant::now();
        let (s, m) = client::start(config.clone(), c, &signing[&c], &mut rng).expect("start");
        t.client[0] += start.elapsed();
        t.participants[0] += 1;
        let start = Instant::now();
        server.receive_keys(c, m).expect("keys");
        t.server[0] += start.elapsed();
        states.insert(c, s);
    }
    let start = Instant::now();
    let roster = server.close_keys().expect("roster");
    t.server[0] += start.elapsed();

    let mut next = BTreeMap::new();
    for (c, s) in states.into_iter().filter(|(c, _)| talks(c, 1)) {
        let start = Instant::now();
        let (s, m) = s.on_roster(roster.clone(), &identities, &signing[&c], &mut rng).expect("roster");
        t.client[1] += start.elapsed();
        t.participants[1] += 1;
        let start = Instant::now();
        server.receive_shares(c, m).expect("shares");
        t.server[1] += start.elapsed();
        next.insert(c, s);
    }
    let start = Instant::now();
    let mut inboxes = server.close_shares().expect("inboxes");
    t.server[1] += start.elapsed();

    let mut after = BTreeMap::new();
    let mut input = vec![0u32; D];
    for (c, s) in next.into_iter().filter(|(c, _)| talks(c, 2)) {
        fill_input(&mut input, c.get());
        let start = Instant::now();
        let (s, m) = s.on_inbox(inboxes.remove(&c).unwrap_or_default(), &input).expect("mask");
        t.client[2] += start.elapsed();
        t.participants[2] += 1;
        let start = Instant::now();
        server.receive_masked_input(c, m).expect("input");
        t.server[2] += start.elapsed();
        after.insert(c, s);
    }
    let start = Instant::now();
    let survivors = server.close_inputs().expect("survivors");
    t.server[2] += start.elapsed();

    let mut last = BTreeMap::new();
    for (c, s) in after.into_iter().filter(|(c, _)| talks(c, 3)) {
        let start = Instant::now();
        let (s, m) = s.on_survivors(survivors.clone(), &signing[&c]).expect("sign");
        t.client[3] += start.elapsed();
        t.participants[3] += 1;
        let start = Instant::now();
        server.receive_consistency(c, m).expect("signature");
        t.server[3] += start.elapsed();
        last.insert(c, s);
    }
    let start = Instant::now();
    let signatures = server.close_consistency().expect("signatures");
    t.server[3] += start.elapsed();

    for (c, s) in last.into_iter().filter(|(c, _)| talks(c, 4)) {
        let start = Instant::now();
        let m = s.on_signatures(signatures.clone(), &identities).expect("unmask");
        t.client[4] += start.elapsed();
        t.participants[4] += 1;
        let start = Instant::now();
        server.receive_unmask(c, m).expect("unmask");
        t.server[4] += start.elapsed();
    }
    let graph = server.neighbour_graph().expect("drawn when phase 0 closed").clone();
    let survived = |c: &ClientIndex| talks(c, 2);
    t.masks_removed = (1..=N).map(index).filter(survived).count()
        + (1..=N)
            .map(index)
            .filter(|c| talks(c, 1) && !survived(c))
            .map(|u| graph.neighbours(u).iter().filter(|v| survived(v)).count())
            .sum::<usize>();
    let start = Instant::now();
    let sum = server.finish().expect("finish");
    t.server[4] += start.elapsed();
    assert_eq!(sum.len(), D);
    t
}

/// An arbitrary input for client `c` (the content does not affect the timings).
fn fill_input(words: &mut [u32], c: u32) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = (i as u32 ^ c).wrapping_mul(2_654_435_761);
    }
}

fn main() {
    let keystream = keystream_rate();
    let masking = mask_rate();
    println!("AES-256-CTR keystream (this machine, this run): {keystream:.2} GB/s");
    println!(
        "mask generation (keystream added into a u32 vector): {masking:.2} GB/s = {:.2}x of the bound",
        keystream / masking
    );
    for (fraction, seed) in [(0.0, 1), (0.1, 2)] {
        let t = run(fraction, seed);
        println!("\nn = {N}, d = 2^20, b = 32, k = {K}, t = {T}, dropouts {:.0}%", fraction * 100.0);
        println!("| phase | client (mean per client) | server (whole phase) |");
        println!("|---|---|---|");
        for phase in Phase::ALL {
            let i = phase.index();
            println!(
                "| {phase} | {:.2} ms | {:.1} ms |",
                t.client[i].as_secs_f64() * 1e3 / f64::from(t.participants[i]),
                t.server[i].as_secs_f64() * 1e3
            );
        }
        // Keystream per client: its self mask and one pairwise mask per neighbour.
        let client_bytes = (K as usize + 1) * D * 4;
        let client_rate =
            client_bytes as f64 / (t.client[2].as_secs_f64() / f64::from(t.participants[2])) / 1e9;
        println!(
            "client masking: {client_rate:.2} GB/s of keystream ({:.2}x of the keystream bound)",
            keystream / client_rate
        );
        let server_rate = (t.masks_removed * D * 4) as f64 / t.server[4].as_secs_f64() / 1e9;
        println!(
            "server unmasking: {} masks removed, {server_rate:.2} GB/s of keystream ({:.2}x of the keystream bound)",
            t.masks_removed,
            keystream / server_rate
        );
    }
    println!(
        "\npeak resident memory of the whole benchmark: {:.0} MiB (one input is {} MiB)",
        peak_rss_mib(),
        (D * 4) >> 20
    );
}
