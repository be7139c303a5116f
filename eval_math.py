"""Score a model, a LoRA adapter or a merged model on math problems with the shared math judge.

Each problem's prompt is formatted like in training (`format_prompt`), completions are generated
with transformers `generate` (batched, left padding; greedy by default), and every completion is
scored by `math_judge.MathJudge`, the same judge `train_grpo.py` uses as its reward.

Usage:
    python eval_math.py                                            # embedded model on its test split
    python eval_math.py --adapter runs/rlpo-seed0/adapter --output runs/rlpo-seed0/eval.jsonl
    python eval_math.py --model Qwen/Qwen2.5-Math-1.5B --data HuggingFaceH4/MATH-500 --split test \\
        --problem-column problem --answer-column answer --max-new-tokens 2048    # one GPU
    python eval_math.py --rescore eval.jsonl --output rescored.jsonl   # re-judge saved generations

Output: one JSON line per completion (`prompt`, `completion`, `gold`, `correct`, `extracted`,
`status`) and the accuracy printed; `--rescore` writes the same lines in the same order with a
new verdict and needs no model.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from math_judge import MathJudge

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def get_column(example: dict, column: str):
    """Return `example[column]`, following dots into nested dicts (e.g. reward_model.ground_truth)."""
    value = example
    for key in column.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(column)
        value = value[key]
    return value


def load_problems(data: str, split: str, problem_column: str, answer_column: str, config: str | None = None, limit: int | None = None):
    """Load (problems, golds) from a local JSONL/JSON/parquet file or a `datasets` hub id.

    A problem is a string or a list of chat messages; golds are returned as strings. Raises a
    clear error for a missing file, split or column, and for an empty split.
    """
    import datasets

    path = Path(data)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise FileNotFoundError(f"Data file {data!r} does not exist.")
        builder = "parquet" if path.suffix == ".parquet" else "json"
        dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    else:
        try:
            dataset = datasets.load_dataset(data, config, split=split)
        except ValueError as error:
            raise ValueError(f"Could not load split {split!r} of data set {data!r}: {error}") from error
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} of {data!r} is empty; pass a data set with problems.")

    first = dataset[0]
    for role, column in (("problem", problem_column), ("answer", answer_column)):
        try:
            get_column(first, column)
        except KeyError:
            raise ValueError(
                f"The {role} column {column!r} is missing from {data!r} (split {split!r}); columns found: "
                f"{', '.join(dataset.column_names)}. Pass --{role}-column."
            ) from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    problems = [get_column(example, problem_column) for example in dataset]
    golds = [str(get_column(example, answer_column)) for example in dataset]
    return problems, golds


def format_prompt(tokenizer, problem, instruction: str | None = DEFAULT_INSTRUCTION, system_prompt: str | None = None) -> str:
    """Return the text the model is prompted with.

    Chat messages and models with a chat template get the template (the instruction appended to a
    plain problem); a model without one gets the problem text unchanged.
    """
    if isinstance(problem, list):
        messages = problem
    elif getattr(tokenizer, "chat_template", None):
        content = f"{problem}\n{instruction}" if instruction else problem
        messages = [{"role": "user", "content": content}]
    else:
        return problem
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# Generation and scoring
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress: bool = True):
    """Generate one completion per prompt; returns a list of dicts (completion, num_tokens, truncated).

    Greedy when temperature is 0. Batches are left-padded, so prompt lengths may differ.
    A completion is truncated when it reached max_new_tokens without an end-of-sequence token.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature, "top_p": top_p}

    results = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
        batch = prompts[start : start + batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for row in new_tokens:
            ended = (row == tokenizer.eos_token_id).nonzero()
            length = int(ended[0]) + 1 if len(ended) else int((row != tokenizer.pad_token_id).sum())
            results.append(
                {
                    "completion": tokenizer.decode(row[:length], skip_special_tokens=True),
                    "num_tokens": length,
                    "truncated": len(ended) == 0 and length >= max_new_tokens,
                }
            )
    model.train(was_training)
    return results


def score_records(records: list[dict], judge: MathJudge) -> list[dict]:
    """Fill `correct`, `extracted`, `source` and `status` of records holding `completion` and `gold`."""
    verdicts = judge.score([record["completion"] for record in records], [record["gold"] for record in records])
    for record, verdict in zip(records, verdicts):
        record["correct"] = verdict.reward
        record["extracted"] = verdict.extracted
        record["source"] = verdict.source
        record["status"] = verdict.status
    return records


def summarize(records: list[dict]) -> dict:
    """Return accuracy over scored problems (skipped golds excluded) and status counts."""
    scored = [record for record in records if record["correct"] is not None]
    statuses = {}
    for record in records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    accuracy = sum(record["correct"] for record in scored) / len(scored) if scored else float("nan")
    return {
        "accuracy": accuracy,
        "num_problems": len(records),
        "num_scored": len(scored),
        "statuses": statuses,
        "mean_completion_tokens": sum(record.get("num_tokens", 0) for record in records) / max(len(records), 1),
        "truncated_fraction": sum(bool(record.get("truncated")) for record in records) / max(len(records), 1),
    }


def evaluate(model, tokenizer, problems, golds, judge: MathJudge, max_new_tokens: int, batch_size: int = 64, instruction: str | None = DEFAULT_INSTRUCTION, system_prompt: str | None = None, progress: bool = True):
    """Generate greedy completions for `problems`, score them against `golds`; returns (records, summary)."""
    prompts = [format_prompt(tokenizer, problem, instruction, system_prompt) for problem in problems]
    generations = generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress)
    records = [{"prompt": prompt, "gold": gold, **generation} for prompt, gold, generation in zip(prompts, golds, generations)]
    score_records(records, judge)
    return records, summarize(records)


