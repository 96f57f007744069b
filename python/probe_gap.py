"""Where two exported towers differ: a research tool, not part of Guild.

Scores two towers exported by `guild-sim run --keep-adapters` (or `guild-coordinator
export-adapter`) with `rank_with_tower.py` on the probes' 4,000 validation users (each
history less its last item, that item the target, the history masked; as
`probe_transitions.py` samples them) and splits the difference in NDCG@10 by the target's
popularity (how often it occurs in the users' training histories) and by whether the target
is among the first tower's decoded neighbours of the history's last item (the item-to-item
counts cover it).

Usage (about a minute on one core):

    python3 python/probe_gap.py --data ../shared/data/amazon-games \\
        --items .cache/items-<hash>-Games-6k-16859-96.safetensors \\
        --towers "OUT/adapters/centralised (non-private)/v0" "OUT/adapters/federated (non-private)/v0"

Measured (2026-12-07, the default scenario's centralised and federated towers of one run,
`probe_spectral.py`'s; centralised 0.0837, federated 0.0749, a gap of 0.0087):

| target | users | centralised | federated | share of the gap |
|---|---|---|---|---|
| occurs at most 5 times (4 of them never) | 279 | 0.0064 | 0.0168 | −8% |
| 6 to 20 | 973 | 0.0266 | 0.0305 | −11% |
| 21 to 60 | 1,146 | 0.0495 | 0.0457 | 12% |
| 61 to 200 | 1,122 | 0.0999 | 0.0808 | 61% |
| over 200 | 480 | 0.2879 | 0.2547 | 46% |
| among the last item's 64 neighbours | 470 | 0.4454 | 0.4661 | −28% |
| not among them | 3,530 | 0.0355 | 0.0229 | 128% |

The federated tower is ahead on rare targets and on those the counts cover; its whole gap is
popular items the last item's neighbours do not name, which the centralised tower learned
to rank from its item-ID rows and transformer and the federated one did not.
"""
import numpy as np
import torch

import probe_transitions as pt
import rank_with_tower as rtw
from probe_spectral import ndcg_gains, tower_ranks

BUCKETS = [(0, 5), (5, 20), (20, 60), (60, 200), (200, None)]


def main():
    a_ = pt.data_arguments()
    a_.add_argument("--towers", nargs=2, required=True, metavar=("FIRST", "SECOND"))
    args = a_.parse_args()
    n, users = pt.load(args.data)
    items = torch.tensor(pt.unit_items(args.items))
    sample = pt.evaluation_sample(users)
    popularity = np.zeros(n)
    for h in users:
        np.add.at(popularity, h[:-1], 1)
    histories = [users[u][:-1] for u in sample]
    targets = [users[u][-1] for u in sample]
    tower, other = (rtw.load(f) for f in args.towers)
    a, b = (ndcg_gains(tower_ranks(t, items, histories, targets)[0]) for t in (tower, other))
    gap = (a - b).sum()
    print(f"all {len(sample)} users: first {a.mean():.4f}, second {b.mean():.4f}, gap {a.mean() - b.mean():.4f}")
    popular = np.array([popularity[t] for t in targets])
    for lo, hi in BUCKETS:
        # The first bucket keeps the targets no training history holds.
        m = ((popular > lo) | (lo == 0)) & (popular <= (hi if hi is not None else np.inf))
        print(f"target occurs in {'[' if lo == 0 else '('}{lo}, {hi}] histories: {m.sum()} users, first {a[m].mean():.4f}, "
              f"second {b[m].mean():.4f}, share of the gap {(a[m] - b[m]).sum() / gap:.0%}")
    if "sketch_neighbours" in tower["w"]:
        neighbours = tower["w"]["sketch_neighbours"].long().numpy()
        covered = np.array([len(users[u]) > 1 and users[u][-1] in set(neighbours[users[u][-2]]) for u in sample])
        for name, m in (("among the last item's neighbours", covered), ("not among them", ~covered)):
            print(f"target {name}: {m.sum()} users, first {a[m].mean():.4f}, second {b[m].mean():.4f}, "
                  f"share of the gap {(a[m] - b[m]).sum() / gap:.0%}")


if __name__ == "__main__":
    main()
