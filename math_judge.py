"""Judge final answers of math completions against gold answers, for both RL rewards and evaluation.

Pipeline for one completion:

1. `extract_answer` takes the final answer: the last `\\boxed{...}` or `\\fbox{...}`
   (nested braces allowed), else the last line starting with `Answer:` (the DAPO
   prompt format), else, only with `fallback=True`, the last number in the text.
   `Verdict.source` records which rule fired, so evaluation can report the fallback
   separately.
2. Cheap cases are decided in this process: two plain integers, two equal plain
   decimals, equal strings, or a (gold, answer) pair judged before.
3. Every other pair goes to a pool of worker processes running math-verify
   (`parse` on `\\boxed{answer}`, `verify(gold, answer)`). A worker that spends more
   than `timeout` seconds on one item is killed and replaced, and that item gets
   status "timeout" and reward 0. Gold answers are parsed once per worker and cached
   by their string.

Why not call math-verify directly: its timeouts use `signal.alarm`, which raises
ValueError outside the main thread (TRL runs `async def` reward functions in a worker
thread), so callers there switch the timeouts off and one hostile completion such as
`\\boxed{9^{9^{9^{9}}}}` blocks the thread for good. TRL 1.16's `accuracy_reward` also
parses bare gold strings with the default configuration, which reads `10\\sqrt{2}` as
10 and `(1, 3]` as 3, and ignores plain-text `Answer: 34` lines.

Usage (evaluation):

    with MathJudge(timeout=5.0) as judge:
        verdicts = judge.score(completions, golds)

Usage (training): `GRPOTrainer(reward_funcs=[AccuracyReward(MathJudge(), num_generations=G)])`.
"""

import atexit
import logging
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import Connection, wait

logger = logging.getLogger(__name__)

STATUSES = ("correct", "wrong", "no_answer", "timeout", "gold_unparseable", "error")

# Address-space cap of each worker process, a second guard next to the time bound:
# while sympy evaluated `2^{2^{40}}` its memory grew by about 80 MB/s (2-core AMD EPYC).
WORKER_MEMORY_LIMIT_BYTES = 4 * 2**30

# Seconds a new worker may take to import math-verify and sympy before score() gives up.
WORKER_START_TIMEOUT = 120.0

_MAX_START_FAILURES = 3
_MAX_CHUNK = 32  # max items per message to a worker: smaller chunks balance the load, larger ones cut messages
_VERDICT_CACHE_SIZE = 65536
_GOLD_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class Verdict:
    """Judgement of one completion.

    reward: 1.0 correct, 0.0 otherwise, None when the gold cannot be parsed (skip the example).
    status: one of STATUSES.
    extracted: the extracted final answer text, None if none was found.
    source: "boxed", "answer_line", "fallback" or None.
    """

    reward: float | None
    status: str
    extracted: str | None
    source: str | None


# ---------------------------------------------------------------------------
# Answer extraction (runs in the calling process, plain string work)
# ---------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_BOXED_ARG_RE = re.compile(r"\s+([^\s${}\\]+)")  # the `5` in `\boxed 5`
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_INTEGER_RE = re.compile(r"-?\d{1,100}")
_DECIMAL_RE = re.compile(r"-?\d{1,100}(?:\.\d{1,100})?")


