"""Tokenizers that need no download: UTF-8 bytes, and a byte-level BPE trained on the corpus.

Both map any text to ids and back exactly, and both have an end-of-text id (the last id of
the vocabulary) that ``encode`` never produces: it marks where a document ends.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Protocol

from .atomic import atomic_write
from .corpus import Corpus
from .errors import BadArgument

END_OF_TEXT = "<|endoftext|>"  # how ``decode`` shows the end-of-text id

# GPT-2's pre-tokenizer in the stdlib's ``re`` (no \p{L}, \p{N}): contractions, words with
# their leading space, numbers, runs of other symbols, then whitespace, the last space of a
# run going to the word after it. [^\W\d_] is a letter; the alternatives cover every character.
_PRETOKEN = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")
_NUM_BYTES = 256
# The pre-token -> ids cache is cleared when it grows past this, bounding its memory.
_ENCODE_CACHE_LIMIT = 1 << 18


class Tokenizer(Protocol):
    """What the data pipeline and the training loop need of a tokenizer."""

    vocab_size: int
    eot_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text 256: ``vocab_size`` 257."""

    vocab_size = _NUM_BYTES + 1
    eot_id = _NUM_BYTES
    fingerprint = _fingerprint("bytes")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; bytes that are no UTF-8 become U+FFFD, end-of-text shows as
        ``END_OF_TEXT``."""
        return _decode_pieces(ids, _BYTE_PIECES, self.eot_id)


_BYTE_PIECES = [bytes([byte]) for byte in range(_NUM_BYTES)]


def _decode_pieces(ids: Iterable[int], pieces: list[bytes], eot_id: int) -> str:
    ids = list(ids)
    if ids and not 0 <= min(ids) <= max(ids) <= eot_id:
        raise ValueError(f"ids must be in [0, {eot_id}], got {min(ids)} to {max(ids)}")
    eot = END_OF_TEXT.encode()
    data = b"".join(eot if i == eot_id else pieces[i] for i in ids)
    return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, 256 + i is the i-th merge, and the last id
    (``vocab_size - 1``) is end-of-text.

    ``merges[i]`` is the pair of ids that id 256 + i replaces. Encoding splits text into
    pre-tokens (words, numbers, symbol runs, whitespace) and applies the merges within each,
    earliest merge first, as training learned them.
    """

    def __init__(self, merges: list[tuple[int, int]]) -> None:
        for index, (left, right) in enumerate(merges):
            if not (0 <= left < _NUM_BYTES + index and 0 <= right < _NUM_BYTES + index):
                raise ValueError(f"merge {index} {(left, right)} uses an id not yet defined")
        self.merges = [(int(left), int(right)) for left, right in merges]
        self.vocab_size = _NUM_BYTES + len(self.merges) + 1
        self.eot_id = self.vocab_size - 1
        self.fingerprint = _fingerprint("bpe", _PRETOKEN.pattern, json.dumps(self.merges))
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._pieces = list(_BYTE_PIECES)
        for left, right in self.merges:
            self._pieces.append(self._pieces[left] + self._pieces[right])
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, max_bytes: int = 4_000_000
    ) -> BPETokenizer:
        """Learn ``vocab_size - 257`` merges from the first ``max_bytes`` bytes of ``texts``.

        Each merge joins the most frequent adjacent pair of ids within pre-tokens, the
        smallest pair among equally frequent ones. Fewer merges are learned (and
        ``vocab_size`` is smaller) only when the text runs out of pairs.
        """
        _check_bpe_vocab_size(vocab_size)
        counts = _pretoken_counts(_leading_bytes(texts, max_bytes))
        return cls(_learn_merges(counts, vocab_size - _NUM_BYTES - 1))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for pretoken in _PRETOKEN.findall(text):
            pretoken_ids = cache.get(pretoken)
            if pretoken_ids is None:
                if len(cache) >= _ENCODE_CACHE_LIMIT:
                    cache.clear()
                pretoken_ids = cache[pretoken] = self._merge(pretoken.encode("utf-8"))
            ids.extend(pretoken_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; bytes that are no UTF-8 become U+FFFD, end-of-text shows as
        ``END_OF_TEXT``."""
        return _decode_pieces(ids, self._pieces, self.eot_id)

    def _merge(self, data: bytes) -> list[int]:
        """The ids of one pre-token: its bytes, merged by rank until no merge applies."""
        ids = list(data)
        ranks = self._ranks
        while len(ids) > 1:
            pair = min(pairwise(ids), key=lambda pair: ranks.get(pair, len(ranks)))
            if pair not in ranks:
                break
            ids = _replace_pair(ids, pair, _NUM_BYTES + ranks[pair])
        return ids

    def save(self, path: str | Path) -> None:
        """Write the merges to ``path`` as JSON, atomically."""
        payload = json.dumps({"vocab_size": self.vocab_size, "merges": self.merges}).encode()
        atomic_write(Path(path), lambda file: file.write(payload))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        saved = json.loads(Path(path).read_text())
        tokenizer = cls([tuple(pair) for pair in saved["merges"]])
        if tokenizer.vocab_size != saved["vocab_size"]:
            raise ValueError(
                f"{path}: vocab_size {saved['vocab_size']} does not match its "
                f"{len(tokenizer.merges)} merges"
            )
        return tokenizer


TOKENIZERS = ("bpe", "bytes")


def get_tokenizer(
    kind: str, corpus: Corpus, vocab_size: int, cache_dir: Path
) -> ByteTokenizer | BPETokenizer:
    """The tokenizer of ``kind``: ``"bytes"`` (``vocab_size`` unused) or ``"bpe"``.

    A BPE learns from ``corpus.train`` only, never the held-out text, and is cached under
    ``cache_dir`` by corpus fingerprint and vocabulary size: a later run loads it.
    """
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise BadArgument(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")
    _check_bpe_vocab_size(vocab_size)
    path = Path(cache_dir) / f"bpe-{corpus.fingerprint}-{vocab_size}.json"
    if path.is_file():
        return BPETokenizer.load(path)
    tokenizer = BPETokenizer.train(corpus.train, vocab_size)
    tokenizer.save(path)
    return tokenizer


def _check_bpe_vocab_size(vocab_size: int) -> None:
    if vocab_size < _NUM_BYTES + 1:
        raise BadArgument(
            f"a BPE vocab_size must be at least 257 (bytes + end-of-text), got {vocab_size}"
        )


# --------------------------------------------------------------------------------------------
# Training


def _leading_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """``texts`` cut off after ``max_bytes`` bytes of UTF-8 (a character cut in two is
    dropped)."""
    left = max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if len(data) >= left:
            yield data[:left].decode("utf-8", errors="ignore")
            return
        left -= len(data)
        yield text


def _pretoken_counts(texts: Iterable[str]) -> Counter[bytes]:
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(_PRETOKEN.findall(text))
    return Counter({pretoken.encode("utf-8"): count for pretoken, count in counts.items()})


def _learn_merges(pretoken_counts: Counter[bytes], num_merges: int) -> list[tuple[int, int]]:
    """The first ``num_merges`` merges of BPE over the pre-tokens (fewer if pairs run out).

    Pair counts are kept up to date incrementally: a merge rewrites only the words that hold
    its pair, found through ``words_with``, and adjusts the counts of the pairs those words
    lose and gain. A heap of (-count, pair) gives the next merge; entries whose count is
    out of date are skipped when they surface.
    """
    words = [list(pretoken) for pretoken in pretoken_counts]
    frequencies = list(pretoken_counts.values())
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    words_with: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, frequency) in enumerate(zip(words, frequencies, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += frequency
            words_with[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        best = _most_frequent(heap, pair_counts)
        if best is None:
            break
        new_id = _NUM_BYTES + len(merges)
        merges.append(best)
        touched: set[tuple[int, int]] = set()
        for index in sorted(words_with.pop(best)):
            old, new = words[index], _replace_pair(words[index], best, new_id)
            words[index] = new
            old_pairs, new_pairs = list(pairwise(old)), list(pairwise(new))
            for pair in old_pairs:
                pair_counts[pair] -= frequencies[index]
            for pair in new_pairs:
                pair_counts[pair] += frequencies[index]
                words_with[pair].add(index)
            for pair in set(old_pairs).difference(new_pairs):
                words_with[pair].discard(index)
            touched.update(old_pairs, new_pairs)
        for pair in touched:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
                words_with.pop(pair, None)
    return merges


def _most_frequent(
    heap: list[tuple[int, tuple[int, int]]], pair_counts: dict[tuple[int, int], int]
) -> tuple[int, int] | None:
    """The pair of the highest count (the smallest such pair), None when none is left."""
    while heap:
        negative_count, pair = heap[0]
        if pair_counts.get(pair) == -negative_count:
            return pair
        heapq.heappop(heap)  # its count changed since it was pushed
    return None


def _replace_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``ids`` with each occurrence of ``pair`` (left to right) replaced by ``new_id``."""
    out = []
    index = 0
    while index < len(ids):
        if index + 1 < len(ids) and ids[index] == pair[0] and ids[index + 1] == pair[1]:
            out.append(new_id)
            index += 2
        else:
            out.append(ids[index])
            index += 1
    return out
