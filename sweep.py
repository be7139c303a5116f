"""Train every requested initialization under the same GRPO run, over seeds, and tabulate the comparison.

Each (init, learning rate, seed) is one `train_grpo.py` run in its own folder under --output-dir:
INIT-seedS, or INIT-lrLR-seedS with --lr-sweep. Every run gets the same train_grpo.py flags (those
after `--`); only --init, --seed, --output_dir and, where given per init, --learning_rate and
--rank differ. A run whose folder contains summary.json is skipped and an interrupted one resumes
from its newest checkpoint, so starting the same command again finishes the sweep.

Then it writes into --output-dir:
- results.json and results.md: one row per init (and learning rate). Each number is the mean and
  standard deviation over seeds of held-out greedy accuracy before and after, reward AUC, largest
  KL to the initial policy, seconds per step, or gap and cosine to the full fine-tuning update.
  The row also counts the collapsed runs.
- analysis/ (analysis-lrLR/ per learning rate with --lr-sweep): `analyze_svd.py` on the runs, with
  the full fine-tuning run of the first listed seed that finished as --full-ft when `full` is among
  the inits: dynamics.png
  (reward, KL, entropy curves with seed bands), full_ft_gap.png, energy and similarity figures;
- lr_sensitivity.png with --lr-sweep: accuracy after training against the learning rate.

Definitions, from each run's log_history.json:
- reward AUC: the area under the logged mean-reward curve (trapezoids over steps) divided by the
  steps it spans, i.e. the step-weighted mean reward during training (0 to 1). TRL logs the mean
  over the steps since the previous log (--logging_steps).
- largest KL: the maximum of kl_to_init, which train_grpo.py logs every --kl-steps steps: the mean
  per-token KL(policy || initial policy) on held-out prompts (--kl-steps 0 turns it off).
- collapsed: the reward curve, smoothed by a running mean over w = max(1, n // 10) of its n
  logged points, falls below (1 - --collapse-drop) x its starting value (the mean of the first w
  points) and stays below the starting value from there to the last logged step. Runs with fewer
  than 5 logged rewards are not judged.
- seconds per step: train_grpo.py's train time over its steps, including the KL measurements and
  checkpoint saves.
- gap and cosine: ||dW - dW_full||_F / ||dW_full||_F and <dW, dW_full>_F / (||dW||_F ||dW_full||_F)
  over the layers analyze_svd.py analyzes (first, middle and last decoder layer by default), summed
  over layers before the ratio.

Usage:
    python sweep.py --inits lora,gaussian,pissa,milora,olora,rlpo,rlmo,full --seeds 0,1,2 --jobs 2 \\
        --output-dir runs/compare                                              # embedded default, 2 CPU cores
    python sweep.py --inits lora,pissa,rlpo --seeds 0 --lr-sweep 2e-5,5e-5,1e-4 --output-dir runs/lr-sweep
    python sweep.py --inits lora,pissa,milora,olora,rlpo,rlmo --seeds 0,1,2 --lr pissa=2e-5,milora=2e-5 \\
        --rank pissa=32,milora=32 --kl-steps 0 --jobs 4 --devices 0,1,2,3 --output-dir runs/paper \\
        -- --preset paper                                                      # reference settings, one GPU per run

With --preset paper's 8192-token completions, the KL measurement costs a transformers `generate`
and two forward passes over --kl_batch_size x 8192 positions x the vocabulary every --kl-steps
steps, so the example turns it off. To keep it, pass `-- --kl_batch_size 1 --kl_prompts 16` and a
--kl-steps of 50 or more.
"""

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from eval_math import write_json
from train_grpo import INITS, parse_arguments

logger = logging.getLogger(__name__)

SCRIPT_DIR = Path(__file__).resolve().parent
MIN_COLLAPSE_POINTS = 5
# Flags the sweep sets for every run, with the sweep.py flag to use instead. Passed after `--`, they
# would make runs disagree with their folder names.
RESERVED_FLAGS = {
    "--init": "--inits",
    "--seed": "--seeds",
    "--output_dir": "--output-dir",
    "--output-dir": "--output-dir",
    "--kl_steps": "--kl-steps",
    "--kl-steps": "--kl-steps",
}


