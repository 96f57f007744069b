"""Ranks items with a sequence tower exported by `guild-coordinator export-adapter`.

Usage as a library: `load(folder)` reads `tower.safetensors` and `tower.json`;
`scores(tower, items, histories)` gives the score of every item for each history (cosine,
plus the popularity prior and the item-to-item prior when the tower has them)
(item vectors: the base model's normalised embeddings of product titles; histories: item
indices, oldest first). As a script it reads a JSON object from stdin,
{"tower_dir": ..., "items": [[...], ...], "histories": [[...], ...]}, and prints
{"scores": [[...], ...]}: the test suite's check that an exported tower ranks as Guild's does.
"""

import json
import sys

import torch
from safetensors.torch import load_file


def load(folder):
    with open(f"{folder}/tower.json") as f:
        description = json.load(f)
    w = load_file(f"{folder}/tower.safetensors")
    return {
        "shape": description["shape"],
        "eps": description["layer_norm_eps"],
        "smoothing": description.get("popularity_smoothing", 0.1),
        "threshold": description.get("popularity_noise_threshold", 3.0),
        "transitions_threshold": description.get("transitions_noise_threshold", 3.0),
        "transitions_exceedances": description.get("transitions_noise_exceedances"),
        "transitions_strict": description.get("transitions_strict_threshold"),
        "transitions_recency": description.get("transitions_recency", []),
        "spectral_recency": description.get("spectral_recency", []),
        "w": w,
        # The item-to-item prior's weight: a tensor of the file (chosen on validation, so
        # each version holds its own), or, from an older export, the description's constant.
        "transitions_weight": float(w["transitions_weight"][0])
        if "transitions_weight" in w
        else description.get("transitions_weight", 0.0),
    }


