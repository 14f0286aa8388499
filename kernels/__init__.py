"""mcserve kernels: pure-torch reference paths (CPU/GPU) and Triton kernels (GPU)."""
