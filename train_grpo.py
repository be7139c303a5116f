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
    python train_grpo.py --init rlpo                                    # embedded default, 2 CPU cores, ~2 min
    python train_grpo.py --init rlpo --preset paper                     # one GPU, reference settings, vLLM colocate
    accelerate launch --config_file configs/ddp.yaml --num_processes 8 train_grpo.py --init rlpo --preset paper \\
        --gradient_accumulation_steps 8                                 # 8 GPUs, 1024 completions per step
    (README.md lists the DeepSpeed ZeRO-2/3, FSDP and vLLM server commands.)

Under `accelerate launch` every process computes the same initialization (checked by a sha256 of
lora_A and lora_B), the held-out problems are split over the processes, and only the main
process writes files.

Output folder (`--output_dir`, default runs/INIT-seedSEED): init/ (the initial adapter, plus the
residual base for pissa, milora, olora), adapter/ (the trained adapter) or model/ (for full),
checkpoint-*/ (resumable with --resume_from_checkpoint), log_history.json and summary.json.
"""

import copy
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers import TrainerCallback, TrainerState, set_seed
from transformers.trainer_utils import TrainOutput
from trl import GRPOConfig, GRPOTrainer, TrlParser

from build_default import DEFAULT_DATA_FILES, DEFAULT_MODEL_DIR
from eval_math import DEFAULT_INSTRUCTION, evaluate, load_problems, sampled_kl, summarize, write_json, write_jsonl
from init_lora import METHODS, commit_output_dir, initialize_adapter, load_base_model, load_policy, parse_target_modules, read_metadata, save_adapter_atomic, temporary_dir_for
from grpo_data import build_train_dataset, check_data, check_not_empty
from math_judge import AccuracyReward, MathJudge

logger = logging.getLogger(__name__)

INITS = (*METHODS, "full")
CHECKPOINT_NAME_RE = re.compile(r"checkpoint-(\d+)")

# Settings for the embedded tiny model on a CPU: 8 prompts x 8 completions of at most 16 tokens per step.
CPU_DEFAULTS = {
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "max_completion_length": 16,
    "max_steps": 300,
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
    kl_steps: int = field(default=0, metadata={"help": "Every N steps, log kl_to_init: the mean per-token KL of the policy to its initial policy on held-out prompts (0: off)."})
    kl_prompts: int = field(default=64, metadata={"help": "Held-out prompts (the first N of --test_dataset) for --kl_steps."})
    kl_batch_size: int = field(
        default=16,
        metadata={"help": "Prompts per generate and forward call for --kl_steps; memory grows with it x completion length x vocabulary."},
    )
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
    if script_args.kl_steps < 0 or script_args.kl_prompts < 1 or script_args.kl_batch_size < 1:
        raise SystemExit(
            f"Invalid --kl_steps {script_args.kl_steps}, --kl_prompts {script_args.kl_prompts} or --kl_batch_size "
            f"{script_args.kl_batch_size}: --kl_steps must be 0 (off) or positive, the other two positive."
        )
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = f"runs/{script_args.init}-seed{training_args.seed}"
    return script_args, training_args


def checkpoint_complete(checkpoint: str | Path) -> bool:
    """Return whether a checkpoint folder was completely saved.

    transformers 5.25 (`Trainer._save_checkpoint`) writes the weights, optimizer, scheduler and RNG
    state first and trainer_state.json last, so a kill while saving leaves a folder without a
    readable trainer_state.json.
    """
    try:
        json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(output_dir: Path) -> str | None:
    """Return the newest completely saved checkpoint-N folder in `output_dir`, or None."""
    complete = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT_NAME_RE.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        if checkpoint_complete(path):
            complete.append((int(match[1]), path))
        else:
            logger.warning("Skipping %s: it has no readable trainer_state.json, so the run was killed while saving it.", path)
    return str(max(complete)[1]) if complete else None


def check_output_dir(output_dir: Path, script_args, training_args) -> str | None:
    """Return the checkpoint to resume from, or raise if `output_dir` contains files this run must not replace.

    Resumes from `--resume_from_checkpoint PATH`, from the newest complete checkpoint for
    `--resume_from_checkpoint true`, and without the flag from the newest complete checkpoint
    of an interrupted run (one without summary.json) in `output_dir`. Any other non-empty
    `output_dir` is rejected unless --overwrite is given; main deletes it after the input checks.
    """
    resume = training_args.resume_from_checkpoint
    if resume in ("True", "true", True):
        resume = last_checkpoint(output_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume_from_checkpoint true, but {str(output_dir)!r} has no completely saved checkpoint-* folder.")
    elif resume:
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} does not exist. Pass a checkpoint-N folder of an earlier run.")
        if not checkpoint_complete(resume):
            raise ValueError(
                f"--resume_from_checkpoint {resume!r} has no readable trainer_state.json, so it was not completely saved. "
                "Pass an earlier checkpoint, or --resume_from_checkpoint true to take the newest complete one."
            )
    if resume:
        return resume
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return None

    found = last_checkpoint(output_dir)
    finished = (output_dir / "summary.json").exists()
    if found and not finished:
        logger.info("Resuming from %s (an interrupted run in --output_dir)", found)
        return found
    if script_args.overwrite:
        return None
    if finished:
        raise FileExistsError(
            f"--output_dir {str(output_dir)!r} already contains a finished run (summary.json). Pass --overwrite to replace it, "
            "--resume_from_checkpoint PATH to train on from one of its checkpoints, or choose another --output_dir."
        )
    raise FileExistsError(
        f"--output_dir {str(output_dir)!r} is not empty but contains no completely saved checkpoint to resume from (a run killed "
        "before its first checkpoint, or other files). Pass --overwrite to replace it, or choose another --output_dir."
    )


def check_resume_matches(resume_from: str, init_dir: Path, script_args):
    """Raise when the flags of a resumed run differ from those of the run that wrote its checkpoint and `init_dir`."""
    has_adapter = (Path(resume_from) / "adapter_config.json").exists()
    if has_adapter != (script_args.init != "full"):
        written_by = "a LoRA run" if has_adapter else "an --init full run"
        raise ValueError(f"Checkpoint {resume_from!r} was written by {written_by}, but --init is {script_args.init!r}. Pass the --init of that run.")
    metadata = read_metadata(init_dir) if (init_dir / "adapter_config.json").exists() else None
    if metadata is None:
        return
    flags = {"init": script_args.init, "rank": script_args.rank, "alpha": script_args.alpha}
    saved = {"init": metadata.get("method"), "rank": metadata.get("rank"), "alpha": metadata.get("alpha")}
    if script_args.target_modules != "all-linear":
        flags["target_modules"] = sorted(parse_target_modules(script_args.target_modules))
        saved["target_modules"] = metadata.get("target_modules")
    for key, value in flags.items():
        if value != saved[key]:
            raise ValueError(
                f"The run in {str(init_dir.parent)!r} was started with --{key} {saved[key]!r}, but this resumed run has "
                f"--{key} {value!r}. Pass the flags of the original run, or choose another --output_dir."
            )


# ----------------------------------------------------------------------------------------------
# Several processes (accelerate launch): one process group, identical initial adapters, one writer
# ----------------------------------------------------------------------------------------------


def process_state(training_args) -> PartialState:
    """Return this run's process group (a single process under plain `python`), as the Trainer will use it.

    Reading `training_args.device` builds the PartialState from GRPOConfig's use_cpu, ddp_backend and
    ddp_timeout and the launcher's environment. Later PartialState() calls return the same state.
    """
    _ = training_args.device
    return PartialState()


def check_output_dir_on_main(output_dir: Path, script_args, training_args, state: PartialState) -> str | None:
    """Run check_output_dir on the main process only and give every process its result or error.

    Every process gets the same checkpoint to resume from, or raises the same error, and no other
    process reads `output_dir` while the main process writes into it.
    """
    outcome = [None]
    if state.is_main_process:
        try:
            outcome = [("resume", check_output_dir(output_dir, script_args, training_args))]
        except (OSError, ValueError) as error:
            outcome = [("error", error)]
    kind, value = broadcast_object_list(outcome, from_process=0)[0]
    if kind == "error":
        raise value
    return value


@contextmanager
def full_weights_on_every_process():
    """Load models unpartitioned even under DeepSpeed ZeRO-3, so every process can compute the initialization.

    While a ZeRO-3 config is registered (GRPOConfig registers one under `accelerate launch` with a
    ZeRO-3 config, regardless of `zero3_init_flag`), transformers 5.25 loads models inside
    `deepspeed.zero.Init`, which leaves each process a shard of every weight and the SVD nothing to
    read. DeepSpeed partitions the full model later, when the trainer prepares it.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    # NOTE: untested under DeepSpeed itself. It relies on this private attribute of transformers 5.25, and
    # tests cover only the switch.
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def adapter_digest(model) -> str | None:
    """Return the sha256 of every lora_A and lora_B tensor (names and bytes, in parameter order), or None if there are none.

    The residual base weights of pissa, milora and olora are left out: they are W - s B A, computed
    from the same SVD as the factors.
    """
    digest = hashlib.sha256()
    found = False
    for name, parameter in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        found = True
    return digest.hexdigest() if found else None


