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
import numpy as np

from probe_popularity import arguments, load, unit, zero_shot_ndcg


def prior(h, beta=0.05, kappa=1.0):
    threshold = np.sqrt(2 * np.log(len(h)))
    negative = h[h < 0]
    sigma = np.sqrt((negative ** 2).mean()) if len(negative) else 0.0
    v = np.maximum(h - threshold * sigma, 0)
    return beta * np.log1p(v / (kappa * v.mean())) if v.mean() > 0 else np.zeros_like(v)


def main():
    args = arguments(__doc__.splitlines()[0])
    vectors, valid, users = load(args)
    items = len(vectors)
    rng = np.random.default_rng(args.seed)
    rng.choice(len(valid), args.users, replace=False)  # the draw `load` made: the same shops

    def ndcg(extra):
        return zero_shot_ndcg(vectors, valid, users, lambda batch: extra)

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
