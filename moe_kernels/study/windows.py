"""The text the study measures its models on.

Balance is a property of a router on the distribution it was trained on, so it is measured on
random windows of the *training* text (forward only, no gradient): the held-out documents mix
domains the models never saw. Domain specialisation is measured on windows that lie wholly in
one domain's training text, for domains with text enough. Perplexity stays on the held-out
documents, the one question about text never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..train.config import TrainConfig
from ..train.corpus import load_corpus
from ..train.documents import default_cache_dir
from ..train.loop import prepare_data
from ..train.tokenizer import get_tokenizer

# The windows' own generator: the same windows for every arm and seed, drawn apart from any
# training seed's batches.
WINDOW_SEED = 2408


@dataclass(frozen=True)
class StudyWindows:
    """``balance``: [N, S] random training windows; ``by_domain``: [D * W, S] windows, W per
    domain in the order of ``domains``, with ``domain_labels`` [D * W] their domain's index;
    ``held_out``: the held-out token ids (1-D)."""

    balance: Tensor
    by_domain: Tensor
    domain_labels: Tensor
    domains: list[str]
    held_out: Tensor = field(repr=False)


def random_windows(tokens: Tensor, count: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """[count, seq_len] windows of ``tokens`` at uniformly random starts."""
    if len(tokens) < seq_len:
        raise ValueError(f"{len(tokens)} tokens are too few for a window of {seq_len}")
    starts = torch.randint(len(tokens) - seq_len + 1, (count,), generator=generator)
    return tokens[starts[:, None] + torch.arange(seq_len)]


def token_domains(tokens: Tensor, eot_id: int, document_domains: list[int]) -> Tensor:
    """The domain index of every token of a stream of documents, each ended by ``eot_id``
    (``data.tokenize_corpus``): document i's tokens, its end included, get
    ``document_domains[i]``."""
    ends = tokens == eot_id
    if int(ends.sum()) != len(document_domains):
        raise ValueError(
            f"the stream holds {int(ends.sum())} documents, {len(document_domains)} domains given"
        )
    document = torch.cumsum(ends, 0) - ends.long()
    return torch.tensor(document_domains, dtype=torch.long)[document]


def domain_windows(
    tokens: Tensor,
    domains_of_tokens: Tensor,
    names: list[str],
    num_domains: int,
    per_domain: int,
    seq_len: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, list[str]]:
    """``per_domain`` random windows lying wholly in each of the ``num_domains`` domains with
    the most such windows (at least ``per_domain``), in order of name: ([D * W, S] windows,
    [D * W] labels, the D names)."""
    same_as_next = domains_of_tokens[1:] == domains_of_tokens[:-1]
    # A window from t is one domain's when the seq_len - 1 steps after t stay in it.
    breaks = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (~same_as_next).long()]), 0)
    starts = torch.arange(len(tokens) - seq_len + 1)
    whole = breaks[starts] == breaks[starts + seq_len - 1]
    starts, owners = starts[whole], domains_of_tokens[starts[whole]]
    available = torch.bincount(owners, minlength=len(names))
    ranked = [d for d in available.argsort(descending=True).tolist() if available[d] >= per_domain]
    chosen = sorted(ranked[:num_domains], key=lambda d: names[d])
    windows, labels = [], []
    for label, domain in enumerate(chosen):
        candidates = starts[owners == domain]
        picked = candidates[torch.randperm(len(candidates), generator=generator)[:per_domain]]
        windows.append(tokens[picked[:, None] + torch.arange(seq_len)])
        labels.append(torch.full((per_domain,), label, dtype=torch.long))
    if not windows:
        empty = torch.empty(0, seq_len, dtype=tokens.dtype)
        return empty, torch.empty(0, dtype=torch.long), []
    return torch.cat(windows), torch.cat(labels), [names[d] for d in chosen]


def study_windows(
    config: TrainConfig, balance_windows: int, num_domains: int, per_domain: int
) -> StudyWindows:
    """The windows of ``config``'s data (its corpus and tokenizer, cached), drawn by
    ``WINDOW_SEED``. A token file has no domains: ``by_domain`` is then empty."""
    data = prepare_data(config, default_cache_dir())
    generator = torch.Generator().manual_seed(WINDOW_SEED)
    balance = random_windows(data.train, balance_windows, config.seq_len, generator)
    if config.data.endswith((".npy", ".bin")):
        empty = torch.empty(0, config.seq_len, dtype=data.train.dtype)
        return StudyWindows(balance, empty, torch.empty(0, dtype=torch.long), [], data.val)
    corpus = load_corpus(config.data)
    tokenizer = get_tokenizer(
        config.tokenizer, corpus, config.model.vocab_size, default_cache_dir()
    )
    names = sorted(set(corpus.train_domains))
    index = {name: i for i, name in enumerate(names)}
    per_token = token_domains(
        data.train, tokenizer.eot_id, [index[d] for d in corpus.train_domains]
    )
    by_domain, labels, domains = domain_windows(
        data.train, per_token, names, num_domains, per_domain, config.seq_len, generator
    )
    return StudyWindows(balance, by_domain, labels, domains, data.val)
