"""Dependency kinds as data: the registry derives each edge's kind from the scopes, takes
a step naming itself as its previous generation, and refuses edges no kind allows."""

import pytest

from autowisp.errors import StepDefinitionError
from autowisp.pipeline.configuration import resolve_versions
from autowisp.steps.base import Input, Kind, Parameter
from autowisp.steps.registry import Registry
from autowisp.vocabulary import Scope
from tests.unit.pipeline.test_configuration import _step

PHOT = _step("phot", Scope.IMAGE)
MAGFIT = _step("magfit", Scope.NIGHT, ("phot",))
LC = _step("lc", Scope.SHARD, ("magfit", "lc"), (Parameter("n", 1),))
EPD = _step("epd", Scope.SHARD, ("lc",))
TEMPLATES = _step("templates", Scope.FIELD, ("epd",))
TFA = _step("tfa", Scope.SHARD, ("epd", "templates"))
REPORT = _step("report", Scope.NIGHT, ("tfa",))
CHAIN = [PHOT, MAGFIT, LC, EPD, TEMPLATES, TFA, REPORT]


def test_kinds_are_derived_from_the_scopes():
    registry = Registry(CHAIN)
    kinds = {
        name: {edge.step: edge.kind for edge in registry.edges(name)}
        for name in ("magfit", "lc", "epd", "templates", "tfa", "report")
    }
    assert kinds == {
        "magfit": {"phot": Kind.BARRIER},
        "lc": {"magfit": Kind.NIGHTS, "lc": Kind.PREVIOUS},
        "epd": {"lc": Kind.SAME},
        "templates": {"epd": Kind.FIELD_SHARDS},
        "tfa": {"epd": Kind.SAME, "templates": Kind.SAME},
        "report": {"tfa": Kind.SHARDS},
    }
    # The previous generation is not an upstream step: no cycle, no pinned configuration.
    assert [e.step for e in registry.upstream("lc")] == ["magfit"]
    assert [s.name for s in registry][:3] == ["phot", "magfit", "lc"]
    assert registry.downstream("lc") == {"epd", "templates", "tfa", "report"}


def test_a_shard_parameter_changes_the_shard_chain_only():
    registry = Registry(CHAIN)
    before = resolve_versions(registry, {})
    after = resolve_versions(registry, {"lc": {"n": 2}})
    changed = {name for name in before if before[name].version != after[name].version}
    assert changed == {"lc", "epd", "templates", "tfa", "report"}


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([_step("a", Scope.IMAGE, ("a",))], "names itself"),
        ([_step("n", Scope.NIGHT, ("n",))], "names itself"),
        ([MAGFIT, PHOT, _step("x", Scope.IMAGE, ("magfit",)), _step("s", Scope.SHARD),
          _step("y", Scope.IMAGE, ("s",))], "cannot take 's' \\(shard\\)"),
        ([PHOT, _step("s", Scope.SHARD, ("phot",))], "cannot take 'phot' \\(image\\)"),
        ([PHOT, _step("f", Scope.FIELD, ("phot",))], "cannot take 'phot'"),
        ([PHOT, MAGFIT, _step("s", Scope.SHARD, (Input("magfit", Kind.SHARDS),))],
         "as a shards input"),
        ([PHOT, MAGFIT, _step("s", Scope.SHARD, (Input("magfit", Kind.PREVIOUS),))],
         "as a previous input"),
        ([PHOT, MAGFIT, _step("n", Scope.NIGHT, (Input("magfit", Kind.AFTER),))],
         "as a after input"),
        ([PHOT, _step("i", Scope.IMAGE, (Input("phot", Kind.AFTER),))], "as a after input"),
    ],
)  # fmt: skip
def test_edges_no_kind_allows_are_refused(steps, message):
    with pytest.raises(StepDefinitionError, match=message):
        Registry(steps)
