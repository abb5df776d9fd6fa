"""`flow_evaluate`: score generated crops (one or several variants) against the real targets.

REPORT_DIR: metrics.json, report.md, report.html, the generation grids (PNG), spatia_run.json.

metrics.json:

    {"extractor": name, "warnings": [...], "n_heldout_pairs": N,
     "variants": {name: {"fid": {"pooled": x, "per_transition": {t: x}, "mean_per_transition": x},
                         "kid": {...}, "ks": {...}, "wasserstein": {...}, "feature_spearman": {...},
                         "psnr": {...}, "ssim": {...}, "n_images": {"pooled": N, "per_transition": {t: n}},
                         "extractor": name}}}

The `identity` variant (the control crop returned as the prediction) is always scored; with
`references` on, so are `identity_reconstruction` (the control through the autoencoder: a
zero-step flow) and `target_reconstruction` (the real target through the autoencoder: the best
a latent model can score).
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spatia.errors import InputDataError
from spatia.flow.config import FlowEvaluateConfig
from spatia.flow.features import RandomConvFeatures, extract
from spatia.flow.metrics import distribution_scores, fid_kid, morphology_table, zscore_on_real
from spatia.flow.quality import psnr, ssim
from spatia.outputs import atomic_output, write_json, write_run_record

log = logging.getLogger(__name__)

METRICS = ("fid", "kid", "ks", "wasserstein", "feature_spearman", "psnr", "ssim")


@dataclass
class FlowEvaluateResult:
    out_dir: Path
    metrics: dict[str, Any]
    seconds: float

    def summary(self) -> dict[str, Any]:
        rows = {}
        for name, scores in self.metrics["variants"].items():
            rows[name] = {"pooled": {m: _round(scores[m]["pooled"]) for m in METRICS},
                          "mean_per_transition": {m: _round(scores[m]["mean_per_transition"]) for m in METRICS}}
        return {"out_dir": str(self.out_dir), "extractor": self.metrics["extractor"],
                "heldout_pairs": self.metrics["n_heldout_pairs"], "variants": rows, "seconds": round(self.seconds, 1)}


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def variant_name(train_config: Mapping[str, Any] | None) -> str:
    """The ablation name of a flow trained with `train_config` (a FlowTrainConfig as a dict);
    the inverse of `spatia.flow.config.variant_train_config`."""
    if not train_config:
        return "generated"
    if float(train_config.get("pair_noise", 0.0)) > 0:
        return f"pair_noise_{float(train_config['pair_noise']):g}"
    condition = train_config.get("condition", "levels")
    if condition == "cell":
        return "cell_only"
    if condition == "none":
        return "unconditional"
    if float(train_config.get("contrastive_weight", 0.05)) == 0.0:
        return "no_contrastive"
    if condition == "unified":
        return "spatia_unified"
    return "spatia"


def _load_generated(path: Path) -> dict[str, np.ndarray]:
    file = path / "generated.npz"
    if not file.exists():
        raise InputDataError("generated.npz is missing", path=path, fix="give a GEN_DIR written by `spatia flow generate`")
    with np.load(file, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def make_extractor(config: FlowEvaluateConfig):
    """The feature extractor the config asks for ("auto": Inception if weights are given, else
    the SPATIA encoder if a checkpoint is given, else random conv features)."""
    from spatia.flow.features import FIDInceptionV3, SpatiaImageFeatures

    kind = config.extractor
    if kind == "auto":
        kind = "inception" if config.inception_weights else "spatia" if config.spatia_checkpoint else "random"
    if kind == "inception":
        if not config.inception_weights:
            raise InputDataError("the inception extractor needs a weights file", fix="pass --inception WEIGHTS")
        return FIDInceptionV3.from_weights(config.inception_weights)
    if kind == "spatia":
        if not config.spatia_checkpoint:
            raise InputDataError("the spatia extractor needs a checkpoint", fix="pass --spatia-checkpoint CKPT")
        return SpatiaImageFeatures(config.spatia_checkpoint)
    return RandomConvFeatures(config.random_feature_seed)


def _score_block(real_f, fake_f, real_z, fake_z, fake_img, real_img, config, seed) -> dict[str, Any]:
    out = fid_kid(real_f, fake_f, kid_subsets=config.kid_subsets, kid_subset_size=config.kid_subset_size, seed=seed)
    out.update(distribution_scores(real_z, fake_z))
    out["psnr"] = float(np.mean(psnr(fake_img, real_img)))
    out["ssim"] = float(np.mean(ssim(fake_img, real_img)))
    return out


def score_variants(sets: Mapping[str, np.ndarray], real: np.ndarray, transitions: np.ndarray, extractor,
                   config: FlowEvaluateConfig, seed: int) -> dict[str, Any]:
    """Metrics of each named image set (aligned with `real`, uint8 (N, S, S)) pooled and per transition."""
    real_f = extract(extractor, real)
    real_tab = morphology_table(real, config.nucleus_threshold)
    names = sorted(np.unique(transitions).tolist())
    variants: dict[str, Any] = {}
    for name, images in sets.items():
        fake_f = extract(extractor, images)
        real_z, fake_z = zscore_on_real(real_tab, morphology_table(images, config.nucleus_threshold))
        pooled = _score_block(real_f, fake_f, real_z, fake_z, images, real, config, seed)
        per = {}
        for t in names:
            rows = np.flatnonzero(transitions == t)
            per[t] = _score_block(real_f[rows], fake_f[rows], real_z[rows], fake_z[rows], images[rows], real[rows],
                                  config, seed)
        # pooled feature means are 0 for the real crops (z-scored on them): the pooled Spearman
        # ranks the (transition, feature) means instead
        pooled["feature_spearman"] = stacked_mean_spearman(real_z, fake_z, transitions, names)
        entry: dict[str, Any] = {}
        for m in METRICS:
            values = {t: per[t][m] for t in names}
            finite = [v for v in values.values() if v is not None and np.isfinite(v)]
            entry[m] = {"pooled": pooled[m], "per_transition": values,
                        "mean_per_transition": float(np.mean(finite)) if finite else None}
        entry["kid_std"] = {"pooled": pooled["kid_std"], "per_transition": {t: per[t]["kid_std"] for t in names}}
        entry["n_images"] = {"pooled": int(len(images)), "per_transition": {t: int((transitions == t).sum()) for t in names}}
        entry["n_features"] = pooled["n_features"]
        entry["extractor"] = getattr(extractor, "name", type(extractor).__name__)
        variants[name] = entry
    return variants


def stacked_mean_spearman(real_z: np.ndarray, fake_z: np.ndarray, transitions: np.ndarray, names: list[str]) -> float | None:
    """Spearman correlation of the per-(transition, feature) means of generated vs real crops."""
    from scipy import stats

    real_m = np.concatenate([np.nanmean(real_z[transitions == t], axis=0) for t in names])
    fake_m = np.concatenate([np.nanmean(fake_z[transitions == t], axis=0) for t in names])
    ok = np.isfinite(real_m) & np.isfinite(fake_m)
    if ok.sum() < 3:
        return None
    rho = stats.spearmanr(real_m[ok], fake_m[ok]).statistic
    return float(rho) if np.isfinite(rho) else None


def flow_evaluate(generated: str | Path | Mapping[str, str | Path], out_dir: str | Path,
                  config: FlowEvaluateConfig = FlowEvaluateConfig(), seed: int = 0) -> FlowEvaluateResult:
    """Score one GEN_DIR, or several named ones (an ablation), plus the identity baseline."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if isinstance(generated, (str, Path)):
        info_path = Path(generated) / "generate.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        generated = {variant_name(info.get("flow_train_config")): Path(generated)}
    gens = {name: Path(p) for name, p in generated.items()}
    loaded = {name: _load_generated(p) for name, p in gens.items()}
    first = next(iter(loaded.values()))
    order = first["pair_id"]
    sets: dict[str, np.ndarray] = {"identity": first["ctrl_images"]}
    if config.references and "recon_ctrl_images" in first:
        sets["identity_reconstruction"] = first["recon_ctrl_images"]
        sets["target_reconstruction"] = first["recon_tgt_images"]
    for name, g in loaded.items():
        position = {int(p): i for i, p in enumerate(g["pair_id"])}
        missing = [int(p) for p in order if int(p) not in position]
        if missing:
            raise InputDataError(f"variant {name!r} lacks {len(missing)} of the held-out pairs of the others",
                                 path=gens[name], fix="generate every variant from flows trained on the same split")
        sets[name] = g["generated_images"][[position[int(p)] for p in order]]
    real, transitions = first["tgt_images"], first["transition_tag"].astype(str)
    extractor = make_extractor(config)
    warnings_list = []
    if len(real) < config.min_images_warning:
        warnings_list.append(f"FID/KID on {len(real)} images (< {config.min_images_warning}): biased upwards and noisy; "
                             "compare variants scored here, not with published figures")
    torch.manual_seed(seed)
    variants = score_variants(sets, real, transitions, extractor, config, seed)
    metrics = {"extractor": getattr(extractor, "name", type(extractor).__name__), "warnings": warnings_list,
               "n_heldout_pairs": int(len(real)), "transitions": sorted(np.unique(transitions).tolist()),
               "generated_dirs": {k: str(v) for k, v in gens.items()}, "variants": variants}
    for w in warnings_list:
        log.warning(w)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        write_json(tmp / "metrics.json", metrics)
        figures = []
        for name, p in gens.items():
            for png in sorted(p.glob("grid_*.png")):
                target = tmp / f"{name}_{png.name}"
                shutil.copyfile(png, target)
                figures.append(target.name)
        (tmp / "report.md").write_text(render_markdown(metrics, figures))
        (tmp / "report.html").write_text(render_html(metrics, figures))
        write_run_record(tmp, "flow evaluate", {"flow_evaluate": config, "generated": {k: str(v) for k, v in gens.items()}},
                         seed)
    return FlowEvaluateResult(out_dir, metrics, time.perf_counter() - started)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _table_rows(metrics: dict[str, Any], key: str = "pooled") -> tuple[list[str], list[list[str]]]:
    header = ["variant", "N", *METRICS]
    rows = []
    for name, s in metrics["variants"].items():
        rows.append([name, str(s["n_images"]["pooled"]), *[_fmt(s[m][key]) for m in METRICS]])
    return header, rows


