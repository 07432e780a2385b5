"""The papers' findings, each tested against the study's runs by a criterion stated before its
numbers: paired differences over seeds, oriented so the paper's claim is positive, each with
its 95% t-interval and a verdict by ``stats.verdict`` (agrees / does not agree /
inconclusive). Every number is read from the runs."""

from __future__ import annotations

from .stats import (
    AGREES,
    DOES_NOT_AGREE,
    Interval,
    combined,
    mean_interval,
    paired_difference,
    verdict,
)
from .strategies import (
    BALANCE_GROUPS,
    FRONTIER_ALPHAS,
    PAPER_ALPHA,
    QWEN_ALPHA,
    TABLE_PAIR,
    aux_arm,
    group_arm,
)

# arXiv 2408.15664, Table 2 (1B model): perplexity 9.56 with the aux loss, 9.50 loss-free,
# as the part measures it: relative to loss-free's.
PAPER_PERPLEXITY_GAIN = 9.56 / 9.50 - 1
# Balance a "binding" coefficient reaches (MaxVio_global at or below it).
BINDING_MAXVIO = 0.3
# Finding 3: a logit moved by more than this (relative) is a leak; float rounding stays below
# the second.
LEAKS, SEALED = 1e-3, 1e-5
CANNOT_SHOW = "cannot show at this scale"


def number(value: float) -> str:
    """How the report prints a number: 4 significant digits."""
    return f"{value:.4g}"


def interval_text(interval: dict, percent: bool = False) -> str:
    """``mean [low, high]`` (as percentages with ``percent``)."""
    scale, unit = (100, "%") if percent else (1, "")
    low, high = (
        number(scale * interval[k]) + unit if abs(interval[k]) != float("inf") else "n/a"
        for k in ("low", "high")
    )
    return f"{number(scale * interval['mean'])}{unit} [{low}, {high}]"


def _read(measures: dict, key: str) -> float | None:
    for name in key.split("."):
        if name not in measures:
            return None
        measures = measures[name]
    return float(measures)


def measured(study: dict, arm: str, key: str) -> bool:
    """Whether every run of ``arm`` has the measure ``key``."""
    return all(_read(run["measures"], key) is not None for run in study["runs"][arm].values())


def per_seed(study: dict, arm: str, key: str, seeds: list[str] | None = None) -> list[float]:
    """An arm's measure ``key`` (``outer.inner`` for a nested one) from each of ``seeds``
    (default: all its seeds)."""
    runs = study["runs"][arm]
    values = [_read(runs[seed]["measures"], key) for seed in (seeds or list(runs))]
    if None in values:
        raise KeyError(f"{arm} has no measure {key!r} in every run")
    return values


def shared_seeds(study: dict, *arms: str) -> list[str]:
    """The seeds every one of ``arms`` was trained from, in order: the pairs."""
    seeds = [set(study["runs"][arm]) for arm in arms]
    return sorted(set.intersection(*seeds), key=int)


def first_seed(study: dict, arm: str) -> str:
    return min(study["runs"][arm], key=int)


# How a part's quantity names each measure.
LABELS = {
    "maxvio_global": "MaxVio_global",
    "perplexity": "perplexity",
    "topk_score_sum": "topk",
    "domain_specialisation.corrected": "specialisation",
}


def part(
    name: str, quantity: str, interval: Interval, paper_effect: float = 0.0, relative: bool = False
) -> dict:
    """One tested quantity: its interval and verdict; ``relative``: a fraction of a measure
    (the report prints it as a percentage)."""
    return {
        "name": name,
        "quantity": quantity,
        "relative": relative,
        "interval": interval.to_dict(),
        "paper_effect": paper_effect,
        "verdict": verdict(interval, paper_effect),
    }


def paired(study: dict, key: str, better: str, worse: str, relative: bool = False) -> Interval:
    """``key`` of ``better`` minus that of ``worse`` over their shared seeds (relative to
    ``worse`` with ``relative``)."""
    seeds = shared_seeds(study, better, worse)
    return paired_difference(
        per_seed(study, better, key, seeds), per_seed(study, worse, key, seeds), relative
    )


