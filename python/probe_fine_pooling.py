"""Whether tuning the pooling more finely than the selection's grid could pay under
shopper-level DP: a research tool, not part of Guild.

After an ε = 3 release (z = 1.667, the counts' share 0.8 and threshold 3.5 noise
deviations, as Guild sends and keeps them; `probe_noisy_statistics.py`), the tower's start
is scored on the probes' 4,000 validation users under the selection's 12 public settings
(the mean of the last five or recency weights decaying by 0.8 / 0.6 / 0.4 per item back,
each at prior weight beta = 0.035 / 0.05 / 0.07) and under a finer grid around them (decays
0.45 to 0.8, beta 0.025 to 0.07: 63 settings). What a finer choice, or a zeroth-order
(SPSA) training of the pooling on NDCG@10 itself, could add is at most the finer grid's
best less the public grid's.

Usage (about 10 minutes on one core per noise draw):

    python3 python/probe_fine_pooling.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors [--draws 2]

Measured (2026-12-05, two noise draws): the public grid's best 0.0454 / 0.0449 (both decay
0.6, beta 0.035), the finer grid's best 0.0463 (decay 0.65, beta 0.035) / 0.0449: +0.0009
and +0.0000, within the noise of choosing among 63 settings on 4,000 users. beta_t, the
counts' weight, moves nothing either (0.1 to 0.8: 0.0411 to 0.0414 at the start's pooling,
on 2,000 of the users), as few counts survive the threshold.
"""
import numpy as np

import probe_transitions as pt
from probe_noisy_statistics import Release

GRID_DECAYS = [None, 0.8, 0.6, 0.4]
GRID_BETAS = [0.035, 0.05, 0.07]
FINE_DECAYS = GRID_DECAYS + [0.7, 0.65, 0.55, 0.5, 0.45]
FINE_BETAS = GRID_BETAS + [0.025, 0.03, 0.04, 0.045]


def pooling(decay, length):
    """The shopper vector's weights over its last `length` items, oldest first."""
    if decay is None:
        w = np.zeros(length)
        w[-5:] = 1.0
    else:
        w = decay ** np.arange(length)[::-1]
    return w / w.sum()


def scores(release, p, tc):
    """Validation NDCG@10 of every (decay, beta) of the fine grid, the counts at beta_t = 0.2."""
    users, e, nbr, sample = release.users, release.e, release.nbr, release.sample
    out = {}
    for d in FINE_DECAYS:
        total = dict.fromkeys(FINE_BETAS, 0.0)
        for s0 in range(0, len(sample), 500):
            batch = sample[s0:s0 + 500]
            q = []
            for u in batch:
                hist = users[u][:-1][-20:]
                v = (pooling(d, len(hist))[:, None] * e[hist]).sum(0)
                q.append(v / np.linalg.norm(v))
            base = np.stack(q) @ e.T
            for r, u in enumerate(batch):
                for it, w in zip(reversed(users[u][:-1]), [1, 0.5, 0.25]):
                    base[r, nbr[it]] += 0.2 * w * tc[it]
            for beta in FINE_BETAS:
                ranked = base + beta * p[None, :]
                for r, u in enumerate(batch):
                    hist, target = users[u][:-1], users[u][-1]
                    row = ranked[r].copy()
                    row[hist] = -1e9
                    rank = (row > row[target]).sum()
                    if rank < 10:
                        total[beta] += 1 / np.log2(rank + 2)
        for beta in FINE_BETAS:
            out[(d, beta)] = total[beta] / len(sample)
    return out


def main():
    parser = pt.data_arguments()
    parser.add_argument("--draws", type=int, default=2, help="noise draws of the release")
    args = parser.parse_args()
    release = Release(args.data, args.items)
    rng = np.random.default_rng(1)
    for draw in range(args.draws):
        p, tc = release.noisy(0.8, 1.667, 3.5, rng)
        fine = scores(release, p, tc)
        grid = {k: v for k, v in fine.items() if k[0] in GRID_DECAYS and k[1] in GRID_BETAS}
        g, f = max(grid, key=grid.get), max(fine, key=fine.get)
        print(f"draw {draw}: public grid's best {g} {grid[g]:.4f}; finer grid's best {f} {fine[f]:.4f}", flush=True)


if __name__ == "__main__":
    main()
