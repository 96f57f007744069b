"""Learned item-ID embeddings probe: a research tool, not part of Guild.

Asks whether item-ID embeddings trained on every shopper (the transductive setting of
UniSRec; a centralised upper bound for what a federation could train) add anything to the
item-to-item counts, the collaborative signal the tower already carries. A small next-item
model is trained with the full softmax on every training prefix (each shopper's history
without its validation item): a shopper is the recency-weighted pool of its last 20 items'
input vectors, an item's output vector is scored against it, plus a learned item bias.
Item vectors are `title @ A + id` (both), `title @ A` (titles) or `id` alone (ids); `last3`
is `ids` pooled with the item-to-item prior's fixed weights (1, 0.5, 0.25 over the last three
items) instead of learned ones over 20; `shared` is `both` with one vector per item for the
history and the candidates (the tower's way) instead of an input and an output vector;
`residual` is the tower's parametrisation: the fixed title vectors plus a rank-32 residual and
`e_i @ P` (384-dimensional, one vector per item; `--dim` is the IDs' rank).
Validation NDCG@10 (each history's last item, the history masked, the full catalogue) on the
probes' 4,000 users: the model alone, the counts ranker (zero-shot + popularity prior +
w * sum_k r_k ln(1 + count), r = 1, 0.5, 0.25 over the last three items, the counts of every
pair: `probe_transitions.py`'s pairs) and the counts ranker plus lambda times the model's
score, w and lambda chosen on these users (an optimistic figure, as a probe's is).

Usage:

    .venv/bin/python python/probe_id_embeddings.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors [--variants both,ids,titles] \\
        [--dim 64] [--epochs 3] [--cosine] [--negatives 1024]

Measured (2026-12-06, validation NDCG@10 of the model alone, then the best of the counts
ranker plus lambda times its score; the counts ranker alone 0.0747 at w = 0.3): dim 64, three
passes, full softmax: titles 0.0438 / 0.0760, ids 0.0616 / 0.0768, both 0.0731 / 0.0838;
two passes, `--cosine`: both 0.0715 / 0.0826; `--cosine --negatives 1024`: both 0.0709 /
0.0834, shared 0.0735 / 0.0853, residual (`--dim 32`) 0.0699 / 0.0835. About 70 s a pass on
two cores.
"""
import time

import numpy as np
import torch

from probe_transitions import data_arguments, evaluation_sample, load, pairs, prior, unit_items

LENGTH = 20
# The item-to-item prior's fixed weights over the last three items (most recent last here).
LAST3 = torch.tensor([0.0] * (LENGTH - 3) + [0.25, 0.5, 1.0])


def windows(seqs):
    """Every training prefix's last LENGTH items (left-padded with -1) and its next item."""
    xs, ys = [], []
    for s in seqs:
        for p in range(1, len(s)):
            w = s[max(0, p - LENGTH):p]
            xs.append([-1] * (LENGTH - len(w)) + w)
            ys.append(s[p])
    return torch.tensor(xs), torch.tensor(ys)


class Model(torch.nn.Module):
    def __init__(self, titles, dim, variant, cosine=False):
        super().__init__()
        self.cosine = cosine
        n, h = titles.shape
        self.titles = titles
        self.variant = variant
        self.a = torch.nn.Parameter(torch.randn(h, dim) / h**0.5)
        self.b = torch.nn.Parameter(torch.randn(h, dim) / h**0.5)
        self.id_in = torch.nn.Parameter(torch.randn(n, dim) * 0.01)
        self.id_out = torch.nn.Parameter(torch.randn(n, dim) * 0.01)
        self.recency = torch.nn.Parameter(torch.zeros(LENGTH))
        self.bias = torch.nn.Parameter(torch.zeros(n))
        if variant == "residual":
            # The tower's parametrisation: the fixed title vectors plus a rank-32 residual
            # (B at zero) plus e_i @ P (e at zero, P drawn), one vector per item.
            self.res_a = torch.nn.Parameter(torch.randn(h, 32) / h**0.5)
            self.res_b = torch.nn.Parameter(torch.zeros(32, h))
            self.id_res = torch.nn.Parameter(torch.zeros(n, dim))
            self.proj = torch.nn.Parameter(torch.randn(dim, h) / dim**0.5)

    def items(self):
        if self.variant == "residual":
            v = self.titles + (self.titles @ self.res_a) @ self.res_b + self.id_res @ self.proj
            return v, v
        vin = torch.zeros_like(self.id_in)
        vout = torch.zeros_like(self.id_out)
        if self.variant in ("both", "titles", "shared"):
            vin = vin + self.titles @ self.a
            vout = vout + self.titles @ self.b
        if self.variant in ("both", "ids", "last3", "shared"):
            vin = vin + self.id_in
            vout = vout + self.id_out
        if self.variant == "shared":
            # One vector per item, in the history and as a candidate, as the tower has.
            vout = vin
        return vin, vout

    def forward(self, x):
        vin, vout = self.items()
        valid = x >= 0
        g = vin[x.clamp_min(0)] * valid.unsqueeze(-1)
        if self.variant == "last3":
            w = LAST3.unsqueeze(0) * valid
        else:
            w = torch.softmax(self.recency.masked_fill(~valid, -1e9), dim=1) * valid
        u = (w.unsqueeze(-1) * g).sum(1)
        if self.cosine:
            # The tower's scoring: cosine over the temperature (0.05), no item bias.
            unit = lambda t: t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return unit(u) @ unit(vout).T / 0.05
        return u @ vout.T + self.bias


