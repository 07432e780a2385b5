"""The routers of transformers' MoE families, expressed as ``ops.biased_topk`` calls.

Each supported router class is named here with the routing its ``forward`` computes. Classes
are matched exactly (module and name), never by a base class or a similar name, and only where
their ``forward`` is code the recipe was verified against (``Routing.forwards``): a router that
is not listed, or whose code changed, is not patched. Many families share one router source
(transformers' modular files copy it), so a few recipes cover them all.
"""

from __future__ import annotations

from dataclasses import dataclass

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
            attribute holding its activation module (DeepSeek-V4's, from its config), one of
            ``SCORE_MODULES``.
        fp32_logits: logits from fp32 copies of the tokens and the weight (DeepSeek-V3), else
            ``F.linear`` in the model's dtype.
        normalize: whether the k weights are divided by their sum: a constant, or the name of
            the router's attribute holding it.
        weights_in_logits_dtype: the weights are cast to the logits' dtype (Qwen), else fp32.
        grouped: group-limited routing, read from the router's ``num_group`` and
            ``topk_group``: always, or where the router's attribute has the value of the
            (attribute, value) pair (DeepSeek-V2's ``topk_method``).
        group_score: how a group is scored (``biased_topk``'s group_score).
        scaled: the weights are multiplied by the router's ``routed_scaling_factor``.
        forwards: the digests (``router_source.forward_digest``) of the router ``forward``
            codes this routing computes, each verified by the tests.
        returns_fp32_logits: the logits are computed in the model's dtype but returned as fp32
            (Granite); the weights still take the model's dtype.
        logits_bias: the router's ``bias`` adds to its logits (gpt-oss), a term of the model
            unlike the loss-free bias, which only chooses.
        scores_first: the router returns ``(weights, logits, ids)``, logits second where the
            model records them (Llama 4, whose block ``patch`` replaces: ``blocks``); else
            ``(logits, weights, ids)``.
    """

    score_fn: str
    fp32_logits: bool
    normalize: bool | str
    weights_in_logits_dtype: bool
    forwards: frozenset[str]
    grouped: bool | tuple[str, str] = False
    group_score: str = "top2"
    scaled: bool = False
    returns_fp32_logits: bool = False
    logits_bias: bool = False
    scores_first: bool = False

    def groups(self, router: nn.Module) -> tuple[int, int]:
        """(n_groups, topk_groups) of ``router``'s routing: (1, 1) where it is not grouped."""
        grouped = self.grouped
        if isinstance(grouped, tuple):
            grouped = getattr(router, grouped[0]) == grouped[1]
        return (router.num_group, router.topk_group) if grouped else (1, 1)


DEEPSEEK_V3 = Routing(
    "sigmoid",
    True,
    "norm_topk_prob",
    False,
    frozenset({"84897cf1e1d9"}),
    grouped=True,
    scaled=True,
)
# DeepSeek-V2: fp32 softmax scores, unnormalised, scaled; groups (scored by their best expert)
# where its topk_method says "group_limited_greedy".
DEEPSEEK_V2 = Routing(
    "softmax",
    True,
    False,
    False,
    frozenset({"722cb972537a"}),
    grouped=("topk_method", "group_limited_greedy"),
    group_score="max",
    scaled=True,
)
# DeepSeek-V4's learned routers (its hash routers are left whole): the config's score function
# (sqrtsoftplus by default) in the model's dtype, always normalised, scaled.
DEEPSEEK_V4 = Routing("score_fn", False, True, True, frozenset({"5e8aa95cf241"}), scaled=True)
QWEN_MOE = Routing("softmax", False, "norm_topk_prob", True, frozenset({"793098f9664b"}))
QWEN_VL_MOE = Routing("softmax", False, True, True, frozenset({"e372ef3a88a8"}))
MIXTRAL = Routing("softmax", False, True, False, frozenset({"a27fa18e8112"}))
# Granite: softmax over the top-k logits, which is QWEN_VL's normalised softmax (transformers
# 5.17's Granite routers, which return (ids, weights, logits), are not this code).
GRANITE_MOE = Routing(
    "softmax", False, True, True, frozenset({"6157a64b3d31"}), returns_fp32_logits=True
)
FLINT = Routing("sigmoid", True, "norm_topk_prob", False, frozenset({"902a0d9a4d4a"}))
JAMBA = Routing("softmax", False, False, True, frozenset({"15e16f52d75c"}))
# MiniMax-M3: the fp32 sigmoid of logits in the model's dtype, with its bias, normalised.
MINIMAX_M3 = Routing("sigmoid", False, True, False, frozenset({"a5730f5e2f8b"}))
# gpt-oss: a softmax over the top-k of biased logits, which is the normalised softmax.
GPT_OSS = Routing("softmax", False, True, True, frozenset({"b1633bd68b47"}), logits_bias=True)
# Llama 4: the sigmoid of the top-k logits, unnormalised (the top-k of the sigmoid scores: the
# same experts, save where fp32's sigmoid rounds two logits above ~17 to 1.0 alike).
LLAMA4 = Routing("sigmoid", False, False, True, frozenset({"6242f55b4598"}), scores_first=True)

# model_type -> (router class, routing). Families missing from the installed transformers are
# skipped when the table is resolved.
ROUTERS: dict[str, tuple[str, Routing]] = {
    "deepseek_v3": ("DeepseekV3TopkRouter", DEEPSEEK_V3),
    "glm4_moe": ("Glm4MoeTopkRouter", DEEPSEEK_V3),
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
    "hy_v4": ("HYV4TopkRouter", DEEPSEEK_V3),
    "qwen2_moe": ("Qwen2MoeTopKRouter", QWEN_MOE),
    "qwen3_moe": ("Qwen3MoeTopKRouter", QWEN_MOE),
    "olmoe": ("OlmoeTopKRouter", QWEN_MOE),
    "mellum": ("MellumTopKRouter", QWEN_MOE),
    "qwen3_next": ("Qwen3NextTopKRouter", QWEN_MOE),
    "qwen3_5_moe": ("Qwen3_5MoeTopKRouter", QWEN_VL_MOE),
    "qwen4_exp": ("Qwen4ExpTextTopKRouter", QWEN_MOE),
    "granitemoe": ("GraniteMoeTopKRouter", GRANITE_MOE),
    "granitemoe_swa": ("GraniteMoeSWATopKRouter", GRANITE_MOE),
    "granitemoehybrid": ("GraniteMoeHybridTopKRouter", GRANITE_MOE),
    "granitemoeshared": ("GraniteMoeSharedTopKRouter", GRANITE_MOE),
    "flint": ("FlintTopKRouter", FLINT),
    "jamba": ("JambaTopKRouter", JAMBA),
    "gpt_oss": ("GptOssTopKRouter", GPT_OSS),
    "llama4": ("Llama4Router", LLAMA4),
    "flex_olmo": ("FlexOlmoTopKRouter", QWEN_MOE),
    "mixtral": ("MixtralTopKRouter", MIXTRAL),
    "minimax": ("MiniMaxTopKRouter", MIXTRAL),
    "minimax_m3_vl": ("MiniMaxM3VLTopKRouter", MINIMAX_M3),
}


def score_function(router: nn.Module, routing: Routing) -> str | None:
    """``biased_topk``'s score_fn for ``router``, or None where its activation module is none of
    ``SCORE_MODULES``."""
    if routing.score_fn in SCORE_FUNCTIONS:
        return routing.score_fn
    return SCORE_MODULES.get(type(getattr(router, routing.score_fn, None)).__name__)


def supported_routers() -> dict[type[nn.Module], Routing]:
    """The router classes of the installed transformers that ``patch`` replaces: those of
    ``ROUTERS`` whose ``forward`` is code their recipe was verified against."""
    found = {}
    for family, (name, routing) in ROUTERS.items():
        cls = installed_class(family, name)
        if cls is not None and class_forward_digest(cls) in routing.forwards:
            found[cls] = routing
    return found


class FusedRouter(KeepsFp32):
    """Mixed into a router's class by ``patch``: the same ``(router_logits, weights, ids)``
    from one ``biased_topk``, which also counts each expert's tokens.

    Holds, besides the router's own tensors: ``tokens_per_expert`` (a non-persistent [E] int64
    buffer: this training step's counts so far, of the tokens the model's ``attention_mask``
    marks real, see ``padding``) and, with loss-free balancing, the bias the
    choice adds (``e_score_correction_bias``: the model's own where it has one, else a new
    one), kept fp32 whatever the model's dtype.
    """

    moe_routing: Routing
    moe_balancing: str | None = None
    moe_rate: float = 0.0
    moe_center_bias: bool = False

    @property
    def fp32_tensors(self) -> tuple[str, ...]:
        # Without balancing the model's own bias follows the model's dtype, as it does unpatched.
        return (BIAS,) if self.moe_balancing == "loss_free" else ()

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with nvtx_range("router"):
            return self._route(hidden_states)

    def _route(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        routing = self.moe_routing
        x = hidden_states.reshape(-1, self.weight.shape[1])
        if routing.fp32_logits:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight, self.bias if routing.logits_bias else None)
        bias = getattr(self, BIAS, None)
        counting = self.training and not in_backward_pass()
        weights, ids, counts = ops.biased_topk(
            logits,
            None if bias is None else bias.float(),
            self.top_k,
            score_function(self, routing),
            *routing.groups(self),
            self._normalize(),
            self.routed_scaling_factor if routing.scaled else 1.0,
            routing.group_score,
            token_mask=counted_tokens(x.shape[0], x.device) if counting else None,
        )
        if counting:
            self.tokens_per_expert += counts
        if routing.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        if routing.returns_fp32_logits:
            logits = logits.float()
        return (weights, logits, ids) if routing.scores_first else (logits, weights, ids)

    def _normalize(self) -> bool:
        normalize = self.moe_routing.normalize
        return bool(getattr(self, normalize)) if isinstance(normalize, str) else normalize
