"""``biogen <group> <job> key=value ...``: one console command, one Hydra app per job."""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from biogen.errors import BiogenError

# (words) -> (config name, "module:function", one-line description)
JOBS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("library", "build"): ("library_build", "biogen.cli.library:build",
                           "build a compound library from SMILES/CSV/SDF deposit files"),
    ("library", "append"): ("library_append", "biogen.cli.library:append",
                            "add a new deposit to a library (dedupe against what exists)"),
    ("library", "info"): ("library_info", "biogen.cli.library:info",
                          "counts, parameters, size and history of a library"),
    ("library", "verify"): ("library_verify", "biogen.cli.library:verify",
                            "re-hash every shard; exit 1 naming any corrupted shard"),
    ("library", "merge"): ("library_merge", "biogen.cli.library:merge",
                           "merge libraries built from pieces of one input (array jobs) into one"),
    ("library", "embed"): ("library_embed", "biogen.cli.library:embed",
                           "store compound embeddings (MiniMol) for every library row, resumable"),
    ("search",): ("search", "biogen.cli.search:search",
                  "similarity (top-k, threshold) or substructure search of a library"),
    ("screen",): ("screen", "biogen.cli.screen:screen",
                  "virtual screen: filters, similarity + QSAR scoring, fusion, diverse hits, report"),
    ("train",): ("train", "biogen.cli.train:train",
                 "train a Lightning QSAR model (fingerprint MLP) for screening"),
    ("embed",): ("embed", "biogen.cli.embed:embed",
                 "protein language model (ESM-2) embeddings of a FASTA set, resumable"),
    ("embed", "merge"): ("embed_merge", "biogen.cli.embed:merge",
                         "merge embedding stores of pieces of one FASTA set (array jobs) into one"),
    ("embed-search",): ("embed_search", "biogen.cli.embed:embed_search",
                        "cosine top-k of query proteins against an embedding store"),
    ("evaluate",): ("evaluate", "biogen.cli.evaluate:evaluate",
                    "Riniker-Landrum virtual-screening benchmark: similarity and QSAR scoring"),
    ("evaluate", "dti"): ("evaluate_dti", "biogen.cli.evaluate_dti:evaluate_dti",
                          "drug-target model on unseen proteins/compounds: what the protein model adds"),
}

USAGE = """usage: biogen <job> [key=value ...] [--help] [--cfg job] [-m]

biogen: compound library precompute, similarity search, protein embedding and virtual
screening on CPUs, CUDA GPUs and Ray clusters. Every job is a Hydra app: override any
config key with key=value, see the config with --cfg job, the options with --help,
sweep with -m. Each run writes its composed config and log to its run directory
(biogen_runs/<job>/<time>/, or $BIOGEN_RUNS_DIR).

jobs:
{jobs}
  biogen status <dir>{pad}  progress, failures and ETA of a job (from its ledger)

example: biogen library build input=deposit.sdf.gz output=mylib
"""


def _usage(prefix: tuple[str, ...] = ()) -> str:
    rows = [(" ".join(w), d) for w, (_, _, d) in JOBS.items() if w[: len(prefix)] == prefix]
    width = max(len(w) for w, _ in rows)
    return USAGE.format(jobs="\n".join(f"  biogen {w:<{width}}  {d}" for w, d in rows),
                        pad=" " * max(0, width - len("status <dir>")))


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    from biogen.datasets import dataset_path

    if not OmegaConf.has_resolver("dataset"):
        OmegaConf.register_new_resolver("dataset", dataset_path)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _user_error(exc: BaseException) -> BiogenError | None:
    """The ``BiogenError`` behind ``exc`` (OmegaConf wraps errors raised by resolvers)."""
    from pathlib import Path

    from biogen.runtime.ledger import is_storage_error, storage_error

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BiogenError):
            return exc
        if is_storage_error(exc):
            return storage_error(Path(exc.filename or "the output directory"), exc)  # full disk, quota
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


LITERAL_KEYS = ("query",)  # values taken verbatim: SMILES/SMARTS hold = ( ) [ ] , that Hydra parses


