"""The papers' findings, each checked against the study's numbers: a verdict ("agrees" or "does
not agree" at this scale) and the numbers it rests on, all read from the results."""

from __future__ import annotations

from itertools import pairwise

from .run import COMPUTATION_BATCH_SIZES

# MaxVio "falls" with the computation batch when the largest batch's is this much lower than
# a single sequence's; less is "flat".
FALLS = 0.1


def number(value: float) -> str:
    """How the report prints a number: 4 significant digits."""
    return f"{value:.4g}"


def _verdict(holds: bool) -> str:
    return "agrees" if holds else "does not agree"


def findings(results: dict) -> list[str]:
    """One Markdown paragraph per finding of the issue (1-4; expert specialisation aside)."""

    def summary(name: str, key: str) -> float:
        return float(results[name]["summary"][key])

    def arms(prefix: str) -> list[str]:
        return [name for name in results if name.startswith(prefix)]

    # 1. Loss-free balancing: lower MaxVio_global than the aux loss at equal or better perplexity.
    loss_free = min(arms("loss_free"), key=lambda n: summary(n, "maxvio_global"))
    aux = min(arms("aux_loss"), key=lambda n: summary(n, "maxvio_global"))
    holds = summary(loss_free, "maxvio_global") < summary(aux, "maxvio_global") and summary(
        loss_free, "val_perplexity"
    ) <= summary(aux, "val_perplexity")
    first = (
        f"1. Loss-free balancing beats the aux loss on balance at equal or better perplexity "
        f"(arXiv 2408.15664, Table 2): {_verdict(holds)}. Best-balanced loss-free arm "
        f"{loss_free}: MaxVio_global {number(summary(loss_free, 'maxvio_global'))}, perplexity "
        f"{number(summary(loss_free, 'val_perplexity'))}; best-balanced aux-loss arm {aux}: "
        f"{number(summary(aux, 'maxvio_global'))}, {number(summary(aux, 'val_perplexity'))}."
    )
    by_alpha = sorted(arms("aux_loss"), key=lambda n: float(n.rsplit("_", 1)[1]))
    maxvio = [summary(n, "maxvio_global") for n in by_alpha]
    perplexity = [summary(n, "val_perplexity") for n in by_alpha]
    dilemma = all(a > b for a, b in pairwise(maxvio)) and all(
        a <= b for a, b in pairwise(perplexity)
    )
    first += (
        f" The dilemma (a larger alpha balances better and models worse, its Figure 2): "
        f"{_verdict(dilemma)}: "
        + "; ".join(
            f"{n}: MaxVio_global {number(m)}, perplexity {number(p)}"
            for n, m, p in zip(by_alpha, maxvio, perplexity, strict=True)
        )
        + "."
    )

    # 2. MaxVio per computation batch falls with its size under loss-free, not under the aux loss.
    def drop(name: str) -> tuple[float, float, float]:
        by_size = results[name]["measures"]["maxvio_by_computation_batch"]
        small, large = (
            by_size[str(s)] for s in (COMPUTATION_BATCH_SIZES[0], COMPUTATION_BATCH_SIZES[-1])
        )
        return small, large, (small - large) / small if small else 0.0

    lf_small, lf_large, lf_drop = drop(loss_free)
    aux_small, aux_large, aux_drop = drop(aux)
    second = (
        f"2. MaxVio per computation batch falls as the batch grows under loss-free balancing and "
        f"stays flat under the aux loss (its Figure 5; here: at least {number(100 * FALLS)}% lower "
        f"against less): {_verdict(lf_drop >= FALLS > aux_drop)}. From "
        f"{COMPUTATION_BATCH_SIZES[0]} to {COMPUTATION_BATCH_SIZES[-1]} sequences, {loss_free} "
        f"goes {number(lf_small)} -> {number(lf_large)} ({number(100 * lf_drop)}% lower), {aux} "
        f"{number(aux_small)} -> {number(aux_large)} ({number(100 * aux_drop)}% lower)."
    )

    # 3. Expert choice leaks future tokens; token choice does not.
    token_choice = max(
        float(arm["measures"]["future_token_leakage"])
        for name, arm in results.items()
        if name != "expert_choice"
    )
    expert_choice = float(results["expert_choice"]["measures"]["future_token_leakage"])
    third = (
        f"3. Expert choice leaks future tokens and token choice does not: "
        f"{_verdict(expert_choice > 1e-3 and token_choice < 1e-5)}. Changing the later half of "
        f"the batch's tokens moves earlier logits by {number(expert_choice)} of the largest logit "
        f"under expert choice, at most {number(token_choice)} under any token-choice arm."
    )

    # 4. Global-batch balance models better than micro-batch balance (arXiv 2501.11873).
    micro = summary("aux_loss_1e-3", "val_perplexity")
    global_arms = {n: summary(n, "val_perplexity") for n in arms("global_aux_loss")}
    fourth = (
        f"4. Balancing over the global batch models better than over each micro-batch "
        f"(arXiv 2501.11873): {_verdict(all(p < micro for p in global_arms.values()))}. "
        f"Perplexity {number(micro)} with the micro-batch loss (aux_loss_1e-3), "
        + ", ".join(f"{number(p)} with {n}" for n, p in global_arms.items())
        + "."
    )
    return [first, second, third, fourth]
