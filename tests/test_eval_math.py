"""eval_math.py on the embedded tiny model: benchmarks table, sampling, pass@k, rescoring and bad input."""

import dataclasses
import importlib.util
import json
import runpy
import subprocess
import sys
import types
from pathlib import Path

import datasets
import pandas as pd
import pytest

import eval_math
import init_lora
from build_default import DEFAULT_MODEL_DIR
from math_judge import MathJudge

REPOSITORY = Path(__file__).resolve().parent.parent
MATH_SAMPLE = Path(__file__).resolve().parent / "data" / "math500_sample.jsonl"

# Hand-written completions for the five problems of MATH_SAMPLE, with the verdict each must get:
# (completion, correct, fallback_extracted, fallback_correct).
MATH_COMPLETIONS = [
    ("Dividing by 2 gives \\boxed{0.75}.", 1.0, None, None),
    ("Since 8 = 4 * 2, we get \\boxed{\\sqrt{8}}.", 1.0, None, None),
    ("The set is \\boxed{[1, 3]}.", 0.0, None, None),
    ("Polar form: \\boxed{(3, \\frac{\\pi}{2})}", 1.0, None, None),
    ("He has 4 + 6 = 10 apples.", 0.0, "10", 1.0),
]


@pytest.fixture(scope="module")
def judge():
    with MathJudge(timeout=5.0, workers=1) as shared_judge:
        yield shared_judge


@pytest.fixture(scope="module")
def policy():
    return init_lora.load_policy(DEFAULT_MODEL_DIR, None)


@pytest.fixture(scope="module")
def arithmetic():
    benchmark = eval_math.BENCHMARKS["arithmetic"]
    return eval_math.load_problems(benchmark.path, benchmark.split, benchmark.problem_column, benchmark.answer_column, limit=6)


def run_cli(*argv):
    """Run eval_math.main in this process and return its {benchmark: summary}."""
    return eval_math.main(["--no-progress", "--judge-timeout", "5", *argv])


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# pass@k and the summary
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),  # pass@1 is c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),
        (4, 3, 2, 1.0),  # n - c < k: every k-subset contains a correct sample
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert eval_math.pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        eval_math.pass_at_k(n, c, k)


def test_summarize_averages_problems():
    correct = {0: [1, 0, 0, 0], 1: [1, 1, 0, 1]}  # c = 1 and c = 3 of n = 4
    records = [
        {"problem_index": problem, "sample_index": sample, "correct": float(value), "status": "correct" if value else "wrong", "num_tokens": 2 + sample, "truncated": sample == 3}
        for problem, values in correct.items()
        for sample, value in enumerate(values)
    ]
    summary = eval_math.summarize(records)
    assert summary["samples"] == 4
    assert summary["pass@1"] == pytest.approx((0.25 + 0.75) / 2)
    assert summary["pass@2"] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)
    assert summary["pass@4"] == pytest.approx(1.0)
    assert summary["accuracy"] == summary["pass@1"]
    assert summary["mean_completion_tokens"] == pytest.approx(3.5)
    assert summary["truncated_fraction"] == pytest.approx(0.25)


