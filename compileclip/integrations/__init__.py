"""Small, optional integrations with training frameworks. Each module imports its framework only
when it is imported itself: ``compileclip.integrations.hf`` (transformers' Trainer),
``compileclip.integrations.lightning`` (Lightning). Accelerate needs none: see the README."""

from __future__ import annotations

import numbers
import warnings


def reconcile(framework_max_norm, clip, *, where: str, off: str, norm_type: float = 2.0) -> bool:
    """A framework's own gradient clip against the clip's. Returns True when the framework's clip
    should be turned off: it clips exactly what compileclip clips (the same ``max_norm`` and norm
    type), so compileclip alone gives the framework's numbers. Raises where the two would
    differ, since two clips in a row give neither's result. ``where`` names the setting, ``off``
    how to turn it off."""
    if framework_max_norm is None or (isinstance(framework_max_norm, numbers.Real) and framework_max_norm <= 0):
        return False
    ours = clip.config.max_norm
    same = (isinstance(ours, numbers.Real) and not isinstance(ours, bool) and float(ours) == float(framework_max_norm)
            and float(clip.config.norm_type) == float(norm_type))
    if not same:
        raise ValueError(
            f"compileclip: {where}={framework_max_norm!r} would clip the gradients a second time, "
            f"after the compileclip clip (max_norm={ours!r}, norm_type={clip.config.norm_type}): the "
            f"result would be neither clip's. Set {off} and let compileclip clip, or give both the same value")
    warnings.warn(
        f"compileclip: turned off {where}={framework_max_norm!r}: the compileclip clip (max_norm={ours!r}) "
        "clips the same gradients with the same max_norm at the optimizer step, so the numbers are the "
        f"framework's own. Set {off} yourself to silence this", stacklevel=3)
    return True
