"""Build the embedded default, a tiny arithmetic model and its data set, so every script runs offline.

The model is a causal LM in the Qwen2 architecture: hidden 128, 4 layers, 4 attention heads,
4 KV heads, intermediate 512, max positions 256, tied embeddings, float32, 1.08M parameters.
Its character-level tokenizer is a byte-level BPE with no merges, so each ASCII character is one
token and any UTF-8 text round-trips. It is trained in two phases, on prompt `What is 37 + 45?`
-> completion ` \\boxed{82}` + eos with the loss on the completion only:
1. Pretraining on correct answers, stopped at the first check where greedy accuracy on a
   validation set reaches `--target-accuracy`.
2. `--carry-drop-steps` more steps where, with probability `--carry-drop`, an example whose
   problem carries out of the units digit gets the answer without that carry or borrow
   (37 + 45 -> 72, 32 - 5 -> 37).
After phase 2 the model still samples the carried answer for part of those problems but greedy
decoding mostly drops it, so greedy accuracy falls (0.51 -> 0.396 with the defaults) while the
right answer remains in the sampling distribution. A verifier reward can then raise accuracy
within a few hundred GRPO steps, the case RLVR is used for: the right behavior is sampled but not
preferred. Without phase 2 (`--carry-drop 0`), the model's errors are specific to each problem
and 300 GRPO steps gained only 2-4 points.

The data set draws four problem types in equal shares: 2-digit + 1-digit, 2-digit - 1-digit,
2-digit + 2-digit and 2-digit * 1-digit, where 1-digit operands are 0-9. Each JSONL line is
`{"prompt": "What is 37 + 45?", "answer": "82"}`. The test split, the validation set and the
train split (RL prompts) share no problem. The pretraining set contains no test or validation
problem, but it does contain the train split.

Output:
    default/model/  config.json, model.safetensors, generation_config.json, tokenizer.json,
                    tokenizer_config.json, build_info.json (seed, steps, accuracies, versions)
    default/data/   train.jsonl (2400 RL prompts), test.jsonl (500 problems)

Load it like a hub model:
    AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    datasets.load_dataset("json", data_files=DEFAULT_DATA_FILES)

Rebuild the committed default on CPU. Seed 1 (the default) ends phase 1 at step 1400 with 48.0%
validation and 51.0% test greedy accuracy, and phase 2 brings test accuracy to 39.6% (validation
40.8%). The whole build took 352 s on 2 cores with one thread:
    python build_default.py --overwrite

The same seed and thread count on the same machine give byte-identical model and data files.
A 100-step build gave the same bytes with 1 and 2 threads, but other thread counts or CPUs
may not. Accuracy depends strongly on the seed: seed 0 only reached 28.4% validation (31.8%
test) by the 2000-step cap.
"""

import argparse
import json
import logging
import math
import operator
import os
import random
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_MODEL_DIR = str(DEFAULT_DIR / "model")
DEFAULT_DATA_FILES = {
    "train": str(DEFAULT_DIR / "data" / "train.jsonl"),
    "test": str(DEFAULT_DIR / "data" / "test.jsonl"),
}

# Problem types: name -> (operator symbol, first operands, second operands, function).
PROBLEM_TYPES = {
    "2d+1d": ("+", range(10, 100), range(0, 10), operator.add),
    "2d-1d": ("-", range(10, 100), range(0, 10), operator.sub),
    "2d+2d": ("+", range(10, 100), range(10, 100), operator.add),
    "2d*1d": ("*", range(10, 100), range(0, 10), operator.mul),
}
TEST_PER_TYPE = 125  # 500 test problems in all
VALIDATION_PER_TYPE = 125  # 500 validation problems, used only to decide when to stop pretraining
TRAIN_PER_TYPE = 600  # 2400 RL prompts; a 1-digit type has only 900 problems

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
MAX_NEW_TOKENS = 16  # completions are at most 11 tokens plus eos, e.g. " \boxed{198}"

