"""DDP: the clip takes the norms of the averaged gradients in DDP's communication hook, and the
step uses them only where they are the norms of the final ``.grad`` (``compileclip/ddp.py``).
Bitwise against eager DDP + ``clip_grad_norm_``, 2 gloo ranks (``dist_ddp.py``)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import dist_ddp  # noqa: E402
from test_distributed import _spawn  # noqa: E402


@pytest.mark.parametrize("name", list(dist_ddp.CASES))
def test_ddp_hook(name):
    _spawn(name, dist_ddp.main)


def test_comm_hook_rejects_a_non_callable():
    from compileclip import clip_backend

    with pytest.raises(TypeError, match="comm_hook.*callable"):
        clip_backend(max_norm=1.0).comm_hook(3)
