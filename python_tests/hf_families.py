"""Tiny random configs of every transformers MoE family ``patch`` supports (no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_kernels.integrations.transformers import ROUTERS, supported_routers  # noqa: E402
from moe_kernels.integrations.transformers.experts import EXPERTS, supported_experts  # noqa: E402

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
DEEPSEEK_LIKE = dict(
    n_routed_experts=8,
    moe_intermediate_size=24,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
)
# DeepSeek-V3's multi-head latent attention, tiny.
MLA = dict(
    num_key_value_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
DEEPSEEK_MLA = dict(DEEPSEEK_LIKE, **MLA, head_dim=8)
LINEAR_MLA_MOE = dict(
    MLA,
    num_experts=8,
    num_experts_per_token=2,
    moe_intermediate_size=24,
    num_shared_experts=1,
    num_expert_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    q_lora_rank=None,
    head_dim=8,
    linear_head_dim=8,
    linear_num_heads=4,
    layer_types=["linear_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse"],
)
# Qwen's MoE with a gated shared expert, a gated DeltaNet layer, then attention (Qwen3-Next,
# Qwen3.5-MoE, Qwen4-Exp).
QWEN_DELTANET_MOE = dict(
    num_experts=8,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=40,
    head_dim=8,
    layer_types=["linear_attention", "full_attention"],
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
FAMILIES = {
    "deepseek_v3": dict(DEEPSEEK_LIKE, **MLA),
    "deepseek_v32": dict(DEEPSEEK_MLA),
    "glm4_moe_lite": dict(DEEPSEEK_MLA),
    "glm_moe_dsa": dict(DEEPSEEK_MLA),
    "solar_open": dict(DEEPSEEK_MLA),
    "exaone_moe": dict(DEEPSEEK_MLA),
    "glm4_moe": dict(DEEPSEEK_LIKE, head_dim=8),
    "dots3_note": dict(
        DEEPSEEK_LIKE, model_type="dots3_note_text", head_dim=8, num_key_value_heads=4
    ),
    "dots1": dict(DEEPSEEK_LIKE, head_dim=8, norm_topk_prob=False),
    # Kimi-Linear and Ring-linear: DeepSeek-V3's MoE beside linear-attention layers.
    "kimi_linear": dict(LINEAR_MLA_MOE),
    "bailing_hybrid": dict(LINEAR_MLA_MOE, first_k_dense_replace=1, layer_group_size=2),
    "mimo_v2_flash": dict(
        n_routed_experts=8,
        moe_intermediate_size=24,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        head_dim=8,
        v_head_dim=8,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse"],
    ),
    # DeepSeek-V4 without its hash layers (a test of its own has one): sqrtsoftplus scores, a
    # clamped SwiGLU, compressed attention and hyper-connections.
    "deepseek_v4": dict(
        n_routed_experts=8,
        moe_intermediate_size=24,
        n_shared_experts=1,
        num_key_value_heads=1,
        head_dim=16,
        q_lora_rank=16,
        o_groups=2,
        o_lora_rank=8,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=4,
        sliding_window=4,
        hc_mult=2,
        hc_sinkhorn_iters=3,
        layer_types=["sliding_attention", "compressed_sparse_attention"],
        mlp_layer_types=["moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        partial_rotary_factor=0.5,
        swiglu_limit=0.05,
    ),
    # Nemotron-H: DeepSeek-V3's router, non-gated relu^2 experts, an attention layer first.
    "nemotron_h": dict(
        n_routed_experts=8,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=40,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        head_dim=8,
        layer_types=["full_attention", "moe", "moe"],
        num_hidden_layers=3,
    ),
    # DeepSeek-V2: fp32 softmax, groups scored by their best expert.
    "deepseek_v2": dict(
        DEEPSEEK_LIKE,
        **MLA,
        head_dim=8,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
    ),
    # Hunyuan-V4: DeepSeek-V3's router; a clamped SwiGLU, its limit about the size of the tiny
    # model's products so that it bites.
    "hy_v4": dict(
        num_local_experts=8,
        moe_intermediate_size=24,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        head_dim=8,
        swiglu_limit=0.05,
    ),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=24, shared_expert_intermediate_size=40),
    # Qwen4-Exp: its attention layers are indexed (a sparse top-k over compressed keys).
    "qwen4_exp": dict(
        QWEN_DELTANET_MOE,
        model_type="qwen4_exp_text",
        norm_topk_prob=True,
        hc_count=2,
        hc_lowrank=8,
        ple_embed_dim=64,
        split_ngram_parts=8,
        heads_per_ngram=2,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=8,
        indexer_compress_ratio=4,
    ),
    "granitemoe": dict(num_local_experts=8),
    "granitemoe_swa": dict(
        num_local_experts=8, sliding_window=4, layer_types=["full_attention", "sliding_attention"]
    ),
    # Granite-4 (hybrid): a Mamba-2 layer, then attention, each with MoE and a shared MLP.
    "granitemoehybrid": dict(
        num_local_experts=8,
        shared_intermediate_size=40,
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        mamba_expand=2,
    ),
    "granitemoeshared": dict(num_local_experts=8, shared_intermediate_size=40),
    "flint": dict(
        mlp_only_layers=[0],  # the default makes the first two layers dense
        num_experts=8,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=True,
        head_dim=8,
    ),
    # Jamba: Mamba layers beside attention; every second layer is MoE.
    "jamba": dict(
        num_experts=8,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
    ),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=24, norm_topk_prob=True, head_dim=8),
    "olmoe": dict(num_experts=8),
    "qwen3_next": dict(QWEN_DELTANET_MOE, norm_topk_prob=True),
    "qwen3_5_moe": dict(QWEN_DELTANET_MOE, model_type="qwen3_5_moe_text"),
    "mellum": dict(
        num_experts=8,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=True,
        head_dim=8,
    ),
    "flex_olmo": dict(num_experts=8, norm_topk_prob=True),
    # gpt-oss: a limit of 0.1 (7 in the real model), about the size of the tiny model's
    # products, so that its clamps bite (on a third of them).
    "gpt_oss": dict(num_local_experts=8, head_dim=8, sliding_window=4, swiglu_limit=0.1),
    # Llama 4: its block runs the experts on routing-weighted tokens, beside a shared expert.
    "llama4": dict(
        model_type="llama4_text",
        num_local_experts=8,
        intermediate_size=24,
        intermediate_size_mlp=40,
        head_dim=8,
        interleave_moe_layer_step=1,
        attention_chunk_size=16,
    ),
    # MiniMax-M3's language model: a clamped alpha-SwiGLU, its limit about the size of the tiny
    # model's products so that it bites; its routed output scaled, beside shared experts.
    "minimax_m3_vl": dict(
        model_type="minimax_m3_vl_text",
        num_local_experts=8,
        intermediate_size=24,
        shared_intermediate_size=40,
        dense_intermediate_size=48,
        head_dim=8,
        rotary_dim=4,
        swiglu_limit=0.05,
    ),
    "mixtral": dict(num_local_experts=8),
    "minimax": dict(num_local_experts=8, head_dim=8),
}

# The families whose router (and experts, where they have a recipe of their own) the installed
# transformers defines with the code their recipes compute.
INSTALLED = [
    family
    for family in FAMILIES
    if any(cls.__name__ == ROUTERS[family][0] for cls in supported_routers())
    and (
        family not in EXPERTS
        or any(cls.__name__ == EXPERTS[family][0] for cls in supported_experts())
    )
]


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``family``, fp32, in eval mode, whose routers
    have spread-out logits (no near-ties) and, where the family has one, a nonzero bias."""
    options = {**COMMON, **FAMILIES[family], **overrides}
    # A multimodal family's language model has a model type of its own ("<family>_text").
    config = transformers.AutoConfig.for_model(options.pop("model_type", family), **options)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if (
                name.endswith(("gate.weight", "router.weight"))
                and parameter.dim() == 2
                and parameter.shape[0] > 1
            ):
                parameter.normal_(0, 0.5)
            if name.endswith(("proj_bias", "router.bias")):  # gpt-oss's, zero when made
                parameter.uniform_(-0.1, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.05, 0.05)
    return model.eval()


def moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules of ``model`` with an ``experts`` child, in module order."""
    return [(name, m) for name, m in model.named_modules() if "experts" in m._modules]
