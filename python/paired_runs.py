"""Paired comparison of the same arms in two runs of a scenario: a research tool, not part
of Guild.

Two runs of the same scenario score the same evaluation users in the same order, so an
arm's per-user NDCG@10 in one run pairs with its own in the other. Prints, for each arm in
both, the mean difference (new − old) with a 95% percentile interval from 1,000 paired
bootstrap resamples (seed 20221).

Usage (the README's comparison of the runs of 2026-12-03 and 2026-12-04):

    python3 python/paired_runs.py docs/results/default/results.json \\
        docs/results/default/results-2026-12-03b.json

With `--against ARM` and one results file, every arm of that run is compared with ARM of
the same run instead (the README's shopper-level arms against the noiseless selection):

    python3 python/paired_runs.py docs/results/shopper/results.json \\
        --against "statistics + selection, no noise (non-private)"
"""
import json
import math
import random
import sys


def ndcg(rank):
    return 1 / math.log2(rank + 1) if rank <= 10 else 0.0


def per_user(arm):
    ranks = arm["test_ranks"]
    return [sum(ndcg(r[u]) for r in ranks) / len(ranks) for u in range(len(ranks[0]))]


def main():
    if len(sys.argv) == 4 and sys.argv[2] == "--against":
        new = json.load(open(sys.argv[1]))
        reference = next(a for a in new["arms"] if a["arm"] == sys.argv[3])
        pairs = [(a, reference) for a in new["arms"] if a.get("test_ranks") and a is not reference]
    else:
        new, old = (json.load(open(path)) for path in sys.argv[1:3])
        before = {a["arm"]: a for a in old["arms"] if a.get("test_ranks")}
        pairs = [(a, before[a["arm"]]) for a in new["arms"] if a.get("test_ranks") and a["arm"] in before]
    for arm, other in pairs:
        x, y = per_user(arm), per_user(other)
        if len(x) != len(y):
            continue
        n = len(x)
        d = [a - b for a, b in zip(x, y)]
        rng = random.Random(20221)
        means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(1000))
        print(f"{arm['arm']}: {sum(d) / n:+.4f} [{means[25]:+.4f}, {means[974]:+.4f}]")


if __name__ == "__main__":
    main()