def check_same_initialization(model, state: PartialState) -> str | None:
    """Log this process's initial adapter digest and raise unless every process computed the same one.

    Each process computes the initialization itself. ZeRO-3 and FSDP shard each process's own copy
    of the weights, so different initial adapters would train a mix of them without any error.
    """
    digest = adapter_digest(model)
    logger.info("Process %d of %d: initial adapter sha256 %s", state.process_index, state.num_processes, digest)
    digests = gather_object([digest])
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"The initial adapters differ between processes (sha256 per process: {digests}). Check that every "
            "process loads the same model files with the same library versions on the same device type."
        )
    return digest


def held_out_accuracy(model, tokenizer, problems, golds, judge, script_args, output_path: Path, state: PartialState):
    """Score greedy completions on the held-out problems; returns the summary on every process.

    Process i of N scores problems i, i + N, i + 2N and so on. The main process writes all records
    to `output_path` in problem order.
    """
    indices = list(range(state.process_index, len(problems), state.num_processes))
    records, _ = evaluate(
        model,
        tokenizer,
        [problems[index] for index in indices],
        [golds[index] for index in indices],
        judge,
        max_new_tokens=script_args.test_max_new_tokens,
        batch_size=script_args.test_batch_size,
        instruction=script_args.instruction,
    )
    for record in records:
        record["problem_index"] = indices[record["problem_index"]]

    records = sorted(gather_object(records), key=lambda record: record["problem_index"])
    if state.is_main_process:
        write_jsonl(records, output_path)
    return summarize(records)


