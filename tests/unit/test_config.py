from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from watchdog_kv import config
from watchdog_kv.config import ConfigError, load

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults_when_nothing_is_set():
    s = load({})
    assert s.enabled is True
    assert s.log_level == "info"
    assert s.log_format == "auto"
    assert s.server is None
    assert s.prefill_timeout_s == 120.0
    assert s.decode_idle_timeout_s == 120.0
    assert s.state_dir.name.startswith("watchdog_kv-")


@pytest.mark.parametrize(
    "raw,expected",
    [("0", False), ("off", False), ("FALSE", False), ("1", True), (" yes ", True), ("On", True)],
)
def test_boolean_spellings(raw, expected):
    assert load({"WATCHDOG_KV_ENABLED": raw}).enabled is expected


@pytest.mark.parametrize(
    "name,raw,accepted",
    [
        ("WATCHDOG_KV_ENABLED", "maybe", "1, 0, true, false"),
        ("WATCHDOG_KV_ENABLED", "", "1, 0, true, false"),
        ("WATCHDOG_KV_LOG_LEVEL", "loud", "debug, info, warning, error"),
        ("WATCHDOG_KV_LOG_FORMAT", "xml", "auto, json, console"),
        ("WATCHDOG_KV_PREFILL_TIMEOUT", "-3", "greater than 0"),
        ("WATCHDOG_KV_PREFILL_TIMEOUT", "nan", "greater than 0"),
        ("WATCHDOG_KV_DECODE_IDLE_TIMEOUT", "10s", "number of seconds"),
        ("WATCHDOG_KV_SERVER", "a b", "letters, digits"),
        ("WATCHDOG_KV_STATE_DIR", "  ", "directory path"),
    ],
)
def test_bad_value_names_the_variable_and_what_is_accepted(name, raw, accepted):
    with pytest.raises(ConfigError) as err:
        load({name: raw})
    message = str(err.value)
    assert name in message
    assert repr(raw) in message
    assert accepted in message


def test_unknown_variable_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        load({"WATCHDOG_KV_ENABLD": "1"})
    message = str(err.value)
    assert "WATCHDOG_KV_ENABLD is not a watchdog_kv setting" in message
    assert "Did you mean WATCHDOG_KV_ENABLED?" in message


def test_other_prefixes_are_ignored():
    assert load({"WATCHDOG_KVX": "1", "VLLM_PLUGINS": "x", "OTEL_SERVICE_NAME": "s"}).enabled


def test_units_and_types():
    s = load({"WATCHDOG_KV_PREFILL_TIMEOUT": "2.5", "WATCHDOG_KV_STATE_DIR": "~/x"})
    assert s.prefill_timeout_s == 2.5
    assert s.state_dir == Path("~/x").expanduser()


def test_every_field_has_exactly_one_variable():
    attrs = [v.attr for v in config.VARIABLES]
    fields = set(config.Settings.__dataclass_fields__) - {"otel"}  # the OTEL_* variables
    assert sorted(attrs) == sorted(fields)
    assert len({v.name for v in config.VARIABLES}) == len(config.VARIABLES)
    assert all(v.name.startswith(config.PREFIX) for v in config.VARIABLES)


def test_every_variable_is_declared_once_in_the_source():
    """A variable's name is written once in config.py: in its declaration, nowhere else."""
    source = Path(config.__file__).read_text()
    for var in config.VARIABLES:
        assert source.count(f'"{var.name}"') == 1, var.name


def test_dataclass_defaults_are_the_loaded_defaults():
    assert config.Settings() == load({})


SPELT_DEFAULTS = [
    v
    for v in config.VARIABLES
    if config.Settings.__dataclass_fields__[v.attr].default not in (None, dataclasses.MISSING)
]


@pytest.mark.parametrize("var", SPELT_DEFAULTS, ids=lambda v: v.name)
def test_documented_default_parses_to_the_default(var):
    assert var.parse(var.default_doc) == var.default()


@pytest.mark.parametrize(
    "var", [v for v in config.VARIABLES if v.not_below is not None], ids=lambda v: v.name
)
def test_floor_above_cap_names_both(var):
    floor = var.not_below.name
    assert floor in var.accepted
    with pytest.raises(ConfigError) as err:
        load({floor: "100", var.name: "50"})
    message = str(err.value)
    assert f"{floor} (100 s) is above {var.name} (50 s)" in message
    assert "Accepted: a floor not above the cap." in message


@pytest.mark.parametrize("raw", ["0.5", "0", "x"])
def test_step_slack_below_one_is_rejected(raw):
    with pytest.raises(ConfigError) as err:
        load({"WATCHDOG_KV_STEP_SLACK": raw})
    assert f"WATCHDOG_KV_STEP_SLACK={raw!r} is not valid" in str(err.value)
    assert "Accepted: a number, 1 or more." in str(err.value)


def test_docs_table_is_the_one_the_code_generates():
    """docs/configuration.md must carry exactly the table built from VARIABLES."""
    text = DOCS.read_text()
    assert config.markdown_table() in text, (
        "docs/configuration.md is out of step with watchdog_kv/config.py: "
        "regenerate the table with `watchdog-kv config --markdown`"
    )
    documented = {
        line.split("`")[1] for line in text.splitlines() if line.startswith("| `WATCHDOG_KV_")
    }
    assert documented == {v.name for v in config.VARIABLES}