def write_jsonl(records: list[dict], path: str | Path):
    """Write records as JSON lines through a temporary file renamed at the end (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON lines; raises a clear error naming the file and line for invalid input."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"File {str(path)!r} does not exist.")
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"Line {number} of {str(path)!r} is not valid JSON: {error}") from None
    return records


def rescore(input_path: str | Path, judge: MathJudge) -> list[dict]:
    """Re-judge saved generations (JSON lines with `completion` and `gold`), keeping their order."""
    records = read_jsonl(input_path)
    for number, record in enumerate(records, start=1):
        missing = [field for field in ("completion", "gold") if field not in record]
        if missing:
            raise ValueError(f"Record {number} of {str(input_path)!r} lacks field(s) {', '.join(missing)}; --rescore needs completion and gold.")
    return score_records(records, judge)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; every flag says what it sets."""
    from build_default import DEFAULT_DATA_FILES

    parser = argparse.ArgumentParser(description="Score a model or adapter on math problems with the shared judge.")
    parser.add_argument("--model", default=None, help="Base model folder or hub id (default: the embedded tiny model, or the adapter's base).")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder from init_lora.py or train_grpo.py.")
    parser.add_argument("--data", default=str(DEFAULT_DATA_FILES["test"]), help="JSONL/JSON/parquet file or data set hub id (default: embedded test split).")
    parser.add_argument("--data-config", default=None, help="Hub data set configuration name.")
    parser.add_argument("--split", default="test", help="Data set split.")
    parser.add_argument("--problem-column", default="prompt", help="Column with the problem text or chat messages.")
    parser.add_argument("--answer-column", default="answer", help="Column with the gold answer (dots follow nested fields).")
    parser.add_argument("--max-problems", type=int, default=None, help="Score only the first N problems.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Generation length limit in tokens.")
    parser.add_argument("--batch-size", type=int, default=64, help="Prompts per generate call.")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="Text appended to plain problems for chat-template models.")
    parser.add_argument("--system-prompt", default=None, help="System message for chat-template models.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"), help="Model dtype.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device for generation.")
    parser.add_argument("--judge-timeout", type=float, default=5.0, help="Seconds the judge may spend on one completion before it scores 0.")
    parser.add_argument("--output", default=None, help="JSONL file for one line per completion.")
    parser.add_argument("--rescore", default=None, help="Re-judge this JSONL of saved generations instead of generating.")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)

    if args.rescore:
        if not args.output:
            raise SystemExit("--rescore needs --output for the re-judged lines.")
        with MathJudge(timeout=args.judge_timeout) as judge:
            records = rescore(args.rescore, judge)
        write_jsonl(records, args.output)
        summary = summarize(records)
        print(f"accuracy {summary['accuracy']:.4f} on {summary['num_scored']} completions, written to {args.output}")
        return summary

    from build_default import DEFAULT_MODEL_DIR
    from init_lora import load_policy

    model_name = args.model if (args.model or args.adapter) else str(DEFAULT_MODEL_DIR)
    problems, golds = load_problems(args.data, args.split, args.problem_column, args.answer_column, args.data_config, args.max_problems)
    model, tokenizer = load_policy(model_name, args.adapter, dtype=args.dtype, device=args.device)
    with MathJudge(timeout=args.judge_timeout) as judge:
        records, summary = evaluate(model, tokenizer, problems, golds, judge, args.max_new_tokens, args.batch_size, args.instruction, args.system_prompt)
    if args.output:
        write_jsonl(records, args.output)
    print(f"accuracy {summary['accuracy']:.4f} on {summary['num_scored']} problems ({summary['statuses']})")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
