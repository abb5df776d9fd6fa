"""The one config mechanism: defaults, files, CLI overrides, unknown keys and wrong types."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from spatia.config import config_to_dict, load_config, save_config
from spatia.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    labels: tuple[str, ...] = ("a",)
    cap: int | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def validate(self) -> None:
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ConfigError(f"'fractions' must sum to 1, not {sum(self.fractions)}", fix="make them sum to 1")


def test_defaults_then_sources_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1e-4\n  steps: 5\nlabels: [a, b]\n")
    config = load_config(Outer, path, {"inner": {"steps": 7}}, overrides={"inner.schedule": "constant", "cap": None})
    assert config.inner == Inner(lr=1e-4, steps=7, schedule="constant")  # '1e-4' (YAML 1.1 text) read as float
    assert config.labels == ("a", "b") and isinstance(config.labels, tuple)
    assert config.cap is None and config.name == "x"


def test_round_trip_through_yaml_and_json(tmp_path):
    config = Outer(inner=Inner(lr=0.5, steps=3), cap=4, mapping={"s1": "train"}, path=Path("/data/x"))
    save_config(config, tmp_path / "c.yaml")
    assert load_config(Outer, tmp_path / "c.yaml") == config
    (tmp_path / "c.json").write_text(json.dumps(config_to_dict(config)))
    assert load_config(Outer, tmp_path / "c.json") == config


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"inner": {"lr2": 1}}, "unknown key 'inner.lr2'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"inner": {"steps": "ten"}}, "'inner.steps' must be an int"),
        ({"inner": {"steps": 1.5}}, "'inner.steps' must be an int"),
        ({"inner": {"steps": True}}, "'inner.steps' must be an int"),
        ({"inner": {"schedule": "linear"}}, "'inner.schedule' must be one of"),
        ({"fractions": [0.5, 0.5]}, "'fractions' must have 3 items"),
        ({"labels": "a"}, "'labels' must be a list of a string"),
        ({"cap": "many"}, "'cap' must be an int or null"),
        ({"inner": 3}, "'inner' must be a mapping of keys"),
        ({"fractions": [0.5, 0.5, 0.5]}, "'fractions' must sum to 1"),
    ],
)
def test_refusals_name_the_key_and_the_file(tmp_path, data, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as caught:
        load_config(Outer, path)
    assert fragment in caught.value.message
    assert str(path) in caught.value.message


def test_cli_overrides_are_named_as_such():
    with pytest.raises(ConfigError, match="command-line options"):
        load_config(Outer, overrides={"inner.steps": "x"})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Outer, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(Outer, tmp_path / "broken.yaml")
