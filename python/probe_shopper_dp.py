"""Shopper-level DP-SGD probe for the sequence tower: a research tool, not part of Guild.

Re-implements the tower (`client/src/model/tower.rs`: item residual, recency pooling, one
causal transformer layer, sampled softmax with uniform negatives at tau = 0.05) in PyTorch and
runs central DP-SGD with the shopper as the unit: Poisson sampling of shoppers at q, one
gradient per shopper over all its training rows (computed for many shoppers in one pass by
giving every shopper its own copy of the parameters), clipping to c, Gaussian noise z*c on
the sum, division by q*N, and a server optimiser (Adam or SGD). Continuous noise stands in
for the federation's distributed discrete Gaussian; z comes from
`guild-coordinator privacy noise-multiplier --unit shopper`. Evaluates NDCG@10 / Recall@10 on
validation users (each user's last history item, history excluded, full catalogue).

Usage (on a GPU where one is available; a few hundred shoppers run on a CPU):

    python3 python/probe_shopper_dp.py '{"data": "../shared/data/amazon-games/Games-6k.test.inter",
        "items": ".cache/items-<hash>-Games-6k-16859-96.safetensors", "eval_users": 3000,
        "runs": [{"kind": "start"}, {"kind": "central", "steps": 1140},
                 {"kind": "dp", "q": 0.05, "T": 400, "z": 1.8828, "c": 1.0, "slr": 1e-3,
                  "server": "adam", "eval_every": 50}]}'

`items` is the catalogue-embedding cache that `guild-sim` writes under `.cache/`. Prints one
JSON line per run.
"""
import json, math, sys, time
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cuda.matmul.allow_tf32 = False
HID, L, Z5, TAU = 384, 20, 5, 0.05

def load_users(path):
    users = []
    for i, line in enumerate(open(path)):
        if i == 0:
            continue
        _, hist, tgt = line.rstrip("\n").split("\t")
        users.append([int(x) for x in hist.split()])
    return users

def rows_of(h):
    ex = len(h) - 2
    if ex <= 0:
        return []
    short = min(ex, L)
    rows = [(h[:short], h[1:short + 1], 0)]
    for k in range(L + 1, ex + 1):
        rows.append((h[k - L:k], h[k - L + 1:k + 1], L - 1))
    return rows

def shapes(width, layers, rank):
    s = {"item_a": (HID, rank), "item_b": (rank, HID), "recency": (L,)}
    if layers:
        s.update({"input.weight": (width, HID), "input.bias": (width,), "position": (L, width), "output": (width, HID)})
        for i in range(layers):
            p = f"block{i}."
            s.update({p + "attention_norm.weight": (width,), p + "attention_norm.bias": (width,),
                      p + "qkv.weight": (3 * width, width), p + "qkv.bias": (3 * width,),
                      p + "attention_out.weight": (width, width), p + "attention_out.bias": (width,),
                      p + "mlp_norm.weight": (width,), p + "mlp_norm.bias": (width,),
                      p + "mlp_in.weight": (2 * width, width), p + "mlp_in.bias": (2 * width,),
                      p + "mlp_out.weight": (width, 2 * width), p + "mlp_out.bias": (width,)})
    return s

def init(width, layers, rank, seed=1):
    g = torch.Generator().manual_seed(seed)
    P = {}
    for n, sh in shapes(width, layers, rank).items():
        if n in ("item_b", "output") or n.endswith("bias") and "norm" not in n:
            t = torch.zeros(sh)
        elif n.endswith("norm.weight"):
            t = torch.ones(sh)
        elif n.endswith("norm.bias"):
            t = torch.zeros(sh)
        elif n == "recency":
            t = torch.zeros(sh); t[:Z5] = 1.0 / Z5
        elif n == "item_a":
            t = torch.randn(sh, generator=g) / math.sqrt(HID)
        elif n == "position":
            t = torch.randn(sh, generator=g) * 0.02
        else:
            b = 1 / math.sqrt(sh[1]); t = (torch.rand(sh, generator=g) * 2 - 1) * b
        P[n] = t.to(dev)
    return P

