"""What a training run is: the model's shape and the run's settings, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .._arguments import check_choice, check_int, check_number
from ..balancer import RULES
from ..dispatch import TRANSPORTS
from ..layer import GLOBAL_COUNTS
from .tokenizer import TOKENIZERS


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer whose FFNs are MoE layers (the first ``dense_layers`` FFNs
    dense, as in DeepSeek-V3)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    dense_layers: int = 0
    dense_ffn_hidden_size: int = 512
    num_experts: int = 16
    topk: int = 2
    expert_ffn_hidden_size: int = 128
    num_shared_experts: int = 1
    score_fn: str = "sigmoid"
    n_groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0
    max_seq_len: int = 128


# The run's settings that take one of a few values (the model's score_fn is the router's).
CHOICES = {
    "tokenizer": TOKENIZERS,
    "dtype": ("fp32", "bf16"),
    "rule": RULES,
    "global_counts": GLOBAL_COUNTS,
    "ep_transport": TRANSPORTS,
}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = "stdlib"
    tokenizer: str = "bpe"
    seq_len: int = 128
    micro_batch_size: int = 16
    grad_accumulation: int = 1
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # "bf16": forwards under torch.autocast (fp32 master weights, router and bias).
    dtype: str = "fp32"
    balancing: str = "loss_free"
    rate: float = 1e-3
    # Loss-free: the bias moves at bias_warmup_rate for its first bias_warmup_steps updates,
    # then at rate. The sign rule's step sets the floor of its imbalance: a high rate undoes
    # the early collapse of routing, a low one then balances finer, once the router moves
    # less than the rate per step (not within the tiny preset's 300 steps: see the study).
    bias_warmup_rate: float = 0.0
    bias_warmup_steps: int = 0
    rule: str = "sign"
    # Loss-free: subtract each update's mean, so the biases stay centred.
    center_bias: bool = False
    aux_coeff: float = 1e-3
    # The router z-loss's weight (ST-MoE: 1e-3), with any balancing; 0: none.
    z_loss_coeff: float = 0.0
    # seq_aux_loss: sequences per balance group (1: DeepSeek-V3's sequence-wise loss; the
    # micro-batch's sequences: the micro-batch loss, aux_loss).
    aux_group_size: int = 1
    global_counts: str = "running"
    # expert_choice's capacity, and token-choice capacity's when drop_policy is set.
    capacity_factor: float = 1.0
    # Token-choice capacity: None (no token dropped), "probs" or "position" (see MoELayer).
    drop_policy: str | None = None
    pad_to_capacity: bool = False
    # Expert parallelism (under torchrun): experts sharded over groups of ep_size ranks; every
    # rank draws its own micro-batch (the global batch is micro_batch_size x ranks).
    ep_size: int = 1
    ep_transport: str = "auto"
    # FSDP2 over the ranks (moe_kernels.fsdp; with dtype "bf16", bf16 parameters), with
    # sharded checkpoints that resume on another layout.
    fsdp: bool = False
    # Recompute each block's activations in the backward (less memory, a forward more).
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_tokens: int = 65536
    checkpoint_every: int = 100

    def check(self) -> None:
        """Raises ValueError naming the first of the run's settings out of its range or choices
        (the model's are checked by the layers it builds)."""
        for name in ("seq_len", "micro_batch_size", "grad_accumulation", "steps", "eval_every",
                     "eval_tokens", "checkpoint_every", "ep_size"):  # fmt: skip
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "bias_warmup_steps", "seed"):
            check_int(name, getattr(self, name), 0)
        for name in ("lr", "grad_clip"):
            check_number(name, getattr(self, name), strict=True)
        for name in ("min_lr_ratio", "weight_decay", "rate", "bias_warmup_rate"):
            check_number(name, getattr(self, name))
        for name, choices in CHOICES.items():
            check_choice(name, getattr(self, name), choices)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accumulation * self.seq_len

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> TrainConfig:
        values = dict(values)
        model = ModelConfig(**values.pop("model"))
        return cls(model=model, **values)


PRESETS: dict[str, TrainConfig] = {
    # A few minutes on 2 CPU cores: 300 steps of 2048 tokens. The paper's rate 1e-3 suits
    # runs of thousands of steps; in 300 it moves a bias by 0.3 at most, too little to undo the
    # early collapse of routing (MaxVio_global 1.8 here, against 0.22 at 1e-2).
    "tiny": TrainConfig(rate=1e-2, eval_every=50),
    # Tens of minutes on a CPU; seconds per step scale on a GPU.
    "small": TrainConfig(
        model=ModelConfig(
            vocab_size=4096,
            hidden_size=256,
            num_layers=6,
            num_heads=8,
            num_experts=32,
            topk=4,
            expert_ffn_hidden_size=256,
            max_seq_len=256,
        ),
        seq_len=256,
        micro_batch_size=16,
        steps=1000,
        lr=2e-3,
        warmup_steps=100,
        eval_every=250,
        checkpoint_every=250,
    ),
    # A DeepSeek-V3-like layout at small width: 64 experts, top-6 of 8 groups keeping 4,
    # the first layer dense. Meant for a GPU.
    "base": TrainConfig(
        model=ModelConfig(
            vocab_size=8192,
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            dense_layers=1,
            dense_ffn_hidden_size=2048,
            num_experts=64,
            topk=6,
            expert_ffn_hidden_size=256,
            num_shared_experts=2,
            n_groups=8,
            topk_groups=4,
            route_scale=2.5,
            max_seq_len=512,
        ),
        seq_len=512,
        micro_batch_size=32,
        steps=5000,
        lr=1e-3,
        warmup_steps=200,
        eval_every=500,
        eval_tokens=262144,
        checkpoint_every=500,
    ),
}
