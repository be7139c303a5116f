"""colab.ipynb executed top to bottom, the accelerate configs, and train_grpo.py in two processes (all on the CPU)."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from nbclient import NotebookClient
from transformers.integrations import deepspeed as hf_deepspeed
from trl import TrlParser
from trl.scripts.vllm_serve import ScriptArguments as VLLMServeArguments

import train_grpo
from init_lora import initialize_adapter, load_base_model, load_policy

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DIGEST_LINE = re.compile(r"Process (\d+) of (\d+): initial adapter sha256 ([0-9a-f]{64})")


# ----------------------------------------------------------------------------------------------
# accelerate config files
# ----------------------------------------------------------------------------------------------


def launch_environment(config_name: str, num_processes: int = 4) -> dict:
    """Return the environment `accelerate launch --config_file configs/NAME.yaml` gives its processes."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / config_name), "--num_processes", str(num_processes), "train_grpo.py"])
    # _validate_launch_command is private in accelerate 1.16. It merges the config file into the flags.
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, environment = prepare_deepspeed_cmd_env(args)
    else:
        environment = prepare_multi_gpu_env(args)
    return environment


@pytest.mark.parametrize(
    ("name", "distributed_type"),
    [("cpu_2proc.yaml", "MULTI_GPU"), ("ddp.yaml", "MULTI_GPU"), ("zero2.yaml", "DEEPSPEED"), ("zero3.yaml", "DEEPSPEED"), ("fsdp.yaml", "FSDP")],
)
def test_config_loads(name, distributed_type):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    config = load_config_from_file(str(CONFIGS / name))
    assert raw["distributed_type"] == distributed_type
    assert config.distributed_type.value == distributed_type
    assert config.num_machines == 1


def test_zero2_environment():
    environment = launch_environment("zero2.yaml")
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # DeepSpeed takes these from train_grpo.py's --gradient_accumulation_steps and --max_grad_norm.
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in environment
    assert "ACCELERATE_GRADIENT_CLIPPING" not in environment