def test_summarize_skips_unparseable_gold():
    records = [
        {"problem_index": 0, "correct": 1.0, "status": "correct"},
        {"problem_index": 1, "correct": None, "status": "gold_unparseable"},
    ]
    summary = eval_math.summarize(records)
    assert summary["num_problems"] == 2
    assert summary["num_scored"] == 1
    assert summary["accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------
# Benchmarks table and data loading
# ----------------------------------------------------------------------------------------------


def test_gsm8k_gold_number_after_marker():
    assert eval_math.gsm8k_gold("She pays 2 * 617 = 1234.\n#### 1,234") == "1234"
    assert eval_math.gsm8k_gold("#### -5") == "-5"


def test_gsm8k_gold_without_marker_rejected():
    with pytest.raises(ValueError, match="no '####' marker"):
        eval_math.gsm8k_gold("The answer is 12.")


def test_olympiadbench_gold_drops_dollars():
    assert eval_math.dollar_free_gold("$\\frac{1}{2}$") == "\\frac{1}{2}"
    assert eval_math.dollar_free_gold("$5$, $7$") == "5, 7"


def test_plain_gold_integral_float():
    assert eval_math.plain_gold(27.0) == "27"
    assert eval_math.plain_gold(None) is None


def test_table_lists_every_benchmark():
    assert set(eval_math.BENCHMARKS) == {"math500", "aime24", "aime25", "amc23", "gsm8k", "minerva", "olympiadbench", "arithmetic"}
    gsm8k = eval_math.BENCHMARKS["gsm8k"]
    assert (gsm8k.path, gsm8k.config, gsm8k.split) == ("openai/gsm8k", "main", "test")


def test_gsm8k_hub_layout_folder(tmp_path, monkeypatch):
    """A local copy in the hub repository layout (README configs + parquet shards) loads with config main."""
    folder = tmp_path / "gsm8k"
    (folder / "main").mkdir(parents=True)
    answers = ["Natalia sold 48 / 2 = 24 clips in May.\n#### 72", "It costs 1,000 + 234.\n#### 1,234"]
    pd.DataFrame({"question": ["How many clips?", "How much?"], "answer": answers}).to_parquet(folder / "main" / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test-*\n---\n")
    monkeypatch.setitem(eval_math.BENCHMARKS, "gsm8k", dataclasses.replace(eval_math.BENCHMARKS["gsm8k"], path=str(folder)))

    benchmark = eval_math.resolve_benchmarks("gsm8k")["gsm8k"]
    problems, golds = eval_math.load_problems(benchmark.path, benchmark.split, benchmark.problem_column, benchmark.answer_column, benchmark.config, gold=benchmark.gold)
    assert problems == ["How many clips?", "How much?"]
    assert golds == ["72", "1234"]


def test_math500_save_to_disk_folder(tmp_path, monkeypatch):
    rows = [json.loads(line) for line in MATH_SAMPLE.read_text().splitlines()]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "math500"))
    monkeypatch.setitem(eval_math.BENCHMARKS, "math500", dataclasses.replace(eval_math.BENCHMARKS["math500"], path=str(tmp_path / "math500")))

    benchmark = eval_math.resolve_benchmarks("math500")["math500"]
    problems, golds = eval_math.load_problems(benchmark.path, benchmark.split, benchmark.problem_column, benchmark.answer_column, limit=3)
    assert len(problems) == 3
    assert golds == ["\\frac{3}{4}", "2\\sqrt{2}", "(1, 3]"]


def test_resolve_local_file_named_by_stem():
    resolved = eval_math.resolve_benchmarks(f"arithmetic,{MATH_SAMPLE}")
    assert list(resolved) == ["arithmetic", "math500_sample"]
    assert resolved["math500_sample"].problem_column == "problem"


def test_unknown_benchmark_lists_known():
    with pytest.raises(ValueError, match="Unknown benchmark 'math5000'. Known benchmarks: math500, aime24"):
        eval_math.resolve_benchmarks("math5000")


def test_missing_column_names_found():
    with pytest.raises(ValueError, match="column 'question' is missing .* columns found: problem, solution, answer"):
        eval_math.load_problems(str(MATH_SAMPLE), "test", "question", "answer")


def test_column_override_needs_one_benchmark():
    with pytest.raises(ValueError, match="apply to one benchmark"):
        eval_math.resolve_benchmarks("math500,aime24", problem_column="question")


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def test_prompt_raw_without_chat_template(policy):
    _, tokenizer = policy
    assert eval_math.format_prompt(tokenizer, "What is 2 + 3?") == "What is 2 + 3?"


def test_prompt_template_fills_problem(policy):
    _, tokenizer = policy
    prompt = eval_math.format_prompt(tokenizer, "What is 2 + 3?", "Box it.", prompt_template="Q: {problem}\n{instruction}\nA:")
    assert prompt == "Q: What is 2 + 3?\nBox it.\nA:"


