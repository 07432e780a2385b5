"""The papers' findings, each checked against the study's numbers: a verdict ("agrees" or "does
not agree" at this scale) and the numbers it rests on, all read from the results."""

from __future__ import annotations

from itertools import pairwise

from .run import COMPUTATION_BATCH_SIZES
from .strategies import AUX_ALPHAS, SEED_ARM, SPLITS, split_pair

# MaxVio "falls" with the computation batch when the largest batch's is this much lower than
# a single sequence's; less is "flat".
FALLS = 0.1


def number(value: float) -> str:
    """How the report prints a number: 4 significant digits."""
    return f"{value:.4g}"


def _verdict(holds: bool) -> str:
    return "agrees" if holds else "does not agree"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def seed_noise(study: dict) -> str:
    """How far chance alone moves the numbers: the same arm from two seeds."""
    arms = study["arms"]
    same = SEED_ARM.removesuffix("_seed1")
    ppl, maxvio = (
        [float(arms[name]["summary"][key]) for name in (same, SEED_ARM)]
        for key in ("val_perplexity", "maxvio_global")
    )
    return (
        f"Every arm is one run from one seed. How much chance alone moves the numbers: "
        f"{same} from seeds 0 and 1 gives perplexity {number(ppl[0])} and {number(ppl[1])}, "
        f"MaxVio_global {number(maxvio[0])} and {number(maxvio[1])}. Differences of that size "
        f"between arms are not evidence either way."
    )


def findings(study: dict) -> list[str]:
    """One Markdown paragraph per finding of the issue, 1 to 4, from ``run_study``'s results."""
    results = study["arms"]

    def summary(name: str, key: str) -> float:
        return float(results[name]["summary"][key])

    def measure(name: str, key: str):
        return results[name]["measures"][key]

    # 1. Loss-free balancing: lower MaxVio_global than the aux loss at equal or better
    # perplexity, for every alpha: some loss-free arm does better on both counts.
    def point(name: str) -> str:
        return (
            f"{name} (MaxVio_global {number(summary(name, 'maxvio_global'))}, perplexity "
            f"{number(summary(name, 'val_perplexity'))})"
        )

    def dominates(a: str, b: str) -> bool:
        return summary(a, "maxvio_global") < summary(b, "maxvio_global") and summary(
            a, "val_perplexity"
        ) <= summary(b, "val_perplexity")

    by_maxvio = sorted(
        (name for name in results if name.startswith("loss_free")),
        key=lambda n: summary(n, "maxvio_global"),
    )
    by_alpha = [f"aux_loss_{alpha}" for alpha in sorted(AUX_ALPHAS, key=float)]
    beaten_by = {
        aux: next((lf for lf in by_maxvio if dominates(lf, aux)), None) for aux in by_alpha
    }
    first = (
        f"1. Loss-free balancing reaches lower MaxVio_global than the aux loss at equal or better "
        f"perplexity (arXiv 2408.15664, Table 2; here: for each alpha, a loss-free arm better on "
        f"both): {_verdict(all(beaten_by.values()))}. "
        + "; ".join(
            f"{point(aux)}: "
            + (f"beaten by {point(lf)}" if lf else "no loss-free arm does better on both")
            for aux, lf in beaten_by.items()
        )
        + "."
    )
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
        by_size = measure(name, "maxvio_by_computation_batch")
        small, large = (
            by_size[str(s)] for s in (COMPUTATION_BATCH_SIZES[0], COMPUTATION_BATCH_SIZES[-1])
        )
        return small, large, (small - large) / small if small else 0.0

    # The best-balanced arm of each.
    loss_free = by_maxvio[0]
    aux = min(by_alpha, key=lambda n: summary(n, "maxvio_global"))
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
    # The one-process grouping against real expert parallelism at small sizes.
    checked = {
        (ranks, name, int(size)): abs(value - measure(name, "maxvio_by_computation_batch")[size])
        for ranks, arms in study["expert_parallel"].items()
        for name, by_size in arms.items()
        for size, value in by_size.items()
    }
    sizes = sorted({size for _, _, size in checked})
    second += (
        f" Grouping sequences in one process stands for expert parallelism: the rows every "
        f"rank's experts received on {' and '.join(study['expert_parallel'])} ranks (computation "
        f"batches of {', '.join(map(str, sizes))} sequences, {len(checked)} runs) "
        f"give MaxVio that differs from it by at most {number(max(checked.values()))}."
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

    # 4. Global-batch balance models better and specialises experts more than micro-batch
    # balance on the same micro-batches (arXiv 2501.11873).
    pairs = [split_pair(split) for split in SPLITS]
    better = all(summary(g, "val_perplexity") < summary(m, "val_perplexity") for m, g in pairs)
    fourth = (
        f"4. Balancing over the global batch models better than over each micro-batch of the "
        f"same size (arXiv 2501.11873): {_verdict(better)}. "
        + "; ".join(
            f"perplexity {number(summary(m, 'val_perplexity'))} ({m}) against "
            f"{number(summary(g, 'val_perplexity'))} ({g})"
            for m, g in pairs
        )
        + "."
    )
    # The paper reads both as specialisation: expert frequencies that differ more between
    # domains, and a router that puts more of its probability on the k experts it picks.
    topk_sum = {name: mean(measure(name, "topk_score_sum")) for pair in pairs for name in pair}
    fourth += (
        f" Its routers are more decided (higher top-k score sum): "
        f"{_verdict(all(topk_sum[g] > topk_sum[m] for m, g in pairs))}: "
        + "; ".join(f"{number(topk_sum[m])} against {number(topk_sum[g])}" for m, g in pairs)
        + "."
    )
    if study["domains"]:
        domain = {name: measure(name, "domain_specialisation") for pair in pairs for name in pair}
        fourth += (
            f" Its experts specialise more by domain (over the held-out text of "
            f"{len(study['domains'])} domains): "
            f"{_verdict(all(domain[g] > domain[m] for m, g in pairs))}: domain specialisation "
            + "; ".join(f"{number(domain[m])} against {number(domain[g])}" for m, g in pairs)
            + "."
        )
    return [first, second, third, fourth]