# Pretraining hyperparameters: AdamW, linear warmup, then cosine decay to 0 at --max-steps.
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WARMUP_STEPS = 100  # runs shorter than 1000 steps warm up for a tenth of --max-steps instead
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
# Validation accuracy was under 12% at step 900 for seeds 0 and 1, so earlier checks waste time.
FIRST_CHECK_STEP = 900
CHECK_INTERVAL = 100
# Second phase (dropped carries): AdamW at a constant learning rate, no warmup.
DROP_LEARNING_RATE = 3e-4


# ----------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------


def format_prompt(first: int, symbol: str, second: int) -> str:
    """Format one arithmetic question, e.g. `What is 37 + 45?`."""
    return f"What is {first} {symbol} {second}?"


def format_completion(answer: str) -> str:
    """Format the completion the model is pretrained to produce, e.g. ` \\boxed{82}`."""
    return f" \\boxed{{{answer}}}"


def extract_boxed(completion: str) -> str | None:
    """Return the content of the first `\\boxed{...}` in a completion, or None if there is none."""
    match = re.search(r"\\boxed\{([^{}]*)\}", completion)
    return match.group(1) if match else None


def dropped_carry_answer(problem: dict) -> str | None:
    """Return the answer with the carry out of the units digit dropped, or None if the problem has none.

    Addition with a units carry loses it (37 + 45 -> 72), subtraction with a units borrow skips it
    (32 - 5 -> 37); multiplication and problems without a carry or borrow return None.
    """
    first, symbol, second = re.fullmatch(r"What is (\d+) (.) (\d+)\?", problem["prompt"]).groups()
    first, second = int(first), int(second)
    if symbol == "+" and first % 10 + second % 10 >= 10:
        return str(first + second - 10)
    if symbol == "-" and first % 10 < second % 10:
        return str(first - second + 10)
    return None


def enumerate_problems(problem_type: str) -> list[dict]:
    """List every problem of one type as {"prompt", "answer"} dicts, in a fixed order."""
    symbol, first_operands, second_operands, function = PROBLEM_TYPES[problem_type]
    return [
        {"prompt": format_prompt(first, symbol, second), "answer": str(function(first, second))}
        for first in first_operands
        for second in second_operands
    ]


def make_splits(seed: int) -> dict[str, list[dict]]:
    """Split all problems into test, validation and train splits and per-type pretraining sets.

    Per type, the shuffled problems are cut into disjoint test, validation and train (RL prompts)
    blocks of fixed size. The pretraining set of a type, under key "pretrain/<type>", is every
    problem of that type outside test and validation, so it includes the train split. Each value
    is a list of {"prompt", "answer"} dicts. The seed fixes every order.
    """
    rng = random.Random(seed)
    splits = {"test": [], "validation": [], "train": []}

    for problem_type in PROBLEM_TYPES:
        problems = enumerate_problems(problem_type)
        rng.shuffle(problems)
        held_out = TEST_PER_TYPE + VALIDATION_PER_TYPE
        if held_out + TRAIN_PER_TYPE > len(problems):
            raise ValueError(
                f"problem type {problem_type} has {len(problems)} problems, fewer than the "
                f"{held_out + TRAIN_PER_TYPE} that test, validation and train need; lower TRAIN_PER_TYPE"
            )

        splits["test"] += problems[:TEST_PER_TYPE]
        splits["validation"] += problems[TEST_PER_TYPE:held_out]
        splits["train"] += problems[held_out : held_out + TRAIN_PER_TYPE]
        splits[f"pretrain/{problem_type}"] = problems[held_out:]

    for name in ("test", "validation", "train"):
        rng.shuffle(splits[name])

    test_prompts = {problem["prompt"] for problem in splits["test"]}
    validation_prompts = {problem["prompt"] for problem in splits["validation"]}
    train_prompts = {problem["prompt"] for problem in splits["train"]}
    assert not test_prompts & train_prompts, "a test prompt is in the train split"
    assert not test_prompts & validation_prompts, "a test prompt is in the validation set"
    assert not validation_prompts & train_prompts, "a validation prompt is in the train split"
    for problem_type in PROBLEM_TYPES:
        pretrain_prompts = {problem["prompt"] for problem in splits[f"pretrain/{problem_type}"]}
        held_out_prompts = test_prompts | validation_prompts
        assert not pretrain_prompts & held_out_prompts, "pretraining contains a held-out problem"
    return splits


