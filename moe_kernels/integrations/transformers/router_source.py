"""The digest of a router's (or experts module's) ``forward`` code, which ties each recipe to the
code it was verified against: transformers can change a router's code under the same class name
(Granite's router returned its outputs in another order in 5.17), and a recipe must not run in
place of code it does not compute. The digest is of the function's statements as ``ast.unparse`` writes them
(comments, docstring and formatting dropped), the same on every Python version."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import textwrap


def family_of(cls: type) -> str | None:
    """The transformers family whose modeling file defines ``cls`` (None: none does)."""
    package, _, modeling = cls.__module__.rpartition(".")
    family = package.removeprefix("transformers.models.")
    return family if package != family and modeling == f"modeling_{family}" else None


def installed_class(family: str, name: str) -> type | None:
    """Class ``name`` of ``family``'s modeling file in the installed transformers, or None."""
    try:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        return None
    return getattr(module, name, None)


def forward_digest(function: ast.FunctionDef) -> str:
    """12 hex digits of the statements of ``function``, its docstring left out."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    text = "\n".join(ast.unparse(statement) for statement in body)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def class_forward_digest(cls: type, method: str = "forward") -> str | None:
    """The digest of ``cls.<method>`` (None when its source cannot be read)."""
    function = getattr(cls, method, None)
    return None if function is None else _function_digest(function)


# Per function object, so that a method replaced on its class is read again; reading and
# parsing the source of every recipe's class is what ``patch`` would otherwise spend its time on.
@functools.cache
def _function_digest(function: object) -> str | None:
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None
    return forward_digest(ast.parse(source).body[0])


def module_method_digests(source: str) -> dict[str, dict[str, str]]:
    """{class name: {method: digest}} of the methods the classes of a module's source define (a
    method a decorator adds is not in the source)."""
    digests: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    digests.setdefault(node.name, {})[item.name] = forward_digest(item)
    return digests
