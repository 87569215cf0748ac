"""The README's quick start stays true: two commands, the second is what CI runs, and the
default main job's configuration resolves to real, installed data."""

import re
from pathlib import Path

from tests_support import run_biogen

ROOT = Path(__file__).resolve().parents[2]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_two_commands_and_ci_runs_the_second():
    cmds = quick_start_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("python3 -m venv .venv") and cmds[0].endswith("biogen screen")
    assert "pip install torch==2.13.0 &&" in cmds[0] and "pip install torch==2.13.0 &&" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def test_default_main_job_is_the_packaged_thrombin_screen(tmp_path, moleculeace):
    p = run_biogen("screen", "--cfg", "job", "--resolve", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^  preset: moses_test_actives$", p.stdout, re.M)
    assert re.search(r"^  base: moses_test$", p.stdout, re.M)
    assert re.search(r"^  moleculeace: CHEMBL204_Ki$", p.stdout, re.M)
    from biogen.datasets import dataset_path, load_moleculeace

    assert Path(dataset_path("moses_test")).is_file()  # the packaged data the preset is built from
    assert len(load_moleculeace("CHEMBL204_Ki").subset("test")) == 553


def test_library_build_default_resolves_to_packaged_moses(tmp_path):
    p = run_biogen("library", "build", "--cfg", "job", "--resolve", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    m = re.search(r"^input: (.+)$", p.stdout, re.M)
    assert m and m.group(1).endswith("moses/dataset/data/test.csv.gz") and Path(m.group(1)).is_file()
    assert "output: default_library" in p.stdout
