"""The stage contract: typed configs through the one loader, errors before work, run records."""

from __future__ import annotations

import json

import pytest

from spatia import stages
from spatia.config import load_config
from spatia.errors import ConfigError, InputDataError, OutputExistsError


def test_stage_configs_load_through_the_one_loader(tmp_path):
    path = tmp_path / "embed.yaml"
    path.write_text("modality: image\nsplits: [test]\nbatch_cells: 128\n")
    config = load_config(stages.EmbedConfig, path, overrides={"batch_cells": 64, "threads": None})
    assert config == stages.EmbedConfig(modality="image", splits=("test",), batch_cells=64)
    with pytest.raises(ConfigError, match="'modality' must be one of"):
        load_config(stages.EmbedConfig, {"modality": "rna"})
    with pytest.raises(ConfigError, match="'orientations' must be one of"):
        load_config(stages.EmbedConfig, {"orientations": 3})
    assert load_config(stages.EmbedConfig, {"orientations": 1}).orientations == 1
    with pytest.raises(ConfigError, match="devices 'x' is not a device count"):
        load_config(stages.PretrainConfig, overrides={"devices": "x"})
    with pytest.raises(ConfigError, match="'num_nodes' must be at least 1"):
        load_config(stages.PretrainConfig, overrides={"num_nodes": 0})


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("4", 4), ("-1", -1), ("auto", "auto")])
def test_parse_devices(text, value):
    assert stages.parse_devices(text) == value


def test_pretrain_refuses_model_overrides_outside_train(tmp_path):
    config = stages.PretrainConfig(model_overrides={"image.layers": 2})
    with pytest.raises(ConfigError, match="outside 'train'"):
        stages.pretrain(tmp_path / "missing_dataset", tmp_path / "run", config)


def test_evaluate_inputs_rules():
    with pytest.raises(ConfigError, match="checkpoint was given without the MIST dataset"):
        load_config(stages.EvaluateInputs, overrides={"checkpoint": "x.ckpt"})
    with pytest.raises(ConfigError, match="both a MIST dataset and a crops file"):
        load_config(stages.EvaluateInputs, overrides={"mist": "m", "crops": "c.npz"})


def test_stages_refuse_an_existing_output_and_a_missing_input(tmp_path):
    from spatia.evaluate import EvaluateConfig
    from spatia.perturb import PairingConfig

    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(OutputExistsError):
        stages.evaluate(tmp_path / "cells.h5ad", existing, EvaluateConfig(labels="x"))
    with pytest.raises(OutputExistsError):
        stages.pair(tmp_path / "cells.h5ad", existing, PairingConfig(), transitions="simulated")
    with pytest.raises(InputDataError, match="does not exist"):
        stages.pair(tmp_path / "cells.h5ad", tmp_path / "pairs", PairingConfig(), transitions="simulated")
    assert not (tmp_path / "pairs").exists()


def test_summary_is_plain_data(tmp_path):
    result = stages.StageResult("x", tmp_path, {"n": 3, "nested": {"a": [1, 2]}})
    assert json.loads(json.dumps(result.summary())) == {"stage": "x", "path": str(tmp_path), "n": 3,
                                                        "nested": {"a": [1, 2]}}


def test_a_pretraining_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    import spatia.train

    def fails(dataset, out, **kwargs):
        (out / "logs").mkdir(parents=True)
        raise RuntimeError("the data loader died")

    monkeypatch.setattr(spatia.train, "pretrain", fails)
    with pytest.raises(RuntimeError, match="data loader died"):
        stages.pretrain(tmp_path / "mist", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a directory the user made is never removed
    with pytest.raises(RuntimeError):
        stages.pretrain(tmp_path / "mist", kept)
    assert kept.is_dir()


def test_evaluate_refuses_a_negative_cell_budget():
    from spatia.evaluate import EvaluateConfig

    with pytest.raises(ConfigError, match="'max_cells' must be at least 2"):
        load_config(EvaluateConfig, {"labels": "x"}, overrides={"max_cells": -5})


def test_an_error_about_the_anndatas_contents_names_the_file(tmp_path):
    import anndata
    import numpy as np

    from spatia.evaluate import EvaluateConfig

    cells = tmp_path / "cells.h5ad"
    adata = anndata.AnnData(np.ones((30, 5), dtype=np.float32))
    adata.obsm["spatial"] = np.random.default_rng(0).uniform(0, 500, (30, 2))
    adata.write_h5ad(cells)
    with pytest.raises(InputDataError) as caught:
        stages.evaluate(cells, tmp_path / "report", EvaluateConfig(labels="cell_type"))
    assert str(cells) in caught.value.message and "cell_type" in caught.value.message
    assert not (tmp_path / "report").exists()
