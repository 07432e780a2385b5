"""Tiny random configs of every transformers MoE family ``patch`` supports (no download)."""

from __future__ import annotations

import sys
from functools import partial

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
DBRX_FFN = dict(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=2)
# Inkling's and Inkling-2's experts, and their sliding-window and relative-position attention.
INKLING_LIKE = dict(
    n_routed_experts=8,
    moe_intermediate_size=24,
    head_dim=8,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=8,
    sliding_window_size=4,
    d_rel=4,
    rel_extent=8,
)
# Tiny vision (and audio) towers of the multimodal families, whose tests feed text only; their
# special tokens take the vocabulary's top ids, from TEXT_VOCAB on, which text never uses.
TEXT_VOCAB = 87
QWEN_VISION = dict(
    depth=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=16,
    out_hidden_size=32,
    patch_size=2,
    temporal_patch_size=1,
    spatial_merge_size=1,
    num_position_embeddings=16,
    deepstack_visual_indexes=[0],
)
QWEN_VISION_TOKENS = dict(image_token_id=93, video_token_id=94, vision_start_token_id=90)
# The tiny vision tower of the families whose vision configs take transformers' common keys.
TINY_VISION = dict(
    hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=2
)
GLM_VISION = dict(
    depth=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=16,
    out_hidden_size=32,
    patch_size=2,
    image_size=4,
    temporal_patch_size=1,
    spatial_merge_size=1,
)
GLM_TOKENS = dict(
    image_token_id=93,
    video_token_id=94,
    image_start_token_id=90,
    image_end_token_id=91,
    video_start_token_id=92,
    video_end_token_id=95,
)
SAM = dict(
    hidden_size=16,
    output_channels=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
    window_size=2,
    global_attn_indexes=[0],
    downsample_channels=[16, 16],
    mlp_dim=16,
)
# Multimodal RoPE sections that fit the tiny heads.
QWEN_MROPE = dict(
    rope_type="default", rope_theta=1e4, mrope_section=[2, 1, 1], mrope_interleaved=True
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
    # Their blocks hold the bias and pass it to the router.
    "minimax_m2": dict(num_local_experts=8, head_dim=8),
    "hy_v3": dict(
        num_experts=8,
        moe_intermediate_size=24,
        num_shared_experts=1,
        head_dim=8,
        mlp_layer_types=["sparse", "sparse"],
    ),
    "afmoe": dict(
        num_experts=8,
        moe_intermediate_size=24,
        num_shared_experts=1,
        num_dense_layers=0,
        route_scale=2.5,
        head_dim=8,
    ),
    "lfm2_moe": dict(
        num_experts=8,
        moe_intermediate_size=24,
        num_dense_layers=0,
        norm_topk_prob=True,
        use_expert_bias=True,
        routed_scaling_factor=2.5,
        layer_types=["conv", "full_attention"],
    ),
    # ERNIE 4.5: its bias in the router's moe_statics, a Parameter.
    "ernie4_5_moe": dict(
        num_experts=8,
        moe_intermediate_size=24,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        head_dim=8,
    ),
    # Hunyuan-V1: an fp32 gate ``wg`` beside a shared MLP.
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, head_dim=8),
    "aria": dict(
        model_type="aria_text",
        moe_num_experts=8,
        moe_topk=2,
        intermediate_size=24,
        moe_num_shared_experts=1,
        head_dim=8,
    ),
    # Gemma 4: the router and experts are its decoder layers' own, beside their dense MLP;
    # GELU-gated experts.
    "gemma4": dict(
        model_type="gemma4_text",
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=24,
        head_dim=8,
        hidden_size_per_layer_input=0,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # Kolibri-1: its bias shifts the logits for the choice; a norm after its MLP.
    "kolibri1": dict(
        num_experts=8,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        norm_topk_prob=True,
    ),
    # The OpenAI privacy filter: a token-classification encoder (labelled with the tests'
    # token ids), gpt-oss's router and experts in fp32, clamps that bite.
    "openai_privacy_filter": dict(
        num_local_experts=8,
        head_dim=8,
        sliding_window=4,
        swiglu_limit=0.1,
        num_labels=96,
        model_class="OpenAIPrivacyFilterForTokenClassification",
    ),
    # Cohere2-MoE: the config's score function (softmax by default; sigmoid in a test of its
    # own), beside sliding-window attention.
    "cohere2_moe": dict(
        num_experts=8, intermediate_size=24, num_shared_experts=1, head_dim=8, sliding_window=4
    ),
    # Mistral 4: DeepSeek-V3's block and attention, a grouped softmax router; its causal LM is
    # not in the auto mapping.
    "mistral4": dict(DEEPSEEK_LIKE, **MLA, model_class="Mistral4ForCausalLM"),
    # Laguna: sigmoid scores of soft-capped logits (a cap the tiny logits reach), its bias a
    # Parameter; the block scales the experts' output.
    "laguna": dict(
        num_experts=8,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        head_dim=8,
        moe_routed_scaling_factor=2.5,
        moe_router_logit_softcapping=2.0,
    ),
    # Beam: DeepSeek-V3's router, its block scaling the experts' sum; SwiGLU in fp32.
    "beam": dict(
        num_experts=8,
        moe_intermediate_size=24,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        head_dim=8,
        mlp_layer_types=["sparse", "sparse"],
    ),
    "axk1": dict(DEEPSEEK_MLA),
    # Inkling-2: soft-capped SwiGLU experts, the caps about the size of the tiny model's
    # products so that they bite, beside its sliding-window and linear layers.
    "inkling2": dict(
        INKLING_LIKE,
        model_type="inkling2_text",
        n_layers_per_attn_res_block=1,
        mlp_gate_softcap=0.05,
        mlp_up_softcap=0.08,
    ),
    # DBRX: its block routes; experts in three [E * F, H] weights.
    "dbrx": dict(
        # Its attention reads rope_theta there, and fails without clip_qkv (DBRX clips at 8).
        attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
        ffn_config=DBRX_FFN,
        d_model=32,  # the experts read it there: set through hidden_size, they miss it
    ),
    # Inkling: its shared experts' sigmoid scores join the routed weights' normalisation.
    "inkling": dict(
        INKLING_LIKE,
        model_type="inkling_text",
        model_class="InklingForCausalLM",
        n_shared_experts=2,
    ),
    # Multimodal families: their language model (``text_config``) in the whole model, with a
    # tiny vision tower, fed text only.
    "glm4v_moe": dict(
        text_config=dict(
            DEEPSEEK_LIKE,
            head_dim=8,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=1e4,
                partial_rotary_factor=0.5,
                mrope_section=[1, 1, 0],
            ),
        ),
        vision_config=GLM_VISION,
        **GLM_TOKENS,
    ),
    # GLM-5-Next: Hunyuan-V4's clamped SwiGLU (its limit about the size of the tiny model's
    # products), beside linear and indexed attention.
    "glm5_next": dict(
        text_config=dict(
            DEEPSEEK_LIKE,
            num_key_value_heads=4,
            swiglu_limit=0.05,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=0,
            qk_nope_head_dim=8,
            v_head_dim=8,
            index_topk=4,
            index_kpool=2,
            index_head_dim=8,
            index_n_heads=2,
            hc_mult=2,
            hc_sinkhorn_iters=3,
            layer_types=["linear_attention", "indexed_attention"],
            mlp_layer_types=["sparse", "sparse"],
            linear_head_dim=8,
            linear_num_heads=4,
        ),
        vision_config=dict(GLM_VISION, projection_intermediate_size=16),
        **GLM_TOKENS,
    ),
    "qwen3_vl_moe": dict(
        text_config=dict(
            head_dim=8, num_experts=8, moe_intermediate_size=24, rope_parameters=QWEN_MROPE
        ),
        vision_config=QWEN_VISION,
        vision_end_token_id=91,
        **QWEN_VISION_TOKENS,
    ),
    # Qwen3-Omni's thinker, its language model.
    "qwen3_omni_moe": dict(
        model_type="qwen3_omni_moe_thinker",
        text_config=dict(
            head_dim=8,
            num_experts=8,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            rope_parameters=QWEN_MROPE,
        ),
        vision_config=QWEN_VISION,
        audio_config=dict(
            num_mel_bins=16,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=16,
            d_model=16,
            output_dim=32,
            downsample_hidden_size=8,
            max_source_positions=16,
            n_window=4,
            n_window_infer=8,
            conv_chunksize=8,
        ),
        audio_token_id=89,
        audio_start_token_id=88,
        user_token_id=87,
        **QWEN_VISION_TOKENS,
    ),
    # Qwen3-Omni's talker, its speech-codec language model (Qwen's router, a gated shared
    # expert), fed embeddings (in the whole model, the thinker's states). Its model reads
    # spatial_merge_size and its loss vocab_size from its own config, which has neither.
    "qwen3_omni_moe_talker": dict(
        config_class="Qwen3OmniMoeTalkerConfig",
        model_class="Qwen3OmniMoeTalkerForConditionalGeneration",
        router="Qwen3OmniMoeTalkerTextTopKRouter",
        text_config=dict(
            head_dim=8,
            num_experts=8,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            norm_topk_prob=True,
            rope_parameters=QWEN_MROPE,
        ),
        code_predictor_config=dict(COMMON, head_dim=8),
        num_code_groups=4,
        thinker_hidden_size=32,
        spatial_merge_size=1,
        vocab_size=96,
        # Its initialisation leaves its experts' weights as torch.empty made them.
        uninitialised_experts=True,
    ),
    # DeepSeek-V2's router in two OCR models.
    "deepseek_ocr2": dict(
        text_config=dict(
            DEEPSEEK_LIKE, topk_method="group_limited_greedy", mlp_layer_types=["dense", "sparse"]
        ),
        vision_config=dict(
            sam_config=SAM,
            encoder_config=dict(
                vocab_size=8,
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            ),
        ),
        image_token_id=95,
    ),
    "unlimited_ocr": dict(
        text_config=dict(
            DEEPSEEK_LIKE,
            num_key_value_heads=4,  # its eager attention has no grouped-query heads
            topk_method="group_limited_greedy",
            mlp_layer_types=["dense", "sparse"],
            sliding_window=64,
        ),
        vision_config=dict(
            sam_config=SAM,
            encoder_config=dict(
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
            ),
        ),
        image_token_id=95,
    ),
    "mistral_large4": dict(
        text_config=dict(
            DEEPSEEK_LIKE,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
            index_topk=4,
            index_head_dim=8,
            index_n_heads=2,
        ),
        vision_config=dict(TINY_VISION, image_size=8, head_dim=8),
        image_token_index=95,
    ),
    # Step-3.7: MiniMax-M3's router; SiLU clamped after the activation (a limit the tiny
    # products reach), its block scaling the experts' sum.
    "step3p7": dict(
        text_config=dict(
            num_local_experts=8,
            moe_intermediate_size=24,
            share_expert_dim=40,
            head_dim=8,
            mlp_layer_types=["sparse", "sparse"],
            swiglu_limits=[0.05, 0.05],
            moe_router_scaling_factor=2.5,
            sliding_window=4,
            num_sliding_attention_heads=4,
        ),
        vision_config=dict(TINY_VISION, image_size=8, mlp_ratio=16.0),
        image_token_id=95,
    ),
    # Muse Spark: a router with a logit multiplier; experts, between the block's projections,
    # whose outputs pass a norm.
    "muse_spark": dict(
        text_config=dict(
            num_local_experts=8,
            moe_intermediate_size=24,
            moe_hidden_size=32,
            head_dim=8,
            mlp_layer_types=["sparse", "sparse"],
            sliding_window=16,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=2,
            pos_emb_height=4,
            pos_emb_width=4,
            max_position_embeddings=16,
            patch_temporal=2,
            merge_size=2,
        ),
        audio_config=dict(
            patch_sizes=[4],
            hidden_sizes=[16],
            depths=[1],
            num_hidden_layers=1,
            mlp_ratio=2.0,
            conv_kernel_size=3,
            out_hidden_size=32,
        ),
        image_token_id=87,
        video_token_id=88,
        audio_token_id=89,
        out_hidden_size=64,
        projector_hidden_size=32,
    ),
    # DiffusionGemma: block diffusion, Gemma 4's router and experts in the decoder layers of its
    # encoder (over the prompt) and its decoder (over a canvas of its own length).
    "diffusion_gemma": dict(
        text_config=dict(
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=24,
            head_dim=8,
            global_head_dim=8,
            # Wider than the tests' prompts: its decoder's sliding layers read the last window
            # of the prompt's cache, which a right-padded prompt would fill with padding.
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=dict(TINY_VISION, num_key_value_heads=2, head_dim=8),
        image_token_id=87,
        boi_token_id=88,
        eoi_token_id=89,
        canvas_length=8,
        model_class="DiffusionGemmaForBlockDiffusion",
    ),
    # ERNIE 4.5-VL: text and vision experts in each block (text reaches only the text ones).
    "ernie4_5_vl_moe": dict(
        text_config=dict(
            moe_num_experts=8,
            moe_k=2,
            moe_intermediate_size=[24, 16],
            moe_num_shared_experts=1,
            mlp_layer_types=["dense", "sparse"],
            rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[1, 1, 2]),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            num_heads=2,
            intermediate_size=16,
            patch_size=2,
            spatial_merge_size=1,
            temporal_merge_size=1,
        ),
        **GLM_TOKENS,
    ),
}

