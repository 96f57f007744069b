"""Spectral item-to-item prior probe: whether a low-rank embedding of the released item-to-item
counts adds to the counts themselves, untrained: a research tool, not part of Guild.

The counts are exact here (the non-private arms' releases sum them without noise): every
shopper's item pairs (`probe_transitions.pairs`, the history less its validation item) as a
unit vector, summed. Each item keeps its M = 64 largest counts as its neighbours, scored as
the tower's item-to-item prior (`ln(1 + v / mean v)` at beta_t = 0.2 over the last three
items), on top of the zero-shot start and the popularity prior (`probe_transitions.py`).
The spectral term: the symmetrised, degree-normalised matrix of those neighbour values
(`--source table`, what a tower with a pair sketch holds after decoding it) or of every
pair's log-count (`--source all`), its top k eigenvectors past the first, each item's row
`U * sqrt(lambda)` brought to unit length (F); a candidate gains `gamma * F_c . q` with
`q = sum_j 0.6^j F_{h_j}` over the last five history items. `--twohop` scores instead the
neighbours' neighbours: `gamma * ln(1 + u / mean u)`, `u` the last three items' neighbour
values propagated one step further through the row-normalised table.

Usage (about 3 minutes on one core):

    python3 python/probe_spectral.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors [--source table] \\
        [--ks 32,64] [--gammas 0.2,0.4,0.8] [--twohop 0.05,0.1,0.2]

Measured (2026-12-07, validation NDCG@10 of the probes' 4,000 users): the table alone
0.0720. `--source table`: k = 32, gamma 0.2 / 0.4 / 0.8: 0.0773 / **0.0777** / 0.0753; k = 64:
0.0771 / 0.0773 / 0.0754. `--source all`: k = 32, gamma 0.02 / 0.05 / 0.1 / 0.2: 0.0739 /
0.0749 / 0.0763 / 0.0775; k = 64, gamma 0.3 / 0.5 / 0.8: 0.0779 / 0.0767 / 0.0754. Two hops,
gamma 0.05 / 0.1 / 0.2: 0.0746 / 0.0745 / 0.0749. Untrained, the embedding adds +0.0057 to
the counts it is computed from (post-processing of the released sums: no privacy cost in a
DP release either, though there the counts are mostly noise).

On trained towers (`--towers DIR ...`: folders exported by `guild-sim run --keep-adapters`,
each scored by `rank_with_tower.py`, its own decoded neighbours and chosen beta_t, plus the
term computed from its own table at k = 32; the same 4,000 users): the default scenario's
centralised tower (beta_t 0.05) 0.0837 without it, 0.0815 / 0.0777 / 0.0743 / 0.0720 at
gamma 0.1 / 0.2 / 0.3 / 0.4; its federated tower of the same run (beta_t 0.15) 0.0749 without,
0.0759 / 0.0751 / 0.0725 / 0.0715 (2026-12-07, a copy of `scenarios/default.toml` with only
its zero-shot, counts, centralised and federated arms). The trained towers already hold
what the embedding adds; it would close +0.0010 of the federated arm's 0.0088 gap here, so
it is not built.

    target/release/guild-sim run COPY.toml --out OUT --keep-adapters
    python3 python/probe_spectral.py --data ... --items ... --ks 32 --gammas 0.1,0.2,0.3,0.4 \
        --towers OUT/adapters/centralised__non_private_/v0 OUT/adapters/federated__non_private_/v0
"""
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

import probe_transitions as pt

M = 64


def counts_matrix(n, users):
    """Every shopper's unit vector of item pairs summed, `[n, n]` sparse, and the
    popularity histogram."""
    rows, cols, vals = [], [], []
    pop = np.zeros(n)
    for h in users:
        training = h[:-1]
        c = pt.pairs(training)
        if c:
            norm = np.linalg.norm(list(c.values()))
            for (a, b), v in c.items():
                rows.append(a)
                cols.append(b)
                vals.append(v / norm)
        for item, x in pt.recency(training).items():
            pop[item] += x
    counts = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    counts.sum_duplicates()
    return counts, pop


def neighbour_table(counts):
    """Each item's M largest counts: neighbours `[n, M]` and their prior values
    `ln(1 + v / mean v)`."""
    n = counts.shape[0]
    nbr, t = np.zeros((n, M), dtype=np.int64), np.zeros((n, M))
    mean = counts.data.mean()
    for a in range(n):
        s, e = counts.indptr[a], counts.indptr[a + 1]
        idx, v = counts.indices[s:e], counts.data[s:e]
        if len(idx):
            o = np.argsort(-v)[:M]
            nbr[a, : len(o)] = idx[o]
            t[a, : len(o)] = np.log1p(v[o] / mean)
    return nbr, t


def spectral(matrix, k):
    """Unit rows of `U * sqrt(lambda)` over the top k eigenpairs past the first of the
    symmetrised, degree-normalised `matrix`."""
    s = (matrix + matrix.T) * 0.5
    d = 1 / np.sqrt(np.maximum(np.asarray(s.sum(1)).ravel(), 1e-9))
    normalised = sp.diags(d) @ s @ sp.diags(d)
    lam, u = eigsh(normalised, k=k + 1, which="LA")
    order = np.argsort(-lam)
    lam, u = lam[order][1:], u[:, order][:, 1:]
    f = u * np.sqrt(np.maximum(lam, 0))
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-9)


