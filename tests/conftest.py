"""Without a GPU, Triton kernels run in Triton's interpreter on the CPU (tests/ops/triton).

TRITON_INTERPRET must be set before triton itself is first imported (it decides, at import, how its own
language functions are built), so it is set here, before any test module is collected.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the "aot" decoding step keeps its compiled libraries here: a fresh folder per session, so that the tests compile
# what they test and leave nothing in the user's cache
os.environ.setdefault("RETENTIVE_CACHE_DIR", tempfile.mkdtemp(prefix="retentive-tests-"))
