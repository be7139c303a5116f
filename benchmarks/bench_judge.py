"""Benchmark math_judge.MathJudge against TRL's `trl.rewards.accuracy_reward` on the same completions.

Generates synthetic completions (seeded), --group per problem as in a GRPO batch:
a few hundred characters of reasoning, then a right answer in the same or another form, a wrong answer, no answer, or an
`Answer:` line, against integer, LaTeX and prose (unparseable) gold answers, plus a
few hostile answers (power towers) that make sympy run for minutes. Prints
completions per second for both judges on the normal cases in batches of --batch
(one GRPO step each), their mean reward per kind of completion, and the wall time of
each hostile completion scored alone.

TRL's function is run on the normal cases in the main thread, where its
`signal.alarm` timeouts work, and on one hostile case, which costs its full 5 s
verify timeout (in a worker thread it would have no timeout at all).

    python benchmarks/bench_judge.py            # 5000 normal + 4 hostile completions
    python benchmarks/bench_judge.py --n 20000 --batch 256
"""

import argparse
import logging
import os
import platform
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from math_judge import MathJudge  # noqa: E402

HOSTILE_ANSWERS = [r"9^{9^{9^{9}}}", r"2^{2^{40}}", r"10^{10^{10}}", r"(10^{10^{8}})!"]

FILLER = [
    "We first write down what is given.",
    "Substituting $x = {a}$ gives ${a} + {b} = {c}$.",
    "Checking the case $n = {a}$ separately, nothing changes.",
    "Multiplying both sides by {b} we get {c}.",
    "So the remaining part is $\\frac{{{a}}}{{{b}}}$ of the total.",
    "This is consistent with the constraint from the first step.",
]


def make_reasoning(rng: random.Random) -> str:
    """Return a few hundred characters of filler reasoning containing numbers and inline math."""
    sentences = []
    for _ in range(rng.randint(4, 9)):
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        sentences.append(rng.choice(FILLER).format(a=a, b=b, c=a + b))
    return " ".join(sentences)


def make_gold(rng: random.Random) -> tuple[str, str, str, str]:
    """Return (gold_kind, gold, an equal answer in another form, a wrong answer)."""
    roll = rng.random()
    if roll < 0.5:
        value = rng.randint(1, 9999)
        return "integer", str(value), f"{value}.0", str(value + rng.choice([-1, 1, 10]))
    if roll < 0.65:
        numerator, denominator = rng.choice([(1, 2), (3, 4), (1, 4), (1, 5), (3, 8), (7, 20)])
        factor = rng.randint(2, 9)
        decimal = f"{numerator / denominator:g}"
        return "fraction", decimal, rf"\frac{{{numerator * factor}}}{{{denominator * factor}}}", rf"\frac{{{denominator}}}{{{numerator}}}"
    if roll < 0.8:
        coefficient, radicand = rng.randint(2, 20), rng.choice([2, 3, 5, 7])
        return "sqrt", rf"{coefficient}\sqrt{{{radicand}}}", rf"\sqrt{{{coefficient**2 * radicand}}}", rf"{coefficient + 1}\sqrt{{{radicand}}}"
    if roll < 0.98:
        low = rng.randint(-20, 10)
        high = low + rng.randint(1, 30)
        return "interval", f"({low}, {high}]", rf"\left( {low},{high} \right]", f"[{low}, {high}]"
    return "prose", r"\text{see figure}", "5", "6"


