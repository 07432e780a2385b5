"""The training data pipeline: corpora and their held-out split, token files, tokenizers,
the token-id cache, and deterministic, resumable batches."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sysconfig
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_kernels.train import stdlib_text
from moe_kernels.train import tokenizer as tokenizer_module
from moe_kernels.train.atomic import atomic_write
from moe_kernels.train.corpus import Corpus, load_corpus
from moe_kernels.train.data import BatchSampler, eval_batches, load_token_file, tokenize_corpus
from moe_kernels.train.documents import default_cache_dir
from moe_kernels.train.tokenizer import BPETokenizer, ByteTokenizer, get_tokenizer

ROUND_TRIP_TEXTS = [
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade, Ærø, ß, İstanbul",
    "日本語のテキストと中文文本",
    "emoji 🎉👍🏽 flags 🇫🇷 zero-width joiner 👩‍💻",
    "def f(x: int) -> int:\n\treturn x ** 2  # squared\r\n",
    "  leading and trailing   spaces \n\n\n and blank lines  ",
    "combining e\u0301 and a\u0308, digits ½ ² ٣ 42_000, symbols <|endoftext|> ~`!@#$%^&*",
    "it's they're we've I'm you'll he'd DON'T",
]


def _no_temp_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def stdlib_corpus(cache_dir) -> Corpus:
    return load_corpus("stdlib", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def small_bpe(stdlib_corpus) -> BPETokenizer:
    return BPETokenizer.train(stdlib_corpus.train, vocab_size=400, max_bytes=200_000)


def _write_folder(root: Path) -> dict[str, str]:
    """A folder of nested text files, a binary, a Latin-1 file and a hidden one; the text of
    each file that must be read, by relative path."""
    texts = {
        f"part{index // 5}/notes/file{index:02}.txt": f"Document {index}.\n\n" + "word " * index
        for index in range(24)
    }
    texts["README.md"] = "A readme with an accent: é.\n"
    for relative, text in texts.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text, encoding="utf-8")
    (root / "part1" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    return texts


# --------------------------------------------------------------------------------------------
# Corpora


def test_stdlib_corpus_is_english_prose(stdlib_corpus):
    text = "\n".join(stdlib_corpus.train)
    assert len(text) > 1_000_000
    for word in (" the ", " of ", " and ", " is "):
        assert text.count(word) > 1000, word
    assert "JSON (JavaScript Object Notation)" in text + "\n".join(stdlib_corpus.val)
    assert "#!/usr/bin/env" not in text and "-*- coding" not in text and "noqa" not in text


def test_stdlib_sources_leave_out_tests_and_installed_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [path.relative_to(root).as_posix() for path in stdlib_text._stdlib_sources(root)]
    assert "json/__init__.py" in relative
    assert relative == sorted(relative)
    for path in relative:
        folders = path.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(folders), path


def test_stdlib_corpus_is_deterministic_and_cached(stdlib_corpus, cache_dir):
    again = load_corpus("stdlib", cache_dir=cache_dir)
    assert again == stdlib_corpus
    assert len(list(cache_dir.glob("stdlib-*.json"))) == 1
    assert _no_temp_files(cache_dir)


def test_split_holds_out_whole_documents(stdlib_corpus):
    train, val = stdlib_corpus.train, stdlib_corpus.val
    assert train and val
    assert not set(train) & set(val)
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.15
    # Each held-out module's domain is its package (or itself): several modules share one.
    assert len(stdlib_corpus.val_domains) == len(val)
    assert "/" not in "".join(stdlib_corpus.val_domains)
    assert len(set(stdlib_corpus.val_domains)) < len(val)


def test_python_comments_become_prose_paragraphs():
    source = b'''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""The module docstring."""
import os  # a trailing comment is left out

# First line of a comment
# and its second line.
#
# A second paragraph.
# x = compute(a, b)
# -------------------


def f(a, b=lambda: 0) -> dict[str, int]:
    """Docstring of f.

    With a body.
    """
    value = 1  # type: ignore
    return {f"{value}": a}  # noqa: E501


