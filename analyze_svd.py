"""Measure where a fine-tuning update went relative to the singular geometry of the pretrained weights.

For each analyzed linear layer, W (out x in) = U S V^T is the pretrained weight (reduced SVD,
n = min(out, in) singular values in descending order, columns u_i of U and v_i of V orthonormal)
and dW (out x in) is the learned update:
- adapter runs: dW = s (B A - B_0 A_0), with lora_A (r x in), lora_B (out x r), s the adapter's
  scaling and A_0, B_0 the factors at initialization (a train_grpo.py run's init/ folder).
  An init_lora.py folder is a run at step 0, where dW = 0.
- full fine-tuning: dW = W_trained - W.

Measured per layer and run:
- update energy: e_i = ||dW v_i||^2 / sum_j ||dW v_j||^2 on the right side and ||u_i^T dW||^2
  (normalized the same way) on the left, the cumulative curves and the shares of the top-r and
  bottom-r directions. When dW = 0 (step 0), the right side uses an orthonormal basis Q of
  lora_A's row space in place of dW, and the left side is undefined.
- subspace similarity: sim(k, i) = ||V_k^T Q_i||_F^2 / min(k, i), in [0, 1], where the columns of
  V_k are W's top-k (or bottom-k) right singular vectors and Q_i the top-i right singular vectors of dW
  (of lora_A when dW = 0). RLPO at step 0 gives sim(r, r) = 1 against the top, RLMO against the bottom.
- with --full-ft: gap ||dW - dW_full||_F / ||dW_full||_F and cosine <dW, dW_full>_F / (||dW||_F ||dW_full||_F).
Also: W's singular value spectrum per module type (mean over the analyzed layers), training
curves from log_history.json, and with --kl the mean per-token KL(policy || initial policy) on
completions sampled from each run's policy.

Weights are read from the safetensors files one layer at a time. Each W gets one full SVD, shared
by all runs, and is freed before the next layer, so memory stays near one layer's working set
(--kl loads whole policies: one model per adapter run, two per full fine-tuning run).

Usage, after `python train_grpo.py --init rlpo` (and rlmo, pissa, full) wrote runs/INIT-seed0:
    python analyze_svd.py runs/rlpo-seed0 runs/rlmo-seed0 runs/pissa-seed0 --output-dir runs/analysis   # CPU, embedded default
    python analyze_svd.py runs/*-seed* --full-ft runs/full-seed0 --kl --device cuda \\
        --output-dir runs/analysis                                                                 # one GPU

A run is a train_grpo.py --output_dir (its adapter/, model/ or newest checkpoint-*/), a trained
adapter folder inside one, or an init_lora.py --output-dir. Output folder: analysis.json (every
plotted number; per-layer values under "layers", each figure's values under "figures") and PNG
figures: energy_right.png, energy_left.png, energy_share.png, similarity_<run>.png,
similarity_summary.png, spectrum.png, and when their inputs exist full_ft_gap.png, dynamics.png, kl.png.
"""

import argparse
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from init_lora import (
    same_model,
    commit_output_dir,
    load_base_model,
    prepare_output_dir,
    read_metadata,
    resolve_base,
    temporary_dir_for,
)
from svd_figures import DYNAMICS_METRICS, display_name, to_python, write_figures

logger = logging.getLogger(__name__)

DEFAULT_MODULES = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Largest relative Frobenius error of residual + s B_0 A_0 against W. Rounding a residual to
# bfloat16 (8-bit mantissa) costs an estimated 1e-3; another base model gives errors near 1.
RESIDUAL_TOLERANCE = 1e-2


# ----------------------------------------------------------------------------------------------
# Runs and weight files
# ----------------------------------------------------------------------------------------------


class SafetensorsFolder:
    """Index of the tensors in a folder's *.safetensors files (sharded or not), read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = {}
        self.shapes = {}
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.files[key] = file
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        if not self.files:
            raise FileNotFoundError(f"Folder {str(self.folder)!r} contains no *.safetensors weights.")

    def get(self, key: str, device: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Read one tensor onto `device`, cast to `dtype` unless it is None (then in its stored dtype)."""
        with safe_open(str(self.files[key]), framework="pt", device=str(device)) as handle:
            tensor = handle.get_tensor(key)
        return tensor if dtype is None else tensor.to(dtype)


