"""Interrupted runs, atomic outputs and rejected inputs of train_grpo.py and init_lora.py (real TRL, PEFT, judge)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import eval_math
import grpo_data
import init_lora
import train_grpo
from build_default import DEFAULT_DATA_FILES

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
RESUMABLE = ["--init", "rlpo", "--max_steps", "8", "--save_steps", "2", "--test_max_problems", "16", "--logging_steps", "1"]
ONE_STEP = ["--init", "rlpo", "--max_steps", "1", "--save_strategy", "no", "--test_max_problems", "8"]


def run_script(*args, check=True):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_grpo.py"), *args], cwd=ROOT, env=ENVIRONMENT, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def adapter_tensors(directory: Path) -> dict:
    return load_file(directory / "adapter_model.safetensors")


def folder_bytes(directory: Path) -> dict:
    return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def hidden_leftovers(directory: Path) -> list:
    return [path.name for path in directory.iterdir() if ".tmp" in path.name or ".old-" in path.name]


def reward_steps(output_dir: Path) -> list:
    history = json.loads((output_dir / "log_history.json").read_text())["log_history"]
    return [entry["step"] for entry in history if "reward" in entry]


def write_jsonl(path: Path, rows: list):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def default_rows(count: int) -> list:
    lines = Path(DEFAULT_DATA_FILES["train"]).read_text().splitlines()
    return [json.loads(line) for line in lines[:count]]


LONG_PROMPT = "What is " + "1 + " * 100 + "1?"  # 411 characters: over 256 - 16 tokens of the embedded model


# ----------------------------------------------------------------------------------------------
# Resuming: a run killed at any point continues to the same adapter as an uninterrupted run
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_script(*RESUMABLE, "--output_dir", str(output_dir))
    return output_dir


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Kill a run with SIGKILL once checkpoint-4 appears, fake a half-saved checkpoint-6, then rerun the same command."""
    base = tmp_path_factory.mktemp("killed")
    output_dir = base / "run"
    with (base / "killed.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train_grpo.py"), *RESUMABLE, "--output_dir", str(output_dir)], cwd=ROOT, env=ENVIRONMENT, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 300
        while not (output_dir / "checkpoint-4").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, (base / "killed.log").read_text()[-3000:]

    # The state a kill during Trainer._save_checkpoint leaves: weights written, trainer_state.json not yet.
    half_saved = output_dir / "checkpoint-6"
    half_saved.mkdir(exist_ok=True)
    shutil.copy(output_dir / "checkpoint-2" / "adapter_model.safetensors", half_saved)
    init_before = folder_bytes(output_dir / "init")

    result = run_script(*RESUMABLE, "--output_dir", str(output_dir))
    return output_dir, result, init_before


def test_resume_reaches_max_steps(killed_and_resumed):
    output_dir, _, _ = killed_and_resumed
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["resumed_from"] in (str(output_dir / "checkpoint-2"), str(output_dir / "checkpoint-4"))
    assert reward_steps(output_dir) == list(range(1, 9))
    assert hidden_leftovers(output_dir) == []


def test_resume_skips_half_saved_checkpoint(killed_and_resumed):
    output_dir, result, _ = killed_and_resumed
    assert f"Skipping {output_dir / 'checkpoint-6'}" in result.stderr
    assert json.loads((output_dir / "summary.json").read_text())["resumed_from"] != str(output_dir / "checkpoint-6")
    assert (output_dir / "checkpoint-6" / "trainer_state.json").exists()  # saved again, completely, at step 6


def test_resume_keeps_init_bytes(killed_and_resumed):
    output_dir, _, init_before = killed_and_resumed
    assert folder_bytes(output_dir / "init") == init_before


