"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: ci (default), dev, thorough."""

import os
import sys
import pathlib

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=10)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores shared with the test runner: one intra-op thread avoids OpenMP oversubscription.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compile and multi-process tests (still run in CI)")
