"""Reference sentence embeddings from Hugging Face transformers (and peft).

Reads a JSON object from stdin: {"model_dir": ..., "sentences": [...], "max_tokens": N,
"adapter_dir": optional PEFT adapter folder}. Prints {"embeddings": [[...], ...]}: mean
pooling over the attention mask, then L2 normalisation, as sentence-transformers'
all-MiniLM-L6-v2 does. Used by the test suite as the parity oracle.
"""

import json
import sys

import torch
from transformers import AutoModel, AutoTokenizer


def main() -> None:
    request = json.load(sys.stdin)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    model = AutoModel.from_pretrained(request["model_dir"], attn_implementation="eager")
    if request.get("adapter_dir"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, request["adapter_dir"])
    model.eval()
    batch = tokenizer(
        request["sentences"],
        padding=True,
        truncation=True,
        max_length=request["max_tokens"],
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    json.dump({"embeddings": pooled.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
