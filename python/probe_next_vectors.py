"""Next-item direction probe: whether a collaborative statistic of far fewer coordinates per
item than the item-to-item counts survives a shopper-level release's noise: a research tool,
not part of Guild.

Each item i accumulates V_i = sum over every shopper's pairs (i -> j) (`pairs`: transitions
1, co-occurrence within 3 positions 0.3) of P (e_j - mean e), where e_j is item j's unit title
vector and P the catalogue's k leading principal directions (public: computed from the
titles alone).
A shopper sends its blocks as one vector scaled to norm sqrt(a), beside its unit popularity
vector scaled to sqrt(1 - a), so its whole contribution has norm 1; the sums get N(0, z^2)
on every coordinate. A candidate c is scored as the zero-shot tower with the popularity
prior (`probe_transitions.py`: mean of the last five title vectors, beta = 0.05) plus
gamma * sum over the last three history items i (weights 1, 0.5, 0.25) of
shrink_i * cos(V_i, P e_c), where shrink_i = max(0, 1 - k z^2 / |V_i|^2) is the positive-part
James-Stein factor of the noisy block (1 without noise). Validation NDCG@10 of 4,000 users.

Usage (about 10 minutes on one core):

    python3 python/probe_next_vectors.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors \\
        --dims 32,16 --z 0 --gammas 0.01,0.02,0.05,0.1

Measured (2026-12-05), without noise: the start with the exact popularity prior 0.0367;
k = 32: 0.0368 / 0.0372 / 0.0371 / 0.0378 at gamma = 0.01 / 0.02 / 0.05 / 0.1; k = 16:
0.0367 / 0.0370 / 0.0366 / 0.0368 (uncentred title vectors, k = 16: 0.0360 to 0.0353). The
exact item-to-item counts over 64 title neighbours reach 0.0553 the same way
(`probe_noisy_statistics.py`): an item's mean next direction in title space carries little
the query's own title vectors do not, so it is not worth a release of its own.
"""
import numpy as np

import probe_transitions as pt

a_ = pt.data_arguments()
a_.add_argument("--dims", default="16", help="k, comma-separated")
a_.add_argument("--z", default="0,1.667", help="noise multipliers, comma-separated (0: exact)")
a_.add_argument("--split", type=float, default=0.5, help="the vectors' share a of each shopper's squared norm")
a_.add_argument("--gammas", default="0.02,0.05,0.1", help="the statistic's weights, comma-separated")
args = a_.parse_args()
n, users = pt.load(args.data)
e = pt.unit_items(args.items)
centred = e - e.mean(0)
_, _, vt = np.linalg.svd(centred, full_matrices=False)
ev = pt.evaluation_sample(users)
pairs = [pt.pairs(h[:-1]) for h in users]
pops = [pt.recency(h[:-1]) for h in users]
rng = np.random.default_rng(1)


def ndcg(p, blocks, pe, gamma):
    def add(hist, scores):
        for it, r in zip(reversed(hist), [1, 0.5, 0.25]):
            scores += gamma * r * (pe @ blocks[it])
    return pt.validation_ndcg(users, ev, e, p, add if gamma > 0 else None)


for k in [int(x) for x in args.dims.split(",")]:
    proj = vt[:k]
    pe = centred @ proj.T
    pe /= np.maximum(np.linalg.norm(pe, axis=1, keepdims=True), 1e-12)
    v, pop = np.zeros((n, k)), np.zeros(n)
    for c, r in zip(pairs, pops):
        block = {}
        for (a, b), x in c.items():
            block[a] = block.get(a, 0) + x * pe[b]
        norm = np.sqrt(sum((b ** 2).sum() for b in block.values())) if block else 1.0
        sv, sp = (np.sqrt(args.split), np.sqrt(1 - args.split)) if block else (0.0, 1.0)
        for a, b in block.items():
            v[a] += sv * b / norm
        for it, x in r.items():
            pop[it] += sp * x
    for z in [float(x) for x in args.z.split(",")]:
        nv = v + rng.normal(0, z, v.shape) if z > 0 else v
        npop = pop + rng.normal(0, z, n) if z > 0 else pop
        if z > 0:
            neg = npop[npop < 0]
            npop = np.maximum(npop - 5.30 * np.sqrt((neg ** 2).mean()), 0)
        norms = np.linalg.norm(nv, axis=1)
        shrink = np.maximum(0, 1 - k * z * z / np.maximum(norms ** 2, 1e-12)) if z > 0 else (norms > 0) * 1.0
        blocks = nv / np.maximum(norms, 1e-12)[:, None] * shrink[:, None]
        p = pt.prior(npop)
        kept = int((shrink > 0).sum())
        print(f"k={k} z={z} items kept {kept}: base {ndcg(p, blocks, pe, 0):.4f}", flush=True)
        for g in [float(x) for x in args.gammas.split(",")]:
            print(f"  gamma={g}: {ndcg(p, blocks, pe, g):.4f}", flush=True)
