"""Compare seconds per GRPO step of train_grpo.py with a plain TRL GRPOTrainer on the same settings.

Both runs train the embedded tiny model with the same GRPOConfig, data, LoRA rank, alpha and
target modules and the same reward (math_judge.AccuracyReward); the plain run lets PEFT create a
default LoRA adapter from a LoraConfig, train_grpo.py uses `--init` (rlpo by default). Runs
alternate (plain, ours, plain, ours, ...) so drift in machine load hits both alike. Only
`trainer.train()` is timed; the held-out evaluations of train_grpo.py are outside the timing.

Usage:
    python benchmarks/bench_train_overhead.py [--steps 60] [--repeats 2] [--init rlpo]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import set_seed  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import train_grpo  # noqa: E402
from init_lora import load_base_model  # noqa: E402
from math_judge import AccuracyReward, MathJudge  # noqa: E402


def common_flags(steps: int, output_dir: Path) -> list[str]:
    return ["--max_steps", str(steps), "--save_strategy", "no", "--logging_steps", str(steps), "--output_dir", str(output_dir)]


def time_ours(init: str, steps: int, work_dir: Path) -> float:
    """Run train_grpo.main and return its seconds per step (train loop only)."""
    output_dir = work_dir / f"ours-{time.monotonic_ns()}"
    summary = train_grpo.main(["--init", init, "--test_max_problems", "8", *common_flags(steps, output_dir)])
    return summary["seconds_per_step"]


def time_plain(steps: int, work_dir: Path) -> float:
    """Run a plain GRPOTrainer with the same parsed settings and return seconds per step."""
    output_dir = work_dir / f"plain-{time.monotonic_ns()}"
    script_args, training_args = train_grpo.parse_arguments(common_flags(steps, output_dir))
    set_seed(training_args.seed)
    model, tokenizer = load_base_model(script_args.model)
    dataset = train_grpo.build_train_dataset(script_args, tokenizer)
    peft_config = LoraConfig(
        r=script_args.rank,
        lora_alpha=script_args.alpha,
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    with MathJudge(timeout=script_args.judge_timeout) as judge:
        reward = AccuracyReward(judge, num_generations=training_args.num_generations)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=training_args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return seconds / trainer.state.global_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps per run.")
    parser.add_argument("--repeats", type=int, default=2, help="Pairs of runs (plain, ours).")
    parser.add_argument("--init", default="rlpo", help="Initialization train_grpo.py uses.")
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    plain, ours = [], []
    try:
        for repeat in range(args.repeats):
            plain.append(time_plain(args.steps, work_dir))
            ours.append(time_ours(args.init, args.steps, work_dir))
            print(f"repeat {repeat}: plain GRPOTrainer {plain[-1]:.3f} s/step, train_grpo.py {ours[-1]:.3f} s/step")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    plain_mean = sum(plain) / len(plain)
    ours_mean = sum(ours) / len(ours)
    print(f"\ntorch threads: {torch.get_num_threads()}, steps per run: {args.steps}, repeats: {args.repeats}")
    print(f"{'run':<22}{'s/step':>10}")
    print(f"{'plain GRPOTrainer':<22}{plain_mean:>10.3f}")
    print(f"{'train_grpo.py':<22}{ours_mean:>10.3f}")
    print(f"ratio train_grpo / plain: {ours_mean / plain_mean:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
