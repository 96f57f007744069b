"""Merchant-level popularity release probe: a research tool, not part of Guild.

What a popularity release at the merchant level would give the tower's zero-shot start
(mean of the last five title vectors) under distributed DP. Each merchant is a random group
of `size` shoppers (as the default scenario's shops); its contribution is the histogram half
of its shoppers' statistics (one unit vector per shopper, half its norm on the histogram),
either their mean (what `merchant_statistics` sends) or normalised to the clip norm c = 1
(the most a merchant may send). The federation's sum gets Gaussian noise of z per count and
is scored as the tower's popularity prior (beta = 0.05, kappa = 1, entries below
sqrt(2 ln d) noise deviations dropped). Prints validation NDCG@10 for the start, the exact
histogram, and each (size, z, contribution) averaged over two noise draws.

    python3 python/probe_merchant_release.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors
"""
import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from probe_popularity import read, unit


def prior(h, beta=0.05, kappa=1.0):
    threshold = np.sqrt(2 * np.log(len(h)))
    negative = h[h < 0]
    sigma = np.sqrt((negative ** 2).mean()) if len(negative) else 0.0
    v = np.maximum(h - threshold * sigma, 0)
    return beta * np.log1p(v / (kappa * v.mean())) if v.mean() > 0 else np.zeros_like(v)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with Games-6k.valid.inter")
    parser.add_argument("--items", required=True, help="guild-sim's catalogue-embedding cache")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vectors = load_file(args.items)["items"]
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    items = len(vectors)
    valid = read(Path(args.data) / "Games-6k.valid.inter")
    rng = np.random.default_rng(args.seed)
    users = rng.choice(len(valid), args.users, replace=False)

    def ndcg(extra):
        total = 0.0
        for s in range(0, len(users), 500):
            batch = users[s:s + 500]
            q = np.stack([vectors[valid[u][0][-5:]].mean(0) for u in batch])
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            scores = q @ vectors.T + extra
            for r, u in enumerate(batch):
                scores[r, valid[u][0]] = -1e9
            target = np.array([valid[u][1] for u in batch])
            rank = (scores > scores[np.arange(len(batch)), target][:, None]).sum(1)
            total += np.where(rank < 10, 1 / np.log2(rank + 2), 0).sum()
        return total / len(users)

    order = rng.permutation(len(valid))

    def merchants(size):
        out = []
        for s in range(0, len(order), size):
            h = np.zeros(items)
            for u in order[s:s + size]:
                i, v = unit(valid[u][0])
                np.add.at(h, i, v / np.sqrt(2))
            out.append((h, len(order[s:s + size])))
        return out

    print(f"start: {ndcg(0.0):.5f}", flush=True)
    exact = sum(h for h, _ in merchants(len(order)))
    print(f"exact histogram: {ndcg(prior(exact)[None, :]):.5f}", flush=True)
    noise = np.random.default_rng(args.seed + 7)
    for size in (100, 2000):
        groups = merchants(size)
        mean = sum(h / n for h, n in groups)
        normalised = sum(h / np.linalg.norm(h) / np.sqrt(2) for h, _ in groups)
        for z in (0.8, 1.0, 1.5):
            for name, h in (("mean", mean), ("normalised", normalised)):
                value = np.mean([ndcg(prior(h + noise.normal(0, z, items))[None, :]) for _ in range(2)])
                print(f"{len(groups)} merchants of {size}, z = {z}, {name}: {value:.5f}", flush=True)


if __name__ == "__main__":
    main()