def paired_part(
    study: dict,
    name: str,
    key: str,
    better: str,
    worse: str,
    relative: bool = False,
    paper_effect: float = 0.0,
) -> dict:
    """The part testing that ``better``'s ``key`` exceeds ``worse``'s (``paired``), its
    quantity written from the same arguments."""
    label = LABELS[key]
    difference = f"{label}({better}) - {label}({worse})"
    quantity = f"({difference}) / {label}({worse})" if relative else difference
    interval = paired(study, key, better, worse, relative)
    return part(name, quantity, interval, paper_effect, relative)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table_2(study: dict) -> dict:
    """Finding 1: loss-free balances better than the aux loss at the paper's alpha and models
    at least as well; on the frontier of alphas, the aux arm that balances as well models
    worse; and the dilemma of alpha itself."""
    aux, loss_free = TABLE_PAIR
    parts = [
        paired_part(study, "balance at the paper's alpha", "maxvio_global", aux, loss_free),
        paired_part(
            study,
            "perplexity at the paper's alpha",
            "perplexity",
            aux,
            loss_free,
            relative=True,
            paper_effect=PAPER_PERPLEXITY_GAIN,
        ),
    ]
    notes = []
    loss_free_balance = _mean(per_seed(study, loss_free, "maxvio_global"))
    alphas = sorted((PAPER_ALPHA, *FRONTIER_ALPHAS), key=float)
    matched = next(
        (
            aux_arm(a)
            for a in alphas
            if _mean(per_seed(study, aux_arm(a), "maxvio_global")) <= loss_free_balance
        ),
        None,
    )
    if matched is None:
        notes.append(
            f"No alpha up to {alphas[-1]} balances as well as {loss_free} (MaxVio_global "
            f"{number(loss_free_balance)}): the frontier is compared at {aux_arm(alphas[-1])}, "
            "the best-balanced aux arm."
        )
    matched = matched or aux_arm(alphas[-1])
    parts.append(
        paired_part(
            study,
            "perplexity on the frontier, at equal or better balance",
            "perplexity",
            matched,
            loss_free,
            relative=True,
        )
    )
    low, high = aux_arm(PAPER_ALPHA), aux_arm("1e-2")
    dilemma = [
        paired_part(
            study, "the dilemma: a larger alpha balances better", "maxvio_global", low, high
        ),
        paired_part(
            study,
            "the dilemma: a larger alpha models worse",
            "perplexity",
            high,
            low,
            relative=True,
        ),
    ]
    return {
        "number": 1,
        "claim": (
            "Loss-free balancing reaches better balance than the aux loss with equal or better "
            "perplexity (arXiv 2408.15664, Table 2), and lies beyond the aux loss's "
            "balance-perplexity frontier, whose alpha trades one for the other (Figure 2)."
        ),
        "criterion": (
            f"Paired seeds; each part is a difference oriented so the paper's claim is "
            f"positive, with its 95% t-interval over the seeds. Agrees: the interval lies above "
            f"0. Does not agree: it lies below the paper's effect (0 for balance; for "
            f"perplexity at the paper's alpha, Table 2's gain of "
            f"{number(100 * PAPER_PERPLEXITY_GAIN)}%). Inconclusive: otherwise. The frontier "
            f"part compares loss-free with the smallest alpha whose mean MaxVio_global is at "
            f"most loss-free's. MaxVio_global is measured on random training windows."
        ),
        "parts": parts + dilemma,
        "verdict": combined([p["verdict"] for p in parts]),
        "notes": notes,
    }


