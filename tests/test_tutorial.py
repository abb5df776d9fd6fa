"""docs/tutorial.md runs as written, on the real breast section in ../shared/data.

The ```bash and ```python blocks of the tutorial (those whose first line does not say
"not run in tests") are run in order, as one bash script in a temporary folder, with the
training shortened by the substitutions in `SHORTEN` (each must match the tutorial exactly as
often as listed, so an edit of the tutorial that a substitution no longer fits fails here rather
than running the full-length training). Then every step's outputs are checked.

The Python equivalents the tutorial shows (not run: they would repeat the steps) are compiled,
and every `spatia...` name they use is resolved, so they cannot drift from the API unnoticed.

Run the tutorial at full length, printing each block's wall time:

    .venv/bin/python tests/test_tutorial.py OUT_DIR [--full]
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = REPO_ROOT / "docs" / "tutorial.md"
DATA = REPO_ROOT.parent / "shared" / "data"
BREAST = DATA / "xenium_breast_cancer_left"
NOT_RUN = "not run in tests"
PY_DELIMITER = "SPATIA_TUTORIAL_PYTHON"

# (text in the runnable blocks, replacement, times it must occur): a few steps instead of
# hundreds, one evaluation seed and the instant PCA layout, the flow's `tiny` preset.
SHORTEN = [
    ("--max-steps 300", "--max-steps 4 --log-every 2", 1),  # logged rows: metrics.csv and its loss curve
    ("-o flow/ --config demo", "-o flow/ --config tiny", 1),
    ("-o report/", "--n-seeds 1 --layout pca -o report/", 1),
]


@dataclass(frozen=True)
class Block:
    language: str  # "bash" or "python"
    code: str
    line: int  # line of the opening fence in the tutorial

    @property
    def runnable(self) -> bool:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return NOT_RUN not in first


def tutorial_blocks(text: str) -> list[Block]:
    """The ```bash and ```python blocks of a Markdown text, in order."""
    blocks, language, lines, start = [], None, [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if language is None:
            match = re.fullmatch(r"```(bash|python)\s*", line)
            if match:
                language, lines, start = match.group(1), [], number
        elif line.strip() == "```":
            blocks.append(Block(language, "\n".join(lines) + "\n", start))
            language = None
        else:
            lines.append(line)
    if language is not None:
        raise ValueError(f"{TUTORIAL.name}: the ```{language} block opened at line {start} is never closed")
    return blocks


def shorten(code: str, substitutions=SHORTEN) -> str:
    """Apply `substitutions` to the concatenated runnable code, checking each occurs as listed."""
    for old, new, count in substitutions:
        found = code.count(old)
        if found != count:
            raise ValueError(f"{TUTORIAL.name}: {old!r} occurs {found} times in the runnable blocks, not {count}; "
                             f"update SHORTEN in {Path(__file__).name}")
        code = code.replace(old, new)
    return code


def tutorial_script(blocks: list[Block], *, short: bool = True) -> str:
    """One bash script running the runnable blocks in order; python blocks through $PYTHON.
    Each block's wall time goes to stderr as '[tutorial] line N (language): S s'."""
    parts = ["set -euo pipefail", 'PYTHON="${PYTHON:-python}"']
    for block in (b for b in blocks if b.runnable):
        if PY_DELIMITER in block.code:
            raise ValueError(f"{TUTORIAL.name}, line {block.line}: the block contains {PY_DELIMITER}")
        if block.language == "bash":
            body = block.code
        else:
            body = f'"$PYTHON" - <<\'{PY_DELIMITER}\'\n{block.code}{PY_DELIMITER}\n'
        parts.append(f"__started=$(date +%s.%N)\n{body}"
                     f'echo "[tutorial] line {block.line} ({block.language}): '
                     f'$(awk "BEGIN {{print $(date +%s.%N) - $__started}}") s" >&2')
    script = "\n".join(parts) + "\n"
    return shorten(script) if short else script


