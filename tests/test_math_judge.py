"""Tests of math_judge: answer extraction, math-verify scoring in worker processes, the
per-completion time bound (also from threads), and the TRL reward function."""

import _thread
import logging
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from math_judge import AccuracyReward, MathJudge, Verdict, extract_answer  # noqa: E402

SIGALRM_HANDLER_AT_IMPORT = signal.getsignal(signal.SIGALRM)
TIMEOUT = 2.0
SLACK = 1.5  # seconds allowed on top of TIMEOUT for killing the worker and the parent's loop
HOSTILE = r"The value is \boxed{9^{9^{9^{9}}}}"

# (completion, gold, expected reward) for the classes of answers the judge must get right.
SCORING_CASES = {
    "answer_line": ("... so the total is 34.\nAnswer: 34", "34", 1.0),
    "sqrt_shorthand": (r"\boxed{10\sqrt2}", r"10\sqrt{2}", 1.0),
    "fraction_vs_decimal": (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
    "sign_flip": (r"\boxed{-7}", "7", 0.0),
    "nested_braces": (r"so \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{\sqrt{2}}{2}", 1.0),
    "last_boxed_wins": (r"First \boxed{3}, corrected: \boxed{5}", "5", 1.0),
    "earlier_boxed_loses": (r"First \boxed{3}, corrected: \boxed{5}", "3", 0.0),
    "fbox": (r"\fbox{12}", "12", 1.0),
    "interval": (r"\boxed{(1,3]}", "(1, 3]", 1.0),
    "interval_wrong_bracket": (r"\boxed{[1,3]}", "(1, 3]", 0.0),
    "answer_line_latex": ("Thus\nAnswer: $\\frac{3}{4}$", "0.75", 1.0),
    "answer_line_bold": ("**Answer:** $10\\sqrt{2}$.", r"10\sqrt{2}", 1.0),
    "thousands_separator": (r"\boxed{1,000}", "1000", 1.0),
}


@pytest.fixture(scope="module")
def judge():
    with MathJudge(timeout=TIMEOUT, workers=2) as shared:
        shared.score([r"\boxed{\frac{1}{2}}"], ["0.5"])  # start the workers outside timed tests
        yield shared


def score_one(judge, completion, gold):
    return judge.score([completion], [gold])[0]


# --- extraction -------------------------------------------------------------

EXTRACTION_CASES = {
    "nested_braces": (r"x = \boxed{\frac{1}{\sqrt{2}}} done", False, (r"\frac{1}{\sqrt{2}}", "boxed")),
    "last_boxed": (r"\boxed{1} then \boxed{2}", False, ("2", "boxed")),
    "fbox": (r"\fbox{7}", False, ("7", "boxed")),
    "bare_boxed": (r"so $\boxed 5$", False, ("5", "boxed")),
    "escaped_brace": (r"\boxed{\{1, 2\}}", False, (r"\{1, 2\}", "boxed")),
    "unclosed_last_boxed": (r"\boxed{4} and \boxed{5", False, ("4", "boxed")),
    "empty_boxed": (r"\boxed{4} and \boxed{ }", False, ("4", "boxed")),
    "boxed_beats_answer_line": ("\\boxed{4}\nAnswer: 5", False, ("4", "boxed")),
    "answer_line": ("work\nAnswer: 34", False, ("34", "answer_line")),
    "last_answer_line": ("Answer: 3\nretry\nAnswer: 4", False, ("4", "answer_line")),
    "answer_line_dollars": ("Answer: $\\frac{3}{4}$.", False, (r"\frac{3}{4}", "answer_line")),
    "answer_line_bold": ("**Answer:** 12", False, ("12", "answer_line")),
    "answer_line_case": ("final answer: 9", False, ("9", "answer_line")),
    "answer_mid_line": ("The answer: 9", False, (None, None)),
    "fallback_off": ("The answer is **73**.", False, (None, None)),
    "fallback_on": ("The answer is **73**.", True, ("73", "fallback")),
    "fallback_separator": ("Total: 1,250 and 3-5", True, ("5", "fallback")),
    "fallback_thousands": ("It costs 1,250.", True, ("1250", "fallback")),
    "fallback_negative": ("so x = -4.5 here", True, ("-4.5", "fallback")),
    "nothing": ("no digits here", True, (None, None)),
}


@pytest.mark.parametrize("case", EXTRACTION_CASES)
def test_extract_answer(case):
    text, fallback, expected = EXTRACTION_CASES[case]
    assert extract_answer(text, fallback=fallback) == expected


# --- scoring ----------------------------------------------------------------


@pytest.mark.parametrize("case", SCORING_CASES)
def test_score_case(judge, case):
    completion, gold, reward = SCORING_CASES[case]
    verdict = score_one(judge, completion, gold)
    assert verdict.reward == reward
    assert verdict.status == ("correct" if reward else "wrong")


def test_score_answer_line_source(judge):
    verdict = score_one(judge, "... so the total is 34.\nAnswer: 34", "34")
    assert verdict == Verdict(1.0, "correct", "34", "answer_line")


def test_fallback_on_correct():
    with MathJudge(timeout=TIMEOUT, fallback=True) as judge:
        verdict = score_one(judge, "The answer is **73**.", "73")
    assert verdict == Verdict(1.0, "correct", "73", "fallback")


def test_fallback_off_no_answer(judge):
    verdict = score_one(judge, "The answer is **73**.", "73")
    assert verdict == Verdict(0.0, "no_answer", None, None)


def test_no_answer_latex_gold(judge):
    verdict = score_one(judge, "I could not finish.", r"\frac{3}{4}")
    assert verdict.status == "no_answer"
    assert verdict.reward == 0.0


@pytest.mark.parametrize("completion", [r"\boxed{\text{see figure}}", r"\boxed{5}", "no answer"])
def test_gold_unparseable_skipped(judge, completion):
    verdict = score_one(judge, completion, r"\text{see figure}")
    assert verdict.reward is None
    assert verdict.status == "gold_unparseable"


@pytest.mark.parametrize("gold", ["", "Proof omitted", None])
def test_gold_empty_prose_none_skipped(judge, gold):
    verdict = score_one(judge, r"\boxed{5}", gold)
    assert verdict.reward is None
    assert verdict.status == "gold_unparseable"


def test_gold_int_accepted(judge):
    assert score_one(judge, r"\boxed{34}", 34).reward == 1.0


def test_duplicates_scored_each(judge):
    verdicts = judge.score([r"\boxed{\frac{2}{3}}"] * 3 + [r"\boxed{\frac{4}{6}}"], [r"\frac{2}{3}"] * 4)
    assert [v.reward for v in verdicts] == [1.0, 1.0, 1.0, 1.0]


def test_counts_track_statuses(judge):
    before = judge.counts
    judge.score([r"\boxed{2}", r"\boxed{3}", "nothing", r"\boxed{1}"], ["2", "2", "2", r"\text{see figure}"])
    after = judge.counts
    assert after["correct"] - before["correct"] == 1
    assert after["wrong"] - before["wrong"] == 1
    assert after["no_answer"] - before["no_answer"] == 1
    assert after["gold_unparseable"] - before["gold_unparseable"] == 1


def test_score_length_mismatch(judge):
    with pytest.raises(ValueError, match="one gold per completion"):
        judge.score(["a", "b"], ["1"])


def test_score_non_string_completion(judge):
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        judge.score([["list"]], ["1"])


def test_score_bad_gold_type(judge):
    with pytest.raises(TypeError, match=r"golds\[0\]"):
        judge.score([r"\boxed{1}"], [1.5])


# --- time bound, threads, crashes --------------------------------------------


def test_hostile_times_out(judge, caplog):
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="math_judge"):
        verdicts = judge.score([HOSTILE, r"\boxed{\frac{1}{3}}"], ["5", r"\frac{1}{3}"])
    elapsed = time.monotonic() - start
    assert verdicts[0] == Verdict(0.0, "timeout", "9^{9^{9^{9}}}", "boxed")
    assert verdicts[1].reward == 1.0
    assert elapsed < TIMEOUT + SLACK
    assert "timed out" in caplog.text


