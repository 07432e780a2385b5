"""Which sparse-MoE families of the installed transformers ``patch`` covers, and why not others.

    python -m moe_kernels.integrations.transformers.coverage              # the table
    python -m moe_kernels.integrations.transformers.coverage --readme README.md

A family is a folder of ``transformers.models`` whose modeling file defines a sparse-MoE experts
module (a class named ``...Experts``), with its status from ``families``. A test fails when the
installed transformers has a family ``families`` does not classify, and when the README's table
is not the one this module writes for the transformers it names.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from .families import status_of
from .router_source import module_method_digests

STATUSES = ("patched", "left whole", "to do")
_EXPERTS = re.compile(r"^class (\w*Experts)\(", re.M)
# Routers are named ...Router or ...Gating, or ...MoE...Gate (HunYuan): other gates are not.
_ROUTER = re.compile(r"^class (\w*(?:Router|Gating|MoE\w*Gate))\(", re.M)
BEGIN, END = "<!-- coverage: begin -->", "<!-- coverage: end -->"


@dataclasses.dataclass(frozen=True)
class Family:
    """A sparse-MoE family of the installed transformers: the router and experts classes its
    modeling file defines, and its status."""

    name: str
    routers: tuple[str, ...]
    experts: tuple[str, ...]
    status: str
    reason: str


def installed_families() -> list[Family]:
    """Every sparse-MoE family of the installed transformers, read from its source files (no
    model is imported), by name; a family no table names has status "unclassified"."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        raise ImportError("transformers is not installed")
    families = []
    for modeling in sorted(Path(spec.origin).parent.glob("models/*/modeling_*.py")):
        source = modeling.read_text(encoding="utf-8")
        experts = tuple(dict.fromkeys(_EXPERTS.findall(source)))
        if not experts or modeling.stem != f"modeling_{modeling.parent.name}":
            continue
        name = modeling.parent.name
        digests = module_method_digests(source)
        status, reason = status_of(name, digests) or ("unclassified", "")
        routers = tuple(dict.fromkeys(_ROUTER.findall(source)))
        families.append(Family(name, routers, experts, status, reason))
    return families


def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def table(families: list[Family]) -> str:
    """The coverage table, Markdown, with the transformers version it describes."""
    counts = {status: sum(f.status == status for f in families) for status in STATUSES}
    lines = [
        f"Sparse-MoE families of transformers {transformers_version()}: "
        + ", ".join(f"{count} {status}" for status, count in counts.items())
        + ".",
        "",
        "| family | router | experts | status | reason |",
        "|---|---|---|---|---|",
    ]
    for f in families:
        lines.append(
            f"| {f.name} | {', '.join(f.routers) or '-'} | {', '.join(f.experts)} | "
            f"{f.status} | {f.reason} |"
        )
    return "\n".join(lines)


def readme_table(readme: str) -> str | None:
    """The table between the README's coverage markers, or None without them."""
    if BEGIN not in readme or END not in readme:
        return None
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, help="rewrite the table in this README")
    args = parser.parse_args()
    generated = table(installed_families())
    if args.readme is None:
        print(generated)
        return
    readme = args.readme.read_text(encoding="utf-8")
    if readme_table(readme) is None:
        raise SystemExit(f"{args.readme} has no {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN, 1)
    args.readme.write_text(f"{head}{BEGIN}\n{generated}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
