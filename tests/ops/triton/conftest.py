"""Kernel tests: compiled on a GPU when there is one, else in Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before the kernels are defined (at import), hence here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
