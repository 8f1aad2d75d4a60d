"""How repeatable is the final score the search score is asked to predict? (issue 12)

    python bench/fidelity_compare.py bench/results/fidelity_medium.json bench/results/fidelity_medium_seed1.json \
        --out bench/results/fidelity_medium_seeds

Two ``bench/fidelity.py`` results over the same candidates, distilled with different distill seeds
(``--trials-from`` the first, ``--set distill.seed=1``): Kendall tau (``scipy.stats``) between the two
final dev scores (the ceiling for any search score against one seed's final score), and of the default
search score against each seed's and against their mean. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in (args.first, args.second)]
    pairs = [{q["trial"]: q for q in r["fidelity"]["pairs"]} for r in runs]
    common = sorted(set(pairs[0]) & set(pairs[1]))
    finals = [np.array([pp[t]["final_score"] for t in common]) for pp in pairs]
    score = np.array([pairs[0][t]["search_score"] for t in common])
    seeds = [r["fidelity"]["distill_plan"].get("seed") for r in runs]

    def tau(x, y):
        res = stats.kendalltau(x, y)
        return {"tau": float(res.statistic), "p": float(res.pvalue)}

    data = {
        "runs": [args.first, args.second], "distill_seeds": seeds, "candidates": len(common),
        "final_vs_final": tau(finals[0], finals[1]),
        "search_vs_final": [tau(score, f) for f in finals],
        "search_vs_mean_final": tau(score, (finals[0] + finals[1]) / 2),
        "final_abs_difference": {"mean": float(np.mean(np.abs(finals[0] - finals[1]))),
                                 "max": float(np.max(np.abs(finals[0] - finals[1])))},
        "pairs": [{"trial": t, "search_score": float(s), "final_scores": [float(f[i]) for f in finals]}
                  for i, (t, s) in enumerate(zip(common, score))],
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    ff, sm = data["final_vs_final"], data["search_vs_mean_final"]
    lines = [f"# Final-score repeatability over distill seeds {seeds} ({len(common)} candidates)", "",
             "| pair | Kendall tau | p |", "|---|---:|---:|",
             f"| final dev score, seed {seeds[0]} vs seed {seeds[1]} (the ceiling) | {ff['tau']:.3f} | {ff['p']:.3f} |"]
    lines += [f"| search score (default) vs final, seed {s} | {r['tau']:.3f} | {r['p']:.3f} |"
              for s, r in zip(seeds, data["search_vs_final"])]
    lines += [f"| search score (default) vs the mean of both finals | {sm['tau']:.3f} | {sm['p']:.3f} |", "",
              f"Final dev scores of the same arch differ between the two seeds by {data['final_abs_difference']['mean']:.4f} "
              f"on average (max {data['final_abs_difference']['max']:.4f}).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
