"""Score a base model, a LoRA adapter or a merged model on standard math benchmarks with the shared judge.

For each problem the script samples k completions and scores each with `math_judge.MathJudge`,
the judge `train_grpo.py` uses as its reward. It reports, per benchmark:

    pass@1 = mean over problems of c_i / n                         (n = --samples, c_i = correct samples)
    pass@k = mean over problems of 1 - C(n - c_i, k) / C(n, k)     (unbiased estimator, k <= n)

plus the mean completion length in tokens, the fraction of truncated completions, and the
fraction of samples whose answer only the last-number fallback finds. That fallback never
counts toward pass@k. Problems whose gold answer the judge cannot parse are left out.

Benchmarks (`BENCHMARKS`): math500, aime24, aime25, amc23, gsm8k, minerva, olympiadbench,
and arithmetic (the embedded test split, the default). A local JSONL/JSON/parquet file or a data
set folder works too. Prompts use the model's chat template with `--instruction` appended,
a model without a template gets the raw problem, and `--prompt-template` replaces both.
Sampling is greedy at `--temperature 0`.

Usage:
    python eval_math.py                                            # embedded model, arithmetic, greedy (CPU)
    python eval_math.py --adapter runs/rlpo-seed0/adapter --samples 4 --temperature 0.6 --top-p 0.95 \\
        --output-dir runs/rlpo-seed0/eval
    python eval_math.py --model Qwen/Qwen2.5-Math-1.5B --benchmark math500,aime24,aime25,amc23,gsm8k,minerva,olympiadbench \\
        --samples 16 --temperature 0.6 --top-p 0.95 --max-new-tokens 3072 --dtype bfloat16 \\
        --backend vllm --output-dir runs/base-eval                  # one GPU
    python eval_math.py --benchmark my_problems.jsonl --problem-column question --answer-column solution
    python eval_math.py --rescore eval/math500.jsonl --output rescored.jsonl   # re-judge saved generations

Output with `--output-dir DIR`: DIR/BENCH.jsonl with one line per sample (`benchmark`,
`problem_index`, `sample_index`, `prompt`, `gold`, `completion`, `num_tokens`, `truncated`,
`correct`, `extracted`, `source`, `status`, `fallback_extracted`, `fallback_correct`), and
DIR/summary.json with the settings and the numbers above. `--output FILE` writes one benchmark's
lines to FILE. Every file is written through a temporary file renamed at the end.
"""

import argparse
import json
import logging
import math
import os
import re
import string
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from build_default import DEFAULT_DATA_FILES, DEFAULT_MODEL_DIR, MAX_NEW_TOKENS as ARITHMETIC_MAX_NEW_TOKENS
from math_judge import MathJudge, extract_answer

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


# ----------------------------------------------------------------------------------------------
# Benchmarks: where the problems live and how gold answers are read
# ----------------------------------------------------------------------------------------------


def plain_gold(value) -> str | None:
    """Return a gold answer as a string: None stays None, 27.0 becomes "27", a list is joined with ", "."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(str(plain_gold(item)) for item in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def gsm8k_gold(value) -> str:
    """Return the number after `####` in a GSM8K solution, thousands separators removed."""
    text = str(value)
    if "####" not in text:
        raise ValueError(f"GSM8K answer {text[-80:]!r} has no '####' marker before the final number.")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def dollar_free_gold(value) -> str | None:
    """Return a gold answer with `$` math delimiters removed (OlympiadBench writes answers as `$x$`)."""
    gold = plain_gold(value)
    return None if gold is None else _UNESCAPED_DOLLAR_RE.sub("", gold).strip()


@dataclass(frozen=True)
class Benchmark:
    """Location and layout of one benchmark's problems."""

    path: str  # hub data set id, local data set folder, or JSONL/JSON/parquet file
    split: str
    problem_column: str  # dots follow nested fields, e.g. reward_model.ground_truth
    answer_column: str
    config: str | None = None  # hub configuration name
    gold: Callable[[object], str | None] = plain_gold  # raw answer value -> gold string for the judge
    max_new_tokens: int = 4096  # generation limit unless --max-new-tokens is given


