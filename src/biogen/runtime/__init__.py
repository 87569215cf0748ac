"""Runtime: Ray start/connect, sharded jobs with a resume ledger, progress."""

from biogen.runtime.ledger import Ledger, hash_files
from biogen.runtime.ray_runtime import RuntimeSpec, ray_session, run_shards, run_shards_on_actors

__all__ = ["Ledger", "RuntimeSpec", "hash_files", "ray_session", "run_shards", "run_shards_on_actors"]
