"""What `spatia CMD --help` shows as a default is the stage config's default, and a --config
file's values are overridden only by options the user typed."""

from __future__ import annotations

import pytest
import typer

from spatia.cli import app


def _defaults(command: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    return {param.name: param.default for param in group.commands[command].params}


def test_simulate_defaults_are_the_configs():
    from spatia.sim import SimulationConfig

    shown, config = _defaults("simulate"), SimulationConfig()
    assert (shown["cells"], shown["genes"], shown["layout"], shown["z_planes"]) == (
        config.n_cells, config.n_genes, config.layout, config.z_planes)


def test_evaluate_defaults_are_the_configs():
    from spatia.evaluate import EvaluateConfig

    shown, config = _defaults("evaluate"), EvaluateConfig(labels="x")
    assert (shown["n_seeds"], shown["layout"], shown["n_jobs"], shown["seed"]) == (
        config.n_seeds, config.layout, config.n_jobs, config.seed)


@pytest.mark.parametrize("name", ["epsilon", "tol", "max_iter", "n_pcs", "theta_min", "spatial_weight",
                                  "spatial_scale_um", "max_distance_um", "same_niche", "pair_noise", "memory_mb"])
def test_pair_defaults_are_the_configs(name):
    from spatia.perturb import PairingConfig

    assert _defaults("pair")[name] == getattr(PairingConfig(), name)


def test_flow_defaults_are_the_configs():
    """The flow commands show the defaults the library uses (condition, lambda, pair noise,
    sampling, guidance and the ablation's variants)."""
    from spatia.cli.flow import flow_app
    from spatia.flow import FlowAblateConfig

    group = typer.main.get_command(flow_app)
    shown = {name: {p.name: p.default for p in group.commands[name].params} for name in ("train", "generate", "ablate")}
    config = FlowAblateConfig()
    assert (shown["train"]["condition"], shown["train"]["contrastive_weight"], shown["train"]["pair_noise"]) == (
        config.train.condition, config.train.contrastive_weight, config.train.pair_noise)
    assert (shown["generate"]["steps"], shown["generate"]["sampler"], shown["generate"]["guidance"]) == (
        config.generate.steps, config.generate.sampler, config.generate.guidance)
    assert tuple(shown["ablate"]["variants"].split(",")) == config.variants


def test_a_config_file_is_overridden_only_by_typed_options(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spatia import stages

    seen = {}

    def fake_simulate(out, config, *, seed=0):
        seen["config"] = config
        return stages.StageResult("simulate", out)

    monkeypatch.setattr(stages, "simulate", fake_simulate)
    (tmp_path / "sim.yaml").write_text("n_cells: 1234\nn_genes: 150\n")
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "b"), "--config", str(tmp_path / "sim.yaml"),
                                      "--genes", "200", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (seen["config"].n_cells, seen["config"].n_genes) == (1234, 200)