@dataclass
class Job:
    init: str
    seed: int
    learning_rate: float | None
    rank: int | None
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name

    def arguments(self, extra: list[str], kl_steps: int) -> list[str]:
        """Return the train_grpo.py arguments of this run."""
        arguments = [*extra, "--init", self.init, "--seed", str(self.seed), "--output_dir", str(self.folder), "--kl_steps", str(kl_steps)]
        if self.learning_rate is not None:
            arguments += ["--learning_rate", repr(self.learning_rate)]
        if self.rank is not None:
            arguments += ["--rank", str(self.rank)]
        return arguments


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_list(text: str, flag: str, convert, positive: bool = False) -> list:
    """Return the comma-separated values of `flag`, converted, or raise ValueError naming the invalid one."""
    values = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = convert(item)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {item!r} is not a valid {convert.__name__}. Pass comma-separated values, e.g. {flag} 0,1,2.") from None
        if positive and not value > 0:
            raise ValueError(f"{flag} {text!r}: {item!r} must be positive.")
        values.append(value)
    if not values:
        raise ValueError(f"{flag} is empty. Pass at least one value.")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r} lists a value twice. Remove the duplicate.")
    return values


def parse_per_init(text: str | None, flag: str, convert, inits: list[str]) -> dict:
    """Return {init: value} from 'init=value,init=value'; every init must be one of `inits` and appear once."""
    if not text:
        return {}
    example = f"{flag} pissa=2e-5,milora=2e-5" if convert is float else f"{flag} pissa=32,milora=32"
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        init, separator, value = item.partition("=")
        if not separator or not value:
            raise ValueError(f"{flag} {text!r}: {item!r} is not INIT=VALUE. Example: {example}.")
        if init not in inits:
            raise ValueError(f"{flag} {text!r}: {init!r} is not one of --inits ({', '.join(inits)}).")
        if init in mapping:
            raise ValueError(f"{flag} {text!r} sets {init!r} twice. Keep one {init}=VALUE.")
        try:
            mapping[init] = convert(value)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {item!r} has an invalid {convert.__name__} value. Example: {example}.") from None
        if not mapping[init] > 0:
            raise ValueError(f"{flag} {text!r}: the value for {init!r} must be positive, got {value}.")
    return mapping


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; train_grpo.py flags go after `--`."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags after `--` go to every train_grpo.py run, e.g. `-- --preset paper --max_steps 200`.",
    )
    parser.add_argument("--inits", default=",".join(INITS), help=f"Comma-separated inits to compare (default: all of {','.join(INITS)}).")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds; each init runs once per seed (default: 0,1,2).")
    parser.add_argument("--lr", default=None, help="Learning rate per init, e.g. pissa=2e-5,milora=2e-5; the others use --learning_rate after `--`, else train_grpo.py's default.")
    parser.add_argument("--rank", default=None, help="LoRA rank per init, e.g. pissa=32,milora=32; the others use --rank after `--`, else train_grpo.py's default.")
    parser.add_argument("--lr-sweep", default=None, help="Comma-separated learning rates: every init and seed runs at each (exclusive with --lr).")
    parser.add_argument(
        "--kl-steps", type=int, default=25,
        help="Passed as train_grpo.py --kl_steps: log the KL to the initial policy every N steps (default: 25; 0: off, and the table has no KL).",
    )
    parser.add_argument(
        "--collapse-drop", type=float, default=0.25,
        help="Count a run as collapsed when its smoothed reward falls this fraction below its start and stays below the start (default: 0.25).",
    )
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="Runs trained at the same time (default: 1). On a CPU each gets cores / jobs threads unless OMP_NUM_THREADS is set; "
        "on GPUs pass --devices, else all runs share the default device.",
    )
    parser.add_argument("--devices", default=None, help="Comma-separated CUDA device indices; each concurrent run gets one (needs --jobs <= their number).")
    parser.add_argument("--output-dir", required=True, help="Folder for the run folders, results.json, results.md and the figures.")
    parser.add_argument("--dry-run", action="store_true", help="Print the train_grpo.py commands and exit.")
    return parser


