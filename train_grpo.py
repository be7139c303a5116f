"""Train a policy for math reasoning with GRPO/DAPO (TRL GRPOTrainer) from a chosen LoRA initialization.

The reward is 1 when the shared math judge (`math_judge.py`, also used by `eval_math.py`) finds
the completion's final answer equal to the gold answer, else 0. The LoRA adapter is initialized
by `init_lora.py` (`--init rlpo`: B = 0 and lora_A = the top-r right singular vectors of each
frozen weight W, so the policy starts exactly at the pretrained model), or `--init full` trains
all weights as the full fine-tuning reference. Greedy held-out accuracy is measured before and
after training with `eval_math.evaluate`.

Every `GRPOConfig` field is a flag (`--learning_rate 1e-5`), `--config run.yaml` reads a YAML file
of the same names, and `--preset paper` applies the reference RLVR settings. Precedence: CLI flag,
then YAML, then preset, then the CPU defaults for the embedded tiny model.

Usage:
    python train_grpo.py --init rlpo                                    # embedded default, 2 CPU cores, ~2-3 min
    python train_grpo.py --init rlpo --preset paper                     # one GPU, reference settings, vLLM colocate
    accelerate launch --num_processes 8 train_grpo.py --init rlpo --preset paper --gradient_accumulation_steps 8

Output folder (`--output_dir`, default runs/INIT-seedSEED): init/ (the initial adapter, plus the
residual base for pissa, milora, olora), adapter/ (the trained adapter) or model/ (for full),
checkpoint-*/ (resumable with --resume_from_checkpoint), log_history.json and summary.json.
"""

import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer, TrlParser

from build_default import DEFAULT_DATA_FILES, DEFAULT_MODEL_DIR
from eval_math import DEFAULT_INSTRUCTION, evaluate, format_prompt, load_problems, write_jsonl
from init_lora import METHODS, commit_output_dir, initialize_adapter, load_base_model, parse_target_modules, save_adapter, temporary_dir_for
from math_judge import AccuracyReward, MathJudge

logger = logging.getLogger(__name__)

INITS = (*METHODS, "full")

# Settings for the embedded tiny model on a CPU: 8 prompts x 8 completions of at most 16 tokens per step.
CPU_DEFAULTS = {
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "max_completion_length": 16,
    "max_steps": 200,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "constant",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "loss_type": "dapo",
    "beta": 0.0,
    "temperature": 1.0,
    "logging_steps": 10,
    "save_steps": 100,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 0,
}

# Reference RLVR settings (DeepSeek-R1-Distill-Qwen-1.5B on DAPO-Math-17k): rank 16, alpha 32,
# all linear layers, constant lr 1e-5, 8 samples per prompt, clip 0.2/0.28, token-mean loss, no KL.
# 128 prompts x 8 completions = 1024 completions per optimizer step on one GPU; with N GPUs pass
# --gradient_accumulation_steps 64/N to keep it.
PAPER_PRESET = {
    "model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "dataset": "BytedTsinghua-SIA/DAPO-Math-17k",
    "train_split": "train",
    "problem_column": "prompt",
    "answer_column": "reward_model.ground_truth",
    "test_dataset": "HuggingFaceH4/MATH-500",
    "test_split": "test",
    "test_problem_column": "problem",
    "test_answer_column": "answer",
    "test_max_new_tokens": 8192,
    "test_batch_size": 64,
    "dtype": "bfloat16",
    "rank": 16,
    "alpha": 32.0,
    "target_modules": "all-linear",
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "num_generations": 8,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 64,
    "max_completion_length": 8192,
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "loss_type": "dapo",
    "beta": 0.0,
    "temperature": 1.0,
    "use_vllm": True,
    "vllm_mode": "colocate",
    "bf16": True,
    "gradient_checkpointing": True,
    "max_steps": 500,
    "logging_steps": 1,
    "save_steps": 50,
    "report_to": "none",
    "seed": 0,
}
PRESETS = {"cpu": {}, "paper": PAPER_PRESET}


