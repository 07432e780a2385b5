"""The routers of transformers' MoE families, expressed as ``ops.biased_topk`` calls.

Each supported router class is named here with the routing its ``forward`` computes. Classes
are matched exactly (module and name), never by a base class or a similar name, and only where
their ``forward`` is code the recipe was verified against (``Routing.forwards``): a router that
is not listed, or whose code changed, is not patched. Many families share one router source
(transformers' modular files copy it), so a few recipes cover them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..._nvtx import nvtx_range
from ..._precision import KeepsFp32
from ...balancer import in_backward_pass
from .padding import counted_tokens
from .router_source import class_forward_digest, installed_class

BIAS = "e_score_correction_bias"
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
# The activation modules (transformers' ACT2FN) a router may hold as its score function.
SCORE_MODULES = {"SqrtSoftplusActivation": "sqrtsoftplus", "Sigmoid": "sigmoid"}


@dataclass(frozen=True)
class Routing:
    """What a router's ``forward`` computes, in ``biased_topk``'s terms.

    Attributes:
        score_fn: "softmax", "sigmoid" or "sqrtsoftplus"; or the name of the router's
            attribute holding one of them (Cohere2-MoE's, from its config) or its activation
            module (DeepSeek-V4's), one of ``SCORE_MODULES``.
        forwards: the digests (``router_source.forward_digest``) of the router ``forward``
            codes this routing computes, each verified by the tests.
        logits: "fp32": from fp32 copies of the tokens and the weight (DeepSeek-V3), in
            autocast's dtype where it is on, as the code's ``F.linear`` is; "forced_fp32": the
            same with autocast off (ERNIE, Flint, Inkling); "input": ``F.linear`` in the tokens'
            dtype; "weight": the tokens cast to the weight's dtype (MiniMax-M2, and Hunyuan-V1's
            fp32 gate).
        normalize: whether the k weights are divided by their sum: a constant, the name of the
            router's attribute holding it, or a function of the router (Cohere2-MoE's).
        norm_eps: added to that sum (``biased_topk``'s norm_eps).
        norm_min: the least divisor, or the name of the router's attribute holding it (ERNIE).
        weights_dtype: the weights' dtype: "fp32", the logits' ("logits", Qwen) or the tokens'
            ("input", ERNIE).
        grouped: group-limited routing, read from the router's ``num_group`` and
            ``topk_group``: always, or where the router's attribute has the value of the
            (attribute, value) pair (DeepSeek-V2's ``topk_method``).
        group_score: how a group is scored (``biased_topk``'s group_score).
        scale: what the weights are multiplied by, if anything: the name of the router's
            attribute holding it, or a function of the router (the privacy filter's 1 / k).
        weight: the path of the router's weight from the router ("gate.weight" where it is a
            linear layer's).
        bias: the path of the router's own loss-free bias from the router, where it holds one
            (ERNIE's is in ``moe_statics``); ``patch`` adds one there where the model has none.
        bias_argument: the name of the block's attribute holding the bias, where the block
            passes it to the router's ``forward`` (MiniMax-M2, AFMoE); None where the router
            holds its own.
        top_k: the path of the router's k from the router ("config.top_k_experts"; DBRX's is
            its block's, "moe_block.top_k": ``patch`` gives the router its block).
        prepare: what the router does to the tokens before its weight, as a function of the
            router and the [T, H] tokens (Gemma 4's norm and scales); None: nothing.
        expert_scale: the name of the router's attribute holding [E] factors that multiply the
            weights of the chosen experts (Gemma 4's trained ``per_expert_scale``, which gets
            its gradient through the gather); None: none.
        returns_probabilities: the router returns the fp32 softmax of its logits in their
            place (Gemma 4).
        choose_on: what the bias is added to for the choice (``biased_topk``'s choose_on):
            "scores", or "logits" (Kolibri-1).
        logit_scale: the name of the router's attribute holding a factor its fp32 logits are
            multiplied by (Muse Spark's output multiplier): the logits it returns and scores.
        logit_softcap: the name of the router's attribute holding c, where its logits are
            soft-capped (``c * tanh(logits / c)``, in fp32) wherever c > 0 (Laguna): the logits
            it returns and scores.
        returns_fp32_logits: the logits are computed as ``logits`` says but returned as fp32
            (Granite, AFMoE); the weights are cast before.
        logits_bias: the router's ``bias`` adds to its logits (gpt-oss), a term of the model
            unlike the loss-free bias, which only chooses.
        scores_first: the router returns ``(weights, logits, ids)``, logits second where the
            model records them (Llama 4, whose block ``patch`` replaces: ``blocks``); else
            ``(logits, weights, ids)``.
        always_chosen: the name of the router's attribute holding S, where its last S logits
            are its shared experts', which every token chooses (Inkling): their scores join the
            sum the weights are normalised by, their weights are returned fourth (the shared
            experts' gammas), and their logits are neither returned nor counted. The choice
            puts them first: a bias of fp32's largest value ties them above every routed
            expert, in index order.
        trained_scale: the name of the router's [1] Parameter the weights are multiplied by
            (Inkling's ``global_scale``), which gets its gradient through the product.
    """

    score_fn: str
    forwards: frozenset[str]
    logits: str = "input"
    normalize: bool | str | Callable[[nn.Module], bool] = True
    norm_eps: float = 0.0
    norm_min: float | str = 0.0
    weights_dtype: str = "fp32"
    grouped: bool | tuple[str, str] = False
    group_score: str = "top2"
    scale: str | Callable[[nn.Module], float] | None = None
    weight: str = "weight"
    bias: str = BIAS
    bias_argument: str | None = None
    top_k: str = "top_k"
    prepare: Callable[[nn.Module, Tensor], Tensor] | None = None
    expert_scale: str | None = None
    returns_probabilities: bool = False
    choose_on: str = "scores"
    logit_scale: str | None = None
    logit_softcap: str | None = None
    returns_fp32_logits: bool = False
    logits_bias: bool = False
    scores_first: bool = False
    always_chosen: str | None = None
    trained_scale: str | None = None

    def groups(self, router: nn.Module) -> tuple[int, int]:
        """(n_groups, topk_groups) of ``router``'s routing: (1, 1) where it is not grouped."""
        grouped = self.grouped
        if isinstance(grouped, tuple):
            grouped = getattr(router, grouped[0]) == grouped[1]
        return (router.num_group, router.topk_group) if grouped else (1, 1)


DEEPSEEK_V3 = Routing(
    "sigmoid",
    frozenset({"84897cf1e1d9"}),
    logits="fp32",
    normalize="norm_topk_prob",
    norm_eps=1e-20,
    grouped=True,
    scale="routed_scaling_factor",
)
# Beam: DeepSeek-V3's router without the scaling, which its block applies to the experts' sum.
BEAM = Routing(
    "sigmoid",
    frozenset({"a21bc256ccf2"}),
    logits="fp32",
    normalize="norm_topk_prob",
    norm_eps=1e-20,
    grouped=True,
)
# Inkling-2: the score function of its config (an activation module) on fp32 logits, its bias,
# normalised (the sum plus 1e-20), scaled.
INKLING2 = Routing(
    "score_fn",
    frozenset({"5d9d14b7e6ed"}),
    logits="fp32",
    norm_eps=1e-20,
    scale="routed_scaling_factor",
)
# Inkling: fp32 sigmoid scores (autocast off) of its routed and shared experts' logits, its bias
# on the routed ones' for the choice, the weights of the chosen and shared experts normalised
# together (a softmax of their log-sigmoids), scaled by its config and its trained global scale.
INKLING = Routing(
    "sigmoid",
    frozenset({"004ac0c6e3a4"}),
    logits="forced_fp32",
    weights_dtype="input",
    scale="route_scale",
    always_chosen="n_shared_experts",
    trained_scale="global_scale",
)
# DeepSeek-V2: fp32 softmax scores, unnormalised, scaled; groups (scored by their best expert)
# where its topk_method says "group_limited_greedy".
DEEPSEEK_V2 = Routing(
    "softmax",
    frozenset({"722cb972537a"}),
    logits="fp32",
    normalize=False,
    grouped=("topk_method", "group_limited_greedy"),
    group_score="max",
    scale="routed_scaling_factor",
)
# DeepSeek-V4's learned routers (its hash routers are left whole): the config's score function
# (sqrtsoftplus by default) in the model's dtype, always normalised, scaled.
DEEPSEEK_V4 = Routing(
    "score_fn",
    frozenset({"5e8aa95cf241"}),
    norm_eps=1e-20,
    weights_dtype="logits",
    scale="routed_scaling_factor",
)
QWEN_MOE = Routing(
    "softmax", frozenset({"793098f9664b"}), normalize="norm_topk_prob", weights_dtype="logits"
)
QWEN_VL_MOE = Routing("softmax", frozenset({"e372ef3a88a8"}), weights_dtype="logits")
# Aria: a softmax over the top-k logits in the model's dtype, which is the normalised softmax.
ARIA = Routing("softmax", frozenset({"a3c4634f4874"}), weights_dtype="logits")
MIXTRAL = Routing("softmax", frozenset({"a27fa18e8112"}))
# Granite: softmax over the top-k logits, which is QWEN_VL's normalised softmax (transformers
# 5.17's Granite routers, which return (ids, weights, logits), are not this code).
GRANITE_MOE = Routing(
    "softmax", frozenset({"6157a64b3d31"}), weights_dtype="logits", returns_fp32_logits=True
)
FLINT = Routing(
    "sigmoid", frozenset({"902a0d9a4d4a"}), logits="forced_fp32", normalize="norm_topk_prob"
)
JAMBA = Routing("softmax", frozenset({"15e16f52d75c"}), normalize=False, weights_dtype="logits")
# MiniMax-M3 (and Step-3.7): the fp32 sigmoid of logits from the tokens cast to the weight's
# dtype, with its bias, normalised.
MINIMAX_M3 = Routing("sigmoid", frozenset({"a5730f5e2f8b"}), logits="weight")
# MiniMax-M2: as MiniMax-M3, the bias being its block's.
MINIMAX_M2 = Routing("sigmoid", frozenset({"a8b9bd48c782"}), logits="weight", bias_argument=BIAS)
# HY-V3: fp32 sigmoid scores, the block's bias, normalised (the sum plus 1e-20) and scaled.
HY_V3 = Routing(
    "sigmoid",
    frozenset({"c6dc11722dad"}),
    logits="fp32",
    norm_eps=1e-20,
    scale="router_scaling_factor",
    bias_argument=BIAS,
)
# AFMoE: a linear gate's logits, returned fp32; as HY-V3 otherwise, the bias its block's
# ``expert_bias``.
AFMOE = Routing(
    "sigmoid",
    frozenset({"68a4834cc3fc"}),
    norm_eps=1e-20,
    scale="route_scale",
    weight="gate.weight",
    bias_argument="expert_bias",
    returns_fp32_logits=True,
)
# LFM2-MoE: sigmoid of logits in the model's dtype; the block's ``expert_bias`` where its config
# uses one; the weights in the logits' dtype, optionally normalised (the sum plus 1e-6), scaled.
LFM2_MOE = Routing(
    "sigmoid",
    frozenset({"c5ee328ebc5f"}),
    normalize="norm_topk_prob",
    norm_eps=1e-6,
    weights_dtype="logits",
    scale="routed_scaling_factor",
    bias_argument="expert_bias",
)
# ERNIE 4.5: fp32 softmax (autocast off), the bias in its ``moe_statics`` ([1, E]), the weight
# sum floored at ``norm_min``, the weights in the tokens' dtype.
ERNIE_4_5 = Routing(
    "softmax",
    frozenset({"5c5e298fef42"}),
    logits="forced_fp32",
    norm_min="norm_min",
    weights_dtype="input",
    bias="moe_statics." + BIAS,
)
# Hunyuan-V1: its gate ``wg`` (fp32 in the checkpoints, which the tokens are cast to), softmax,
# normalised, the weights in the logits' dtype.
HUNYUAN_V1 = Routing(
    "softmax",
    frozenset({"bf07c486d627"}),
    logits="weight",
    weights_dtype="logits",
    weight="wg.weight",
)
# Cohere2-MoE: the config's score function of the top-k logits in the model's dtype: softmax
# (over the k, which is the normalised softmax) or sigmoid, normalised where the config says;
# the weights in the tokens' dtype.
COHERE2_MOE = Routing(
    "expert_selection_fn",
    frozenset({"f0614bb44a16"}),
    normalize=lambda router: router.expert_selection_fn == "softmax" or router.norm_topk_prob,
    weights_dtype="input",
)
# Mistral 4: a softmax in the model's dtype, group-limited (groups scored by their top two, the
# others' experts masked with 0.0, which is -inf's choice for softmax scores, above 0 save where
# they underflow), optionally normalised (the sum plus 1e-20), scaled.
MISTRAL4 = Routing(
    "softmax",
    frozenset({"fa625a16c20d"}),
    normalize="norm_topk_prob",
    norm_eps=1e-20,
    weights_dtype="logits",
    grouped=True,
    scale="routed_scaling_factor",
)
# Mistral Large 4: as Mistral 4, in fp32, always normalised.
MISTRAL_LARGE4 = Routing(
    "softmax",
    frozenset({"4563205e9a5b"}),
    logits="fp32",
    norm_eps=1e-20,
    grouped=True,
    scale="routed_scaling_factor",
)
# Laguna: fp32 sigmoid scores of its soft-capped logits, its bias (a Parameter), normalised, the
# weights in the tokens' dtype (its block scales the experts' output).
LAGUNA = Routing(
    "sigmoid",
    frozenset({"e4c2564b3545"}),
    weights_dtype="input",
    logit_softcap="router_logit_softcapping",
    returns_fp32_logits=True,
)
# Kolibri-1: fp32 logits shifted by its bias for the choice, the weights their sigmoid,
# optionally normalised.
KOLIBRI1 = Routing(
    "sigmoid",
    frozenset({"b8ea17860f35"}),
    logits="fp32",
    normalize="norm_topk_prob",
    choose_on="logits",
)
# Muse Spark: fp32 logits times its output multiplier, sigmoid scores with its bias,
# normalised (the sum plus 1e-15), scaled.
MUSE_SPARK = Routing(
    "sigmoid",
    frozenset({"09b63f6a853b"}),
    logits="fp32",
    norm_eps=1e-15,
    scale="routed_scaling_factor",
    logit_scale="output_multiplier",
)
# The OpenAI privacy filter: gpt-oss's router in fp32, its weights divided by k.
OPENAI_PRIVACY_FILTER = Routing(
    "softmax",
    frozenset({"2cbb97916de0"}),
    logits="fp32",
    scale=lambda router: 1 / router.top_k,
    logits_bias=True,
)
# Gemma 4: its tokens RMS-normed and scaled before its projection, softmax, normalised, then
# each chosen expert's weight multiplied by its trained scale; it returns the probabilities.
GEMMA4 = Routing(
    "softmax",
    frozenset({"d8f02c57b4b5"}),
    weight="proj.weight",
    top_k="config.top_k_experts",
    prepare=lambda router, x: router.norm(x) * router.scale * router.scalar_root_size,
    expert_scale="per_expert_scale",
    returns_probabilities=True,
)


def _dbrx_jitter(router: nn.Module, x: Tensor) -> Tensor:
    # In place, as DBRX's router multiplies its block's tokens, which its experts then take.
    if router.training and router.moe_jitter_eps is not None:
        eps = router.moe_jitter_eps
        x *= torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    return x


# DBRX: its block routes from its router's logits (of its tokens jittered in training where its
# config says): a softmax in the logits' dtype, the top-k divided by their 1-norm (their sum)
# where its block says so (``blocks`` refuses another norm).
DBRX = Routing(
    "softmax",
    frozenset({"81b62d3f032c"}),
    normalize=lambda router: router.moe_block.moe_normalize_expert_weights is not None,
    weights_dtype="logits",
    weight="layer.weight",
    top_k="moe_block.top_k",
    prepare=_dbrx_jitter,
)
# gpt-oss: a softmax over the top-k of biased logits, which is the normalised softmax.
GPT_OSS = Routing("softmax", frozenset({"b1633bd68b47"}), weights_dtype="logits", logits_bias=True)
# Llama 4: the sigmoid of the top-k logits, unnormalised (the top-k of the sigmoid scores: the
# same experts, save where fp32's sigmoid rounds two logits above ~17 to 1.0 alike).
LLAMA4 = Routing(
    "sigmoid",
    frozenset({"6242f55b4598"}),
    normalize=False,
    weights_dtype="logits",
    scores_first=True,
)

# model_type -> (router class, routing). Families missing from the installed transformers are
# skipped when the table is resolved.
ROUTERS: dict[str, tuple[str, Routing]] = {
    "deepseek_v3": ("DeepseekV3TopkRouter", DEEPSEEK_V3),
    "glm4_moe": ("Glm4MoeTopkRouter", DEEPSEEK_V3),
    "glm4v_moe": ("Glm4vMoeTextTopkRouter", DEEPSEEK_V3),
    "glm5_next": ("Glm5NextTextTopkRouter", DEEPSEEK_V3),
    "dots1": ("Dots1TopkRouter", DEEPSEEK_V3),
    "dots3_note": ("Dots3NoteTextTopkRouter", DEEPSEEK_V3),
    "kimi_linear": ("KimiLinearTopkRouter", DEEPSEEK_V3),
    "bailing_hybrid": ("BailingHybridTopkRouter", DEEPSEEK_V3),
    "mimo_v2_flash": ("MiMoV2FlashTopkRouter", DEEPSEEK_V3),
    "deepseek_v32": ("DeepseekV32TopkRouter", DEEPSEEK_V3),
    "glm4_moe_lite": ("Glm4MoeLiteTopkRouter", DEEPSEEK_V3),
    "glm_moe_dsa": ("GlmMoeDsaTopkRouter", DEEPSEEK_V3),
    "solar_open": ("SolarOpenTopkRouter", DEEPSEEK_V3),
    "exaone_moe": ("ExaoneMoeTopkRouter", DEEPSEEK_V3),
    "nemotron_h": ("NemotronHTopkRouter", DEEPSEEK_V3),
    "deepseek_v4": ("DeepseekV4TopKRouter", DEEPSEEK_V4),
    "deepseek_v2": ("DeepseekV2TopkRouter", DEEPSEEK_V2),
    "deepseek_ocr2": ("DeepseekOcr2TextTopkRouter", DEEPSEEK_V2),
    "unlimited_ocr": ("UnlimitedOcrTextTopkRouter", DEEPSEEK_V2),
    "hy_v4": ("HYV4TopkRouter", DEEPSEEK_V3),
    "axk1": ("AXK1TopkRouter", DEEPSEEK_V3),
    "beam": ("BeamTopKRouter", BEAM),
    "inkling": ("InklingTopkRouter", INKLING),
    "inkling2": ("Inkling2TopKRouter", INKLING2),
    "step3p7": ("Step3p7TopKRouter", MINIMAX_M3),
    "hy_v3": ("HYV3TopKRouter", HY_V3),
    "afmoe": ("AfmoeTokenChoiceRouter", AFMOE),
    "lfm2_moe": ("Lfm2MoeTopKRouter", LFM2_MOE),
    "ernie4_5_moe": ("Ernie4_5_MoeTopKRouter", ERNIE_4_5),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeMoeTopKRouter", ERNIE_4_5),
    "hunyuan_v1_moe": ("HunYuanMoEV1Gate", HUNYUAN_V1),
    "qwen2_moe": ("Qwen2MoeTopKRouter", QWEN_MOE),
    "qwen3_moe": ("Qwen3MoeTopKRouter", QWEN_MOE),
    "olmoe": ("OlmoeTopKRouter", QWEN_MOE),
    "mellum": ("MellumTopKRouter", QWEN_MOE),
    "qwen3_next": ("Qwen3NextTopKRouter", QWEN_MOE),
    "qwen3_5_moe": ("Qwen3_5MoeTopKRouter", QWEN_VL_MOE),
    "qwen3_vl_moe": ("Qwen3VLMoeTextTopKRouter", QWEN_VL_MOE),
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerTextTopKRouter", QWEN_MOE),
    "qwen4_exp": ("Qwen4ExpTextTopKRouter", QWEN_MOE),
    "aria": ("AriaTextTopKRouter", ARIA),
    "granitemoe": ("GraniteMoeTopKRouter", GRANITE_MOE),
    "granitemoe_swa": ("GraniteMoeSWATopKRouter", GRANITE_MOE),
    "granitemoehybrid": ("GraniteMoeHybridTopKRouter", GRANITE_MOE),
    "granitemoeshared": ("GraniteMoeSharedTopKRouter", GRANITE_MOE),
    "flint": ("FlintTopKRouter", FLINT),
    "jamba": ("JambaTopKRouter", JAMBA),
    "gpt_oss": ("GptOssTopKRouter", GPT_OSS),
    "llama4": ("Llama4Router", LLAMA4),
    "dbrx": ("DbrxRouter", DBRX),
    "flex_olmo": ("FlexOlmoTopKRouter", QWEN_MOE),
    "mixtral": ("MixtralTopKRouter", MIXTRAL),
    "cohere2_moe": ("Cohere2MoeTopKRouter", COHERE2_MOE),
    "mistral4": ("Mistral4TopkRouter", MISTRAL4),
    "mistral_large4": ("MistralLarge4TextTopkRouter", MISTRAL_LARGE4),
    "laguna": ("LagunaTopKRouter", LAGUNA),
    "gemma4": ("Gemma4TextRouter", GEMMA4),
    "diffusion_gemma": ("DiffusionGemmaTextRouter", GEMMA4),
    "kolibri1": ("Kolibri1TopKRouter", KOLIBRI1),
    "muse_spark": ("MuseSparkTopkRouter", MUSE_SPARK),
    "openai_privacy_filter": ("OpenAIPrivacyFilterTopKRouter", OPENAI_PRIVACY_FILTER),
    "minimax": ("MiniMaxTopKRouter", MIXTRAL),
    "minimax_m2": ("MiniMaxM2TopKRouter", MINIMAX_M2),
    "minimax_m3_vl": ("MiniMaxM3VLTopKRouter", MINIMAX_M3),
}

# Routers of a family beside its ``ROUTERS`` one, in another of its language models: class ->
# (family, routing).
OTHER_ROUTERS: dict[str, tuple[str, Routing]] = {
    # Qwen3-Omni's talker, its speech-codec language model beside its thinker.
    "Qwen3OmniMoeTalkerTextTopKRouter": ("qwen3_omni_moe", QWEN_MOE),
}


def score_function(router: nn.Module, routing: Routing) -> str | None:
    """``biased_topk``'s score_fn for ``router``, or None where the one it holds is none of
    ``SCORE_FUNCTIONS`` or ``SCORE_MODULES``."""
    if routing.score_fn in SCORE_FUNCTIONS:
        return routing.score_fn
    held = getattr(router, routing.score_fn, None)
    if isinstance(held, str):
        return held if held in SCORE_FUNCTIONS else None
    return SCORE_MODULES.get(type(held).__name__)


def supported_routers() -> dict[type[nn.Module], Routing]:
    """The router classes of the installed transformers that ``patch`` replaces: those of
    ``ROUTERS`` and ``OTHER_ROUTERS`` whose ``forward`` is code their recipe was verified
    against."""
    found = {}
    rows = [*ROUTERS.items(), *((f, (name, r)) for name, (f, r) in OTHER_ROUTERS.items())]
    for family, (name, routing) in rows:
        cls = installed_class(family, name)
        if cls is not None and class_forward_digest(cls) in routing.forwards:
            found[cls] = routing
    return found


class FusedRouter(KeepsFp32):
    """Mixed into a router's class by ``patch``: the same ``(router_logits, weights, ids)``
    from one ``biased_topk``, which also counts each expert's tokens.

    Holds, besides the router's own tensors: ``tokens_per_expert`` (a non-persistent [E] int64
    buffer: this training step's counts so far, of the tokens the model's ``attention_mask``
    marks real, see ``padding``) and, with loss-free balancing, the bias the choice adds where
    the router holds it (``Routing.bias``: the model's own where it has one, else a new one),
    kept fp32 whatever the model's dtype. A bias the block passes to ``forward`` is the block's
    (``Routing.bias_argument``), and ``patch`` keeps it fp32 there. ``moe_block``, the block
    ``patch`` found the router in, is an attribute, not a submodule.
    """

    moe_routing: Routing
    moe_balancing: str | None = None
    moe_rate: float = 0.0
    moe_center_bias: bool = False

    @property
    def fp32_tensors(self) -> tuple[str, ...]:
        # Without balancing the model's own bias follows the model's dtype, as it does unpatched.
        if self.moe_balancing != "loss_free" or self.own_bias() is None:
            return ()
        return (self.moe_routing.bias,)

    def own_bias(self) -> Tensor | None:
        """The bias the router holds (``Routing.bias``), or None."""
        try:
            return attrgetter(self.moe_routing.bias)(self)
        except AttributeError:
            return None

    def held_bias(self) -> Tensor | None:
        """The bias the router chooses with, as its holder holds it: its block's where the
        block passes it (``Routing.bias_argument``) and has one, else its own; or None."""
        argument = self.moe_routing.bias_argument
        held = None if argument is None else getattr(self.moe_block, argument, None)
        return self.own_bias() if held is None else held

    def balancing_bias(self) -> Tensor | None:
        """``held_bias`` as [E], a view, which loss-free balancing moves in place."""
        bias = self.held_bias()
        return None if bias is None else bias.view(-1)

    @property
    def router_weight(self) -> Tensor:
        return attrgetter(self.moe_routing.weight)(self)

    @property
    def num_experts(self) -> int:
        """E: the routed experts, whose choice is counted and balanced (the weight's rows but
        those of the experts every token chooses, ``Routing.always_chosen``)."""
        return self.router_weight.shape[0] - self._always_chosen()

    def _always_chosen(self) -> int:
        chosen = self.moe_routing.always_chosen
        return 0 if chosen is None else getattr(self, chosen)

    def forward(
        self, hidden_states: Tensor, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        with nvtx_range("router"):
            return self._route(hidden_states, self.own_bias() if bias is None else bias)

    def _route(self, hidden_states: Tensor, bias: Tensor | None) -> tuple[Tensor, ...]:
        routing = self.moe_routing
        x = hidden_states.reshape(-1, self.router_weight.shape[1])
        logits = self._logits(x)
        counting = self.training and not in_backward_pass()
        shared = self._always_chosen()
        bias = None if bias is None else bias.float().view(-1)
        if shared:
            bias = self._choosing_shared_first(bias, shared, logits.device)
        weights, ids, counts = ops.biased_topk(
            logits,
            bias,
            attrgetter(routing.top_k)(self) + shared,
            score_function(self, routing),
            *routing.groups(self),
            bool(self._attribute(routing.normalize)),
            1.0 if routing.scale is None else float(self._attribute(routing.scale)),
            routing.group_score,
            token_mask=counted_tokens(x.shape[0], x.device) if counting else None,
            norm_eps=routing.norm_eps,
            norm_min=float(self._attribute(routing.norm_min)),
            choose_on=routing.choose_on,
        )
        if counting:
            self.tokens_per_expert += counts[: self.num_experts]
        if routing.expert_scale is not None:
            weights = weights * getattr(self, routing.expert_scale)[ids]
        if routing.trained_scale is not None:
            weights = weights * getattr(self, routing.trained_scale).float()
        if routing.weights_dtype != "fp32":
            weights = weights.to(logits.dtype if routing.weights_dtype == "logits" else x.dtype)
        if routing.returns_fp32_logits:
            logits = logits.float()
        if routing.returns_probabilities:
            logits = F.softmax(logits, dim=-1, dtype=torch.float32)
        if shared:
            routed = (
                logits[:, :-shared],
                weights[:, shared:].contiguous(),
                ids[:, shared:].contiguous(),
            )
            return (*routed, weights[:, :shared].contiguous())
        return (weights, logits, ids) if routing.scores_first else (logits, weights, ids)

    def _choosing_shared_first(self, bias: Tensor | None, shared: int, device) -> Tensor:
        """The [E + S] bias that makes every token choose the ``shared`` experts first: fp32's
        largest value, above any score plus bias, which they tie at (the lower index first)."""
        routed = torch.zeros(self.num_experts, device=device) if bias is None else bias
        return torch.cat([routed, routed.new_full((shared,), torch.finfo(torch.float32).max)])

    def _logits(self, x: Tensor) -> Tensor:
        """The router's logits of the [T, H] tokens, as its code computes them."""
        if self.moe_routing.logits == "forced_fp32":
            with torch.autocast(x.device.type, enabled=False):
                return self._logits_as_coded(x)
        return self._logits_as_coded(x)

    def _logits_as_coded(self, x: Tensor) -> Tensor:
        routing = self.moe_routing
        weight = self.router_weight
        inputs = x if routing.prepare is None else routing.prepare(self, x)
        logits_bias = self.bias if routing.logits_bias else None
        if routing.logits in ("fp32", "forced_fp32"):
            fp32_bias = None if logits_bias is None else logits_bias.float()
            logits = F.linear(inputs.float(), weight.float(), fp32_bias)
        elif routing.logits == "weight":
            logits = F.linear(inputs.to(weight.dtype), weight)
        else:
            logits = F.linear(inputs, weight, logits_bias)
        if routing.logit_scale is not None:
            logits = logits * getattr(self, routing.logit_scale)
        cap = 0.0 if routing.logit_softcap is None else getattr(self, routing.logit_softcap)
        if cap > 0:
            logits = torch.tanh(logits.float() / cap) * cap
        return logits

    def _attribute(self, value):
        # A recipe's value, the name of the router's attribute holding it, or its function.
        if callable(value):
            return value(self)
        return getattr(self, value) if isinstance(value, str) else value
