"""Pooling probe for the sequence tower: a research tool, not part of Guild.

Two questions, on the validation split (each user's last history item, history excluded,
the full catalogue), with the tower's popularity prior (recency-weighted histogram, gamma =
0.5, kappa = 1, exact) over the zero-shot start:

1. `grid`: how much the shopper vector's pooling matters when nothing is trained: the mean
   of the last k items (the tower's start is k = 5) or exponentially decaying weights over
   the last 20, each at prior weights beta in {0, 0.05, 0.07}; 6,000 users.
2. `train`: whether the tower's own objective finds better pooling: the 20 recency weights
   and beta trained alone with Adam on the sampled softmax (1,024 uniform negatives, tau =
   0.05) over every training row, centrally, non-privately; 4,000 users, NDCG@10 every 300
   steps of 256 rows.

Usage (from the repository root, beside ../shared/data):

    .venv/bin/python python/probe_pooling.py grid .cache/items-<hash>-Games-6k-16859-96.safetensors
    .venv/bin/python python/probe_pooling.py train .cache/items-<hash>-Games-6k-16859-96.safetensors [lr]
"""
import sys
from pathlib import Path


def grid():
    import numpy as np
    from safetensors.numpy import load_file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe_popularity import read, histogram, recent, prior
    V = load_file(sys.argv[2])["items"]; V = V / np.linalg.norm(V, axis=1, keepdims=True)
    n = len(V)
    valid = read("../shared/data/amazon-games/Games-6k.valid.inter")
    users = np.random.default_rng(0).choice(len(valid), 6000, replace=False)
    pp = prior(histogram(valid, n, recent(0.5)), 1.0, kappa=1.0)
    def ndcg(weights, beta):
        tot = 0
        for s in range(0, len(users), 500):
            b = users[s:s+500]
            q = np.stack([(weights(len(valid[u][0][-20:]))[:, None] * V[valid[u][0][-20:]]).sum(0) for u in b])
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            sc = q @ V.T + beta * pp[None, :]
            for r, u in enumerate(b): sc[r, valid[u][0]] = -1e9
            t = np.array([valid[u][1] for u in b])
            rank = (sc > sc[np.arange(len(t)), t][:, None]).sum(1)
            tot += np.where(rank < 10, 1/np.log2(rank+2), 0).sum()
        return tot / len(users)
    def mean_k(k):
        return lambda m: np.array([1.0 if i >= m - k else 0.0 for i in range(m)])
    def decay(r):
        return lambda m: np.array([r ** (m - 1 - i) for i in range(m)])
    for name, w in (("mean5", mean_k(5)), ("mean3", mean_k(3)), ("last", mean_k(1)), ("decay0.8", decay(0.8)), ("decay0.6", decay(0.6)), ("decay0.4", decay(0.4))):
        print(name, [round(ndcg(w, b), 5) for b in (0.0, 0.05, 0.07)], flush=True)


def train():
    import numpy as np, torch
    from safetensors.numpy import load_file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe_popularity import read, histogram, recent, prior
    torch.manual_seed(0)
    V = load_file(sys.argv[2])["items"]; V = V / np.linalg.norm(V, axis=1, keepdims=True)
    n = len(V); Vt = torch.tensor(V, dtype=torch.float32)
    valid = read("../shared/data/amazon-games/Games-6k.valid.inter")
    pp = torch.tensor(prior(histogram(valid, n, recent(0.5)), 1.0, kappa=1.0), dtype=torch.float32)
    L = 20
    rows = []
    for hist, _ in valid:
        for t in range(1, len(hist)):
            w = hist[max(0, t - L):t]
            rows.append(([0] * (L - len(w)) + w, [0.0] * (L - len(w)) + [1.0] * len(w), hist[t]))
    rng = np.random.default_rng(0)
    idx = np.array([r[0] for r in rows]); msk = np.array([r[1] for r in rows], dtype=np.float32); tgt = np.array([r[2] for r in rows])
    print("rows", len(rows), flush=True)
    recency = torch.zeros(L); recency[-5:] = 0.2; recency.requires_grad_(True)
    beta = torch.tensor(0.05, requires_grad=True)
    opt = torch.optim.Adam([recency, beta], lr=float(sys.argv[3]) if len(sys.argv) > 3 else 1e-2)
    users = np.random.default_rng(0).choice(len(valid), 4000, replace=False)
    def ndcg():
        tot = 0
        with torch.no_grad():
            for s in range(0, len(users), 500):
                b = users[s:s+500]
                q = []
                for u in b:
                    h = valid[u][0][-L:]
                    w = recency[-len(h):]
                    q.append((w[:, None] * Vt[h]).sum(0))
                q = torch.stack(q); q = q / q.norm(dim=1, keepdim=True)
                sc = (q @ Vt.T + beta * pp[None, :]).numpy()
                for r, u in enumerate(b): sc[r, valid[u][0]] = -1e9
                t = np.array([valid[u][1] for u in b])
                rank = (sc > sc[np.arange(len(t)), t][:, None]).sum(1)
                tot += np.where(rank < 10, 1/np.log2(rank+2), 0).sum()
        return tot / len(users)
    print("start", ndcg(), flush=True)
    tau = 0.05; B = 256
    t0 = time.time()
    for step in range(1, 1201):
        b = rng.integers(0, len(rows), B)
        x = Vt[torch.tensor(idx[b])] * torch.tensor(msk[b])[:, :, None]
        q = (recency[None, :, None] * x).sum(1); q = q / q.norm(dim=1, keepdim=True)
        neg = torch.tensor(rng.integers(0, n, 1024))
        cand = torch.cat([torch.tensor(tgt[b]), neg])
        logits = (q @ Vt[cand].T + beta * pp[cand][None, :]) / tau
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(B))
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 300 == 0:
            print(step, round(loss.item(), 3), "ndcg", round(ndcg(), 5), "beta", round(beta.item(), 4), "rec", np.round(recency.detach().numpy()[-8:], 3), round(time.time() - t0), flush=True)


if __name__ == "__main__":
    {"grid": grid, "train": train}[sys.argv[1]]()
