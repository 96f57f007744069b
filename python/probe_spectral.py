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
its zero-shot, counts, centralised and federated arms). On these users it would close 0.0010
of the federated arm's 0.0088 gap.

`--split test` reads test once with the weights chosen above (gamma 0.4 untrained, 0.1 on a
tower, `--tower-gamma`): 10,000 seeded users, each whole history, its test item the target,
paired-bootstrap 95% intervals. Measured (the same run's towers): the table alone 0.0615,
with the term 0.0649 (+0.0034 [+0.0020, +0.0048]); centralised 0.0729, with the term from
its own table 0.0710 (-0.0019 [-0.0033, -0.0005]); federated 0.0624, below the untrained
ranker with the term (-0.0025 [-0.0047, -0.0004]), and with the term from its own table
0.0654 (+0.0030 [+0.0018, +0.0042] over itself; +0.0005 [-0.0017, +0.0027]
against the untrained ranker with the term). On test the term is worth three times what
validation showed to the federated tower: the lead the roadmap names.

    target/release/guild-sim run COPY.toml --out OUT --keep-adapters
    python3 python/probe_spectral.py --data ... --items ... --ks 32 --gammas 0.1,0.2,0.3,0.4 \\
        --towers "OUT/adapters/centralised (non-private)/v0" "OUT/adapters/federated (non-private)/v0"
    python3 python/probe_spectral.py --data ... --items ... --ks 32 --gammas 0.4 --split test \\
        --towers "OUT/adapters/centralised (non-private)/v0" "OUT/adapters/federated (non-private)/v0"
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


def recency_sum(features, history):
    """`sum_j 0.6^j features[h_j]` over the history's last five items, most recent first: the
    shopper side of the spectral term."""
    w = np.array([0.6 ** j for j in range(min(5, len(history)))])
    return (w[:, None] * features[list(reversed(history))[: len(w)]]).sum(0)


def tower_ranks(tower, items, histories, targets, terms=(None,)):
    """Each history's rank of its target under `tower` (`rank_with_tower.scores`, the
    history masked), once for each of `terms`: `None` for the tower alone, or a function of
    a batch of histories giving `[batch, n]` scores to add. A list of rank arrays."""
    import torch

    import rank_with_tower as rtw

    ranks = [[] for _ in terms]
    with torch.no_grad():
        for s in range(0, len(histories), 250):
            batch, wanted = histories[s:s + 250], targets[s:s + 250]
            base = rtw.scores(tower, items, batch)
            for out, term in zip(ranks, terms):
                scores = base if term is None else base + term(batch)
                for r, h in enumerate(batch):
                    row = scores[r].clone()
                    row[h] = -1e9
                    out.append(int((row > row[wanted[r]]).sum()))
    return [np.array(r) for r in ranks]


def spectral_term(features, weight):
    """The spectral term at `weight` as a `tower_ranks` term."""
    import torch

    f = torch.tensor(features, dtype=torch.float32)

    def term(batch):
        q = torch.tensor(np.stack([recency_sum(features, h) for h in batch]), dtype=torch.float32)
        return weight * (q @ f.T)

    return term


def ndcg_gains(ranks):
    """NDCG@10 of each rank (one relevant item)."""
    return np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)


def score_tower(folder, users, e, k, gammas):
    """Validation NDCG@10 of the exported tower in `folder` (`rank_with_tower.scores`, its own
    decoded neighbours and beta_t) plus gamma times the spectral term of its own table."""
    import torch

    import rank_with_tower as rtw

    tower = rtw.load(folder)
    features = spectral(own_table(tower, e.shape[0]), k)
    sample = pt.evaluation_sample(users)
    histories = [users[u][:-1] for u in sample]
    targets = [users[u][-1] for u in sample]
    terms = [None if g == 0 else spectral_term(features, g) for g in gammas]
    totals = [ndcg_gains(r).sum() for r in tower_ranks(tower, torch.tensor(e), histories, targets, terms)]
    figures = " ".join(f"gamma={g}: {t / len(sample):.4f}" for g, t in zip(gammas, totals))
    print(f"{folder} (beta_t {tower['transitions_weight']:.3f}): {figures}", flush=True)


def test_targets(data):
    """Each user's test item (`Games-6k.test.inter`'s third column), as an item index."""
    with open(f"{data}/Games-6k.item") as f:
        index = {line.split("\t")[0]: i for i, line in enumerate(f.read().splitlines()[1:])}
    with open(f"{data}/Games-6k.test.inter") as f:
        return [index[line.split("\t")[2]] for line in f.read().splitlines()[1:]]


