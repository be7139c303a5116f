"""Training data of train_grpo.py: load the problems and check them before anything is written.

`build_train_dataset` returns a `datasets.Dataset` with a `prompt` column (text, or chat
messages for models with a chat template) and an `answer` column of gold answers. `check_data`
then drops training problems that could never give a reward (a prompt longer than the model's
context leaves, a gold answer math-verify cannot parse) with a logged count, and raises a clear
error where dropping would change what is measured (held-out problems) or would leave nothing.
"""

import logging
from pathlib import Path

from eval_math import format_prompt, load_problems, uses_chat_template
from math_judge import MathJudge

logger = logging.getLogger(__name__)


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


def check_data(train_dataset, test_problems, test_golds, tokenizer, model_config, script_args, training_args):
    """Check the training and held-out data; returns the training set to train on.

    Training problems whose prompt is too long for the model's context or whose gold answer
    math-verify cannot parse are dropped with a logged count. Held-out problems are never dropped,
    because that would change what the accuracy counts: a held-out prompt that is too long raises.
    """
    train_dataset = drop_long_prompts(train_dataset, tokenizer, model_config, training_args)
    check_test_prompts(test_problems, tokenizer, model_config, script_args)
    train_dataset = drop_unparseable_golds(train_dataset, test_golds, script_args.judge_timeout)

    # GRPOTrainer's sampler yields only full generation batches, so a smaller set trains 0 steps.
    prompts_per_batch = training_args.generation_batch_size // training_args.num_generations
    if len(train_dataset) < prompts_per_batch:
        raise ValueError(
            f"The training set has {len(train_dataset)} usable problems, fewer than the {prompts_per_batch} distinct prompts of "
            f"one generation batch (generation_batch_size {training_args.generation_batch_size} / num_generations "
            f"{training_args.num_generations}), so GRPO would train 0 steps. Add problems or lower --per_device_train_batch_size."
        )
    return train_dataset


def check_not_empty(data: str, flag: str):
    """Raise a clear error for a local JSON or JSONL data file without any content.

    datasets 5.2 fails on such a file with StopIteration or "corresponds to no data". This check
    runs first so the message names the flag.
    """
    path = Path(data)
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            if chunk.strip():
                return
    raise ValueError(f"{flag} {data!r} is empty. Pass a data file with one problem per line.")


def context_limit(model_config, new_tokens: int, flag: str) -> int | None:
    """Return the max prompt length in tokens that leaves `new_tokens` of the model's context, or None if unknown."""
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if max_positions is None:
        logger.warning("The model config has no max_position_embeddings, so prompt lengths are not checked.")
        return None
    if new_tokens >= max_positions:
        raise ValueError(
            f"{flag} {new_tokens} leaves no room for a prompt in the model's context of {max_positions} tokens "
            f"(max_position_embeddings). Pass {flag} below {max_positions}."
        )
    return max_positions - new_tokens


def prompt_token_counts(prompts, tokenizer, chat_template_kwargs: dict | None = None) -> list[int]:
    """Return the length in tokens of each training prompt as GRPOTrainer (TRL 1.16) tokenizes it.

    Text is tokenized with the tokenizer's special tokens; chat messages go through the chat
    template with the generation prompt.
    """
    counts = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            counts.append(len(tokenizer(prompt)["input_ids"]))
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"Training problem {index} is a list of chat messages, but the tokenizer of --model has no chat template. "
                "Pass plain-text problems or a model with a chat template."
            )
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {}))
        counts.append(len(encoded["input_ids"]))
    return counts


def drop_long_prompts(train_dataset, tokenizer, model_config, training_args):
    """Drop training problems whose prompt leaves fewer than --max_completion_length tokens of the context."""
    limit = context_limit(model_config, training_args.max_completion_length, "--max_completion_length")
    if limit is None:
        return train_dataset
    counts = prompt_token_counts(train_dataset["prompt"], tokenizer, training_args.chat_template_kwargs)
    keep = [index for index, count in enumerate(counts) if count <= limit]
    if len(keep) == len(counts):
        return train_dataset

    too_long = (
        f"longer than {limit} tokens, the model's context of {model_config.max_position_embeddings} tokens minus "
        f"--max_completion_length {training_args.max_completion_length} (the longest has {max(counts)} tokens)"
    )
    if not keep:
        raise ValueError(f"All {len(counts)} training prompts are {too_long}. Lower --max_completion_length or pass shorter problems.")
    logger.warning("Dropping %d of %d training prompts that are %s.", len(counts) - len(keep), len(counts), too_long)
    return train_dataset.select(keep)


def check_test_prompts(problems, tokenizer, model_config, script_args):
    """Raise if a held-out prompt leaves fewer than --test_max_new_tokens tokens of the model's context."""
    limit = context_limit(model_config, script_args.test_max_new_tokens, "--test_max_new_tokens")
    if limit is None:
        return
    counts = []
    for problem in problems:
        text = format_prompt(tokenizer, problem, script_args.instruction)
        counts.append(len(tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, problem))["input_ids"]))
    too_long = sum(count > limit for count in counts)
    if too_long:
        raise ValueError(
            f"{too_long} of {len(counts)} held-out prompts are longer than {limit} tokens, the model's context of "
            f"{model_config.max_position_embeddings} tokens minus --test_max_new_tokens {script_args.test_max_new_tokens} "
            f"(the longest has {max(counts)} tokens). Lower --test_max_new_tokens or pass held-out problems that fit."
        )


def unparseable_golds(golds, judge_timeout: float) -> list[int]:
    """Return the indices of the gold answers that math-verify cannot parse, judging each gold once.

    The judge scores every completion of such a problem None (status gold_unparseable).
    """
    with MathJudge(timeout=judge_timeout) as judge:
        verdicts = judge.score([""] * len(golds), list(golds))
    return [index for index, verdict in enumerate(verdicts) if verdict.status == "gold_unparseable"]


def drop_unparseable_golds(train_dataset, test_golds, judge_timeout: float):
    """Drop training problems whose gold answer cannot be parsed; raise if no training or no held-out gold can."""
    train_golds = list(train_dataset["answer"])
    unparseable = unparseable_golds(train_golds + list(test_golds), judge_timeout)
    train_bad = [index for index in unparseable if index < len(train_golds)]
    test_bad = len(unparseable) - len(train_bad)

    if len(train_bad) == len(train_golds):
        raise ValueError(
            f"math-verify cannot parse the gold answer of any of the {len(train_golds)} training problems (the first is "
            f"{train_golds[0]!r}), so every reward would be None. Check --answer_column."
        )
    if test_bad == len(test_golds):
        raise ValueError(
            f"math-verify cannot parse the gold answer of any of the {len(test_golds)} held-out problems (the first is "
            f"{test_golds[0]!r}), so the held-out accuracy is undefined. Check --test_answer_column."
        )
    if test_bad:
        logger.warning("%d of %d held-out gold answers cannot be parsed by math-verify; the accuracy leaves those problems out.", test_bad, len(test_golds))
    if train_bad:
        logger.warning(
            "Dropping the %d of %d training problems whose gold answer math-verify cannot parse (the first is %r), because "
            "their completions would get no reward.", len(train_bad), len(train_golds), train_golds[train_bad[0]],
        )
        bad = set(train_bad)
        train_dataset = train_dataset.select([index for index in range(len(train_golds)) if index not in bad])
    return train_dataset