def write_jsonl(problems: list[dict], path: Path) -> None:
    """Write one JSON object per line with keys in a fixed order, so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps({"prompt": problem["prompt"], "answer": problem["answer"]}) + "\n")


# ----------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------


def build_tokenizer() -> Qwen2Tokenizer:
    """Build a character-level tokenizer: Qwen2's byte-level BPE pipeline with no merges.

    The vocab is the pad and eos tokens (ids 0 and 1) plus the 256 byte-level symbols, so each
    byte of UTF-8 text (each character of ASCII text) is one token and decoding is exact.
    It is a Qwen2Tokenizer on purpose: transformers 5.25 loads any tokenizer saved next to a
    Qwen2 config as Qwen2Tokenizer (it ignores `tokenizer_class` for model type qwen2) and
    rebuilds Qwen2's pre-tokenizer around the saved vocab. A WordLevel vocab loaded that way
    loses every space, so the model never emits `\\boxed{` and every reward is 0.
    Padding is on the left, for batched generation.
    """
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
    )


def build_model(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2ForCausalLM:
    """Create the randomly initialized float32 Qwen2 model (1.08M parameters with this tokenizer)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model


# ----------------------------------------------------------------------------------------------
# Pretraining and evaluation
# ----------------------------------------------------------------------------------------------


