"""Tests for analyze_svd.py on a tiny random Qwen2 and adapters made by init_lora.py (float32 weights)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

import analyze_svd
from build_default import build_tokenizer

REPOSITORY = Path(__file__).resolve().parents[1]
RANK = 4
ALPHA = 8.0
SCALING = ALPHA / RANK
MODULES = "q_proj,o_proj,gate_proj,up_proj,down_proj"
ANALYZED = ["--layers", "0,-1", "--modules", "q_proj,down_proj"]
PERTURBATION = 0.05


def save_tiny_model(folder: Path, seed: int = 0, hidden_size: int = 64) -> Path:
    """Save a random 4-layer Qwen2 with the embedded default's character-level tokenizer."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_init_lora(base: Path, root: Path, methods: list[str]) -> dict[str, Path]:
    """Run init_lora.py once per method, in parallel subprocesses."""
    processes = {}
    for method in methods:
        command = [sys.executable, str(REPOSITORY / "init_lora.py"), "--init", method, "--model", str(base), "--rank", str(RANK)]
        command += ["--alpha", str(ALPHA), "--target-modules", MODULES, "--svd", "exact", "--output-dir", str(root / f"init-{method}")]
        processes[method] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPOSITORY)
    for method, process in processes.items():
        output, _ = process.communicate(timeout=180)
        assert process.returncode == 0, output
    return {method: root / f"init-{method}" for method in methods}


def make_trained_run(init_dir: Path, run_dir: Path, method: str, seed: int, base: Path) -> Path:
    """Lay out a train_grpo.py-style run whose adapter is the initial one with every lora_B perturbed."""
    shutil.copytree(init_dir, run_dir / "init")
    shutil.copytree(init_dir, run_dir / "adapter", ignore=shutil.ignore_patterns("base_model"))
    weights_path = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights_path)
    generator = torch.Generator().manual_seed(100 + seed)
    for key in sorted(tensors):
        if ".lora_B." in key:
            tensors[key] = tensors[key] + PERTURBATION * torch.randn(tensors[key].shape, generator=generator)
    save_file(tensors, weights_path, metadata={"format": "pt"})

    metadata = json.loads((run_dir / "adapter" / "init_metadata.json").read_text())
    if metadata["residual_base"]:
        metadata["residual_base"] = "../init/base_model"
    (run_dir / "adapter" / "init_metadata.json").write_text(json.dumps(metadata))
    (run_dir / "summary.json").write_text(json.dumps({"init": method, "seed": seed, "model": str(base)}))
    history = [
        {"step": 1, "reward": 0.1 + seed, "entropy": 2.0, "completions/mean_length": 10.0, "grad_norm": 1.0, "loss": 0.0},
        {"step": 2, "reward": 0.3 + seed, "entropy": 1.5, "completions/mean_length": 12.0, "grad_norm": 2.0, "loss": 0.0},
        {"step": 2, "train_runtime": 1.0, "train_loss": 0.0},
    ]
    (run_dir / "log_history.json").write_text(json.dumps({"log_history": history}))
    return run_dir


def adapter_updates(run_dir: Path) -> dict[str, torch.Tensor]:
    """Return s (B A - B_0 A_0) in float64 for every adapted module of a run, keyed by module name."""
    trained = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    initial = load_file(run_dir / "init" / "adapter_model.safetensors")
    updates = {}
    for key in trained:
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            key_B = key.replace(".lora_A.", ".lora_B.")
            update = trained[key_B].double() @ trained[key].double() - initial[key_B].double() @ initial[key].double()
            updates[name] = SCALING * update
    return updates


def make_full_run(base: Path, run_dir: Path, updates: dict[str, torch.Tensor]) -> Path:
    """Lay out a train_grpo.py --init full run whose weights are W + the given updates."""
    shutil.copytree(base, run_dir / "model")
    weights_path = run_dir / "model" / "model.safetensors"
    tensors = load_file(weights_path)
    for name, update in updates.items():
        tensors[f"{name}.weight"] = (tensors[f"{name}.weight"].double() + update).float()
    save_file(tensors, weights_path, metadata={"format": "pt"})
    (run_dir / "summary.json").write_text(json.dumps({"init": "full", "seed": 0, "model": str(base)}))
    return run_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze_svd")
    base = save_tiny_model(root / "base")
    inits = run_init_lora(base, root, ["rlpo", "rlmo", "pissa"])
    trained = {
        "rlpo-seed0": make_trained_run(inits["rlpo"], root / "rlpo-seed0", "rlpo", 0, base),
        "rlpo-seed1": make_trained_run(inits["rlpo"], root / "rlpo-seed1", "rlpo", 1, base),
        "pissa-seed0": make_trained_run(inits["pissa"], root / "pissa-seed0", "pissa", 0, base),
    }
    full = make_full_run(base, root / "full-seed0", adapter_updates(trained["rlpo-seed0"]))
    return {"root": root, "base": base, "inits": inits, "trained": trained, "full": full}