def test_hostile_times_out_in_thread(judge):
    outputs = []
    thread = threading.Thread(target=lambda: outputs.append(judge.score([HOSTILE], ["6"])))
    start = time.monotonic()
    thread.start()
    thread.join(timeout=TIMEOUT + 30)
    elapsed = time.monotonic() - start
    assert outputs, "score() raised or hung in the thread"
    assert outputs[0][0].status == "timeout"
    assert outputs[0][0].reward == 0.0
    assert elapsed < TIMEOUT + SLACK


def test_thread_matches_main_thread(judge):
    completions = [case[0] for case in SCORING_CASES.values()] + [HOSTILE]
    golds = [case[1] for case in SCORING_CASES.values()] + ["5"]
    expected = judge.score(completions, golds)

    # A fresh judge whose workers start inside the thread, then serve the main thread after it ended.
    with MathJudge(timeout=TIMEOUT, workers=2) as thread_judge:
        outputs, errors = [], []

        def run():
            try:
                outputs.append(thread_judge.score(completions, golds))
            except Exception as error:  # noqa: BLE001 - reported by the assert below
                errors.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=60)
        assert errors == []
        assert outputs == [expected]
        assert score_one(thread_judge, r"\boxed{\sqrt{4}}", "2").reward == 1.0


def test_no_sigalrm_handler(judge):
    judge.score([r"\boxed{\pi}", HOSTILE], [r"\pi", "7"])
    assert signal.getsignal(signal.SIGALRM) is SIGALRM_HANDLER_AT_IMPORT


