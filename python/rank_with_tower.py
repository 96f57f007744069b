"""Ranks items with a sequence tower exported by `guild-coordinator export-adapter`.

Usage as a library: `load(folder)` reads `tower.safetensors` and `tower.json`;
`scores(tower, items, histories)` gives the cosine score of every item for each history
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
    return {"shape": description["shape"], "eps": description["layer_norm_eps"], "w": load_file(f"{folder}/tower.safetensors")}


def _linear(w, name, x):
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _norm(w, name, x, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def shoppers(tower, adapted, histories):
    shape, w, eps = tower["shape"], tower["w"], tower["eps"]
    length = shape["history"]
    index = torch.zeros(len(histories), length, dtype=torch.long)
    valid = torch.zeros(len(histories), length, dtype=torch.bool)
    for row, history in enumerate(histories):
        tail = history[-length:]
        index[row, length - len(tail):] = torch.tensor(tail, dtype=torch.long)
        valid[row, length - len(tail):] = True
    sequence = adapted[index] * valid.unsqueeze(-1)
    # recency[0] weighs the most recent item (the last position).
    pooled = (sequence * (w["recency"].flip(0) * valid).unsqueeze(-1)).sum(1)
    if shape["layers"] == 0:
        return pooled
    b, heads = len(histories), shape["heads"]
    x = _linear(w, "input", sequence) + w["position"].unsqueeze(0)
    allowed = torch.ones(length, length, dtype=torch.bool).tril().unsqueeze(0) & valid.unsqueeze(1)
    allowed = (allowed | torch.eye(length, dtype=torch.bool).unsqueeze(0)).view(b, 1, length, length)
    width = shape["width"]
    for i in range(shape["layers"]):
        p = f"block{i}"
        q, k, v = _linear(w, f"{p}.qkv", _norm(w, f"{p}.attention_norm", x, eps)).chunk(3, -1)
        split = lambda t: t.view(b, length, heads, width // heads).transpose(1, 2)
        attended = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=allowed)
        x = x + _linear(w, f"{p}.attention_out", attended.transpose(1, 2).reshape(b, length, width))
        hidden = torch.nn.functional.gelu(_linear(w, f"{p}.mlp_in", _norm(w, f"{p}.mlp_norm", x, eps)))
        x = x + _linear(w, f"{p}.mlp_out", hidden)
    return pooled + x[:, -1] @ w["output"]


def scores(tower, items, histories):
    w = tower["w"]
    adapted = items + (items @ w["item_a"]) @ w["item_b"]
    normalise = lambda t: t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return normalise(shoppers(tower, adapted, histories)) @ normalise(adapted).T


def main():
    request = json.load(sys.stdin)
    tower = load(request["tower_dir"])
    items = torch.tensor(request["items"], dtype=torch.float32)
    with torch.no_grad():
        result = scores(tower, items, request["histories"])
    json.dump({"scores": result.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
