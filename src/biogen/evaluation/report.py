"""Tables and plots of a benchmark run: per-target means, group averages, the anchor check
and the verdict ML-vs-similarity.

Averages: a target's value is the mean over its repeats; a group's value (``DUD``,
``ChEMBL``, ``ChEMBL-I``, ``all``) is the mean over its targets (each target weighs the
same, as in the paper). The verdict compares scorers on the repeats every scorer ran
(``ml_repeats`` may be fewer than ``repeats``), so the comparison is paired.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from biogen.evaluation.data import target_groups
from biogen.evaluation.protocol import METRICS

GROUPS = ("DUD", "ChEMBL", "ChEMBL-I", "all")
# Published level (DATA.md; ECFP4 1024 bits, max fusion, Tanimoto): (group, n) -> AUROC
ANCHORS = {("DUD", 20): 0.96, ("ChEMBL-I", 20): 0.88, ("DUD", 5): 0.89, ("ChEMBL-I", 5): 0.76}
ANCHOR_TOLERANCE = 0.02
LABELS = {"auroc": "AUROC", "ef1": "EF1%", "ef5": "EF5%", "bedroc20": "BEDROC20"}


def per_target(rows: list[dict], max_repeat: int | None = None) -> list[dict]:
    """Mean of each metric over repeats per (dataset, target, scorer, n_queries)."""
    acc: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if max_repeat is None or r["repeat"] < max_repeat:
            acc[(r["dataset"], r["target"], r["scorer"], r["n_queries"])].append(r)
    out = []
    for (ds, t, s, n), rs in acc.items():
        row = {"dataset": ds, "target": t, "scorer": s, "n_queries": n, "repeats": len(rs)}
        row.update({m: float(np.mean([r[m] for r in rs])) for m in METRICS})
        out.append(row)
    return out


def group_means(targets: list[dict]) -> list[dict]:
    """Mean over targets per (group, scorer, n_queries)."""
    acc: dict[tuple, list[dict]] = defaultdict(list)
    for r in targets:
        for g in target_groups(r["dataset"], r["target"]):
            acc[(g, r["scorer"], r["n_queries"])].append(r)
    out = []
    for (g, s, n), rs in acc.items():
        row = {"group": g, "scorer": s, "n_queries": n, "targets": len(rs),
               "repeats": min(r["repeats"] for r in rs)}
        row.update({m: float(np.mean([r[m] for r in rs])) for m in METRICS})
        out.append(row)
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(out, key=lambda r: (order.get(r["group"], 99), r["n_queries"], r["scorer"]))


def anchors(summary: list[dict], scorer: str) -> list[dict]:
    """The published similarity level vs this run's ``scorer`` (ECFP4-1024 max fusion)."""
    got = {(r["group"], r["n_queries"]): r["auroc"] for r in summary if r["scorer"] == scorer}
    out = []
    for (g, n), ref in ANCHORS.items():
        if (g, n) in got:
            out.append({"group": g, "n_queries": n, "published_auroc": ref, "auroc": got[(g, n)],
                        "within_tolerance": abs(got[(g, n)] - ref) <= ANCHOR_TOLERANCE})
    return out


