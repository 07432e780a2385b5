"""The text the study measures on: random training windows, each token's domain, windows that
lie in one domain, and the quick preset's windows drawn from its real corpus."""

from __future__ import annotations

import pytest
import torch

from moe_kernels.study.run import STUDY_PRESETS
from moe_kernels.study.windows import (
    domain_windows,
    random_windows,
    study_windows,
    token_domains,
)
from moe_kernels.train.corpus import load_corpus
from moe_kernels.train.documents import default_cache_dir
from moe_kernels.train.loop import prepare_data

EOT = 99


def test_token_domains_follow_the_end_of_text_ids():
    # Documents [1, 2, EOT] [3, EOT] [4, 5, 6, EOT] of domains 2, 0, 2.
    stream = torch.tensor([1, 2, EOT, 3, EOT, 4, 5, 6, EOT])
    assert token_domains(stream, EOT, [2, 0, 2]).tolist() == [2, 2, 2, 0, 0, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="3 documents, 2 domains"):
        token_domains(stream, EOT, [2, 0])


def test_domain_windows_lie_wholly_in_one_domain():
    # Domain runs: 0 x 10, 1 x 3, 0 x 6, 2 x 20 tokens.
    per_token = torch.tensor([0] * 10 + [1] * 3 + [0] * 6 + [2] * 20)
    stream = torch.arange(len(per_token))
    generator = torch.Generator().manual_seed(0)
    windows, labels, names = domain_windows(
        stream, per_token, ["c", "b", "a"], num_domains=5, per_domain=4, seq_len=5,
        generator=generator,
    )  # fmt: skip
    # Domain "b" (index 1) has no 5-token window; "a" (2) has 16, "c" (0) 6 + 2: both kept,
    # in order of name.
    assert names == ["a", "c"]
    assert labels.tolist() == [0] * 4 + [1] * 4
    for window, label in zip(windows, labels, strict=True):
        domain = {0: 2, 1: 0}[int(label)]
        assert (per_token[window] == domain).all()
        assert torch.equal(window, torch.arange(int(window[0]), int(window[0]) + 5))
    assert len({tuple(w.tolist()) for w in windows}) == 8  # no window twice
    # Only the domain with the most windows when one is asked for.
    _, _, names = domain_windows(stream, per_token, ["c", "b", "a"], 1, 4, 5, generator)
    assert names == ["a"]


def test_random_windows_stay_inside_the_stream():
    stream = torch.arange(50)
    windows = random_windows(stream, 200, 8, torch.Generator().manual_seed(0))
    assert windows.shape == (200, 8)
    assert (windows[:, 1:] - windows[:, :-1] == 1).all()
    assert int(windows.min()) == 0 and int(windows.max()) == 49  # both ends reached
    with pytest.raises(ValueError, match="too few"):
        random_windows(stream, 1, 51, torch.Generator())


def test_the_quick_presets_windows_come_from_the_training_text():
    preset = STUDY_PRESETS["quick"]
    config = preset.train
    windows = study_windows(
        config, preset.balance_windows, preset.domains, preset.windows_per_domain
    )
    data = prepare_data(config, default_cache_dir())
    assert windows.balance.shape == (preset.balance_windows, config.seq_len)
    assert torch.equal(windows.held_out, data.val)
    corpus = load_corpus(config.data)
    assert len(windows.domains) == preset.domains
    assert set(windows.domains) <= set(corpus.train_domains)
    assert windows.by_domain.shape == (preset.domains * preset.windows_per_domain, config.seq_len)
    train = data.train.tolist()
    text = ",".join(map(str, train))
    for window in [*windows.balance[:20], *windows.by_domain[:: preset.windows_per_domain]]:
        assert ",".join(map(str, window.tolist())) in text  # a window of the training stream
    assert study_windows(
        config, preset.balance_windows, preset.domains, preset.windows_per_domain
    ).balance.equal(windows.balance)  # the same windows every time
