"""Shared pytest setup.

Runs before any test module is imported, so it is the one place that can
switch Triton to its CPU interpreter: TRITON_INTERPRET must be in the
environment before `import triton` (triton.jit reads it when a kernel is
defined). On a CUDA machine the kernels run for real.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the repo root, so tests import `losses`, `kernels`, ... without installing anything
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