# aime25, amc23, minerva and olympiadbench are the math-ai copies that RLVR evaluation code loads.
# NOTE: their splits and columns come from dataset cards and other projects' loaders. They were not loaded here.
BENCHMARKS = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": Benchmark("math-ai/aime25", "test", "problem", "answer"),
    "amc23": Benchmark("math-ai/amc23", "test", "question", "answer"),
    "gsm8k": Benchmark("openai/gsm8k", "test", "question", "answer", config="main", gold=gsm8k_gold),
    "minerva": Benchmark("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": Benchmark("math-ai/olympiadbench", "test", "question", "answer", gold=dollar_free_gold),
    "arithmetic": Benchmark(DEFAULT_DATA_FILES["test"], "test", "prompt", "answer", max_new_tokens=ARITHMETIC_MAX_NEW_TOKENS),
}


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


def open_dataset(data: str, split: str, config: str | None = None):
    """Open one split of a JSONL/JSON/parquet file, a `save_to_disk` folder, a hub-layout folder or a hub id."""
    import datasets

    path = Path(data)
    if path.suffix in DATA_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"Data file {data!r} does not exist.")
        if path.stat().st_size == 0 or (path.suffix != ".parquet" and not path.read_text().strip()):
            raise ValueError(f"Data file {data!r} is empty; pass a file with one problem per line.")
        builder = "parquet" if path.suffix == ".parquet" else "json"
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"Split {split!r} is not in {data!r}; splits found: {', '.join(dataset)}. Pass --split.")
            dataset = dataset[split]
        return dataset

    try:
        return datasets.load_dataset(data, config, split=split)
    except ValueError as error:
        raise ValueError(f"Could not load split {split!r} (config {config!r}) of data set {data!r}: {error}") from error
    except (ConnectionError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"Could not load data set {data!r}: {error}. On a machine without network access, download it "
            "elsewhere (datasets' save_to_disk, or the hub repository folder) and pass that folder."
        ) from error


def load_problems(data: str, split: str, problem_column: str, answer_column: str, config: str | None = None, limit: int | None = None, gold: Callable[[object], str | None] = plain_gold):
    """Load (problems, golds) from a local file or folder, or a `datasets` hub id.

    A problem is a string or a list of chat messages. `gold` turns each raw answer into the
    string the judge compares with (None marks a gold to skip). Raises a clear error for a
    missing file, split or column, an empty split, and an answer `gold` cannot read.
    """
    dataset = open_dataset(data, split, config)
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

    problems, golds = [], []
    for index, example in enumerate(dataset):
        problems.append(get_column(example, problem_column))
        try:
            golds.append(gold(get_column(example, answer_column)))
        except ValueError as error:
            raise ValueError(f"Row {index} of {data!r} (split {split!r}): {error}") from None
    return problems, golds