def save_trained(trainer, script_args, output_dir: Path, init_metadata: dict | None, tokenizer, state: PartialState) -> Path:
    """Save the trained adapter (or full model) through a temporary folder; returns its final path.

    Every process takes part in `trainer.save_model`, which gathers weights sharded by ZeRO-3 or
    FSDP, but only the main process writes.
    """
    final_dir = output_dir / ("model" if script_args.init == "full" else "adapter")
    temporary_dir = temporary_dir_for(final_dir) if state.is_main_process else None
    temporary_dir = broadcast_object_list([temporary_dir], from_process=0)[0]
    # NOTE: only the DDP path (two CPU processes) has run; the ZeRO-3 and FSDP gathers were read in transformers 5.25.
    try:
        trainer.save_model(str(temporary_dir))
        if state.is_main_process:
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
        if state.is_main_process:
            shutil.rmtree(temporary_dir, ignore_errors=True)
        raise
    state.wait_for_everyone()
    return final_dir


def load_trained(final_dir: Path, script_args, device):
    """Load the saved trained policy on `device`: the full model folder, or the adapter on its (residual) base."""
    with full_weights_on_every_process():
        if script_args.init == "full":
            model, _ = load_base_model(str(final_dir), dtype=script_args.dtype)
        else:
            model, _ = load_policy(None, final_dir, dtype=script_args.dtype)
    return model.to(device)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    script_args, training_args = parse_arguments(argv)
    state = process_state(training_args)
    if script_args.kl_steps and state.num_processes > 1:
        # NOTE: KL under several processes is not implemented. Sampling a ZeRO-3/FSDP-sharded policy on one
        # process alone would wait for the others' shards (expected, not tried).
        raise SystemExit(f"--kl_steps runs on a single process only; this launch has {state.num_processes}. Drop --kl_steps.")
    output_dir = Path(training_args.output_dir)
    resume_from = check_output_dir_on_main(output_dir, script_args, training_args, state)
    set_seed(training_args.seed)

    # Data, model and initialization; every input error is raised here, before anything is written.
    # Every process computes the same initialization from the same seed, on its own device.
    # A resumed run loads the initial adapter (and residual base) that the interrupted run saved.
    init_dir = output_dir / "init"
    init_metadata = None
    if resume_from:
        check_resume_matches(resume_from, init_dir, script_args)
    with full_weights_on_every_process():
        if resume_from and (init_dir / "adapter_config.json").exists():
            model, tokenizer = load_policy(script_args.model, init_dir, dtype=script_args.dtype, trainable=True)
            init_metadata = read_metadata(init_dir)
        else:
            model, tokenizer = load_base_model(script_args.model, dtype=script_args.dtype)
    model = model.to(state.device)
    check_not_empty(script_args.dataset, "--dataset")
    check_not_empty(script_args.test_dataset, "--test_dataset")
    train_dataset = build_train_dataset(script_args, tokenizer)
    test_problems, test_golds = load_problems(
        script_args.test_dataset, script_args.test_split, script_args.test_problem_column, script_args.test_answer_column, limit=script_args.test_max_problems
    )
    train_dataset = check_data(train_dataset, test_problems, test_golds, tokenizer, model.config, script_args, training_args)
    if script_args.init != "full" and init_metadata is None:
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
        check_same_initialization(model, state)

    # The initial adapter is saved so the update can be measured against it later. A resumed run
    # keeps the one its checkpoints started from.
    if state.is_main_process:
        if script_args.overwrite and resume_from is None and output_dir.exists():
            logger.info("Deleting the earlier contents of %s (--overwrite)", output_dir)
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if init_metadata is not None and not (init_dir / "adapter_config.json").exists():
            save_adapter_atomic(model, init_metadata, init_dir, tokenizer)

    # Held-out accuracy of the initial policy: the pretrained model itself for every init, up to
    # float rounding of the residual base for pissa, milora and olora.
    with MathJudge(timeout=script_args.judge_timeout) as judge:
        summary = train_and_evaluate(model, tokenizer, train_dataset, test_problems, test_golds, judge, script_args, training_args, init_metadata, resume_from)
    if state.is_main_process:
        print(
            f"{script_args.init}: held-out accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
            f"after {summary['steps']} steps ({summary['seconds_per_step']:.2f} s/step); outputs in {output_dir}"
        )
    return summary