def figure_5(study: dict) -> dict:
    """Finding 2: over large computation batches the aux loss stays near its plateau while
    loss-free keeps falling and ends below it."""
    aux, loss_free = TABLE_PAIR
    low, high = (str(size) for size in study["design"]["large_batches"])
    seeds = shared_seeds(study, aux, loss_free)

    def at(arm: str, size: str) -> list[float]:
        return [
            float(study["runs"][arm][seed]["measures"]["computation_batch"][size]["mean"])
            for seed in seeds
        ]

    def fall(arm: str) -> list[float]:
        return [1 - b / a for a, b in zip(at(arm, low), at(arm, high), strict=True)]

    parts = [
        part(
            f"loss-free falls more from {low} to {high} windows",
            f"fall({loss_free}) - fall({aux}), fall = 1 - MaxVio({high}) / MaxVio({low})",
            paired_difference(fall(loss_free), fall(aux)),
        ),
        part(
            f"loss-free ends lower at {high} windows",
            f"MaxVio_{high}({aux}) - MaxVio_{high}({loss_free})",
            paired_difference(at(aux, high), at(loss_free, high)),
        ),
    ]
    plateau = _mean(per_seed(study, loss_free, "maxvio_global", seeds))
    noise = float(study["balanced_router"][low]["mean"])
    shows = plateau < noise
    notes = [
        f"From {low} to {high} windows MaxVio falls {number(100 * _mean(fall(aux)))}% under "
        f"{aux} and {number(100 * _mean(fall(loss_free)))}% under {loss_free} (means over "
        "seeds)."
    ]
    if not shows:
        notes.append(
            f"Cannot show at this scale: {loss_free}'s plateau (MaxVio over every window, "
            f"{number(plateau)}) is above the MaxVio of a perfectly balanced router on {low} "
            f"windows ({number(noise)}), so from {low} windows on its curve is mostly its "
            "plateau: what is left of its fall is sampling noise fading above that plateau, "
            "which the parts above cannot tell from the paper's fall toward a plateau below "
            "the noise of its batches (0.04 there). Showing it needs a better-balanced "
            "controller (longer training at the paper's rate) or more tokens per window."
        )
    return {
        "number": 2,
        "claim": (
            "MaxVio per computation batch keeps falling as the batch grows under loss-free "
            "balancing, while the aux loss stays near its plateau (arXiv 2408.15664, Figure 5)."
        ),
        "criterion": (
            f"Computation batches of n random training windows, {study['design']['curve_groups']} "
            f"draws per n, per model; the curve's mean at n = {low} and n = {high}, paired over "
            f"seeds. Agrees: loss-free's relative fall from {low} to {high} windows exceeds the "
            f"aux loss's, and its MaxVio at {high} is lower (both intervals above 0). Does not "
            f"agree: either interval below 0. Inconclusive: otherwise. The test can show the "
            f"effect only if loss-free's plateau lies below a perfectly balanced router's "
            f"MaxVio at {low} windows; if not, the verdict is '{CANNOT_SHOW}'."
        ),
        "parts": parts,
        "verdict": combined([p["verdict"] for p in parts]) if shows else CANNOT_SHOW,
        "notes": notes + expert_parallel_notes(study),
    }


def expert_parallel_notes(study: dict) -> list[str]:
    """What the expert-parallel check proves: the rows the ranks' experts received give the
    one-process computation batches' MaxVio."""
    if not study["expert_parallel"]:
        return []
    differences = [
        abs(value - float(study["runs"][arm][seed]["measures"]["consecutive_batches"][size]))
        for ranks, by_arm in study["expert_parallel"].items()
        for arm, by_size in by_arm.items()
        for seed in [first_seed(study, arm)]
        for size, value in by_size.items()
    ]
    return [
        f"Expert parallelism on {' and '.join(study['expert_parallel'])} ranks: the rows each "
        f"rank's experts received, summed over the ranks, give MaxVio that differs from the "
        f"one-process grouping of the same windows by at most {number(max(differences))} "
        f"({len(differences)} comparisons). This proves the dispatcher "
        "and the computation-batch accounting: the curves above, computed in one process, are "
        "what expert-parallel ranks see."
    ]


