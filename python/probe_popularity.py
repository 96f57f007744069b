"""Popularity-prior probe for the sequence tower: a research tool, not part of Guild.

Scores the tower's zero-shot start (the mean of the last five item vectors, cosine against
every catalogue item, history excluded) plus a popularity prior beta * ln(1 + v / (kappa * mean v))
with v = max(w - 3 sigma, 0) and sigma estimated from w's negative entries, as
`guild_proto::tower::popularity_prior` does, on validation users (each user's last history
item). The histograms are built from each user's training items (the validation history) with
one unit vector per shopper:

- plain popularity (equal weights over a shopper's distinct items), exact and with Gaussian
  noise of z per count (what a popularity release at q = 1 adds, up to the DDGauss encoding);
- popularity weighted towards a shopper's recent items (gamma per step back; gamma = 0.5 is
  what `popularity_contribution` does now);
- popularity conditioned on the k-means cluster of the shopper's last item (one unit vector
  over each shopper's (cluster of the item before, item) transitions), exact and noisy.

Usage:

    python3 python/probe_popularity.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors [--sweep]

Without `--sweep` the prior uses kappa = 0.1 and plain popularity equal weights, the tower's
constants when the README's figures from this mode were measured. `--sweep` instead
grid-searches the prior's beta, kappa and the recency weight gamma, exact
and with release noise z = 1.64 (three draws averaged), on 6,000 users: how the tower's
constants were chosen.

`items` is the catalogue-embedding cache that `guild-sim` writes under `.cache/`. Prints one
line per ranker: its name and validation NDCG@10.
"""
import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def read(path):
    rows = []
    for line in Path(path).read_text().splitlines()[1:]:
        _, history, target = line.split("\t")
        rows.append(([int(x) for x in history.split()], int(target)))
    return rows


def prior(h, beta, kappa=0.1):
    negative = h[h < 0]
    sigma = np.sqrt((negative ** 2).mean()) if len(negative) else 0.0
    v = np.maximum(h - 3 * sigma, 0)
    return beta * np.log1p(v / (kappa * v.mean())) if v.mean() > 0 else np.zeros_like(v)


def histogram(rows, items, weights):
    h = np.zeros(items)
    for history, _ in rows:
        index, value = weights(history)
        np.add.at(h, index, value)
    return h


def unit(history):
    index = np.array(sorted(set(history)))
    return index, np.full(len(index), 1 / np.sqrt(len(index)))


def recent(gamma):
    def weights(history):
        w = {}
        for p, i in enumerate(history):
            w[i] = w.get(i, 0) + gamma ** (len(history) - 1 - p)
        index = np.array(list(w))
        value = np.array([w[i] for i in index])
        return index, value / np.linalg.norm(value)
    return weights


def kmeans(vectors, k, iterations=25, seed=0):
    centres = vectors[np.random.default_rng(seed).choice(len(vectors), k, replace=False)]
    for _ in range(iterations):
        assigned = (vectors @ centres.T).argmax(1)
        for c in range(k):
            members = vectors[assigned == c]
            if len(members):
                centres[c] = members.mean(0) / np.linalg.norm(members.mean(0))
    return (vectors @ centres.T).argmax(1)


def transitions(rows, items, cluster, k):
    m = np.zeros((k, items))
    for history, _ in rows:
        pairs = {(cluster[history[t - 1]], history[t]) for t in range(1, len(history))}
        for c, j in pairs:
            m[c, j] += 1 / np.sqrt(len(pairs))
    return m


def sweep(valid, items, ndcg, noise):
    report = lambda name, value: print(f"{name}: {value:.5f}", flush=True)
    report("start", ndcg(lambda b: 0.0))
    for gamma in (1.0, 0.7, 0.5, 0.3):
        h = histogram(valid, items, unit if gamma == 1.0 else recent(gamma))
        for z in (0.0, 1.64):
            draws = [h + noise.normal(0, z, items) for _ in range(3)] if z else [h]
            for beta in (0.04, 0.05, 0.06):
                for kappa in (0.1, 0.3, 1.0):
                    value = np.mean([ndcg(lambda b, d=d: prior(d, beta, kappa)[None, :]) for d in draws])
                    report(f"gamma={gamma} z={z} beta={beta} kappa={kappa}", value)


