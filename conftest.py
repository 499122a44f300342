"""Test-session set-up shared by tests/ and benchmarks/."""
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels are tested under Triton's interpreter, which must be switched
    # on before triton is first imported (the README's command sets it too).
    os.environ.setdefault("TRITON_INTERPRET", "1")