def resolve_benchmarks(names: str | None, data: str | None = None, split: str | None = None, config: str | None = None, problem_column: str | None = None, answer_column: str | None = None) -> dict[str, Benchmark]:
    """Turn `--benchmark a,b` or `--data PATH` into {output name: Benchmark}, validating every entry.

    Table entries take the split, config and column flags as overrides (only when one benchmark
    is named). Local files and folders are named after their stem, hub ids after `org_name`.
    """
    if names and data:
        raise ValueError("Pass either --benchmark or --data, not both.")
    entries = [data] if data else [name.strip() for name in (names or "arithmetic").split(",") if name.strip()]
    if not entries:
        raise ValueError(f"--benchmark {names!r} names no benchmark. Known benchmarks: {', '.join(BENCHMARKS)}.")
    overrides = {"split": split, "config": config, "problem_column": problem_column, "answer_column": answer_column}
    overrides = {field: value for field, value in overrides.items() if value is not None}

    resolved = {}
    for entry in entries:
        if entry in BENCHMARKS:
            if overrides and len(entries) > 1:
                raise ValueError("--split, --data-config, --problem-column and --answer-column apply to one benchmark; name one at a time.")
            name, benchmark = entry, replace(BENCHMARKS[entry], **overrides)
        elif data is not None or Path(entry).exists() or Path(entry).suffix in DATA_FILE_SUFFIXES:
            is_local = Path(entry).exists() or Path(entry).suffix in DATA_FILE_SUFFIXES
            name = Path(entry).stem if is_local else entry.replace("/", "_")
            benchmark = Benchmark(entry, split or "test", problem_column or "problem", answer_column or "answer", config)
        else:
            raise ValueError(
                f"Unknown benchmark {entry!r}. Known benchmarks: {', '.join(BENCHMARKS)}. A local JSONL/JSON/parquet "
                "file or data set folder also works, and --data takes a hub data set id."
            )
        if name in resolved:
            raise ValueError(f"Benchmark {name!r} is named twice in --benchmark {names!r}.")
        resolved[name] = benchmark
    return resolved


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def check_prompt_template(template: str) -> None:
    """Raise a clear error unless `template` is a format string with `{problem}` and at most `{instruction}`."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise ValueError(f"--prompt-template {template!r} is not a valid format string ({error}); write literal braces as {{{{ }}}}.") from None
    unknown = fields - {"problem", "instruction"}
    if unknown or "problem" not in fields:
        raise ValueError(
            f"--prompt-template {template!r} must contain {{problem}} and may contain {{instruction}}, found fields "
            f"{sorted(fields)}; write literal braces as {{{{ }}}} (e.g. \\\\boxed{{{{}}}})."
        )


def uses_chat_template(tokenizer, problem, prompt_template: str | None = None) -> bool:
    """Return whether `format_prompt` renders this problem through the tokenizer's chat template."""
    return prompt_template is None and (isinstance(problem, list) or bool(getattr(tokenizer, "chat_template", None)))


def format_prompt(tokenizer, problem, instruction: str | None = DEFAULT_INSTRUCTION, system_prompt: str | None = None, prompt_template: str | None = None) -> str:
    """Return the text the model is prompted with.

    With `prompt_template` the problem is filled into it (no chat template). Otherwise chat
    messages and models with a chat template get the template, with the instruction appended to
    a plain problem, and a model without one gets the problem text unchanged. A system prompt
    needs the chat template.
    """
    if not uses_chat_template(tokenizer, problem, prompt_template):
        if system_prompt:
            reason = "--prompt-template replaces the chat template" if prompt_template else "the tokenizer has no chat template"
            raise ValueError(f"--system-prompt needs a chat template, but {reason}; put the text into --prompt-template instead.")
        if prompt_template is None:
            return problem
        if not isinstance(problem, str):
            raise ValueError("--prompt-template needs plain-text problems, but this data set stores chat messages.")
        return prompt_template.format(problem=problem, instruction=instruction or "")

    if isinstance(problem, list):
        messages = problem
    else:
        content = f"{problem}\n{instruction}" if instruction else problem
        messages = [{"role": "user", "content": content}]
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# Generation: transformers (CPU and GPU) and vLLM (GPU)
# ----------------------------------------------------------------------------------------------


