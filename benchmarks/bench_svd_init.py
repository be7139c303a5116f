"""Time and check the SVD-based LoRA initializations at the layer shapes of Qwen2.5-1.5B.

Usage:
    python benchmarks/bench_svd_init.py --layers 1 --threads 1      # CPU: a few minutes per layer
    python benchmarks/bench_svd_init.py --layers 28 --device cuda   # one GPU, the whole depth

The model is a transformers Qwen2ForCausalLM with Qwen2.5-1.5B's shapes: hidden 1536,
intermediate 8960, 12 heads and 2 KV heads. So q/o_proj are 1536 x 1536, k/v_proj 256 x 1536,
gate/up_proj 8960 x 1536 and down_proj 1536 x 8960. The vocabulary is 512 to save memory, and
there are `--layers` decoder layers.

Every linear weight W (out x in, k = min(out, in)) is replaced by U diag(s) V^T with Haar-random
orthonormal U (out x k) and V (in x k) and a spectrum shaped like a trained weight's:
- bulk: the Marchenko-Pastur quantiles of a Gaussian matrix's singular values with aspect ratio
  k / max(out, in), which is where training starts from;
- head: the top k/32 values raised by (k/32 / i)^0.6. Trained weights' spectra grow such a
  power-law tail above the bulk (C. H. Martin and M. W. Mahoney, "Implicit Self-Regularization in
  Deep Neural Networks: Evidence from Random Matrix Theory and Implications for Learning", JMLR
  22(165), 2021); the fraction and exponent here are our choice.
For k = 1536 that makes s_1 about 11 times s_48, s_16 / s_17 = 1.04 and, at the bottom,
s_{k-16} / s_{k-15} = 1.05 for the square weights (singular values down to s_1 / 6700) and 1.002
for the tall and wide ones (s_1 / s_k = 24). The k/v_proj weights (k = 256) get s_16 / s_17 = 1.003
and s_1 / s_k = 8.

Each initialization runs on a fresh copy of that model with rank 16 and alpha 32:
(a) init_lora.initialize_adapter(..., svd="auto") for rlpo, rlmo, pissa, milora and olora,
(b) the same with svd="exact" (a full float32 torch.linalg.svd per weight), and
(c) PEFT's own init_lora_weights="pissa" (full SVD) and "pissa_niter_4" (torch.svd_lowrank).
The script prints the wall time of each, per-shape seconds per layer, the path each weight took,
and the largest principal-angle sine between each method's lora_A row space and the exact
subspace from a float64 SVD of the original weight. That subspace is the top 16 for rlpo and
pissa and the bottom 16 of the k singular values for rlmo and milora. olora's lora_A is not a
singular subspace, so it has no sine.
"""

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import init_lora  # noqa: E402

RANK = 16
ALPHA = 32.0
METHODS = ("rlpo", "rlmo", "pissa", "milora", "olora")
SIDE = {"rlpo": "top", "pissa": "top", "rlmo": "bottom", "milora": "bottom"}
HEAD_FRACTION = 32  # the top k / 32 singular values follow the power law
HEAD_EXPONENT = 0.6


def marchenko_pastur_singular_values(rows: int, columns: int) -> torch.Tensor:
    """Return the `columns` (<= rows) singular-value quantiles, descending, of a rows x columns Gaussian matrix / sqrt(rows)."""
    ratio = columns / rows
    low, high = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    grid = torch.linspace(low, high, 200_001, dtype=torch.float64)
    density = torch.sqrt(((high - grid) * (grid - low)).clamp_min(0)) / (2 * math.pi * ratio * grid.clamp_min(1e-300))
    density[grid <= 0] = 0.0
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((density[1:] + density[:-1]) / 2 * grid.diff(), 0)])
    cdf /= cdf[-1].clone()
    quantiles = (torch.arange(columns, dtype=torch.float64) + 0.5) / columns
    index = torch.searchsorted(cdf, quantiles).clamp(1, len(grid) - 1)
    weight = (quantiles - cdf[index - 1]) / (cdf[index] - cdf[index - 1]).clamp_min(1e-300)
    eigenvalues = grid[index - 1] + weight * (grid[index] - grid[index - 1])
    return eigenvalues.sqrt().flip(0)


