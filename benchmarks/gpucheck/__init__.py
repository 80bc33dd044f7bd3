"""The parts of the one-command GPU check (benchmarks/gpu_check.py): correctness, kernels, claims, stack."""