def stop_token_ids(generation_config, tokenizer) -> set[int]:
    """Return the end-of-sequence ids of the tokenizer and of the model's generation config (which may be None)."""
    ids = {tokenizer.eos_token_id}
    config_ids = getattr(generation_config, "eos_token_id", None)
    if isinstance(config_ids, list):
        ids.update(config_ids)
    else:
        ids.add(config_ids)
    return ids - {None}


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress: bool = True, samples: int = 1, add_special_tokens: bool = False):
    """Generate `samples` completions per prompt with transformers `generate`.

    Returns one dict per completion, prompt by prompt and sample by sample: `completion`,
    `num_tokens` (generated tokens before the end-of-sequence token) and `truncated` (no
    end-of-sequence token within max_new_tokens). Greedy when temperature is 0. Each batch is
    max(1, batch_size // samples) whole prompts, left-padded. The model's generation config
    may set top_k or a repetition penalty; both are switched off, as in vLLM's SamplingParams.
    """
    if temperature == 0 and samples != 1:
        raise ValueError(f"Greedy decoding (temperature 0) gives one completion per prompt, got samples={samples}.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(getattr(model, "generation_config", None), tokenizer)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    if temperature == 0:
        sampling = {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0, "repetition_penalty": 1.0}

    results = []
    prompts_per_batch = max(1, batch_size // samples)
    with tqdm(total=len(prompts), desc="generating", unit="problem", disable=not progress) as bar:
        for start in range(0, len(prompts), prompts_per_batch):
            batch = prompts[start : start + prompts_per_batch]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stop_ids),
                **sampling,
            )
            for row in output[:, inputs["input_ids"].shape[1] :].tolist():
                stops = [position for position, token in enumerate(row) if token in stop_ids]
                length = stops[0] if stops else len(row)
                results.append(
                    {
                        "completion": tokenizer.decode(row[:length], skip_special_tokens=True),
                        "num_tokens": length,
                        "truncated": not stops and length >= max_new_tokens,
                    }
                )
            bar.update(len(batch))
    model.train(was_training)
    return results


# Values vLLM's LoRAConfig accepts for max_lora_rank, not checked against an installed vLLM.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VLLMPolicy:
    """A vLLM engine on the (residual) base model, serving an optional PEFT adapter as a LoRARequest.

    NOTE: not run on this machine (vLLM needs a CUDA GPU and is not installed here).
    """

    def __init__(self, base_path: str, adapter_dir: str | None, tokenizer, dtype: str = "auto", seed: int = 0):
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as error:
            raise ImportError("--backend vllm needs vLLM, which is not installed: pip install vllm (it needs a CUDA GPU).") from error

        engine_args = {}
        self.lora_request = None
        if adapter_dir is not None:
            config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
            rank = max([config["r"], *config.get("rank_pattern", {}).values()])
            supported = [value for value in VLLM_LORA_RANKS if value >= rank]
            if not supported:
                raise ValueError(f"Adapter rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}; use --backend transformers.")
            engine_args = {"enable_lora": True, "max_loras": 1, "max_lora_rank": supported[0]}
            self.lora_request = LoRARequest("adapter", 1, str(Path(adapter_dir).resolve()))
        self.llm = LLM(model=base_path, tokenizer=base_path, dtype=dtype, seed=seed, **engine_args)
        try:
            generation_config = GenerationConfig.from_pretrained(base_path)
        except OSError:  # a model folder without generation_config.json
            generation_config = None
        self.stop_ids = stop_token_ids(generation_config, tokenizer)

    def generate(self, prompt_token_ids: list[list[int]], samples: int, max_new_tokens: int, temperature: float, top_p: float, progress: bool = True) -> list[dict]:
        """Generate `samples` completions per tokenized prompt; returns the same dicts as `generate_completions`."""
        from vllm import SamplingParams

        params = SamplingParams(n=samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens)
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress, lora_request=self.lora_request)
        results = []
        for output in outputs:
            for completion in output.outputs:
                token_ids = list(completion.token_ids)
                ends_with_stop = bool(token_ids) and token_ids[-1] in self.stop_ids
                results.append(
                    {
                        "completion": completion.text,
                        "num_tokens": len(token_ids) - int(ends_with_stop),
                        "truncated": completion.finish_reason == "length",
                    }
                )
        return results


def sample_completions(model, tokenizer, prompts: list[str], samples: int, max_new_tokens: int, batch_size: int, temperature: float, top_p: float, seed: int, progress: bool, add_special_tokens: bool) -> list[dict]:
    """Generate with whichever backend `model` is: a transformers model or a `VLLMPolicy`."""
    if isinstance(model, VLLMPolicy):
        token_ids = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts]
        return model.generate(token_ids, samples, max_new_tokens, temperature, top_p, progress)
    return generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p, seed, progress, samples, add_special_tokens)


