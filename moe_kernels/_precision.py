"""Tensors that stay fp32 whatever the model's dtype."""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import nn


class KeepsFp32(nn.Module):
    """A module whose tensors named in ``fp32_tensors`` (paths from the module, such as
    "moe_statics.e_score_correction_bias") keep fp32 through dtype casts of the model
    (``model.to(torch.bfloat16)``, ``.half()``, ``.double()``), while device moves apply.

    Routing decides discrete choices: in 16-bit, router logits and the loss-free bias (whose
    steps of 1e-3 vanish next to 1.0 in bf16) would flip them. Kept as the same Parameter and
    buffer objects, so optimizers and state_dict keys are unaffected.
    """

    fp32_tensors: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {
            name: attrgetter(name)(self).detach().clone()
            for name in self.fp32_tensors
            if attrgetter(name)(self) is not None
        }
        super()._apply(fn, recurse)
        for name, before in saved.items():
            tensor = attrgetter(name)(self)
            if tensor.dtype != torch.float32:
                tensor.data = before.to(tensor.device)
        return self
