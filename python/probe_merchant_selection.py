"""Merchant-level pooling selection probe: how often the noisy selection picks each pooling,
and what the pick is worth, at a given merchant sampling rate and noise multiplier: a
research tool, not part of Guild.

The merchant-level DP arm selects at the tower's start, which has no histogram yet, so the
12 settings are 4 poolings (the start's mean of the last five items, decays 0.8 / 0.6 / 0.4
over the last 20) each three times. Every shopper's validation NDCG@10 under each pooling
(the zero-shot tower: cosine of the pooled title vectors, full catalogue, history masked) is
computed once; shops are 100 consecutive shoppers of a seeded shuffle; each draw
Poisson-samples merchants at q, each sends its shoppers' summed NDCG@10 under the 12
settings less their average, clipped to norm c = 1 (`merchant_selection_update`), the sum
gets N(0, z^2) per coordinate, and the largest entry's pooling is chosen. Reports, per q,
how often each pooling is chosen over the draws and the mean over draws of the chosen
pooling's NDCG@10 on every shopper, beside the best pooling's.

Usage (about 4 minutes on one core):

    python3 python/probe_merchant_selection.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors --rates 0.25,0.5,1 --z 3

Measured (2026-12-05, 506 merchants; validation NDCG@10 of every shopper: start 0.0259,
decay 0.8 0.0286, 0.6 0.0299, 0.4 0.0289; the merchants' centred sums have median norm
1.62, 74% clipped): at q = 0.25 the pick is decay 0.6 in 88% of 2,000 draws, 0.8 in 9%, 0.4
in 3%, the start never (mean pick 0.0298); at q = 0.5 and 1, 0.6 in 99% and 100%. The
default run of 2026-12-05 (d)'s selection had sampled 22 merchants, not about 127: the
coordinator opened it while most merchants were still registering (now
`rounds.start_after_registered`).
"""
import numpy as np

import probe_transitions as pt

a_ = pt.data_arguments()
a_.add_argument("--rates", default="0.25,1", help="merchant sampling rates q, comma-separated")
a_.add_argument("--z", type=float, default=3.0, help="the selection's noise multiplier")
a_.add_argument("--draws", type=int, default=2000)
args = a_.parse_args()
n, users = pt.load(args.data)
e = pt.unit_items(args.items)


def weights(decay, length):
    if decay is None:
        w = np.zeros(20)
        w[:5] = 1 / 5
    else:
        w = decay ** np.arange(20)
        w /= w.sum()
    return w[:length]


decays = [None, 0.8, 0.6, 0.4]
ndcg = np.zeros((len(users), len(decays)))
for s in range(0, len(users), 512):
    batch = users[s:s + 512]
    for d, decay in enumerate(decays):
        q = np.stack([(weights(decay, len(h[:-1][-20:]))[:, None] * e[h[:-1][-20:][::-1]]).sum(0) for h in batch])
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        scores = q @ e.T
        for r, h in enumerate(batch):
            hist, target = h[:-1], h[-1]
            row = scores[r]
            row[hist] = -1e9
            rank = (row > row[target]).sum()
            if rank < 10:
                ndcg[s + r, d] = 1 / np.log2(rank + 2)
order = np.random.default_rng(0).permutation(len(users))
shops = [order[k:k + 100] for k in range(0, len(order), 100)]
sums = np.stack([np.repeat(ndcg[shop].sum(0), 3) for shop in shops])  # [merchants, 12]
centred = sums - sums.mean(1, keepdims=True)
norms = np.linalg.norm(centred, axis=1, keepdims=True)
clipped = centred * np.minimum(1.0, 1.0 / np.maximum(norms, 1e-12))
means = ndcg.mean(0)
print(f"{len(shops)} merchants; each pooling's NDCG@10 over every shopper: "
      + ", ".join(f"{d}: {m:.4f}" for d, m in zip(["start", 0.8, 0.6, 0.4], means)))
print(f"merchants' centred sums: median norm {np.median(norms):.3f}, clipped {np.mean(norms > 1):.0%}")
rng = np.random.default_rng(1)
for q in [float(x) for x in args.rates.split(",")]:
    chosen = np.zeros(len(decays))
    value = 0.0
    for _ in range(args.draws):
        sampled = rng.random(len(shops)) < q
        noisy = clipped[sampled].sum(0) + rng.normal(0, args.z, 12)
        pick = int(np.argmax(noisy)) // 3
        chosen[pick] += 1
        value += means[pick]
    print(f"q={q} z={args.z}: chosen " + ", ".join(f"{c / args.draws:.0%}" for c in chosen)
          + f"; mean NDCG@10 of the pick {value / args.draws:.4f} (best {means.max():.4f}, start {means[0]:.4f})",
          flush=True)
