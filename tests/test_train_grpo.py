"""train_grpo.py run as a subprocess on the embedded default (real TRL, PEFT and math judge)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_grpo
from init_lora import load_policy

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--max_steps", "3", "--save_steps", "2", "--test_max_problems", "32", "--logging_steps", "1"]


def run_script(*args, check=True):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_grpo.py"), *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def rlpo_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs") / "rlpo"
    result = run_script("--init", "rlpo", *QUICK, "--output_dir", str(output_dir))
    return output_dir, result


def test_rlpo_run_writes_summary(rlpo_run):
    output_dir, result = rlpo_run
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["init"] == "rlpo"
    assert summary["steps"] == 3
    assert 0.0 <= summary["accuracy_before"] <= 1.0
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["num_test_problems"] == 32
    assert summary["seconds_per_step"] > 0
    assert summary["train_seconds"] > 0
    assert Path(summary["adapter_path"]) == output_dir / "adapter"
    assert "held-out accuracy" in result.stdout


def test_rlpo_run_logs_judge_metrics(rlpo_run):
    output_dir, _ = rlpo_run
    history = json.loads((output_dir / "log_history.json").read_text())["log_history"]
    steps = [entry for entry in history if "reward" in entry]
    assert len(steps) == 3
    for key in ("accuracy/correct", "accuracy/no_answer", "accuracy/timeout", "accuracy/zero_std_groups", "frac_reward_zero_std"):
        assert key in steps[0], key
    # The embedded model answers part of the problems, so some completions are right.
    assert sum(entry["accuracy/correct"] for entry in steps) > 0


def test_rlpo_run_saves_init_and_trained_adapter(rlpo_run):
    output_dir, _ = rlpo_run
    init = load_file(output_dir / "init" / "adapter_model.safetensors")
    trained = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    assert set(init) == set(trained)
    b_keys = [key for key in init if "lora_B" in key]
    assert b_keys and all(torch.count_nonzero(init[key]) == 0 for key in b_keys)
    assert any(torch.count_nonzero(trained[key]) > 0 for key in b_keys)
    metadata = json.loads((output_dir / "init" / "init_metadata.json").read_text())
    assert metadata["method"] == "rlpo"
    assert metadata["rank"] == 16
    assert (output_dir / "checkpoint-2").is_dir()
    assert (output_dir / "eval_before.jsonl").exists()
    assert (output_dir / "eval_after.jsonl").exists()


def test_trained_adapter_loads_trainable(rlpo_run):
    output_dir, _ = rlpo_run
    policy, tokenizer = load_policy(None, output_dir / "adapter", trainable=True)
    trainable = [name for name, parameter in policy.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert tokenizer.decode(tokenizer("What is 3 + 4? \\boxed{7}")["input_ids"]) == "What is 3 + 4? \\boxed{7}"


def test_pissa_run_uses_residual_base(tmp_path):
    output_dir = tmp_path / "pissa"
    run_script("--init", "pissa", "--max_steps", "1", "--test_max_problems", "16", "--save_strategy", "no", "--output_dir", str(output_dir))
    metadata = json.loads((output_dir / "adapter" / "init_metadata.json").read_text())
    assert metadata["residual_base"] == "../init/base_model"
    assert (output_dir / "init" / "base_model" / "model.safetensors").exists()
    policy, _ = load_policy(None, output_dir / "adapter")
    base_weight = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    residual = load_file(output_dir / "init" / "base_model" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(base_weight.detach(), residual)


def test_full_run_saves_model(tmp_path):
    output_dir = tmp_path / "full"
    run_script("--init", "full", "--max_steps", "1", "--test_max_problems", "16", "--save_strategy", "no", "--output_dir", str(output_dir))
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["init"] == "full"
    assert (output_dir / "model" / "model.safetensors").exists()
    assert not (output_dir / "init").exists()


def test_yaml_config_and_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 3e-5, "max_steps": 7, "init": "rlmo", "rank": 8}))
    script_args, training_args = train_grpo.parse_arguments(["--config", str(config), "--max_steps", "9"])
    assert training_args.learning_rate == 3e-5
    assert training_args.max_steps == 9  # the flag wins over the YAML file
    assert script_args.init == "rlmo"
    assert script_args.rank == 8
    assert training_args.output_dir == "runs/rlmo-seed0"


def test_paper_preset_values():
    script_args, training_args = train_grpo.parse_arguments(["--preset", "paper", "--learning_rate", "2e-5"])
    assert script_args.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert (script_args.rank, script_args.alpha, script_args.target_modules) == (16, 32.0, "all-linear")
    assert training_args.learning_rate == 2e-5
    assert training_args.epsilon == 0.2
    assert training_args.epsilon_high == 0.28
    assert training_args.loss_type == "dapo"
    assert training_args.beta == 0.0
    assert training_args.num_generations == 8
    assert training_args.weight_decay == 0.1
    assert training_args.use_vllm is True
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 128 * 8


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init", "svd"], "Unknown --init 'svd'"),
        (["--init", "rlpo", "--rank", "200"], "--rank 200 is larger than min(out, in)"),
        (["--init", "rlpo", "--target_modules", "nonexistent_proj"], "matches no module"),
        (["--init", "rlpo", "--model", "no/such/model-folder"], "does not exist"),
        (["--init", "rlpo", "--answer_column", "solution"], "answer column 'solution' is missing"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, flags, message):
    output_dir = tmp_path / "run"
    result = run_script(*flags, "--output_dir", str(output_dir), check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not output_dir.exists()


def test_finished_run_not_overwritten(rlpo_run):
    output_dir, _ = rlpo_run
    result = run_script("--init", "rlpo", "--output_dir", str(output_dir), check=False)
    assert result.returncode != 0
    assert "--overwrite" in result.stderr
    assert (output_dir / "summary.json").exists()


@pytest.mark.parametrize("method", ["rlpo", "pissa", "full"])
def test_kl_callback_zero_at_init(method):
    from transformers import TrainerControl, TrainerState

    from build_default import DEFAULT_DATA_FILES, DEFAULT_MODEL_DIR
    from eval_math import load_problems
    from init_lora import initialize_adapter, load_base_model

    model, tokenizer = load_base_model(DEFAULT_MODEL_DIR)
    if method != "full":
        model, _ = initialize_adapter(model, method, rank=4, alpha=8.0)
    model.train()
    problems, _ = load_problems(DEFAULT_DATA_FILES["test"], "test", "prompt", "answer", limit=8)
    callback = train_grpo.InitialPolicyKL(model, tokenizer, problems, every=2, max_new_tokens=16, temperature=1.0, batch_size=8, seed=0)
    state, control = TrainerState(), TrainerControl()

    state.global_step = 1  # not a multiple of every: nothing logged
    callback.on_step_end(None, state, control, model=model)
    assert state.log_history == []

    state.global_step = 2
    callback.on_step_end(None, state, control, model=model)
    assert state.log_history[-1]["step"] == 2
    assert abs(state.log_history[-1]["kl_to_init"]) < 1e-5  # the initial policy itself

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or (method == "full" and "mlp" in name):
                parameter.add_(0.05 * torch.randn_like(parameter))
    state.global_step = 4
    callback.on_step_end(None, state, control, model=model)
    assert state.log_history[-1]["kl_to_init"] > 1e-4
    assert model.training  # restored after sampling


def test_kl_steps_negative_rejected(tmp_path):
    result = run_script("--init", "rlpo", "--kl_steps", "-1", "--output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode != 0
    assert "--kl_steps -1" in result.stderr
    assert not (tmp_path / "out").exists()