def own_table(tower, n):
    """An exported tower's own decoded item-to-item table as a sparse `[n, n]` matrix."""
    import rank_with_tower as rtw

    w, m = tower["w"], tower["shape"]["neighbours"]
    counts = w["sketch_counts"]
    logs = rtw._log_prior(counts, rtw._counts_threshold(counts, tower), tower["smoothing"]).view(-1, m)
    rows = np.repeat(np.arange(n), m)
    table = sp.coo_matrix((logs.numpy().ravel(), (rows, w["sketch_neighbours"].long().numpy().ravel())), shape=(n, n))
    table = table.tocsr()
    table.eliminate_zeros()
    return table


def test_comparison(args, users, e, nbr, t, p, table):
    """Test NDCG@10 of 10,000 seeded users (each whole history, its test item the target):
    the untrained counts with and without the spectral term (at the first of `--gammas`),
    each of `--towers` alone and with the term at `--tower-gamma` (from the exact table and
    from its own), with paired-bootstrap 95% intervals."""
    import torch

    import rank_with_tower as rtw

    n, k = len(e), int(args.ks.split(",")[0])
    gamma = float(args.gammas.split(",")[0])
    targets = test_targets(args.data)
    sample = np.random.default_rng(11).choice(len(users), 10000, replace=False)
    f = spectral(table, k)
    untrained = {"counts": [], f"counts + spectral {gamma}": []}
    for u in sample:
        h, target = users[u], targets[u]
        q = e[h[-5:]].mean(0)
        base = e @ (q / np.linalg.norm(q)) + 0.05 * p
        for item, r in zip(reversed(h), [1, 0.5, 0.25]):
            base[nbr[item]] += 0.2 * r * t[item]
        for name, scores in (("counts", base), (f"counts + spectral {gamma}", base + gamma * (f @ recency_sum(f, h)))):
            scores = scores.copy()
            scores[h] = -1e9
            untrained[name].append(int((scores > scores[target]).sum()))
    gains = {name: list(ndcg_gains(np.array(ranks))) for name, ranks in untrained.items()}
    items = torch.tensor(e)
    histories = [users[u] for u in sample]
    wanted = [targets[u] for u in sample]
    pairs = [(f"counts + spectral {gamma}", "counts")]
    for folder in args.towers:
        tower = rtw.load(folder)
        name = folder.rstrip("/").split("/")[-2]
        with_term = f"{name} + spectral {args.tower_gamma}"
        keys = [name, f"{with_term} (exact table)", f"{with_term} (own table)"]
        own = spectral(own_table(tower, n), k)
        terms = [None, spectral_term(f, args.tower_gamma), spectral_term(own, args.tower_gamma)]
        for key, ranks in zip(keys, tower_ranks(tower, items, histories, wanted, terms)):
            gains[key] = list(ndcg_gains(ranks))
            pairs.append((key, f"counts + spectral {gamma}"))
            if key != name:
                pairs.append((key, name))
    rng = np.random.default_rng(0)
    for key, g in gains.items():
        print(f"{key}: test NDCG@10 {np.mean(g):.4f}", flush=True)
    for a, b in pairs:
        d = np.array(gains[a]) - np.array(gains[b])
        boots = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(1000)]
        print(f"{a} against {b}: {d.mean():+.4f} [{np.percentile(boots, 2.5):+.4f}, {np.percentile(boots, 97.5):+.4f}]")


def main():
    a_ = pt.data_arguments()
    a_.add_argument("--source", choices=["table", "all"], default="table")
    a_.add_argument("--ks", default="32,64")
    a_.add_argument("--gammas", default="0.2,0.4,0.8")
    a_.add_argument("--twohop", default="", help="gammas of the two-hop term, comma-separated")
    a_.add_argument("--towers", nargs="*", default=[], help="exported towers to score with the term instead")
    a_.add_argument("--split", choices=["validation", "test"], default="validation")
    a_.add_argument("--tower-gamma", type=float, default=0.1, help="the term's weight on a tower, on test")
    args = a_.parse_args()
    n, users = pt.load(args.data)
    e = pt.unit_items(args.items)
    if args.towers and args.split == "validation":
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
    if args.split == "test":
        test_comparison(args, users, e, nbr, t, p, table)
        return
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
                scores += g * (f @ recency_sum(f, hist))
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