@torch.no_grad()
def sampled_kl(select, tokenizer, problems: list, batch_size: int, max_new_tokens: int, temperature: float, seed: int, device) -> dict:
    """Return the mean per-token KL(pi_trained || pi_init) over completions sampled from pi_trained.

    select(name) returns the eval-mode model computing policy "trained" or "init". Both policies are
    the models' next-token distributions at `temperature` (softmax of logits / temperature), the
    distributions GRPO samples from and trains. Completions are sampled from pi_trained over the
    full vocabulary (no top-k/top-p, no repetition penalty) for the chat-formatted `problems`,
    with torch seeded to `seed`. The global random state is restored afterwards, so a caller's own
    sampling continues unchanged. The KL at each completion position, up to and including the
    first stop token, is exact over the vocabulary: sum_v p_trained(v) (log p_trained(v) - log p_init(v)).
    Memory grows with batch_size x completion length x vocabulary size (float32 log-probabilities
    of both policies).
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    prompts = [format_prompt(tokenizer, problem) for problem in problems]
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)

    total_kl, total_tokens = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            policy = select("trained")
            stops = sorted(stop_token_ids(policy.generation_config, tokenizer))
            sequences = policy.generate(
                **inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
            )
            prompt_length = inputs["input_ids"].shape[1]
            completion = sequences[:, prompt_length:]
            is_stop = torch.isin(completion, torch.tensor(stops, device=completion.device)).long()
            valid = (is_stop.cumsum(1) - is_stop) == 0  # every token up to and including the first stop token
            attention_mask = torch.cat([inputs["attention_mask"], valid.long()], dim=1)
            position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)

            log_probs = []
            for name in ("trained", "init"):
                logits = select(name)(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
                log_probs.append(torch.log_softmax(logits[:, prompt_length - 1 : -1].float() / temperature, dim=-1))
            token_kl = (log_probs[0].exp() * (log_probs[0] - log_probs[1])).sum(-1)
            total_kl += token_kl[valid].sum().item()
            total_tokens += int(valid.sum())
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    return {"mean_token_kl": total_kl / max(total_tokens, 1), "num_tokens": total_tokens, "num_prompts": len(prompts)}


# ----------------------------------------------------------------------------------------------
# Scoring and metrics
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Return the unbiased pass@k estimate 1 - C(n - c, k) / C(n, k) for c correct of n samples (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_records(records: list[dict], judge: MathJudge) -> list[dict]:
    """Fill the verdict fields of records holding `completion` and `gold`.

    `correct`, `extracted`, `source` and `status` come from boxed answers and `Answer:` lines
    only. For a completion with neither, `fallback_extracted` and `fallback_correct` record what
    the last number in the text would have scored; that never enters `correct`, even when
    `judge` was built with fallback=True.
    """
    verdicts = judge.score([record["completion"] for record in records], [record["gold"] for record in records])
    fallback_records = []
    for record, verdict in zip(records, verdicts):
        strict = verdict.source != "fallback"
        record["correct"] = verdict.reward if strict or verdict.reward is None else 0.0
        record["extracted"] = verdict.extracted if strict else None
        record["source"] = verdict.source if strict else None
        record["status"] = verdict.status if strict else "no_answer"
        record["fallback_extracted"], record["fallback_correct"] = None, None
        if record["status"] == "no_answer":
            answer, source = extract_answer(record["completion"], fallback=True)
            if source == "fallback":
                record["fallback_extracted"] = answer
                fallback_records.append(record)

    if fallback_records:
        boxed = [f"\\boxed{{{record['fallback_extracted']}}}" for record in fallback_records]
        for record, verdict in zip(fallback_records, judge.score(boxed, [record["gold"] for record in fallback_records])):
            record["fallback_correct"] = verdict.reward
    return records


def pass_at_k_values(samples: int) -> list[int]:
    """Return the k reported for n samples: the powers of two up to n, and n itself."""
    return sorted({2**power for power in range(samples.bit_length()) if 2**power <= samples} | {samples})


def summarize(records: list[dict]) -> dict:
    """Return pass@k, completion length, truncation, fallback and status counts of scored records.

    Records are grouped into problems by (`benchmark`, `problem_index`); a record without a
    problem index is a problem of its own. Problems whose gold is unparseable (`correct` None)
    are left out of pass@k and the fallback fractions. `accuracy` is pass@1.
    """
    problems: dict[tuple, list[dict]] = {}
    for position, record in enumerate(records):
        key = (record.get("benchmark"), record.get("problem_index", f"record {position}"))
        problems.setdefault(key, []).append(record)
    scored = [group for group in problems.values() if all(record["correct"] is not None for record in group)]
    scored_records = [record for group in scored for record in group]
    statuses = {}
    for record in records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1

    samples = min((len(group) for group in scored), default=0)
    summary = {"accuracy": float("nan"), "num_problems": len(problems), "num_scored": len(scored), "samples": samples}
    for k in pass_at_k_values(samples) if samples else []:
        values = [pass_at_k(len(group), int(sum(record["correct"] for record in group)), k) for group in scored]
        summary[f"pass@{k}"] = sum(values) / len(values)
    summary["accuracy"] = summary.get("pass@1", float("nan"))

    count = max(len(records), 1)
    scored_count = max(len(scored_records), 1)
    summary.update(
        {
            "mean_completion_tokens": sum(record.get("num_tokens", 0) for record in records) / count,
            "truncated_fraction": sum(bool(record.get("truncated")) for record in records) / count,
            "fallback_fraction": sum(record.get("fallback_extracted") is not None for record in scored_records) / scored_count,
            "fallback_correct_fraction": sum(bool(record.get("fallback_correct")) for record in scored_records) / scored_count,
            "statuses": statuses,
        }
    )
    return summary


def evaluate(model, tokenizer, problems, golds, judge: MathJudge, max_new_tokens: int, batch_size: int = 64, instruction: str | None = DEFAULT_INSTRUCTION, system_prompt: str | None = None, progress: bool = True, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, prompt_template: str | None = None, benchmark: str | None = None):
    """Sample `samples` completions per problem (greedy by default), score them; returns (records, summary).

    `model` is a transformers model or a `VLLMPolicy`. Records come problem by problem, sample
    by sample, each with its `problem_index` and `sample_index`.
    """
    prompts = [format_prompt(tokenizer, problem, instruction, system_prompt, prompt_template) for problem in problems]
    add_special_tokens = not uses_chat_template(tokenizer, problems[0], prompt_template) if problems else False
    generations = sample_completions(model, tokenizer, prompts, samples, max_new_tokens, batch_size, temperature, top_p, seed, progress, add_special_tokens)

    records = []
    for index, generation in enumerate(generations):
        problem_index, sample_index = divmod(index, samples)
        head = {"benchmark": benchmark} if benchmark is not None else {}
        head.update({"problem_index": problem_index, "sample_index": sample_index, "prompt": prompts[problem_index], "gold": golds[problem_index]})
        records.append({**head, **generation})
    score_records(records, judge)
    return records, summarize(records)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


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


def write_json(data: dict, path: str | Path):
    """Write a JSON document through a temporary file, with NaN written as null so any JSON reader accepts it."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(finite(data), indent=2, default=str) + "\n")
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


