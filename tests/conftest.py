"""Test setup: Triton runs in its CPU interpreter unless the caller chose otherwise.

``TRITON_INTERPRET`` must be set before anything imports triton, so it is set here, at the
top of the first module pytest imports. On the H100: ``TRITON_INTERPRET=0 pytest -m gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("streamssm", deadline=None, max_examples=15, derandomize=True)
settings.load_profile("streamssm")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    """The run-time filters of ``streamssm.lightning_ui`` (installed when ``streamssm.tasks`` is
    imported) inside every test: pytest restores the warning filters after collection and after
    each test, so an import-time filter would not last."""
    from streamssm.lightning_ui import quiet_lightning

    quiet_lightning()
