"""Transition files: which control state is paired with which target state.

A transitions file is YAML (paper appendix D.1, "Transition Design"):

    state_key: state          # optional: obs columns; command-line options override them
    lineage_key: lineage
    niche_key: domain
    slide_key: slide_id
    patient_key: patient_id
    transitions:
      - name: EMT_transition          # transition_tag in pairs.parquet
        task: tumor_progression       # the axis; task_name in pairs.parquet
        control: Epi_FOXA1+           # state_A: a value of obs[state_key]
        target: EMT-Epi1_CEACAM6+     # state_B
        lineage: epithelial           # a value of obs[lineage_key]; both states must belong to it

Two examples ship with spatia (`example_transitions_path`): "simulated" (the transitions the
simulator designs) and "breast_cancer" (the paper's five breast-cancer transitions, for users
with annotated data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from spatia.errors import ConfigError

TRANSITION_FIELDS = ("name", "task", "control", "target", "lineage")
COLUMN_FIELDS = ("state_key", "lineage_key", "niche_key", "slide_key", "patient_key")
EXAMPLES = ("simulated", "breast_cancer")


@dataclass(frozen=True)
class Transition:
    """One control -> target transition within a lineage (all fields are obs values or labels)."""

    name: str
    task: str
    control: str
    target: str
    lineage: str


@dataclass(frozen=True)
class TransitionsFile:
    """The transitions of a file plus the obs column names it sets (a subset of COLUMN_FIELDS)."""

    transitions: tuple[Transition, ...]
    columns: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


def example_transitions_path(name: str) -> Path:
    """Path of a shipped example transitions file: "simulated" or "breast_cancer"."""
    if name not in EXAMPLES:
        raise ConfigError(f"no example transitions file named {name!r}", fix=f"use one of {', '.join(EXAMPLES)}")
    return Path(str(resources.files("spatia") / "examples" / f"transitions_{name}.yaml"))


def load_transitions(path: str | Path) -> TransitionsFile:
    """Read and check a transitions YAML file; every problem raises `ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("the transitions file does not exist", path=path,
                          fix="give the path of a YAML file; see docs/pairing.md for the format")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"the transitions file is not valid YAML ({error})", path=path,
                          fix="check the indentation and quoting (state names with '+' are fine unquoted)") from None
    return parse_transitions(data, path=path)


def parse_transitions(data: object, *, path: Path | None = None) -> TransitionsFile:
    """Check the parsed YAML content of a transitions file (see the module docstring)."""
    fix_format = "see docs/pairing.md or the shipped examples for the format"
    if not isinstance(data, dict) or "transitions" not in data:
        raise ConfigError("the transitions file needs a top-level 'transitions:' list", path=path, fix=fix_format)
    unknown = set(data) - {"transitions", *COLUMN_FIELDS}
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)}", path=path,
                          fix=f"use only 'transitions' and {', '.join(COLUMN_FIELDS)}")
    columns = {}
    for key in COLUMN_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be an obs column name, got {value!r}", path=path, fix=fix_format)
        columns[key] = value
    items = data["transitions"]
    if not isinstance(items, list) or not items:
        raise ConfigError("'transitions' must be a non-empty list", path=path, fix=fix_format)
    transitions = []
    for k, item in enumerate(items, start=1):
        where = f"transition #{k}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} is not a mapping of {', '.join(TRANSITION_FIELDS)}", path=path, fix=fix_format)
        missing = [name for name in TRANSITION_FIELDS if item.get(name) in (None, "")]
        extra = sorted(set(item) - set(TRANSITION_FIELDS))
        if missing or extra:
            problem = []
            if missing:
                problem.append(f"lacks {', '.join(missing)}")
            if extra:
                problem.append(f"has unknown keys {extra}")
            raise ConfigError(f"{where} ({item.get('name', '?')}) {' and '.join(problem)}", path=path,
                              fix=f"give each transition exactly: {', '.join(TRANSITION_FIELDS)}")
        transition = Transition(**{name: str(item[name]) for name in TRANSITION_FIELDS})
        if transition.control == transition.target:
            raise ConfigError(f"{where} ({transition.name}) has the same control and target state "
                              f"{transition.control!r}", path=path, fix="name two different states")
        transitions.append(transition)
    names = [t.name for t in transitions]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ConfigError(f"transition names must be unique; repeated: {duplicated}", path=path,
                          fix="rename the repeated transitions")
    return TransitionsFile(transitions=tuple(transitions), columns=columns, path=path)