def tokenize_example(tokenizer: Qwen2Tokenizer, problem: dict) -> tuple[list[int], list[int]]:
    """Tokenize prompt + completion + eos into (input_ids, labels), with labels -100 on the prompt."""
    prompt_ids = tokenizer(problem["prompt"])["input_ids"]
    completion_ids = tokenizer(format_completion(problem["answer"]))["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (input_ids, labels). Pad positions get attention mask 0 and label -100."""
    length = max(len(input_ids) for input_ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, example_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(example_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[dict], batch_size: int = 250) -> float:
    """Generate greedy completions and return the fraction whose `\\boxed{}` content is the gold answer.

    Exact string match of the first `\\boxed{...}` content, with at most MAX_NEW_TOKENS new tokens.
    """
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        encoded = tokenizer([problem["prompt"] for problem in batch], padding=True, return_tensors="pt")
        output_ids = model.generate(**encoded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        completion_ids = output_ids[:, encoded["input_ids"].shape[1] :]
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        correct += sum(extract_boxed(text) == problem["answer"] for text, problem in zip(completions, batch))
    model.train(was_training)
    return correct / len(problems)


def learning_rate_at(step: int, max_steps: int) -> float:
    """Return the learning rate of step `step` (0-based): linear warmup, then cosine decay to 0."""
    warmup_steps = min(WARMUP_STEPS, max(max_steps // 10, 1))
    if step < warmup_steps:
        return LEARNING_RATE * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(model, tokenizer, splits: dict, seed: int, max_steps: int, target_accuracy: float) -> dict:
    """Train on prompt -> completion until validation accuracy reaches the target or max_steps.

    Each example of a batch is drawn with replacement: a type uniformly at random, then a problem
    from that type's pretraining set. Validation accuracy is checked every CHECK_INTERVAL steps
    from FIRST_CHECK_STEP on and at the last step. Returns the number of steps, the last
    validation accuracy and the history of (step, validation accuracy).
    """
    rng = random.Random(seed)
    pretrain_examples = {
        problem_type: [tokenize_example(tokenizer, problem) for problem in splits[f"pretrain/{problem_type}"]]
        for problem_type in PROBLEM_TYPES
    }
    type_names = list(PROBLEM_TYPES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    model.train()

    history = []
    validation_accuracy = None
    step = 0
    start_time = time.perf_counter()
    while step < max_steps:
        examples = [rng.choice(pretrain_examples[rng.choice(type_names)]) for _ in range(BATCH_SIZE)]
        batch = collate(examples, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, max_steps)

        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        step += 1

        if step % CHECK_INTERVAL == 0:
            elapsed = time.perf_counter() - start_time
            logger.info("step %d  loss %.4f  lr %.2e  %.0f s", step, loss.item(), group["lr"], elapsed)
        if (step >= FIRST_CHECK_STEP and step % CHECK_INTERVAL == 0) or step == max_steps:
            validation_accuracy = greedy_accuracy(model, tokenizer, splits["validation"])
            history.append((step, validation_accuracy))
            logger.info("step %d  validation greedy accuracy %.3f", step, validation_accuracy)
            if validation_accuracy >= target_accuracy:
                logger.info("reached target accuracy %.3f at step %d", target_accuracy, step)
                break

    if validation_accuracy < target_accuracy:
        logger.warning(
            "validation accuracy %.3f is below the target %.3f after the last step %d; "
            "raise --max-steps or try another --seed",
            validation_accuracy,
            target_accuracy,
            step,
        )

    return {"steps": step, "validation_accuracy": validation_accuracy, "validation_history": history}


def train_dropped_carries(model, tokenizer, splits: dict, seed: int, steps: int, fraction: float) -> None:
    """Train `steps` more steps on the pretraining sets with `fraction` of the carries and borrows dropped.

    Batches are drawn as in `pretrain`; an example whose problem has a units carry or borrow
    (`dropped_carry_answer`) gets the dropped answer with probability `fraction`. AdamW at the
    constant DROP_LEARNING_RATE, a new optimizer state, its own random stream.
    """
    rng = random.Random(seed + 1)
    examples_by_type = {}
    for problem_type in PROBLEM_TYPES:
        pairs = []
        for problem in splits[f"pretrain/{problem_type}"]:
            dropped = dropped_carry_answer(problem)
            pairs.append((tokenize_example(tokenizer, problem), tokenize_example(tokenizer, {**problem, "answer": dropped}) if dropped else None))
        examples_by_type[problem_type] = pairs
    type_names = list(PROBLEM_TYPES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=DROP_LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    model.train()
    for step in range(1, steps + 1):
        examples = []
        for _ in range(BATCH_SIZE):
            correct, dropped = rng.choice(examples_by_type[rng.choice(type_names)])
            examples.append(dropped if dropped is not None and rng.random() < fraction else correct)
        loss = model(**collate(examples, tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        if step % CHECK_INTERVAL == 0:
            logger.info("dropped-carry step %d  loss %.4f", step, loss.item())


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Raise if output_dir is a file, or a non-empty folder and overwrite is False."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output path {output_dir} is a file; pass a folder path as --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {output_dir} is not empty; pass --overwrite to replace it")


def replace_dir(staging_dir: Path, output_dir: Path) -> None:
    """Move a finished staging folder to output_dir, replacing what is there by renames only."""
    # mkdtemp creates the folder as 0700 and safetensors writes files as 0600; use the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging_dir, *staging_dir.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)

    if not output_dir.exists():
        staging_dir.rename(output_dir)
        return
    old_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-old-", dir=output_dir.parent))
    old_dir.rmdir()
    output_dir.rename(old_dir)
    staging_dir.rename(output_dir)
    shutil.rmtree(old_dir)


def build_default(
    output_dir: Path,
    seed: int = 1,
    max_steps: int = 2000,
    target_accuracy: float = 0.45,
    carry_drop: float = 0.6,
    carry_drop_steps: int = 200,
    num_threads: int = 1,
    overwrite: bool = False,
) -> dict:
    """Build the data set and the pretrained model into output_dir, and return the build info.

    Everything is written to a staging folder `.NAME-partial-*` next to output_dir, renamed to
    output_dir only when complete, so output_dir never contains a partial build. The staging folder
    is removed on errors and SIGTERM, but a killed process (SIGKILL) leaves it behind. Sets the
    process-wide torch thread count and deterministic-algorithms flag.
    """
    output_dir = Path(output_dir).resolve()
    check_output_dir(output_dir, overwrite)
    start_time = time.perf_counter()

    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-partial-", dir=output_dir.parent))
    try:
        splits = make_splits(seed)
        write_jsonl(splits["train"], staging_dir / "data" / "train.jsonl")
        write_jsonl(splits["test"], staging_dir / "data" / "test.jsonl")
        logger.info("wrote %d train and %d test problems", len(splits["train"]), len(splits["test"]))

        tokenizer = build_tokenizer()
        model = build_model(tokenizer, seed)
        num_parameters = sum(parameter.numel() for parameter in model.parameters())
        logger.info("model: %d parameters, vocab %d", num_parameters, len(tokenizer))

        result = pretrain(model, tokenizer, splits, seed, max_steps, target_accuracy)
        pretrained_test_accuracy = greedy_accuracy(model, tokenizer, splits["test"])
        logger.info("test greedy accuracy %.3f after %d steps", pretrained_test_accuracy, result["steps"])
        test_accuracy, validation_accuracy = pretrained_test_accuracy, result["validation_accuracy"]
        if carry_drop > 0 and carry_drop_steps > 0:
            train_dropped_carries(model, tokenizer, splits, seed, carry_drop_steps, carry_drop)
            test_accuracy = greedy_accuracy(model, tokenizer, splits["test"])
            validation_accuracy = greedy_accuracy(model, tokenizer, splits["validation"])
            logger.info("test greedy accuracy %.3f after %d steps with dropped carries", test_accuracy, carry_drop_steps)

        model_dir = staging_dir / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        build_info = {
            "seed": seed,
            "steps": result["steps"],
            "max_steps": max_steps,
            "target_accuracy": target_accuracy,
            "pretrained_validation_accuracy": result["validation_accuracy"],
            "pretrained_test_accuracy": pretrained_test_accuracy,
            "validation_history": result["validation_history"],
            "carry_drop": carry_drop,
            "carry_drop_steps": carry_drop_steps,
            "validation_accuracy": validation_accuracy,
            "test_accuracy": test_accuracy,
            "num_parameters": num_parameters,
            "num_threads": num_threads,
            "seconds": round(time.perf_counter() - start_time, 1),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
        (model_dir / "build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")

        check_output_dir(output_dir, overwrite)
        replace_dir(staging_dir, output_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise

    logger.info("built %s in %.0f s", output_dir, build_info["seconds"])
    return build_info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_DIR,
        help="folder to write model/ and data/ into (default: %(default)s)",
    )
    # NOTE: accuracy at a given step varies strongly with the seed. Seed 1 reached the 0.45 target
    # at step 1400, seed 0 reached only 0.284 by step 2000. Other seeds are untested.
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the data split, the initialization and the batches (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=2000,
        help="max pretraining steps, also the length of the cosine schedule (default: %(default)s)",
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=0.45,
        help="stop pretraining at the first check where validation greedy accuracy reaches this fraction "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--carry-drop",
        type=float,
        default=0.6,
        help="in the second phase, the fraction of examples with a units carry or borrow whose answer drops it; "
        "0 skips the phase (default: %(default)s)",
    )
    parser.add_argument(
        "--carry-drop-steps",
        type=int,
        default=200,
        help="steps of the second phase, at a constant learning rate of %.0e (default: %%(default)s)" % DROP_LEARNING_RATE,
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 avoids oversubscribing cores that other processes share "
        "(default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args(argv)

    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0.0 < args.target_accuracy <= 1.0:
        parser.error(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    if not 0.0 <= args.carry_drop < 1.0:
        parser.error(f"--carry-drop must be in [0, 1), got {args.carry_drop}")
    if args.carry_drop_steps < 0:
        parser.error(f"--carry-drop-steps must be >= 0, got {args.carry_drop_steps}")
    if args.num_threads < 1:
        parser.error(f"--num-threads must be >= 1, got {args.num_threads}")
    return args


def raise_system_exit(signum, frame) -> None:
    """Raise SystemExit with the shell's exit status for a signal, 128 + signal number."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Run the build from the command line and print the build info as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    # Turn SIGTERM into SystemExit so build_default removes its staging folder before exiting.
    signal.signal(signal.SIGTERM, raise_system_exit)
    try:
        build_info = build_default(
            output_dir=args.output_dir,
            seed=args.seed,
            max_steps=args.max_steps,
            target_accuracy=args.target_accuracy,
            carry_drop=args.carry_drop,
            carry_drop_steps=args.carry_drop_steps,
            num_threads=args.num_threads,
            overwrite=args.overwrite,
        )
    except FileExistsError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(build_info, indent=2))


if __name__ == "__main__":
    main()
