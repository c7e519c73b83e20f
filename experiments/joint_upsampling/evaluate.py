"""Evaluation of guided depth up-samplers: test sets, a fairly tuned guided filter, RMSE, reports.

Test sets (`test_sets`):

* training on synthetic scenes: the two halves of the Middlebury 2014
  "motorcycle" image (`input_pipeline.middlebury_halves`), reported
  separately. They are two halves of one scene.
* training on NYU Depth v2: its test split.

Every method is run on each test frame on its own: bilinear, bicubic, the
guided filter and the trained networks. The RMSE of a frame is taken over the
valid ground-truth pixels that lie more than `config.eval_border` pixels from
the frame's edge, in the test set's unit (disparity pixels for Middlebury,
centimetres of depth for NYU); a test set's RMSE is the mean over its frames.

The guided filter's radius and eps are tuned per scale by grid search
(`baselines.tune_guided_filter`, with the same protocol and metric) on
held-out data of the same kind as the test set, never on the frames it is
evaluated on: for one Middlebury half, on the other half; for NYU, on
`config.guided_filter.tune_examples` evenly spaced frames of the training
split.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments.common.errors import ConfigError
from experiments.joint_upsampling import baselines, input_pipeline
from experiments.joint_upsampling.config_validation import scale_key
from experiments.joint_upsampling.downsampling import make_example

BASELINES = ("bilinear", "bicubic", "guided_filter")
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
DETAILS_FILE = "details.json"
GUIDED_FILTER_FILE = "guided_filter.json"


@dataclasses.dataclass
class TestSet:
    """Frames to evaluate on, and the held-out frames the guided filter is tuned on.

    Attributes:
      name: the key in results.json, e.g. 'middlebury_left'.
      title: what the table says it is.
      frames: random-access frames {'image' (H, W, 3) uint8, 'disparity'
        (H, W) float32}.
      tuning_frames: frames of the same kind, disjoint from `frames`.
      tuned_on: what `tuning_frames` are, in words.
      unit: the unit of the RMSE, in words.
      unit_scale: the RMSE is multiplied by this (100: metres to centimetres).
    """

    name: str
    title: str
    frames: Sequence[dict[str, np.ndarray]]
    tuning_frames: Sequence[dict[str, np.ndarray]]
    tuned_on: str
    unit: str
    unit_scale: float = 1.0


class _First:
    """The first `count` frames of a random-access source."""

    def __init__(self, source, count: int):
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(f"index must be in [0, {self.count}), got {index}")
        return self.source[index]


def evenly_spaced(count: int, total: int) -> list[int]:
    """`min(count, total)` distinct indices spread evenly over [0, total), first and last included."""
    return sorted({int(i) for i in np.linspace(0, total - 1, min(count, total)).round()})


def test_sets(config: ml_collections.ConfigDict) -> list[TestSet]:
    """The test sets of `config` (see the module docstring); the files are read and checked here."""
    if config.train_data == "nyu":
        test = input_pipeline.nyu_split(config, "test")
        count = min(config.nyu_eval_frames, len(test)) if config.nyu_eval_frames else len(test)
        train = input_pipeline.nyu_split(config, "train")
        tuning = [train[i] for i in evenly_spaced(config.guided_filter.tune_examples, len(train))]
        train.close()
        split = f"the split file {config.nyu_split_path}" if config.nyu_split_path else "the published split"
        return [TestSet(
            "nyu_test", f"NYU Depth v2 labeled, test split of {split}, {count} of {len(test)} frames",
            test if count == len(test) else _First(test, count),
            tuning, f"{len(tuning)} evenly spaced frames of the NYU training split",
            "centimetres of depth", 100.0,
        )]
    halves = input_pipeline.middlebury_halves(16)
    sets = []
    for side, other in (("left", "right"), ("right", "left")):
        h, w = halves[side]["disparity"].shape
        sets.append(TestSet(
            f"middlebury_{side}", f"Middlebury 2014 motorcycle, {side} half ({h} x {w})",
            [halves[side]], [halves[other]], f"the {other} half of the image", "disparity pixels",
        ))
    return sets


def check_test_sets(config: ml_collections.ConfigDict, sets: Sequence[TestSet]) -> None:
    """Raises `ConfigError` if a scale does not divide the first test frame or the border eats it."""
    for test_set in sets:
        h, w = test_set.frames[0]["disparity"].shape
        for scale in config.scales:
            if h % scale or w % scale:
                raise ConfigError(f"config.scales: {scale} does not divide the {h} x {w} frames of "
                                  f"{test_set.title}")
        if 2 * config.eval_border >= min(h, w):
            raise ConfigError(f"config.eval_border={config.eval_border} leaves nothing of the {h} x {w} "
                              f"frames of {test_set.title}")


def evaluation_mask(example: dict[str, np.ndarray], border: int) -> np.ndarray:
    """(H, W) bool: the valid target pixels at least `border` pixels inside the frame."""
    valid = example["valid"][..., 0].copy()
    h, w = valid.shape
    if border and 2 * border >= min(h, w):
        raise ValueError(f"config.eval_border={border} leaves nothing of a {h} x {w} frame")
    if border:
        valid[:border] = valid[-border:] = False
        valid[:, :border] = valid[:, -border:] = False
    return valid


def tune_guided_filter(config: ml_collections.ConfigDict, test_set: TestSet, scale: int) -> dict[str, Any]:
    """Grid-searches the guided filter on `test_set.tuning_frames` at `scale`.

    Returns:
      {"radius", "eps", "rmse" (mean over the tuning frames, in the test set's
      unit), "grid" ([radius, eps, rmse] rows), "tuned_on"}.
    """
    gf = config.guided_filter
    examples = []
    for frame in test_set.tuning_frames:
        example = make_example(frame["image"], frame["disparity"], scale, config.downsampling)
        example["valid"] = evaluation_mask(example, config.eval_border)[..., None]
        examples.append(example)
    tuned = baselines.tune_guided_filter(examples, scale, gf.radii, gf.epsilons)
    unit = test_set.unit_scale
    return {"radius": tuned["radius"], "eps": tuned["eps"], "rmse": unit * tuned["rmse"],
            "grid": [[r, e, unit * v] for r, e, v in tuned["grid"]], "tuned_on": test_set.tuned_on}


def make_predictor(model: nnx.Module) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """`predict(example) -> (H, W) float32`, the network's output for one `make_example` dict.

    Runs on this process's default device, with a host copy of the (replicated)
    parameters, so every process can evaluate on its own; compiled once per
    input shape.
    """
    graphdef, state = nnx.split(model)
    state = jax.device_get(state)

    @jax.jit
    def forward(state, guide, low_res):
        return nnx.merge(graphdef, state)(guide, low_res)

    def predict(example: dict[str, np.ndarray]) -> np.ndarray:
        out = forward(state, jnp.asarray(example["guide"])[None], jnp.asarray(example["low_res"])[None])
        return np.asarray(out[0, ..., 0], np.float32)

    return predict


def baseline_predictions(example: dict[str, np.ndarray], scale: int, guided: dict) -> dict[str, np.ndarray]:
    """(H, W) predictions of bilinear, bicubic and the guided filter with `guided`'s radius and eps."""
    low_res = example["low_res"][..., 0]
    return {
        "bilinear": baselines.bilinear(low_res, scale),
        "bicubic": baselines.bicubic(low_res, scale),
        "guided_filter": baselines.guided_filter_upsample(
            example["guide"], low_res, scale, guided["radius"], guided["eps"]
        ),
    }