def make_normal_cases(n: int, group: int, seed: int) -> list[tuple[str, str, str]]:
    """Return n (kind, completion, gold) cases, `group` consecutive ones per problem as in a
    GRPO batch; kind is "<gold kind>/<completion kind>"."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        gold_kind, gold, other_form, wrong = make_gold(rng)
        for _ in range(min(group, n - len(cases))):
            reasoning = make_reasoning(rng)
            roll = rng.random()
            if roll < 0.3:
                kind, completion = "right_same_form", f"{reasoning} So the answer is $\\boxed{{{gold}}}$."
            elif roll < 0.5:
                kind, completion = "right_other_form", f"{reasoning} Hence $\\boxed{{{other_form}}}$."
            elif roll < 0.65:
                kind, completion = "right_answer_line", f"{reasoning}\nAnswer: ${gold}$"
            elif roll < 0.9:
                kind, completion = "wrong", f"{reasoning} Therefore \\boxed{{{wrong}}}."
            else:
                kind, completion = "no_answer", f"{reasoning} I am not sure how to finish."
            cases.append((f"{gold_kind}/{kind}", completion, gold))
    return cases


def trl_score(completions: list[str], golds: list[str]) -> list[float | None]:
    """Call trl.rewards.accuracy_reward with the conversational input format it reads."""
    from trl.rewards import accuracy_reward

    return accuracy_reward([[{"role": "assistant", "content": text}] for text in completions], golds)


def ours_score(judge: MathJudge, completions: list[str], golds: list[str]) -> list[float | None]:
    return [verdict.reward for verdict in judge.score(completions, golds)]


def run_batches(score, cases: list, batch: int) -> tuple[float, list]:
    """Score cases in batches and return (seconds, rewards)."""
    rewards = []
    start = time.perf_counter()
    for offset in range(0, len(cases), batch):
        chunk = cases[offset : offset + batch]
        rewards += score([case[1] for case in chunk], [case[2] for case in chunk])
    return time.perf_counter() - start, rewards


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def mean_by_kind(cases: list, rewards: list) -> dict[str, float]:
    totals = defaultdict(list)
    for (kind, _, _), reward in zip(cases, rewards):
        totals[kind].append(float("nan") if reward is None else reward)
    return {kind: sum(values) / len(values) for kind, values in sorted(totals.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="number of normal completions (hostile ones come on top)")
    parser.add_argument("--batch", type=int, default=64, help="completions per score() call, like one GRPO step")
    parser.add_argument("--group", type=int, default=8, help="completions per problem (GRPO num_generations)")
    parser.add_argument("--timeout", type=float, default=5.0, help="MathJudge time bound per completion, seconds")
    parser.add_argument("--workers", type=int, default=None, help="MathJudge worker processes (default: usable CPUs, max 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic completions")
    args = parser.parse_args()
    if min(args.n, args.batch, args.group) < 1:
        parser.error(f"--n, --batch and --group must be positive, got {args.n}, {args.batch}, {args.group}.")
    logging.basicConfig(level=logging.ERROR)  # keep TRL's and our timeout warnings out of the table

    cases = make_normal_cases(args.n, args.group, args.seed)
    worker_cases = [case for case in cases if not case[0].startswith(("integer/", "prose/"))]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{len(cases)} normal completions ({len(worker_cases)} with decimal, sqrt or interval golds), {len(HOSTILE_ANSWERS)} hostile")

    # Ours: one judge per measured run so that no run profits from an earlier run's caches.
    with MathJudge(timeout=args.timeout, workers=args.workers) as judge:
        start = time.perf_counter()
        judge.score([r"\boxed{\frac{1}{2}}"], ["0.5"])
        startup = time.perf_counter() - start
        ours_seconds, ours_rewards = run_batches(lambda c, g: ours_score(judge, c, g), cases, args.batch)
        workers = judge.workers
    with MathJudge(timeout=args.timeout, workers=args.workers) as judge:
        judge.score([r"\boxed{\frac{1}{2}}"], ["0.5"])
        ours_latex_seconds, _ = run_batches(lambda c, g: ours_score(judge, c, g), worker_cases, args.batch)

        hostile_seconds = []
        for answer in HOSTILE_ANSWERS:
            start = time.perf_counter()
            verdict = judge.score([f"Let me compute. \\boxed{{{answer}}}"], ["5"])[0]
            hostile_seconds.append(time.perf_counter() - start)
            print(f"ours, hostile {answer!r}: {verdict.status}, {hostile_seconds[-1]:.2f} s")

    trl_seconds, trl_rewards = run_batches(trl_score, cases, args.batch)
    trl_latex_seconds, _ = run_batches(trl_score, worker_cases, args.batch)
    start = time.perf_counter()
    trl_hostile = trl_score([f"Let me compute. \\boxed{{{HOSTILE_ANSWERS[0]}}}"], ["5"])[0]
    trl_hostile_seconds = time.perf_counter() - start
    print(f"TRL, hostile {HOSTILE_ANSWERS[0]!r}: reward {trl_hostile}, {trl_hostile_seconds:.2f} s (main thread)")

    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\nours: {workers} workers, start-up {startup:.2f} s (not included below)")
    print(f"{'run':<34} {'ours /s':>9} {'TRL /s':>9} {'ours/TRL':>9}")
    for name, count, ours, trl in (
        ("all normal completions", len(cases), ours_seconds, trl_seconds),
        ("decimal, sqrt and interval golds", len(worker_cases), ours_latex_seconds, trl_latex_seconds),
    ):
        print(f"{name:<34} {count / ours:>9.0f} {count / trl:>9.0f} {trl / ours:>9.2f}")
    print(f"worst hostile completion, ours: {max(hostile_seconds):.2f} s (time bound {args.timeout:g} s)")

    print(f"\n{'gold/completion kind':<34} {'count':>6} {'ours mean':>10} {'TRL mean':>9}   (nan: skipped)")
    ours_means, trl_means = mean_by_kind(cases, ours_rewards), mean_by_kind(cases, trl_rewards)
    counts = defaultdict(int)
    for kind, _, _ in cases:
        counts[kind] += 1
    for kind in ours_means:
        print(f"{kind:<34} {counts[kind]:>6} {ours_means[kind]:>10.3f} {trl_means[kind]:>9.3f}")


if __name__ == "__main__":
    main()
