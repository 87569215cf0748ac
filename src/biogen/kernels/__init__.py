"""Python side of the hot loops: Numba kernels (CPU) and the CuPy module loader (GPU)."""