class InitialPolicyKL(TrainerCallback):
    """Every `every` optimizer steps, append {"kl_to_init": KL, "step": N} to the trainer's log history.

    KL is the mean per-token KL(policy || initial policy) over completions sampled from the
    policy on fixed held-out problems with a fixed seed (`eval_math.sampled_kl`). The initial
    policy is a frozen copy of the model taken before training: the pretrained model for full
    fine-tuning and for B_0 = 0 inits, residual + s B_0 A_0 for pissa, milora and olora. The
    copy costs one more model in memory; with beta = 0 nothing else needs it.
    """

    def __init__(self, model, tokenizer, problems: list, every: int, max_new_tokens: int, temperature: float, batch_size: int, seed: int):
        reference = copy.deepcopy(model)
        if hasattr(reference, "merge_and_unload"):
            reference = reference.merge_and_unload()
        self.reference = reference.requires_grad_(False).eval()
        self.tokenizer, self.problems, self.every = tokenizer, problems, every
        self.max_new_tokens, self.temperature, self.batch_size, self.seed = max_new_tokens, temperature, batch_size, seed

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        was_training = model.training
        policies = {"trained": model, "init": self.reference}
        result = sampled_kl(
            lambda name: policies[name].eval(), self.tokenizer, self.problems, self.batch_size, self.max_new_tokens, self.temperature, self.seed, model.device
        )
        model.train(was_training)
        state.log_history.append({"kl_to_init": result["mean_token_kl"], "step": state.global_step})