def leakage(study: dict) -> dict:
    """Finding 3: expert choice leaks future tokens, token choice does not."""
    moved = {
        arm: max(float(run["measures"]["future_token_leakage"]) for run in seeds.values())
        for arm, seeds in study["runs"].items()
    }
    expert_choice = moved.pop("expert_choice")
    token_choice = max(moved.values())
    holds = expert_choice > LEAKS and token_choice < SEALED
    return {
        "number": 3,
        "claim": (
            "Expert choice leaks future tokens into earlier outputs; token choice, with any "
            "bias, does not (arXiv 2408.15664, section 5)."
        ),
        "criterion": (
            f"The later half of a batch's tokens replaced by random ones: agrees if the earlier "
            f"logits move by more than {LEAKS:g} of the largest logit under expert choice and by "
            f"less than {SEALED:g} (float rounding) under every token-choice run; otherwise "
            f"does not agree. A property of the computation, exact on any seed: no interval."
        ),
        "parts": [],
        "verdict": AGREES if holds else DOES_NOT_AGREE,
        "notes": [
            f"Earlier logits move by {number(expert_choice)} of the largest logit under expert "
            f"choice, at most {number(token_choice)} under any token-choice run."
        ],
    }


def global_batch(study: dict) -> dict:
    """Finding 4: balancing over the whole micro-batch (global) against each sequence (micro),
    at a binding alpha: perplexity, router confidence, domain specialisation."""
    micro, global_ = group_arm(BALANCE_GROUPS[0]), aux_arm(QWEN_ALPHA)
    parts = [
        paired_part(study, "perplexity", "perplexity", micro, global_, relative=True),
        paired_part(study, "top-k score sum", "topk_score_sum", global_, micro),
    ]
    if study["domains"]:
        parts.append(
            paired_part(
                study,
                "domain specialisation, null-corrected",
                "domain_specialisation.corrected",
                global_,
                micro,
            )
        )
    balance = _mean(per_seed(study, global_, "maxvio_global"))
    notes = [
        f"{global_} reaches MaxVio_global {number(balance)} (a coefficient that binds reaches "
        f"about {BINDING_MAXVIO} or less)."
    ]
    if study["domains"]:
        corrected = mean_interval(per_seed(study, global_, "domain_specialisation.corrected"))
        notes.append(
            f"{global_}'s null-corrected specialisation: {interval_text(corrected.to_dict())} "
            "(above 0 when its experts serve domains unequally beyond what chance gives)."
        )
    return {
        "number": 4,
        "claim": (
            "Balancing over the global batch rather than each micro-batch (here: each "
            "domain-homogeneous sequence) lowers perplexity, makes the router more decided and "
            "lets experts specialise by domain (arXiv 2501.11873)."
        ),
        "criterion": (
            f"The aux loss at alpha {QWEN_ALPHA} over balance groups of 1 sequence (micro) "
            f"against the whole micro-batch of {study['design']['tokens_per_step'] // study['design']['seq_len']} "
            f"sequences (global), equal compute, paired seeds; differences oriented so the "
            f"paper's claim is positive, with 95% t-intervals. Agrees: every interval above "
            f"0. Does not agree: any interval below 0. Inconclusive: otherwise. Specialisation "
            f"is measured on {study['design']['windows_per_domain']} training windows of each of "
            f"{len(study['domains'])} domains, minus the mean over "
            f"{study['design']['null_permutations']} shuffles of the domain labels."
        ),
        "parts": parts,
        "verdict": combined([p["verdict"] for p in parts]),
        "notes": notes,
    }


def findings(study: dict) -> list[dict]:
    """The four findings of ``run_study``'s results, each {"number", "claim", "criterion",
    "parts": [{"name", "quantity", "interval", "paper_effect", "verdict"}], "verdict",
    "notes"}."""
    return [table_2(study), figure_5(study), leakage(study), global_batch(study)]