def kill_busy_worker(judge, killed):
    """Kill the worker process judging an item, as the OS out-of-memory killer would."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        busy = [worker for worker in judge._pool if worker.chunk and worker.process not in killed]  # private state
        if busy:
            busy[0].process.kill()
            busy[0].process.wait()
            killed.append(busy[0].process)
            return
        time.sleep(0.005)
    raise AssertionError("no worker picked up the item")


def test_worker_crash_retried_once(judge):
    outputs = []
    thread = threading.Thread(target=lambda: outputs.append(judge.score([r"\boxed{\frac{7}{4}}", HOSTILE], ["1.75", "8"])))
    thread.start()
    kill_busy_worker(judge, [])
    thread.join(timeout=30)
    assert outputs[0][0].status == "correct"
    assert outputs[0][1].status == "timeout"


def test_worker_crash_twice_error(judge, caplog):
    outputs = []
    thread = threading.Thread(target=lambda: outputs.append(judge.score([HOSTILE], ["10"])))
    killed = []
    with caplog.at_level(logging.ERROR, logger="math_judge"):
        thread.start()
        kill_busy_worker(judge, killed)
        kill_busy_worker(judge, killed)
        thread.join(timeout=30)
    assert outputs[0][0] == Verdict(0.0, "error", "9^{9^{9^{9}}}", "boxed")
    assert "exited with code -9" in caplog.text
    assert "The value is" in caplog.text


def test_interrupt_stops_busy_workers(judge):
    timer = threading.Timer(0.3, _thread.interrupt_main)  # Ctrl-C while the workers are busy
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        judge.score([HOSTILE, r"\boxed{\frac{5}{4}}"], ["9", "1.25"])
    timer.join()
    verdicts = judge.score([r"\boxed{\frac{1}{4}}", r"\boxed{\frac{1}{5}}"], ["0.25", "0.25"])
    assert [verdict.status for verdict in verdicts] == ["correct", "wrong"]


def test_idle_worker_killed_replaced(judge):
    for worker in judge._pool:
        worker.process.kill()
        worker.process.wait()
    assert score_one(judge, r"\boxed{\frac{10}{4}}", "2.5").reward == 1.0


# --- lifecycle ----------------------------------------------------------------


def test_close_stops_workers():
    judge = MathJudge(timeout=TIMEOUT, workers=1)
    judge.score([r"\boxed{\frac{1}{2}}"], ["0.5"])
    processes = [worker.process for worker in judge._pool]
    judge.close()
    assert processes
    assert all(process.poll() is not None for process in processes)
    with pytest.raises(RuntimeError, match="after close"):
        judge.score(["x"], ["1"])


def test_pickle_keeps_config():
    judge = pickle.loads(pickle.dumps(MathJudge(timeout=3.0, workers=1, fallback=True)))
    assert (judge.timeout, judge.workers, judge.fallback) == (3.0, 1, True)
    judge.close()


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"workers": 0}])
def test_judge_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        MathJudge(**kwargs)


# --- TRL reward function ----------------------------------------------------------


class MetricCollector:
    def __init__(self):
        self.values = {}

    def __call__(self, name, value):
        self.values[name] = value


def test_accuracy_reward_conversational(judge):
    groups = [
        ("34", [r"\boxed{34}", "Answer: 35"]),
        ("0.75", [r"\boxed{\frac{3}{4}}", "I give up"]),
        ("7", [r"\boxed{-7}", "Answer: -7"]),
        (r"\text{see figure}", [r"\boxed{1}", r"\boxed{2}"]),
    ]
    completions = [[{"role": "assistant", "content": text}] for _, texts in groups for text in texts]
    answers = [gold for gold, texts in groups for _ in texts]
    collector = MetricCollector()
    extra = {}
    reward = AccuracyReward(judge, num_generations=2)

    rewards = reward(
        prompts=[[{"role": "user", "content": "q"}]] * len(completions),
        completions=completions,
        completion_ids=[[0]] * len(completions),
        answer=answers,
        trainer_state=None,
        log_metric=collector,
        log_extra=lambda column, values: extra.setdefault(column, values),
    )

    assert reward.__name__ == "accuracy"
    assert rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, None, None]
    assert collector.values["accuracy/correct"] == 2 / 8
    assert collector.values["accuracy/no_answer"] == 1 / 8
    assert collector.values["accuracy/timeout"] == 0.0
    assert collector.values["accuracy/error"] == 0.0
    assert collector.values["accuracy/skipped"] == 2 / 8
    assert collector.values["accuracy/zero_std_groups"] == 1 / 3
    assert extra["extracted_answer"][1] == "35"
    assert extra["judge_status"][3] == "no_answer"


def test_accuracy_reward_plain_strings(judge):
    collector = MetricCollector()
    rewards = AccuracyReward(judge)(
        prompts=["q", "q"], completions=[r"\boxed{2}", "Answer: 3"], answer=[2, "3"], log_metric=collector
    )
    assert rewards == [1.0, 1.0]
    assert "accuracy/zero_std_groups" not in collector.values


def test_accuracy_reward_last_assistant_message(judge):
    completion = [
        {"role": "assistant", "content": r"\boxed{1}"},
        {"role": "tool", "content": r"\boxed{2}"},
        {"role": "assistant", "content": [{"type": "text", "text": r"\boxed{3}"}]},
    ]
    assert AccuracyReward(judge)(prompts=["q"], completions=[completion], answer=["3"]) == [1.0]


def test_accuracy_reward_partial_groups(judge):
    collector = MetricCollector()
    AccuracyReward(judge, num_generations=2)(
        prompts=["q"] * 3, completions=[r"\boxed{1}"] * 3, answer=["1"] * 3, log_metric=collector
    )
    assert "accuracy/zero_std_groups" not in collector.values
    assert collector.values["accuracy/correct"] == 1.0


def test_accuracy_reward_custom_column(judge):
    reward = AccuracyReward(judge, answer_column="solution")
    assert reward(prompts=["q"], completions=[r"\boxed{4}"], solution=["4"]) == [1.0]


def test_accuracy_reward_missing_column(judge):
    with pytest.raises(ValueError, match="'answer'"):
        AccuracyReward(judge)(prompts=["q"], completions=[r"\boxed{4}"], solution=["4"])


def test_broken_worker_raises(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # every worker exits at once with code 1
    judge = MathJudge(timeout=TIMEOUT, workers=1)
    with pytest.raises(RuntimeError, match="before it was ready, 3 times in a row"):
        judge.score([r"\boxed{\frac{1}{2}}"], ["0.5"])
    judge.close()
