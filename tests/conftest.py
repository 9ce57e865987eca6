"""Shared fixtures.  Tests run on RLHF_TEST_DEVICE (default "cpu"); on CPU the Triton kernels run
under the interpreter.  Nothing here queries the GPU at import or collection time."""

import os

DEVICE = os.environ.get("RLHF_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # triton.jit fixes interpreted vs compiled at import: import the kernels now, under this
    # setting, before a test that briefly sets TRITON_INTERPRET=0 triggers the first import.
    try:
        import rlhf_kernels.triton  # noqa: F401
    except Exception:  # no triton: the triton tests skip with the reason
        pass

import pytest  # noqa: E402
import torch  # noqa: E402

from .utils import ALL_BACKENDS  # noqa: E402


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
