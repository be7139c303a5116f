"""Compute LoRA initializations from a pretrained model and save them as standard PEFT adapters.

For a frozen linear weight W (out x in) with reduced SVD W = U S V^T (singular values in
descending order), LoRA adds s * B @ A with lora_A: (r x in), lora_B: (out x r), s = alpha / r.

| method   | lora_A (r x in)           | lora_B (out x r)          | base weight  |
|----------|---------------------------|---------------------------|--------------|
| lora     | Kaiming uniform (PEFT)    | 0                         | W            |
| gaussian | N(0, 1/r) (PEFT)          | 0                         | W            |
| pissa    | sqrt(S_top / s) V_top^T   | U_top sqrt(S_top / s)     | W - s B A    |
| milora   | sqrt(S_bot / s) V_bot^T   | U_bot sqrt(S_bot / s)     | W - s B A    |
| olora    | R[:r] of W = Q R          | Q[:, :r]                  | W - s B A    |
| rlpo     | V_top^T (orthonormal rows)| 0                         | W            |
| rlmo     | V_bot^T (orthonormal rows)| 0                         | W            |

"top" is the r right singular vectors with the largest singular values, "bot" the r smallest
of the reduced SVD. RLPO and RLMO keep W untouched and start B = 0, so the adapted model equals
the pretrained model at step 0 while updates stay in an orthonormal singular subspace of W.

The SVD runs in float32 or float64 whatever the model dtype, and factors are cast back.
`--svd auto` (default) computes only the part of the spectrum a method needs, with the paths in
singular_subspaces.py: block Lanczos for the top-r (rlpo, pissa), Gram eigendecomposition with
float64 corrections or inverse-Gram Lanczos for the bottom-r (rlmo, milora), and a float64 Gram
eigendecomposition for small weights and as the fallback. Each path stops once the estimated
largest principal-angle sine against the exact subspace is at most `--svd-tol`, and
init_metadata.json records that estimate per layer. `--svd exact` runs a full float32
`torch.linalg.svd` per weight (of W^T for wide weights) instead.
Each right singular vector's sign is fixed so that its entry of largest magnitude is positive,
so the same model and method always give the same adapter bytes.

Usage:
    python init_lora.py --init rlpo --output-dir runs/init-rlpo                    # embedded default, CPU
    python init_lora.py --init rlmo --model Qwen/Qwen2.5-Math-1.5B --dtype bfloat16 \\
        --device cuda --output-dir runs/init-rlmo-qwen                           # one GPU

Output folder: adapter_config.json and adapter_model.safetensors (load with
`PeftModel.from_pretrained(base, DIR, is_trainable=True)`), init_metadata.json, and for pissa,
milora and olora the residual base model in DIR/base_model, which must replace the original
base when the adapter is loaded (`load_policy` in this file does that).
"""

import argparse
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from singular_subspaces import singular_triplets

logger = logging.getLogger(__name__)

METHODS = ("lora", "gaussian", "pissa", "milora", "olora", "rlpo", "rlmo")
RESIDUAL_METHODS = ("pissa", "milora", "olora")  # methods that subtract s B A from the base weight
SVD_METHODS = ("pissa", "milora", "rlpo", "rlmo")
METADATA_FILE = "init_metadata.json"
RESIDUAL_BASE_DIR = "base_model"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
QUANTIZED_LINEAR_CLASSES = ("Linear8bitLt", "Linear4bit")  # bitsandbytes layers of 8-bit and 4-bit bases


def compute_factors(W: torch.Tensor, method: str, rank: int, scaling: float, svd: str = "auto", tol: float = 1e-4):
    """Return (lora_A (r x in), lora_B (out x r) or None, residual W or None, info) for one weight.

    W: the effective (out x in) weight in float32. lora_B None means zeros; residual None means
    the base weight stays unchanged. For residual methods, residual + scaling * B @ A == W.
    """
    info = {}
    if method in ("rlpo", "rlmo"):
        side = "top" if method == "rlpo" else "bottom"
        _, _, Vh_r, info = singular_triplets(W, rank, side, need_u=False, svd=svd, tol=tol)
        return Vh_r, None, None, info

    if method in ("pissa", "milora"):
        side = "top" if method == "pissa" else "bottom"
        U_r, S_r, Vh_r, info = singular_triplets(W, rank, side, need_u=True, svd=svd, tol=tol)
        root = torch.sqrt(S_r / scaling)
        lora_A = root[:, None] * Vh_r
        lora_B = U_r * root[None, :]
        return lora_A, lora_B, W - scaling * (lora_B @ lora_A), info

    if method == "olora":
        Q, R = torch.linalg.qr(W.to(torch.float32))
        lora_A, lora_B = R[:rank].contiguous(), Q[:, :rank].contiguous()
        return lora_A, lora_B, W - scaling * (lora_B @ lora_A), {"path": "qr_float32"}

    raise ValueError(f"compute_factors has no rule for method {method!r}")