def format_table(summaries: dict[str, dict]) -> str:
    """Return the per-benchmark results as an aligned text table (pass@1, pass@n with n = samples)."""
    sample_counts = {summary["samples"] for summary in summaries.values()}
    single_sample = sample_counts == {1}
    pass_at_n = f"pass@{next(iter(sample_counts))}" if len(sample_counts) == 1 else "pass@n"
    header = ("benchmark", "problems", "samples", "pass@1", *(() if single_sample else (pass_at_n,)), "tokens", "truncated", "fallback")
    rows = [header]
    for name, summary in summaries.items():
        samples = summary["samples"]
        pass_at_samples = () if single_sample else (f"{summary.get(f'pass@{samples}', float('nan')):.4f}",)
        rows.append(
            (
                name,
                f"{summary['num_scored']}/{summary['num_problems']}",
                str(samples),
                f"{summary['accuracy']:.4f}",
                *pass_at_samples,
                f"{summary['mean_completion_tokens']:.1f}",
                f"{summary['truncated_fraction']:.3f}",
                f"{summary['fallback_fraction']:.3f}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser, with a help text for every flag."""
    parser = argparse.ArgumentParser(description="Score a model or adapter on math benchmarks with the shared judge.")
    parser.add_argument("--model", default=None, help="Base or merged model folder or hub id (default: the embedded tiny model, or the adapter's base).")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder from init_lora.py or train_grpo.py (PiSSA, MiLoRA and OLoRA load their residual base).")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"), help="Generation engine; vllm needs a CUDA GPU.")
    parser.add_argument("--benchmark", default=None, help=f"Comma-separated benchmarks ({', '.join(BENCHMARKS)}) or local data files (default: arithmetic).")
    parser.add_argument("--data", default=None, help="One JSONL/JSON/parquet file, data set folder or hub data set id, in place of --benchmark.")
    parser.add_argument("--data-config", default=None, help="Hub data set configuration name.")
    parser.add_argument("--split", default=None, help="Data set split (default: the benchmark's, or test).")
    parser.add_argument("--problem-column", default=None, help="Column with the problem text or chat messages (default: the benchmark's, or problem).")
    parser.add_argument("--answer-column", default=None, help="Column with the gold answer, dots follow nested fields (default: the benchmark's, or answer).")
    parser.add_argument("--max-problems", type=int, default=None, help="Score only the first N problems of each benchmark.")
    parser.add_argument("--samples", type=int, default=1, help="Completions per problem (n in pass@k).")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 is greedy and allows one sample.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling probability mass, in (0, 1].")
    parser.add_argument("--seed", type=int, default=0, help="Random seed for sampling.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Generation length limit in tokens (default: 16 for arithmetic, 4096 otherwise).")
    parser.add_argument("--batch-size", type=int, default=64, help="Completions per generate call (transformers backend).")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="Text appended to plain problems for chat-template models ('' for none).")
    parser.add_argument("--system-prompt", default=None, help="System message for chat-template models.")
    parser.add_argument("--prompt-template", default=None, help="Python format string with {problem} (and optionally {instruction}) that replaces the chat template; '{problem}' gives the raw problem.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"), help="Model dtype.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device for generation (transformers backend).")
    parser.add_argument("--judge-timeout", type=float, default=5.0, help="Seconds the judge may spend on one completion before it scores 0.")
    parser.add_argument("--output-dir", default=None, help="Folder for BENCH.jsonl (one line per sample) and summary.json.")
    parser.add_argument("--output", default=None, help="JSONL file for one benchmark's samples, or the re-judged lines with --rescore.")
    parser.add_argument("--rescore", default=None, help="Re-judge this JSONL of saved generations instead of generating (needs --output).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def check_arguments(args) -> None:
    """Raise a clear error for invalid flag values; turns greedy sampling with --samples > 1 into one sample."""
    if args.samples < 1:
        raise ValueError(f"--samples must be a positive integer, got {args.samples}.")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}.")
    if args.max_problems is not None and args.max_problems < 1:
        raise ValueError(f"--max-problems must be a positive integer, got {args.max_problems}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    if args.prompt_template is not None:
        check_prompt_template(args.prompt_template)
    if args.output is not None and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output!r} is a folder; pass a file path, or use --output-dir.")
    if args.temperature == 0 and args.samples > 1:
        logger.warning("--temperature 0 is greedy decoding, whose samples are identical; using --samples 1 instead of %d.", args.samples)
        args.samples = 1