def _braced_argument(text: str, start: int) -> str | None:
    """Return the contents of the `{...}` group opening at text[start], or None if it never closes.

    Escaped braces (`\\{`, `\\}`) do not count, as in LaTeX.
    """
    depth = 0
    position = start
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : position]
        position += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Return the argument of the last complete, non-empty `\\boxed`/`\\fbox` in text."""
    ends = [match.end() for match in _BOXED_RE.finditer(text)]
    for end in reversed(ends):
        position = end
        while position < len(text) and text[position] in " \t":
            position += 1
        if position < len(text) and text[position] == "{":
            content = _braced_argument(text, position)
        else:
            bare = _BARE_BOXED_ARG_RE.match(text, end)
            content = bare.group(1) if bare else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_answer_line(line: str) -> str:
    """Strip Markdown emphasis, math delimiters and a trailing full stop from an answer line."""
    line = line.strip()
    line = line.strip("*_").strip()
    line = _UNESCAPED_DOLLAR_RE.sub("", line).strip()
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(opening) and line.endswith(closing):
            line = line[len(opening) : -len(closing)].strip()
    return line.rstrip(".").strip()


def extract_answer(text: str, fallback: bool = False) -> tuple[str | None, str | None]:
    """Extract the final answer from a completion, returning (answer, source).

    The first rule that matches wins:
    - "boxed": the last `\\boxed{...}` or `\\fbox{...}` (nested braces, also `\\boxed 5`).
    - "answer_line": the last line starting with `Answer:` (also `Final Answer:` and
      `**Answer:**`, in any case), without `$` delimiters and a trailing full stop.
    - "fallback", only if fallback: the last number, thousands separators removed.
    Returns (None, None) when no rule matches.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"

    for match in reversed(list(_ANSWER_LINE_RE.finditer(text))):
        answer = _clean_answer_line(match.group(1))
        if answer:
            return answer, "answer_line"

    if fallback:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].replace(",", ""), "fallback"
    return None, None


def _decide_in_process(gold: str, answer: str | None, gold_ok: bool | None) -> str | None:
    """Return the status of pairs that need no math-verify call, else None.

    gold_ok is the cached parse result of gold (None if not parsed yet). Two integers
    are decided either way. Two plain decimals are decided only when exactly equal,
    because math-verify also accepts numbers that agree after rounding.
    """
    gold = gold.strip()
    if gold_ok is False:
        return "gold_unparseable"
    if _DECIMAL_RE.fullmatch(gold):
        if answer is None:
            return "no_answer"
        if _INTEGER_RE.fullmatch(gold) and _INTEGER_RE.fullmatch(answer):
            return "correct" if int(answer) == int(gold) else "wrong"
        if _DECIMAL_RE.fullmatch(answer) and Decimal(answer) == Decimal(gold):
            return "correct"
    if gold_ok is None:
        return None
    if answer is None:
        return "no_answer"
    if "".join(answer.split()) == "".join(gold.split()):
        return "correct"
    return None


def _shorten(text: str, limit: int = 200) -> str:
    """Shorten text to about `limit` characters, keeping its start and its end (where answers are)."""
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]} [... {len(text) - limit} characters ...] {text[-(limit - head):]}"


# ---------------------------------------------------------------------------
# Worker process: math-verify, one item at a time
# ---------------------------------------------------------------------------

# Text left after removing LaTeX commands that still contains two words in a row
# (`\text{see figure}`, `Proof omitted`) is prose, not a value. math-verify would turn it
# into a product of symbols that other prose can match, so such a gold counts as unparseable.
# NOTE: this is a heuristic. Text answers of two or more words, such as `\text{no solution}`,
# are skipped as well.
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_PROSE_RE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")