def test_prompt_chat_template_gets_instruction(policy):
    _, tokenizer = policy
    chat_tokenizer = type(tokenizer).from_pretrained(DEFAULT_MODEL_DIR)
    chat_tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    prompt = eval_math.format_prompt(chat_tokenizer, "What is 2 + 3?", "Box it.", system_prompt="Be brief.")
    assert prompt == "<system>Be brief.<user>What is 2 + 3?\nBox it.<assistant>"


@pytest.mark.parametrize("template", ["Solve: {question}", "No field", "\\boxed{} {problem}"])
def test_prompt_template_invalid_rejected(template):
    with pytest.raises(ValueError, match="--prompt-template"):
        eval_math.check_prompt_template(template)


def test_chat_template_prompts_generate(policy, judge):
    model, tokenizer = policy
    chat_tokenizer = type(tokenizer).from_pretrained(DEFAULT_MODEL_DIR)
    chat_tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    records, summary = eval_math.evaluate(model, chat_tokenizer, ["What is 2 + 3?"], ["5"], judge, max_new_tokens=2, instruction="Box it.", progress=False)
    assert records[0]["prompt"] == "<user>What is 2 + 3?\nBox it.<assistant>"
    assert records[0]["num_tokens"] <= 2
    assert summary["num_problems"] == 1


def test_system_prompt_without_template_rejected(policy):
    _, tokenizer = policy
    with pytest.raises(ValueError, match="--system-prompt needs a chat template"):
        eval_math.format_prompt(tokenizer, "What is 2 + 3?", system_prompt="Be brief.")


# ----------------------------------------------------------------------------------------------
# Generation on the embedded model
# ----------------------------------------------------------------------------------------------


def test_greedy_runs_identical(policy, arithmetic, judge):
    model, tokenizer = policy
    problems, golds = arithmetic
    first, summary = eval_math.evaluate(model, tokenizer, problems, golds, judge, max_new_tokens=16, batch_size=4, progress=False)
    second, _ = eval_math.evaluate(model, tokenizer, problems, golds, judge, max_new_tokens=16, batch_size=4, progress=False)
    assert [record["completion"] for record in first] == [record["completion"] for record in second]
    assert summary["num_problems"] == len(problems)
    assert summary["accuracy"] > 0  # the embedded model solves some arithmetic greedily


def test_sampling_same_seed_same_samples(policy, arithmetic, judge):
    model, tokenizer = policy
    problems, golds = arithmetic
    options = {"max_new_tokens": 12, "samples": 3, "temperature": 1.0, "top_p": 0.95, "progress": False}
    first, _ = eval_math.evaluate(model, tokenizer, problems[:3], golds[:3], judge, seed=7, **options)
    second, _ = eval_math.evaluate(model, tokenizer, problems[:3], golds[:3], judge, seed=7, **options)
    assert [record["completion"] for record in first] == [record["completion"] for record in second]


def test_sampling_k4_arithmetic_files(tmp_path):
    summaries = run_cli("--max-problems", "3", "--samples", "4", "--temperature", "0.6", "--top-p", "0.95", "--output-dir", str(tmp_path))
    records = read_lines(tmp_path / "arithmetic.jsonl")
    summary = json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["arithmetic"]

    assert [(record["problem_index"], record["sample_index"]) for record in records] == [(p, s) for p in range(3) for s in range(4)]
    assert summary["pass@1"] == pytest.approx(summaries["arithmetic"]["pass@1"])
    correct = [sum(record["correct"] for record in records if record["problem_index"] == p) for p in range(3)]
    assert summary["pass@1"] == pytest.approx(sum(correct) / 12)
    assert summary["pass@2"] == pytest.approx(sum(eval_math.pass_at_k(4, int(c), 2) for c in correct) / 3)
    assert summary["pass@4"] == pytest.approx(sum(c > 0 for c in correct) / 3)
    assert summary["samples"] == 4
    assert summary["data"]["max_new_tokens"] == 16
    assert all(record["num_tokens"] <= 16 for record in records)


def test_truncation_counted(tmp_path):
    run_cli("--max-problems", "2", "--max-new-tokens", "3", "--output", str(tmp_path / "short.jsonl"))
    records = read_lines(tmp_path / "short.jsonl")
    assert all(record["truncated"] for record in records)
    assert all(record["num_tokens"] == 3 for record in records)


