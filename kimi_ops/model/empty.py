"""Building a module without computing weights that the checkpoint replaces at once.

`uninitialised()` builds parameters on the meta device (no memory) and skips their random
initialisation. On meta tensors that initialisation is not free: the first `normal_` imports
`torch._dynamo` (about 1.4 s of CPU here), paid again by every actor that loads a model. Load
the weights with `load_state_dict(..., assign=True)` afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# what torch.nn modules' `reset_parameters` call
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


@contextmanager
def uninitialised() -> Iterator[None]:
    """Modules built inside have meta parameters and no initialisation. Not for threads that
    build other modules at the same time: it swaps `torch.nn.init`'s functions while open."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in saved:
            setattr(nn.init, name, _keep)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)