class C(Base): "One-line class docstring."
'''
    assert stdlib_text._python_prose(source) == [
        "The module docstring.",
        "First line of a comment\nand its second line.",
        "A second paragraph.",
        "Docstring of f.\n\nWith a body.",
        "One-line class docstring.",
    ]


def test_folder_corpus_reads_every_text_file_and_skips_binaries(tmp_path):
    texts = _write_folder(tmp_path)
    corpus = load_corpus(str(tmp_path))
    assert corpus.name == str(tmp_path)
    assert corpus.train and corpus.val
    assert sorted(corpus.train + corpus.val) == sorted(texts.values())
    ordered = [texts[name] for name in sorted(texts)]
    assert corpus.train == [text for text in ordered if text in corpus.train]
    assert load_corpus(str(tmp_path)) == corpus
    # A file's domain is its top folder, or its own name at the top.
    domain = {text: name.split("/")[0].removesuffix(".md") for name, text in texts.items()}
    assert corpus.val_domains == [domain[text] for text in corpus.val]
    assert corpus.train_domains == [domain[text] for text in corpus.train]


@pytest.mark.parametrize("val_fraction", [0.001, 0.999])
def test_split_keeps_a_document_on_each_side(tmp_path, val_fraction):
    (tmp_path / "one.txt").write_text("The first document.")
    (tmp_path / "two.txt").write_text("The second document.")
    corpus = load_corpus(str(tmp_path), val_fraction=val_fraction)
    assert len(corpus.train) == len(corpus.val) == 1


def test_corpus_fingerprint_follows_text_and_split(tmp_path):
    _write_folder(tmp_path)
    corpus = load_corpus(str(tmp_path))
    assert load_corpus(str(tmp_path), val_fraction=0.5).fingerprint != corpus.fingerprint
    (tmp_path / "README.md").write_text("Changed.\n")
    assert load_corpus(str(tmp_path)).fingerprint != corpus.fingerprint


def test_single_file_corpus_is_split_into_paragraph_chunks(tmp_path):
    paragraphs = [f"Paragraph {index}. " + " ".join(["Some words."] * 60) for index in range(60)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    corpus = load_corpus(str(path))
    assert corpus.train and corpus.val
    documents = corpus.train + corpus.val
    assert all(len(document) >= 2000 for document in documents)
    assert sorted(p for document in documents for p in document.split("\n\n")) == sorted(paragraphs)
    assert set(corpus.val_domains) == {"book"}


def test_missing_or_unusable_sources_name_the_path(tmp_path):
    missing = tmp_path / "no such corpus"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_corpus(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        load_corpus(str(empty))
    (empty / "only.txt").write_text("One short document.")
    with pytest.raises(ValueError, match="at least 2"):
        load_corpus(str(empty))


@pytest.mark.skipif(shutil.which("bible") is None, reason="needs `apt-get install bible-kjv`")
def test_kjv_corpus_has_one_document_per_chapter():
    corpus = load_corpus("kjv")
    chapters = corpus.train + corpus.val
    assert len(chapters) == 1189 and 20 < len(corpus.val) < 100
    genesis_2 = next(chapter for chapter in chapters if chapter.startswith("Thus the heavens"))
    assert genesis_2.split("\n")[1].startswith("And on the seventh day God ended his work")
    assert sum(chapter.count("\n") + 1 for chapter in chapters) == 31102  # verses, a line each
    # A chapter's domain is its book: 66 of them, a few held out.
    assert all(re.fullmatch(r"\d?[A-Za-z]+", book) for book in corpus.val_domains)
    assert 5 < len(set(corpus.val_domains)) <= 66


def test_kjv_corpus_absent_says_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
        load_corpus("kjv")


# --------------------------------------------------------------------------------------------
# Token files


def _is_memory_mapped_view(array: np.ndarray) -> bool:
    return isinstance(array, np.memmap) and not array.flags.owndata


def test_npy_token_file_splits_off_a_tail_without_copying(tmp_path):
    tokens = np.arange(1000, dtype=np.int32) * 7
    np.save(tmp_path / "tokens.npy", tokens)
    train, val = load_token_file(tmp_path / "tokens.npy")
    np.testing.assert_array_equal(train, tokens[:950])
    np.testing.assert_array_equal(val, tokens[950:])
    assert _is_memory_mapped_view(train) and _is_memory_mapped_view(val)


def test_bin_token_file_is_little_endian_uint16(tmp_path):
    tokens = np.arange(0, 60_000, 300, dtype="<u2")
    tokens.tofile(tmp_path / "train.bin")
    train, val = load_token_file(tmp_path / "train.bin", val_fraction=0.1)
    assert train.dtype == np.uint16 and len(train) == 180 and len(val) == 20
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
    assert _is_memory_mapped_view(train) and _is_memory_mapped_view(val)


def test_unusable_token_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_token_file(tmp_path / "absent.npy")
    np.save(tmp_path / "matrix.npy", np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D integer"):
        load_token_file(tmp_path / "matrix.npy")
    (tmp_path / "tokens.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=".npy or .bin"):
        load_token_file(tmp_path / "tokens.txt")


# --------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trips():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eot_id) == (257, 256)
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode([104, 105, 256]) == "hi<|endoftext|>"


def test_bpe_round_trips_any_text(small_bpe):
    for text in ROUND_TRIP_TEXTS:
        assert small_bpe.decode(small_bpe.encode(text)) == text
    assert small_bpe.encode("") == []


def test_bpe_compresses_held_out_text(small_bpe, stdlib_corpus):
    held_out = "\n".join(stdlib_corpus.val)[:50_000]
    ids = small_bpe.encode(held_out)
    assert len(ids) < 0.75 * len(held_out.encode("utf-8"))
    assert max(ids) < small_bpe.eot_id


def test_bpe_vocabulary_layout(small_bpe):
    assert small_bpe.vocab_size == 400 and len(small_bpe.merges) == 400 - 257
    assert small_bpe.eot_id == small_bpe.vocab_size - 1
    ids = small_bpe.encode(" ".join(ROUND_TRIP_TEXTS))
    assert small_bpe.eot_id not in ids and max(ids) < small_bpe.vocab_size
    assert small_bpe.decode([small_bpe.eot_id]) == "<|endoftext|>"
    for outside in (-1, small_bpe.vocab_size):
        with pytest.raises(ValueError, match="ids must be in"):
            small_bpe.decode([65, outside])


def test_bpe_training_is_deterministic(small_bpe, stdlib_corpus):
    again = BPETokenizer.train(stdlib_corpus.train, vocab_size=400, max_bytes=200_000)
    assert again.merges == small_bpe.merges and again.fingerprint == small_bpe.fingerprint


def test_bpe_merges_most_frequent_pair_smallest_first():
    tokenizer = BPETokenizer.train(["abab", "cdcd"], vocab_size=260)
    # (a, b) and (c, d) appear twice each, the smaller pair first; then (ab, ab) and (cd, cd)
    # tie at once each and the smaller, (ab, ab), is next.
    assert tokenizer.merges == [(97, 98), (99, 100), (256, 256)]


def _naive_bpe_merges(texts: list[str], num_merges: int) -> list[tuple[int, int]]:
    """BPE the slow, obvious way: count every pair of every pre-token again for each merge."""
    words = [
        list(word.encode()) for text in texts for word in tokenizer_module._PRETOKEN.findall(text)
    ]
    merges = []
    for new_id in range(256, 256 + num_merges):
        counts = Counter(pair for word in words for pair in pairwise(word))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [tokenizer_module._replace_pair(word, best, new_id) for word in words]
    return merges


def test_bpe_incremental_counts_match_a_naive_recount(stdlib_corpus):
    texts = [text[:3000] for text in stdlib_corpus.train[:8]]
    tokenizer = BPETokenizer.train(texts, vocab_size=257 + 80)
    assert tokenizer.merges == _naive_bpe_merges(texts, 80)


def test_bpe_stops_when_pairs_run_out():
    tokenizer = BPETokenizer.train(["abc"], vocab_size=1000)
    assert tokenizer.merges == [(97, 98), (256, 99)]
    assert tokenizer.vocab_size == 259 and tokenizer.encode("abc") == [257]


def test_bpe_save_and_load(small_bpe, tmp_path):
    small_bpe.save(tmp_path / "bpe.json")
    loaded = BPETokenizer.load(tmp_path / "bpe.json")
    assert loaded.merges == small_bpe.merges and loaded.fingerprint == small_bpe.fingerprint
    text = ROUND_TRIP_TEXTS[5]
    assert loaded.encode(text) == small_bpe.encode(text)
    assert _no_temp_files(tmp_path)


def test_bpe_refuses_a_vocabulary_without_room_for_bytes():
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer.train(["text"], vocab_size=256)


def _small_corpus(stdlib_corpus: Corpus) -> Corpus:
    return Corpus(
        "small",
        stdlib_corpus.train[:30],
        stdlib_corpus.val[:3],
        stdlib_corpus.train_domains[:30],
        stdlib_corpus.val_domains[:3],
        "small-corpus",
    )


def test_get_tokenizer_trains_on_train_text_once_then_loads(stdlib_corpus, tmp_path, monkeypatch):
    corpus = _small_corpus(stdlib_corpus)
    seen = []
    real_train = BPETokenizer.train.__func__

    def spy_train(cls, texts, vocab_size, max_bytes=4_000_000):
        seen.append(texts)
        return real_train(cls, texts, vocab_size, max_bytes)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(spy_train))
    first = get_tokenizer("bpe", corpus, 300, tmp_path)
    assert len(seen) == 1 and seen[0] is corpus.train

    def refuse_train(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cached tokenizer")

    monkeypatch.setattr(BPETokenizer, "train", refuse_train)
    second = get_tokenizer("bpe", corpus, 300, tmp_path)
    assert second.merges == first.merges and second.vocab_size == 300


def test_get_tokenizer_kinds(stdlib_corpus, tmp_path):
    corpus = _small_corpus(stdlib_corpus)
    assert isinstance(get_tokenizer("bytes", corpus, 0, tmp_path), ByteTokenizer)
    with pytest.raises(
        ValueError, match=r"tokenizer must be one of \('bpe', 'bytes'\), got 'words'"
    ):
        get_tokenizer("words", corpus, 1000, tmp_path)
    with pytest.raises(ValueError, match="at least 257"):
        get_tokenizer("bpe", corpus, 100, tmp_path)


# --------------------------------------------------------------------------------------------
# Token ids of a corpus


def test_tokenize_corpus_ends_each_document_and_caches(tmp_path, monkeypatch):
    corpus = Corpus("tiny", ["ab", "ć"], ["z"], ["letters"] * 2, ["letters"], "tiny-corpus")
    tokenizer = ByteTokenizer()
    train, val = tokenize_corpus(corpus, tokenizer, tmp_path)
    assert train.dtype == torch.int64 and val.dtype == torch.int64
    assert train.tolist() == [97, 98, 256, 0xC4, 0x87, 256]
    assert val.tolist() == [122, 256]
    assert len(list(tmp_path.glob("tokens-tiny-corpus-*.npy"))) == 2
    assert _no_temp_files(tmp_path)

    def refuse_encode(text):
        raise AssertionError("encoded again instead of loading the cached ids")

    monkeypatch.setattr(tokenizer, "encode", refuse_encode)
    cached_train, cached_val = tokenize_corpus(corpus, tokenizer, tmp_path)
    assert torch.equal(cached_train, train) and torch.equal(cached_val, val)


# --------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("as_numpy", [False, True], ids=["tensor", "numpy"])
def test_batches_are_windows_with_targets_shifted(as_numpy):
    tokens = torch.arange(1000, dtype=torch.int32)
    sampler = BatchSampler(tokens.numpy() if as_numpy else tokens, 8, 16, seed=0)
    for _ in range(5):
        inputs, targets = sampler.next_batch()
        assert inputs.shape == targets.shape == (8, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(targets, inputs + 1)
        assert torch.equal(inputs, inputs[:, :1] + torch.arange(16))
        assert inputs.min() >= 0 and targets.max() <= 999
    assert sampler.batches_drawn == 5


def test_batches_reach_both_ends():
    sampler = BatchSampler(torch.arange(10), 64, 8, seed=1)
    starts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(4)])
    assert set(starts.tolist()) == {0, 1}


def test_sampler_resumes_exactly_from_a_checkpoint():
    tokens = torch.arange(5000)
    uninterrupted = BatchSampler(tokens, 4, 32, seed=1234)
    for _ in range(3):
        uninterrupted.next_batch()
    checkpoint = io.BytesIO()
    torch.save(uninterrupted.state_dict(), checkpoint)
    expected = [uninterrupted.next_batch() for _ in range(4)]

    resumed = BatchSampler(tokens, 4, 32, seed=1234)
    checkpoint.seek(0)
    resumed.load_state_dict(torch.load(checkpoint))
    assert resumed.batches_drawn == 3
    for (inputs, targets), (expected_inputs, expected_targets) in zip(
        (resumed.next_batch() for _ in range(4)), expected, strict=True
    ):
        assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)


def test_different_seeds_draw_different_batches():
    tokens = torch.arange(5000)
    first = BatchSampler(tokens, 4, 32, seed=0).next_batch()[0]
    assert not torch.equal(first, BatchSampler(tokens, 4, 32, seed=1).next_batch()[0])


def test_sampler_refuses_too_few_tokens_and_a_mismatched_state():
    with pytest.raises(ValueError, match="too few"):
        BatchSampler(torch.arange(16), 2, 16, seed=0)
    sampler = BatchSampler(torch.arange(100), 2, 16, seed=0)
    with pytest.raises(ValueError, match="batch_size, seq_len"):
        sampler.load_state_dict(BatchSampler(torch.arange(100), 2, 8, seed=0).state_dict())


def test_eval_batches_are_consecutive_windows_within_max_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = eval_batches(tokens, batch_size=4, seq_len=10, max_tokens=250)
    inputs = torch.cat([batch[0] for batch in batches])
    targets = torch.cat([batch[1] for batch in batches])
    assert [len(batch[0]) for batch in batches] == [4] * 6 + [1]
    assert inputs.dtype == torch.int64 and inputs.numel() <= 250
    assert torch.equal(inputs.flatten(), torch.arange(250))
    assert torch.equal(targets, inputs + 1)
    again = eval_batches(tokens, batch_size=4, seq_len=10, max_tokens=250)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_eval_batches_bounds():
    tokens = torch.arange(40)
    assert len(eval_batches(tokens, 8, 10, max_tokens=3)[0][0]) == 1  # one window at least
    everything = eval_batches(tokens, 8, 10, max_tokens=10_000)
    assert everything[0][0].shape == (3, 10)  # 39 targets make 3 windows, not 4
    with pytest.raises(ValueError, match="too few"):
        eval_batches(torch.arange(10), 8, 10, max_tokens=100)


# --------------------------------------------------------------------------------------------
# The cache


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_KERNELS_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MOE_KERNELS_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "moe_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "moe_kernels"


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    path = tmp_path / "sub" / "entry.bin"
    atomic_write(path, lambda file: file.write(b"first"))
    assert path.read_bytes() == b"first"

    def interrupted(file):
        file.write(b"half of the second")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"first"
    assert _no_temp_files(tmp_path)
    assert [entry.name for entry in path.parent.iterdir()] == ["entry.bin"]


def test_cache_files_are_readable_by_others(tmp_path):
    path = tmp_path / "entry.bin"
    atomic_write(path, lambda file: file.write(b"x"))
    umask = subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True).stdout
    assert path.stat().st_mode & 0o777 == 0o666 & ~int(umask, 8)