def test_greedy_with_samples_uses_one(tmp_path, caplog):
    summaries = run_cli("--max-problems", "2", "--samples", "4", "--output-dir", str(tmp_path))
    assert summaries["arithmetic"]["samples"] == 1
    assert len(read_lines(tmp_path / "arithmetic.jsonl")) == 2
    assert "using --samples 1" in caplog.text


def test_math_layout_file_pipeline(tmp_path):
    run_cli("--benchmark", str(MATH_SAMPLE), "--max-new-tokens", "4", "--output-dir", str(tmp_path))
    records = read_lines(tmp_path / "math500_sample.jsonl")
    assert [record["gold"] for record in records] == ["\\frac{3}{4}", "2\\sqrt{2}", "(1, 3]", "\\left( 3, \\frac{\\pi}{2} \\right)", "10"]
    assert records[0]["prompt"].startswith("Simplify $\\frac{6}{8}$.")


def test_rescore_latex_answers(tmp_path):
    run_cli("--benchmark", str(MATH_SAMPLE), "--max-new-tokens", "2", "--output", str(tmp_path / "generated.jsonl"))
    records = read_lines(tmp_path / "generated.jsonl")
    for record, (completion, *_) in zip(records, MATH_COMPLETIONS):
        record["completion"] = completion
    eval_math.write_jsonl(records, tmp_path / "handwritten.jsonl")

    summaries = run_cli("--rescore", str(tmp_path / "handwritten.jsonl"), "--output", str(tmp_path / "rescored.jsonl"))
    rescored = read_lines(tmp_path / "rescored.jsonl")
    assert [record["completion"] for record in rescored] == [completion for completion, *_ in MATH_COMPLETIONS]
    for record, (_, correct, fallback_extracted, fallback_correct) in zip(rescored, MATH_COMPLETIONS):
        assert record["correct"] == correct, record
        assert record["fallback_extracted"] == fallback_extracted, record
        assert record["fallback_correct"] == fallback_correct, record
    assert rescored[1]["extracted"] == "\\sqrt{8}"
    assert summaries["math500_sample"]["accuracy"] == pytest.approx(3 / 5)
    assert summaries["math500_sample"]["fallback_fraction"] == pytest.approx(1 / 5)