def evaluate(
    config: ml_collections.ConfigDict,
    sets: Sequence[TestSet],
    networks: dict[tuple[str, int], nnx.Module],
    workdir: str,
    panels: bool,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, dict[str, Any]]]]:
    """Tunes the guided filter, then evaluates every method on every test set and scale.

    Args:
      config: the experiment config (`scales`, `downsampling`, `eval_border`,
        `guided_filter`).
      sets: from `test_sets(config)`.
      networks: {(name, scale): trained model}, names in the order reported.
      workdir: where the panels go.
      panels: write `panels_<set>_x<scale>.png` of each set's first frame.

    Returns:
      `(results, guided)`: results is {set: {method: {"x4": rmse, ...}}},
      methods being `BASELINES` and then the networks; guided is
      {set: {"x4": tune_guided_filter(...), ...}}.
    """
    scales = tuple(int(s) for s in config.scales)
    names = list(dict.fromkeys(name for name, _ in networks))
    predictors = {key: make_predictor(model) for key, model in networks.items()}
    results: dict[str, dict[str, dict[str, float]]] = {}
    guided: dict[str, dict[str, dict[str, Any]]] = {}
    for test_set in sets:
        results[test_set.name] = {method: {} for method in (*BASELINES, *names)}
        guided[test_set.name] = {}
        for scale in scales:
            key = scale_key(scale)
            guided[test_set.name][key] = tune_guided_filter(config, test_set, scale)
            errors: dict[str, list[float]] = {method: [] for method in results[test_set.name]}
            for index in range(len(test_set.frames)):
                frame = test_set.frames[index]
                example = make_example(frame["image"], frame["disparity"], scale, config.downsampling)
                mask = evaluation_mask(example, config.eval_border)
                predictions = baseline_predictions(example, scale, guided[test_set.name][key])
                for name in names:
                    predictions[name] = predictors[name, scale](example)
                frame_rmse = {
                    method: test_set.unit_scale * baselines.rmse(prediction, example["target"][..., 0], mask)
                    for method, prediction in predictions.items()
                }
                for method, value in frame_rmse.items():
                    errors[method].append(value)
                if panels and index == 0:
                    path = os.path.join(workdir, f"panels_{test_set.name}_{key}.png")
                    save_panel(path, example, predictions, scale, frame_rmse)
            for method, values in errors.items():
                results[test_set.name][method][key] = float(np.mean(values))
    return results, guided


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def format_table(results: dict[str, dict[str, float]], scales: Sequence[int], title: str,
                 unit: str = "disparity pixels") -> str:
    """The results of one test set as a markdown table (RMSE, lower is better; best per scale in bold)."""
    keys = [scale_key(s) for s in scales]
    best = {
        key: min((r[key] for r in results.values() if r.get(key) is not None), default=None) for key in keys
    }
    lines = [
        f"RMSE in {unit} at full resolution, {title} (lower is better).",
        "",
        "| method | " + " | ".join(keys) + " |",
        "| --- | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for method, row in results.items():
        cells = []
        for key in keys:
            value = row.get(key)
            if value is None:
                cells.append("-")
            else:
                cell = f"{value:.3f}"
                cells.append(f"**{cell}**" if value == best[key] else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(results: dict, guided: dict, sets: Sequence[TestSet], scales: Sequence[int]) -> str:
    """One table per test set, each followed by the guided filter's tuned values."""
    parts = []
    for test_set in sets:
        tuned = ", ".join(
            f"{scale_key(s)}: r={guided[test_set.name][scale_key(s)]['radius']}, "
            f"eps={guided[test_set.name][scale_key(s)]['eps']:g}" for s in scales
        )
        parts.append(format_table(results[test_set.name], scales, test_set.title, test_set.unit)
                     + f"\n\nguided_filter tuned on {test_set.tuned_on} ({tuned}).")
    return "\n\n".join(parts)


def save_panel(path: str, example: dict[str, np.ndarray], predictions: dict[str, np.ndarray], scale: int,
               rmses: dict[str, float]) -> str:
    """PNG: guide, low-res input, ground truth; each prediction; each error map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    target = example["target"][..., 0]
    valid = example["valid"][..., 0]
    shown = np.where(valid, target, np.nan)
    lo, hi = np.nanpercentile(shown, 1), np.nanpercentile(shown, 99)
    columns = max(3, len(predictions))
    fig, axes = plt.subplots(3, columns, figsize=(3.2 * columns, 7.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    low_res = np.repeat(np.repeat(example["low_res"][..., 0], scale, 0), scale, 1)
    axes[0, 0].imshow(example["guide"])
    axes[0, 0].set_title("guide (RGB)")
    axes[0, 1].imshow(low_res, vmin=lo, vmax=hi, cmap="viridis", interpolation="nearest")
    axes[0, 1].set_title(f"low-res input (x{scale})")
    axes[0, 2].imshow(shown, vmin=lo, vmax=hi, cmap="viridis")
    axes[0, 2].set_title("ground truth")
    error_max = 0.1 * (hi - lo)
    for column, (name, prediction) in enumerate(predictions.items()):
        axes[1, column].imshow(prediction, vmin=lo, vmax=hi, cmap="viridis")
        axes[1, column].set_title(f"{name}\nRMSE {rmses[name]:.3f}", fontsize=9)
        error = np.where(valid, np.abs(prediction - target), np.nan)
        axes[2, column].imshow(error, vmin=0, vmax=error_max, cmap="magma")
        axes[2, column].set_title(f"|error| {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def kept_training_timings(workdir: str, timings: dict[str, float], reloaded: Sequence[str],
                          num_runs: int) -> dict[str, float]:
    """The timings for details.json: those of the invocations that trained the networks.

    A rerun that only reloads finished runs keeps the stored timings (it has not trained
    anything); a rerun that trains some keeps the stored seconds of the others.

    Args:
      workdir: holds the details.json of the previous invocation, if any.
      timings: this invocation's {"<name>_x<s>": seconds, ...}.
      reloaded: the run keys ("<name>_x<s>") that were only reloaded.
      num_runs: the number of runs.
    """
    try:
        with open(os.path.join(workdir, DETAILS_FILE)) as f:
            stored = json.load(f)["seconds"]
        if not isinstance(stored, dict):
            return timings
    except (OSError, ValueError, KeyError, TypeError):
        return timings
    if len(reloaded) == num_runs:
        return {**timings, **stored}
    return {**timings, **{key: stored[key] for key in reloaded if key in stored}}


def write_outputs(workdir: str, results: dict, table: str, details: dict, guided: dict) -> None:
    """Writes results.json, results.md, details.json and guided_filter.json to `workdir`."""
    for name, content in ((RESULTS_FILE, results), (DETAILS_FILE, details), (GUIDED_FILTER_FILE, guided)):
        with open(os.path.join(workdir, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    with open(os.path.join(workdir, TABLE_FILE), "w") as f:
        f.write(table + "\n")
