"""Chemistry: input readers, standardization, fingerprints and descriptors (RDKit)."""