# ----------------------------------------------------------------------------------------------
# Applying an initialization to a model
# ----------------------------------------------------------------------------------------------


def load_base_model(model_name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM and its tokenizer from a local folder or a hub id, with a clear error if missing."""
    is_local = Path(model_name_or_path).expanduser().exists()
    looks_like_hub_id = model_name_or_path.count("/") == 1 and not model_name_or_path.startswith((".", "/", "~"))
    if not is_local and not looks_like_hub_id:
        raise FileNotFoundError(
            f"Model path {model_name_or_path!r} does not exist. Pass a local model folder or a hub id "
            "such as Qwen/Qwen2.5-Math-1.5B (hub ids need network access)."
        )
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load model {model_name_or_path!r}: {error}. Pass a local model folder, or a hub id on a "
            "machine with network access."
        ) from error
    return model.to(device), tokenizer


def _effective_weight(layer: LoraLayer) -> torch.Tensor:
    """Return the base weight of a LoRA layer as (out x in), undoing GPT-2 Conv1D's (in x out) storage."""
    weight = layer.get_base_layer().weight
    return weight.T if layer.fan_in_fan_out else weight


def _check_layer(name: str, layer: LoraLayer, method: str, rank: int):
    """Raise a clear error for base layers an SVD-based initialization cannot handle."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    # bitsandbytes' Linear8bitLt and Linear4bit subclass torch.nn.Linear, so the class name and the
    # weight dtype (int8, or uint8 for packed 4-bit) are what identify a quantized layer.
    quantized_class = type(base).__name__ in QUANTIZED_LINEAR_CLASSES or type(base).__module__.startswith("bitsandbytes")
    if quantized_class or (weight is not None and weight.dtype not in FLOAT_DTYPES):
        dtype = weight.dtype if weight is not None else None
        raise ValueError(
            f"Target module {name!r} is a quantized layer ({type(base).__name__}, weight dtype {dtype}); method "
            f"{method!r} needs the SVD or QR of full-precision weights. Initialize from the unquantized model "
            "(--dtype float32 or bfloat16) and quantize the base afterwards."
        )
    if not isinstance(base, (torch.nn.Linear, Conv1D)):
        raise ValueError(
            f"Target module {name!r} is a {type(base).__name__}; method {method!r} supports only "
            "torch.nn.Linear and transformers Conv1D layers. Remove it from --target-modules."
        )
    out_features, in_features = _effective_weight(layer).shape
    if rank > min(out_features, in_features):
        raise ValueError(
            f"--rank {rank} is larger than min(out, in) = {min(out_features, in_features)} of target module "
            f"{name!r} with shape ({out_features} x {in_features}). Use --rank <= {min(out_features, in_features)} "
            "or drop that module from --target-modules."
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"Target module {name!r} has non-finite weights (NaN or inf); the base model is corrupt.")


def _check_tied_targets(model, config: LoraConfig, method: str):
    """Reject residual methods on a module whose weight is shared with another (tied embeddings)."""
    if method not in RESIDUAL_METHODS:
        return
    output_embeddings = model.get_output_embeddings()
    input_embeddings = model.get_input_embeddings()
    if output_embeddings is None or input_embeddings is None:
        return
    if output_embeddings.weight is not input_embeddings.weight:
        return
    for name, module in model.named_modules():
        if module is output_embeddings and isinstance(module, LoraLayer):
            raise ValueError(
                f"Method {method!r} would change {name!r}, whose weight is tied to the input embeddings, and so "
                "corrupt the embeddings. Remove it from --target-modules (all-linear already excludes it)."
            )


def initialize_adapter(
    model,
    method: str,
    rank: int = 16,
    alpha: float = 32.0,
    target_modules="all-linear",
    svd: str = "auto",
    svd_tol: float = 1e-4,
    device: str | None = None,
    seed: int = 0,
):
    """Wrap `model` in a PEFT LoRA adapter and set lora_A, lora_B (and the base weights) for `method`.

    Works one layer at a time on `device` (default: the weight's own device), so peak memory stays
    near one layer's working set beyond the model. Returns (peft_model, metadata dict).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown --init {method!r}. Choose one of: {', '.join(METHODS)}.")
    if rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank}.")

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights="gaussian" if method == "gaussian" else True,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        if "not found in the base model" in str(error) or "Target modules" in str(error):
            raise ValueError(
                f"--target-modules {target_modules!r} matches no module of the model: {error} "
                "Use 'all-linear' or names such as q_proj,v_proj."
            ) from error
        raise
    _check_tied_targets(model, config, method)

    layers = [(name, module) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    for name, layer in layers:
        if method in SVD_METHODS or method == "olora":
            _check_layer(name, layer, method, rank)

    per_layer = []
    started = time.perf_counter()
    if device and device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for name, layer in layers:
        if method in ("lora", "gaussian"):
            continue
        layer_started = time.perf_counter()
        base = layer.get_base_layer()
        compute_device = device or base.weight.device
        W = _effective_weight(layer).detach().to(compute_device, torch.float32)
        scaling = layer.scaling["default"]
        lora_A, lora_B, residual, info = compute_factors(W, method, rank, scaling, svd=svd, tol=svd_tol)

        A_param = layer.lora_A["default"].weight
        B_param = layer.lora_B["default"].weight
        with torch.no_grad():
            A_param.copy_(lora_A.to(A_param.device, A_param.dtype))
            if lora_B is None:
                B_param.zero_()
            else:
                B_param.copy_(lora_B.to(B_param.device, B_param.dtype))
            if residual is not None:
                residual = residual.T if layer.fan_in_fan_out else residual
                base.weight.copy_(residual.to(base.weight.device, base.weight.dtype))
        seconds = time.perf_counter() - layer_started
        per_layer.append({"name": name.removeprefix("base_model.model."), "shape": list(W.shape), "seconds": round(seconds, 6), **info})
        del W, lora_A, lora_B, residual

    total_seconds = time.perf_counter() - started
    peak_memory = None
    if device and device.startswith("cuda"):
        peak_memory = torch.cuda.max_memory_allocated(device)
    metadata = {
        "method": method,
        "rank": rank,
        "alpha": alpha,
        "scaling": alpha / rank,
        "target_modules": sorted(peft_model.peft_config["default"].target_modules)
        if not isinstance(peft_model.peft_config["default"].target_modules, str)
        else peft_model.peft_config["default"].target_modules,
        "model": getattr(model.config, "_name_or_path", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "svd": svd if method in SVD_METHODS else None,
        "svd_tol": svd_tol if method in SVD_METHODS and svd == "auto" else None,
        "seed": seed,
        "num_layers": len(layers),
        "layers": per_layer,
        "total_seconds": round(total_seconds, 4),
        "peak_gpu_memory_bytes": peak_memory,
        "residual_base": RESIDUAL_BASE_DIR if method in RESIDUAL_METHODS else None,
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__},
    }
    logger.info("Initialized %d LoRA layers with %s in %.2f s", len(layers), method, total_seconds)
    return peft_model, metadata


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Check that `output_dir` may be written and return it as a Path; nothing is created yet."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {str(output_dir)!r} exists and is not empty. Pass --overwrite to replace it "
            "or choose another --output-dir."
        )
    return output_dir


def commit_output_dir(temporary_dir: Path, output_dir: Path):
    """Move a completely written `temporary_dir` to `output_dir`, replacing an old one only at the end."""
    output_dir = Path(output_dir)
    old_dir = None
    if output_dir.exists():
        old_dir = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old_dir)
    try:
        temporary_dir.rename(output_dir)
    except BaseException:
        if old_dir is not None:
            old_dir.rename(output_dir)
        raise
    if old_dir is not None:
        shutil.rmtree(old_dir)