def quote_literals(argv: list[str]) -> list[str]:
    """Quote ``query=<SMILES or SMARTS>`` for Hydra's override grammar (already quoted: kept)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in LITERAL_KEYS and value and value[0] not in "'\"":
            # Hydra: inside quotes a backslash is literal unless it precedes a quote
            body = value.replace("'", "\\'")
            tail = len(body) - len(body.rstrip("\\"))
            value = "'" + body + "\\" * tail + "'"
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the key=value overrides, so that flags can go
    first: Hydra's parser takes no override after a flag (``biogen screen -m a=1,2 b=3``)."""
    flags, overrides = [], []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg.startswith("-"):  # an override never starts with "-" (~key deletes, +key adds)
            flags.append(arg)
            if arg in HYDRA_VALUE_FLAGS and i + 1 < len(argv) and "=" not in argv[i + 1] \
                    and not argv[i + 1].startswith("-"):
                flags.append(argv[i + 1])
                next(it, None)
        else:
            overrides.append(arg)
    return flags, overrides


def job_overrides(config_name: str) -> list[str]:
    """Hydra overrides every run of a job needs: its own config groups' folder on the search path.

    A job's groups live in ``configs/<job>/`` (e.g. ``configs/screen/library/``), not at the
    root, so that a group name of one job (the screen's ``library`` group) does not turn the
    same key of another job (``biogen search library=mylib``) into a group override.
    ``$BIOGEN_CONFIG_DIR`` (site settings: ``local/default.yaml``) is searched too.
    """
    from biogen.resources import config_dir

    groups = config_dir() / config_name
    paths = [str(groups)] if groups.is_dir() else []
    site = os.environ.get("BIOGEN_CONFIG_DIR")  # site settings (local/default.yaml) outside the package
    if site:
        paths.append(str(Path(site).expanduser().absolute()))
    return [f"hydra.searchpath=[{','.join(f'file://{p}' for p in paths)}]"] if paths else []


def unknown_key_hint(config_name: str, overrides: list[str]) -> str | None:
    """If ``overrides`` name a key the config does not have, a message listing the valid keys
    of that level (Hydra's own message names only the unknown key); else None."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from biogen.resources import config_dir

    plain = [o for o in overrides if not o.startswith(("-", "hydra.", "+", "~"))]
    if not plain:
        return None
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            compose(config_name=config_name, overrides=[*job_overrides(config_name), *plain])
        return None
    except Exception as exc:
        seen, cause = set(), exc
        while cause is not None and not isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        full_key = getattr(cause, "full_key", None) if cause is not None else None
        if not full_key:
            return None
    parent = str(full_key).rpartition(".")[0]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            base = compose(config_name=config_name, overrides=job_overrides(config_name))
        node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(str(k) for k in node.keys() if k != "_target_") if OmegaConf.is_dict(node) else []
    except Exception:
        return None
    where = f"'{parent}'" if parent else "the top level"
    return (f"{full_key!r} is not a setting of biogen {config_name.replace('_', ' ')}; valid keys at {where}: "
            f"{', '.join(valid)} (see --help)")


def run_job(words: tuple[str, ...], argv: list[str]) -> None:
    import hydra

    from biogen.resources import config_dir

    config_name, target, _ = JOBS[words]
    module, func = target.split(":")
    task: Callable = getattr(importlib.import_module(module), func)
    _register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def _app(cfg) -> None:
        try:
            task(cfg)
        except Exception as raised:
            exc = _user_error(raised)
            if exc is None:
                raise
            logging.getLogger("biogen").error("%s", exc)
            if _multirun():
                raise exc from None  # Hydra runs the sweep's other jobs, then reports this one
            print(f"biogen {' '.join(words)}: error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)

    argv = quote_literals(argv)
    if not any(a in ("-m", "--multirun") or a.startswith("--") for a in argv):
        hint = unknown_key_hint(config_name, argv)
        if hint:
            print(f"biogen {' '.join(words)}: error: {hint}", file=sys.stderr)
            sys.exit(2)
    from biogen.runtime import ledger

    ledger.COMMAND = shlex.join(["biogen", *words, *argv])  # recorded in the job's ledger for `biogen status`
    flags, overrides = split_flags(argv)
    sys.argv = [f"biogen-{'-'.join(words)}", *flags, *job_overrides(config_name), *overrides]
    _app()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        from biogen.cli.status import main as status_main

        status_main(argv[1:])
        return
    words: tuple[str, ...] = ()
    while argv and not argv[0].startswith("-") and "=" not in argv[0] and words + (argv[0],) in {
        w[: len(words) + 1] for w in JOBS
    }:
        words += (argv.pop(0),)
    if words in JOBS:
        run_job(words, argv)
        return
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(words))
        return
    print(f"biogen: unknown job {' '.join(words + (argv[0],))!r}\n", file=sys.stderr)
    print(_usage(words), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
