"""Loss-free balancing for fine-tuning patched models: the bias update after each optimizer
step, and a ``Trainer`` callback that runs it and logs MaxVio per layer."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import TrainerCallback

from ... import ops
from ...balance import balance_telemetry, max_violation
from .routing import FusedRouter


def moe_routers(model: nn.Module) -> list[tuple[str, FusedRouter]]:
    """The patched routers of ``model``, named by their MoE block, in module order."""
    return [
        (name.rpartition(".")[0], module)
        for name, module in model.named_modules()
        if isinstance(module, FusedRouter)
    ]


@torch.no_grad()
def update_balance(
    model: nn.Module, process_group: dist.ProcessGroup | None = None
) -> dict[str, Tensor]:
    """Ends a training step (call after the optimizer step): sums each patched router's token
    counts of the step over the data-parallel ranks (one all-reduce for all layers, over
    ``process_group``, the default group when torch.distributed is initialised), moves the
    loss-free biases, and starts the next step's count.

    Counts are taken in training forwards only (not eval forwards nor activation-checkpoint
    recomputes), over the real tokens of the ``attention_mask`` the patched model received
    (every token without one; see ``padding``).

    Returns:
        {block name: [E] int64 counts of the step, summed over the ranks}.
    """
    routers = moe_routers(model)
    if not routers:
        return {}
    device = routers[0][1].tokens_per_expert.device
    counts = torch.cat([router.tokens_per_expert.to(device) for _, router in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=process_group)
    step_counts = {}
    sizes = [router.tokens_per_expert.numel() for _, router in routers]
    for (name, router), layer_counts in zip(routers, counts.split(sizes), strict=True):
        if router.moe_balancing == "loss_free" and router.moe_rate > 0:
            bias = router.balancing_bias()
            ops.update_bias(
                bias, layer_counts.to(bias.device), router.moe_rate,
                centered=router.moe_center_bias,
            )  # fmt: skip
        router.tokens_per_expert.zero_()
        step_counts[name] = layer_counts
    return step_counts


class LossFreeBalancingCallback(TrainerCallback):
    """Runs ``update_balance`` after each optimizer step of a ``transformers.Trainer`` and adds
    to the Trainer's logs MaxVio_batch (arXiv 2408.15664: the worst expert's load over the
    mean, minus 1, of a step's counts), ``maxvio_batch/<block>`` per layer and ``maxvio_batch``
    over layers, each averaged over the steps since the last log; and the balance telemetry of
    those steps' summed counts (``balance.balance_telemetry``, under ``balance/``: MaxVio, the
    coefficient of variation, dead experts, min and max load, the bias range; per block and
    over the model).

    ``Trainer(..., callbacks=[LossFreeBalancingCallback()])``: the values reach the Trainer's
    ``log_history`` and the callbacks after this one (the progress bar, the printer); a
    reporting integration (TensorBoard, W&B) sees them when this callback is put before it,
    e.g. ``trainer.callback_handler.callbacks.insert(1, LossFreeBalancingCallback())``.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.maxvio: dict[str, list[float]] = defaultdict(list)
        self.window_counts: dict[str, Tensor] = {}
        self.biases: dict[str, Tensor | None] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, counts in update_balance(model, self.process_group).items():
            self.maxvio[name].append(float(max_violation(counts)))
            window = self.window_counts.get(name)
            self.window_counts[name] = counts if window is None else window + counts
        self.biases = {
            name: router.balancing_bias() if router.moe_balancing == "loss_free" else None
            for name, router in moe_routers(model)
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.maxvio:
            return
        per_layer = {f"maxvio_batch/{name}": sum(v) / len(v) for name, v in self.maxvio.items()}
        metrics = {"maxvio_batch": sum(per_layer.values()) / len(per_layer), **per_layer}
        telemetry = balance_telemetry(self.window_counts, self.biases)
        metrics |= {f"balance/{key}": value for key, value in telemetry.items()}
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        self.maxvio.clear()
        self.window_counts.clear()