def test_zero3_environment():
    environment = launch_environment("zero3.yaml")
    assert environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert environment["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
    assert environment["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in environment


def test_fsdp_environment():
    environment = launch_environment("fsdp.yaml")
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    assert environment["FSDP_VERSION"] == "2"
    # transformers reads this variable. With true, every process but the first would initialize from unloaded weights.
    assert environment["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    assert environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"


def test_ddp_environment():
    environment = launch_environment("ddp.yaml", num_processes=8)
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_USE_DEEPSPEED" not in environment
    assert "ACCELERATE_USE_FSDP" not in environment


# ----------------------------------------------------------------------------------------------
# The commands in README.md
# ----------------------------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """Return the shell commands of the README's 'Several GPUs and Colab' section, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Several GPUs and Colab", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line.rstrip("&").strip()))
    return commands


def without_environment(words: list[str]) -> list[str]:
    """Drop leading VARIABLE=value words."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    return words


def test_readme_training_commands_parse():
    commands = [without_environment(words) for words in readme_commands()]
    training = [words for words in commands if "train_grpo.py" in words]
    assert len(training) >= 6
    for words in training:
        script = words.index("train_grpo.py")
        if words[:2] == ["accelerate", "launch"]:
            launch_args = launch_command_parser().parse_args([*words[2:script], "train_grpo.py"])
            if launch_args.config_file:
                assert (ROOT / launch_args.config_file).is_file(), launch_args.config_file
        script_args, training_args = train_grpo.parse_arguments(words[script + 1 :])
        assert script_args.init in train_grpo.INITS


def test_readme_vllm_serve_commands_parse():
    servers = [words for words in map(without_environment, readme_commands()) if words[:2] == ["trl", "vllm-serve"]]
    assert servers
    for words in servers:
        (arguments,) = TrlParser((VLLMServeArguments,)).parse_args_into_dataclasses(words[2:])
        assert arguments.model


def test_paper_preset_keeps_1024_completions():
    for num_processes in (1, 4, 8):
        accumulation = 64 // num_processes
        _, training_args = train_grpo.parse_arguments(["--preset", "paper", "--gradient_accumulation_steps", str(accumulation)])
        assert training_args.per_device_train_batch_size * accumulation * num_processes == 1024


# ----------------------------------------------------------------------------------------------
# Identical initialization on every process
# ----------------------------------------------------------------------------------------------


def test_adapter_digest_tracks_factors():
    model, _ = load_base_model(str(train_grpo.DEFAULT_MODEL_DIR))
    assert train_grpo.adapter_digest(model) is None
    policy, _ = initialize_adapter(model, "rlpo", rank=4, alpha=8.0)
    first = train_grpo.adapter_digest(policy)
    assert first == train_grpo.adapter_digest(policy)
    lora_B = next(parameter for name, parameter in policy.named_parameters() if ".lora_B." in name)
    with torch.no_grad():
        lora_B[0, 0] = 1e-6
    assert train_grpo.adapter_digest(policy) != first


class ZeroThreeConfig:
    """Stand-in for transformers' HfDeepSpeedConfig with ZeRO stage 3 (DeepSpeed is not installed here)."""

    def is_zero3(self):
        return True


def test_zero3_loading_switch(monkeypatch):
    config = ZeroThreeConfig()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(config))
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    with train_grpo.full_weights_on_every_process():
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()
    assert hf_deepspeed.is_deepspeed_zero3_enabled()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now, for the process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("launch") / "rlpo"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(free_port())]
    train = ["--use_cpu", "true", "--init", "rlpo", "--max_steps", "2", "--test_max_problems", "8", "--save_strategy", "no", "--output_dir", str(output_dir)]
    command = [*launch, "train_grpo.py", *train]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir, result


def test_two_processes_same_initial_adapter(two_process_run):
    output_dir, result = two_process_run
    digests = {int(process): digest for process, total, digest in DIGEST_LINE.findall(result.stderr) if total == "2"}
    assert set(digests) == {0, 1}
    assert digests[0] == digests[1]
    saved, _ = load_policy(None, output_dir / "init")
    assert train_grpo.adapter_digest(saved) == digests[0]


def test_two_processes_one_writer(two_process_run):
    output_dir, result = two_process_run
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["completions_per_step"] == 128
    assert summary["steps"] == 2
    assert summary["num_test_problems"] == 8
    assert result.stdout.count("held-out accuracy") == 1
    assert (output_dir / "adapter" / "adapter_model.safetensors").exists()
    assert not [path.name for path in output_dir.iterdir() if path.name.startswith(".")]


def test_two_processes_split_evaluation(two_process_run):
    output_dir, _ = two_process_run
    for name in ("eval_before.jsonl", "eval_after.jsonl"):
        records = [json.loads(line) for line in (output_dir / name).read_text().splitlines()]
        assert [record["problem_index"] for record in records] == list(range(8)), name


# ----------------------------------------------------------------------------------------------
# colab.ipynb
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executed_notebook(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("colab")
    overrides = {
        "RLPO_NOTEBOOK_MAX_STEPS": "2",
        "RLPO_NOTEBOOK_TEST_PROBLEMS": "16",
        "RLPO_NOTEBOOK_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)  # the kernel inherits this process's environment
    try:
        notebook = nbformat.read(ROOT / "colab.ipynb", as_version=4)
        # allow_errors runs every cell, so each test below reports its own failure.
        client = NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(ROOT)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook, run_dir


def notebook_text(notebook) -> str:
    """Return every stream output of the executed notebook joined."""
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs if output.output_type == "stream")


def test_notebook_has_no_error_cells(executed_notebook):
    notebook, _ = executed_notebook
    errors = [f"{output.ename}: {output.evalue}" for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs if output.output_type == "error"]
    assert errors == []


def test_notebook_prints_summary(executed_notebook):
    notebook, _ = executed_notebook
    text = notebook_text(notebook)
    assert "pip install is skipped" in text
    assert "SUMMARY" in text
    assert "init rlpo" in text
    assert "2 steps" in text
    assert "held-out accuracy (train_grpo.py)" in text
    assert "on 16 problems" in text
    orthonormality = re.search(r"max \|A A\^T - I\| = (\S+)", text)
    assert orthonormality is not None
    assert float(orthonormality.group(1)) < 1e-5


def test_notebook_shows_figures(executed_notebook):
    notebook, run_dir = executed_notebook
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs if "image/png" in output.get("data", {})]
    written = sorted(path.name for path in (run_dir / "analysis").glob("*.png"))
    assert len(images) == len(written)
    assert "energy_right.png" in written
    assert "similarity_summary.png" in written


def test_notebook_gpu_settings():
    notebook = nbformat.read(ROOT / "colab.ipynb", as_version=4)
    switch = [cell.source for cell in notebook.cells if cell.cell_type == "code" and "GPU SWITCH" in cell.source]
    assert len(switch) == 1
    namespace = {}
    exec(switch[0], namespace)
    assert namespace["GPU"] is None
    assert set(namespace["GPU_SETTINGS"]) == {"T4", "L4", "A100"}
    assert namespace["GPU_SETTINGS"]["T4"]["bf16"] is False
    for gpu, settings in namespace["GPU_SETTINGS"].items():
        flags = [item for name, value in settings.items() for item in (f"--{name}", str(value).lower() if isinstance(value, bool) else str(value))]
        _, training_args = train_grpo.parse_arguments(["--init", "rlpo", *flags])
        completions = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        assert completions % training_args.num_generations == 0, gpu
