"""transformers' stacked-expert modules, run as permute -> grouped GEMMs -> unpermute: the SwiGLU
experts of transformers' default layout with the activation fused into the first product, and the
experts of a recipe of their own: gpt-oss's (bias terms, interleaved gate and up columns, a
clamped alpha-SwiGLU) as the products, their biases and ``ops.swiglu``; non-gated experts
(Nemotron-H's relu^2) as the two products with the experts' own activation module between;
experts whose gate, up and down weights are separate (DBRX's) as three products."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..._nvtx import nvtx_range
from ...experts import autocast_operands, swiglu_experts
from .router_source import class_forward_digest, family_of, installed_class

SILU_CLASSES = ("SiLU", "SiLUActivation")


@dataclass(frozen=True)
class SplitWeights:
    """Experts whose gate, up and down weights are separate [E * F, H] tensors (DBRX's
    ``mlp.w1``, ``mlp.v1`` and ``mlp.w2``): gate and up in ``nn.Linear`` layout, down stored for
    ``x @ W``, each expert's F rows in turn; the paths from the experts module, with that of
    its activation module, applied to the gate product which then multiplies the up one."""

    gate: str
    up: str
    down: str
    activation: str


@dataclass(frozen=True)
class ExpertsRecipe:
    """How an experts module computes, in the ops' terms.

    Attributes:
        gated: SwiGLU experts (``gate_up_proj``), else non-gated ones (``up_proj`` [E, F, H],
            then the experts' own ``act_fn``).
        transposed: weights stored for ``x @ W`` (``gate_up_proj`` [E, H, 2F], ``down_proj``
            [E, F, H]), else in ``nn.Linear`` layout ([E, 2F, H], [E, H, F]).
        interleaved: the gate and up columns alternate (gate first), else [gate | up].
        biases: ``gate_up_proj_bias`` [E, 2F] and ``down_proj_bias`` [E, H] add to the products.
        glu: the SwiGLU variant (``ops.swiglu``): alpha (a number, or the attribute holding
            it), the attribute holding the limit, and the up offset; None: SwiGLU.
        fp32: the products, biases and activation run in fp32 whatever the model's dtype (the
            OpenAI privacy filter's), the weights cast as its code casts them; else in the
            model's (or autocast's) dtype.
        post_norm: the name of the experts' norm module applied to each expert's output row
            before its weight (Muse Spark's ``post_expert_norm``, shared by the experts), or
            None.
        own_gate: the experts' own ``_apply_gate``, an elementwise function of each row's
            [gate | up] products the recipe was verified to be (a soft-capped or post-clamped
            SwiGLU), runs between the two grouped GEMMs, unfused, in place of ``glu``.
        split: separate gate, up and down weights (``SplitWeights``), run as three grouped
            GEMMs without copying them, the experts' activation between; None: stacked ones.
        digests: the ``router_source`` digests of the class's ``forward`` and ``_apply_gate``
            the recipe was verified against (None: transformers' default experts, recognised
            by their layout flags instead).
        inner: (class name, ``forward`` digest) of a module of the family that the experts'
            forward calls for each expert (DBRX's ``DbrxExpertGLU``), verified too; or None.
    """

    gated: bool = True
    transposed: bool = False
    interleaved: bool = False
    biases: bool = False
    glu: tuple[float | str, str, float] | None = None
    own_gate: bool = False
    fp32: bool = False
    post_norm: str | None = None
    split: SplitWeights | None = None
    digests: tuple[str | None, str | None] | None = None
    inner: tuple[str, str] | None = None

    @property
    def fused(self) -> bool:
        """Whether the activation runs in the first product's epilogue."""
        unfused = self.interleaved or self.biases or self.own_gate or self.fp32 or self.split
        return self.gated and not unfused

    def code_matches(self, name: str, method_digests: dict[str, dict[str, str | None]]) -> bool:
        """Whether the experts class ``name`` (and its ``inner`` module), as ``method_digests``
        ({class name: {method: digest}}) reads them, have the code the recipe was verified
        against."""
        forward, apply_gate = self.digests
        if self.inner is not None:
            inner, digest = self.inner
            if method_digests.get(inner, {}).get("forward") != digest:
                return False
        methods = method_digests.get(name, {})
        # A gating function a source does not define is the decorator's default.
        return (
            methods.get("forward") == forward
            and methods.get("_apply_gate", apply_gate) == apply_gate
        )

    def num_experts(self, experts: nn.Module) -> int:
        if self.split is not None:
            return experts.num_experts
        return (experts.gate_up_proj if self.gated else experts.up_proj).shape[0]

    def glu_of(self, experts: nn.Module) -> dict[str, float]:
        """The ``alpha``, ``limit`` and ``up_offset`` of ``experts`` ({} for SwiGLU)."""
        if self.glu is None:
            return {}
        alpha, limit, up_offset = self.glu
        alpha = getattr(experts, alpha) if isinstance(alpha, str) else alpha
        return dict(alpha=alpha, limit=getattr(experts, limit), up_offset=up_offset)


DEFAULT_SWIGLU = ExpertsRecipe()
GPT_OSS = ExpertsRecipe(
    transposed=True,
    interleaved=True,
    biases=True,
    glu=("alpha", "limit", 1.0),
    digests=("b71e04124472", "d2280d6cb449"),
)
# Llama 4: SwiGLU experts stored for x @ W (their block weighs their inputs: ``blocks``).
LLAMA4 = ExpertsRecipe(transposed=True, digests=("0946c5fe9204", None))
# Aria: SwiGLU experts stored for x @ W.
ARIA = ExpertsRecipe(transposed=True, digests=("55ffe92f3c3e", "e0dd9c373504"))
# Hunyuan-V4, GLM-5-Next and DeepSeek-V4: a clamped SwiGLU, fused into the first product's
# epilogue.
HY_V4 = ExpertsRecipe(glu=(1.0, "swiglu_limit", 0.0), digests=("a35da7d62505", "d0727b638544"))
DEEPSEEK_V4 = ExpertsRecipe(glu=(1.0, "limit", 0.0), digests=("a35da7d62505", "71529536b176"))
# Beam: SwiGLU computed in fp32, as the fused epilogue computes it.
BEAM = ExpertsRecipe(digests=("a35da7d62505", "09826a8b199d"))
# Step-3.7: SiLU clamped after the activation, up clamped; Inkling-2: a SwiGLU whose gate and up
# factors are soft-capped, in fp32, its experts' outputs summed in fp32: their own gates.
STEP3P7 = ExpertsRecipe(own_gate=True, digests=("a35da7d62505", "e73c0274c903"))
INKLING2 = ExpertsRecipe(own_gate=True, digests=("167dd57b7773", "940a99606cd8"))
# The OpenAI privacy filter: gpt-oss's experts on [gate | up], everything in fp32.
OPENAI_PRIVACY_FILTER = ExpertsRecipe(
    transposed=True,
    biases=True,
    glu=("alpha", "limit", 1.0),
    fp32=True,
    digests=("9fa3d17e85e3", "16dda23ffa11"),
)
# Muse Spark: SwiGLU experts whose outputs pass their shared norm.
MUSE_SPARK = ExpertsRecipe(post_norm="post_expert_norm", digests=("b61d18599b94", "e0dd9c373504"))
# Gemma 4: transformers' default experts with a GELU (tanh) gate, its default gate function.
GEMMA4 = ExpertsRecipe(own_gate=True, digests=("486e509ac627", "e0dd9c373504"))
# MiniMax-M3: gpt-oss's clamped alpha-SwiGLU on [gate | up], without biases: fused.
MINIMAX_M3 = ExpertsRecipe(
    glu=("swiglu_alpha", "swiglu_limit", 1.0), digests=("a35da7d62505", "c2cd555edece")
)
# Nemotron-H: non-gated experts, down(act(up(x))), act its config's (relu^2 by default).
NEMOTRON_H = ExpertsRecipe(gated=False, digests=("4af351fd35c3", "e0dd9c373504"))
# DBRX: act(x @ w1_e^T) * (x @ v1_e^T) @ w2_e, act its config's (SiLU by default).
DBRX = ExpertsRecipe(
    split=SplitWeights("mlp.w1", "mlp.v1", "mlp.w2", "mlp.activation_fn"),
    digests=("566d64911075", None),
    inner=("DbrxExpertGLU", "76eb06668268"),
)

# Experts classes with a recipe of their own: family -> (class name, recipe).
EXPERTS: dict[str, tuple[str, ExpertsRecipe]] = {
    "gpt_oss": ("GptOssExperts", GPT_OSS),
    "llama4": ("Llama4TextExperts", LLAMA4),
    "hy_v4": ("HYV4Experts", HY_V4),
    "glm5_next": ("Glm5NextTextExperts", HY_V4),
    "aria": ("AriaExperts", ARIA),
    "beam": ("BeamExperts", BEAM),
    "step3p7": ("Step3p7Experts", STEP3P7),
    "inkling2": ("Inkling2Experts", INKLING2),
    "gemma4": ("Gemma4TextExperts", GEMMA4),
    "diffusion_gemma": ("DiffusionGemmaTextExperts", GEMMA4),
    "muse_spark": ("MuseSparkExperts", MUSE_SPARK),
    "openai_privacy_filter": ("OpenAIPrivacyFilterExperts", OPENAI_PRIVACY_FILTER),
    "deepseek_v4": ("DeepseekV4Experts", DEEPSEEK_V4),
    "nemotron_h": ("NemotronHExperts", NEMOTRON_H),
    "minimax_m3_vl": ("MiniMaxM3VLExperts", MINIMAX_M3),
    "dbrx": ("DbrxExperts", DBRX),
}


def experts_recipe(experts: nn.Module) -> ExpertsRecipe | str:
    """The recipe ``experts`` runs with, or why it cannot run on this package's ops."""
    cls = type(experts)
    for family, (name, recipe) in EXPERTS.items():
        if cls.__name__ == name and family_of(cls) == family:
            if not _verified(cls, recipe, family):
                return "its experts' code in this transformers is not the code its recipe computes"
            activation = getattr(experts, "act_fn", None)
            swiglu = recipe.gated and not recipe.own_gate
            if swiglu and activation is not None and not _is_silu(activation):
                return f"its experts' activation is {_name_of(activation)}, not SiLU"
            return recipe
    return unsupported_experts(experts) or DEFAULT_SWIGLU


def supported_experts() -> set[type[nn.Module]]:
    """The experts classes of ``EXPERTS`` in the installed transformers whose code their recipes
    were verified against."""
    found = set()
    for family, (name, recipe) in EXPERTS.items():
        cls = installed_class(family, name)
        if cls is not None and _verified(cls, recipe, family):
            found.add(cls)
    return found


def _verified(cls: type, recipe: ExpertsRecipe, family: str) -> bool:
    # The installed classes' digests; a gating function a decorator adds is read too.
    digests = {
        cls.__name__: {
            "forward": class_forward_digest(cls),
            "_apply_gate": class_forward_digest(cls, "_apply_gate"),
        }
    }
    if recipe.inner is not None:
        inner = installed_class(family, recipe.inner[0])
        if inner is not None:
            digests[inner.__name__] = {"forward": class_forward_digest(inner)}
    return recipe.code_matches(cls.__name__, digests)


def unsupported_experts(experts: nn.Module) -> str | None:
    """Why ``experts`` cannot run on this package's ops, or None when it can: SwiGLU experts
    stored as transformers stores them by default (``gate_up_proj`` [E, 2F, H], gate rows
    first, ``down_proj`` [E, H, F], no biases, no post-expert norm, not expert-parallel)."""
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor):
        return "its experts have no stacked gate_up_proj and down_proj weights"
    layout = {
        "has_gate": True,
        "has_bias": False,
        "is_transposed": False,
        "is_concatenated": True,
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
    for flag, expected in layout.items():
        if getattr(experts, flag, expected) != expected:
            return f"its experts have {flag}={not expected}"
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return "its experts have their own gating function"
    activation = getattr(experts, "act_fn", None)
    if not _is_silu(activation):
        return f"its experts' activation is {_name_of(activation)}, not SiLU"
    num_experts, two_ffn, hidden = gate_up.shape if gate_up.dim() == 3 else (0, 0, 0)
    if (
        gate_up.dim() != 3
        or two_ffn % 2
        or tuple(down.shape) != (num_experts, hidden, two_ffn // 2)
    ):
        return (
            f"its expert weights have shapes {tuple(gate_up.shape)} and {tuple(down.shape)}, "
            "not [E, 2F, H] and [E, H, F]"
        )
    return None


def _is_silu(activation: object) -> bool:
    # A module (transformers' ACT2FN) or the function itself (LFM2's F.silu).
    return activation is F.silu or type(activation).__name__ in SILU_CLASSES


def _name_of(activation: object) -> str:
    return getattr(activation, "__name__", type(activation).__name__)


class FusedExperts(nn.Module):
    """Mixed into an experts module's class by ``patch``: the same ``forward(hidden_states,
    top_k_index, top_k_weights)`` on this package's ops, with the module's own weights."""

    moe_backend: str = "auto"
    moe_recipe: ExpertsRecipe = DEFAULT_SWIGLU

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return self.moe_forward(hidden_states, top_k_index, top_k_weights)

    def moe_forward(
        self, hidden_states: Tensor, ids: Tensor, weights: Tensor, weigh_inputs: bool = False
    ) -> Tensor:
        """[T, H] tokens, their [T, k] experts and weights -> [T, H]: the weighted sum of their
        experts' outputs, or with ``weigh_inputs`` the sum of their experts' outputs on the
        weighted tokens (Llama 4)."""
        with nvtx_range("permute"):
            num_experts = self.moe_recipe.num_experts(self)
            rows, row_map, tokens_per_expert = ops.permute(hidden_states, ids, num_experts)
            if weigh_inputs:
                rows = ops.permute_with_map(hidden_states, row_map, weights, rows.shape[0])
        with nvtx_range("experts"):
            if self.moe_recipe.fused:
                rows = swiglu_experts(
                    rows,
                    self.gate_up_proj,
                    self.down_proj,
                    tokens_per_expert,
                    self.moe_backend,
                    linear_layout=not self.moe_recipe.transposed,
                    **self.moe_recipe.glu_of(self),
                )
            else:
                rows = self._experts(rows, tokens_per_expert)
            if self.moe_recipe.post_norm is not None:
                rows = getattr(self, self.moe_recipe.post_norm)(rows)
        with nvtx_range("unpermute"):
            # Under autocast the products run in its dtype; the block's output keeps the input's.
            out = ops.unpermute(rows, row_map, None if weigh_inputs else weights)
            return out.to(hidden_states.dtype)

    def _experts(self, rows: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """The recipe's products, biases and activation, unfused."""
        recipe = self.moe_recipe
        if recipe.split is not None:
            return self._split_experts(rows, tokens_per_expert, recipe.split)
        if not recipe.gated:
            hidden = self.act_fn(self._product(rows, self.up_proj, tokens_per_expert))
            return self._product(hidden, self.down_proj, tokens_per_expert)
        pre = self._product(rows, self.gate_up_proj, tokens_per_expert, "gate_up_proj_bias")
        if recipe.interleaved:  # [g0, u0, g1, u1, ...] -> [gate | up]
            pre = pre.unflatten(1, (-1, 2)).transpose(1, 2).flatten(1)
        hidden = (
            self._apply_gate(pre) if recipe.own_gate else ops.swiglu(pre, **recipe.glu_of(self))
        )
        return self._product(hidden, self.down_proj, tokens_per_expert, "down_proj_bias")

    def _split_experts(
        self, rows: Tensor, tokens_per_expert: Tensor, split: SplitWeights
    ) -> Tensor:
        num_experts = self.moe_recipe.num_experts(self)

        def per_expert(path: str) -> Tensor:  # [E * F, H] -> [E, F, H], a view
            weight = attrgetter(path)(self)
            return weight.view(num_experts, -1, weight.shape[-1])

        gate = self._product(rows, per_expert(split.gate), tokens_per_expert, linear_layout=True)
        up = self._product(rows, per_expert(split.up), tokens_per_expert, linear_layout=True)
        hidden = attrgetter(split.activation)(self)(gate) * up
        return self._product(hidden, per_expert(split.down), tokens_per_expert, linear_layout=False)

    def _product(
        self,
        rows: Tensor,
        weight: Tensor,
        tokens_per_expert: Tensor,
        bias: str | None = None,
        linear_layout: bool | None = None,
    ) -> Tensor:
        rows, weight = (
            (rows.float(), weight.float())
            if self.moe_recipe.fp32
            else autocast_operands(rows, weight)
        )
        if linear_layout is None:
            linear_layout = not self.moe_recipe.transposed
        out = ops.grouped_gemm(rows, weight, tokens_per_expert, linear_layout, self.moe_backend)
        if bias is None or not self.moe_recipe.biases:
            return out
        # Each row's expert's bias (the rows are the experts' segments, in order).
        per_row = (
            getattr(self, bias)
            .to(out.dtype)
            .repeat_interleave(tokens_per_expert, dim=0, output_size=out.shape[0])
        )
        return out + per_row