def arguments(description, **extra):
    """The probes' command line: the data folder, the embedding cache, users and seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="folder with Games-6k.valid.inter")
    parser.add_argument("--items", required=True, help="guild-sim's catalogue-embedding cache")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    for flag, options in extra.items():
        parser.add_argument(flag, **options)
    return parser.parse_args()


def load(args):
    """The normalised item vectors, the validation rows and a seeded sample of users."""
    vectors = load_file(args.items)["items"]
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    valid = read(Path(args.data) / "Games-6k.valid.inter")
    users = np.random.default_rng(args.seed).choice(len(valid), args.users, replace=False)
    return vectors, valid, users


def zero_shot_ndcg(vectors, valid, users, extra):
    """Validation NDCG@10 of the mean of the last five item vectors plus `extra(batch)`."""
    total = 0.0
    for s in range(0, len(users), 500):
        batch = users[s:s + 500]
        queries = np.stack([vectors[valid[u][0][-5:]].mean(0) for u in batch])
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        scores = queries @ vectors.T + extra(batch)
        for r, u in enumerate(batch):
            scores[r, valid[u][0]] = -1e9
        target = np.array([valid[u][1] for u in batch])
        rank = (scores > scores[np.arange(len(batch)), target][:, None]).sum(1)
        total += np.where(rank < 10, 1 / np.log2(rank + 2), 0).sum()
    return total / len(users)


def main():
    args = arguments(
        __doc__.splitlines()[0],
        **{"--sweep": {"action": "store_true", "help": "grid-search beta, kappa, gamma"}},
    )
    if args.sweep:
        args.users = 6000
    vectors, valid, users = load(args)
    items = len(vectors)

    def ndcg(extra):
        return zero_shot_ndcg(vectors, valid, users, extra)

    def report(name, extra):
        print(f"{name}: {ndcg(extra):.5f}", flush=True)

    if args.sweep:
        sweep(valid, items, ndcg, np.random.default_rng(args.seed + 5))
        return

    noise = np.random.default_rng(args.seed + 1)
    report("start", lambda b: 0.0)
    plain = histogram(valid, items, unit)
    for beta in (0.02, 0.04, 0.06):
        report(f"popularity beta={beta}", lambda b, beta=beta: prior(plain, beta)[None, :])
    for z in (1.0, 2.0, 4.0):
        noisy = prior(plain + noise.normal(0, z, items), 0.04)
        report(f"popularity beta=0.04 noise z={z}", lambda b, noisy=noisy: noisy[None, :])
    weighted = histogram(valid, items, recent(0.8))
    report("recent-weighted popularity (0.8) beta=0.04", lambda b: prior(weighted, 0.04)[None, :])
    last = lambda b: [valid[u][0][-1] for u in b]
    for k in (16, 64):
        cluster = kmeans(vectors, k)
        exact = transitions(valid, items, cluster, k)
        noisy = exact + noise.normal(0, 2.0, exact.shape)
        plain_noisy = plain + noise.normal(0, 2.0, items)
        for b1, b2 in ((0.02, 0.02), (0.03, 0.02), (0.02, 0.04)):
            for name, t, p in (("exact", exact, plain), ("noise z=2", noisy, plain_noisy)):
                conditional = np.stack([prior(t[c], b2) for c in range(k)])
                report(
                    f"k={k} popularity beta={b1} + conditional beta={b2}, {name}",
                    lambda b, conditional=conditional, p=p, b1=b1: prior(p, b1)[None, :]
                    + conditional[cluster[last(b)]],
                )


if __name__ == "__main__":
    main()