def check_arguments(args, extra: list[str]) -> tuple[list[str], list[int], list[float | None], dict, dict]:
    """Validate every flag before any run starts; return (inits, seeds, learning rates, per-init lr, per-init rank)."""
    inits = parse_list(args.inits, "--inits", str)
    unknown = [init for init in inits if init not in INITS]
    if unknown:
        raise ValueError(f"--inits {args.inits!r}: unknown init {unknown[0]!r}. Choose from {', '.join(INITS)}.")

    seeds = parse_list(args.seeds, "--seeds", int)
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"--seeds {args.seeds!r}: seeds must be non-negative integers.")

    per_init_lr = parse_per_init(args.lr, "--lr", float, inits)
    per_init_rank = parse_per_init(args.rank, "--rank", int, inits)
    if "full" in per_init_rank:
        raise ValueError("--rank sets a LoRA rank, but 'full' trains without an adapter. Remove full=... from --rank.")
    if args.lr_sweep and per_init_lr:
        raise ValueError("--lr and --lr-sweep are exclusive: a sweep runs every init at every learning rate. Drop one of them.")
    learning_rates = parse_list(args.lr_sweep, "--lr-sweep", float, positive=True) if args.lr_sweep else [None]

    if args.kl_steps < 0:
        raise ValueError(f"--kl-steps {args.kl_steps} must be 0 (off) or positive.")
    if not 0 < args.collapse_drop < 1:
        raise ValueError(f"--collapse-drop {args.collapse_drop} must lie strictly between 0 and 1, e.g. 0.25.")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} must be a positive integer.")
    if args.devices is not None and args.jobs > len(parse_list(args.devices, "--devices", int)):
        raise ValueError(f"--jobs {args.jobs} exceeds the {len(args.devices.split(','))} --devices {args.devices!r}; each concurrent run needs its own device.")

    for flag in extra:
        name = flag.split("=", 1)[0]
        if name in RESERVED_FLAGS:
            raise ValueError(f"{name} after `--` conflicts with what sweep.py sets for each run. Use sweep.py's {RESERVED_FLAGS[name]} instead.")
        if name in ("--learning_rate", "--learning-rate") and args.lr_sweep:
            raise ValueError(f"{name} after `--` conflicts with --lr-sweep, which sets every run's learning rate. Drop one of them.")
    return inits, seeds, learning_rates, per_init_lr, per_init_rank


def plan_jobs(output_dir: Path, inits, seeds, learning_rates, per_init_lr, per_init_rank) -> list[Job]:
    """Return one Job per (learning rate, init, seed), in that order."""
    jobs = []
    for learning_rate in learning_rates:
        for init in inits:
            for seed in seeds:
                name = f"{init}-seed{seed}" if learning_rate is None else f"{init}-lr{learning_rate:g}-seed{seed}"
                jobs.append(Job(init, seed, learning_rate or per_init_lr.get(init), per_init_rank.get(init), output_dir / name))
    return jobs


def check_settings(output_dir: Path, settings: dict):
    """Record the sweep's settings in sweep.json, or raise if an earlier sweep in `output_dir` used other ones."""
    path = output_dir / "sweep.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        changed = sorted(key for key in settings if key in ("extra_args", "lr", "rank", "kl_steps") and earlier.get(key) != settings[key])
        if changed:
            raise ValueError(
                f"--output-dir {str(output_dir)!r} contains a sweep with other {', '.join(changed)} ({path}): its finished runs would be "
                "mixed with runs of the new settings. Choose another --output-dir, or delete that one."
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings, path)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def finished(job: Job) -> bool:
    return (job.folder / "summary.json").exists()