@dataclass
class ScriptArguments:
    """Arguments of this script; GRPOConfig supplies the training ones."""

    init: str = field(default="rlpo", metadata={"help": f"LoRA initialization: one of {', '.join(INITS)} ('full' trains all weights)."})
    preset: str = field(default="cpu", metadata={"help": "'cpu': settings for the embedded tiny model; 'paper': reference RLVR settings for GPUs."})
    model: str = field(default=str(DEFAULT_MODEL_DIR), metadata={"help": "Base model folder or hub id (default: the embedded tiny model)."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16 or auto."})
    dataset: str = field(default=str(DEFAULT_DATA_FILES["train"]), metadata={"help": "Training problems: a JSONL/parquet file or a data set hub id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub data set configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset to train on."})
    problem_column: str = field(default="prompt", metadata={"help": "Column with the problem text or chat messages."})
    answer_column: str = field(default="answer", metadata={"help": "Column with the gold answer (dots follow nested fields)."})
    test_dataset: str = field(default=str(DEFAULT_DATA_FILES["test"]), metadata={"help": "Held-out problems for accuracy before and after training."})
    test_split: str = field(default="test", metadata={"help": "Split of --test_dataset."})
    test_problem_column: str = field(default="prompt", metadata={"help": "Problem column of --test_dataset."})
    test_answer_column: str = field(default="answer", metadata={"help": "Gold answer column of --test_dataset."})
    test_max_problems: int | None = field(default=None, metadata={"help": "Evaluate only the first N held-out problems."})
    test_max_new_tokens: int = field(default=16, metadata={"help": "Generation limit in tokens for the held-out evaluation."})
    test_batch_size: int = field(default=128, metadata={"help": "Prompts per generate call in the held-out evaluation."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Text appended to plain problems for chat-template models."})
    rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the scaling is alpha / rank."})
    target_modules: str = field(default="all-linear", metadata={"help": "'all-linear' or comma-separated module names."})
    svd: str = field(default="auto", metadata={"help": "'auto' (fastest exact path) or 'exact' (full SVD per weight)."})
    judge_timeout: float = field(default=5.0, metadata={"help": "Seconds the judge may spend on one completion before it scores 0."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir that holds no checkpoint to resume."})


def parse_arguments(argv=None):
    """Parse ScriptArguments and GRPOConfig with the preset's values as defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = "cpu"
    for index, item in enumerate(argv):
        if item.startswith("--preset="):
            preset = item.split("=", 1)[1]
        elif item == "--preset" and index + 1 < len(argv):
            preset = argv[index + 1]
    if preset not in PRESETS:
        raise SystemExit(f"Unknown --preset {preset!r}. Choose one of: {', '.join(PRESETS)}.")

    parser = TrlParser((ScriptArguments, GRPOConfig))
    defaults = {**CPU_DEFAULTS, "output_dir": None}
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False)
    defaults.update(PRESETS[preset])
    parser.set_defaults(**defaults)
    script_args, training_args = parser.parse_args_and_config(argv)

    if script_args.init not in INITS:
        raise SystemExit(f"Unknown --init {script_args.init!r}. Choose one of: {', '.join(INITS)}.")
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = f"runs/{script_args.init}-seed{training_args.seed}"
    return script_args, training_args


def last_checkpoint(output_dir: Path) -> str | None:
    """Return the newest checkpoint-N folder in `output_dir`, or None."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def check_output_dir(output_dir: Path, script_args, training_args) -> str | None:
    """Return the checkpoint to resume from, or raise if `output_dir` holds another run's files."""
    resume = training_args.resume_from_checkpoint
    if resume in ("True", "true", True):
        resume = last_checkpoint(output_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume_from_checkpoint true, but {str(output_dir)!r} has no checkpoint-* folder.")
    if resume:
        return resume
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return None
    found = last_checkpoint(output_dir)
    if found and not (output_dir / "summary.json").exists():
        logger.info("Resuming from %s (an interrupted run in --output_dir)", found)
        return found
    if script_args.overwrite:
        shutil.rmtree(output_dir)
        return None
    raise FileExistsError(
        f"--output_dir {str(output_dir)!r} already holds a finished run or other files. Pass --overwrite to "
        "replace it, or choose another --output_dir."
    )


def build_train_dataset(script_args, tokenizer):
    """Load training problems as a `datasets.Dataset` with `prompt` (text or messages) and `answer` columns."""
    from datasets import Dataset

    problems, golds = load_problems(script_args.dataset, script_args.train_split, script_args.problem_column, script_args.answer_column, script_args.dataset_config)
    prompts = []
    for problem in problems:
        if isinstance(problem, str) and getattr(tokenizer, "chat_template", None):
            problem = [{"role": "user", "content": f"{problem}\n{script_args.instruction}"}]
        prompts.append(problem)
    return Dataset.from_dict({"prompt": prompts, "answer": golds})


def held_out_accuracy(model, tokenizer, problems, golds, judge, script_args, output_path: Path):
    """Score greedy completions on the held-out problems, write them to `output_path`, return the summary."""
    records, summary = evaluate(
        model,
        tokenizer,
        problems,
        golds,
        judge,
        max_new_tokens=script_args.test_max_new_tokens,
        batch_size=script_args.test_batch_size,
        instruction=script_args.instruction,
    )
    write_jsonl(records, output_path)
    return summary


def save_trained(trainer, script_args, output_dir: Path, init_metadata: dict | None, tokenizer) -> Path:
    """Save the trained adapter (or full model) through a temporary folder; returns its final path."""
    final_dir = output_dir / ("model" if script_args.init == "full" else "adapter")
    temporary_dir = temporary_dir_for(final_dir)
    try:
        trainer.model.save_pretrained(temporary_dir)
        tokenizer.save_pretrained(temporary_dir)
        if init_metadata is not None:
            metadata = dict(init_metadata)
            if metadata.get("residual_base"):
                # The trained adapter applies to the residual base saved with the initial adapter.
                metadata["residual_base"] = f"../init/{metadata['residual_base']}"
                config_path = temporary_dir / "adapter_config.json"
                config = json.loads(config_path.read_text())
                config["base_model_name_or_path"] = str((final_dir / metadata["residual_base"]).resolve())
                config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
            (temporary_dir / "init_metadata.json").write_text(json.dumps(metadata, indent=2))
        commit_output_dir(temporary_dir, final_dir)
    except BaseException:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise
    return final_dir


def write_json(data: dict, path: Path):
    """Write JSON through a temporary file renamed at the end."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    temporary.replace(path)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    script_args, training_args = parse_arguments(argv)
    output_dir = Path(training_args.output_dir)
    resume_from = check_output_dir(output_dir, script_args, training_args)
    set_seed(training_args.seed)

    # Data, model and initialization; every input error is raised here, before anything is written.
    model, tokenizer = load_base_model(script_args.model, dtype=script_args.dtype)
    if torch.cuda.is_available() and not training_args.use_cpu:
        model = model.to("cuda")
    train_dataset = build_train_dataset(script_args, tokenizer)
    test_problems, test_golds = load_problems(
        script_args.test_dataset, script_args.test_split, script_args.test_problem_column, script_args.test_answer_column, limit=script_args.test_max_problems
    )
    init_metadata = None
    if script_args.init != "full":
        model, init_metadata = initialize_adapter(
            model,
            script_args.init,
            rank=script_args.rank,
            alpha=script_args.alpha,
            target_modules=parse_target_modules(script_args.target_modules),
            svd=script_args.svd,
            seed=training_args.seed,
        )
        init_metadata["model"] = script_args.model

    # The initial adapter is saved so the update can be measured against it later.
    output_dir.mkdir(parents=True, exist_ok=True)
    init_dir = output_dir / "init"
    if init_metadata is not None and not (init_dir / "adapter_config.json").exists():
        temporary_dir = temporary_dir_for(init_dir)
        save_adapter(model, init_metadata, temporary_dir, tokenizer, final_dir=init_dir)
        commit_output_dir(temporary_dir, init_dir)

    # Held-out accuracy of the initial policy: the pretrained model itself for every init, up to
    # float rounding of the residual base for pissa, milora and olora.
    with MathJudge(timeout=script_args.judge_timeout) as judge:
        summary = train_and_evaluate(model, tokenizer, train_dataset, test_problems, test_golds, judge, script_args, training_args, init_metadata, resume_from)
    print(
        f"{script_args.init}: held-out accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
        f"after {summary['steps']} steps ({summary['seconds_per_step']:.2f} s/step); outputs in {output_dir}"
    )
    return summary


def train_and_evaluate(model, tokenizer, train_dataset, test_problems, test_golds, judge, script_args, training_args, init_metadata, resume_from):
    """Score the initial policy, train it with GRPO, save it, score it again; returns and writes summary.json."""
    output_dir = Path(training_args.output_dir)
    before = held_out_accuracy(model, tokenizer, test_problems, test_golds, judge, script_args, output_dir / "eval_before.jsonl")
    logger.info("Held-out accuracy before training: %.4f", before["accuracy"])

    # GRPO
    reward = AccuracyReward(judge, num_generations=training_args.num_generations)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=training_args, train_dataset=train_dataset, processing_class=tokenizer)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - started
    final_path = save_trained(trainer, script_args, output_dir, init_metadata, tokenizer)
    write_json({"log_history": trainer.state.log_history}, output_dir / "log_history.json")

    # Held-out accuracy of the trained policy
    after = held_out_accuracy(trainer.model, tokenizer, test_problems, test_golds, judge, script_args, output_dir / "eval_after.jsonl")
    steps = trainer.state.global_step
    steps_run = steps - (int(Path(resume_from).name.split("-")[-1]) if resume_from else 0)
    summary = {
        "init": script_args.init,
        "model": script_args.model,
        "seed": training_args.seed,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "num_test_problems": after["num_problems"],
        "steps": steps,
        "resumed_from": resume_from,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(steps_run, 1), 4),
        "train_loss": train_output.training_loss,
        "adapter_path" if script_args.init != "full" else "model_path": str(final_path),
        "init_path": str(output_dir / "init") if script_args.init != "full" else None,
        "judge_counts": dict(judge.counts),
        "script_args": asdict(script_args),
        "learning_rate": training_args.learning_rate,
    }
    write_json(summary, output_dir / "summary.json")
    return summary


if __name__ == "__main__":
    main()