def score_tower(folder, users, e, k, gammas):
    """Validation NDCG@10 of the exported tower in `folder` (`rank_with_tower.scores`, its own
    decoded neighbours and beta_t) plus gamma times the spectral term of its own table."""
    import torch

    import rank_with_tower as rtw

    tower = rtw.load(folder)
    w, m, n = tower["w"], tower["shape"]["neighbours"], e.shape[0]
    counts, nbr = w["sketch_counts"], w["sketch_neighbours"].long()
    logs = rtw._log_prior(counts, rtw._counts_threshold(counts, tower), tower["smoothing"]).view(-1, m)
    table = sp.coo_matrix((logs.numpy().ravel(), (np.repeat(np.arange(n), m), nbr.numpy().ravel())), shape=(n, n))
    table = table.tocsr()
    table.eliminate_zeros()
    f = torch.tensor(spectral(table, k), dtype=torch.float32)
    items = torch.tensor(e)
    sample = pt.evaluation_sample(users)
    totals = np.zeros(len(gammas))
    with torch.no_grad():
        for s in range(0, len(sample), 250):
            batch = sample[s:s + 250]
            histories = [users[u][:-1] for u in batch]
            base = rtw.scores(tower, items, histories)
            q = torch.zeros(len(histories), k)
            for r, h in enumerate(histories):
                for j, item in enumerate(reversed(h[-5:])):
                    q[r] += 0.6 ** j * f[item]
            extra = q @ f.T
            for gi, g in enumerate(gammas):
                scores = base + g * extra
                for r, h in enumerate(histories):
                    row = scores[r].clone()
                    row[h] = -1e9
                    rank = int((row > row[users[batch[r]][-1]]).sum())
                    if rank < 10:
                        totals[gi] += 1 / np.log2(rank + 2)
    figures = " ".join(f"gamma={g}: {t / len(sample):.4f}" for g, t in zip(gammas, totals))
    print(f"{folder} (beta_t {tower['transitions_weight']:.3f}): {figures}", flush=True)


def main():
    a_ = pt.data_arguments()
    a_.add_argument("--source", choices=["table", "all"], default="table")
    a_.add_argument("--ks", default="32,64")
    a_.add_argument("--gammas", default="0.2,0.4,0.8")
    a_.add_argument("--twohop", default="", help="gammas of the two-hop term, comma-separated")
    a_.add_argument("--towers", nargs="*", default=[], help="exported towers to score with the term instead")
    args = a_.parse_args()
    n, users = pt.load(args.data)
    e = pt.unit_items(args.items)
    if args.towers:
        gammas = [0.0] + [float(x) for x in args.gammas.split(",") if x]
        for folder in args.towers:
            score_tower(folder, users, e, int(args.ks.split(",")[0]), gammas)
        return
    counts, pop = counts_matrix(n, users)
    nbr, t = neighbour_table(counts)
    p = pt.prior(pop)
    table = sp.coo_matrix((t.ravel(), (np.repeat(np.arange(n), M), nbr.ravel())), shape=(n, n)).tocsr()
    table.eliminate_zeros()
    if args.source == "table":
        source = table
    else:
        source = counts.copy()
        source.data = np.log1p(source.data / counts.data.mean())
    sample = pt.evaluation_sample(users)

    def base(hist, scores):
        for item, r in zip(reversed(hist), [1, 0.5, 0.25]):
            scores[nbr[item]] += 0.2 * r * t[item]

    print(f"the table alone: {pt.validation_ndcg(users, sample, e, p, base):.4f}", flush=True)
    for k in [int(x) for x in args.ks.split(",") if x]:
        f = spectral(source, k)
        for g in [float(x) for x in args.gammas.split(",") if x]:
            def add(hist, scores, g=g, f=f):
                base(hist, scores)
                w = np.array([0.6 ** j for j in range(min(5, len(hist)))])
                q = (w[:, None] * f[list(reversed(hist))[: len(w)]]).sum(0)
                scores += g * (f @ q)
            score = pt.validation_ndcg(users, sample, e, p, add)
            print(f"spectral ({args.source}) k={k} gamma={g}: {score:.4f}", flush=True)
    rows = sp.diags(1 / np.maximum(np.asarray(table.sum(1)).ravel(), 1e-9)) @ table
    for g in [float(x) for x in args.twohop.split(",") if x]:
        def add2(hist, scores, g=g):
            base(hist, scores)
            q = np.zeros(n)
            for item, r in zip(reversed(hist), [1, 0.5, 0.25]):
                q[nbr[item]] += r * t[item]
            two = rows.T @ q
            scores += g * np.log1p(two / max(two.mean(), 1e-9))
        print(f"two hops gamma={g}: {pt.validation_ndcg(users, sample, e, p, add2):.4f}", flush=True)


if __name__ == "__main__":
    main()
