"""Code reward: run the final fenced program of a response on the problem's tests, in a sandbox.

The program is the last closed ``` block after closed <think>...</think> blocks are removed,
preferring a block tagged with a programming language (extraction.last_code_block), as the
authors' release picks it. Python and C++ are run; C, Java, Go and Rust, which the release also
ran, are recognised and scored 0 with reason "unsupported_language".

A problem (the `answer` passed to score) is one of:
- a list of tests [{"input": str, "output": str}, ...] (Codeforces style: stdin -> expected stdout;
  open-r1/codeforces-cots keeps its public ones in `examples`),
- a dict {"tests": [...], "checker": "lines" | "tokens" | "exact" | "float"} (checker optional),
- either of those as a JSON string (datasets often store tests that way).

Checkers: "lines" (default, the release's comparison): the outputs, stripped at both ends, must
have the same lines after trailing whitespace is removed from each.
"tokens": the outputs split on whitespace must be equal token lists.
"exact": equal after normalising CRLF to LF and dropping trailing newlines at the very end.
"float": token lists of equal length; tokens that both parse as floats must agree within
abs/rel tolerance `float_tolerance` (1e-6), other tokens must be equal.

r = 1 iff every test passes (tests run in order; the first failure decides the reason).
Reasons: "correct", "wrong_answer", "runtime_error", "timeout", "memory_limit" (MemoryError or
std::bad_alloc seen), "output_limit" (output larger than max_output_mb), "compile_error",
"no_answer" (no closed fenced block), "unsupported_language" (a language other than Python/C++, or
C++ without g++; logged once per language), "error" (the sandbox itself failed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sdzero_mcore.rewards.base import RewardFn, RewardResult, check_batch
from sdzero_mcore.rewards.extraction import last_code_block
from sdzero_mcore.rewards.sandbox import MiB, Limits, RunResult, Sandbox, install_prefix

logger = logging.getLogger(__name__)

CHECKERS = ("lines", "tokens", "exact", "float")
DEFAULT_CHECKER = "lines"  # the authors' release compares rstripped lines
RUN_LANGUAGES = ("python", "cpp")


@dataclass(frozen=True)
class CodeProblem:
    tests: tuple[tuple[str, str], ...]  # (stdin, expected stdout)
    checker: str


def parse_problem(answer: Any, default_checker: str = DEFAULT_CHECKER, where: str = "answer") -> CodeProblem:
    """Validate a problem in any accepted form (see the module docstring); ValueError/TypeError name the fault."""
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is a str but not JSON tests: {exc}") from exc
    checker = default_checker
    if isinstance(answer, dict):
        if "tests" not in answer:
            raise ValueError(f"{where} is a dict without a 'tests' key (keys: {sorted(answer)})")
        checker = answer.get("checker", default_checker)
        tests = answer["tests"]
    elif isinstance(answer, (list, tuple)):
        tests = answer
    else:
        raise TypeError(f"{where} must be a list of tests, a dict with 'tests', or JSON of either; got {type(answer).__name__}")
    if checker not in CHECKERS:
        raise ValueError(f"{where}: unknown checker {checker!r}; expected one of {CHECKERS}")
    if not tests:
        raise ValueError(f"{where} has no tests: a program cannot be judged without any")
    parsed = []
    for index, test in enumerate(tests):
        if not isinstance(test, dict) or not isinstance(test.get("input"), str) or not isinstance(test.get("output"), str):
            raise ValueError(f"{where} test {index} must be a dict with str 'input' and 'output', got {test!r:.200}")
        parsed.append((test["input"], test["output"]))
    return CodeProblem(tests=tuple(parsed), checker=checker)


def _output_lines(text: str) -> list[str]:
    # The release stripped whole outputs before splitting, so leading blank lines and the first
    # line's indentation do not count either; later lines keep their leading whitespace.
    return [line.rstrip() for line in text.strip().splitlines()]


def outputs_match(actual: str, expected: str, checker: str, float_tolerance: float = 1e-6) -> bool:
    if checker == "lines":
        return _output_lines(actual) == _output_lines(expected)
    if checker == "tokens":
        return actual.split() == expected.split()
    if checker == "exact":
        return actual.replace("\r\n", "\n").rstrip("\n") == expected.replace("\r\n", "\n").rstrip("\n")
    if checker == "float":
        got, want = actual.split(), expected.split()
        if len(got) != len(want):
            return False
        for got_token, want_token in zip(got, want):
            if got_token == want_token:
                continue
            try:
                got_value, want_value = float(got_token), float(want_token)
            except ValueError:
                return False
            if not math.isclose(got_value, want_value, rel_tol=float_tolerance, abs_tol=float_tolerance):
                return False
        return True
    raise ValueError(f"unknown checker {checker!r}; expected one of {CHECKERS}")


_MEMORY_MARKERS = (b"MemoryError", b"std::bad_alloc", b"Cannot allocate memory")


class CodeReward(RewardFn):
    """r(y, tests) = 1 iff the last fenced program in y passes every test.

    time_limit_s: CPU-time limit per test run (RLIMIT_CPU, rounded up to whole seconds).
    wall_time_limit_s: wall-clock limit per test run, which stops programs that sleep or block;
        default 2 * time_limit_s + 1, so that a loaded machine (where a program's CPU time
        accrues slower than wall time) does not turn correct programs into timeouts.
    memory_limit_mb: address-space limit (RLIMIT_AS) per run.
    max_processes: RLIMIT_NPROC (processes and threads) per run.
    max_output_mb: RLIMIT_FSIZE: stdout, stderr and any file the program writes; a program whose
        stdout or stderr reaches it is "output_limit".
    max_disk_mb: everything a run writes (work directory, /tmp, /dev/shm) in namespaces mode, where
        it is one size-limited tmpfs; the compile step gets max(max_disk_mb, 256).
    compile_timeout_s / compile_memory_limit_mb: the same limits for g++.
    checker: the comparison for problems that name none (see the module docstring).
    timeout_s: wall budget per sample for compile plus all tests; when it runs out, "timeout".
    num_workers: samples judged concurrently (threads, each driving its own sandboxed processes).
    isolation / run_as_uid / python_executable: passed to Sandbox (see sandbox.py).
    cxx: the C++ compiler (default g++ from PATH); None found -> C++ is "unsupported_language".
    """

    name = "code"

    def __init__(
        self,
        time_limit_s: float = 2.0,
        memory_limit_mb: int = 512,
        max_processes: int = 16,
        max_output_mb: int = 64,
        max_disk_mb: int = 64,
        compile_timeout_s: float = 30.0,
        compile_memory_limit_mb: int = 2048,
        checker: str = DEFAULT_CHECKER,
        float_tolerance: float = 1e-6,
        timeout_s: float = 120.0,
        num_workers: Optional[int] = None,
        wall_time_limit_s: Optional[float] = None,
        isolation: str = "auto",
        run_as_uid: Optional[int] = None,
        python_executable: Optional[str] = None,
        cxx: Optional[str] = "g++",
    ) -> None:
        if checker not in CHECKERS:
            raise ValueError(f"checker must be one of {CHECKERS}, got {checker!r}")
        for name, value in (
            ("time_limit_s", time_limit_s), ("memory_limit_mb", memory_limit_mb), ("max_processes", max_processes),
            ("max_output_mb", max_output_mb), ("max_disk_mb", max_disk_mb), ("compile_timeout_s", compile_timeout_s),
            ("compile_memory_limit_mb", compile_memory_limit_mb), ("float_tolerance", float_tolerance),
            ("timeout_s", timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if wall_time_limit_s is None:
            wall_time_limit_s = 2 * time_limit_s + 1.0
        if not wall_time_limit_s >= time_limit_s:
            raise ValueError(f"wall_time_limit_s ({wall_time_limit_s}) must be >= time_limit_s ({time_limit_s})")
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.time_limit_s = float(time_limit_s)
        self.memory_bytes = int(memory_limit_mb) * MiB
        self.max_processes = int(max_processes)
        self.max_output_bytes = int(max_output_mb) * MiB
        self.max_disk_bytes = int(max_disk_mb) * MiB
        self.compile_timeout_s = float(compile_timeout_s)
        self.compile_memory_bytes = int(compile_memory_limit_mb) * MiB
        self.checker = checker
        self.float_tolerance = float(float_tolerance)
        self.timeout_s = float(timeout_s)
        self.wall_time_limit_s = float(wall_time_limit_s)
        self.num_workers = num_workers
        self.cxx = shutil.which(cxx) if cxx else None
        self.sandbox = Sandbox(
            isolation=isolation, run_as_uid=run_as_uid, python_executable=python_executable,
            # A compiler installed outside /usr (e.g. /opt/gcc) must be visible in the sandbox.
            readable_paths=[install_prefix(self.cxx)] if self.cxx else [],
        )
        self._executor: Optional[ThreadPoolExecutor] = None
        self._unsupported_logged: set[str] = set()

    def score(self, response: str, answer: Any) -> RewardResult:
        check_batch([response], [answer])
        return self._score_one(response, parse_problem(answer, self.checker))

    def score_batch(self, responses: Sequence[str], answers: Sequence[Any]) -> list[RewardResult]:
        check_batch(responses, answers)
        # Validate every problem first: bad data is the caller's bug and should fail loudly, not
        # score 0 somewhere in the middle of a batch.
        problems = [parse_problem(answer, self.checker, where=f"answers[{i}]") for i, answer in enumerate(answers)]
        if len(responses) <= 1 or self.num_workers == 1:
            return [self._score_one(response, problem) for response, problem in zip(responses, problems)]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sdzero-code-reward")
        return list(self._executor.map(self._score_one, responses, problems))

    def _score_one(self, response: str, problem: CodeProblem) -> RewardResult:
        block = last_code_block(response)
        if block is None:
            return RewardResult(0, None, "no_answer")
        language, source = block
        if language not in RUN_LANGUAGES or (language == "cpp" and self.cxx is None):
            self._log_unsupported(language)
            return RewardResult(0, source, "unsupported_language")
        try:
            reason = self._judge(language, source, problem)
        except OSError as exc:  # the machine, not the program: disk full, fork failure, ...
            logger.error("code reward: sandbox failure: %s", exc)
            reason = "error"
        return RewardResult(1 if reason == "correct" else 0, source, reason)

    def _log_unsupported(self, language: str) -> None:
        # Once per language: a run whose model writes Java would otherwise log every sample, and
        # a silent 0 would read as a wrong program.
        if language in self._unsupported_logged:
            return
        self._unsupported_logged.add(language)
        if language == "cpp":
            why = "the C++ compiler (the cxx argument, g++ by default) is not on PATH"
        else:
            why = f"the code reward runs only {' and '.join(RUN_LANGUAGES)}"
        logger.warning(
            "code reward: a response's final program is %s, which is not supported: %s; such responses "
            "score 0 with reason unsupported_language", language, why,
        )

    def _judge(self, language: str, source: str, problem: CodeProblem) -> str:
        deadline = time.monotonic() + self.timeout_s
        with self.sandbox.workspace() as workspace:
            if language == "python":
                with open(os.path.join(workspace.box, "main.py"), "w", encoding="utf-8") as handle:
                    handle.write(source)
                argv = [self.sandbox.python_executable, "-I", "main.py"]
            else:
                with open(os.path.join(workspace.box, "main.cpp"), "w", encoding="utf-8") as handle:
                    handle.write(source)
                wall = min(self.compile_timeout_s, deadline - time.monotonic())
                compiled = self.sandbox.run(
                    [self.cxx, "-O2", "-std=c++17", "-pipe", "-o", "main", "main.cpp"],
                    workspace,
                    limits=Limits(
                        cpu_s=self.compile_timeout_s, wall_s=max(wall, 0.1), memory_bytes=self.compile_memory_bytes,
                        max_processes=max(self.max_processes, 16), max_file_bytes=max(self.max_output_bytes, 256 * MiB),
                        max_disk_bytes=max(self.max_disk_bytes, 256 * MiB),
                    ),
                    outputs=("main",),
                )
                if compiled.setup_failed:
                    logger.error("code reward: sandbox setup failed: %s", compiled.stderr[-500:])
                    return "error"
                if compiled.returncode != 0:
                    return "compile_error"
                argv = ["./main"]

            for stdin, expected in problem.tests:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                result = self.sandbox.run(
                    argv,
                    workspace,
                    stdin=stdin.encode(),
                    python_program=language == "python",
                    limits=Limits(
                        cpu_s=self.time_limit_s, wall_s=min(self.wall_time_limit_s, remaining),
                        memory_bytes=self.memory_bytes, max_processes=self.max_processes,
                        max_file_bytes=self.max_output_bytes, max_disk_bytes=self.max_disk_bytes,
                    ),
                )
                reason = self._classify(result)
                if reason is None:
                    actual = result.stdout.decode("utf-8", errors="replace")
                    reason = "correct" if outputs_match(actual, expected, problem.checker, self.float_tolerance) else "wrong_answer"
                if reason != "correct":
                    return reason
        return "correct"

    def _classify(self, result: RunResult) -> Optional[str]:
        """The failure reason of a run, or None when it exited 0 and its output needs checking."""
        if result.setup_failed:
            logger.error("code reward: sandbox setup failed: %s", result.stderr[-500:])
            return "error"
        # First: a full stream is what went wrong even if the program then spun until a limit
        # killed it. Either stream: one flooding stderr dies of EFBIG (or SIGXFSZ) as on stdout.
        if result.signal == signal.SIGXFSZ or result.output_limit_hit:
            return "output_limit"
        if result.timed_out or result.signal == signal.SIGXCPU:
            return "timeout"
        # RLIMIT_CPU's hard limit (soft + 1 s) ends with SIGKILL when SIGXCPU was caught/ignored.
        if result.signal == signal.SIGKILL and result.wall_s >= math.ceil(self.time_limit_s):
            return "timeout"
        if result.returncode == 0:
            return None
        stderr_tail = result.stderr[-4096:]
        if b"File too large" in stderr_tail:
            return "output_limit"  # Python ignores SIGXFSZ and raises OSError(EFBIG) instead
        if any(marker in stderr_tail for marker in _MEMORY_MARKERS):
            return "memory_limit"
        return "runtime_error"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
