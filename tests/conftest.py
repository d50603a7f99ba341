import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="set TREEDEC_SLOW=1 (make test does) to run tests on the embedded model")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and os.environ.get("TREEDEC_SLOW") != "1":
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def flat_step_costs(monkeypatch):
    """Every tree size costs the same and may be chosen from the first step, and every step drafts
    (sizing.DraftGate never closes): for tests that assert how much of
    a draft is accepted, on tiny models whose measured step times are noise (a slow sample there
    made the sizer drop the drafts in about one run of six)."""
    from treedec import sizing

    monkeypatch.setattr(sizing.CostCurve, "explored_nodes", lambda self, batch_size: max(sizing.TREE_SIZES))
    monkeypatch.setattr(sizing.CostCurve, "cost", lambda self, batch_size, num_nodes: 1.0)
    monkeypatch.setattr(sizing.DraftGate, "opens", lambda self, batch_size: True)  # and every step drafts
