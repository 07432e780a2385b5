"""How ``patch`` classifies each sparse-MoE family of transformers: patched (its router is in
``routing.ROUTERS``), left whole with the reason the ops cannot express it, or to do with the
piece it needs. ``coverage`` writes the table; ``patch`` names the reason in its warning."""

from __future__ import annotations

from torch import nn

from .blocks import BLOCKS, block_code_matches
from .experts import EXPERTS
from .router_source import family_of
from .routing import OTHER_ROUTERS, ROUTERS

# Families patch leaves whole, each with the reason: the ops cannot express their routing or
# experts, or a fused module could not keep their modules' contract at the ops' speed.
LEFT_WHOLE: dict[str, str] = {
    "axk2": (
        "experts of dropped groups keep a choice of 0, not -inf: with negative biases they can "
        "win, which biased_topk never lets happen"
    ),
    "jetmoe": (
        "its block runs its experts itself (no experts module), from a gating module (its "
        "attention experts' too) that returns a dispatch plan sorted by expert, with per-expert "
        "sizes as a Python list, which its model records by position: a fused router would "
        "rebuild that plan, a sort and a host sync per layer"
    ),
    "longcat_flash": "zero-computation (identity) experts",
    "nllb_moe": "expert capacity drops tokens; one module per expert",
    "phimoe": "sparsemixer routing: a masked softmax per slot, sampled in training",
    "switch_transformers": "expert capacity drops tokens; one module per expert",
    "zaya": "an MLP router whose state runs across layers, and a skip expert",
}

# Routers left whole in a family ``patch`` otherwise covers: class -> (family, reason).
LEFT_WHOLE_ROUTERS: dict[str, tuple[str, str]] = {
    "DeepseekV4HashRouter": ("deepseek_v4", "its hash layers pick experts by a token-id table"),
}

# Families the ops can express once the named piece is added; until then ``patch`` leaves them
# whole and names it.
TO_DO: dict[str, str] = {}


# Why a family of ROUTERS is not patched in a transformers version whose code differs.
CHANGED_ROUTER = "its router's code in this transformers is not the code its recipe computes"
CHANGED_EXPERTS = "its experts' code in this transformers is not the code its recipe computes"
CHANGED_BLOCK = "its block's code in this transformers is not the code its recipe computes"


def status_of(
    family: str, method_digests: dict[str, dict[str, str]] | None = None
) -> tuple[str, str] | None:
    """(status, reason) of ``family``, or None where no table names it. ``method_digests``
    (``router_source.module_method_digests`` of the family's modeling file) tells whether a
    family of ``ROUTERS`` has the router (and experts) code its recipes compute; without it, it
    is assumed to."""
    if family in ROUTERS:
        name, routing = ROUTERS[family]
        if method_digests is not None:
            if method_digests.get(name, {}).get("forward") not in routing.forwards:
                return "to do", CHANGED_ROUTER
            experts_name, recipe = EXPERTS.get(family, ("", None))
            if recipe is not None and not recipe.code_matches(experts_name, method_digests):
                return "to do", CHANGED_EXPERTS
            if family in BLOCKS and not block_code_matches(
                BLOCKS[family], method_digests.get(BLOCKS[family].name, {})
            ):
                return "to do", CHANGED_BLOCK
        partly = [reason for f, reason in LEFT_WHOLE_ROUTERS.values() if f == family]
        if method_digests is not None:
            partly += [
                f"{name}: {CHANGED_ROUTER}"
                for name, (f, routing) in OTHER_ROUTERS.items()
                if f == family
                and name in method_digests
                and method_digests[name].get("forward") not in routing.forwards
            ]
        return "patched", "; ".join(f"left whole: {reason}" for reason in partly)
    if family in LEFT_WHOLE:
        return "left whole", LEFT_WHOLE[family]
    if family in TO_DO:
        return "to do", TO_DO[family]
    return None


def family_note(module: nn.Module) -> str:
    """ " (<family>: <reason>)" for a block of a family left whole or to do, or whose router is
    one of ``LEFT_WHOLE_ROUTERS``, else ""."""
    for child in module.children():
        if type(child).__name__ in LEFT_WHOLE_ROUTERS:
            family, reason = LEFT_WHOLE_ROUTERS[type(child).__name__]
            return f" ({family}: {reason})"
    family = family_of(type(module))
    if family is None:
        return ""
    # patch asks only about blocks it leaves whole: a family of ROUTERS then has other code.
    reason = CHANGED_ROUTER if family in ROUTERS else (status_of(family) or ("", ""))[1]
    return f" ({family}: {reason})" if reason else ""
