"""Item-to-item prior probe for the sequence tower: a research tool, not part of Guild.

Scores the tower's zero-shot start (the mean of the last five item vectors, cosine against
every catalogue item, history excluded) plus the popularity prior (beta = 0.05, gamma = 0.5)
plus the item-to-item prior of `guild_proto::tower::TRANSITIONS_WEIGHT`: for each item its M
nearest titles by cosine, each shopper's unit vector over the (item, neighbour) pairs of its
training items (transitions 1, co-occurrence within 3 positions 0.3 both ways), summed over
shoppers, scored as beta_t * sum_k r_k * ln(1 + v / mean v) over the last three history
items (r = 1, 0.5, 0.25). Validation users (each user's last history item), 4,000 of them.

Usage:

    python3 python/probe_transitions.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors [--neighbours 16,32,64,128] \\
        [--betas 0,0.1,0.2]

Measured with M = 32 (validation NDCG@10, 4,000 users): beta_t = 0 (zero-shot + popularity)
0.0367; 0.02: 0.0451; 0.05: 0.0501; 0.1: 0.0525; 0.2: 0.0528; 0.4: 0.0525. The exact count
ranker restricted to title neighbours scores 0.0540 (M = 32) and 0.0580 (M = 64) against
0.0700 over all pairs on the same users.

The sweep over M (`--neighbours 16,32,64,128 --betas 0,0.1,0.2,0.3`, about 8 minutes on two
cores), validation NDCG@10 at beta_t = 0.1 / 0.2 / 0.3: M = 16: 0.0492 / 0.0490 / 0.0478;
32: 0.0525 / 0.0528 / 0.0526; 64: 0.0538 / 0.0552 / 0.0550; 128: 0.0548 / 0.0557 / 0.0558.
M = 64 is within 0.0005 of 128 at half the adapter (the default scenario's choice), and
beta_t = 0.2 is within 0.0001 of the best at every M from 32 up.
"""
import argparse
import collections

import numpy as np
from safetensors.numpy import load_file


def load(data):
    items = {}
    with open(f"{data}/Games-6k.item") as f:
        for i, line in enumerate(f.read().splitlines()[1:]):
            items[line.split("\t")[0]] = i
    users = []
    with open(f"{data}/Games-6k.test.inter") as f:
        for line in f.read().splitlines()[1:]:
            _, history, _ = line.split("\t")
            users.append([items[x] for x in history.split()])
    return len(items), users


def pairs(training):
    """A shopper's item pairs: transitions 1, co-occurrence within 3 positions 0.3 both ways."""
    c = collections.defaultdict(float)
    for k, item in enumerate(training):
        if k >= 1:
            c[(training[k - 1], item)] += 1.0
        for earlier in training[max(0, k - 3):k]:
            c[(earlier, item)] += 0.3
            c[(item, earlier)] += 0.3
    return {p: v for p, v in c.items() if p[0] != p[1]}


def recency(training):
    """A shopper's unit popularity vector: weight 1, 1/2, 1/4, ... from the most recent item."""
    w, g = collections.defaultdict(float), 1.0
    for item in reversed(training):
        w[item] += g
        g *= 0.5
    norm = np.sqrt(sum(x * x for x in w.values()))
    return {item: x / norm for item, x in w.items()}


def prior(w):
    m = w.mean()
    return np.log1p(w / m) if m > 0 else 0 * w


def unit_items(path):
    """The cached catalogue embeddings, each row scaled to unit length."""
    e = load_file(path)["items"].astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def evaluation_sample(users):
    """The probes' 4,000 evaluation users, a seeded sample."""
    return np.random.default_rng(0).choice(len(users), 4000, replace=False)


def validation_ndcg(users, sample, e, p, add=None):
    """Validation NDCG@10 of the users at `sample` (each history's last item the target, the
    rest the history, masked; the full catalogue): the zero-shot tower's cosine with the mean
    of the last five title vectors, plus 0.05 times the popularity prior `p`, plus what
    `add(history, scores)` adds to the scores in place."""
    total = 0.0
    for u in sample:
        h = users[u]
        hist, target = h[:-1], h[-1]
        q = e[hist[-5:]].mean(0)
        scores = e @ (q / np.linalg.norm(q)) + 0.05 * p
        if add is not None:
            add(hist, scores)
        scores[hist] = -1e9
        rank = (scores > scores[target]).sum()
        if rank < 10:
            total += 1 / np.log2(rank + 2)
    return total / len(sample)


def data_arguments():
    """A parser that takes the dataset's folder and the cached catalogue embeddings."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--items", required=True)
    return parser


def main():
    parser = data_arguments()
    parser.add_argument("--neighbours", default="32", help="M, or a comma-separated list of M to sweep")
    parser.add_argument("--betas", default="0,0.02,0.05,0.1,0.2,0.4", help="beta_t values to score")
    args = parser.parse_args()
    n, users = load(args.data)
    e = unit_items(args.items)
    ms = [int(x) for x in args.neighbours.split(",")]
    s = e @ e.T
    np.fill_diagonal(s, -2)
    top = np.argpartition(-s, max(ms), axis=1)[:, : max(ms)]
    order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
    nearest = np.take_along_axis(top, order, axis=1)
    del s
    for m in ms:
        print(f"M={m}")
        score(users, n, e, nearest[:, :m], [float(b) for b in args.betas.split(",")])


def score(users, n, e, nbr, betas):
    m = nbr.shape[1]
    slot = [{int(b): j for j, b in enumerate(nbr[a])} for a in range(n)]
    counts, pop = np.zeros(n * m), np.zeros(n)
    for h in users:
        tr = h[:-1]
        c = {a * m + slot[a][b]: v for (a, b), v in pairs(tr).items() if b in slot[a]}
        if c:
            norm = np.linalg.norm(list(c.values()))
            for key, x in c.items():
                counts[key] += x / norm
        for it, x in recency(tr).items():
            pop[it] += x
    p, t = prior(pop), prior(counts).reshape(n, m)
    ev = evaluation_sample(users)

    def ndcg(beta_t):
        def add(hist, scores):
            for it, r in zip(reversed(hist), [1, 0.5, 0.25]):
                scores[nbr[it]] += beta_t * r * t[it]
        return validation_ndcg(users, ev, e, p, add)

    for beta_t in betas:
        print(f"  beta_t={beta_t} NDCG@10={ndcg(beta_t):.4f}", flush=True)


if __name__ == "__main__":
    main()
