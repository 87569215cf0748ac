"""``biogen status <output_dir>``: progress, failures and ETA of a job, from its ledger.

Not a Hydra app: it reads files only, takes a path, and starts quickly (no torch, no Ray),
so that it can run from a login node or in a watch loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from biogen.errors import BiogenError

DESCRIPTION = """Where a biogen job stands: shards done/total per phase, rows written,
throughput and ETA, shards lost with their worker or node and run again, failed shards
with their error, and the command to resume. Works while the job runs, after it stopped and
after it finished, on the output directory of library build/append, embed, screen and
evaluate (or a ledger.jsonl).

exit codes: 0 complete, 1 failed, 2 not a biogen job directory, 3 running,
4 stopped (killed or lost; rerun the same command to resume)"""


def main(argv: list[str]) -> None:
    from biogen.runtime.status import format_status, job_status

    ap = argparse.ArgumentParser(prog="biogen status", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir", help="the job's output directory (output= of the job)")
    ap.add_argument("--json", action="store_true", help="print the status as JSON")
    ap.add_argument("--watch", type=float, metavar="SECONDS",
                    help="print the status again every SECONDS until the job is no longer running")
    args = ap.parse_args(argv)
    while True:
        try:
            st = job_status(args.output_dir)
        except BiogenError as exc:
            print(f"biogen status: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps(st.to_dict(), indent=2, default=str) if args.json else format_status(st), flush=True)
        if not args.watch or st.state != "running":
            sys.exit(st.exit_code)
        time.sleep(args.watch)
        print()
