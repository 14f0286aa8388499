"""Session-wide test setup. Without a GPU the Triton kernels run under Triton's interpreter; the
flag must be set before the first `triton.jit` is applied (at import of the kernel modules)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
