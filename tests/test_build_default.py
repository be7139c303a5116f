"""Tests for build_default.py: the committed default model and data, and short rebuilds."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import build_default
from build_default import DEFAULT_DATA_FILES, DEFAULT_MODEL_DIR

SCRIPT = Path(build_default.__file__).resolve()
SHORT_BUILD_STEPS = 20
SHORT_DROP_STEPS = 5
PROMPT_PATTERN = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def start_short_build(output_dir: Path, seed: int = 3) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT), "--output-dir", str(output_dir), "--seed", str(seed)]
    command += ["--max-steps", str(SHORT_BUILD_STEPS), "--carry-drop-steps", str(SHORT_DROP_STEPS)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def solve(prompt: str) -> str:
    """Recompute the answer of a prompt from its text, independently of build_default."""
    match = PROMPT_PATTERN.fullmatch(prompt)
    assert match is not None, f"unexpected prompt format: {prompt!r}"
    first, symbol, second = int(match.group(1)), match.group(2), int(match.group(3))
    return str({"+": first + second, "-": first - second, "*": first * second}[symbol])


@pytest.fixture(scope="module")
def short_builds(tmp_path_factory):
    """Run the same short build twice, concurrently, into separate folders."""
    root = tmp_path_factory.mktemp("short_builds")
    processes = [start_short_build(root / name) for name in ("first", "second")]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        results.append((process.returncode, stdout, stderr))
    return root, results


@pytest.fixture(scope="module")
def default_splits():
    return datasets.load_dataset("json", data_files=DEFAULT_DATA_FILES)


# ----------------------------------------------------------------------------------------------
# Committed default
# ----------------------------------------------------------------------------------------------


def test_default_model_loads_with_auto_class():
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    assert model.config.model_type == "qwen2"
    assert model.config.tie_word_embeddings
    assert model.dtype == torch.float32


def test_default_model_parameter_count():
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 0.9e6 < num_parameters < 1.2e6


def test_default_tokenizer_round_trip():
    loaded = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    built = build_default.build_tokenizer()
    text = "What is 37 + 45? \\boxed{82}  two  spaces\nand é"
    loaded_ids = loaded(text)["input_ids"]
    assert loaded_ids == built(text)["input_ids"]
    assert loaded.decode(loaded_ids) == text
    assert len(loaded_ids) == len(text.encode("utf-8"))


def test_default_tokenizer_special_tokens():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template is None


def test_default_model_accuracy_matches_build_info(default_splits):
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    build_info = json.loads((Path(DEFAULT_MODEL_DIR) / "build_info.json").read_text())
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the build's thread count, and much faster when other processes share the cores
    try:
        accuracy = build_default.greedy_accuracy(model, tokenizer, list(default_splits["test"]))
    finally:
        torch.set_num_threads(num_threads)
    # Another CPU may flip a near-tied argmax, so allow 5 of the 500 problems to differ.
    assert accuracy == pytest.approx(build_info["test_accuracy"], abs=0.01)
    assert accuracy >= 0.3
    assert accuracy <= 0.7


def test_default_data_columns(default_splits):
    assert set(default_splits) == {"train", "test"}
    for split in default_splits.values():
        assert split.column_names == ["prompt", "answer"]
    assert default_splits["test"].num_rows == 500
    assert default_splits["train"].num_rows >= 2000


def test_default_data_answers_correct(default_splits):
    for split in default_splits.values():
        for row in split:
            assert isinstance(row["answer"], str)
            assert row["answer"] == solve(row["prompt"]), row


def test_default_data_splits_disjoint(default_splits):
    train_prompts = set(default_splits["train"]["prompt"])
    test_prompts = set(default_splits["test"]["prompt"])
    assert len(train_prompts) == default_splits["train"].num_rows
    assert len(test_prompts) == default_splits["test"].num_rows
    assert not train_prompts & test_prompts


# ----------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_make_splits_disjoint(seed):
    splits = build_default.make_splits(seed)
    test_prompts = {problem["prompt"] for problem in splits["test"]}
    validation_prompts = {problem["prompt"] for problem in splits["validation"]}
    train_prompts = {problem["prompt"] for problem in splits["train"]}
    pretrain_prompts = set()
    for name in splits:
        if name.startswith("pretrain/"):
            pretrain_prompts |= {problem["prompt"] for problem in splits[name]}
    assert len(test_prompts) == 500
    assert len(validation_prompts) == 500
    assert not test_prompts & train_prompts
    assert not test_prompts & validation_prompts
    assert not test_prompts & pretrain_prompts
    assert not validation_prompts & pretrain_prompts


def test_make_splits_types_balanced():
    splits = build_default.make_splits(0)
    for name in ("test", "validation", "train"):
        counts = {}
        for problem in splits[name]:
            _, symbol, second = PROMPT_PATTERN.fullmatch(problem["prompt"]).groups()
            problem_type = (symbol, len(second))
            counts[problem_type] = counts.get(problem_type, 0) + 1
        assert len(set(counts.values())) == 1, (name, counts)
        assert len(counts) == 4, (name, counts)


def test_extract_boxed_cases():
    assert build_default.extract_boxed(" \\boxed{82}") == "82"
    assert build_default.extract_boxed(" \\boxed{82} \\boxed{7}") == "82"
    assert build_default.extract_boxed(" 82") is None
    assert build_default.extract_boxed(" \\boxed{82") is None


@pytest.mark.parametrize(
    ("prompt", "dropped"),
    [
        ("What is 37 + 45?", "72"),
        ("What is 95 + 7?", "92"),
        ("What is 32 - 5?", "37"),
        ("What is 31 + 5?", None),
        ("What is 36 - 4?", None),
        ("What is 12 * 3?", None),
    ],
)
def test_dropped_carry_answer_cases(prompt, dropped):
    assert build_default.dropped_carry_answer({"prompt": prompt}) == dropped


def test_build_rejects_nonempty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("existing")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_default.build_default(tmp_path, max_steps=1)
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_rejects_invalid_target():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--target-accuracy", "1.5", "--output-dir", "unused"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--target-accuracy" in result.stderr


# ----------------------------------------------------------------------------------------------
# Short builds as a subprocess
# ----------------------------------------------------------------------------------------------


def test_short_build_succeeds(short_builds):
    root, results = short_builds
    for returncode, _, stderr in results:
        assert returncode == 0, stderr[-3000:]
    assert sorted(path.name for path in root.iterdir()) == ["first", "second"]


def test_short_build_writes_loadable_model(short_builds):
    root, _ = short_builds
    model_dir = root / "first" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(["What is 37 + 45?", "What is 12 * 3?"], padding=True, return_tensors="pt")
    output_ids = model.generate(**encoded, max_new_tokens=4, do_sample=False)
    assert output_ids.shape[0] == 2
    assert encoded["input_ids"].shape[1] < output_ids.shape[1] <= encoded["input_ids"].shape[1] + 4

    build_info = json.loads((model_dir / "build_info.json").read_text())
    assert build_info["steps"] == SHORT_BUILD_STEPS
    assert build_info["carry_drop_steps"] == SHORT_DROP_STEPS
    assert build_info["seed"] == 3
    data_files = {name: str(root / "first" / "data" / f"{name}.jsonl") for name in ("train", "test")}
    splits = datasets.load_dataset("json", data_files=data_files)
    assert splits["test"].num_rows == 500


def test_short_build_same_seed_same_bytes(short_builds):
    root, _ = short_builds
    compared_files = ("model/model.safetensors", "model/tokenizer.json", "data/train.jsonl", "data/test.jsonl")
    for relative_path in compared_files:
        assert sha256(root / "first" / relative_path) == sha256(root / "second" / relative_path), relative_path
