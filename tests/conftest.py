"""Without a GPU, Triton kernels run in Triton's interpreter on the CPU (tests/ops/triton).

TRITON_INTERPRET must be set before triton itself is first imported (it decides, at import, how its own
language functions are built), so it is set here, before any test module is collected.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the "aot" decoding step keeps its compiled libraries here: a fresh folder per session, so that the tests compile
# what they test and leave nothing in the user's cache (pytest-xdist's workers inherit the controller's folder, and
# cpu_kernels.build_once builds under a lock, so each library is compiled once)
os.environ.setdefault("RETENTIVE_CACHE_DIR", tempfile.mkdtemp(prefix="retentive-tests-"))

# Under pytest-xdist (make test: -n logical), each worker takes its share of the cores, and so do the processes it
# starts (OMP_NUM_THREADS): workers with all the cores each would oversubscribe them and run slower than one.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.native_kernels`` tests skip where retentive's C++ CPU kernels cannot be built. Asked here, at
    the first such test, not at collection: a build takes half a minute, and each xdist worker collects."""
    if item.get_closest_marker("native_kernels"):
        from retentive.ops import cpu_kernels

        if not cpu_kernels.available():
            pytest.skip("no C++ compiler to build retentive's CPU kernels (the warning says why)")
