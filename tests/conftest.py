import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # each test compiles its own models; stale cache entries would hide recompiles
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
