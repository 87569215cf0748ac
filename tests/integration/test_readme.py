"""The README's quick start stays true: two commands, the second is what CI runs, and the
default main job's configuration resolves to real, installed data."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_two_commands_and_ci_runs_the_second():
    cmds = quick_start_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("python3 -m venv .venv") and cmds[0].endswith("biogen library build")
    assert "pip install torch==2.13.0 &&" in cmds[0] and "pip install torch==2.13.0 &&" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def test_default_main_job_resolves_to_packaged_moses(tmp_path):
    p = subprocess.run([sys.executable, "-m", "biogen.cli.main", "library", "build", "--cfg", "job", "--resolve"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    m = re.search(r"^input: (.+)$", p.stdout, re.M)
    assert m and m.group(1).endswith("moses/dataset/data/test.csv.gz") and Path(m.group(1)).is_file()
    assert "output: default_library" in p.stdout