def _linear(w, name, x):
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _norm(w, name, x, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def shoppers(tower, adapted, histories):
    shape, w, eps = tower["shape"], tower["w"], tower["eps"]
    # Each history's last `history` items, oldest first, left-aligned and right-padded.
    windows = [h[-shape["history"]:] for h in histories]
    length = max(1, max(len(h) for h in windows))
    b = len(windows)
    index = torch.zeros(b, length, dtype=torch.long)
    valid = torch.zeros(b, length, dtype=torch.bool)
    for row, window in enumerate(windows):
        index[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        valid[row, : len(window)] = True
    sequence = adapted[index] * valid.unsqueeze(-1)
    last = torch.tensor([max(len(h), 1) - 1 for h in windows])
    rows = torch.arange(b)
    # Recency pooling at the last item: recency[j] weighs the j-th most recent item.
    lag = (last.unsqueeze(1) - torch.arange(length).unsqueeze(0)).clamp_min(0)
    weights = w["recency"][lag] * (torch.arange(length).unsqueeze(0) <= last.unsqueeze(1))
    pooled = (sequence * weights.unsqueeze(-1)).sum(1)
    if shape["layers"] == 0:
        return pooled
    heads, width = shape["heads"], shape["width"]
    x = _linear(w, "input", sequence) + w["position"][:length].unsqueeze(0)
    causal = torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length)
    for i in range(shape["layers"]):
        p = f"block{i}"
        q, k, v = _linear(w, f"{p}.qkv", _norm(w, f"{p}.attention_norm", x, eps)).chunk(3, -1)
        split = lambda t: t.view(b, length, heads, width // heads).transpose(1, 2)
        attended = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=causal)
        x = x + _linear(w, f"{p}.attention_out", attended.transpose(1, 2).reshape(b, length, width))
        hidden = torch.nn.functional.gelu(_linear(w, f"{p}.mlp_in", _norm(w, f"{p}.mlp_norm", x, eps)))
        x = x + _linear(w, f"{p}.mlp_out", hidden)
    return pooled + x[rows, last] @ w["output"]


def prior(tower):
    """The popularity prior of every item, beta * ln(1 + v_j / (kappa * mean(v))), with
    v = max(w - t sigma, 0), w the federation's histogram, sigma its noise, estimated from
    its negative entries, and t the export's popularity_noise_threshold (the level the
    largest of the catalogue's noise entries passes with probability 1e-3; 3 in exports that
    state none) (zero when the tower has no histogram)."""
    w = tower["w"]
    if "popularity" not in w:
        return 0.0
    return _log_prior(w["popularity"], tower["threshold"], tower["smoothing"]) * w["popularity_weight"]


def _log_prior(summed, threshold, smoothing):
    """ln(1 + v / (kappa * mean(v))), v = max(w - threshold * sigma, 0), sigma the noise's
    deviation from the negative entries (every contribution is >= 0)."""
    sigma = _noise_sigma(summed)
    kept = (summed - threshold * sigma).clamp_min(0.0)
    scale = (kept.mean() * smoothing).clamp_min(1e-30)
    return (kept / scale).log1p()


def _noise_sigma(summed):
    """The noise's deviation in a summed statistic: the root mean square of its negative
    entries (0 when none is negative)."""
    return (summed.clamp_max(0.0).square().sum() / (summed < 0).sum().clamp_min(1)).sqrt()


def _counts_threshold(counts, tower):
    """The counts' threshold: the lower level when more of their entries exceed it than noise
    alone would (the export's transitions_noise_exceedances), else the strict one."""
    lower, bound = tower["transitions_threshold"], tower["transitions_exceedances"]
    if bound is None or tower["transitions_strict"] is None:
        return lower
    sigma = _noise_sigma(counts)
    return lower if int((counts > lower * sigma).sum()) > bound else tower["transitions_strict"]


def title_neighbours(items, m):
    """Each item's m nearest other items by cosine of the title vectors, nearest first."""
    unit = items / items.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.topk(m, dim=1).indices


def history_prior(tower, items, histories):
    """The item-to-item prior of each history, [len(histories), items]: transitions_weight *
    sum over its last items h_k (weights transitions_recency, most recent first) of the
    thresholded log counts of h_k and each of its title neighbours (or, for a tower with a
    pair sketch, the neighbours decoded from it), added to that neighbour, plus the spectral
    prior when the tower has one; zero when the tower has no counts."""
    w, shape = tower["w"], tower["shape"]
    m = shape.get("neighbours", 0)
    prior = torch.zeros(len(histories), items.shape[0])
    if m == 0 or "popularity_next" not in w:
        return prior
    if "sketch_neighbours" in w:
        # A pair sketch: the export carries each item's decoded neighbours and their counts.
        counts, neighbours = w["sketch_counts"], w["sketch_neighbours"].long()
    else:
        counts, neighbours = w["popularity_next"], title_neighbours(items, m)
    logs = _log_prior(counts, _counts_threshold(counts, tower), tower["smoothing"]).view(-1, m)
    for row, history in enumerate(histories):
        for k, weight in enumerate(tower["transitions_recency"]):
            if k < len(history) and history[-1 - k] < items.shape[0]:
                item = history[-1 - k]
                prior[row].index_add_(0, neighbours[item], logs[item] * weight)
    prior = prior * tower["transitions_weight"]
    if "spectral_features" in w and float(w["spectral_weight"][0]) != 0.0:
        # The spectral prior: each item's feature row (the export's, from the top eigenvectors
        # of the decoded table) against the history's recency-weighted sum of its last items'.
        f = w["spectral_features"]
        query = torch.zeros(len(histories), f.shape[1])
        for row, history in enumerate(histories):
            for j, weight in enumerate(tower["spectral_recency"]):
                if j < len(history) and history[-1 - j] < items.shape[0]:
                    query[row] += weight * f[history[-1 - j]]
        prior = prior + float(w["spectral_weight"][0]) * (query @ f.T)
    return prior


def scores(tower, items, histories):
    """Cosine of shopper and item vectors plus the popularity and item-to-item priors (ranking
    scores; the training softmax divides them by the temperature)."""
    w = tower["w"]
    adapted = items + (items @ w["item_a"]) @ w["item_b"]
    if "item_ids" in w:
        # Learned item-ID embeddings, one row per catalogue item, projected into the item space.
        adapted = adapted + w["item_ids"] @ w["item_ids_out"]
    if "spectral_in" in w and "spectral_features" in w:
        # Each item's spectral features (the export's), projected into the item space.
        adapted = adapted + w["spectral_features"] @ w["spectral_in"]
    normalise = lambda t: t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = normalise(shoppers(tower, adapted, histories)) @ normalise(adapted).T
    return cosine + prior(tower) + history_prior(tower, items, histories)


def main():
    request = json.load(sys.stdin)
    tower = load(request["tower_dir"])
    items = torch.tensor(request["items"], dtype=torch.float32)
    with torch.no_grad():
        result = scores(tower, items, request["histories"])
    json.dump({"scores": result.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
