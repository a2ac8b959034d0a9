"""Kernel tests run under the Numba CUDA simulator unless a GPU is present.

NUMBA_ENABLE_CUDASIM is read once, when numba.cuda is first imported, so it is set here at
import time, before any test module imports codegen. It is set for the whole pytest process;
that is safe because no other test directory imports numba. The AOT test compiles in a
subprocess with the variable removed, since the simulator has no compiler.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and item.path.is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _short_switch_interval():
    """The simulator runs each CUDA thread as a Python thread and polls them all; a short
    GIL switch interval makes that several times faster."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(previous)
