"""Drug–target interaction: measured compound–protein pairs (``biogen.dti.data``)."""

from biogen.dti.data import DTIData, read_kiba, read_pairs

__all__ = ["DTIData", "read_kiba", "read_pairs"]