def run_tutorial(work_dir: Path, *, short: bool = True) -> subprocess.CompletedProcess:
    """Run the tutorial's runnable blocks in `work_dir` (which must exist) with this interpreter."""
    script = tutorial_script(tutorial_blocks(TUTORIAL.read_text()), short=short)
    (work_dir / "tutorial.sh").write_text(script)
    env = {**os.environ, "SPATIA_DATA": str(DATA), "PYTHON": sys.executable, "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if short:  # one core: the test suite runs two workers on two cores
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return subprocess.run(["bash", "tutorial.sh"], cwd=work_dir, env=env, capture_output=True, text=True, check=False)


# --- the tutorial's text --------------------------------------------------------------------------


def test_tutorial_script_builds_and_shortens():
    blocks = tutorial_blocks(TUTORIAL.read_text())
    runnable = [b for b in blocks if b.runnable]
    assert {b.language for b in runnable} == {"bash", "python"}
    script = tutorial_script(blocks)  # raises if a SHORTEN entry no longer fits
    assert "--max-steps 4 " in script and "--max-steps 300" not in script
    assert "bone_marrow" not in script  # that section is documented, not run
    assert "spatia flow evaluate" in script and "scanpy" in script


def _spatia_names(tree: ast.AST) -> set[str]:
    """Dotted names `spatia.a.b...` used in a module's code (the longest chain of each use)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, inner = [], node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "spatia":
                names.add(".".join(["spatia", *reversed(chain)]))
    return names


def _resolve(dotted: str) -> None:
    parts = dotted.split(".")
    value = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        try:
            value = getattr(value, part)
        except AttributeError:
            value = importlib.import_module(".".join(parts[: index + 1]))


def test_python_equivalents_use_existing_api():
    equivalents = [b for b in tutorial_blocks(TUTORIAL.read_text()) if b.language == "python" and not b.runnable]
    assert len(equivalents) >= 6  # read, build, pretrain, embed, evaluate, pair, flow
    for block in equivalents:
        tree = ast.parse(block.code, filename=f"{TUTORIAL.name}:{block.line}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spatia"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"line {block.line}: {node.module}.{alias.name} does not exist"
        for dotted in _spatia_names(tree):
            try:
                _resolve(dotted)
            except (AttributeError, ImportError) as error:
                pytest.fail(f"{TUTORIAL.name}, block at line {block.line}: {dotted} does not exist ({error})")


# --- the tutorial's run ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_data
def test_tutorial_runs_on_the_breast_section(tmp_path):
    if not (BREAST / "cells.parquet").exists():
        pytest.skip(f"real breast section not found at {BREAST}")
    import anndata as ad
    import pandas as pd

    from spatia.keys import X_SPATIA, X_SPATIA_IMAGE

    done = run_tutorial(tmp_path)
    assert done.returncode == 0, f"the tutorial failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    print(*[line for line in done.stderr.splitlines() if line.startswith("[tutorial]")], sep="\n")

    # build, pretrain, embed
    n_cells = len(pd.read_parquet(BREAST / "cells.parquet", columns=["cell_id"]))
    assert (tmp_path / "mist" / "manifest.json").is_file()
    for name in ("checkpoints/last.ckpt", "logs/metrics.csv", "logs/loss_curve.png", "spatia_run.json"):
        assert (tmp_path / "run" / name).is_file(), name
    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert cells.n_obs == n_cells
    assert np.isfinite(cells.obsm[X_SPATIA]).all() and cells.obsm[X_SPATIA].shape[1] > 1
    image = ad.read_h5ad(tmp_path / "cells_image.h5ad")
    assert X_SPATIA_IMAGE in image.obsm and np.isfinite(image.obsm[X_SPATIA_IMAGE]).all()

    # scanpy on X_spatia
    explored = ad.read_h5ad(tmp_path / "cells_scanpy.h5ad")
    assert explored.obs["leiden"].nunique() >= 2
    assert explored.obsm["X_umap"].shape == (n_cells, 2)
    for figure in ("umap_leiden.png", "spatial_clusters.png"):
        assert (tmp_path / figure).stat().st_size > 10_000, figure

    # evaluate: SPATIA rows beside the baselines, scores in range
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {X_SPATIA, X_SPATIA_IMAGE, "pca"} <= set(metrics["embeddings"])
    annotation = metrics["tasks"]["annotation"]["results"]
    for name in (X_SPATIA, X_SPATIA_IMAGE, "pca"):
        assert 0.0 <= annotation[name]["mlp"]["macro_f1"]["mean"] <= 1.0, name
    assert metrics["tasks"]["imputation"]["results"]["model"]["status"] == "ok"
    assert (tmp_path / "report" / "report.html").is_file()

    # pair: every Epithelial cell is a control with one Malignant target
    types = pd.read_csv(BREAST / "analysis" / "cell_types.csv").set_index("cell_type")
    pairs = pd.read_parquet(tmp_path / "pairs" / "pairs.parquet")
    assert len(pairs) == int(types.loc["Epithelial", "n_cells"])
    assert set(pairs["state_A"]) == {"Epithelial"} and set(pairs["state_B"]) == {"Malignant"}
    assert set(pairs["transition_tag"]) == {"epithelial_to_malignant"}
    assert pairs["x_ctrl_id"].is_unique
    assert ((pairs["match_score"] > 0) & (pairs["match_score"] <= 1)).all()
    assert set(pairs["x_ctrl_id"]) | set(pairs["x_tgt_id"]) <= set(cells.obs_names)
    for name in ("report.md", "pairs_map.png", "signature_genes.png", "diagnostics.png"):  # the figures it describes
        assert (tmp_path / "pairs" / name).is_file(), name

    # flow: generated crops for the held-out pairs, scored against identity
    assert (tmp_path / "generated" / "grid_epithelial_to_malignant.png").is_file()
    generated = np.load(tmp_path / "generated" / "generated.npz")
    assert len(generated["pair_id"]) > 0
    assert np.isfinite(generated["generated_images"]).all()
    flow_metrics = json.loads((tmp_path / "flow_report" / "metrics.json").read_text())
    variants = flow_metrics["variants"]
    assert {"spatia", "identity"} <= set(variants)
    assert variants["spatia"]["n_images"]["pooled"] == len(generated["pair_id"])
    for name in ("spatia", "identity"):
        assert 0.0 <= variants[name]["ks"]["pooled"] <= 1.0, name  # a Kolmogorov-Smirnov distance


if __name__ == "__main__":  # full-length run with block times: python tests/test_tutorial.py OUT_DIR [--full]
    out = Path(sys.argv[1])
    out.mkdir(parents=True)
    result = run_tutorial(out, short="--full" not in sys.argv[2:])
    print(result.stdout[-4000:])
    print(result.stderr[-20000:] if result.returncode else "\n".join(
        line for line in result.stderr.splitlines() if line.startswith("[tutorial]")))
    sys.exit(result.returncode)