def load_model(args):
    """Load (model, tokenizer) for the chosen backend; raises when the adapter's base does not match --model."""
    from init_lora import load_policy, resolve_base

    model_name = args.model if (args.model or args.adapter) else DEFAULT_MODEL_DIR
    if args.backend == "transformers":
        return load_policy(model_name, args.adapter, dtype=args.dtype, device=args.device)

    from transformers import AutoTokenizer

    base_path = resolve_base(args.adapter, model_name) if args.adapter else model_name
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    return VLLMPolicy(base_path, args.adapter, tokenizer, dtype=args.dtype, seed=args.seed), tokenizer


def run_rescore(args) -> dict[str, dict]:
    """Re-judge saved generations into --output, print their table and return {benchmark: summary}."""
    if not args.output:
        raise ValueError("--rescore needs --output for the re-judged lines.")
    with MathJudge(timeout=args.judge_timeout) as judge:
        records = rescore(args.rescore, judge)
    write_jsonl(records, args.output)

    by_benchmark: dict[str, list[dict]] = {}
    for record in records:
        by_benchmark.setdefault(record.get("benchmark") or Path(args.rescore).stem, []).append(record)
    summaries = {name: summarize(group) for name, group in by_benchmark.items()}
    print(format_table(summaries))
    print(f"Re-judged {len(records)} completions, written to {args.output}")
    return summaries


