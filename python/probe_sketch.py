"""Pair-sketch probe for the sequence tower's item-to-item prior: a research tool, not part of Guild.

Scores what `guild_proto::tower::sketch_neighbours` decodes: every shopper's item pairs
(transitions 1, co-occurrence within 3 positions 0.3 both ways, as the tower counts them) as a
unit vector hashed into `rows` rows of 2^w buckets (the same SplitMix64 bucket hash as
`guild_proto::tower::sketch_bucket`), summed over shoppers (plus N(0, z^2) per bucket, if
asked), each item's top M other items by their estimate (the least of the rows: count-min;
or, with `--signed`, a count sketch's signed median), those estimates as the counts of
`probe_transitions.py`'s prior (beta_t = 0.2 over the last three items, thresholded at
sqrt(2 ln d) deviations estimated from the negative estimates), on top of the zero-shot
start and the popularity prior. Validation users (each user's last history item), 4,000 of
them, the same sample as `probe_transitions.py`.

Usage:

    python3 python/probe_sketch.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors [--widths 19,20] [--rows 3] \\
        [--ms 32,64] [--z 0] [--signed] [--exact] [--betas 0.2] [--sketch-fraction 1] \\
        [--split validation]

Measured (validation NDCG@10, M = 64 unless said; about 75 s a decode on one core):
title neighbours with exact counts (`probe_transitions.py`) 0.0552; zero-shot + popularity
alone 0.0367. Count-min, 3 rows: 2^19 0.0610, 2^20 0.0668. Signed count sketch, 3 rows:
2^18 0.0562 (M = 32: 0.0561), 2^19 0.0585 (0.0597), 2^20 0.0633 (0.0621); one row of 2^21:
0.0556. With noise of a shopper-level release at about epsilon = 3 (z = 2.4 on each shopper's
unit vector): 0.0375 (3 x 2^20, signed) and 0.0373 (1 x 2^21), no better than popularity
alone: a sketch of millions of buckets carries noise that drowns the pairs of all but the
most popular items.

Two stages (`--exact`: the sketch decides each item's neighbours, then exact counts over those
pairs are summed, as a second release over the decoded table would; measured in the simulator
and not kept, see the roadmap), 4,000
users, beta_t = 0.2: validation, the sketch of every shopper, 3 x 2^17 / 2^18 / 2^19 / 2^20:
0.0590 / 0.0616 / 0.0629 / 0.0675 (beta_t 0.1 / 0.3 / 0.5 / 0.8 at 2^20: 0.0679 / 0.0668 /
0.0670 / 0.0654); a sketch of a quarter of the shoppers (`--sketch-fraction 0.25`), the counts
of all: 0.0641 against its estimates' 0.0570. Test split (`--split test`), 3 x 2^20: every
shopper 0.0595 against the estimates' 0.0586; a quarter 0.0541 against 0.0467. (A figure of
0.0722 recorded here before for the two stages was not reproduced.)
"""
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_transitions import data_arguments, load, pairs, prior, recency, unit_items  # noqa: E402

U = np.uint64


def bucket(row, f, t, buckets):
    """guild_proto::tower::sketch_bucket, vectorised; with the sign bit a count sketch uses."""
    with np.errstate(over="ignore"):
        z = (U(row) << U(56)) ^ (f.astype(U) << U(28)) ^ t.astype(U)
        z = z + U(0x9E3779B97F4A7C15)
        z = (z ^ (z >> U(30))) * U(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> U(27))) * U(0x94D049BB133111EB)
        z = z ^ (z >> U(31))
    index = ((z >> U(1)) & U(buckets - 1)).astype(np.int64) + row * buckets
    return index, np.where((z & U(1)) == 0, 1.0, -1.0)


def thresholded_log(w, d):
    negative = w[w < 0]
    sigma = np.sqrt((negative ** 2).mean()) if len(negative) else 0.0
    kept = np.maximum(w - max(3.0, np.sqrt(2 * np.log(d))) * sigma, 0)
    return prior(kept)


