"""A small decoder-only transformer whose FFNs are ``MoELayer``s."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..balancer import RateSchedule
from ..experts import SwiGLUExperts, SwiGLUMLP
from ..layer import MoELayer
from ..parallel import ParallelLayout
from .config import ModelConfig, TrainConfig


def rotary_tables(head_dim: int, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """cos and sin [max_seq_len, head_dim / 2] of rotary position embeddings (base 10000)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates pairs (first half, second half) of the last axis of [B, heads, S, D]."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq_len, hidden = x.shape
        qkv = self.qkv(x).view(batch, seq_len, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # q and k rotated in one call: half the elementwise ops of rotating each.
        (q, k), v = apply_rotary(qkv[:2], cos, sin), qkv[2]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, seq_len, hidden))


class Block(nn.Module):
    def __init__(self, model: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(model.hidden_size)
        self.attention = CausalSelfAttention(model.hidden_size, model.num_heads)
        self.ffn_norm = nn.RMSNorm(model.hidden_size)
        self.ffn = ffn

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


def bias_rate(config: TrainConfig) -> float | RateSchedule:
    """The loss-free update rate: ``config.rate``, after ``bias_warmup_steps`` updates at
    ``bias_warmup_rate`` when those are set."""
    if config.bias_warmup_steps <= 0:
        return config.rate

    def rate(update: int) -> float:
        return config.bias_warmup_rate if update < config.bias_warmup_steps else config.rate

    return rate


def moe_ffn(config: TrainConfig, layout: ParallelLayout) -> MoELayer:
    model = config.model
    return MoELayer(
        model.hidden_size,
        model.expert_ffn_hidden_size,
        model.num_experts,
        model.topk,
        balancing=config.balancing,
        score_fn=model.score_fn,
        n_groups=model.n_groups,
        topk_groups=model.topk_groups,
        route_scale=model.route_scale,
        num_shared_experts=model.num_shared_experts,
        rate=bias_rate(config),
        rule=config.rule,
        center_bias=config.center_bias,
        aux_coeff=config.aux_coeff,
        z_loss_coeff=config.z_loss_coeff,
        aux_group_size=config.aux_group_size,
        global_counts=config.global_counts,
        capacity_factor=config.capacity_factor,
        drop_policy=config.drop_policy,
        pad_to_capacity=config.pad_to_capacity,
        # The bias moves with the counts of every rank: data x expert parallel.
        process_group=dist.group.WORLD if layout.distributed else None,
        ep_group=layout.ep_group if layout.ep_size > 1 else None,
        ep_transport=layout.ep_transport if config.ep_transport == "auto" else config.ep_transport,
    )


class MoETransformer(nn.Module):
    """Token embedding, pre-norm blocks (causal attention with rotary positions, then an MoE
    FFN), a final RMSNorm and an output head tied to the embedding. Under expert parallelism
    (``layout``) each rank holds its share of the experts, initialised as the unsharded model's.
    """

    def __init__(self, config: TrainConfig, layout: ParallelLayout | None = None) -> None:
        super().__init__()
        model = config.model
        self.config = model
        self.embedding = nn.Embedding(model.vocab_size, model.hidden_size)
        self.blocks = nn.ModuleList(
            Block(
                model,
                SwiGLUMLP(model.hidden_size, model.dense_ffn_hidden_size)
                if index < model.dense_layers
                else moe_ffn(config, layout or ParallelLayout()),
            )
            for index in range(model.num_layers)
        )
        self.norm = nn.RMSNorm(model.hidden_size)
        cos, sin = rotary_tables(model.hidden_size // model.num_heads, model.max_seq_len)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        # Recompute each block's activations in the backward instead of keeping them.
        self.activation_checkpointing = config.activation_checkpointing
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's scheme: N(0, 0.02) everywhere, residual output projections scaled down by
        sqrt(2 * layers) so the residual stream's variance does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        experts = {
            id(p): m for m in self.modules() if isinstance(m, SwiGLUExperts) for p in m.parameters()
        }
        for name, parameter in self.named_parameters():
            if parameter.dim() < 2:
                continue
            is_output = name.endswith(("attention.out.weight", "down_proj"))
            std = residual_std if is_output else 0.02
            if id(parameter) in experts:
                experts[id(parameter)].init_local(
                    parameter, lambda w, std=std: nn.init.normal_(w, std=std)
                )
            else:
                nn.init.normal_(parameter, std=std)

    def forward(self, tokens: Tensor) -> Tensor:
        """[B, S] token ids -> [B, S, vocab] logits."""
        seq_len = tokens.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len={self.config.max_seq_len}"
            )
        cos, sin = self.rotary_cos[:seq_len], self.rotary_sin[:seq_len]
        x = self.embedding(tokens)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # The recompute routes again but does not count again (MoELayer's balancer
                # skips forwards inside the backward), so the step's counts stay exact.
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return F.linear(self.norm(x), self.embedding.weight)


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
