"""Compound embedding models (``load_model("minimol").embed(smiles)``); see ``base``."""

from biogen.embeddings.base import CompoundModel, EmbedResult, check_model_name, load_model, model_names

__all__ = ["CompoundModel", "EmbedResult", "check_model_name", "load_model", "model_names"]
