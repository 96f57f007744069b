"""Shopper-level release probe: what the noise of a popularity release costs the tower's
start, and what the item-to-item counts' threshold and the split of each shopper's clip norm
between the histogram and the counts change: a research tool, not part of Guild.

Each shopper's statistics as the release sends them (`statistics_contribution`): its unit
popularity vector times sqrt(1 - a) and its unit vector of item-to-item pairs over each
item's 64 nearest titles times sqrt(a) (a = 0.5 in Guild); the sums get N(0, z^2) on every
coordinate; the histogram is thresholded at 5.30 sigma-hat (`noise_threshold`), the counts at
each t_c given. Scored as `probe_transitions.py` scores: validation NDCG@10 of 4,000 users,
the zero-shot pooling, beta = 0.05, beta_t = 0.2.

Usage (the results README's figures, ε = 3's z; about 10 minutes on one core):

    python3 python/probe_noisy_statistics.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors \\
        --z 0,1.667 --splits 0.5,0.8 --thresholds 6.01,4.5,3.5 [--candidates 64:0] [--betas 0.2]

Measured (2026-12-05): exact 0.0553 (either split); z = 1.667, a = 0.5: 0.0376 / 0.0383 /
0.0383 at t_c = 6.01 / 4.5 / 3.5; a = 0.8: 0.0372 / 0.0390 / 0.0400. Three more noise draws
(`--splits 0.5,0.8,0.5,0.8,0.5,0.8 --thresholds 6.01,3.5`): a = 0.5 0.0376 / 0.0370 / 0.0379
at 6.01 and 0.0383 / 0.0389 / 0.0403 at 3.5; a = 0.8 0.0374 / 0.0374 / 0.0389 at 6.01 and
0.0400 / 0.0408 / 0.0395 at 3.5 (Guild's `COUNTS_SHARE` and `COUNTS_NOISE_THRESHOLD`). At
a = 0.8 and t_c = 3.5 / 6.01, entries kept and score: z = 0.8 1,912 / 427, 0.0475 / 0.0421;
z = 1.667 687 / 97, 0.0400 / 0.0372; z = 4 347 / 14, 0.0322 / 0.0323 (pure noise passes
3.5 in about 251 entries, more than 301 once in a thousand).

Each item's candidates (`--candidates T:P`): its T nearest titles, then the P most popular
items (by the exact histogram here; in a release they would come from an earlier,
public popularity release) not among them. `--betas` scores each draw at several β_t.
Measured (2026-12-07, `--splits 0.8 --thresholds 3.5 --z 0,1.667 --betas 0.05,0.2,0.5`, one
noise draw each; exact, then noisy at beta_t = 0.05 / 0.2 / 0.5, entries kept): 64:0 0.0553,
0.0403 / 0.0410 / 0.0411 (672); 32:32 0.0564, 0.0414 / 0.0412 / 0.0412 (681); 60:100 0.0625,
0.0406 / 0.0402 / 0.0402 (1,071); 0:64 0.0361, 0.0391 / 0.0392 / 0.0389 (528). Popular
candidates lift the exact counts (+0.0072 at 60:100) and not the noisy ones (within a draw's
spread, about 0.001): what survives ε = 3's noise is a few hundred pairs of popular items
whatever the candidates, and at that noise the prior's weight hardly matters.
"""
import numpy as np

import probe_transitions as pt