@pytest.fixture(scope="module")
def analysis(workspace):
    """Run the whole analysis once in-process on every kind of run."""
    runs = [workspace["inits"][method] for method in ("rlpo", "rlmo", "pissa")] + list(workspace["trained"].values())
    output_dir = workspace["root"] / "analysis"
    argv = [*map(str, runs), "--model", str(workspace["base"]), "--full-ft", str(workspace["full"]), *ANALYZED, "--output-dir", str(output_dir)]
    analyze_svd.main(argv)
    return json.loads((output_dir / "analysis.json").read_text()), output_dir


def metrics_of(analysis: dict, label: str) -> list[dict]:
    return [layer["runs"][label] for layer in analysis["layers"] if label in layer["runs"]]


# ----------------------------------------------------------------------------------------------
# The math, on tensors
# ----------------------------------------------------------------------------------------------


def test_similarity_exact_subspaces():
    torch.manual_seed(0)
    W = torch.randn(12, 9, dtype=torch.float64)
    _, _, Vh = torch.linalg.svd(W, full_matrices=False)
    top, bottom = analyze_svd.subspace_similarity(Vh, Vh[:3].T, max_k=6)
    assert top.shape == (6, 3)
    assert top[2, 2].item() == pytest.approx(1.0, abs=1e-12)
    assert bottom[2, 2].item() == pytest.approx(0.0, abs=1e-12)
    _, bottom = analyze_svd.subspace_similarity(Vh, Vh.flip(0)[:3].T, max_k=6)
    assert bottom[2, 2].item() == pytest.approx(1.0, abs=1e-12)


def test_similarity_bounded():
    torch.manual_seed(1)
    _, _, Vh = torch.linalg.svd(torch.randn(20, 16, dtype=torch.float64), full_matrices=False)
    Q, _ = torch.linalg.qr(torch.randn(16, 5, dtype=torch.float64))
    top, bottom = analyze_svd.subspace_similarity(Vh, Q, max_k=16)
    for values in (top, bottom):
        assert values.min().item() >= 0.0
        assert values.max().item() <= 1.0 + 1e-12
    assert top[-1].tolist() == pytest.approx([1.0] * 5, abs=1e-12)  # k = n covers the whole input space


