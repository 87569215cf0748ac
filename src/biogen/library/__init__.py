"""The compound library store: build, append, open, info, verify."""

from biogen.library.store import Library, Shard

__all__ = ["Library", "Shard"]