def main():
    p = data_arguments()
    p.add_argument("--widths", default="19,20", help="log2 of the buckets per row, comma-separated")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--ms", default="64", help="neighbours per item, comma-separated")
    p.add_argument("--z", default="0", help="noise deviations per bucket, comma-separated")
    p.add_argument("--signed", action="store_true", help="a count sketch (signed, median) instead of count-min")
    p.add_argument("--split", choices=["validation", "test"], default="validation",
                   help="score each user's validation item (the last of its history) or its test item")
    p.add_argument("--betas", default="0.2", help="beta_t values to score the exact counts at, comma-separated")
    p.add_argument("--sketch-fraction", type=float, default=1.0,
                   help="the share of shoppers (a seeded sample) whose pairs the sketch sums")
    p.add_argument("--exact", action="store_true",
                   help="also score exact counts over the decoded pairs (a second release, over the decoded table)")
    a = p.parse_args()
    n, users = load(a.data)
    tests = []
    if a.split == "test":
        items = {}
        with open(f"{a.data}/Games-6k.item") as f:
            for i, line in enumerate(f.read().splitlines()[1:]):
                items[line.split("\t")[0]] = i
        with open(f"{a.data}/Games-6k.test.inter") as f:
            tests = [items[line.split("\t")[2]] for line in f.read().splitlines()[1:]]
    e = unit_items(a.items)
    popularity, per_user = np.zeros(n), []
    for h in users:
        training = h[:-1]
        for item, x in recency(training).items():
            popularity[item] += x
        c = pairs(training)
        if c:
            keys = np.array(list(c.keys()))
            per_user.append((keys[:, 0], keys[:, 1], np.array(list(c.values()))))
    prior = thresholded_log(popularity, n)
    evaluated = np.random.default_rng(0).choice(len(users), 4000, replace=False)
    queries = {}
    def scored(u):
        """The history the ranker reads and the target, of the chosen split."""
        if a.split == "test":
            return users[u], tests[u]
        return users[u][:-1], users[u][-1]

    for u in evaluated:
        q = e[scored(u)[0][-5:]].mean(0)
        queries[u] = q / np.linalg.norm(q)

    def ndcg(neighbours, log, beta_t=0.2):
        total = 0.0
        for u in evaluated:
            history, target = scored(u)
            scores = e @ queries[u] + 0.05 * prior
            for item, r in zip(reversed(history), [1, 0.5, 0.25]):
                np.add.at(scores, neighbours[item], beta_t * r * log[item])
            scores[history] = -1e9
            rank = (scores > scores[target]).sum()
            if rank < 10:
                total += 1 / np.log2(rank + 2)
        return total / len(evaluated)

    ms = [int(x) for x in a.ms.split(",")]
    top = max(ms)
    for w in [int(x) for x in a.widths.split(",")]:
        buckets = 1 << w
        for z in [float(x) for x in a.z.split(",")]:
            sketch = np.zeros(a.rows * buckets)
            sampled = np.random.default_rng(7).random(len(per_user)) < a.sketch_fraction
            for (f, t, v), keep in zip(per_user, sampled):
                if not keep:
                    continue
                hashed = [bucket(r, f, t, buckets) for r in range(a.rows)]
                index = np.concatenate([i for i, _ in hashed])
                value = np.concatenate([(s if a.signed else 1.0) * v for _, s in hashed])
                unique, inverse = np.unique(index, return_inverse=True)
                summed = np.bincount(inverse, value)
                sketch[unique] += summed / np.linalg.norm(summed)
            if z > 0:
                sketch += np.random.default_rng(3).normal(0, z, sketch.shape)
            noised = a.signed or (sketch < 0).any()
            started = time.time()
            neighbours, estimates = np.zeros((n, top), dtype=np.int64), np.zeros((n, top))
            everything = np.arange(n)
            for start in range(0, n, 256):
                rows = np.arange(start, min(n, start + 256))
                f, t = np.repeat(rows, n), np.tile(everything, len(rows))
                per_row = []
                for r in range(a.rows):
                    index, sign = bucket(r, f, t, buckets)
                    per_row.append((sign if a.signed else 1.0) * sketch[index])
                per_row = np.stack(per_row)
                estimate = (np.median(per_row, axis=0) if noised else per_row.min(axis=0)).reshape(len(rows), n)
                estimate[np.arange(len(rows)), rows] = -np.inf
                best = np.argpartition(-estimate, top, axis=1)[:, :top]
                order = np.lexsort((best, -np.take_along_axis(estimate, best, axis=1)), axis=1)
                neighbours[rows] = np.take_along_axis(best, order, axis=1)
                estimates[rows] = np.take_along_axis(estimate, neighbours[rows], axis=1)
            for m in ms:
                log = thresholded_log(estimates[:, :m].copy(), n * m)
                score = ndcg(neighbours[:, :m], log)
                kind = "signed" if a.signed else "count-min"
                print(f"{kind} {a.rows}x2^{w} z={z} M={m} sketch of {a.sketch_fraction:.0%} decode {time.time() - started:.0f}s NDCG@10={score:.4f}",
                      flush=True)
                if a.exact:
                    table = neighbours[:, :m]
                    exact = np.zeros((n, m))
                    for f, t, v in per_user:
                        slots = {}
                        for ff, tt, vv in zip(f, t, v):
                            hit = np.nonzero(table[ff] == tt)[0]
                            if len(hit):
                                slots[(ff, hit[0])] = slots.get((ff, hit[0]), 0.0) + vv
                        if slots:
                            norm = np.sqrt(sum(x * x for x in slots.values()))
                            for (ff, j), x in slots.items():
                                exact[ff, j] += x / norm
                    for beta_t in [float(b) for b in a.betas.split(",")]:
                        score = ndcg(table, thresholded_log(exact, n * m), beta_t)
                        print(f"  exact counts over the decoded pairs, beta_t={beta_t}: NDCG@10={score:.4f}",
                              flush=True)


if __name__ == "__main__":
    main()