def train_or_restore(trainer, resume_from: str | None) -> TrainOutput:
    """Run `trainer.train`, or only load `resume_from` when that checkpoint already reached max_steps.

    transformers 5.25 checks max_steps after each step, so resuming from a checkpoint saved at
    max_steps (a run killed while saving or evaluating the trained policy) would train one step more.
    """
    if resume_from:
        saved = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        if 0 < trainer.args.max_steps <= saved.global_step:
            if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
                logger.info("Checkpoint %s already reached max_steps %d; loading it without training.", resume_from, trainer.args.max_steps)
                trainer._load_from_checkpoint(resume_from)  # the same private call Trainer.train starts with
                trainer.state = saved
                return TrainOutput(saved.global_step, None, {})
            # NOTE: DeepSpeed and FSDP load checkpoints only into a prepared model, so there the extra step remains.
            logger.warning("Resuming %s under DeepSpeed or FSDP trains one step past max_steps %d.", resume_from, trainer.args.max_steps)
    return trainer.train(resume_from_checkpoint=resume_from)


def train_and_evaluate(model, tokenizer, train_dataset, test_problems, test_golds, judge, script_args, training_args, init_metadata, resume_from):
    """Score the initial policy, train it with GRPO, save it, score it again; returns and writes summary.json."""
    output_dir = Path(training_args.output_dir)
    state = PartialState()
    before = held_out_accuracy(model, tokenizer, test_problems, test_golds, judge, script_args, output_dir / "eval_before.jsonl", state)
    logger.info("Held-out accuracy before training: %.4f", before["accuracy"])

    # GRPO
    reward = AccuracyReward(judge, num_generations=training_args.num_generations)
    callbacks = []
    if script_args.kl_steps:
        callbacks.append(
            InitialPolicyKL(
                model, tokenizer, test_problems[: script_args.kl_prompts], script_args.kl_steps, training_args.max_completion_length,
                training_args.temperature, script_args.kl_batch_size, training_args.seed,
            )
        )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=training_args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks)
    started = time.perf_counter()
    train_output = train_or_restore(trainer, resume_from)
    train_seconds = time.perf_counter() - started
    final_path = save_trained(trainer, script_args, output_dir, init_metadata, tokenizer, state)
    if state.is_main_process:
        write_json({"log_history": trainer.state.log_history}, output_dir / "log_history.json")

    # Held-out accuracy of the trained policy, read back from the saved files: under ZeRO-3 and
    # FSDP trainer.model contains only this process's shard of the weights.
    policy = load_trained(final_path, script_args, state.device)
    after = held_out_accuracy(policy, tokenizer, test_problems, test_golds, judge, script_args, output_dir / "eval_after.jsonl", state)
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
        "num_processes": state.num_processes,
        "completions_per_step": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * state.num_processes,
        # Peak of PyTorch's caching allocator on this process's GPU; memory allocated outside it is not counted.
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(state.device) if state.device.type == "cuda" else None,
    }
    if state.is_main_process:
        write_json(summary, output_dir / "summary.json")
    return summary


if __name__ == "__main__":
    main()