def train(model, x, y, epochs, batch=512, lr=3e-3, negatives=0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g)
        total, t = 0.0, time.time()
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            logits, target = model(x[idx]), y[idx]
            if negatives:
                # The target and `negatives` uniform items shared by the batch (the tower's
                # sampled softmax; a negative that is the target is masked).
                drawn = torch.randint(len(model.bias), (negatives,), generator=g)
                own = logits.gather(1, target.unsqueeze(1))
                others = logits[:, drawn].masked_fill(drawn.unsqueeze(0) == target.unsqueeze(1), -1e4)
                logits, target = torch.cat([own, others], 1), torch.zeros_like(target)
            loss = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}: loss {total / len(y):.3f} ({time.time() - t:.0f} s)", flush=True)


def ndcg(scores, target):
    rank = (scores > scores[target]).sum()
    return 1 / np.log2(rank + 2) if rank < 10 else 0.0


def main():
    parser = data_arguments()
    parser.add_argument("--variants", default="both,ids,titles")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cosine", action="store_true", help="score as the tower does: cosine / 0.05")
    parser.add_argument("--negatives", type=int, default=0, help="uniform negatives a batch (0: full softmax)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, users = load(args.data)
    e = unit_items(args.items)
    sample = evaluation_sample(users)
    training = [h[:-1] for h in users]
    counts = [dict() for _ in range(n)]
    pop = np.zeros(n)
    for tr in training:
        for (a, b), v in pairs(tr).items():
            counts[a][b] = counts[a].get(b, 0.0) + v
        for item in tr:
            pop[item] += 1
    p = prior(pop)

    def base(h):
        """The zero-shot start plus the popularity prior, and the count term."""
        q = e[h[-5:]].mean(0)
        zs = e @ (q / np.linalg.norm(q)) + 0.05 * p
        c = np.zeros(n)
        for r, item in zip((1.0, 0.5, 0.25), reversed(h[-3:])):
            for b, v in counts[item].items():
                c[b] += r * np.log1p(v)
        return zs, c

    bases = []
    for u in sample:
        h = users[u]
        zs, c = base(h[:-1])
        bases.append((h[:-1], h[-1], zs, c))
    for w in (0.1, 0.3, 1.0):
        total = 0.0
        for hist, target, zs, c in bases:
            s = zs + w * c
            s[hist] = -1e9
            total += ndcg(s, target)
        print(f"counts ranker, w = {w}: {total / len(bases):.4f}", flush=True)

    x, y = windows(training)
    titles = torch.from_numpy(e)
    for variant in args.variants.split(","):
        print(f"{variant} (dim {args.dim}, {len(y)} prefixes)", flush=True)
        model = Model(titles, args.dim, variant, args.cosine)
        train(model, x, y, args.epochs, negatives=args.negatives)
        with torch.no_grad():
            hx = torch.tensor([([-1] * LENGTH + h[-LENGTH:])[-LENGTH:] for h, _, _, _ in bases])
            scores = model(hx).numpy()
        scores = scores / scores.std(axis=1, keepdims=True)
        for lam in (0.0, 0.03, 0.1, 0.3, 1.0, 1e9):
            for w in (0.3, 1.0):
                total = 0.0
                for (hist, target, zs, c), m in zip(bases, scores):
                    s = m.astype(np.float64) if lam == 1e9 else zs + w * c + lam * m
                    s = s.copy()
                    s[hist] = -1e9
                    total += ndcg(s, target)
                print(f"  lambda {lam:g}, w {w}: {total / len(bases):.4f}", flush=True)
                if lam == 1e9:
                    break


if __name__ == "__main__":
    main()