def test_resume_matches_uninterrupted(killed_and_resumed, uninterrupted):
    # transformers restores the optimizer, scheduler and RNG states and skips the batches already
    # used, and TRL's sampler is seeded. On CPU with one thread the adapters are bitwise identical.
    output_dir, _, _ = killed_and_resumed
    resumed = adapter_tensors(output_dir / "adapter")
    expected = adapter_tensors(uninterrupted / "adapter")
    assert set(resumed) == set(expected)
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_resume_from_explicit_checkpoint(tmp_path, uninterrupted):
    output_dir = tmp_path / "continued"
    checkpoint = uninterrupted / "checkpoint-6"
    run_script(*RESUMABLE, "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(output_dir))
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(checkpoint)
    assert summary["steps"] == 8
    resumed = adapter_tensors(output_dir / "adapter")
    expected = adapter_tensors(uninterrupted / "adapter")
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_resume_after_last_checkpoint(tmp_path, uninterrupted):
    # Killed after checkpoint-8 (= max_steps), while saving or evaluating: no step is trained again.
    output_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, output_dir)
    (output_dir / "summary.json").unlink()
    (output_dir / "adapter").rename(output_dir / ".adapter.tmp-999999999")
    run_script(*RESUMABLE, "--output_dir", str(output_dir))
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["resumed_from"] == str(output_dir / "checkpoint-8")
    assert not (output_dir / "checkpoint-9").exists()
    assert hidden_leftovers(output_dir) == []
    resumed = adapter_tensors(output_dir / "adapter")
    expected = adapter_tensors(uninterrupted / "adapter")
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_loaded_adapter_trainable_only_on_request(uninterrupted):
    policy, _ = init_lora.load_policy(None, uninterrupted / "init", trainable=True)
    trainable = [name for name, parameter in policy.named_parameters() if parameter.requires_grad]
    assert trainable
    assert all("lora_" in name for name in trainable)
    frozen, _ = init_lora.load_policy(None, uninterrupted / "init")
    assert not any(parameter.requires_grad for parameter in frozen.parameters())  # PEFT's default


def test_last_checkpoint_needs_trainer_state(tmp_path):
    for name, state in (("checkpoint-2", "{}"), ("checkpoint-10", "{}"), ("checkpoint-12", '{"global_st'), ("checkpoint-14", None), ("checkpoint-best", "{}")):
        (tmp_path / name).mkdir()
        if state is not None:
            (tmp_path / name / "trainer_state.json").write_text(state)
    assert train_grpo.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def parse(output_dir: Path, *flags):
    return train_grpo.parse_arguments(["--output_dir", str(output_dir), *flags])


def test_output_dir_interrupted_before_checkpoint_rejected(tmp_path):
    (tmp_path / "init").mkdir()
    (tmp_path / "checkpoint-2").mkdir()  # half saved
    with pytest.raises(FileExistsError, match="no completely saved checkpoint"):
        train_grpo.check_output_dir(tmp_path, *parse(tmp_path))


def test_output_dir_overwrite_defers_delete(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    assert train_grpo.check_output_dir(tmp_path, *parse(tmp_path, "--overwrite")) is None
    assert (tmp_path / "summary.json").exists()


def test_explicit_half_saved_checkpoint_rejected(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ValueError, match="not completely saved"):
        train_grpo.check_output_dir(tmp_path, *parse(tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-4")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_grpo.check_output_dir(tmp_path, *parse(tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")))
    with pytest.raises(FileNotFoundError, match="no completely saved checkpoint"):
        train_grpo.check_output_dir(tmp_path, *parse(tmp_path, "--resume_from_checkpoint", "true"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init", "rlpo", "--rank", "8"], "started with --rank 16"),
        (["--init", "rlmo"], "started with --init 'rlpo'"),
        (["--init", "full"], "written by a LoRA run"),
    ],
)
def test_resume_with_other_flags_rejected(uninterrupted, flags, message):
    script_args, _ = parse(uninterrupted, *flags)
    with pytest.raises(ValueError, match=message):
        train_grpo.check_resume_matches(str(uninterrupted / "checkpoint-8"), uninterrupted / "init", script_args)