def _limit_worker_resources(timeout: float) -> None:
    """Arm a CPU-time limit for the next item of this worker.

    The parent kills a worker after `timeout` seconds of wall time. The CPU limit
    (SIGXCPU, whose default action ends the process) is a backstop that also ends a
    worker whose parent died mid-item: it fires after 2 * timeout + 2 more CPU seconds.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + 2 * timeout) + 2
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _serve(fd: int, timeout: float) -> None:
    """Run the worker loop on the socket fd until the parent sends None or closes it.

    Protocol: the worker sends ("ready",) once imports are done. The parent sends a list
    of (gold, answer) pairs. For each pair the worker sends ("gold", ok, reason) the
    first time it parses that gold, then ("item", status, detail).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which closes us
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > WORKER_MEMORY_LIMIT_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT_BYTES, hard))

    # Timeouts are off inside math-verify because the parent enforces them, so its
    # one-time "Timeout is disabled" warning is silenced.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from latex2sympy2_extended.latex2sympy2 import normalize_latex
    from math_verify import LatexExtractionConfig, parse, verify

    extraction_config = [LatexExtractionConfig(boxed_match_priority=0)]

    def parse_boxed(latex: str) -> list:
        return parse(
            "\\boxed{" + latex + "}",
            extraction_config=extraction_config,
            fallback_mode="no_fallback",
            parsing_timeout=None,
            raise_on_error=True,
        )

    def parse_gold(gold: str) -> tuple[list | None, str | None]:
        try:
            normalized = normalize_latex(gold, extraction_config[0].normalization_config)
            if _PROSE_RE.search(_LATEX_COMMAND_RE.sub(" ", normalized)):
                return None, "it reads as prose, not as a math expression"
            parsed = parse_boxed(gold)
        except Exception as error:  # noqa: BLE001 - any failure means the gold is unusable
            return None, f"math-verify raised {type(error).__name__}: {error}"
        if not parsed:
            return None, "math-verify found no expression in it"
        return parsed, None

    conn = Connection(fd)
    conn.send(("ready",))
    golds: dict[str, list | None] = {}
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for gold, answer in chunk:
            _limit_worker_resources(timeout)
            if gold not in golds:
                if len(golds) >= _GOLD_CACHE_SIZE:
                    golds.clear()
                golds[gold], reason = parse_gold(gold)
                conn.send(("gold", golds[gold] is not None, reason))
            gold_parsed = golds[gold]

            status, detail = "no_answer", None
            if gold_parsed is None:
                status = "gold_unparseable"
            elif answer is not None:
                try:
                    answer_parsed = parse_boxed(answer)
                    if answer_parsed:
                        correct = verify(gold_parsed, answer_parsed, timeout_seconds=None, raise_on_error=True)
                        status = "correct" if correct else "wrong"
                except Exception as error:  # noqa: BLE001 - reported to the parent as status "error"
                    status, detail = "error", f"{type(error).__name__}: {_shorten(str(error))}"
            conn.send(("item", status, detail))


# ---------------------------------------------------------------------------
# Parent side: worker handles and the judge
# ---------------------------------------------------------------------------


