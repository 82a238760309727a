"""Settings name the DAG of steps by a spec string; the steps package loads it."""

import sys
import types

import pytest

from autowisp.config import DEFAULT_REGISTRY, Settings
from autowisp.errors import ConfigurationError
from autowisp.steps.registry import PIPELINE, Registry, default_registry, load_registry


@pytest.fixture
def spec_module(monkeypatch):
    """A throwaway module ``fake_registry_module`` holding registries and impostors."""
    module = types.ModuleType("fake_registry_module")
    module.instance = Registry(PIPELINE[:1])
    module.factory = lambda: Registry(PIPELINE[:2])
    module.not_a_registry = lambda: ["frame_qc"]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_settings_give_the_spec_from_environment_file_or_default(tmp_path):
    empty = {"AUTOWISP_HOME": str(tmp_path)}
    assert Settings.load(environ=empty).registry_spec == DEFAULT_REGISTRY
    config = tmp_path / "autowisp.toml"
    config.write_text('[pipeline]\nregistry = "here:there"\n')
    assert Settings.load(environ=empty).registry_spec == "here:there"
    overridden = {**empty, "AUTOWISP_REGISTRY": "env:wins"}
    assert Settings.load(environ=overridden).registry_spec == "env:wins"


def test_the_default_spec_loads_the_package_pipeline():
    loaded = load_registry(DEFAULT_REGISTRY)
    assert [s.name for s in loaded] == [s.name for s in default_registry()]
    assert len(loaded) == len(PIPELINE)


def test_a_registry_or_a_function_returning_one(spec_module):
    assert load_registry("fake_registry_module:instance") is spec_module.instance
    assert [s.name for s in load_registry("fake_registry_module:factory")] == [
        s.name for s in Registry(PIPELINE[:2])
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:registry", "'no_such_module_xyz:registry' cannot be imported"),
        ("fake_registry_module:missing", "'fake_registry_module:missing' cannot be imported"),
        ("fake_registry_module:not_a_registry", "is not a Registry"),
    ],
)
def test_a_bad_spec_is_named(spec_module, spec, message):
    with pytest.raises(ConfigurationError, match=message):
        load_registry(spec)