@dataclass
class Run:
    """One analyzed run: where its weights, initial adapter and training logs are."""

    path: Path
    weights_dir: Path  # trained adapter folder, or full model folder
    is_full: bool
    init_dir: Path | None = None  # initial adapter; equals weights_dir for an init_lora.py folder
    log_dir: Path | None = None  # the train_grpo.py run folder with log_history.json and summary.json
    method: str = "adapter"
    seed: int | None = None
    model: str | None = None
    label: str = ""
    rank: int | None = None
    scaling: float | None = None
    weights: SafetensorsFolder | None = field(default=None, repr=False)
    init_weights: SafetensorsFolder | None = field(default=None, repr=False)
    residual: SafetensorsFolder | None = field(default=None, repr=False)


def newest_checkpoint(folder: Path) -> Path | None:
    checkpoints = [path for path in folder.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda path: int(path.name.split("-")[-1])) if checkpoints else None


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def find_run(path: str | Path) -> Run:
    """Locate the weights, initial adapter and logs of a run folder.

    Raises FileNotFoundError naming the folder when it contains no weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Run folder {str(path)!r} does not exist.")
    expected = (
        "expected adapter_config.json (an adapter from init_lora.py or train_grpo.py), adapter/, model/ or "
        "checkpoint-*/ (a train_grpo.py run), or config.json (a full model)"
    )
    if (path / "adapter_config.json").exists():
        weights_dir = path
        run_dir = path.parent if path.name != "init" and (path.parent / "init" / "adapter_config.json").exists() else None
    elif any((path / name).is_dir() for name in ("adapter", "model")) or newest_checkpoint(path):
        weights_dir = next((path / name for name in ("adapter", "model") if (path / name).is_dir()), None) or newest_checkpoint(path)
        run_dir = path
        if weights_dir.name.startswith("checkpoint-"):
            logger.warning("Run %s has no final adapter/ or model/; analyzing its newest checkpoint %s", path, weights_dir.name)
    elif (path / "config.json").exists():
        weights_dir, run_dir = path, (path.parent if (path.parent / "summary.json").exists() else None)
    else:
        raise FileNotFoundError(f"Run folder {str(path)!r} contains no weights: {expected}.")
    if not any(weights_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"Run folder {str(path)!r} contains no weights: {str(weights_dir)!r} has no *.safetensors file.")

    is_full = not (weights_dir / "adapter_config.json").exists()
    run = Run(path=path, weights_dir=weights_dir, is_full=is_full, log_dir=run_dir)
    summary = read_json(run_dir / "summary.json") if run_dir else None
    if not is_full:
        run.init_dir = run_dir / "init" if run_dir and (run_dir / "init" / "adapter_config.json").exists() else weights_dir
        metadata = read_metadata(run.init_dir) or {}
        run.method, run.seed, run.model = metadata.get("method", "adapter"), metadata.get("seed"), metadata.get("model")
        config = json.loads((weights_dir / "adapter_config.json").read_text())
        run.model = run.model or config.get("base_model_name_or_path")
        run.rank, run.scaling = adapter_scaling(config, weights_dir)
    else:
        run.method = "full"
    if summary:
        run.method, run.seed, run.model = summary.get("init", run.method), summary.get("seed", run.seed), summary.get("model", run.model)
    return run


def adapter_scaling(config: dict, folder: Path) -> tuple[int, float]:
    """Return (rank, scaling) of a PEFT LoRA adapter config, rejecting variants whose update is not s B A."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"Adapter {str(folder)!r} is a {config['peft_type']} adapter. Only LoRA adapters can be analyzed.")
    if config.get("use_dora"):
        raise ValueError(f"Adapter {str(folder)!r} uses DoRA, whose update is not s B A; it cannot be analyzed.")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"Adapter {str(folder)!r} sets fan_in_fan_out (GPT-2 style Conv1D weights), which this script does not support.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"Adapter {str(folder)!r} sets rank_pattern or alpha_pattern, which this script does not support.")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def label_runs(runs: list[Run]):
    """Give each run a unique label such as 'RLPO seed 0' (the folder name, else its path, is added to duplicates)."""
    for run in runs:
        run.label = f"{display_name(run.method)} seed {run.seed}" if run.seed is not None else display_name(run.method)
    for suffix in (lambda run: run.path.name, lambda run: str(run.path)):
        labels = [run.label for run in runs]
        for run in runs:
            if labels.count(run.label) > 1:
                run.label = f"{run.label} ({suffix(run)})"


