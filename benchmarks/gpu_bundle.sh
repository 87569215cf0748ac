#!/usr/bin/env bash
# Build the offline bundle that benchmarks/gpu_suite.py needs on a CUDA node with no network
# access. The node is expected to have Python 3.12 with a CUDA build of PyTorch, CuPy
# (cupy-cuda12x or -13x), numba, pyarrow, scipy, scikit-learn, pandas, psutil, tqdm,
# matplotlib, pytest, transformers and Lightning (an NGC PyTorch image or similar).
# Into two git-ignored folders of the project root:
#   .whl/      wheels for cp312 x86-64 that such a node lacks: rdkit, hydra-core, omegaconf, the
#              antlr4 runtime (built: sdist only), fair-esm, MoleculeACE (its data), and FPSim2 with
#              PyTables (the CUDA anchor of the similarity benchmark): fpsim2, tables, blosc2,
#              numexpr, ndindex, platformdirs. Ray is left out (its wheel alone is about 79 MB): the suite runs
#              without it. biogen itself runs from the checkout (PYTHONPATH=src).
#   .devdata/  moses_train.csv.gz, moses_test.csv.gz (MOSES, from the molsets package, whose
#              50 MB wheel is larger than the rest together), found on the node through
#              BIOGEN_DATA_DIR, and uniprot_4k.fasta.gz: every 5th of the 20,000 UniProt proteins
#              of Debian's mmseqs2-examples (the whole file would not fit in a 64 MiB bundle).
# About 58 MiB with the checkout. Usage, from the project root, with the project's virtual
# environment active (molsets installed; mmseqs2-examples installed by apt):
#   benchmarks/gpu_bundle.sh
# On the node, from the project root (benchmarks/gpu_suite.py --help says more):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:src BIOGEN_DATA_DIR=$PWD/.devdata python3 benchmarks/gpu_suite.py --out gpu-out
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
for d in .whl .devdata; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
rm -rf .whl .devdata && mkdir -p .whl .devdata
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl "${BIOGEN_RDKIT:-rdkit==2026.9.1}" hydra-core==1.3.2 omegaconf==2.3.0 \
  fair-esm==2.0.0 MoleculeACE==3.0.0 fpsim2==0.7.4 tables==3.11.1 blosc2==3.12.2 numexpr==2.14.2 \
  ndindex==1.10.1 platformdirs==4.14.9 2>&1 | grep -v 'is ignored' || true
# antlr4-python3-runtime 4.9.3 (hydra's parser) exists only as an sdist: build its pure wheel.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 2>&1 | grep -v 'is ignored' || true
python3 - <<'PY'
import gzip, importlib.metadata as md, shutil, pathlib
out = pathlib.Path(".devdata")
d = md.distribution("molsets")
for name in ("train", "test"):
    shutil.copy(d.locate_file(f"moses/dataset/data/{name}.csv.gz"), out / f"moses_{name}.csv.gz")
uniprot = pathlib.Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")
if not uniprot.is_file():
    raise SystemExit(f"{uniprot} not found: apt-get install mmseqs2-examples")
with gzip.open(uniprot, "rt") as src, gzip.open(out / "uniprot_4k.fasta.gz", "wt", compresslevel=9) as dst:
    n = -1
    for line in src:
        n += line.startswith(">")
        if n % 5 == 0:
            dst.write(line)
PY
du -ch .whl/* .devdata/* | tail -n 1
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
bundle=$(du -cb .whl .devdata | tail -n 1 | cut -f1)
echo "bundle $((bundle / 1048576)) MiB + tracked files $((tree / 1048576)) MiB (a device call carries 64 MiB at most)"
