import os

import torch

# Triton kernels run on the CPU only through the interpreter, which is chosen when they are
# defined: set it before any test imports rcl_kernels.triton_lse.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
