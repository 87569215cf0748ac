"""The Riniker & Landrum virtual-screening benchmark: data loader, protocol, scorers, report.

``data``: targets and molecules of ``vs-benchmark`` (valence policy); ``scorers``:
similarity fusion and trained scorers; ``protocol``: seeded query draws and metrics per
target; ``runner``: one resumable shard per target (Ray); ``report``: tables and plots.
"""

from biogen.evaluation.data import CompoundList, list_targets, load_list, parse_smiles, target_files
from biogen.evaluation.protocol import ProtocolSpec, draw_split, evaluate_target
from biogen.evaluation.runner import RunResult, run_benchmark
from biogen.evaluation.scorers import (LogisticScorer, MLPScorer, NaiveBayesScorer, QuerySimilarityScorer,
                                       NamedScorer, RankFusionScorer, Split, TargetContext)

__all__ = ["CompoundList", "LogisticScorer", "MLPScorer", "NaiveBayesScorer", "ProtocolSpec",
           "NamedScorer", "QuerySimilarityScorer", "RankFusionScorer", "RunResult", "Split", "TargetContext",
           "draw_split", "evaluate_target", "list_targets", "load_list", "parse_smiles", "run_benchmark",
           "target_files"]