class _Worker:
    """Handle of one worker process and the chunk of (gold, answer) pairs it is judging."""

    def __init__(self, timeout: float):
        # A fresh interpreter (fork+exec, as multiprocessing's "spawn" does) that imports
        # only this module. multiprocessing's spawn and forkserver would also re-run the
        # caller's main script in every worker, which for a training script importing
        # torch, transformers and TRL costs about 10 s per worker start and restart.
        if not sys.executable:
            raise RuntimeError("MathJudge cannot start workers: sys.executable is empty in this interpreter.")
        parent_socket, child_socket = socket.socketpair()
        module_dir = os.path.dirname(os.path.abspath(__file__))
        module_name = os.path.splitext(os.path.basename(__file__))[0]
        boot = (
            f"import sys; sys.path.insert(0, sys.argv[1]); import {module_name}; "
            f"{module_name}._serve(int(sys.argv[2]), float(sys.argv[3]))"
        )
        child_fd = child_socket.fileno()
        self.process = subprocess.Popen(
            [sys.executable, "-c", boot, module_dir, str(child_fd), str(timeout)],
            pass_fds=(child_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # stderr stays open for tracebacks
        )
        child_socket.close()
        self.conn = Connection(parent_socket.detach())
        self.ready = False
        self.start_deadline = time.monotonic() + WORKER_START_TIMEOUT
        self.chunk: list[tuple[str, str | None]] = []
        self.done = 0  # items of chunk already answered
        self.deadline = math.inf  # when the current item times out

    def current(self) -> tuple[str, str | None]:
        return self.chunk[self.done]

    def send(self, chunk: list[tuple[str, str | None]], timeout: float) -> None:
        self.conn.send(chunk)
        self.chunk, self.done = chunk, 0
        self.deadline = time.monotonic() + timeout

    def stop(self, kill: bool) -> None:
        """Stop the process: ask it to exit (kill=False, up to 1 s) or SIGKILL it."""
        if not kill:
            try:
                self.conn.send(None)
                self.process.wait(timeout=1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.conn.close()


class _RateLimitedLog:
    """Log the first `burst` events of each kind, then at most one per `interval` seconds."""

    def __init__(self, burst: int = 5, interval: float = 60.0):
        self.burst, self.interval = burst, interval
        self.seen: Counter = Counter()
        self.last_logged: dict[str, float] = {}
        self.suppressed: Counter = Counter()

    def __call__(self, kind: str, level: int, message: str, *args) -> None:
        self.seen[kind] += 1
        now = time.monotonic()
        if self.seen[kind] > self.burst and now - self.last_logged.get(kind, -math.inf) < self.interval:
            self.suppressed[kind] += 1
            return
        if self.suppressed[kind]:
            message += f" ({self.suppressed[kind]} similar messages suppressed)"
            self.suppressed[kind] = 0
        self.last_logged[kind] = now
        logger.log(level, message, *args)


_live_judges: "weakref.WeakSet[MathJudge]" = weakref.WeakSet()


@atexit.register
def _close_live_judges() -> None:
    for judge in list(_live_judges):
        judge.close()


class MathJudge:
    """Score completions against gold answers with a hard time bound per completion.

    timeout: wall-clock seconds one item may take inside a worker before it is killed
        and the item scored 0 with status "timeout".
    workers: number of math-verify worker processes, default min(usable CPUs, 8).
        They start on the first score() call that needs one.
    fallback: passed to extract_answer (take the last number when there is no boxed
        answer and no `Answer:` line).

    score() may be called from any thread, also from several at once (calls run one
    after another). Installs no signal handlers in the calling process. `counts`
    contains the number of completions per status seen so far.
    """

    def __init__(self, timeout: float = 5.0, workers: int | None = None, fallback: bool = False):
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        if workers is None:
            usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            workers = min(usable_cpus or 1, 8)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}.")
        self.timeout = float(timeout)
        self.workers = workers
        self.fallback = fallback

        self._lock = threading.Lock()
        self._pool: list[_Worker] = []
        self._start_failures = 0  # consecutive workers that exited before they were ready
        self._crashed: set = set()  # pairs whose worker died once during the current call
        self._closed = False
        self._counts: Counter = Counter()
        self._gold_ok: dict[str, bool] = {}
        self._verdicts: OrderedDict[tuple[str, str | None], str] = OrderedDict()  # LRU of statuses
        self._log = _RateLimitedLog()
        _live_judges.add(self)

    # Pickling keeps only the configuration, so the copy starts its own workers
    # (TRL may send reward functions to a spawned process).
    def __getstate__(self) -> dict:
        return {"timeout": self.timeout, "workers": self.workers, "fallback": self.fallback}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __enter__(self) -> "MathJudge":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def counts(self) -> dict[str, int]:
        """Number of completions per status seen so far."""
        return {status: self._counts[status] for status in STATUSES}

    def close(self) -> None:
        """Stop the worker processes. Later calls of score() raise RuntimeError."""
        locked = self._lock.acquire(timeout=self.timeout + 5.0)
        try:
            self._closed = True
            for worker in self._pool:
                worker.stop(kill=False)
            self._pool.clear()
        finally:
            if locked:
                self._lock.release()

    def score(self, completions: list[str], golds: list[str]) -> list[Verdict]:
        """Judge completions[i] against golds[i], returning one Verdict per completion.

        golds may contain int (converted with str) or None (scored as gold_unparseable).
        """
        if len(completions) != len(golds):
            raise ValueError(
                f"score() needs one gold per completion, got {len(completions)} completions and {len(golds)} golds."
            )
        for index, completion in enumerate(completions):
            if not isinstance(completion, str):
                raise TypeError(f"completions[{index}] must be str, got {type(completion).__name__}.")
        golds = [self._check_gold(index, gold) for index, gold in enumerate(golds)]
        extractions = [extract_answer(completion, self.fallback) for completion in completions]

        with self._lock:
            if self._closed:
                raise RuntimeError("MathJudge.score() was called after close(); create a new MathJudge.")
            keys = [(gold, answer) for gold, (answer, _) in zip(golds, extractions)]
            results = self._judge_pairs(keys, completions)

            verdicts = []
            for (answer, source), key in zip(extractions, keys):
                status, _ = results[key]
                reward = None if status == "gold_unparseable" else float(status == "correct")
                verdicts.append(Verdict(reward, status, answer, source))
                self._counts[status] += 1
        return verdicts

    @staticmethod
    def _check_gold(index: int, gold) -> str | None:
        if gold is None or isinstance(gold, str):
            return gold
        if isinstance(gold, int) and not isinstance(gold, bool):
            return str(gold)
        raise TypeError(f"golds[{index}] must be str, int or None, got {type(gold).__name__}: {gold!r}.")

    def _judge_pairs(self, keys: list, completions: list[str]) -> dict:
        """Return {(gold, answer): (status, detail)} for the distinct pairs in keys."""
        results = {}
        pending = []
        example_completion = {}  # one completion per pair, for log messages
        for key, completion in zip(keys, completions):
            if key in results or key in example_completion:
                continue
            gold, answer = key
            if gold is None:
                results[key] = ("gold_unparseable", None)
                continue
            status = _decide_in_process(gold, answer, self._gold_ok.get(gold))
            if status is None and key in self._verdicts:
                self._verdicts.move_to_end(key)
                status = self._verdicts[key]
            if status is not None:
                results[key] = (status, None)
                continue
            example_completion[key] = completion
            pending.append(key)

        if pending:
            for key, (status, detail) in self._run_workers(pending).items():
                results[key] = (status, detail)
                self._report(key, status, detail, example_completion[key])
                # Timeouts and errors are not cached, because a loaded machine or a killed worker can cause them.
                if status in ("correct", "wrong", "no_answer"):
                    self._verdicts[key] = status
            while len(self._verdicts) > _VERDICT_CACHE_SIZE:
                self._verdicts.popitem(last=False)
        return results

    def _report(self, key, status: str, detail: str | None, completion: str) -> None:
        gold, answer = key
        if status == "timeout":
            self._log(
                "timeout", logging.WARNING,
                "Math judge timed out after %.1f s on answer %r (gold %r) of completion %r. Scored 0.",
                self.timeout, _shorten(answer or "", 100), gold, _shorten(completion),
            )
        elif status == "error":
            self._log(
                "error", logging.ERROR,
                "Math judge failed on answer %r (gold %r) of completion %r: %s. Scored 0.",
                _shorten(answer or "", 100), gold, _shorten(completion), detail,
            )

    def _run_workers(self, pending: list) -> dict:
        """Judge pending (gold, answer) pairs in the worker pool within the per-item time bound."""
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self.timeout))
        # Items with the same gold end up in the same chunk, so a worker parses that gold once.
        queue = deque(sorted(pending, key=lambda key: key[0]))
        results: dict = {}
        self._crashed = set()

        try:
            while len(results) < len(pending):
                self._dispatch(queue, results)

                next_deadline = min(
                    worker.deadline if worker.ready else worker.start_deadline for worker in self._pool
                )
                wait_seconds = None if next_deadline == math.inf else max(0.0, next_deadline - time.monotonic())
                by_conn = {worker.conn: worker for worker in self._pool}
                for conn in wait(list(by_conn), wait_seconds):
                    if by_conn[conn] in self._pool:  # not replaced while reading an earlier one
                        self._receive(by_conn[conn], results, queue)

                now = time.monotonic()
                for worker in list(self._pool):
                    if not worker.ready and now >= worker.start_deadline:
                        self._fail_to_start(f"did not start within {WORKER_START_TIMEOUT:.0f} s")
                    if worker.chunk and now >= worker.deadline:
                        self._replace(worker, results, queue, None)
        except BaseException:
            # Interrupted (KeyboardInterrupt, or a worker that cannot start): results of busy
            # workers would arrive during a later call, so those workers are stopped.
            for worker in [worker for worker in self._pool if worker.chunk]:
                worker.stop(kill=True)
                self._pool.remove(worker)
            raise
        return results

    def _dispatch(self, queue: deque, results: dict) -> None:
        """Send the next chunk of the queue to every worker that is ready and idle."""
        for worker in [worker for worker in self._pool if worker.ready and not worker.chunk]:
            if not queue:
                return
            size = max(1, min(_MAX_CHUNK, math.ceil(len(queue) / (2 * len(self._pool)))))
            chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
            try:
                worker.send(chunk, self.timeout)
            except OSError:  # the worker died while idle, for example killed by the OS
                queue.extendleft(reversed(chunk))
                self._replace(worker, results, queue, None)

    def _receive(self, worker: _Worker, results: dict, queue: deque) -> None:
        """Read every message the worker has sent so far."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    self._start_failures = 0
                elif message[0] == "gold":
                    _, ok, reason = message
                    self._record_gold(worker.current()[0], ok, reason)
                else:
                    _, status, detail = message
                    results[worker.current()] = (status, detail)
                    worker.done += 1
                    worker.deadline = time.monotonic() + self.timeout
                    if worker.done == len(worker.chunk):
                        worker.chunk, worker.done, worker.deadline = [], 0, math.inf
                        return
        except (EOFError, OSError):
            code = worker.process.wait()
            if not worker.ready:
                # The OS may kill one starting worker under memory pressure, but a broken
                # installation fails every start.
                self._start_failures += 1
                if self._start_failures >= _MAX_START_FAILURES:
                    self._fail_to_start(f"exited with code {code} before it was ready, {self._start_failures} times in a row")
            self._replace(worker, results, queue, f"worker process exited with code {code} while judging this item")

    def _record_gold(self, gold: str, ok: bool, reason: str | None) -> None:
        if len(self._gold_ok) >= _GOLD_CACHE_SIZE:
            self._gold_ok.clear()
        self._gold_ok[gold] = ok
        if not ok:
            self._log(
                "gold_unparseable", logging.WARNING,
                "Gold answer %r cannot be parsed because %s. Its completions are skipped (reward None).",
                _shorten(gold), reason,
            )

    def _replace(self, worker: _Worker, results: dict, queue: deque, crash: str | None) -> None:
        """Kill a worker and start another; its unfinished items go back to the front of the queue.

        With crash=None the worker ran out of time and its current item is scored
        "timeout". Otherwise the worker process died: its current item is retried once on
        another worker, since the OS may have killed the process for reasons unrelated to
        the item, and is scored "error" with the crash message if that worker dies too.
        """
        if worker.chunk:
            key = worker.current()
            unfinished = worker.chunk[worker.done + 1 :]
            gold = key[0]
            if crash is not None and key not in self._crashed:
                self._crashed.add(key)
                unfinished = [key] + unfinished
            elif crash is not None:
                results[key] = ("error", crash)
            elif gold not in self._gold_ok:
                # The worker reports each new gold before judging against it, so the gold
                # parse itself was what ran out of time.
                self._record_gold(gold, False, f"parsing it took more than {self.timeout:.1f} s")
                results[key] = ("gold_unparseable", None)
            else:
                results[key] = ("timeout", None)
            queue.extendleft(reversed(unfinished))
        worker.stop(kill=True)
        self._pool[self._pool.index(worker)] = _Worker(self.timeout)

    def _fail_to_start(self, problem: str) -> None:
        for worker in self._pool:
            worker.stop(kill=True)
        self._pool.clear()
        raise RuntimeError(
            f"A math judge worker process {problem}. Check that `{sys.executable} -c 'import math_verify'` "
            "works; the worker's traceback, if any, is printed above on stderr."
        )


# ---------------------------------------------------------------------------
# TRL reward function
# ---------------------------------------------------------------------------


def _completion_text(completion) -> str:
    """Return the text of a plain or conversational completion (its last assistant message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                content = message.get("content", "")
                if isinstance(content, list):  # content parts, e.g. [{"type": "text", "text": ...}]
                    return "".join(part.get("text", "") for part in content if isinstance(part, dict))
                return content
    raise TypeError(
        "A completion must be a string or a list of message dicts with an assistant message, "
        f"got {_shorten(repr(completion))}."
    )


class AccuracyReward:
    """TRL reward function: GRPOTrainer(reward_funcs=[AccuracyReward(judge, num_generations=G)]).

    Returns 1.0 / 0.0 per completion, None where the gold cannot be parsed (TRL ignores
    those). With TRL's `log_metric` kwarg it logs, per call, the fraction of all
    completions in each status: `accuracy/correct`, `accuracy/no_answer`,
    `accuracy/timeout`, `accuracy/error` and `accuracy/skipped` (gold_unparseable).
    When num_generations is given it also logs `accuracy/zero_std_groups`, the fraction
    of groups (consecutive runs of num_generations completions) whose scored rewards
    are all equal, which therefore carry no GRPO advantage. TRL 1.16 averages each metric over calls and processes with equal weight per call,
    which is the global fraction when every process scores batches of the same size.
    With `log_extra` it adds the extracted answer and the status to the completions table.
    """

    __name__ = "accuracy"

    def __init__(self, judge: MathJudge, answer_column: str = "answer", num_generations: int | None = None):
        if num_generations is not None and (not isinstance(num_generations, int) or num_generations < 1):
            raise ValueError(f"num_generations must be a positive integer or None, got {num_generations!r}.")
        self.judge = judge
        self.answer_column = answer_column
        self.num_generations = num_generations
        self._log = _RateLimitedLog()

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        if self.answer_column not in kwargs:
            columns = sorted(key for key in kwargs if key not in ("trainer_state", "log_extra", "log_metric"))
            raise ValueError(
                f"AccuracyReward reads gold answers from the dataset column {self.answer_column!r}, "
                f"which is missing; the reward function received {columns}. "
                "Rename the column or pass answer_column=..."
            )
        verdicts = self.judge.score([_completion_text(c) for c in completions], list(kwargs[self.answer_column]))
        rewards = [verdict.reward for verdict in verdicts]

        log_metric = kwargs.get("log_metric")
        if log_metric is not None and verdicts:
            for metric, status in (
                ("correct", "correct"), ("no_answer", "no_answer"), ("timeout", "timeout"),
                ("error", "error"), ("skipped", "gold_unparseable"),
            ):
                log_metric(f"{self.__name__}/{metric}", sum(v.status == status for v in verdicts) / len(verdicts))
            zero_std = self._zero_std_fraction(rewards)
            if zero_std is not None:
                log_metric(f"{self.__name__}/zero_std_groups", zero_std)

        log_extra = kwargs.get("log_extra")
        if log_extra is not None:
            log_extra("extracted_answer", [verdict.extracted for verdict in verdicts])
            log_extra("judge_status", [verdict.status for verdict in verdicts])
        return rewards

    def _zero_std_fraction(self, rewards: list[float | None]) -> float | None:
        """Return the fraction of groups whose non-None rewards are all equal, or None if undefined."""
        size = self.num_generations
        if size is None:
            return None
        if len(rewards) % size:
            # NOTE: TRL splits groups across processes when the per-process batch is not a
            # multiple of num_generations, so the metric is skipped rather than guessed.
            self._log(
                "zero_std_groups", logging.WARNING,
                "accuracy/zero_std_groups is not logged because %d completions are not a multiple of "
                "num_generations=%d.", len(rewards), size,
            )
            return None
        groups = [rewards[start : start + size] for start in range(0, len(rewards), size)]
        scored = [[r for r in group if r is not None] for group in groups]
        scored = [group for group in scored if group]
        if not scored:
            return None
        return sum(len(set(group)) == 1 for group in scored) / len(scored)