def run_jobs(jobs: list[Job], extra: list[str], kl_steps: int, concurrency: int, devices: list[str] | None) -> list[Job]:
    """Train every unfinished job, `concurrency` at a time, each logging to FOLDER.log; return the failed ones."""
    pending = [job for job in jobs if not finished(job)]
    for job in jobs:
        if finished(job):
            logger.info("Skipping %s: it is finished (summary.json exists)", job.name)
    threads = max(1, (os.cpu_count() or 1) // concurrency)
    running: dict[str, tuple[Job, subprocess.Popen, object]] = {}
    free_slots = list(devices) if devices else [str(index) for index in range(concurrency)]
    failed = []
    while pending or running:
        while pending and len(running) < concurrency:
            job, slot = pending.pop(0), free_slots.pop(0)
            environment = dict(os.environ)
            if devices:
                environment["CUDA_VISIBLE_DEVICES"] = slot
            elif concurrency > 1:
                environment.setdefault("OMP_NUM_THREADS", str(threads))
            command = [sys.executable, str(SCRIPT_DIR / "train_grpo.py"), *job.arguments(extra, kl_steps)]
            job.folder.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.folder.parent / f"{job.name}.log", "a")
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            logger.info("Starting %s", job.name)
            running[slot] = (job, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=SCRIPT_DIR), log)
        time.sleep(1.0)
        for slot, (job, process, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[slot]
            free_slots.append(slot)
            if process.returncode == 0 and finished(job):
                logger.info("Finished %s", job.name)
            else:
                logger.error("%s failed (exit code %s); see %s", job.name, process.returncode, job.folder.parent / f"{job.name}.log")
                failed.append(job)
    return failed


# ----------------------------------------------------------------------------------------------
# Metrics per run and per init
# ----------------------------------------------------------------------------------------------


def reward_auc(steps: list[int], rewards: list[float]) -> float | None:
    """Return the area under the reward curve (trapezoids) divided by the steps it spans; points at one step give their mean."""
    if not steps:
        return None
    if steps[-1] == steps[0]:
        return sum(rewards) / len(rewards)
    area = sum((steps[i + 1] - steps[i]) * (rewards[i] + rewards[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def collapsed(rewards: list[float], drop: float) -> bool | None:
    """Return whether the smoothed reward falls below (1 - drop) x its start and stays below the start to the end.

    Smoothing is a trailing running mean over w = max(1, n // 10) of the n logged rewards; the
    starting value is the mean of the first w rewards. Returns None (not judged) for fewer than
    MIN_COLLAPSE_POINTS rewards, where one noisy value would decide.
    """
    # NOTE: a reward that drops within the first logging window lowers the starting value itself,
    # so such a run is not counted. Compare its accuracy before and after, and its KL.
    if len(rewards) < MIN_COLLAPSE_POINTS:
        return None
    window = max(1, len(rewards) // 10)
    start = sum(rewards[:window]) / window
    smoothed = [sum(rewards[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(rewards))]
    for index, value in enumerate(smoothed):
        if value < (1 - drop) * start and all(later < start for later in smoothed[index:]):
            return True
    return False


def run_metrics(job: Job, drop: float) -> dict:
    """Return one finished run's numbers from its summary.json and log_history.json."""
    summary = json.loads((job.folder / "summary.json").read_text())
    history = json.loads((job.folder / "log_history.json").read_text())["log_history"]
    rewards = [(entry["step"], entry["reward"]) for entry in history if "reward" in entry and "step" in entry]
    kls = [entry["kl_to_init"] for entry in history if "kl_to_init" in entry]
    return {
        "run": job.name,
        "init": job.init,
        "seed": job.seed,
        "learning_rate": summary["learning_rate"],
        "rank": summary["script_args"]["rank"] if job.init != "full" else None,
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "reward_auc": reward_auc([step for step, _ in rewards], [reward for _, reward in rewards]),
        "max_kl": max(kls) if kls else None,
        "collapsed": collapsed([reward for _, reward in rewards], drop),
        "seconds_per_step": summary["seconds_per_step"],
        "steps": summary["steps"],
    }


def mean_std(values: list) -> dict | None:
    """Return {mean, std, n} (population std over the seeds) of the non-None values, or None if there are none."""
    values = [value for value in values if value is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((value - mean) ** 2 for value in values) / len(values)), "n": len(values)}


def whole_model_gaps(analysis: dict) -> dict[str, dict]:
    """Return {run folder name: {gap, cosine}} over all analyzed layers from an analyze_svd.py result."""
    from svd_figures import summed_gaps

    names = {run["label"]: Path(run["path"]).name for run in analysis["runs"]}
    return {names[label]: values for label, values in summed_gaps(analysis["layers"]).items()}


def analyze(jobs: list[Job], folder: Path, full_reference: Job | None) -> dict[str, dict]:
    """Run analyze_svd.py on the finished jobs into `folder`; return each run's whole-model gap to full fine-tuning."""
    import analyze_svd

    arguments = [str(job.folder) for job in jobs if job is not full_reference]
    if not arguments:
        return {}
    if full_reference is not None:
        arguments += ["--full-ft", str(full_reference.folder)]
    analysis = analyze_svd.main([*arguments, "--output-dir", str(folder), "--overwrite"])
    return whole_model_gaps(analysis) if full_reference is not None else {}


def aggregate(rows: list[dict], group_keys: tuple[str, ...]) -> list[dict]:
    """Return one record per group of rows: mean/std over seeds of every number, collapsed-run count."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in group_keys), []).append(row)
    table = []
    for key, members in groups.items():
        record = dict(zip(group_keys, key))
        record["runs"] = len(members)
        record["seeds"] = sorted(row["seed"] for row in members)
        for metric in ("accuracy_before", "accuracy_after", "reward_auc", "max_kl", "seconds_per_step", "gap_to_full", "cosine_to_full"):
            record[metric] = mean_std([row.get(metric) for row in members])
        record["change"] = mean_std([row["accuracy_after"] - row["accuracy_before"] for row in members])
        record["collapsed"] = sum(row["collapsed"] is True for row in members)
        record["collapse_judged"] = sum(row["collapsed"] is not None for row in members)
        table.append(record)
    return table


def format_markdown(table: list[dict], lr_sweep: bool, full_reference: str | None) -> str:
    """Return the results table in markdown: mean +- std over seeds per init (and learning rate)."""

    def cell(value: dict | None, runs: int, scale: float = 1.0, digits: int = 3) -> str:
        if value is None:
            return "n/a"
        text = f"{value['mean'] * scale:.{digits}f}"
        if value["n"] > 1:
            text += f" ± {value['std'] * scale:.{digits}f}"
        if value["n"] < runs:
            text += f" (n={value['n']})"
        return text

    header = ["init", *(["learning rate"] if lr_sweep else []), "runs", "accuracy before", "accuracy after", "change (points)", "reward AUC", "largest KL", "collapsed", "s/step", "gap to full FT", "cosine to full FT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in table:
        runs = record["runs"]
        values = [
            record["init"],
            *([f"{record['learning_rate']:g}"] if lr_sweep else []),
            str(record["runs"]),
            cell(record["accuracy_before"], runs),
            cell(record["accuracy_after"], runs),
            cell(record["change"], runs, 100.0, 1),
            cell(record["reward_auc"], runs),
            cell(record["max_kl"], runs, digits=4),
            f"{record['collapsed']}/{record['collapse_judged']}" if record["collapse_judged"] else "n/a",
            cell(record["seconds_per_step"], runs, digits=2),
            cell(record["gap_to_full"], runs),
            cell(record["cosine_to_full"], runs),
        ]
        lines.append("| " + " | ".join(values) + " |")
    notes = ["", "Mean ± standard deviation over seeds (population std); accuracy is greedy on the held-out split."]
    if full_reference:
        notes.append(f"Gap and cosine are measured against the full fine-tuning run {full_reference} (the full FT row compares its other seeds with it).")
    return "\n".join(lines + notes) + "\n"


def plot_lr_sensitivity(table: list[dict], path: Path):
    """Plot accuracy after training against the learning rate, one line per init with +-1 std error bars over seeds."""
    from matplotlib.figure import Figure

    from svd_figures import display_name, method_color

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.add_subplot()
    for init in dict.fromkeys(record["init"] for record in table):
        records = sorted((record for record in table if record["init"] == init), key=lambda record: record["learning_rate"])
        rates = [record["learning_rate"] for record in records]
        means = [record["accuracy_after"]["mean"] for record in records]
        spreads = [record["accuracy_after"]["std"] for record in records]
        axis.errorbar(rates, means, yerr=spreads, color=method_color(init), label=display_name(init), marker="o", capsize=3)
    before = table[0]["accuracy_before"]["mean"]
    axis.axhline(before, color="#999999", linewidth=0.8, linestyle="--", label="before training")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("held-out accuracy after training")
    axis.set_title("Learning-rate sensitivity (mean ± std over seeds)")
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=150)


def tabulate(jobs: list[Job], args, lr_sweep: bool) -> dict:
    """Compute every run's metrics, the analyze_svd.py figures and gaps, and write results.json and results.md."""
    output_dir = Path(args.output_dir)
    done = [job for job in jobs if finished(job)]
    rows = {job.name: run_metrics(job, args.collapse_drop) for job in done}
    full_references = {}
    for learning_rate in dict.fromkeys(job.learning_rate if lr_sweep else None for job in done):
        group = [job for job in done if not lr_sweep or job.learning_rate == learning_rate]
        reference = next((job for job in group if job.init == "full"), None)
        folder = output_dir / ("analysis" if not lr_sweep else f"analysis-lr{learning_rate:g}")
        for name, gap in analyze(group, folder, reference).items():
            if name in rows:
                rows[name]["gap_to_full"], rows[name]["cosine_to_full"] = gap["gap"], gap["cosine"]
        full_references[learning_rate] = reference.name if reference else None

    table = aggregate(list(rows.values()), ("init", "learning_rate") if lr_sweep else ("init",))
    reference_names = [name for name in full_references.values() if name]
    results = {
        "settings": json.loads((output_dir / "sweep.json").read_text()),
        "full_ft_reference": reference_names,
        "collapse_drop": args.collapse_drop,
        "table": table,
        "runs": list(rows.values()),
        "missing": [job.name for job in jobs if not finished(job)],
    }
    markdown = format_markdown(table, lr_sweep, ", ".join(reference_names) or None)
    if results["missing"]:
        markdown += f"\nMissing (failed or not run): {', '.join(results['missing'])}.\n"
    if lr_sweep and table:
        plot_lr_sensitivity(table, output_dir / "lr_sensitivity.png")
    write_json(results, output_dir / "results.json")
    (output_dir / "results.md.tmp").write_text(markdown)
    os.replace(output_dir / "results.md.tmp", output_dir / "results.md")
    return results


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    inits, seeds, learning_rates, per_init_lr, per_init_rank = check_arguments(args, extra)
    output_dir = Path(args.output_dir)
    jobs = plan_jobs(output_dir, inits, seeds, learning_rates, per_init_lr, per_init_rank)

    # Every run's flags must parse before the first one starts.
    for job in jobs:
        messages = io.StringIO()
        try:
            with contextlib.redirect_stderr(messages):
                parse_arguments(job.arguments(extra, args.kl_steps))
        except (SystemExit, ValueError) as error:
            # argparse exits with code 2 after printing "PROG: error: MESSAGE"; other errors carry their message.
            reason = str(error)
            if isinstance(error, SystemExit) and not isinstance(error.code, str):
                errors = [line.split("error: ", 1)[1] for line in messages.getvalue().splitlines() if "error: " in line]
                reason = errors[-1] if errors else f"exit code {error.code}"
            raise ValueError(f"train_grpo.py rejects the flags of run {job.name}: {reason} Fix the flags after `--`.") from None
    if args.dry_run:
        for job in jobs:
            print(shlex.join(["python", "train_grpo.py", *job.arguments(extra, args.kl_steps)]))
        return {}

    settings = {"inits": inits, "seeds": seeds, "lr": per_init_lr, "rank": per_init_rank, "lr_sweep": args.lr_sweep, "kl_steps": args.kl_steps, "extra_args": extra}
    check_settings(output_dir, settings)
    devices = parse_list(args.devices, "--devices", str) if args.devices else None
    failed = run_jobs(jobs, extra, args.kl_steps, args.jobs, devices)
    results = tabulate(jobs, args, bool(args.lr_sweep))
    print((output_dir / "results.md").read_text(), end="")
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(job.name for job in failed)}. Their logs are {output_dir}/NAME.log; start the same command again to retry them.")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