def trained_like_spectrum(out_features: int, in_features: int) -> torch.Tensor:
    """Return min(out, in) descending singular values: Marchenko-Pastur bulk with a power-law head."""
    k = min(out_features, in_features)
    values = marchenko_pastur_singular_values(max(out_features, in_features), k)
    head = max(1, k // HEAD_FRACTION)
    index = torch.arange(1, k + 1, dtype=torch.float64)
    return values * torch.clamp((head / index) ** HEAD_EXPONENT, min=1.0)


def synthetic_weight(out_features: int, in_features: int, generator: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """Return a float32 (out x in) weight U diag(s) V^T with Haar-random U, V and `trained_like_spectrum`."""
    k = min(out_features, in_features)
    U, _ = torch.linalg.qr(torch.randn(out_features, k, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(in_features, k, generator=generator))
    s = trained_like_spectrum(out_features, in_features).to(torch.float32)
    return (U * (scale * s)) @ V.T


def build_model(num_layers: int, seed: int) -> Qwen2ForCausalLM:
    """Return a float32 Qwen2 model with Qwen2.5-1.5B's layer shapes and synthetic trained-like weights."""
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=num_layers,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(synthetic_weight(*module.weight.shape, generator))
    return model


def reference_subspaces(model) -> dict:
    """Return {module name: (top-r rows, bottom-r rows)} of each linear weight's float64 right singular vectors."""
    subspaces = {}
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            W = module.weight.detach().double()
            if W.shape[0] >= W.shape[1]:
                _, _, Vh = torch.linalg.svd(W, full_matrices=False)
            else:
                U, _, _ = torch.linalg.svd(W.T, full_matrices=False)
                Vh = U.T
            subspaces[f"model.layers.{name}"] = (Vh[:RANK].clone(), Vh[-RANK:].clone())
    return subspaces


def largest_sine(A: torch.Tensor, B: torch.Tensor) -> float:
    """Return the largest principal-angle sine between the row spaces of A and B."""
    Qa, _ = torch.linalg.qr(A.double().T)
    Qb, _ = torch.linalg.qr(B.double().T)
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0)
    return float(torch.sqrt(1 - cosines.min() ** 2))


def max_sine(peft_model, method: str, subspaces: dict):
    """Return the largest sine over all LoRA layers between lora_A's rows and the exact subspace, or None."""
    if method not in SIDE:
        return None
    worst = 0.0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            key = name.removeprefix("base_model.model.")
            top, bottom = subspaces[key]
            exact = top if SIDE[method] == "top" else bottom
            worst = max(worst, largest_sine(module.lora_A["default"].weight.detach(), exact))
    return worst


def shape_label(name: str, shape) -> str:
    return f"{name.rsplit('.', 1)[-1]} {shape[0]}x{shape[1]}"


def run_ours(model, method: str, svd: str, svd_tol: float, device, subspaces: dict, repeats: int) -> dict:
    """Initialize `repeats` fresh copies; keep the fastest wall time and each weight's fastest seconds."""
    seconds = math.inf
    per_weight = defaultdict(lambda: math.inf)
    shapes, paths = {}, defaultdict(set)
    for _ in range(repeats):
        started = time.perf_counter()
        peft_model, metadata = init_lora.initialize_adapter(copy.deepcopy(model), method, rank=RANK, alpha=ALPHA, svd=svd, svd_tol=svd_tol, device=device)
        seconds = min(seconds, time.perf_counter() - started)
        for layer in metadata["layers"]:
            per_weight[layer["name"]] = min(per_weight[layer["name"]], layer["seconds"])
            shapes[layer["name"]] = shape_label(layer["name"], layer["shape"])
            paths[shapes[layer["name"]]].add(str(layer.get("path")))

    per_shape = defaultdict(list)
    for name, value in per_weight.items():
        per_shape[shapes[name]].append(value)
    return {
        "seconds": seconds,
        "per_shape": {label: sum(values) / len(values) for label, values in per_shape.items()},
        "paths": {label: sorted(values) for label, values in paths.items()},
        "sine": max_sine(peft_model, method, subspaces),
    }


def run_peft(model, init: str, device, subspaces: dict, repeats: int) -> dict:
    """Run PEFT's own initialization on `repeats` fresh copies; keep the fastest wall time."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=init, task_type="CAUSAL_LM")
    seconds = math.inf
    for _ in range(repeats):
        copied = copy.deepcopy(model)
        if device:
            copied.to(device)
        started = time.perf_counter()
        peft_model = get_peft_model(copied, config)
        if device and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - started)
    return {"seconds": seconds, "sine": max_sine(peft_model, "pissa", subspaces)}


def format_sine(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def print_report(results: dict, layers: int, header: dict):
    print(f"\n{header}\n")
    print("| method | auto, wall s | exact, wall s | exact / auto | max sine auto | max sine exact |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        auto, exact = results[(method, "auto")], results[(method, "exact")]
        print(
            f"| {method} | {auto['seconds']:.2f} | {exact['seconds']:.2f} | {exact['seconds'] / auto['seconds']:.1f} "
            f"| {format_sine(auto['sine'])} | {format_sine(exact['sine'])} |"
        )
    for init in ("pissa", "pissa_niter_4"):
        peft = results[("peft", init)]
        print(f"| PEFT {init} | {peft['seconds']:.2f} | | | {format_sine(peft['sine'])} | |")

    print(f"\nSeconds per weight (mean over {layers} layer(s)), auto / exact (exact / auto):\n")
    labels = list(results[("rlpo", "auto")]["per_shape"])
    print("| weight | " + " | ".join(method for method in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for label in labels:
        cells = []
        for method in METHODS:
            auto = results[(method, "auto")]["per_shape"][label]
            exact = results[(method, "exact")]["per_shape"][label]
            cells.append(f"{auto:.3f} / {exact:.3f} ({exact / auto:.1f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for method in METHODS:
        auto = results[(method, "auto")]
        per_layer_auto = sum(auto["per_shape"].values())
        per_layer_exact = sum(results[(method, "exact")]["per_shape"].values())
        print(f"\n{method}: {per_layer_auto:.2f} s per layer (auto) vs {per_layer_exact:.2f} s (exact), {per_layer_exact / per_layer_auto:.1f}x")
        for label in labels:
            print(f"  {label}: {', '.join(auto['paths'][label])}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark SVD-based LoRA initializations at Qwen2.5-1.5B's layer shapes.")
    parser.add_argument("--layers", type=int, default=1, help="Decoder layers in the model (Qwen2.5-1.5B has 28).")
    parser.add_argument("--device", default=None, help="Device for the per-layer SVD, e.g. cuda (default: CPU, where the model is built).")
    parser.add_argument("--svd-tol", type=float, default=1e-4, help="Sine tolerance passed to init_lora's auto path.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per core).")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per initialization; the fastest counts, per weight (shields timings from other jobs).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic weights.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    if args.layers < 1:
        raise ValueError(f"--layers must be at least 1, got {args.layers}.")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device or "cpu",
        "layers": args.layers,
        "processor": platform.processor() or platform.machine(),
        "svd_tol": args.svd_tol,
        "repeats": args.repeats,
    }
    started = time.perf_counter()
    model = build_model(args.layers, args.seed)
    subspaces = reference_subspaces(model)
    print(f"Built the model and its float64 reference SVDs in {time.perf_counter() - started:.1f} s", flush=True)

    results = {}
    for method in METHODS:
        for svd in ("auto", "exact"):
            results[(method, svd)] = run_ours(model, method, svd, args.svd_tol, args.device, subspaces, args.repeats)
            print(f"{method} {svd}: {results[(method, svd)]['seconds']:.2f} s", flush=True)
    for init in ("pissa", "pissa_niter_4"):
        results[("peft", init)] = run_peft(model, init, args.device, subspaces, args.repeats)
        print(f"PEFT {init}: {results[('peft', init)]['seconds']:.2f} s", flush=True)

    print_report(results, args.layers, header)
    if args.json:
        serializable = {" ".join(key): value for key, value in results.items()}
        Path(args.json).write_text(json.dumps({"header": header, "results": serializable}, indent=2))


if __name__ == "__main__":
    main()
