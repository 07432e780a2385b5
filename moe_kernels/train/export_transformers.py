"""A trained ``moe-train`` model as a Hugging Face transformers model: safetensors weights and a
``config.json`` that ``AutoModelForCausalLM.from_pretrained`` loads, and ``patch`` then runs on
this package's ops.

    python -m moe_kernels.train.export_transformers RUN_DIR_OR_MODEL_PT OUT_DIR

The layout is GLM-4-MoE's (``Glm4MoeForCausalLM``): DeepSeek-V3's MoE (sigmoid scores, the
loss-free bias as ``e_score_correction_bias``, group-limited top-k with the top-2 group score,
normalised weights times the routed scaling, shared experts, the first FFNs dense) behind
Llama's attention, which is what ``MoETransformer`` is (DeepSeek-V3's own layout has
multi-head latent attention; Qwen3-MoE's has per-head q/k norms and a softmax router). The
rest maps one to one: rotary over all of a head (``partial_rotary_factor`` 1, base 10000),
as many key/value heads as heads, no attention biases, RMSNorm with fp32's epsilon (what
``nn.RMSNorm`` uses by default), the output head tied to the embedding. The exported model
computes what the trained one does, without token-choice capacity (transformers' MoE blocks
drop nothing): a test compares their logits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import EXPORT_NAME, load_export
from .config import ModelConfig, TrainConfig


def transformers_config(config: TrainConfig):
    """The ``Glm4MoeConfig`` of ``config``'s model; a model that layout cannot express raises
    a ValueError naming what it lacks."""
    from transformers import Glm4MoeConfig

    model = config.model
    if model.score_fn != "sigmoid":
        raise ValueError(
            f"a model routed with score_fn={model.score_fn!r} has no transformers layout with a "
            "loss-free bias; export takes sigmoid routing (DeepSeek-V3's)"
        )
    if config.balancing == "expert_choice":
        raise ValueError("an expert_choice model has no transformers layout (token choice only)")
    return Glm4MoeConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.dense_ffn_hidden_size,
        moe_intermediate_size=model.expert_ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_heads,
        head_dim=model.hidden_size // model.num_heads,
        n_routed_experts=model.num_experts,
        num_experts_per_tok=model.topk,
        n_shared_experts=model.num_shared_experts,
        n_group=model.n_groups,
        topk_group=model.topk_groups,
        routed_scaling_factor=model.route_scale,
        norm_topk_prob=True,
        first_k_dense_replace=model.dense_layers,
        max_position_embeddings=model.max_seq_len,
        rms_norm_eps=torch.finfo(torch.float32).eps,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 1.0,
        },
        attention_bias=False,
        use_qk_norm=False,
        tie_word_embeddings=True,
        hidden_act="silu",
    )


def split_swiglu(prefix: str, gate_up: Tensor, down: Tensor) -> dict[str, Tensor]:
    """A fused ``[gate | up]`` SwiGLU MLP as transformers' three projections."""
    gate, up = gate_up.chunk(2, dim=0)
    return {f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up,
            f"{prefix}.down_proj.weight": down}  # fmt: skip


def transformers_state_dict(model: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``MoETransformer``'s consolidated weights under GLM-4-MoE's names."""
    hidden = model.hidden_size
    out = {"model.embed_tokens.weight": state["embedding.weight"],
           "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["embedding.weight"]}  # fmt: skip
    for index in range(model.num_layers):
        ours, theirs = f"blocks.{index}", f"model.layers.{index}"
        q, k, v = state[f"{ours}.attention.qkv.weight"].split(hidden, dim=0)
        out |= {
            f"{theirs}.input_layernorm.weight": state[f"{ours}.attention_norm.weight"],
            f"{theirs}.post_attention_layernorm.weight": state[f"{ours}.ffn_norm.weight"],
            f"{theirs}.self_attn.q_proj.weight": q,
            f"{theirs}.self_attn.k_proj.weight": k,
            f"{theirs}.self_attn.v_proj.weight": v,
            f"{theirs}.self_attn.o_proj.weight": state[f"{ours}.attention.out.weight"],
        }
        ffn, mlp = f"{ours}.ffn", f"{theirs}.mlp"
        if index < model.dense_layers:
            out |= split_swiglu(mlp, state[f"{ffn}.gate_up_proj"], state[f"{ffn}.down_proj"])
            continue
        bias = state.get(f"{ffn}.balancer.bias", torch.zeros(model.num_experts))
        out |= {
            f"{mlp}.gate.weight": state[f"{ffn}.router.weight"],
            f"{mlp}.gate.e_score_correction_bias": bias,
            f"{mlp}.experts.gate_up_proj": state[f"{ffn}.experts.gate_up_proj"],
            f"{mlp}.experts.down_proj": state[f"{ffn}.experts.down_proj"],
        }
        # Without shared experts, GLM-4-MoE still has a shared MLP, of intermediate size 0.
        shared = f"{ffn}.shared_experts"
        gate_up = state.get(f"{shared}.gate_up_proj", torch.empty(0, hidden))
        down = state.get(f"{shared}.down_proj", torch.empty(hidden, 0))
        out |= split_swiglu(f"{mlp}.shared_experts", gate_up, down)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def export_transformers(model_path: Path, out_dir: Path) -> Path:
    """Writes the model of ``model_path`` (a run's ``model.pt``, or the run's folder) into
    ``out_dir`` as a transformers model (``save_pretrained``: safetensors and config.json);
    returns ``out_dir``."""
    from transformers import AutoModelForCausalLM

    if model_path.is_dir():
        model_path = model_path / EXPORT_NAME
    config, state = load_export(model_path)
    hf_config = transformers_config(config)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf_model.load_state_dict(transformers_state_dict(config.model, state), strict=True)
    hf_model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_kernels.train.export_transformers", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", type=Path, help="a run's folder, or its model.pt")
    parser.add_argument("out", type=Path, help="the folder to write the transformers model into")
    args = parser.parse_args(argv)
    try:
        export_transformers(args.model, args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"export_transformers: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