def norm(t):
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)

def lin(P, n, x):  # P[n] batched [R, out, in]
    return x @ P[n + ".weight"].transpose(-1, -2) + P[n + ".bias"].unsqueeze(-2)

def ln(P, n, x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-5) * P[n + ".weight"].unsqueeze(-2) + P[n + ".bias"].unsqueeze(-2)

def sequence(P, items, idx, valid, layers, width, heads=4):
    """P: batched params [R, ...]; idx, valid [R, m] -> [R, m, HID]"""
    R, m = idx.shape
    raw = items[idx] * valid.unsqueeze(-1)
    seq = raw + (raw @ P["item_a"]) @ P["item_b"]
    pos = torch.arange(m, device=dev)
    lag = pos.unsqueeze(1) - pos.unsqueeze(0)
    toe = P["recency"][:, lag.clamp_min(0)] * (lag >= 0)
    pooled = toe @ seq
    if layers == 0:
        return pooled, seq
    x = lin(P, "input", seq) + P["position"][:, :m]
    allowed = torch.ones(m, m, dtype=torch.bool, device=dev).tril().view(1, 1, m, m)
    for i in range(layers):
        p = f"block{i}."
        q, k, v = lin(P, p + "qkv", ln(P, p + "attention_norm", x)).chunk(3, -1)
        sp = lambda t: t.view(R, m, heads, width // heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(sp(q), sp(k), sp(v), attn_mask=allowed)
        x = x + lin(P, p + "attention_out", a.transpose(1, 2).reshape(R, m, width))
        x = x + lin(P, p + "mlp_out", F.gelu(lin(P, p + "mlp_in", ln(P, p + "mlp_norm", x))))
    return pooled + x @ P["output"], seq

def batch_rows(rows, owners):
    m = max(len(r[0]) for r in rows)
    R = len(rows)
    idx = torch.zeros(R, m, dtype=torch.long); nxt = torch.zeros(R, m, dtype=torch.long); valid = torch.zeros(R, m, dtype=torch.bool)
    at, tg, own = [], [], []
    for i, (w, nx, ft) in enumerate(rows):
        idx[i, :len(w)] = torch.tensor(w); nxt[i, :len(w)] = torch.tensor(nx); valid[i, :len(w)] = True
        for p in range(ft, len(w)):
            at.append(i * m + p); tg.append(nx[p]); own.append(i)
    return idx.to(dev), valid.to(dev), torch.tensor(at, device=dev), torch.tensor(tg, device=dev), torch.tensor(own, device=dev), torch.tensor(owners, device=dev), nxt.to(dev)

def row_losses(Pr, items, batch, K, layers, width):
    idx, valid, at, tg, own, owners, nxt = batch
    seq, _ = sequence(Pr, items, idx, valid, layers, width)
    R, m, H = seq.shape
    sn = norm(seq)
    t = items[nxt]
    pos = norm(t + (t @ Pr["item_a"]) @ Pr["item_b"])  # [R, m, H]
    own_logit = (sn * pos).sum(-1).reshape(R * m)[at].unsqueeze(1)
    neg = torch.randint(items.shape[0], (K,), device=dev)
    nv = items[neg].unsqueeze(0)  # [1, K, H]
    nadapt = norm(nv + (nv @ Pr["item_a"]) @ Pr["item_b"])  # [R or 1, K, H]
    others = (sn @ nadapt.transpose(-1, -2)).reshape(R * m, K)[at]
    others = others.masked_fill(tg.unsqueeze(1) == neg.unsqueeze(0), -1e4)
    logits = torch.cat([own_logit, others], 1) / TAU
    ce = F.cross_entropy(logits, torch.zeros(len(tg), dtype=torch.long, device=dev), reduction="none")
    return ce, own

def per_shopper_grads(P, items, shoppers, K, layers, width, chunk):
    """yields (grads dict [S,...]) for chunks of shoppers (list of histories)"""
    for c0 in range(0, len(shoppers), chunk):
        part = shoppers[c0:c0 + chunk]
        rows, owners = [], []
        for si, h in enumerate(part):
            for r in rows_of(h):
                rows.append(r); owners.append(si)
        if not rows:
            continue
        batch = batch_rows(rows, owners)
        S = len(part)
        Ps = {n: v.detach().unsqueeze(0).expand(S, *v.shape).clone().requires_grad_(True) for n, v in P.items()}
        ob = batch[5]
        Pr = {n: v[ob] for n, v in Ps.items()}
        ce, own = row_losses(Pr, items, batch, K, layers, width)
        shopper_of_target = ob[own]
        counts = torch.zeros(S, device=dev).index_add_(0, shopper_of_target, torch.ones_like(ce))
        loss = (ce / counts[shopper_of_target]).sum()
        loss.backward()
        yield {n: v.grad for n, v in Ps.items()}

def train_central(P, items, users, steps, bs, lr, K, layers, width, seed=0):
    P = {n: v.clone().requires_grad_(True) for n, v in P.items()}
    opt = torch.optim.AdamW(P.values(), lr=lr, weight_decay=0.0)
    allrows = [r for h in users for r in rows_of(h)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(allrows), generator=g).tolist()
    pos = 0
    for s in range(steps):
        if pos + bs > len(perm):
            perm = torch.randperm(len(allrows), generator=g).tolist(); pos = 0
        rows = [allrows[i] for i in perm[pos:pos + bs]]; pos += bs
        batch = batch_rows(rows, list(range(len(rows))))
        Pr = {n: v.unsqueeze(0) for n, v in P.items()}
        # shared params: broadcast with leading dim 1 -> index own with zeros
        ce, _ = row_losses(Pr, items, batch, K, layers, width)
        opt.zero_grad(); ce.mean().backward(); opt.step()
    return {n: v.detach() for n, v in P.items()}

@torch.no_grad()
def evaluate(P, items, evals, layers, width):
    Pu = {n: v.unsqueeze(0) for n, v in P.items()}
    adapted = norm(items + (items @ P["item_a"]) @ P["item_b"])
    ndcg = rec = 0.0
    for c0 in range(0, len(evals), 512):
        part = evals[c0:c0 + 512]
        wins = [h[-L:] for h, _ in part]
        m = max(len(w) for w in wins)
        idx = torch.zeros(len(wins), m, dtype=torch.long); valid = torch.zeros(len(wins), m, dtype=torch.bool)
        for i, w in enumerate(wins):
            idx[i, :len(w)] = torch.tensor(w); valid[i, :len(w)] = True
        seq, _ = sequence(Pu, items, idx.to(dev), valid.to(dev), layers, width)
        last = torch.tensor([len(w) - 1 for w in wins], device=dev)
        s = norm(seq[torch.arange(len(wins), device=dev), last])
        sc = s @ adapted.T
        for i, (h, t) in enumerate(part):
            seen = [x for x in h if x != t]
            if seen:
                sc[i, torch.tensor(seen, device=dev)] = -float("inf")
        tgt = torch.tensor([t for _, t in part], device=dev)
        ts = sc.gather(1, tgt.unsqueeze(1))
        rank = (sc > ts).sum(1) + 1
        hit = rank <= 10
        ndcg += (hit.float() / torch.log2(rank.float() + 1)).sum().item()
        rec += hit.float().sum().item()
    return ndcg / len(evals), rec / len(evals)

def dp_run(P0, items, users, evals, q, T, z, c, server, slr, K, layers, width, chunk, seed, mom=0.0, log=None, eval_every=0):
    P = {n: v.clone() for n, v in P0.items()}
    N = len(users)
    g = torch.Generator().manual_seed(seed)
    state = {}
    b1, b2, eps = 0.9, 0.999, 1e-8 if server == "adam" else None
    curve = []
    stats = []
    for t in range(T):
        mask = torch.rand(N, generator=g) < q
        chosen = [users[i] for i in mask.nonzero().flatten().tolist()]
        total = {n: torch.zeros_like(v) for n, v in P.items()}
        cl = 0
        for G in per_shopper_grads(P, items, chosen, K, layers, width, chunk):
            flat = torch.cat([G[n].flatten(1) for n in P], 1)
            norms = flat.norm(dim=1)
            scale = (c / norms.clamp_min(1e-12)).clamp(max=1.0) if c > 0 else torch.ones_like(norms)
            cl += (norms > c).sum().item() if c > 0 else 0
            for n in P:
                total[n] += (G[n] * scale.view(-1, *[1] * (G[n].dim() - 1))).sum(0)
        denom = q * N
        upd = {}
        for n in P:
            noise = torch.randn(total[n].shape, generator=None, device=dev) * z * c
            upd[n] = (total[n] + noise) / denom  # mean gradient estimate
        signal = math.sqrt(sum((total[n] / denom).pow(2).sum().item() for n in P))
        nn_ = z * c * math.sqrt(sum(v.numel() for v in P.values())) / denom
        stats.append((len(chosen), cl, round(signal, 4), round(nn_, 4)))
        for n in P:
            gr = upd[n]
            if server == "sgd":
                if mom:
                    state[n] = state.get(n, torch.zeros_like(gr)) * mom + gr
                    gr = state[n]
                P[n] = P[n] - slr * gr
            else:
                m_, v_ = state.get(n, (torch.zeros_like(gr), torch.zeros_like(gr)))
                m_ = b1 * m_ + (1 - b1) * gr; v_ = b2 * v_ + (1 - b2) * gr * gr
                state[n] = (m_, v_)
                mh = m_ / (1 - b1 ** (t + 1)); vh = v_ / (1 - b2 ** (t + 1))
                P[n] = P[n] - slr * mh / (vh.sqrt() + (1e-8 if server == "adam" else float(server[4:])))
        if eval_every and ((t + 1) % eval_every == 0 or t == T - 1):
            curve.append((t + 1, round(evaluate(P, items, evals, layers, width)[0], 4)))
    return P, stats, curve

def main():
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    users = load_users(cfg["data"])
    items = load_file(cfg["items"])["items"].to(dev).float()
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(len(users), generator=g).tolist()
    ne = cfg.get("eval_users", 3000)
    # validation: history minus last, target = last history item
    evals = [(users[i][:-1], users[i][-1]) for i in perm[:ne]]
    train = [h for h in users if len(h) >= 3]
    out = []
    for run in cfg["runs"]:
        layers, width, rank = run.get("layers", 1), run.get("width", 128), run.get("rank", 32)
        P0 = init(width, layers, rank, seed=run.get("init_seed", 1))
        d = sum(v.numel() for v in P0.values())
        t0 = time.time()
        if run["kind"] == "start":
            P, info = P0, {}
        elif run["kind"] == "central":
            P = train_central(P0, items, train, run["steps"], run.get("bs", 64), run.get("lr", 1e-3), run.get("K", 256), layers, width)
            info = {}
        else:
            P, stats, curve = dp_run(P0, items, train, evals, run["q"], run["T"], run["z"], run["c"], run.get("server", "adam"), run["slr"],
                                     run.get("K", 256), layers, width, run.get("chunk", 2048), run.get("seed", 3), run.get("mom", 0.0), eval_every=run.get("eval_every", 0))
            info = {"stats": stats[:2] + stats[-1:], "curve": curve}
        nd, rc = evaluate(P, items, evals, layers, width)
        res = {"run": run, "d": d, "ndcg": round(nd, 5), "recall": round(rc, 5), "s": round(time.time() - t0, 1), **info}
        print(json.dumps(res), flush=True)
        out.append(res)

if __name__ == "__main__":
    main()
