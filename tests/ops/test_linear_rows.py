"""The few-rows product kernel (ops/cpu/linear_rows.cpp, ops/cpu/rows.h) against its reference, x @ weight.t():
every row count through one pass of 8 rows and past the 16 where it hands over to a GEMM, weight rows not a
multiple of the thread chunk, K not a multiple of the vector width, non-contiguous inputs; clear errors; a build
that cannot happen falls back with a warning; processes that start together build once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.ops import cpu_kernels

pytestmark = pytest.mark.native_kernels


def assert_equals_reference(x: torch.Tensor, weight: torch.Tensor) -> None:
    got, want = cpu_kernels.linear_rows(x, weight), cpu_kernels.linear_rows_reference(x, weight)
    # float32 sums of K products in another order: within a few ulps of the largest term's scale
    scale = (x.abs() @ weight.abs().t()).amax().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * max(scale, 1.0))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), k=st.integers(1, 300), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_kernel_equals_the_reference(rows: int, k: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    assert_equals_reference(torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g))


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 16, 17])
def test_kernel_at_a_model_shape_and_on_non_contiguous_inputs(rows: int) -> None:
    x = torch.randn(rows, 1024)[:, 1::2]  # (rows, 512), every other element
    weight = torch.randn(300, 1024)[:, ::2]  # (300, 512), every other element
    assert not x.is_contiguous() and not weight.is_contiguous()
    assert_equals_reference(x, weight)


def test_kernel_refuses_what_it_does_not_compute_by_name() -> None:
    with pytest.raises(RuntimeError, match=r"float32 tensors only"):
        cpu_kernels.linear_rows(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"x must be \(M, K\) and weight \(N, K\)"):
        cpu_kernels.linear_rows(torch.randn(2, 8), torch.randn(4, 9))


def test_without_a_compiler_the_kernel_is_unavailable_with_a_warning(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("RETENTIVE_CACHE_DIR", str(tmp_path))  # nothing built there yet
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels._module.__wrapped__() is None
    assert "could not be built" in caplog.text


def test_processes_that_start_together_build_the_kernels_once(tmp_path) -> None:
    """Two processes reach the build at once (a barrier), with an empty cache and a stand-in compiler that takes 2 s
    and logs its calls: one compiles, the other waits for the lock and finds the library built."""
    compiler = tmp_path / "cxx"
    compiler.write_text(  # the build writes its -o argument; inductor's probes of the compiler go to the real one
        f'#!/bin/sh\ncase "$*" in *.partial.so) ;; *) exec c++ "$@" ;; esac\necho "$$" >> {tmp_path / "calls"}\n'
        'sleep 2\nwhile [ "$#" -gt 1 ]; do [ "$1" = -o ] && echo built > "$2"; shift; done\n'
    )
    compiler.chmod(0o755)
    script = (
        "import os, sys, time\n"
        "from retentive.ops import cpu_kernels\n"
        "print('ready', flush=True)\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
        "print(cpu_kernels._build())\n"
    )
    env = {**os.environ, "CXX": str(compiler), "RETENTIVE_CACHE_DIR": str(tmp_path / "cache")}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(go)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.touch()
    paths = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len((tmp_path / "calls").read_text().split()) == 1, "the compiler ran once"
    (path,) = paths
    assert Path(path).read_text() == "built\n"
