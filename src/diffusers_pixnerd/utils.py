# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Small helpers shared by every layer: the checks of numbers in arguments, file permissions, state-dict prefixes."""

import numbers
import os

import torch


def normal_permissions(path: str | os.PathLike) -> None:
    """Gives `path` (a file, or a folder and everything under it) the permissions a new file or folder gets from the
    umask (0644 / 0755 with the usual 022). safetensors writes its files through a private temporary file, so they
    come out 0600: unreadable to the other users of a shared machine or a web server serving the folder."""
    mask = os.umask(0)
    os.umask(mask)
    paths = [os.fspath(path)]
    if os.path.isdir(path):
        for root, folders, files in os.walk(path):
            paths += [os.path.join(root, name) for name in folders + files]
    for item in paths:
        if os.path.islink(item):
            continue
        os.chmod(item, (0o777 if os.path.isdir(item) else 0o666) & ~mask)


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of submodule `prefix`, without the prefix."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def is_integer(value) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or numpy real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_guidance_interval(low: float, high: float, name: str = "guidance_interval") -> None:
    """`0 <= min <= max <= 1` in the paper's time t; min == max is an empty interval (no guidance)."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(
            f"`{name}` must satisfy 0 <= min <= max <= 1 in the paper's time t (0 = noise, 1 = data), got ({low}, {high})."
        )
