"""The English docstrings and comments of the running interpreter's standard library: real
prose that every Python ships, so the default corpus needs no download."""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
from pathlib import Path

from .atomic import atomic_write
from .documents import Document, short_sha256, top_folder

# --------------------------------------------------------------------------------------------
# The standard library's docstrings and comments

# Bumped when what is extracted changes, so cached extractions are not reused.
_STDLIB_EXTRACTION_VERSION = 1
# Tests are mostly code and test data; the rest of the stdlib is documented prose.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_PRAGMA = re.compile(r"^!|coding[:=]|\bnoqa\b|^type:|^pragma\b|^pylint:|^fmt:|^mypy:", re.I)
_CODE_START = re.compile(
    r"^(?:import |from \S+ import |def |class |return\b|raise |print\(|elif |else:|try:|"
    r"except\b|finally:|>>>|(?:if|for|while|with) .*:$|[\w.\[\]'\"]+\s*[-+*/|&]?=\s*\S)"
)
_CODE_SYMBOLS = frozenset("()[]{}=<>;*")


def stdlib_documents(cache_dir: Path) -> list[Document]:
    """One document per stdlib module: its docstrings and comments in source order.

    Extracting them takes about 5 s, so they are cached, keyed by the interpreter, the
    stdlib's path and its files' sizes and times (an upgrade in place changes those).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = _stdlib_sources(root)
    stats = [path.stat() for path in sources]
    listing = [
        f"{path}:{st.st_size}:{st.st_mtime_ns}" for path, st in zip(sources, stats, strict=True)
    ]
    key = short_sha256(str(_STDLIB_EXTRACTION_VERSION), sys.version, str(root), *listing)
    cache_path = cache_dir / f"stdlib-{sys.version_info[0]}.{sys.version_info[1]}-{key}.json"
    if cache_path.is_file():
        return [
            Document(name, text, top_folder(name))
            for name, text in json.loads(cache_path.read_bytes())
        ]
    documents = _extract_stdlib_documents(root, sources)
    payload = json.dumps([[doc.name, doc.text] for doc in documents]).encode()
    atomic_write(cache_path, lambda file: file.write(payload))
    return documents


def _stdlib_sources(root: Path) -> list[Path]:
    """The stdlib's .py files, tests and installed packages left out, sorted."""
    sources = []
    for folder, subfolders, files in os.walk(root):
        # Pruned in place, so the walk never enters site-packages (often the bulk of it).
        subfolders[:] = [name for name in subfolders if name not in _EXCLUDED_DIRS]
        sources.extend(Path(folder, name) for name in files if name.endswith(".py"))
    return sorted(sources, key=lambda path: path.relative_to(root).as_posix())


def _extract_stdlib_documents(root: Path, sources: list[Path]) -> list[Document]:
    documents = []
    for path in sources:
        try:
            paragraphs = _python_prose(path.read_bytes())
        except (SyntaxError, tokenize.TokenError, UnicodeDecodeError):
            continue  # not Python this interpreter can read (e.g. a stray Python 2 file)
        if paragraphs:
            name = path.relative_to(root).as_posix()
            documents.append(Document(name, "\n\n".join(paragraphs), top_folder(name)))
    return documents


def _python_prose(source: bytes) -> list[str]:
    """The docstrings and comment paragraphs of Python ``source``, in order of their lines.

    Tokens, not ``ast``: parsing the whole stdlib into trees takes about 9 s, tokenizing it
    about 2 s, and the docstrings found are those ``ast.get_docstring`` gives (all 8605 of
    Python 3.11's).
    """
    tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    pieces = _docstrings(tokens) + _comment_paragraphs(tokens)
    return [text for _, text in sorted(pieces)]


def _docstrings(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, str]]:
    """(line, cleaned docstring) of the module and of each class and function."""
    trivia = (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING)
    code = [token for token in tokens if token.type not in trivia]
    body_starts = [0]  # the module's, then the token after each def/class header's colon
    depth, in_header = 0, False
    for index, token in enumerate(code):
        if token.type == tokenize.NAME and token.string in ("def", "class") and depth == 0:
            in_header = True
        elif token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        elif token.type == tokenize.OP and token.string == ":" and depth == 0 and in_header:
            in_header = False
            body_starts.append(index + 1)
    found = []
    for index in body_starts:
        while index < len(code) and code[index].type in (tokenize.NEWLINE, tokenize.INDENT):
            index += 1
        docstring = _docstring_at(code, index)
        if docstring:
            found.append((code[index].start[0], docstring))
    return found


def _docstring_at(code: list[tokenize.TokenInfo], index: int) -> str | None:
    """The docstring when the statement at ``index`` is a lone string literal."""
    if index + 1 >= len(code) or code[index].type != tokenize.STRING:
        return None
    if code[index + 1].type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
        return None
    try:
        value = ast.literal_eval(code[index].string)
    except (SyntaxError, ValueError):  # an f-string is no docstring
        return None
    return inspect.cleandoc(value) if isinstance(value, str) else None


def _comment_paragraphs(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, str]]:
    """(first line, text) of each run of prose comments on consecutive lines of their own."""
    paragraphs: list[tuple[int, str]] = []
    lines: list[str] = []
    first = last = -1
    for token in tokens:
        if token.type != tokenize.COMMENT or not token.line.lstrip().startswith("#"):
            continue  # a comment after code annotates that line, it is no prose
        line_number = token.start[0]
        text = token.string.lstrip("#").strip()
        prose = _is_prose(text)
        if lines and (line_number != last + 1 or not prose):
            paragraphs.append((first, "\n".join(lines)))
            lines = []
        if prose:
            if not lines:
                first = line_number
            lines.append(text)
        last = line_number
    if lines:
        paragraphs.append((first, "\n".join(lines)))
    return paragraphs


def _is_prose(comment: str) -> bool:
    """Whether a comment's text reads as prose, not a pragma, a rule line or code."""
    if not any(char.isalpha() for char in comment) or _PRAGMA.search(comment):
        return False
    if _CODE_START.match(comment):
        return False
    return sum(char in _CODE_SYMBOLS for char in comment) <= 0.1 * len(comment)