def temporary_dir_for(output_dir: Path) -> Path:
    """Return a fresh hidden folder next to `output_dir` to write into before the final rename.

    Also removes the temporary folders that killed processes left next to `output_dir`.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    temporary_dir = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    if temporary_dir.exists():
        shutil.rmtree(temporary_dir)
    temporary_dir.mkdir()
    return temporary_dir


def remove_stale_temporaries(output_dir: Path):
    """Clean up the hidden folders that processes killed while saving `output_dir` left next to it.

    Deletes the `.NAME.tmp-PID` folders of processes that no longer run. A `.NAME.old-PID` folder
    is the previous `output_dir` moved aside by `commit_output_dir`: it is renamed back when
    `output_dir` is missing (killed between the two renames), else deleted.
    NOTE: only this machine's processes are checked, so on a file system shared between
    machines, a save in progress on another machine under the same name would be deleted.
    """
    output_dir = Path(output_dir)
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.(tmp|old)-(\d+)")
    for candidate in sorted(output_dir.parent.glob(f".{output_dir.name}.*-*")):
        match = pattern.fullmatch(candidate.name)
        if match is None or int(match[2]) == os.getpid() or _process_running(int(match[2])):
            continue
        if match[1] == "old" and not output_dir.exists():
            logger.warning("Restoring %s from %s, which process %s moved aside before it was killed.", output_dir, candidate, match[2])
            candidate.rename(output_dir)
            continue
        logger.warning("Removing %s, left by process %s, which was killed while saving.", candidate, match[2])
        shutil.rmtree(candidate, ignore_errors=True)


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # the process exists but belongs to another user
    return True


def save_adapter_atomic(peft_model, metadata: dict, output_dir: Path, tokenizer=None):
    """Save an adapter (see `save_adapter`) into a temporary folder renamed to `output_dir` when complete.

    A crash leaves the previous `output_dir` (or none) and no temporary folder.
    """
    output_dir = Path(output_dir)
    temporary_dir = temporary_dir_for(output_dir)
    try:
        save_adapter(peft_model, metadata, temporary_dir, tokenizer, final_dir=output_dir)
        commit_output_dir(temporary_dir, output_dir)
    except BaseException:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise


def save_residual_base(peft_model, tokenizer, directory: Path):
    """Save the base model with its residual weights (LoRA layers excluded) as a loadable model folder."""
    base_model = peft_model.get_base_model()
    state_dict = {}
    for key, value in base_model.state_dict().items():
        if "lora_" in key:
            continue
        state_dict[key.replace(".base_layer.", ".")] = value
    base_model.save_pretrained(directory, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_adapter(peft_model, metadata: dict, directory: Path, tokenizer=None, final_dir: Path | None = None):
    """Write the adapter, init_metadata.json and, for residual methods, the residual base into `directory`.

    The saved adapter_config.json has init_lora_weights = true, so loading it never reruns an SVD;
    the saved lora_A and lora_B overwrite the default initialization. For residual methods its
    base_model_name_or_path is the residual base inside `final_dir` (where `directory` will be
    renamed to; default `directory`), so AutoPeftModel loads the right base.
    """
    directory = Path(directory)
    final_dir = Path(final_dir) if final_dir is not None else directory
    peft_model.save_pretrained(directory)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["init_lora_weights"] = True
    if metadata.get("residual_base"):
        save_residual_base(peft_model, tokenizer, directory / metadata["residual_base"])
        config["base_model_name_or_path"] = str((final_dir / metadata["residual_base"]).resolve())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def read_metadata(adapter_dir: str | Path) -> dict | None:
    """Return the init_metadata.json of an adapter folder, or None for adapters made elsewhere."""
    path = Path(adapter_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else None


def resolve_base(adapter_dir: str | Path, model: str | None = None) -> str:
    """Return the base model an adapter must be applied to.

    Residual methods name their residual base folder in init_metadata.json (relative to the
    adapter folder, or to a training run's init/ folder); other adapters use `model` if given,
    else the `base_model_name_or_path` of adapter_config.json.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"Adapter folder {str(adapter_dir)!r} has no adapter_config.json. Pass a folder written by "
            "init_lora.py, train_grpo.py or PEFT's save_pretrained."
        )
    metadata = read_metadata(adapter_dir)
    adapter_config = json.loads(config_path.read_text())
    original = metadata.get("model") if metadata else adapter_config.get("base_model_name_or_path")
    if model is not None and original is not None and not same_model(model, original):
        raise ValueError(
            f"Adapter {str(adapter_dir)!r} was initialized from model {original!r}, but --model is {model!r}. "
            "Pass the matching --model or leave it out."
        )
    if metadata and metadata.get("residual_base"):
        residual = (adapter_dir / metadata["residual_base"]).resolve()
        if not residual.exists():
            raise FileNotFoundError(
                f"Adapter {str(adapter_dir)!r} was initialized with {metadata['method']}, which changes the base "
                f"weights, but its residual base {str(residual)!r} is missing. Copy the whole run folder."
            )
        return str(residual)
    if model is not None:
        return model
    if original is None:
        raise ValueError(f"Adapter {str(adapter_dir)!r} does not name its base model; pass --model.")
    return original


