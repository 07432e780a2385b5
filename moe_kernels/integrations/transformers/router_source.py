"""The digest of a router's (or experts module's) ``forward`` code, which ties each recipe to the
code it was verified against: transformers can change a router's code under the same class name
(Granite's router returned its outputs in another order in 5.17), and a recipe must not run in
place of code it does not compute. The digest is of the function's statements as ``ast.unparse`` writes them
(comments, docstring and formatting dropped), the same on every Python version."""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap


def forward_digest(function: ast.FunctionDef) -> str:
    """12 hex digits of the statements of ``function``, its docstring left out."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    text = "\n".join(ast.unparse(statement) for statement in body)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def class_forward_digest(cls: type, method: str = "forward") -> str | None:
    """The digest of ``cls.<method>`` (None when its source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    except (AttributeError, OSError, TypeError):
        return None
    return forward_digest(ast.parse(source).body[0])


def module_forward_digests(source: str) -> dict[str, str]:
    """{class name: digest of its ``forward``} of the classes a module's source defines."""
    digests = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward":
                    digests[node.name] = forward_digest(item)
    return digests