def resolve_pretrained(runs: list[Run], model: str | None) -> str:
    """Return the pretrained model all runs start from; raise if a run names another one."""
    for run in runs:
        if not run.is_full:
            resolve_base(run.init_dir, model)  # raises for another base model or a missing residual base
        elif model and run.model and not same_model(model, run.model):
            raise ValueError(f"Run {str(run.path)!r} was trained from model {run.model!r}, but --model is {model!r}. Pass the matching --model.")
    if model:
        return model
    named = []
    for run in runs:
        if run.model and not any(same_model(run.model, other) for other in named):
            named.append(run.model)
    if len(named) > 1:
        raise ValueError(f"The runs start from different base models ({', '.join(map(repr, named))}); analyze the runs of one base model at a time.")
    if named:
        return named[0]
    from build_default import DEFAULT_MODEL_DIR

    return str(DEFAULT_MODEL_DIR)


def model_folder(model: str) -> Path:
    """Return the local folder of a model path or hub id (hub ids are read from, or downloaded to, the hub cache)."""
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))
    except (OSError, ValueError) as error:  # offline, missing or private repos, and invalid ids
        raise FileNotFoundError(
            f"Base model {model!r} is not a local folder and could not be fetched from the hub ({error}). "
            "Pass --model with a local model folder."
        ) from error


# ----------------------------------------------------------------------------------------------
# Layer selection
# ----------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One analyzed linear layer of the pretrained model."""

    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    layer: int
    module: str  # the --modules entry it matches, e.g. q_proj
    shape: tuple  # (out, in)


def list_linear_layers(pretrained: SafetensorsFolder) -> dict[int, dict[str, tuple]]:
    """Map each decoder layer index to {module name relative to the layer: (out, in)} for its 2-D weights."""
    pattern = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<module>.+)\.weight$")
    layers = {}
    for key, shape in pretrained.shapes.items():
        match = pattern.match(key)
        if match and len(shape) == 2:
            layers.setdefault(int(match["index"]), {})[match["module"]] = (f"{match['prefix']}.{match['index']}.{match['module']}", shape)
    if not layers:
        raise ValueError(
            f"Model folder {str(pretrained.folder)!r} has no weights named *.layers.N.*.weight, "
            "so it is not a decoder-only transformer this script can read."
        )
    return layers


