"""The same training step as Guild's, in PyTorch + PEFT, for a throughput comparison.

MiniLM-L6 with LoRA r=8 (alpha 16) on query and value, lora_A frozen (FFA-LoRA), batch of
32 queries of the last 5 titles (most recent first, at most 96 tokens) from the real
data, in-batch softmax (τ = 0.05) against precomputed item embeddings, AdamW. Prints one
JSON object with examples per second.
"""

import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer


def main() -> None:
    model_dir, data_dir = sys.argv[1], sys.argv[2]
    steps, batch = 10, 32
    torch.manual_seed(0)
    titles = {}
    with open(f"{data_dir}/Games-6k.item") as f:
        next(f)
        for line in f:
            item, title = line.rstrip("\n").split("\t", 1)
            titles[item] = title
    queries, targets = [], []
    with open(f"{data_dir}/Games-6k.test.inter") as f:
        next(f)
        for line in f:
            _, history, _ = line.rstrip("\n").split("\t")
            h = history.split(" ")
            if len(h) >= 3:
                queries.append(" ; ".join(titles[i] for i in reversed(h[:-1][-5:])))
                targets.append(titles[h[-1]])
            if len(queries) >= batch * (steps + 2):
                break
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Guild trains without dropout: switch it off here too, so both do the same work.
    base = AutoModel.from_pretrained(model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    def embed(texts):
        b = tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)

    with torch.no_grad():
        items = embed(targets).detach()

    def step(i):
        q = embed(queries[i * batch:(i + 1) * batch])
        logits = q @ items[i * batch:(i + 1) * batch].T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)  # warm-up
    step(1)
    start = time.perf_counter()
    for i in range(2, steps + 2):
        step(i)
    elapsed = time.perf_counter() - start
    json.dump({"implementation": "pytorch+peft", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "steps": steps, "batch": batch, "examples_per_second": steps * batch / elapsed}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