def test_resume_with_other_model_rejected(uninterrupted, tmp_path):
    other_model = tmp_path / "other-model"
    other_model.mkdir()
    with pytest.raises(ValueError, match="but --model is"):
        init_lora.load_policy(str(other_model), uninterrupted / "init", trainable=True)


# ----------------------------------------------------------------------------------------------
# Atomic outputs: a crash while saving leaves the old result or nothing, and no temporary folder
# ----------------------------------------------------------------------------------------------


def crash_after_partial_write(*args):
    """Write part of a model into the folder passed last, then fail as a full disk would."""
    directory = args[-1]
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "model.safetensors").write_bytes(b"partial")
    raise OSError("No space left on device")


def test_init_lora_crash_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(init_lora, "save_residual_base", crash_after_partial_write)
    output_dir = tmp_path / "init-pissa"
    with pytest.raises(OSError, match="No space left"):
        init_lora.main(["--init", "pissa", "--rank", "4", "--output-dir", str(output_dir)])
    assert not output_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_init_lora_crash_keeps_old_result(tmp_path, monkeypatch):
    output_dir = tmp_path / "init-pissa"
    output_dir.mkdir()
    (output_dir / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(init_lora, "save_residual_base", crash_after_partial_write)
    with pytest.raises(OSError, match="No space left"):
        init_lora.main(["--init", "pissa", "--rank", "4", "--output-dir", str(output_dir), "--overwrite"])
    assert [path.name for path in tmp_path.iterdir()] == ["init-pissa"]
    assert [path.name for path in output_dir.iterdir()] == ["adapter_config.json"]


def test_init_lora_nonempty_output_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        init_lora.main(["--init", "rlpo", "--output-dir", str(tmp_path)])
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


class CrashingTrainer:
    """A GRPOTrainer double whose save_model fails after writing part of the adapter."""

    def save_model(self, directory):
        crash_after_partial_write(directory)


@pytest.mark.parametrize("old_result", [False, True])
def test_save_trained_crash_leaves_old_or_nothing(tmp_path, old_result):
    if old_result:
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"old")
    script_args = SimpleNamespace(init="rlpo")
    with pytest.raises(OSError, match="No space left"):
        train_grpo.save_trained(CrashingTrainer(), script_args, tmp_path, None, None, PartialState())
    assert hidden_leftovers(tmp_path) == []
    if old_result:
        assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"old"
    else:
        assert not (tmp_path / "adapter").exists()


def test_eval_jsonl_crash_keeps_old_file(tmp_path):
    path = tmp_path / "eval_after.jsonl"
    path.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        eval_math.write_jsonl([{"problem_index": 0}, {"problem_index": 1, "completion": object()}], path)
    assert path.read_text() == '{"old": true}\n'
    assert [item.name for item in tmp_path.iterdir()] == ["eval_after.jsonl"]


def test_stale_temporaries_cleaned(tmp_path):
    dead_pid = 999999999
    (tmp_path / f".adapter.tmp-{dead_pid}").mkdir()
    (tmp_path / f".init.old-{dead_pid}").mkdir()
    (tmp_path / f".init.old-{dead_pid}" / "adapter_config.json").write_text("{}")
    live = tmp_path / f".adapter.tmp-{os.getppid()}"
    live.mkdir()
    init_lora.remove_stale_temporaries(tmp_path / "adapter")
    init_lora.remove_stale_temporaries(tmp_path / "init")
    assert not (tmp_path / f".adapter.tmp-{dead_pid}").exists()
    assert live.exists()  # a save in progress in a running process
    assert (tmp_path / "init" / "adapter_config.json").exists()  # moved aside, then killed: restored


# ----------------------------------------------------------------------------------------------
# Model layouts: quantized bases
# ----------------------------------------------------------------------------------------------


def tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


def test_int8_weight_rejected():
    model = tiny_qwen2()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.randint(-128, 127, layer.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="q_proj' is a quantized layer.*torch.int8"):
        init_lora.initialize_adapter(model, "rlpo", rank=8, alpha=16.0)


