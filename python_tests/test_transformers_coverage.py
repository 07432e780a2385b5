"""The coverage table of transformers' sparse-MoE families: every family of the installed
transformers is classified, the tables agree with each other and with the source, and the
README's table is the one ``coverage`` writes."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from moe_kernels.integrations.transformers import coverage, families
from moe_kernels.integrations.transformers.experts import EXPERTS, supported_experts
from moe_kernels.integrations.transformers.router_source import (
    installed_class,
    module_method_digests,
)
from moe_kernels.integrations.transformers.routing import ROUTERS, supported_routers

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_installed_family_is_classified():
    families = coverage.installed_families()
    # The scan finds every family whose router this transformers has (older ones lack some).
    routed = {family for family, (name, _) in ROUTERS.items() if installed_class(family, name)}
    assert routed and routed <= {f.name for f in families}
    unclassified = [f.name for f in families if f.status == "unclassified"]
    assert not unclassified, (
        f"transformers {coverage.transformers_version()} has sparse-MoE families no table "
        f"names: {unclassified}; read each and add it to routing.ROUTERS, families.LEFT_WHOLE "
        "or families.TO_DO (with the reason)"
    )


def test_the_tables_are_disjoint_and_name_real_families():
    tables = [set(ROUTERS), set(families.LEFT_WHOLE), set(families.TO_DO)]
    for i, first in enumerate(tables):
        for second in tables[i + 1 :]:
            assert not first & second
    installed = {f.name: f for f in coverage.installed_families()}
    models = Path(coverage.importlib.util.find_spec("transformers").origin).parent / "models"
    for name in set().union(*tables):
        # A family of another transformers version has no folder here; one with a folder but
        # no experts is a stale entry.
        assert name in installed or not (models / name).is_dir(), name
    assert all(families.LEFT_WHOLE.values()) and all(families.TO_DO.values())


def test_a_patched_familys_router_is_one_its_source_defines():
    for family in coverage.installed_families():
        if family.status == "patched":
            assert ROUTERS[family.name][0] in family.routers, family


def test_the_families_read_as_patched_are_those_patch_supports():
    # The table reads the sources; patch imports the classes: both verify the same code.
    routers = {cls.__name__ for cls in supported_routers()}
    experts = {cls.__name__ for cls in supported_experts()}
    for family in coverage.installed_families():
        supported = ROUTERS.get(family.name, ("",))[0] in routers and (
            family.name not in EXPERTS or EXPERTS[family.name][0] in experts
        )
        assert (family.status == "patched") == supported, family


@pytest.mark.parametrize(
    "family,cls,method,status,reason",
    [
        ("qwen3_moe", "Qwen3MoeTopKRouter", "forward", "to do", families.CHANGED_ROUTER),
        ("dbrx", "DbrxFFN", "route_tokens_to_experts", "to do", families.CHANGED_BLOCK),
        ("dbrx", "DbrxExpertGLU", "forward", "to do", families.CHANGED_EXPERTS),
        (
            "qwen3_omni_moe",
            "Qwen3OmniMoeTalkerTextTopKRouter",
            "forward",
            "patched",
            f"left whole: Qwen3OmniMoeTalkerTextTopKRouter: {families.CHANGED_ROUTER}",
        ),
    ],
)
def test_a_family_whose_code_changed_is_classified_by_what_changed(
    family, cls, method, status, reason
):
    # Its source as read, then one method changed: the router, the block that routes, the
    # module its experts call, or the router of its other language model.
    modeling = Path(importlib.util.find_spec(f"transformers.models.{family}").origin).parent
    source = (modeling / f"modeling_{family}.py").read_text(encoding="utf-8")
    digests = module_method_digests(source)
    if cls not in digests or families.status_of(family, digests) != ("patched", ""):
        pytest.skip(f"this transformers has no {cls}, or {family} is not wholly patched here")
    digests[cls][method] = "0" * 12
    assert families.status_of(family, digests) == (status, reason)


def test_the_readme_table_is_the_generated_one():
    written = coverage.readme_table(README.read_text(encoding="utf-8"))
    assert written is not None, "the README has no coverage table"
    version = coverage.transformers_version()
    if f"transformers {version}:" not in written.splitlines()[0]:
        pytest.skip(f"the README's table describes another transformers than {version}")
    assert written == coverage.table(coverage.installed_families()), (
        "regenerate it: python -m moe_kernels.integrations.transformers.coverage --readme README.md"
    )