class Release:
    """Each shopper's statistics as a shopper-level release sends them, over each item's
    candidates (`nbr`: its `titles` nearest titles, then the `popular` most popular other
    items), ready to be summed at a split and noised."""

    def __init__(self, data, items, titles=64, popular=0):
        self.n, self.users = pt.load(data)
        self.e = pt.unit_items(items)
        self.m = M = titles + popular
        s = self.e @ self.e.T
        np.fill_diagonal(s, -2)
        top = np.argpartition(-s, titles, axis=1)[:, :titles]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
        nearest = np.take_along_axis(top, order, axis=1)
        del s
        counts = np.zeros(self.n)
        for h in self.users:
            np.add.at(counts, h[:-1], 1)
        by_popularity = np.argsort(-counts, kind="stable")[: M + 1]
        self.nbr = np.empty((self.n, M), dtype=np.int64)
        for a in range(self.n):
            row = list(nearest[a])
            taken = set(row) | {a}
            row += [b for b in by_popularity if b not in taken][: M - len(row)]
            self.nbr[a] = row
        slot = [{int(b): j for j, b in enumerate(self.nbr[a])} for a in range(self.n)]
        self.pop_rows, self.cnt_rows = [], []
        for h in self.users:
            tr = h[:-1]
            c = {a * M + slot[a][b]: v for (a, b), v in pt.pairs(tr).items() if b in slot[a]}
            cn = np.linalg.norm(list(c.values())) if c else 1.0
            self.cnt_rows.append({k: v / cn for k, v in c.items()})
            self.pop_rows.append(pt.recency(tr))
        self.sample = pt.evaluation_sample(self.users)

    def sums(self, a):
        """The release's exact sums: the histogram and the counts, a the counts' share."""
        pop, counts = np.zeros(self.n), np.zeros(self.n * self.m)
        for p, c in zip(self.pop_rows, self.cnt_rows):
            sp, sc = (np.sqrt(1 - a), np.sqrt(a)) if (p and c) else (1.0, 1.0)
            for k, v in p.items():
                pop[k] += v * sp
            for k, v in c.items():
                counts[k] += v * sc
        return pop, counts

    def noisy(self, a, z, tc, rng):
        """One noise draw of the release at z: the histogram's prior (thresholded at 5.30
        sigma-hat) and the counts' prior (at tc), `[n]` and `[n, M]`."""
        pop, counts = self.sums(a)
        p = thresholded(pop + rng.normal(0, z, self.n), 5.30)
        c = thresholded(counts + rng.normal(0, z, self.n * self.m), tc)
        return p, c.reshape(self.n, self.m)

    def ndcg(self, p, tc, beta_t=0.2):
        """Validation NDCG@10 of the probes' users: the zero-shot pooling, beta = 0.05, the
        counts at `beta_t` over the last three items."""
        def add(hist, scores):
            for it, r in zip(reversed(hist), [1, 0.5, 0.25]):
                scores[self.nbr[it]] += beta_t * r * tc[it]
        return pt.validation_ndcg(self.users, self.sample, self.e, p, add)


def thresholded(w, t):
    neg = w[w < 0]
    sigma = np.sqrt((neg ** 2).mean()) if len(neg) else 0.0
    kept = np.maximum(w - t * sigma, 0)
    return pt.prior(kept)


def main():
    a_ = pt.data_arguments()
    a_.add_argument("--z", default="0,1.667", help="noise multipliers, comma-separated (0: exact)")
    a_.add_argument("--splits", default="0.5", help="the counts' share a of each shopper's squared norm")
    a_.add_argument("--thresholds", default="6.01", help="the counts' thresholds t_c, in noise deviations")
    a_.add_argument("--candidates", default="64:0", help="T:P, each item's T nearest titles and P popular items")
    a_.add_argument("--betas", default="0.2", help="the counts' weights beta_t to score, comma-separated")
    args = a_.parse_args()
    titles, popular = (int(x) for x in args.candidates.split(":"))
    release = Release(args.data, args.items, titles, popular)
    n, M = release.n, release.m
    betas = [float(x) for x in args.betas.split(",")]
    zs = [float(x) for x in args.z.split(",")]
    rng = np.random.default_rng(1)
    for a in [float(x) for x in args.splits.split(",")]:
        pop, counts = release.sums(a)
        if 0.0 in zs:
            print(f"a={a} exact: {release.ndcg(pt.prior(pop), pt.prior(counts).reshape(n, M)):.4f}", flush=True)
        for z in [z for z in zs if z > 0]:
            noisy_p = pop + rng.normal(0, z, n)
            noisy_c = counts + rng.normal(0, z, n * M)
            p = thresholded(noisy_p, 5.30)
            for t in [float(x) for x in args.thresholds.split(",")]:
                tc = thresholded(noisy_c, t)
                kept = int((tc > 0).sum())
                for b in betas:
                    print(f"a={a} z={z} t_c={t} ({kept} kept) beta_t={b}: {release.ndcg(p, tc.reshape(n, M), b):.4f}", flush=True)


if __name__ == "__main__":
    main()
