"""Device names, checked before any work: a typo or a missing GPU is one clear line, not a failure
minutes later inside a model's `.to(device)`."""

from __future__ import annotations

from tia2.errors import UserError

KNOWN = "cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> str:
    """`name` as torch spells it (cpu, cuda, cuda:1, mps); UserError for an unknown name or a
    GPU this machine does not have."""
    if name == "cpu":
        return name  # no torch import for the common case
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r} (use {KNOWN})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {name!r}: this machine has no CUDA GPU (use cpu)")
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {name!r}: this machine has no Apple GPU (use cpu)")
    elif device.type != "cpu":
        raise UserError(f"unknown device {name!r} (use {KNOWN})")
    return str(device)