def main(argv=None) -> dict[str, dict]:
    """Run the command line and return {benchmark: summary}."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.rescore:
        return run_rescore(args)

    # Validate everything before the first completion, so bad input leaves no result files.
    check_arguments(args)
    benchmarks = resolve_benchmarks(args.benchmark, args.data, args.split, args.data_config, args.problem_column, args.answer_column)
    if args.output and len(benchmarks) > 1:
        raise ValueError(f"--output takes one benchmark, got {', '.join(benchmarks)}; use --output-dir.")
    data = {}
    for name, benchmark in benchmarks.items():
        data[name] = load_problems(benchmark.path, benchmark.split, benchmark.problem_column, benchmark.answer_column, benchmark.config, args.max_problems, benchmark.gold)
    model, tokenizer = load_model(args)
    for problems, _ in data.values():
        for problem in problems:
            format_prompt(tokenizer, problem, args.instruction, args.system_prompt, args.prompt_template)

    setting_names = ("model", "adapter", "backend", "samples", "temperature", "top_p", "seed", "max_problems", "instruction", "system_prompt", "prompt_template", "dtype")
    settings = {key: getattr(args, key) for key in setting_names}
    settings["model"] = settings["model"] or (None if args.adapter else DEFAULT_MODEL_DIR)
    summaries = {}
    with MathJudge(timeout=args.judge_timeout) as judge:
        for name, benchmark in benchmarks.items():
            problems, golds = data[name]
            max_new_tokens = args.max_new_tokens or benchmark.max_new_tokens
            logger.info("Benchmark %s: %d problems x %d samples, max %d new tokens.", name, len(problems), args.samples, max_new_tokens)
            records, summary = evaluate(
                model, tokenizer, problems, golds, judge, max_new_tokens, args.batch_size, args.instruction, args.system_prompt,
                progress=not args.no_progress, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                seed=args.seed, prompt_template=args.prompt_template, benchmark=name,
            )
            if summary["truncated_fraction"] > 0.5:
                logger.warning("%s: %.0f%% of completions hit --max-new-tokens %d; raise it.", name, 100 * summary["truncated_fraction"], max_new_tokens)
            layout = {**asdict(benchmark), "gold": benchmark.gold.__name__, "max_new_tokens": max_new_tokens}
            summaries[name] = {**summary, "data": layout}
            if args.output:
                write_jsonl(records, args.output)
            if args.output_dir:
                write_jsonl(records, Path(args.output_dir) / f"{name}.jsonl")
                write_json({"settings": settings, "benchmarks": summaries}, Path(args.output_dir) / "summary.json")

    print(format_table(summaries))
    return summaries


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as error:
        sys.exit(f"error: {error}")
