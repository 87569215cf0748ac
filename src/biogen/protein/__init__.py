"""Proteins: FASTA reading, ESM-2 embedding (fast packed inference), embedding stores and search.

Importing this package does not import torch; ``biogen.protein.embed`` (the one entry
point of the embedding job: ``Embedder`` + ``EmbedSpec``), ``biogen.protein.esm`` (the
packed ESM-2 forward) and ``biogen.protein.models`` (architectures and checkpoint
loaders) do.
"""