def render_markdown(metrics: dict[str, Any], figures: list[str]) -> str:
    lines = ["# Flow generation report", "", f"Feature extractor for FID/KID: {metrics['extractor']}.",
             f"Held-out pairs: {metrics['n_heldout_pairs']}. Lower is better for fid, kid, ks, wasserstein; higher for "
             "feature_spearman, psnr, ssim. `identity` returns the control crop as the prediction.", ""]
    lines += [f"> warning: {w}" for w in metrics["warnings"]] + [""]
    for key, title in (("mean_per_transition", "Mean over transitions"), ("pooled", "Pooled over transitions")):
        header, rows = _table_rows(metrics, key)
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += ["", "## Per transition (ks / wasserstein / fid)", ""]
    for name, s in metrics["variants"].items():
        parts = [f"{t}: {_fmt(s['ks']['per_transition'][t])} / {_fmt(s['wasserstein']['per_transition'][t])} / "
                 f"{_fmt(s['fid']['per_transition'][t])} (N={s['n_images']['per_transition'][t]})"
                 for t in metrics["transitions"]]
        lines.append(f"- **{name}**: " + "; ".join(parts))
    lines += ["", "## Grids (control | generated | real target)", ""]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def render_html(metrics: dict[str, Any], figures: list[str]) -> str:
    esc = html.escape
    table = ""
    for key, title in (("mean_per_transition", "Mean over transitions"), ("pooled", "Pooled over transitions")):
        header, rows = _table_rows(metrics, key)
        table += f"<h2>{title}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
        table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    warn = "".join(f"<p><b>warning:</b> {esc(w)}</p>" for w in metrics["warnings"])
    figs = "".join(f"<figure><img src='{esc(f)}'><figcaption>{esc(f)}: control | generated | real target"
                   "</figcaption></figure>" for f in figures)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Flow generation report</title>"
            "<style>body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:3px 6px} "
            "table{border-collapse:collapse} figure{display:inline-block;margin:6px}</style></head><body>"
            f"<h1>Flow generation report</h1><p>Feature extractor: {esc(metrics['extractor'])}; held-out pairs: "
            f"{metrics['n_heldout_pairs']}</p>{warn}{table}<h2>Grids</h2>{figs}</body></html>\n")
