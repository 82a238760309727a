import pytest

from autowisp.errors import ConfigurationError, StepDefinitionError
from autowisp.pipeline.configuration import resolve_versions
from autowisp.steps.base import Parameter, Step
from autowisp.steps.registry import Registry, default_registry
from autowisp.vocabulary import Scope


def _step(name, scope=Scope.IMAGE, inputs=(), parameters=()):
    return type(
        name,
        (Step,),
        {
            "name": name,
            "scope": scope,
            "inputs": inputs,
            "parameters": parameters,
            "run": lambda self, c: None,
        },
    )


A = _step("a", parameters=(Parameter("k", 1.0, "px"),))
B = _step("b", inputs=("a",), parameters=(Parameter("n", 3),))
C = _step("c", Scope.NIGHT, inputs=("b",))
D = _step("d", inputs=("a",))


def test_changing_a_parameter_changes_only_that_step_and_downstream():
    registry = Registry([A, B, C, D])
    before = resolve_versions(registry, {})
    after = resolve_versions(registry, {"b": {"n": 4}})
    changed = {name for name in before if before[name].version != after[name].version}
    assert changed == {"b", "c"} == {"b"} | registry.downstream("b")
    assert resolve_versions(registry, {"b": {"n": 3}})["c"].version == before["c"].version
    assert after["b"].parameters == {"n": 4}


def test_bad_parameters_are_named():
    registry = Registry([A, B])
    with pytest.raises(ConfigurationError, match="no parameter"):
        resolve_versions(registry, {"a": {"q": 1}})
    with pytest.raises(ConfigurationError, match="unknown steps"):
        resolve_versions(registry, {"zzz": {}})
    with pytest.raises(ConfigurationError, match="should be float"):
        resolve_versions(registry, {"a": {"k": "wide"}})
    assert resolve_versions(registry, {"a": {"k": 2}})["a"].parameters["k"] == 2


def test_registry_validates_the_dag():
    with pytest.raises(StepDefinitionError, match="not a declared step"):
        Registry([B])
    with pytest.raises(StepDefinitionError, match="two steps"):
        Registry([A, A])
    X = _step("x", inputs=("y",))
    Y = _step("y", inputs=("x",))
    with pytest.raises(StepDefinitionError, match="cycle"):
        Registry([X, Y])
    assert [s.name for s in Registry([C, B, A])] == ["a", "b", "c"]


def test_default_pipeline_is_declared():
    names = [step.name for step in default_registry()]
    assert names == [
        "frame_qc",
        "night_qc",
        "master_bias",
        "master_dark",
        "master_flat",
        "calibrate",
        "astrometry",
        "star_list",
        "photometry",
        "magfit",
        "lightcurves",
        "lc_statistics",
    ]