def test_fallback_judge_never_counts(judge):
    records = [{"completion": "so 12 apples", "gold": "12"}]
    with MathJudge(timeout=5.0, workers=1, fallback=True) as fallback_judge:
        eval_math.score_records(records, fallback_judge)
    assert records[0]["correct"] == 0.0
    assert records[0]["fallback_correct"] == 1.0


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pissa_adapter(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("adapters") / "pissa"
    init_lora.main(["--init", "pissa", "--rank", "4", "--output-dir", str(output_dir)])
    return output_dir


def test_pissa_adapter_matches_base(pissa_adapter, tmp_path):
    run_cli("--max-problems", "6", "--output", str(tmp_path / "base.jsonl"))
    run_cli("--adapter", str(pissa_adapter), "--max-problems", "6", "--output", str(tmp_path / "pissa.jsonl"))
    base = [record["completion"] for record in read_lines(tmp_path / "base.jsonl")]
    adapted = [record["completion"] for record in read_lines(tmp_path / "pissa.jsonl")]
    assert adapted == base  # residual base + B A equals the original weights at step 0


def test_adapter_other_base_rejected(pissa_adapter, tmp_path):
    other_model = tmp_path / "other-model"
    other_model.mkdir()
    with pytest.raises(ValueError, match="was initialized from model"):
        run_cli("--model", str(other_model), "--adapter", str(pissa_adapter), "--output-dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def install_fake_vllm(monkeypatch, calls):
    """Put a stand-in `vllm` package into sys.modules that records its calls (vLLM needs a CUDA GPU)."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LoRARequest:
        def __init__(self, name, number, path):
            calls["lora_request"] = (name, number, path)

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, prompts, params, use_tqdm, lora_request):
            calls["prompts"], calls["params"] = prompts, params
            finished = types.SimpleNamespace(text=" \\boxed{7}", token_ids=[5, 6, 1], finish_reason="stop")  # 1 is the eos id
            cut = types.SimpleNamespace(text=" 7 7", token_ids=[5, 6, 7], finish_reason="length")
            return [types.SimpleNamespace(outputs=[finished, cut][: params.n]) for _ in prompts]

    package = types.ModuleType("vllm")
    package.LLM, package.SamplingParams = LLM, SamplingParams
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", package)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)


def test_vllm_backend_serves_residual_adapter(pissa_adapter, policy, tmp_path, monkeypatch):
    calls = {}
    install_fake_vllm(monkeypatch, calls)
    run_cli("--backend", "vllm", "--adapter", str(pissa_adapter), "--max-problems", "2", "--samples", "2", "--temperature", "0.6", "--output-dir", str(tmp_path))

    metadata = json.loads((pissa_adapter / "init_metadata.json").read_text())
    assert calls["engine"]["model"] == str((pissa_adapter / metadata["residual_base"]).resolve())
    assert calls["engine"]["enable_lora"] is True
    assert calls["engine"]["max_lora_rank"] == 8  # rank 4 rounded up to the smallest rank vLLM accepts
    assert calls["lora_request"][2] == str(pissa_adapter.resolve())
    assert (calls["params"].n, calls["params"].temperature, calls["params"].max_tokens) == (2, 0.6, 16)

    records = read_lines(tmp_path / "arithmetic.jsonl")
    _, tokenizer = policy
    assert calls["prompts"][0] == {"prompt_token_ids": tokenizer(records[0]["prompt"])["input_ids"]}
    assert [(record["problem_index"], record["sample_index"]) for record in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [record["num_tokens"] for record in records] == [2, 3, 2, 3]
    assert [record["truncated"] for record in records] == [False, True, False, True]
    assert [record["fallback_extracted"] for record in records] == [None, "7", None, "7"]

    run_cli("--adapter", str(pissa_adapter), "--max-problems", "2", "--output-dir", str(tmp_path / "transformers"))
    assert list(records[0]) == list(read_lines(tmp_path / "transformers" / "arithmetic.jsonl")[0])


# ----------------------------------------------------------------------------------------------
# Bad input: clear error, no result files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "0"], "--samples must be a positive integer, got 0"),
        (["--top-p", "0"], "--top-p must be in"),
        (["--benchmark", "math5000"], "Unknown benchmark 'math5000'"),
        (["--benchmark", str(MATH_SAMPLE), "--problem-column", "question"], "columns found: problem, solution, answer"),
        (["--benchmark", "arithmetic,arithmetic"], "named twice"),
        (["--benchmark", f"arithmetic,{MATH_SAMPLE}", "--output", "x.jsonl"], "--output takes one benchmark"),
        (["--prompt-template", "Solve {question}"], "must contain \\{problem\\}"),
        (["--system-prompt", "Be brief."], "--system-prompt needs a chat template"),
    ],
)
def test_bad_input_no_files(tmp_path, argv, message):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_cli(*argv, "--output-dir", str(output_dir))
    assert not output_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_missing_clear_error(tmp_path):
    with pytest.raises(ImportError, match="pip install vllm"):
        run_cli("--backend", "vllm", "--output-dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_output_file(tmp_path):
    """The single-file usage works as a script."""
    command = [sys.executable, "eval_math.py", "--max-problems", "4", "--no-progress", "--output", str(tmp_path / "eval.jsonl")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPOSITORY)
    assert completed.returncode == 0, completed.stderr
    assert "pass@1" in completed.stdout
    assert len(read_lines(tmp_path / "eval.jsonl")) == 4


def test_script_bad_input_exits_with_message(tmp_path, monkeypatch):
    """Run as a script, bad input exits with one error line (run in this process to skip a second start-up)."""
    monkeypatch.setattr(sys, "argv", ["eval_math.py", "--samples", "0", "--output", str(tmp_path / "bad.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPOSITORY / "eval_math.py"), run_name="__main__")
    assert str(exit_info.value.code).startswith("error: --samples must be a positive integer")
    assert not (tmp_path / "bad.jsonl").exists()