def test_energy_unit_sums():
    torch.manual_seed(2)
    W = torch.randn(10, 7, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    energy = analyze_svd.update_energy(torch.randn(10, 7, dtype=torch.float64), U, Vh)
    assert energy["energy_right"].sum().item() == pytest.approx(1.0, abs=1e-12)
    assert energy["energy_left"].sum().item() == pytest.approx(1.0, abs=1e-12)
    assert energy["outside_share_right"] == pytest.approx(0.0, abs=1e-12)  # V spans all 7 input directions
    assert energy["outside_share_left"] > 0.0  # U spans only 7 of the 10 output directions


def test_low_rank_basis_matches_dense():
    torch.manual_seed(3)
    L = torch.randn(9, 4, dtype=torch.float64)
    R = torch.randn(4, 11, dtype=torch.float64)
    low_rank, low_rank_values, _ = analyze_svd.update_right_basis(analyze_svd.Update(dW=L @ R, factors=(L, R)), 3)
    dense, dense_values, _ = analyze_svd.update_right_basis(analyze_svd.Update(dW=L @ R), 3)
    assert torch.allclose(low_rank_values, dense_values, atol=1e-10)
    assert torch.allclose(low_rank @ low_rank.T, dense @ dense.T, atol=1e-10)  # same subspace projector


def test_gap_to_itself_zero():
    dW = torch.randn(6, 5, dtype=torch.float64)
    result = analyze_svd.compare_updates(dW, dW.clone())
    assert result["gap"] == 0.0
    assert result["cosine"] == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Whole analysis on saved runs
# ----------------------------------------------------------------------------------------------


def test_energies_sum_to_one(analysis):
    result, _ = analysis
    for layer in result["layers"]:
        for label, metrics in layer["runs"].items():
            assert sum(metrics["energy_right"]) == pytest.approx(1.0, abs=1e-4), (layer["name"], label)
            assert metrics["cumulative_right"][-1] == pytest.approx(1.0, abs=1e-4), (layer["name"], label)
            if metrics["energy_left"] is not None:
                assert sum(metrics["energy_left"]) == pytest.approx(1.0, abs=1e-4), (layer["name"], label)


def test_rlpo_step0_top_subspace(analysis):
    result, _ = analysis
    records = metrics_of(result, "RLPO seed 0 (init-rlpo)")
    assert len(records) == 4
    for metrics in records:
        assert metrics["source"] == "lora_A"
        assert metrics["similarity_top_at_r"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["similarity_bottom_at_r"] == pytest.approx(0.0, abs=1e-5)
        assert metrics["top_r_share_right"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["energy_left"] is None


def test_rlmo_step0_bottom_subspace(analysis):
    result, _ = analysis
    for metrics in metrics_of(result, "RLMO seed 0"):
        assert metrics["similarity_bottom_at_r"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["similarity_top_at_r"] == pytest.approx(0.0, abs=1e-5)
        assert metrics["bottom_r_share_right"] == pytest.approx(1.0, abs=1e-5)


def test_pissa_step0_top_subspace(analysis):
    result, _ = analysis
    for metrics in metrics_of(result, "PiSSA seed 0 (init-pissa)"):
        assert metrics["source"] == "lora_A"
        assert metrics["similarity_top_at_r"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["residual_reconstruction_error"] < 1e-6


def test_trained_rlpo_stays_in_top(analysis):
    result, _ = analysis
    for metrics in metrics_of(result, "RLPO seed 0 (rlpo-seed0)"):
        assert metrics["source"] == "update"
        assert metrics["update_norm"] > 0
        assert metrics["top_r_share_right"] == pytest.approx(1.0, abs=1e-5)  # dW = s dB A_0 keeps A_0's row space
        assert metrics["similarity_top_at_r"] == pytest.approx(1.0, abs=1e-5)
        assert sum(metrics["energy_left"]) == pytest.approx(1.0, abs=1e-4)


def test_gap_of_run_to_itself(analysis):
    result, _ = analysis
    assert result["full_ft_reference"] == "Full FT seed 0"
    for metrics in metrics_of(result, "RLPO seed 0 (rlpo-seed0)"):
        assert metrics["gap"] < 1e-4  # the full run's weights are W + this run's update, rounded to float32
        assert metrics["cosine"] == pytest.approx(1.0, abs=1e-6)
    for metrics in metrics_of(result, "RLPO seed 1"):
        assert metrics["gap"] > 0.5
    assert all("gap" not in metrics for metrics in metrics_of(result, "Full FT seed 0"))


def test_full_ft_update_read(workspace):
    run = analyze_svd.find_run(workspace["full"])
    assert run.is_full
    assert run.weights_dir == workspace["full"] / "model"
    pretrained = analyze_svd.SafetensorsFolder(workspace["base"])
    targets = analyze_svd.select_targets(pretrained, "1", "up_proj")
    analyze_svd.attach_weights(run, targets, str(workspace["base"]), pretrained)
    W = pretrained.get(f"{targets[0].name}.weight", "cpu", torch.float64)
    update, _ = analyze_svd.read_update(run, targets[0], W, torch.float64)
    written = adapter_updates(workspace["trained"]["rlpo-seed0"])[targets[0].name]
    assert torch.allclose(update.dW, written, atol=1e-6)
    assert update.dW.norm().item() > 0.01


def test_bfloat16_full_model_rounding(workspace, tmp_path):
    # A model saved in bfloat16 without training differs from the float32 W only by rounding, which is no update.
    folder = tmp_path / "model"
    shutil.copytree(workspace["base"], folder)
    tensors = {key: value.to(torch.bfloat16) for key, value in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    run = analyze_svd.find_run(folder)
    pretrained = analyze_svd.SafetensorsFolder(workspace["base"])
    targets = analyze_svd.select_targets(pretrained, "0", "o_proj")
    analyze_svd.attach_weights(run, targets, str(workspace["base"]), pretrained)
    W = pretrained.get(f"{targets[0].name}.weight", "cpu", torch.float64)
    update, _ = analyze_svd.read_update(run, targets[0], W, torch.float64)
    assert not torch.any(update.dW)


def test_dynamics_mean_and_band(analysis):
    result, _ = analysis
    reward = result["dynamics"]["rlpo"]["reward"]
    assert reward["steps"] == [1, 2]
    assert reward["mean"] == pytest.approx([0.6, 0.8])
    assert reward["low"] == pytest.approx([0.1, 0.3])
    assert reward["high"] == pytest.approx([1.1, 1.3])
    assert set(reward["runs"]) == {"RLPO seed 0 (rlpo-seed0)", "RLPO seed 1"}
    assert "kl" not in result["dynamics"]["rlpo"]  # not logged when beta = 0


def test_figures_written(analysis):
    result, output_dir = analysis
    expected = ["energy_right.png", "energy_left.png", "energy_share.png", "similarity_summary.png", "spectrum.png", "full_ft_gap.png", "dynamics.png"]
    expected += [name for name in result["figures"] if name.startswith("similarity_") and name != "similarity_summary.png"]
    assert len(expected) == 7 + 7  # one similarity map per run, the full fine-tuning run included
    for name in expected:
        assert (output_dir / name).stat().st_size > 10_000, name
        assert name in result["figures"], name
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(expected + ["analysis.json"])


def test_spectrum_matches_svd(analysis, workspace):
    result, _ = analysis
    weights = load_file(workspace["base"] / "model.safetensors")
    for layer in result["layers"]:
        expected = torch.linalg.svdvals(weights[f"{layer['name']}.weight"].double())
        assert layer["singular_values"] == pytest.approx(expected.tolist(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error and nothing written
# ----------------------------------------------------------------------------------------------


def run_main_expecting(error_type, argv: list[str], output_dir: Path) -> str:
    with pytest.raises(error_type) as raised:
        analyze_svd.main([*argv, "--output-dir", str(output_dir)])
    assert not output_dir.exists()
    assert not list(output_dir.parent.glob(f".{output_dir.name}.tmp-*"))
    return str(raised.value)


def test_other_base_model_rejected(workspace, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=1)
    message = run_main_expecting(ValueError, [str(workspace["inits"]["rlpo"]), "--model", str(other)], tmp_path / "out")
    assert str(other) in message
    assert "--model" in message


def test_adapter_shape_mismatch_rejected(workspace, tmp_path):
    other = save_tiny_model(tmp_path / "wide", hidden_size=32)
    adapter = tmp_path / "adapter"
    shutil.copytree(workspace["inits"]["rlpo"], adapter)
    metadata = json.loads((adapter / "init_metadata.json").read_text())
    metadata["model"] = str(other)
    (adapter / "init_metadata.json").write_text(json.dumps(metadata))
    message = run_main_expecting(ValueError, [str(adapter)], tmp_path / "out")
    assert "does not fit base model" in message
    assert "model.layers.0.self_attn.q_proj" in message


def test_residual_mismatch_rejected(workspace, tmp_path):
    run = tmp_path / "pissa"
    shutil.copytree(workspace["inits"]["pissa"], run)
    residual_path = run / "base_model" / "model.safetensors"
    tensors = load_file(residual_path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros_like(tensors["model.layers.0.self_attn.q_proj.weight"])
    save_file(tensors, residual_path, metadata={"format": "pt"})
    message = run_main_expecting(ValueError, [str(run), "--model", str(workspace["base"]), *ANALYZED], tmp_path / "out")
    assert "another base model" in message


def test_missing_layer_lists_valid(workspace, tmp_path):
    message = run_main_expecting(ValueError, [str(workspace["inits"]["rlpo"]), "--layers", "0,9"], tmp_path / "out")
    assert "Layer 9 does not exist" in message
    assert "0..3" in message


def test_missing_module_lists_valid(workspace, tmp_path):
    message = run_main_expecting(ValueError, [str(workspace["inits"]["rlpo"]), "--modules", "q_proj,qkv_proj"], tmp_path / "out")
    assert "'qkv_proj' does not exist" in message
    assert "k_proj" in message


def test_unadapted_modules_rejected(workspace, tmp_path):
    message = run_main_expecting(ValueError, [str(workspace["inits"]["rlpo"]), "--modules", "k_proj"], tmp_path / "out")
    assert "adapts none of the analyzed modules" in message


def test_run_without_weights_rejected(workspace, tmp_path):
    empty_run = tmp_path / "crashed-run"
    empty_run.mkdir()
    (empty_run / "summary.json").write_text("{}")
    message = run_main_expecting(FileNotFoundError, [str(workspace["inits"]["rlpo"]), str(empty_run)], tmp_path / "out")
    assert str(empty_run) in message
    assert "contains no weights" in message


def test_full_ft_adapter_rejected(workspace, tmp_path):
    message = run_main_expecting(ValueError, [str(workspace["inits"]["rlpo"]), "--full-ft", str(workspace["inits"]["rlmo"])], tmp_path / "out")
    assert "--full-ft" in message


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_cli_with_kl(workspace, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {n} + 3?", "answer": str(n + 3)}) + "\n" for n in range(10, 16)))
    output_dir = tmp_path / "cli"
    command = [sys.executable, str(REPOSITORY / "analyze_svd.py"), str(workspace["inits"]["rlpo"]), str(workspace["trained"]["pissa-seed0"])]
    command += ["--layers", "-1", "--modules", "o_proj", "--kl", "--kl-data", str(prompts), "--kl-prompts", "4", "--kl-max-new-tokens", "8"]
    command += ["--output-dir", str(output_dir)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((output_dir / "analysis.json").read_text())
    assert result["model"] == str(workspace["base"])  # read from the runs' init_metadata.json
    assert [layer["name"] for layer in result["layers"]] == ["model.layers.3.self_attn.o_proj"]
    assert result["kl"]["RLPO seed 0"]["mean_token_kl"] == 0.0  # an initial adapter is its own initial policy
    assert result["kl"]["PiSSA seed 0"]["mean_token_kl"] > 0.0
    assert result["kl"]["PiSSA seed 0"]["num_tokens"] > 0
    assert (output_dir / "kl.png").stat().st_size > 10_000
    assert (output_dir / "dynamics.png").stat().st_size > 10_000


def test_real_grpo_run_read(workspace, tmp_path):
    # A random model earns reward 0, so GRPO's advantages and the update stay 0; this checks the layout and the logs.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {n} + 3?", "answer": str(n + 3)}) + "\n" for n in range(10, 18)))
    run_dir = tmp_path / "pissa-seed0"
    command = [sys.executable, str(REPOSITORY / "train_grpo.py"), "--init", "pissa", "--model", str(workspace["base"]), "--dataset", str(prompts)]
    command += ["--test_dataset", str(prompts), "--test_max_problems", "4", "--test_max_new_tokens", "4", "--max_steps", "2", "--logging_steps", "1"]
    command += ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4", "--rank", str(RANK), "--alpha", str(ALPHA)]
    command += ["--target_modules", MODULES, "--svd", "exact", "--output_dir", str(run_dir)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPOSITORY)
    assert completed.returncode == 0, completed.stderr[-3000:]

    run = analyze_svd.find_run(run_dir)
    assert run.weights_dir == run_dir / "adapter"
    assert run.init_dir == run_dir / "init"
    assert (run.method, run.seed) == ("pissa", 0)
    output_dir = tmp_path / "analysis"
    result = analyze_svd.main([str(run_dir), "--layers", "0", "--modules", "q_proj", "--output-dir", str(output_dir)])
    metrics = result["layers"][0]["runs"]["PiSSA seed 0"]
    assert metrics["residual_reconstruction_error"] < 1e-6  # the residual base is read from init/base_model
    assert metrics["similarity_top_at_r"] == pytest.approx(1.0, abs=1e-5)
    for metric in ("reward", "entropy", "completions/mean_length", "grad_norm"):
        assert result["dynamics"]["pissa"][metric]["steps"] == [1, 2], metric
    assert (output_dir / "dynamics.png").stat().st_size > 10_000


def test_adapter_without_init_folder(workspace, tmp_path):
    # A trained non-residual adapter copied without its init/ folder starts from B_0 = 0, so dW = s B A.
    adapter = tmp_path / "adapter"
    shutil.copytree(workspace["trained"]["rlpo-seed0"] / "adapter", adapter)
    run = analyze_svd.find_run(adapter)
    assert run.init_dir == adapter
    pretrained = analyze_svd.SafetensorsFolder(workspace["base"])
    targets = analyze_svd.select_targets(pretrained, "2", "gate_proj")
    analyze_svd.attach_weights(run, targets, str(workspace["base"]), pretrained)
    W = pretrained.get(f"{targets[0].name}.weight", "cpu", torch.float64)
    update, _ = analyze_svd.read_update(run, targets[0], W, torch.float64)
    expected = adapter_updates(workspace["trained"]["rlpo-seed0"])[targets[0].name]
    assert torch.allclose(update.dW, expected, atol=1e-10)
