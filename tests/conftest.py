import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Triton kernels run on the CPU only through the interpreter, which is chosen when they are
# defined: set it before any test imports rcl_kernels.kernels.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests never read or write the user's tuning cache, and auto never times unless a test turns
# it on (rcl_kernels.autotune): its choice is the static order, the same on every run. Child
# processes the tests start inherit both.
_CACHE = tempfile.mkdtemp(prefix="rcl-kernels-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["RCL_KERNELS_CACHE_DIR"] = _CACHE
os.environ["RCL_KERNELS_AUTOTUNE"] = "0"


@pytest.fixture
def batch():
    """A small BCL problem: features [8, 2, 16], labels of 4 classes, 4 centers (fresh each run)."""
    # imported here: helpers imports rcl_kernels, which must come after TRITON_INTERPRET is set
    from helpers import draw_labels, fresh_generator, random_features

    gen = fresh_generator()
    features = random_features((8, 2, 16), gen).float()
    labels = draw_labels("uniform", 8, 4, gen)
    centers = random_features((4, 16), gen).float()
    return features, labels, centers