@pytest.mark.parametrize("class_name", init_lora.QUANTIZED_LINEAR_CLASSES)
def test_bitsandbytes_layer_rejected(class_name):
    # bitsandbytes is not installed here, so a torch.nn.Linear subclass of the same name replaces its layer.
    model = tiny_qwen2()
    old = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = type(class_name, (torch.nn.Linear,), {})(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match=f"up_proj' is a quantized layer \\({class_name}"):
        init_lora.initialize_adapter(model, "pissa", rank=8, alpha=16.0)


# ----------------------------------------------------------------------------------------------
# Data: rejected before anything is written, or dropped with a logged count
# ----------------------------------------------------------------------------------------------


def bad_data_cases(tmp_path: Path) -> list:
    rows = default_rows(40)
    return [
        (["--dataset", str(write_jsonl(tmp_path / "empty.jsonl", []))], "is empty"),
        (["--answer_column", "solution"], "answer column 'solution' is missing"),
        (["--dataset", str(write_jsonl(tmp_path / "three.jsonl", rows[:3]))], "has 3 usable problems, fewer than the 8 distinct prompts"),
        (["--dataset", str(write_jsonl(tmp_path / "long.jsonl", [{"prompt": LONG_PROMPT, "answer": "101"}] * 8))], "All 8 training prompts are longer than 240 tokens"),
        (["--dataset", str(write_jsonl(tmp_path / "prose.jsonl", [{**row, "answer": "the answer is blue"} for row in rows]))], "cannot parse the gold answer of any of the 40 training"),
        (["--test_dataset", str(write_jsonl(tmp_path / "prose_test.jsonl", [{**row, "answer": "the answer is blue"} for row in rows[:8]]))], "any of the 8 held-out"),
        (["--dataset", str(write_jsonl(tmp_path / "messages.jsonl", [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows]))], "is a list of chat messages, but the tokenizer of --model has no chat template"),
        (["--max_completion_length", "256"], "--max_completion_length 256 leaves no room"),
        (["--test_max_new_tokens", "250"], "8 of 8 held-out prompts are longer than 6 tokens"),
    ]


def test_bad_data_rejected_before_writing(tmp_path):
    for index, (flags, message) in enumerate(bad_data_cases(tmp_path)):
        output_dir = tmp_path / f"run{index}"
        with pytest.raises(ValueError, match=message):
            train_grpo.main([*ONE_STEP, *flags, "--output_dir", str(output_dir)])
        assert not output_dir.exists(), flags


def test_context_unknown_skips_length_check(caplog):
    assert grpo_data.context_limit(SimpleNamespace(), 16, "--max_completion_length") is None
    assert "no max_position_embeddings" in caplog.text


def test_unknown_preset_rejected():
    with pytest.raises(SystemExit, match="Unknown --preset 'huge'"):
        train_grpo.parse_arguments(["--preset", "huge"])


def test_overwrite_after_bad_input_keeps_old_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="answer column 'solution' is missing"):
        train_grpo.main([*ONE_STEP, "--answer_column", "solution", "--overwrite", "--output_dir", str(tmp_path)])
    assert (tmp_path / "summary.json").exists()


def test_some_bad_problems_dropped(tmp_path):
    rows = default_rows(40)
    for index in range(0, 40, 4):
        rows[index] = {"prompt": LONG_PROMPT, "answer": "101"}
        rows[index + 1] = {**rows[index + 1], "answer": "the answer is blue"}
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    output_dir = tmp_path / "run"
    result = run_script(*ONE_STEP, "--dataset", str(data), "--output_dir", str(output_dir))
    assert "Dropping 10 of 40 training prompts that are longer than 240 tokens" in result.stderr
    assert "Dropping the 10 of 30 training problems whose gold answer math-verify cannot parse" in result.stderr
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == 1
