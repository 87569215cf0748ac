"""Hydra task of ``biogen evaluate``: config -> typed objects -> benchmark run -> tables, plots."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import platform
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biogen.cli.config import from_config
from biogen.errors import ConfigError

log = logging.getLogger("biogen")


def _scorers(cfg: DictConfig):
    """The scorers named in ``scorers``, each built from its ``scorer_catalog`` entry (its
    ``_target_``; a fusion's members are other entries, by interpolation)."""
    from biogen.evaluation.scorers import NamedScorer

    names = list(cfg.scorers)
    unknown = [n for n in names if n not in cfg.scorer_catalog]
    if unknown:
        raise ConfigError(f"scorers {unknown} are not in scorer_catalog; valid: {', '.join(cfg.scorer_catalog)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"scorers={names} lists a scorer twice")
    return [NamedScorer(n, from_config(cfg.scorer_catalog[n], f"scorer_catalog.{n}")) for n in names]


def evaluate(cfg: DictConfig) -> None:
    from biogen.evaluation.data import check_root
    from biogen.evaluation.protocol import ProtocolSpec
    from biogen.evaluation.runner import run_benchmark

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out = Path(cfg.output) if cfg.output is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    root = check_root(str(cfg.data_dir))
    runtime = from_config(cfg.runtime, "runtime")
    specs = {name: from_config(d, f"fingerprints.{name}") for name, d in cfg.fingerprints.items()}
    scorers = _scorers(cfg)
    protocol = ProtocolSpec(n_queries=tuple(int(n) for n in cfg.n_queries), repeats=int(cfg.repeats),
                            seed=int(cfg.seed), decoy_fraction=float(cfg.decoy_fraction),
                            ml_repeats=None if cfg.ml_repeats is None else int(cfg.ml_repeats))
    used = {getattr(m, "fingerprint", None) for s in scorers
            for m in (getattr(s.scorer, "members", None) or (s.scorer,))}
    specs = {k: v for k, v in specs.items() if k in used}
    missing = sorted(f for f in used if f not in specs and f is not None)
    if missing:
        raise ConfigError(f"scorers use fingerprints {missing} not defined under fingerprints; defined: "
                          f"{', '.join(cfg.fingerprints)}")
    targets = None if cfg.targets is None else [str(t) for t in cfg.targets]
    key_params = {"specs": {k: v.to_dict() for k, v in specs.items()}, "scorers": [repr(s) for s in scorers],
                  "protocol": repr(protocol), "invalid": str(cfg.invalid)}
    log.info("evaluate: %s, %d scorer(s), n=%s, %d repeats -> %s", list(cfg.datasets), len(scorers),
             list(protocol.n_queries), protocol.repeats, out)
    result = run_benchmark(root, out, datasets=[str(d) for d in cfg.datasets], targets=targets, specs=specs,
                           scorers=scorers, protocol=protocol, runtime=runtime, invalid=str(cfg.invalid),
                           key_params=key_params)
    _write_results(cfg, out, result, scorers, protocol)


def _write_results(cfg: DictConfig, out: Path, result, scorers: list, protocol) -> None:
    """Repeats, notes, per-target and summary tables, the Markdown report, plots and JSON."""
    from biogen.evaluation import report as rep
    from biogen.evaluation.runner import NOTE_FIELDS, ROW_FIELDS

    names = [s.name for s in scorers]
    trained = {s.name for s in scorers if s.uses_decoys}
    similarity = set(names) - trained
    prefix = str(cfg.prefix)
    with gzip.open(out / f"{prefix}-repeats.csv.gz", "wt", newline="") as fh:
        w = csv.DictWriter(fh, ROW_FIELDS)
        w.writeheader()
        w.writerows(result.rows)
    with open(out / "notes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, NOTE_FIELDS)
        w.writeheader()
        w.writerows(result.notes)
    targets_tab = rep.per_target(result.rows)
    summary = rep.group_means(targets_tab)
    paired_n = protocol.ml_repeats if trained and protocol.ml_repeats else None
    paired = rep.group_means(rep.per_target(result.rows, paired_n))
    anchor_rows = rep.anchors(summary, str(cfg.anchor_scorer))
    verdict_rows = rep.verdict(paired, similarity, trained)
    rep.write_csv(out / f"{prefix}-targets.csv", targets_tab)
    rep.write_csv(out / f"{prefix}-summary.csv", summary)
    counts = {}
    for n in result.notes:
        counts[n["status"]] = counts.get(n["status"], 0) + 1
    shard_s = sum(r.get("featurize_s", 0) + r.get("evaluate_s", 0) for r in result.targets.values())
    header = (f"## biogen evaluate: {', '.join(cfg.datasets)}; n_queries={list(protocol.n_queries)}; "
              f"repeats={protocol.repeats} (trained scorers: {protocol.ml_repeats or protocol.repeats}); "
              f"training decoys {protocol.decoy_fraction:.0%} (drawn every repeat, ranked by no scorer); "
              f"SMILES kept by partial sanitization: {counts.get('partial', 0)}, rejected: {counts.get('rejected', 0)}; "
              f"wall time {result.seconds:.0f} s (this invocation; targets already in the ledger are not rerun); "
              f"shard seconds summed over targets: {shard_s:.0f} s")
    (out / f"{prefix}.md").write_text(rep.markdown(summary, anchor_rows, verdict_rows, names, header))
    rep.plot_summary(out / f"{prefix}-summary.png", summary, names, trained)
    best_trained = max((v for v in verdict_rows if v["n_queries"] == max(protocol.n_queries)),
                       key=lambda v: v["auroc"], default=None)
    if best_trained is not None and str(cfg.anchor_scorer) in names:
        rep.plot_targets(out / f"{prefix}-targets.png", targets_tab, str(cfg.anchor_scorer),
                         best_trained["scorer"], max(protocol.n_queries))
    from rdkit import __version__ as rdkit_version

    report = {"config": OmegaConf.to_container(cfg, resolve=True), "seconds": round(result.seconds, 1),
              "targets": len(result.targets), "rows": len(result.rows), "notes": counts,
              "anchors": anchor_rows, "verdict": verdict_rows,
              "versions": {"rdkit": rdkit_version, "python": platform.python_version()},
              "per_target": result.targets}
    (out / f"{prefix}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for a in anchor_rows:
        log.info("anchor %s n=%d: AUROC %.3f (published %.2f)%s", a["group"], a["n_queries"], a["auroc"],
                 a["published_auroc"], "" if a["within_tolerance"] else " OUTSIDE +-0.02")
    log.info("%d targets, %d rows in %.0f s -> %s", len(result.targets), len(result.rows), result.seconds, out)
