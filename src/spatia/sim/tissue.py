"""Tissue geometry of the simulator: domains, cell placement, nucleus shapes, boundary polygons.

Coordinates are in um, x to the right (image columns) and y down (image rows), origin at the
top-left corner of the canvas. Angles are measured from +x towards +y.

- `make_domain_map`: spatial domains painted from smoothed random fields on a coarse grid.
- `place_cells`: random sequential adsorption of non-overlapping nuclei (each nucleus is kept
  inside its bounding circle; circles never overlap), with domain-dependent state abundance,
  density and appearance.
- `nucleus_radius`: the radial function r(theta) of a nucleus (ellipse times boundary harmonics),
  shared by the polygons here and by the image renderer.
- `boundary_radii`: cell boundary = nucleus expanded by up to `expansion_um`, cut by the power
  diagram of the nuclei's bounding circles, sampled on the same angles as the nucleus polygon,
  so every nucleus polygon lies inside its cell polygon and cell polygons never overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from spatia.errors import ConfigError
from spatia.sim.config import DomainSpec, ResolvedState, SimulationConfig

N_HARMONICS = 4  # boundary harmonics k = 2..5
_HARMONIC_WEIGHTS = np.array([1.0, 0.7, 0.5, 0.35])
_HARMONIC_WEIGHTS = _HARMONIC_WEIGHTS * math.sqrt(2.0 / float(np.sum(_HARMONIC_WEIGHTS**2)))
ALIGNMENT_SD_RAD = 0.3
MAX_ELONGATION = 5.0
_MAX_PACKING_ROUNDS = 12
_SHAPE_SAMPLES = 36  # angles at which a nucleus shape is sampled for its bounding circle and area


@dataclass
class DomainMap:
    """Domain label and local tissue direction on a coarse grid covering the canvas.

    labels: (ny, nx) int16, index into the config's domains; cell (i, j) covers
      y in [i * grid_um, (i + 1) * grid_um) and x in [j * grid_um, (j + 1) * grid_um).
    direction_rad: (ny, nx) float32, the local tissue direction (along the iso-lines of the
      domain's random field: fibres and vessels run along it).
    """

    labels: np.ndarray
    direction_rad: np.ndarray
    grid_um: float
    names: tuple[str, ...]
    _share_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def _cells(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ny, nx = self.labels.shape
        i = np.clip((np.asarray(y_um) // self.grid_um).astype(np.int64), 0, ny - 1)
        j = np.clip((np.asarray(x_um) // self.grid_um).astype(np.int64), 0, nx - 1)
        return i, j

    def domain_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        i, j = self._cells(x_um, y_um)
        return self.labels[i, j].astype(np.int64)

    def direction_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        i, j = self._cells(x_um, y_um)
        return self.direction_rad[i, j].astype(np.float64)

    def domain_share_at(self, x_um: np.ndarray, y_um: np.ndarray, domain: int, radius_um: float) -> np.ndarray:
        """Share of the disc of radius `radius_um` around each point (on the grid, the part inside
        the canvas) that belongs to domain index `domain`."""
        key = (int(domain), float(radius_um))
        if key not in self._share_cache:
            r = max(1, int(round(radius_um / self.grid_um)))
            yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
            disc = (xx**2 + yy**2 <= r * r).astype(np.float64)
            inside = ndimage.convolve((self.labels == domain).astype(np.float64), disc, mode="constant")
            area = ndimage.convolve(np.ones(self.labels.shape), disc, mode="constant")
            self._share_cache[key] = np.clip(inside / area, 0.0, 1.0)
        i, j = self._cells(x_um, y_um)
        return self._share_cache[key][i, j]

    def area_fractions(self) -> dict[str, float]:
        counts = np.bincount(self.labels.ravel(), minlength=len(self.names))
        return {name: float(c) / self.labels.size for name, c in zip(self.names, counts)}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """Zero-mean, unit-sd Gaussian random field with two scales (sigma and sigma / 3)."""
    out = np.zeros(shape, np.float64)
    for scale, weight in ((sigma_cells, 1.0), (max(sigma_cells / 3.0, 0.7), 0.35)):
        f = ndimage.gaussian_filter(rng.standard_normal(shape), scale, mode="reflect")
        out += weight * (f - f.mean()) / (f.std() + 1e-12)
    return (out - out.mean()) / (out.std() + 1e-12)


def make_domain_map(
    rng: np.random.Generator, width_um: float, height_um: float, domains: tuple[DomainSpec, ...], grid_um: float = 4.0
) -> DomainMap:
    """Paint the domains on a grid: later domains over earlier ones, the matrix domain fills the rest.

    Each painted domain takes exactly round(area_fraction * grid cells) cells: the highest
    values of its field ("blobs") or the smallest |field| ("bands") among cells not yet taken.
    """
    shape = (max(2, math.ceil(height_um / grid_um)), max(2, math.ceil(width_um / grid_um)))
    total = shape[0] * shape[1]
    fields = [_smooth_field(rng, shape, d.length_scale_um / grid_um) for d in domains]
    matrix_index = next(i for i, d in enumerate(domains) if d.pattern == "matrix")
    labels = np.full(shape, matrix_index, np.int16)
    free = np.ones(shape, bool)
    for index in reversed(range(len(domains))):
        spec = domains[index]
        if spec.pattern == "matrix":
            continue
        score = fields[index] if spec.pattern == "blobs" else -np.abs(fields[index])
        take = min(int(round(spec.area_fraction * total)), int(free.sum()))
        if take <= 0:
            continue
        candidates = np.flatnonzero(free.ravel())
        # stable choice of the `take` highest scores among free cells
        order = np.argsort(-score.ravel()[candidates], kind="stable")[:take]
        chosen = candidates[order]
        labels.ravel()[chosen] = index
        free.ravel()[chosen] = False

    # tissue direction: along the iso-lines of each domain's own field; the matrix follows the
    # first blobs domain (stroma fibres run along tumour borders)
    blobs = [i for i, d in enumerate(domains) if d.pattern == "blobs"]
    reference = {i: i for i in range(len(domains))}
    if blobs:
        reference[matrix_index] = blobs[0]
    direction = np.zeros(shape, np.float32)
    for index in range(len(domains)):
        gy, gx = np.gradient(ndimage.gaussian_filter(fields[reference[index]], 1.0))
        angle = np.arctan2(gy, gx) + np.pi / 2
        mask = labels == index
        direction[mask] = angle[mask]
    return DomainMap(labels=labels, direction_rad=direction, grid_um=grid_um, names=tuple(d.name for d in domains))


def nucleus_radius(
    theta: np.ndarray,
    radius_um: np.ndarray,
    elongation: np.ndarray,
    orientation_rad: np.ndarray,
    harmonic_amp: np.ndarray,
    harmonic_phase: np.ndarray,
) -> np.ndarray:
    """Radius (um) of the nucleus boundary in direction `theta`.

    An ellipse of equivalent radius `radius_um` and axis ratio `elongation` with its major axis
    at `orientation_rad`, multiplied by 1 + sum_k amp_k cos(k (theta - orientation) + phase_k),
    k = 2..5. The per-nucleus arguments broadcast against `theta`; `harmonic_amp` and
    `harmonic_phase` carry the harmonics on their last axis (shape (..., 4)).
    """
    cos_theta, sin_theta = np.cos(theta), np.sin(theta)
    co, so = np.cos(orientation_rad), np.sin(orientation_rad)
    ct = cos_theta * co + sin_theta * so  # cos(theta - orientation)
    st = sin_theta * co - cos_theta * so  # sin(theta - orientation)
    sqrt_e = np.sqrt(elongation)
    a = radius_um * sqrt_e
    b = radius_um / sqrt_e
    r = a * b / np.sqrt((b * ct) ** 2 + (a * st) ** 2)
    modulation = 1.0
    ck, sk = ct, st  # cos(k t), sin(k t), k = 1
    for h in range(N_HARMONICS):
        ck, sk = ck * ct - sk * st, sk * ct + ck * st  # k = h + 2
        phase = harmonic_phase[..., h]
        modulation = modulation + harmonic_amp[..., h] * (ck * np.cos(phase) - sk * np.sin(phase))
    return r * modulation


@dataclass
class CellLayout:
    """Per-cell geometry and rendered nucleus parameters of the placed cells (n cells).

    x_um, y_um: nucleus centres (float64). domain, state: int64 indices into the config's
    domains and states. radius_um, elongation, orientation_rad, harmonic_amp (n, 4),
    harmonic_phase (n, 4): the nucleus shape (see `nucleus_radius`). intensity: DAPI level
    in image counts; texture: relative texture amplitude; spot_count: int64 chromocentres.
    bounding_um: radius of the circle that holds the rendered nucleus (anti-aliasing included).
    area_um2: area of the nucleus shape.
    niche_share: for cells in a transition's target state, the share of that transition's
      `niche_domain` around the cell (`DomainMap.domain_share_at`); NaN for other cells.
    shift_strength: strength of the designed morphology shift this cell got
      (`TransitionSpec.shift_strength`); 0 for cells in no transition's target state.
    """

    x_um: np.ndarray
    y_um: np.ndarray
    domain: np.ndarray
    state: np.ndarray
    radius_um: np.ndarray
    elongation: np.ndarray
    orientation_rad: np.ndarray
    harmonic_amp: np.ndarray
    harmonic_phase: np.ndarray
    intensity: np.ndarray
    texture: np.ndarray
    spot_count: np.ndarray
    bounding_um: np.ndarray
    area_um2: np.ndarray
    niche_share: np.ndarray
    shift_strength: np.ndarray

    def __len__(self) -> int:
        return len(self.x_um)

    def subset(self, index: np.ndarray) -> CellLayout:
        return CellLayout(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})

    def concat(self, other: CellLayout) -> CellLayout:
        """These cells followed by `other`'s."""
        return CellLayout(**{
            name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in self.__dataclass_fields__
        })

    def radius_at(self, theta: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """(n, K) nucleus radius (um) at angles `theta` of shape (K,) or (n, K)."""
        return nucleus_radius(
            np.broadcast_to(theta, (len(self), np.shape(theta)[-1])).astype(dtype),
            self.radius_um[:, None].astype(dtype),
            self.elongation[:, None].astype(dtype),
            self.orientation_rad[:, None].astype(dtype),
            self.harmonic_amp[:, None, :].astype(dtype),
            self.harmonic_phase[:, None, :].astype(dtype),
        )


def _sample_candidates(
    rng: np.random.Generator,
    n: int,
    width_um: float,
    height_um: float,
    domain_map: DomainMap,
    config: SimulationConfig,
    states: tuple[ResolvedState, ...],
) -> CellLayout:
    """Uniform candidate points, thinned by domain density, with a state and a nucleus each."""
    domains = config.domains
    x = rng.uniform(0.0, width_um, n)
    y = rng.uniform(0.0, height_um, n)
    domain = domain_map.domain_at(x, y)
    density = np.array([d.density_scale for d in domains])
    keep = rng.random(n) < density[domain]
    x, y, domain = x[keep], y[keep], domain[keep]
    m = len(x)

    names = [s.name for s in states]
    weights = np.array([[d.state_weights.get(name, 0.0) for name in names] for d in domains], np.float64)
    cumulative = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    cumulative[:, -1] = 1.0
    state = (rng.random(m)[:, None] > cumulative[domain]).sum(axis=1).astype(np.int64)

    base = {field: np.array([getattr(s.morphology, field) for s in states], np.float64)
            for field in ("radius_um", "elongation", "irregularity", "intensity", "texture", "spots")}
    aligned = np.array([s.morphology.aligned for s in states])
    # niche-dependent shifts: a target cell's morphology is its control state's, shifted with a
    # strength set by the share of a domain around the cell (TransitionSpec.shift_strength)
    share = np.full(m, np.nan)
    strength = np.zeros(m)
    domain_index = {d.name: i for i, d in enumerate(domains)}
    cell_base = {name: values[state] for name, values in base.items()}
    index = {s.name: i for i, s in enumerate(states)}
    for transition in config.transitions:
        rows = np.flatnonzero(state == index[transition.target])
        if len(rows) == 0:
            continue
        if transition.niche_domain is not None:
            share[rows] = domain_map.domain_share_at(x[rows], y[rows], domain_index[transition.niche_domain],
                                                     transition.niche_radius_um)
        strength[rows] = transition.shift_strength(np.nan_to_num(share[rows]))
        control = states[index[transition.control]].morphology
        shift = transition.morphology_shift
        for name, scale in (("radius_um", shift.radius_scale), ("elongation", shift.elongation_scale),
                            ("irregularity", shift.irregularity_scale), ("intensity", shift.intensity_scale),
                            ("texture", shift.texture_scale), ("spots", shift.spots_scale)):
            cell_base[name][rows] = getattr(control, name) * scale ** strength[rows]
        cell_base["elongation"][rows] = np.maximum(cell_base["elongation"][rows], 1.0)
    size_scale = np.array([d.nucleus_size_scale for d in domains])[domain]
    intensity_scale = np.array([d.nucleus_intensity_scale for d in domains])[domain]
    texture_scale = np.array([d.nucleus_texture_scale for d in domains])[domain]

    radius = cell_base["radius_um"] * size_scale * np.exp(rng.normal(0.0, config.radius_cv, m))
    elongation = np.minimum(
        1.0 + (cell_base["elongation"] - 1.0) * np.exp(rng.normal(0.0, config.elongation_cv, m)), MAX_ELONGATION
    )
    tissue_direction = domain_map.direction_at(x, y) + rng.normal(0.0, ALIGNMENT_SD_RAD, m)
    orientation = np.where(aligned[state], tissue_direction, rng.uniform(0.0, np.pi, m))
    orientation = np.mod(orientation, np.pi)
    amp = cell_base["irregularity"][:, None] * _HARMONIC_WEIGHTS[None, :] * rng.standard_normal((m, N_HARMONICS))
    total = np.abs(amp).sum(axis=1, keepdims=True)
    amp = np.where(total > 0.45, amp * (0.45 / np.maximum(total, 1e-12)), amp)
    phase = rng.uniform(0.0, 2 * np.pi, (m, N_HARMONICS))
    intensity = (config.dapi_nucleus_level * cell_base["intensity"] * intensity_scale
                 * np.exp(rng.normal(0.0, config.intensity_cv, m)))
    texture = cell_base["texture"] * texture_scale * np.exp(rng.normal(0.0, config.texture_cv, m))
    spot_count = rng.poisson(cell_base["spots"] * texture_scale).astype(np.int64)

    layout = CellLayout(
        x_um=x, y_um=y, domain=domain, state=state, radius_um=radius, elongation=elongation,
        orientation_rad=orientation, harmonic_amp=amp, harmonic_phase=phase, intensity=intensity,
        texture=texture, spot_count=spot_count, bounding_um=np.zeros(m), area_um2=np.zeros(m),
        niche_share=share, shift_strength=strength,
    )
    step = 2 * np.pi / _SHAPE_SAMPLES
    coarse = np.arange(_SHAPE_SAMPLES) * step
    r_coarse = layout.radius_at(coarse, np.float32).astype(np.float64)
    layout.area_um2 = 0.5 * np.sum(r_coarse**2, axis=1) * step  # trapezoid rule: exact to ~1e-6 here
    # refine the maximum around the three best coarse angles, then add 0.5% and the anti-aliased
    # edge (half a pixel, and a quarter more) so the whole rendered nucleus is inside its circle
    best = coarse[np.argsort(r_coarse, axis=1)[:, -3:]]  # (n, 3)
    local = (best[:, :, None] + np.linspace(-step, step, 13)[None, None, :]).reshape(len(best), -1)
    r_max = np.maximum(r_coarse.max(axis=1), layout.radius_at(local, np.float32).max(axis=1))
    layout.bounding_um = 1.005 * r_max + 0.75 * config.pixel_size_um
    return layout


def _conflict_candidates(xy_um: np.ndarray, radius_um: np.ndarray, gap_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) that may conflict: every pair closer than r_a + r_b + gap is included.

    Pairs of ordinary points come from one fixed-radius search at twice the 99th-percentile
    radius; the few larger points search their own neighbourhood (r_i + r_max + gap), which
    keeps the pair list small when a handful of elongated nuclei have large bounding circles.
    """
    tree = cKDTree(xy_um)
    typical = float(np.quantile(radius_um, 0.99))
    pairs = [tree.query_pairs(2 * typical + gap_um, output_type="ndarray")]
    large = np.flatnonzero(radius_um > typical)
    if len(large):
        balls = tree.query_ball_point(xy_um[large], radius_um[large] + float(radius_um.max()) + gap_um)
        lengths = np.array([len(ball) for ball in balls])
        others = np.concatenate([np.asarray(ball, dtype=np.int64) for ball in balls])
        pairs.append(np.column_stack([np.repeat(large, lengths), others]))
    pairs = np.concatenate(pairs).astype(np.int64)
    a, b = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    unique = np.unique(a[a != b] * len(xy_um) + b[a != b])
    return unique // len(xy_um), unique % len(xy_um)


def greedy_packing(xy_um: np.ndarray, radius_um: np.ndarray, gap_um: float) -> np.ndarray:
    """Random sequential adsorption in index order, computed in parallel rounds.

    Point i is accepted iff no accepted point j < i lies closer than r_i + r_j + gap. Equals
    adding the points one by one in index order (the lexicographically first maximal
    independent set of the conflict graph), so the first k accepted points are exactly what
    a process stopped after those k would give. Returns a bool mask of accepted points.
    """
    n = len(xy_um)
    state = np.zeros(n, np.int8)  # 0 undecided, 1 accepted, -1 rejected
    if n == 0:
        return state.astype(bool)
    a, b = _conflict_candidates(xy_um, radius_um, gap_um)
    distance = np.hypot(*(xy_um[a] - xy_um[b]).T)
    conflict = distance < radius_um[a] + radius_um[b] + gap_um
    a, b = a[conflict], b[conflict]
    while True:
        undecided = state == 0
        if not undecided.any():
            break
        blocked = np.zeros(n, bool)
        both = undecided[a] & undecided[b]
        blocked[b[both]] = True  # a lower-index undecided neighbour decides first
        state[undecided & ~blocked] = 1
        rejected = b[state[a] == 1]
        state[rejected[state[rejected] == 0]] = -1
        live = (state[a] == 0) | (state[b] == 0)
        a, b = a[live], b[live]
    return state == 1


def place_cells(
    rng: np.random.Generator,
    config: SimulationConfig,
    states: tuple[ResolvedState, ...],
    domain_map: DomainMap,
    width_um: float,
    height_um: float,
) -> CellLayout:
    """Exactly `config.n_cells` non-overlapping nuclei (bounding circles apart by the gap).

    Random sequential adsorption fed in rounds: each round appends a batch of candidates after
    the nuclei kept so far (which stay kept) and packs them in order, until enough are kept.
    The first `n_cells` kept nuclei are returned, so density is uniform within each domain.
    """
    n = config.n_cells
    mean_keep = float(np.mean([d.density_scale for d in config.domains]))
    batch = int(math.ceil(3 * n / max(mean_keep, 0.05)))
    kept: CellLayout | None = None
    for _round in range(_MAX_PACKING_ROUNDS):
        candidates = _sample_candidates(rng, batch, width_um, height_um, domain_map, config, states)
        pool = candidates if kept is None else kept.concat(candidates)
        before = 0 if kept is None else len(kept)
        kept = pool.subset(np.flatnonzero(greedy_packing(np.column_stack([pool.x_um, pool.y_um]),
                                                         pool.bounding_um, config.packing_gap_um)))
        if len(kept) >= n:
            return kept.subset(np.arange(n))
        if len(kept) - before < 0.002 * n:  # jammed: new candidates hardly fit any more
            break
    raise ConfigError(
        f"only {len(kept)} of {n} nuclei fit without overlapping at {config.cells_per_mm2:g} cells/mm^2",
        fix="lower cells_per_mm2 (or the nucleus radii / packing_gap_um) so the cells fit",
    )


def boundary_radii(
    layout: CellLayout, nucleus_r: np.ndarray, angles: np.ndarray, expansion_um: float, neighbours: int = 16
) -> np.ndarray:
    """(n, K) radius of each cell boundary at `angles`: nucleus + expansion, cut by neighbours.

    The cut is the power-diagram bisector of the nuclei's bounding circles: for neighbour j at
    offset d (length D), the ray at angle theta meets it at t = (D^2 + R_i^2 - R_j^2) / (2 u.d).
    Because bounding circles never overlap, t > R_i >= nucleus radius, so the nucleus stays
    inside; each cell stays inside its (convex) power cell, so cells never overlap. The number
    of neighbours considered grows until every neighbour left out is provably too far to cut.
    """
    n = len(layout)
    cell_r = nucleus_r + expansion_um
    if n < 2 or expansion_um == 0:
        return cell_r
    xy = np.column_stack([layout.x_um, layout.y_um])
    tree = cKDTree(xy)
    reach = layout.bounding_um + expansion_um
    # a neighbour at distance D can only cut below `reach` if D < reach + sqrt(reach^2 - R_i^2 + R_max^2)
    needed = reach + np.sqrt(reach**2 - layout.bounding_um**2 + float(layout.bounding_um.max()) ** 2)
    k = min(neighbours, n - 1)
    while True:
        distance, nearest = tree.query(xy, k=k + 1)
        if k >= n - 1 or np.all(distance[:, -1] >= needed):
            break
        k = min(2 * k, n - 1)
    nearest = nearest[:, 1:]
    unit = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (K, 2)
    chunk = 8192
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        offset = xy[nearest[start:stop]] - xy[start:stop, None, :]  # (c, k, 2)
        d2 = np.sum(offset**2, axis=-1)
        num = d2 + layout.bounding_um[start:stop, None] ** 2 - layout.bounding_um[nearest[start:stop]] ** 2
        proj = offset @ unit.T  # (c, k, K)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(proj > 1e-12, num[:, :, None] / (2 * proj), np.inf)
        cell_r[start:stop] = np.minimum(cell_r[start:stop], t.min(axis=1))
    return cell_r


def polygon_vertices(x_um: np.ndarray, y_um: np.ndarray, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(n, K, 2) vertices (x, y in um) of star polygons with `radii` (n, K) at `angles` (K,)."""
    return np.stack([x_um[:, None] + radii * np.cos(angles), y_um[:, None] + radii * np.sin(angles)], axis=-1)


def polygon_area(vertices: np.ndarray) -> np.ndarray:
    """(n,) shoelace area of (n, K, 2) polygons (open: the first vertex is not repeated)."""
    x, y = vertices[..., 0], vertices[..., 1]
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y, axis=1))
