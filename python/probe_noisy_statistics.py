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
        --z 0,1.667 --splits 0.5,0.8 --thresholds 6.01,4.5,3.5

Measured (2026-12-05): exact 0.0553 (either split); z = 1.667, a = 0.5: 0.0376 / 0.0383 /
0.0383 at t_c = 6.01 / 4.5 / 3.5; a = 0.8: 0.0372 / 0.0390 / 0.0400. Three more noise draws
(`--splits 0.5,0.8,0.5,0.8,0.5,0.8 --thresholds 6.01,3.5`): a = 0.5 0.0376 / 0.0370 / 0.0379
at 6.01 and 0.0383 / 0.0389 / 0.0403 at 3.5; a = 0.8 0.0374 / 0.0374 / 0.0389 at 6.01 and
0.0400 / 0.0408 / 0.0395 at 3.5 (Guild's `COUNTS_SHARE` and `COUNTS_NOISE_THRESHOLD`). At
a = 0.8 and t_c = 3.5 / 6.01, entries kept and score: z = 0.8 1,912 / 427, 0.0475 / 0.0421;
z = 1.667 687 / 97, 0.0400 / 0.0372; z = 4 347 / 14, 0.0322 / 0.0323 (pure noise passes
3.5 in about 251 entries, more than 301 once in a thousand).
"""
import numpy as np

import probe_transitions as pt

M = 64


class Release:
    """Each shopper's statistics as a shopper-level release sends them, over each item's M
    nearest titles (`nbr`), ready to be summed at a split and noised."""

    def __init__(self, data, items):
        self.n, self.users = pt.load(data)
        self.e = pt.unit_items(items)
        s = self.e @ self.e.T
        np.fill_diagonal(s, -2)
        top = np.argpartition(-s, M, axis=1)[:, :M]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
        self.nbr = np.take_along_axis(top, order, axis=1)
        del s
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
        pop, counts = np.zeros(self.n), np.zeros(self.n * M)
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
        c = thresholded(counts + rng.normal(0, z, self.n * M), tc)
        return p, c.reshape(self.n, M)

    def ndcg(self, p, tc):
        """Validation NDCG@10 of the probes' users: the zero-shot pooling, beta = 0.05, the
        counts at beta_t = 0.2 over the last three items."""
        def add(hist, scores):
            for it, r in zip(reversed(hist), [1, 0.5, 0.25]):
                scores[self.nbr[it]] += 0.2 * r * tc[it]
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
    args = a_.parse_args()
    release = Release(args.data, args.items)
    n = release.n
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
                print(f"a={a} z={z} t_c={t} ({kept} kept): {release.ndcg(p, tc.reshape(n, M)):.4f}", flush=True)


if __name__ == "__main__":
    main()
