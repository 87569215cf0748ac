"""Runtime: Ray start/connect (or a local process pool), sharded jobs with a resume ledger, progress."""

from biogen.runtime.ledger import Ledger
from biogen.runtime.ray_runtime import (
    NO_RAY, RuntimeSpec, ray_session, run_shards, run_shards_on_actors, stream_shards,
)

__all__ = ["NO_RAY", "Ledger", "RuntimeSpec", "ray_session", "run_shards", "run_shards_on_actors", "stream_shards"]