def same_model(a: str, b: str) -> bool:
    """Return whether two model ids or paths name the same model (paths compared resolved)."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_policy(model: str | None, adapter_dir: str | Path | None = None, dtype: str = "float32", device: str = "cpu", trainable: bool = False):
    """Load a base model, optionally with a PEFT adapter on the right (residual) base; returns (model, tokenizer).

    Adapters are loaded trainable when `trainable` is true; PEFT loads them frozen by default,
    which would silently train nothing.
    """
    if adapter_dir is None:
        if model is None:
            raise ValueError("Pass --model, --adapter, or both.")
        return load_base_model(model, dtype=dtype, device=device)
    base_path = resolve_base(adapter_dir, model)
    base, tokenizer = load_base_model(base_path, dtype=dtype, device=device)
    policy = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    return policy, tokenizer


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_target_modules(value: str):
    """Turn 'all-linear' or 'q_proj,v_proj' into what LoraConfig.target_modules expects."""
    value = value.strip()
    if value == "all-linear":
        return value
    modules = [name.strip() for name in value.split(",") if name.strip()]
    if not modules:
        raise ValueError(f"--target-modules {value!r} names no module; use 'all-linear' or e.g. q_proj,v_proj.")
    return modules


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser, with help text for every flag."""
    from build_default import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description="Compute a LoRA initialization and save it as a PEFT adapter.")
    parser.add_argument("--init", required=True, choices=METHODS, help="Initialization method.")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="Base model folder or hub id (default: the embedded tiny model).")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r.")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; the scaling is alpha / rank.")
    parser.add_argument("--target-modules", default="all-linear", help="'all-linear' or comma-separated module names.")
    parser.add_argument("--svd", default="auto", choices=("auto", "exact"), help="'auto': fastest exact path per method; 'exact': full float32 torch.linalg.svd per weight (of W^T for wide weights).")
    parser.add_argument("--svd-tol", type=float, default=1e-4, help="Auto path: stop once the estimated largest principal-angle sine between each weight's singular subspace and the exact one is at most this.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"), help="dtype the model is loaded and saved in; the SVD always runs in float32 or float64.")
    parser.add_argument("--device", default=None, help="Device for the per-layer SVD, e.g. cuda (default: where the weights are).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for lora/gaussian initializations and subspace iteration.")
    parser.add_argument("--output-dir", required=True, help="Folder to write the adapter into.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    output_dir = prepare_output_dir(args.output_dir, args.overwrite)

    model, tokenizer = load_base_model(args.model, dtype=args.dtype)
    peft_model, metadata = initialize_adapter(
        model,
        args.init,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=parse_target_modules(args.target_modules),
        svd=args.svd,
        svd_tol=args.svd_tol,
        device=args.device,
        seed=args.seed,
    )
    metadata["model"] = args.model

    save_adapter_atomic(peft_model, metadata, output_dir, tokenizer)
    print(f"Saved {args.init} adapter (rank {args.rank}, {metadata['num_layers']} layers, {metadata['total_seconds']:.2f} s) to {output_dir}")


if __name__ == "__main__":
    main()