def select_targets(pretrained: SafetensorsFolder, layers: str | None, modules: str | None) -> list[Target]:
    """Pick the layers (default: first, middle, last) and module types (default: DEFAULT_MODULES) to analyze."""
    available = list_linear_layers(pretrained)
    count = max(available) + 1
    if layers is None:
        indices = sorted({0, count // 2, count - 1})
    else:
        indices = []
        for item in layers.split(","):
            try:
                index = int(item)
            except ValueError:
                raise ValueError(f"--layers {layers!r} must be comma-separated integers such as 0,2,-1.") from None
            if not -count <= index < count:
                raise ValueError(f"Layer {index} does not exist: the model has {count} layers, so use 0..{count - 1} or -{count}..-1.")
            indices.append(index % count)
        indices = sorted(set(indices))

    module_names = sorted({name for entries in available.values() for name in entries})
    short_names = sorted({name.split(".")[-1] for name in module_names})
    if modules is None:
        requested = [name for name in DEFAULT_MODULES if name in short_names]
        if not requested:
            raise ValueError(
                f"None of the default modules {', '.join(DEFAULT_MODULES)} exists in this model. "
                f"Pass --modules with some of: {', '.join(short_names)}."
            )
    else:
        requested = [name.strip() for name in modules.split(",") if name.strip()]

    targets = []
    for index in indices:
        for module in requested:
            matches = [name for name in available.get(index, {}) if name == module or name.endswith("." + module)]
            if len(matches) != 1:
                problem = "does not exist" if not matches else f"is ambiguous ({', '.join(matches)})"
                raise ValueError(
                    f"Module {module!r} {problem} in layer {index}. Valid module names: {', '.join(short_names)} "
                    f"(or the full names {', '.join(module_names)})."
                )
            name, shape = available[index][matches[0]]
            targets.append(Target(name=name, layer=index, module=module, shape=shape))
    return targets


def attach_weights(run: Run, targets: list[Target], model: str, pretrained: SafetensorsFolder):
    """Open a run's weight files and check that they fit the pretrained model's shapes."""
    run.weights = SafetensorsFolder(run.weights_dir)
    if run.is_full:
        for target in targets:
            shape = run.weights.shapes.get(f"{target.name}.weight")
            if shape != target.shape:
                raise ValueError(
                    f"Full fine-tuning run {str(run.path)!r} does not fit base model {model!r}: {target.name} has shape {shape}, "
                    f"expected {target.shape}. Pass the --model it was trained from."
                )
        return
    run.init_weights = run.weights if run.init_dir == run.weights_dir else SafetensorsFolder(run.init_dir)
    metadata = read_metadata(run.init_dir) or {}
    if metadata.get("residual_base"):
        run.residual = SafetensorsFolder(Path(resolve_base(run.init_dir)))
    adapted = 0
    for target in targets:
        shape_A = run.weights.shapes.get(f"base_model.model.{target.name}.lora_A.weight")
        shape_B = run.weights.shapes.get(f"base_model.model.{target.name}.lora_B.weight")
        if shape_A is None:
            continue
        adapted += 1
        if shape_B is None or shape_A[1] != target.shape[1] or shape_B[0] != target.shape[0]:
            raise ValueError(
                f"Adapter {str(run.weights_dir)!r} does not fit base model {model!r}: {target.name} has lora_A {shape_A} and lora_B {shape_B} "
                f"but W is {target.shape}. Pass the --model the adapter was made for."
            )
    if adapted == 0:
        analyzed = ", ".join(sorted({target.module for target in targets}))
        raise ValueError(f"Adapter {str(run.weights_dir)!r} adapts none of the analyzed modules ({analyzed}). Pass --modules with modules it targets.")


# ----------------------------------------------------------------------------------------------
# The math, one layer at a time
# ----------------------------------------------------------------------------------------------


@dataclass
class Update:
    """The learned update of one layer: dense dW (out x in) and, for adapters, factors with dW = L @ R."""

    dW: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # L (out x 2r), R (2r x in)
    lora_A: torch.Tensor | None = None  # (r x in), spans the directions an adapter can update at step 0


def read_update(run: Run, target: Target, W: torch.Tensor, dtype: torch.dtype) -> tuple[Update | None, float | None]:
    """Return (update, residual_error): the run's update of `target` (None if not adapted) and the error below.

    Adapters: dW = s (B A - B_0 A_0) = L @ R with L = s [B, -B_0] (out x 2r), R = [A; A_0] (2r x in),
    or L = s B, R = A when B_0 = 0. An adapter folder without a separate initial adapter starts from
    B_0 = 0 (every non-residual method), or is its own initial adapter (init_lora.py output of a
    residual method). For residual methods, residual_error is the relative Frobenius error of
    residual + s B_0 A_0 against W, checked against RESIDUAL_TOLERANCE (None for other runs).
    """
    device = W.device
    if run.is_full:
        # Training started from W rounded to the dtype the model was saved in (e.g. bfloat16), so
        # subtract that rounding of W, or the rounding error would count as update.
        trained = run.weights.get(f"{target.name}.weight", device, None)
        return Update(dW=trained.to(dtype) - W.to(trained.dtype).to(dtype)), None
    prefix = f"base_model.model.{target.name}"
    if f"{prefix}.lora_A.weight" not in run.weights.shapes:
        return None, None
    A = run.weights.get(f"{prefix}.lora_A.weight", device, dtype)
    B = run.weights.get(f"{prefix}.lora_B.weight", device, dtype)
    if run.init_dir != run.weights_dir:
        A_0 = run.init_weights.get(f"{prefix}.lora_A.weight", device, dtype)
        B_0 = run.init_weights.get(f"{prefix}.lora_B.weight", device, dtype)
    else:
        A_0, B_0 = A, (B if run.residual is not None else torch.zeros_like(B))

    if torch.equal(A, A_0) and torch.equal(B, B_0):  # step 0; the product below would leave rounding noise
        update = Update(dW=torch.zeros(target.shape, dtype=dtype, device=device), lora_A=A)
    elif not torch.any(B_0):
        update = Update(dW=run.scaling * B @ A, factors=(run.scaling * B, A), lora_A=A)
    else:
        L = run.scaling * torch.cat([B, -B_0], dim=1)
        R = torch.cat([A, A_0], dim=0)
        update = Update(dW=L @ R, factors=(L, R), lora_A=A)

    residual_error = None
    if run.residual is not None:
        residual = run.residual.get(f"{target.name}.weight", device, dtype)
        residual_error = ((residual + run.scaling * B_0 @ A_0 - W).norm() / W.norm()).item()
        if residual_error > RESIDUAL_TOLERANCE:
            raise ValueError(
                f"Run {str(run.path)!r}: residual base + s B_0 A_0 differs from the pretrained {target.name} by {residual_error:.3g} "
                "(relative Frobenius error), so the run was initialized from another base model. Pass its --model."
            )
    return update, residual_error


def update_right_basis(update: Update, count: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return (Q (in x m), singular values (m,), source): the top-m (m <= count) right singular vectors of dW.

    Low-rank dW = L R uses QR factors L = Q_L R_L, R^T = Q_R R_R and the SVD of the small core
    R_L R_R^T = U_c S_c V_c^T, so dW's right singular vectors are Q_R V_c. For dW = 0 (step 0) the
    right singular vectors of lora_A are used (source "lora_A"), because they span every direction
    the first update can take on the input side.
    """
    if not torch.any(update.dW):
        _, S, Vh = torch.linalg.svd(update.lora_A, full_matrices=False)
        return Vh[:count].T, S[:count], "lora_A"
    if update.factors is not None:
        L, R = update.factors
        _, R_L = torch.linalg.qr(L)
        Q_R, R_R = torch.linalg.qr(R.T)
        _, S, Vh_core = torch.linalg.svd(R_L @ R_R.T)
        return (Q_R @ Vh_core.T)[:, :count], S[:count], "update"
    _, S, Vh = torch.linalg.svd(update.dW, full_matrices=False)
    return Vh[:count].T, S[:count], "update"


def update_energy(M: torch.Tensor, U: torch.Tensor | None, Vh: torch.Tensor) -> dict:
    """Return the energy of M (out x in, or m x in on the right side only) along W's singular vectors.

    right_i = ||M v_i||^2 / sum_j ||M v_j||^2 over the n rows v_i^T of Vh (n x in); left_i the same
    with ||u_i^T M||^2 for the n columns of U (out x n). outside_* is the share of ||M||_F^2 that
    lies outside span(v) (or span(u)), nonzero only for the larger side of a non-square W.
    """
    total = M.square().sum()
    result = {}
    for side, energy in (("right", (M @ Vh.T).square().sum(0)), ("left", (U.T @ M).square().sum(1) if U is not None else None)):
        if energy is None:
            result.update({f"energy_{side}": None, f"outside_share_{side}": None})
            continue
        result[f"energy_{side}"] = energy / energy.sum()
        result[f"outside_share_{side}"] = (1 - energy.sum() / total).clamp_min(0).item()
    return result


def subspace_similarity(Vh: torch.Tensor, Q: torch.Tensor, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (top, bottom), each (max_k x m): entry [k-1, i-1] = ||V_k^T Q_i||_F^2 / min(k, i).

    Vh contains W's right singular vectors as rows (n x in), by descending singular value. Q (in x m)
    has orthonormal columns, ordered by the update's singular values. V_k is the first k rows of Vh
    (top) or the last k (bottom, starting from the smallest singular value). Double cumulative
    sums of the squared overlaps give every (k, i) at once.
    """
    k = torch.arange(1, max_k + 1, dtype=Q.dtype, device=Q.device)[:, None]
    i = torch.arange(1, Q.shape[1] + 1, dtype=Q.dtype, device=Q.device)[None, :]
    results = []
    for rows in (Vh[:max_k], Vh.flip(0)[:max_k]):
        overlap = (rows @ Q).square().cumsum(0).cumsum(1)
        results.append(overlap / torch.minimum(k, i))
    return results[0], results[1]


def compare_updates(dW: torch.Tensor, dW_full: torch.Tensor) -> dict:
    """Return the relative gap ||dW - dW_full||_F / ||dW_full||_F and the Frobenius cosine of two nonzero (out x in) updates.

    The squared norms and the inner product are returned too, so sums over layers give whole-model values.
    """
    inner_product = (dW * dW_full).sum()
    return {
        "gap": ((dW - dW_full).norm() / dW_full.norm()).item(),
        "cosine": (inner_product / (dW.norm() * dW_full.norm())).item(),
        "difference_sq": (dW - dW_full).square().sum().item(),
        "norm_sq": dW.square().sum().item(),
        "full_norm_sq": dW_full.square().sum().item(),
        "inner_product": inner_product.item(),
    }


def layer_metrics(update: Update, U: torch.Tensor, Vh: torch.Tensor, rank: int, max_k: int) -> dict:
    """Return every per-layer number of one run: energies, their top/bottom-r shares, similarity maps."""
    Q, update_singular_values, source = update_right_basis(update, rank)
    if source == "update":
        energy = update_energy(update.dW, U, Vh)
    else:
        energy = update_energy(Q.T, None, Vh)
    record = {"source": source, "update_norm": update.dW.norm().item(), "update_singular_values": update_singular_values}
    for side in ("right", "left"):
        values = energy[f"energy_{side}"]
        record[f"energy_{side}"] = values
        record[f"cumulative_{side}"] = values.cumsum(0) if values is not None else None
        record[f"top_r_share_{side}"] = values[:rank].sum().item() if values is not None else None
        record[f"bottom_r_share_{side}"] = values[-rank:].sum().item() if values is not None else None
        record[f"outside_share_{side}"] = energy[f"outside_share_{side}"]
    record["similarity_top"], record["similarity_bottom"] = subspace_similarity(Vh, Q, max_k)
    at_r = rank <= min(max_k, Q.shape[1])
    record["similarity_top_at_r"] = record["similarity_top"][rank - 1, rank - 1].item() if at_r else None
    record["similarity_bottom_at_r"] = record["similarity_bottom"][rank - 1, rank - 1].item() if at_r else None
    return record


def analyze_weights(
    runs: list[Run],
    reference: Run | None,
    pretrained: SafetensorsFolder,
    targets: list[Target],
    device: str,
    dtype: torch.dtype,
    full_rank: int,
    max_k: int,
) -> list[dict]:
    """Compute W's SVD once per target layer and every run's metrics against it; returns one record per layer."""
    layers = []
    # NOTE: the GPU path (weights read straight to `device`, float32 SVD by default) has no test; tests run on CPU.
    for target in targets:
        started = time.perf_counter()
        W = pretrained.get(f"{target.name}.weight", device, dtype)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        record = {"name": target.name, "layer": target.layer, "module": target.module, "shape": list(target.shape), "runs": {}}
        dW_full = read_update(reference, target, W, dtype)[0].dW if reference else None
        if dW_full is not None and not torch.any(dW_full):
            raise ValueError(
                f"The --full-ft run {str(reference.path)!r} leaves {target.name} unchanged, so it cannot be the reference for the gap. "
                "Pass a full fine-tuning run that trained this layer, or leave it out with --layers/--modules."
            )

        for run in runs:
            update, residual_error = (Update(dW=dW_full), None) if run is reference else read_update(run, target, W, dtype)
            if update is None or (run.is_full and not torch.any(update.dW)):
                logger.warning("%s does not change %s; skipped there", run.label, target.name)
                continue
            rank = run.rank or full_rank
            metrics = layer_metrics(update, U, Vh, rank, min(max_k, S.shape[0]))
            metrics["rank"] = rank
            metrics["residual_reconstruction_error"] = residual_error
            if dW_full is not None and run is not reference and torch.any(update.dW):
                metrics.update(compare_updates(update.dW, dW_full))
            record["runs"][run.label] = to_python(metrics)
            del update

        record["singular_values"] = to_python(S)
        layers.append(record)
        del W, U, S, Vh, dW_full
        logger.info("Analyzed %s %s in %.2f s", target.name, tuple(target.shape), time.perf_counter() - started)
    return layers


# ----------------------------------------------------------------------------------------------
# Training dynamics and KL to the initial policy
# ----------------------------------------------------------------------------------------------


def read_log_history(run: Run) -> list[dict] | None:
    """Return a run's Trainer log_history from log_history.json, or the newest checkpoint's trainer_state.json."""
    if run.log_dir is None:
        return None
    history = read_json(run.log_dir / "log_history.json")
    if history is not None:
        return history["log_history"]
    checkpoint = newest_checkpoint(run.log_dir)
    state = read_json(checkpoint / "trainer_state.json") if checkpoint else None
    return state["log_history"] if state else None


def aggregate_dynamics(runs: list[Run], band: str) -> dict:
    """Return {method: {metric: steps, mean, low, high, runs}} over the runs that share an init method.

    The band is the min-max over runs (band="minmax") or mean +- one standard deviation ("std");
    at a step logged by one run only, the band collapses to that value.
    """
    dynamics = {}
    for run in runs:
        history = read_log_history(run)
        if not history:
            continue
        for metric in DYNAMICS_METRICS:
            points = [(entry["step"], entry[metric]) for entry in history if entry.get(metric) is not None and "step" in entry]
            if points:
                series = dynamics.setdefault(run.method, {}).setdefault(metric, {"runs": {}})
                series["runs"][run.label] = {"steps": [step for step, _ in points], "values": [value for _, value in points]}
    for metrics in dynamics.values():
        for series in metrics.values():
            by_step = {}
            for values in series["runs"].values():
                for step, value in zip(values["steps"], values["values"]):
                    by_step.setdefault(step, []).append(value)
            steps = sorted(by_step)
            means = [sum(by_step[step]) / len(by_step[step]) for step in steps]
            if band == "std":
                spreads = [math.sqrt(sum((value - mean) ** 2 for value in by_step[step]) / len(by_step[step])) for step, mean in zip(steps, means)]
                series["low"] = [mean - spread for mean, spread in zip(means, spreads)]
                series["high"] = [mean + spread for mean, spread in zip(means, spreads)]
            else:
                series["low"] = [min(by_step[step]) for step in steps]
                series["high"] = [max(by_step[step]) for step in steps]
            series["steps"], series["mean"] = steps, means
    return dynamics


@torch.no_grad()
def policy_kl(run: Run, model: str, problems: list, args) -> dict:
    """Return the mean per-token KL(pi_run || pi_init) over completions sampled from the run's policy.

    pi_init is the initial adapter on the same base. It equals the pretrained policy exactly for
    B_0 = 0 methods, and up to the rounding of the saved residual base for PiSSA, MiLoRA and OLoRA.
    An adapter without a separate initial adapter is compared with its base model with the adapter
    layers disabled (B_0 = 0). For full fine-tuning pi_init is the pretrained model. The KL at each
    completion position is exact over the vocabulary: sum_v p_run(v) (log p_run(v) - log p_init(v)).
    """
    from peft import PeftModel

    if run.is_full:
        policy, tokenizer = load_base_model(str(run.weights_dir), dtype=args.dtype, device=args.device)
        reference = load_base_model(model, dtype=args.dtype, device=args.device)[0]
    else:
        base, tokenizer = load_base_model(resolve_base(run.init_dir, model), dtype=args.dtype, device=args.device)
        policy = PeftModel.from_pretrained(base, str(run.weights_dir), adapter_name="trained")
        reference = None
        if run.init_dir != run.weights_dir:
            policy.load_adapter(str(run.init_dir), adapter_name="init")
        # NOTE: a residual method's init_lora.py folder is its own initial policy, so its KL is 0 by construction.

    def select(name: str):
        """Return the model that computes policy `name` ("trained" or "init"), switching adapters if needed."""
        if run.is_full:
            return (policy if name == "trained" else reference).eval()
        if "init" in policy.peft_config:
            policy.set_adapter(name)
        elif run.residual is None and name == "init":
            policy.base_model.disable_adapter_layers()
        else:
            policy.base_model.enable_adapter_layers()
        return policy.eval()

    from eval_math import sampled_kl

    result = sampled_kl(select, tokenizer, problems, args.kl_batch_size, args.kl_max_new_tokens, args.kl_temperature, args.seed, args.device)
    del policy, reference
    return result


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser with a help text for every flag."""
    parser = argparse.ArgumentParser(description="Measure where LoRA or full fine-tuning updates went relative to the pretrained weights' singular vectors.")
    parser.add_argument("runs", nargs="+", help="Run folders: train_grpo.py --output_dir, an adapter folder in one, or init_lora.py --output-dir.")
    parser.add_argument("--model", default=None, help="Pretrained base model folder or hub id (default: the one the runs name, else the embedded tiny model).")
    parser.add_argument("--full-ft", default=None, help="Full fine-tuning run (train_grpo.py --init full) to measure every update's gap to.")
    parser.add_argument("--layers", default=None, help="Comma-separated decoder layer indices, negative from the end (default: first, middle and last).")
    parser.add_argument("--modules", default=None, help=f"Comma-separated module names (default: {','.join(DEFAULT_MODULES)}).")
    parser.add_argument("--rank", type=int, default=None, help="r for the top-r/bottom-r shares of full fine-tuning updates (default: the largest adapter rank, else 16).")
    parser.add_argument("--max-k", type=int, default=None, help="Largest k of W's top-k/bottom-k subspaces in the similarity maps (default: twice the largest rank).")
    parser.add_argument("--svd-dtype", default="auto", choices=("auto", "float32", "float64"), help="dtype of the SVD and all update math; auto: float64 on CPU, float32 on GPUs.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device for the SVDs and the KL policies.")
    parser.add_argument("--band", default="minmax", choices=("minmax", "std"), help="Band around the mean training curve of runs sharing an init: min-max or +-1 std.")
    parser.add_argument("--kl", action="store_true", help="Also measure each run's mean per-token KL to its initial policy on held-out prompts.")
    parser.add_argument("--kl-data", default=None, help="JSONL/parquet file or data set hub id with held-out prompts (default: the embedded test split).")
    parser.add_argument("--kl-split", default="test", help="Split of --kl-data.")
    parser.add_argument("--kl-problem-column", default="prompt", help="Column of --kl-data with the problem text or chat messages.")
    parser.add_argument("--kl-prompts", type=int, default=64, help="Number of held-out prompts for --kl.")
    parser.add_argument("--kl-max-new-tokens", type=int, default=16, help="Length limit in tokens of the sampled completions for --kl.")
    parser.add_argument("--kl-batch-size", type=int, default=16, help="Prompts per generate and forward call for --kl.")
    parser.add_argument("--kl-temperature", type=float, default=1.0, help="Temperature T of both policies for --kl: completions are sampled, and the KL computed, from softmax(logits / T).")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"), help="dtype the policies are loaded in for --kl.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for sampling the --kl completions.")
    parser.add_argument("--output-dir", required=True, help="Folder to write analysis.json and the figures into.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")
    return parser


def open_runs(args) -> tuple[list[Run], Run | None, str, SafetensorsFolder, list[Target]]:
    """Find the runs and the pretrained model, pick the layers, and check that every run fits them.

    Returns (runs, the --full-ft run or None, model, its weights, targets). The --full-ft run is
    also the last of `runs`, so its own update is analyzed too.
    """
    runs = [find_run(path) for path in args.runs]
    reference = None
    if args.full_ft:
        reference = find_run(args.full_ft)
        if not reference.is_full:
            raise ValueError(f"--full-ft {args.full_ft!r} is an adapter; pass a train_grpo.py --init full run or a full model folder.")
        runs = [run for run in runs if run.weights_dir.resolve() != reference.weights_dir.resolve()] + [reference]
    label_runs(runs)

    model = resolve_pretrained(runs, args.model)
    pretrained = SafetensorsFolder(model_folder(model))
    targets = select_targets(pretrained, args.layers, args.modules)
    for run in runs:
        attach_weights(run, targets, model, pretrained)
    return runs, reference, model, pretrained, targets


def write_outputs(analysis: dict, runs: list[Run], reference: Run | None, band: str, output_dir: Path):
    """Write the figures and analysis.json into a temporary folder, renamed to `output_dir` when complete."""
    temporary_dir = temporary_dir_for(output_dir)
    try:
        analysis["figures"] = write_figures(analysis["layers"], runs, reference, analysis["dynamics"], analysis["kl"], band, temporary_dir)
        (temporary_dir / "analysis.json").write_text(json.dumps(to_python(analysis)))
        commit_output_dir(temporary_dir, output_dir)
    except BaseException:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("rank", "max_k", "kl_prompts", "kl_max_new_tokens", "kl_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}.")
    output_dir = prepare_output_dir(args.output_dir, args.overwrite)
    if args.svd_dtype == "auto":
        dtype = torch.float64 if args.device.startswith("cpu") else torch.float32
    else:
        dtype = getattr(torch, args.svd_dtype)

    # Inputs. Every check runs before any file is written.
    runs, reference, model, pretrained, targets = open_runs(args)
    adapter_ranks = [run.rank for run in runs if run.rank]
    full_rank = args.rank or max(adapter_ranks, default=16)
    max_k = args.max_k or 2 * max(adapter_ranks + [full_rank])
    problems = None
    if args.kl:
        from build_default import DEFAULT_DATA_FILES
        from eval_math import load_problems

        data = args.kl_data or DEFAULT_DATA_FILES["test"]
        problems, _ = load_problems(data, args.kl_split, args.kl_problem_column, args.kl_problem_column, limit=args.kl_prompts)

    # Per-layer SVD analysis
    layers = analyze_weights(runs, reference, pretrained, targets, args.device, dtype, full_rank, max_k)
    for run in runs:
        if not any(run.label in layer["runs"] for layer in layers):
            raise ValueError(
                f"Run {str(run.path)!r} leaves every analyzed layer unchanged (is it the pretrained model itself?). "
                "Pass a trained run, or choose other --layers/--modules."
            )

    # Training curves and KL to the initial policy
    dynamics = aggregate_dynamics(runs, args.band)
    kl = {run.label: policy_kl(run, model, problems, args) for run in runs} if args.kl else None

    analysis = {
        "model": model,
        "svd_dtype": str(dtype).removeprefix("torch."),
        "runs": [
            {
                "label": run.label,
                "method": run.method,
                "seed": run.seed,
                "path": str(run.path),
                "weights": str(run.weights_dir),
                "init": str(run.init_dir) if run.init_dir else None,
                "rank": run.rank,
                "scaling": run.scaling,
                "full_fine_tuning": run.is_full,
            }
            for run in runs
        ],
        "full_ft_reference": reference.label if reference else None,
        "layers": layers,
        "dynamics": dynamics,
        "kl": kl,
    }
    write_outputs(analysis, runs, reference, args.band, output_dir)
    print(f"Analyzed {len(runs)} runs on {len(targets)} layers of {model}; wrote analysis.json and figures to {output_dir}")
    return analysis


if __name__ == "__main__":
    main()