# The families whose router (and experts, where they have a recipe of their own) the installed
# transformers defines with the code their recipes compute.
INSTALLED = [
    family
    for family in FAMILIES
    if any(
        cls.__name__ == FAMILIES[family].get("router", ROUTERS.get(family, ("",))[0])
        for cls in supported_routers()
    )
    and (
        family not in EXPERTS
        or any(cls.__name__ == EXPERTS[family][0] for cls in supported_experts())
    )
]

# The block-diffusion families (see ``canvas``), and the causal LMs: every other one.
BLOCK_DIFFUSION = [family for family in INSTALLED if "canvas_length" in FAMILIES[family]]
CAUSAL_LMS = [family for family in INSTALLED if family not in BLOCK_DIFFUSION]


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (a test case of ``FAMILIES``), fp32, in
    eval mode, whose routers have spread-out logits (no near-ties) and, where the family has
    one, a nonzero bias: its causal LM, or the class ``model_class`` names (an encoder, a block
    diffusion model, a talker).

    A family whose language model has no causal-LM class of its own is built whole, with its
    tiny vision tower (``text_config``; ``overrides`` go to the language model)."""
    options = dict(FAMILIES[family])
    options.pop("router", None)
    uninitialised_experts = options.pop("uninitialised_experts", False)
    # A language model may have a model type of its own ("<family>_text").
    model_type = options.pop("model_type", family)
    text = options.pop("text_config", None)
    # A model or config class the auto mapping leaves out is named.
    model_class = options.pop("model_class", None)
    config_class = options.pop("config_class", None)
    if text is None:
        config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **options, **overrides})
        build = transformers.AutoModelForCausalLM.from_config
    else:
        text_config = {**COMMON, **text, **overrides}
        make_config = (
            getattr(transformers, config_class)
            if config_class is not None
            else partial(transformers.AutoConfig.for_model, model_type)
        )
        config = make_config(text_config=text_config, **options)
        build = transformers.AutoModelForImageTextToText.from_config
    if model_class is not None:
        build = getattr(transformers, model_class)._from_config
    torch.manual_seed(seed)
    model = build(config, attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if (
                name.endswith(
                    (
                        "gate.weight",
                        "router.weight",
                        "wg.weight",
                        "router.proj.weight",
                        "router.layer.weight",
                    )
                )
                and parameter.dim() == 2
                and parameter.shape[0] > 1
            ):
                parameter.normal_(0, 0.5)
            if name.endswith(("proj_bias", "router.bias")):  # gpt-oss's, zero when made
                parameter.uniform_(-0.1, 0.1)
            if name.endswith(("per_expert_scale", "gate.global_scale")):  # ones when made
                parameter.uniform_(0.5, 1.5)
            if uninitialised_experts and ".experts." in name:
                parameter.normal_(0, 0.02)
        # The routing biases, buffers or (ERNIE's, AFMoE's) Parameters.
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                tensor.uniform_(-0.05, 0.05)
    return model.eval()


def block_inputs(model: torch.nn.Module, block: torch.nn.Module, x: torch.Tensor) -> dict:
    """The keyword arguments ``block`` takes beside its [B, S, H] tokens ``x``: none, save for a
    whole decoder layer (Gemma 4's and DiffusionGemma's, whose router and experts sit beside
    their attention): its rotary embeddings and, where the family shares KV across layers, an
    empty KV-sharing store."""
    attention = getattr(block, "self_attn", None)
    if attention is None:
        return {}
    positions = torch.arange(x.shape[1], device=x.device)[None]
    rotary = next(m for name, m in model.named_modules() if name.endswith("rotary_emb"))
    inputs = dict(position_embeddings=rotary(x, positions, attention.layer_type))
    sharing = getattr(sys.modules[type(block).__module__], "KVSharingDict", None)
    if sharing is not None:
        inputs["shared_kv_states"] = sharing(None)
    return inputs


# Block diffusion (DiffusionGemma): the model denoises a canvas of its config's length (its
# decoder's tokens, all real) given a prompt (its encoder's, the ids), and computes no loss.
def canvas(model: torch.nn.Module, batch: int) -> torch.Tensor | None:
    """A fixed [batch, canvas_length] canvas of text ids for a block-diffusion model, else None."""
    length = getattr(model.config, "canvas_length", None)
    if length is None:
        return None
    return (torch.arange(length) * 7 % (TEXT_VOCAB - 3) + 3).expand(batch, -1)


# Models fed embeddings, whose forward leaves ids aside (Qwen3-Omni's talker).
FED_EMBEDDINGS = ("Qwen3OmniMoeTalkerForConditionalGeneration",)


def forward_inputs(
    model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict:
    """What ``model``'s forward takes beside the [B, S] ``ids``: none, save for a model fed
    embeddings, those of the ids by its own embedding, and their positions (which transformers
    5.17's talker would compute from ids it is not given); and for a block-diffusion model, its
    canvas and, where the prompts are padded (``attention_mask``), what its decoder then needs
    to see them as unpadded: the mask over its cache and canvas, and the canvas's positions
    after each prompt's real tokens."""
    if type(model).__name__ in FED_EMBEDDINGS:
        real = torch.ones_like(ids) if attention_mask is None else attention_mask
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        return {"inputs_embeds": model.get_input_embeddings()(ids), "position_ids": positions}
    tokens = canvas(model, ids.shape[0])
    if tokens is None:
        return {}
    tokens = tokens.to(ids.device)
    inputs = {"decoder_input_ids": tokens}
    if attention_mask is not None:
        after = attention_mask.sum(-1, keepdim=True)
        inputs["decoder_attention_mask"] = torch.cat([attention_mask, torch.ones_like(tokens)], 1)
        inputs["decoder_position_ids"] = after + torch.arange(tokens.shape[1], device=ids.device)
    return inputs


def routed_tokens(model: torch.nn.Module, name: str, ids: torch.Tensor) -> int:
    """How many tokens block ``name`` of ``model`` routes for the [B, S] ``ids``: B * S, save in
    a block-diffusion decoder (B * canvas_length)."""
    tokens = canvas(model, ids.shape[0])
    return tokens.numel() if tokens is not None and ".decoder." in name else ids.numel()


def text_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``moe_blocks`` that text reaches: all but ERNIE-4.5-VL's vision experts."""
    return [(name, block) for name, block in moe_blocks(model) if not name.endswith("vision_moe")]


def moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules of ``model`` with an ``experts`` child, in module order."""
    return [(name, m) for name, m in model.named_modules() if "experts" in m._modules]