def verdict(paired: list[dict], similarity: set[str], trained: set[str], group: str = "all") -> list[dict]:
    """Per n: the best similarity AUROC and EF1% (any similarity scorer) and, per trained
    scorer, whether it beats both on the same repeats."""
    out = []
    for n in sorted({r["n_queries"] for r in paired}):
        rows = [r for r in paired if r["group"] == group and r["n_queries"] == n]
        sim = [r for r in rows if r["scorer"] in similarity]
        if not sim:
            continue
        best_auc = max(sim, key=lambda r: r["auroc"])
        best_ef = max(sim, key=lambda r: r["ef1"])
        for r in rows:
            if r["scorer"] in trained:
                out.append({"group": group, "n_queries": n, "scorer": r["scorer"], "auroc": r["auroc"],
                            "ef1": r["ef1"], "best_sim_auroc": best_auc["auroc"],
                            "best_sim_auroc_scorer": best_auc["scorer"], "best_sim_ef1": best_ef["ef1"],
                            "best_sim_ef1_scorer": best_ef["scorer"],
                            "beats": r["auroc"] > best_auc["auroc"] and r["ef1"] > best_ef["ef1"]})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def markdown(summary: list[dict], anchor_rows: list[dict], verdict_rows: list[dict], scorers: list[str],
             header: str = "") -> str:
    """Markdown: one table per group (rows scorer x n), the anchor check and the verdict."""
    lines = [header] if header else []
    for g in GROUPS:
        rows = [r for r in summary if r["group"] == g]
        if not rows:
            continue
        ns = sorted({r["n_queries"] for r in rows})
        lines.append(f"\n### {g} ({rows[0]['targets']} targets): mean over targets of the mean over repeats\n")
        head = "| scorer | repeats | " + " | ".join(f"{LABELS[m]} n={n}" for m in ("auroc", "ef1", "bedroc20") for n in ns) + " |"
        lines += [head, "|" + "---|" * (2 + 3 * len(ns))]
        by = {(r["scorer"], r["n_queries"]): r for r in rows}
        for s in scorers:
            if (s, ns[0]) not in by:
                continue
            cells = []
            for m in ("auroc", "ef1", "bedroc20"):
                for n in ns:
                    v = by.get((s, n), {}).get(m)
                    cells.append("" if v is None else (f"{v:.3f}" if m != "ef1" else f"{v:.1f}"))
            lines.append(f"| {s} | {by[(s, ns[0])]['repeats']} | " + " | ".join(cells) + " |")
    if anchor_rows:
        lines.append("\n### Published similarity level (ECFP4 1024 bits, max fusion)\n")
        lines += ["| group | n | published AUROC | this run | within +-0.02 |", "|---|---|---|---|---|"]
        lines += [f"| {a['group']} | {a['n_queries']} | {a['published_auroc']:.2f} | {a['auroc']:.3f} | "
                  f"{'yes' if a['within_tolerance'] else 'NO'} |" for a in anchor_rows]
    if verdict_rows:
        lines.append("\n### Trained scorers vs the best similarity scorer (all targets, paired repeats)\n")
        lines += ["| n | scorer | AUROC | EF1% | best similarity AUROC | best similarity EF1% | beats both |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {v['n_queries']} | {v['scorer']} | {v['auroc']:.3f} | {v['ef1']:.1f} | "
                  f"{v['best_sim_auroc']:.3f} ({v['best_sim_auroc_scorer']}) | {v['best_sim_ef1']:.1f} "
                  f"({v['best_sim_ef1_scorer']}) | {'yes' if v['beats'] else 'no'} |" for v in verdict_rows]
    return "\n".join(lines) + "\n"


def plot_summary(path: Path, summary: list[dict], scorers: list[str], trained: set[str]) -> None:
    """AUROC and EF1% vs number of queries, one panel per group and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUPS if any(r["group"] == g for r in summary)]
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 8.5), squeeze=False)
    for j, g in enumerate(groups):
        for i, m in enumerate(("auroc", "ef1")):
            ax = axes[i][j]
            for k, s in enumerate(scorers):
                pts = sorted((r["n_queries"], r[m]) for r in summary if r["group"] == g and r["scorer"] == s)
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, marker="o", ls="--" if s in trained else "-", label=s,
                            color=plt.cm.tab20(k % 20))
            ax.set_title(f"{g}: {LABELS[m]}")
            ax.set_xlabel("query actives")
            ax.set_xticks(sorted({r["n_queries"] for r in summary}))
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
               title="solid: similarity, dashed: trained on the queries + training decoys")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_targets(path: Path, targets: list[dict], x_scorer: str, y_scorer: str, n: int) -> None:
    """Per-target AUROC and EF1% of two scorers (one point per target) at ``n`` queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["dataset"], r["target"], r["scorer"]): r for r in targets if r["n_queries"] == n}
    keys = sorted({(d, t) for d, t, _ in by})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, m in zip(axes, ("auroc", "ef1")):
        for ds, color in (("DUD", "tab:blue"), ("ChEMBL", "tab:orange")):
            pts = [(by[(d, t, x_scorer)][m], by[(d, t, y_scorer)][m]) for d, t in keys
                   if d == ds and (d, t, x_scorer) in by and (d, t, y_scorer) in by]
            if pts:
                ax.scatter(*zip(*pts), s=14, color=color, label=ds, alpha=0.8)
        lo, hi = ax.get_xlim()
        lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlabel(f"{x_scorer} {LABELS[m]}")
        ax.set_ylabel(f"{y_scorer} {LABELS[m]}")
        ax.set_title(f"per target, n={n}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
