//! Benchmarks of the differential-privacy hot paths: the exact discrete Gaussian
//! samplers (ours against OpenDP's, in the same run) and DDGauss encoding and decoding
//! of a 2^20-coordinate update.
//!
//! `cargo bench -p guild-privacy --bench dp`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use guild_privacy::dp::{
    Cks20Sampler, DdgParams, DiscreteGaussianSampler, OpenDpSampler, RandomRotation, Rational,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

fn samplers(c: &mut Criterion) {
    let mut group = c.benchmark_group("discrete_gaussian");
    for sigma in [2u64, 50, 1 << 20] {
        let n = 1000;
        group.throughput(Throughput::Elements(n as u64));
        let mut out = vec![0i64; n];
        let variance = Rational::new(sigma * sigma, 1).expect("valid");
        let mut ours = Cks20Sampler::new(variance, ChaCha20Rng::seed_from_u64(1));
        group.bench_function(BenchmarkId::new("cks20_u128", sigma), |b| {
            b.iter(|| ours.fill(&mut out).expect("ok"))
        });
        let mut reference = OpenDpSampler::new(sigma, 1);
        group.bench_function(BenchmarkId::new("opendp", sigma), |b| {
            b.iter(|| reference.fill(&mut out).expect("ok"))
        });
    }
    group.finish();
}

fn ddgauss(c: &mut Criterion) {
    let d = 1 << 20;
    let mut group = c.benchmark_group("ddgauss_d2^20");
    group.sample_size(10);
    group.throughput(Throughput::Elements(d as u64));
    // A 32-bit ring, σ = c = 1 over 100 survivors: σ̂ is capped at 2^20 as selection does.
    let params = DdgParams::from_round(d, 1.0, 1e-7, 32, 1.0, 100).expect("valid");
    let rotation = RandomRotation::new(d, 7);
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let update: Vec<f32> = (0..d).map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 1e-3).collect();
    group.bench_function("encode", |b| {
        b.iter(|| {
            let mut x = update.clone();
            params.encode(&mut x, &rotation, &mut rng).expect("encode")
        })
    });
    let encoded = params.encode(&mut update.clone(), &rotation, &mut rng).expect("encode").values;
    group.bench_function("decode", |b| b.iter(|| params.decode(&encoded, &rotation).expect("decode")));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = samplers, ddgauss
}
criterion_main!(benches);
