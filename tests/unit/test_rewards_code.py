"""Code reward: extraction, checkers, judging, and empirical containment of hostile programs
(infinite loop, fork bomb, memory bomb, writes outside the work dir, network), with the machine
checked for leftovers after each."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import pytest

from sdzero_mcore.config import load_config
from sdzero_mcore.data.loading import load_rows
from sdzero_mcore.rewards import CodeReward, get_reward_fn, reward_fn_for, reward_target
from sdzero_mcore.rewards.code import outputs_match, parse_problem
from sdzero_mcore.rewards.extraction import last_code_block
from sdzero_mcore.rewards import sandbox as sandbox_module
from sdzero_mcore.rewards.sandbox import FALLBACK_UIDS, Limits

TIME_LIMIT_S = 1.0
WALL_TIME_LIMIT_S = 2.5
MAX_PROCESSES = 16
# A run ends by WALL_TIME_LIMIT_S; allow time for the kill, the clean-up and a loaded 2-core CI
# machine, but far less than any runaway would take.
RUN_BOUND_S = WALL_TIME_LIMIT_S + 4.0

ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12"}]


def python(source: str) -> str:
    return f"Here is my solution.\n```python\n{source}\n```\n"


def cpp(source: str) -> str:
    return f"```cpp\n{source}\n```"


PY_ADD = python("a, b = map(int, input().split())\nprint(a + b)")
CPP_ADD = cpp('#include <iostream>\nint main(){long long a,b; std::cin>>a>>b; std::cout<<a+b<<"\\n";}')


@pytest.fixture(scope="module")
def reward():
    with CodeReward(
        time_limit_s=TIME_LIMIT_S, wall_time_limit_s=WALL_TIME_LIMIT_S, memory_limit_mb=256, max_processes=MAX_PROCESSES,
        num_workers=2, timeout_s=30.0,
    ) as code_reward:
        yield code_reward


def _is_sandbox_uid(uid: int, sandbox_uid: int) -> bool:
    # As non-root the sandbox uid is ours, and this process tree is below; as root the rlimits
    # fallback runs each workspace as one of FALLBACK_UIDS.
    return (uid == sandbox_uid and uid != os.geteuid()) or uid in FALLBACK_UIDS


def _snapshot(sandbox_uid: int) -> dict:
    sandbox_processes = set()
    for process in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error):
            if process.info["uids"] and _is_sandbox_uid(process.info["uids"].real, sandbox_uid):
                sandbox_processes.add(process.pid)
    scratch_files = set()
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if _is_sandbox_uid(entry.stat(follow_symlinks=False).st_uid, sandbox_uid):
                        scratch_files.add(entry.path)
    with open("/proc/self/mountinfo") as handle:
        mounts = {line.split()[4] for line in handle}
    return {
        "descendants": {p.pid for p in psutil.Process().children(recursive=True)},
        "sandbox_uid_processes": sandbox_processes,
        "work_dirs": {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("sdzero_sandbox_")},
        "scratch_files_of_sandbox_uids": scratch_files,
        "mounts": mounts,
    }


@pytest.fixture
def machine_unharmed(reward):
    """Asserts after the test that no process, sandbox-uid process or work dir was left behind."""
    uid = reward.sandbox.run_as_uid
    before = _snapshot(uid)
    yield
    deadline = time.monotonic() + 3.0
    while True:  # the kernel may need a moment to finish tearing down a killed pid namespace
        after = _snapshot(uid)
        leftovers = {key: after[key] - before[key] for key in after}
        if not any(leftovers.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not any(leftovers.values()), f"left behind: {leftovers}"


# ---- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "actual, expected, checker, match",
    [
        # lines (the default, the release's comparison): trailing whitespace of each line and of
        # the whole output is ignored, nothing else is
        ("3   \n", "3", "lines", True),
        ("1 2 \n3\t\n\n", "1 2\n3", "lines", True),
        ("\n\n5\r\n", "5\n", "lines", True),  # blank lines around the output, CRLF
        ("1\n2", "1 2", "lines", False),  # the same tokens on other lines
        ("1\n3", "1\n2", "lines", False),
        ("1\n2\n3", "1\n2", "lines", False),  # an extra line
        ("a  b", "a b", "lines", False),
        ("5\n 6", "5\n6", "lines", False),  # a later line's indentation counts
        ("3\n", "3", "tokens", True),
        ("1  2\n3\n", "1 2 3", "tokens", True),
        ("1 2", "1 2 3", "tokens", False),
        ("12", "1 2", "tokens", False),
        ("a\r\nb\n\n", "a\nb", "exact", True),
        ("a  b", "a b", "exact", False),
        ("0.3333333", "0.33333333", "float", True),  # within 1e-6
        ("1000000.5", "1000000", "float", True),  # relative 5e-7
        ("0.3334", "0.3333", "float", False),
        ("YES 1.0", "YES 1", "float", True),
        ("NO 1.0", "YES 1", "float", False),
        ("nan", "nan", "float", True),  # identical tokens
        ("1.0", "nan", "float", False),
    ],
)
def test_outputs_match(actual, expected, checker, match):
    assert outputs_match(actual, expected, checker) is match


def test_parse_problem_forms_and_errors():
    assert parse_problem(ADD_TESTS).tests == (("1 2\n", "3\n"), ("5 7\n", "12"))
    assert parse_problem({"tests": ADD_TESTS, "checker": "float"}).checker == "float"
    assert parse_problem(json.dumps(ADD_TESTS)).checker == "lines"
    with pytest.raises(ValueError, match="no tests"):
        parse_problem([])
    with pytest.raises(ValueError, match="'tests' key"):
        parse_problem({"cases": ADD_TESTS})
    with pytest.raises(ValueError, match="unknown checker"):
        parse_problem({"tests": ADD_TESTS, "checker": "fuzzy"})
    with pytest.raises(ValueError, match="test 1"):
        parse_problem([{"input": "", "output": ""}, {"input": 1, "output": "2"}])
    with pytest.raises(ValueError, match="not JSON"):
        parse_problem("print(1)")
    with pytest.raises(TypeError, match="list of tests"):
        parse_problem(42)


def test_last_code_block():
    text = "```python\nprint(1)\n```\nbetter:\n```cpp\nint main(){}\n```\n"
    assert last_code_block(text) == ("cpp", "int main(){}\n")
    assert last_code_block("```py\nx=1\n```") == ("python", "x=1\n")
    assert last_code_block("```c++\nint main(){}\n```")[0] == "cpp"
    assert last_code_block("```\n#include <cstdio>\nint main(){}\n```")[0] == "cpp"
    assert last_code_block("```\nprint(2)\n```") == ("python", "print(2)\n")
    assert last_code_block("```java\nclass A {}\n```")[0] == "java"
    assert last_code_block("```python\nprint(1)\n```\n```python\nprint(2)") == ("python", "print(1)\n")  # unclosed last
    assert last_code_block("no code") is None
    for tag, language in (("c", "c"), ("java", "java"), ("golang", "go"), ("rs", "rust"), ("python3", "python")):
        assert last_code_block(f"```{tag}\nx\n```")[0] == language


THINK_CASES = [
    # closed <think> blocks are not where the program is looked for
    ("<think>\n```python\nprint(1)\n```\n</think>\nFinal:\n```python\nprint(2)\n```", ("python", "print(2)\n")),
    ("```python\nprint(2)\n```\n<think>second thoughts\n```python\nprint(1)\n```</think> done", ("python", "print(2)\n")),
    ("<think>\n```python\nprint(1)\n```\n</think>\nNo code after all.", None),
    # an unclosed <think> (cut off while reasoning) stays, as in the release
    ("<think>\ndraft:\n```python\nprint(1)\n```\nhmm", ("python", "print(1)\n")),
    # a trailing block of sample output does not hide the program (tagged blocks come first)
    ("```cpp\nint main(){}\n```\nSample:\n```\n3\n```\n```text\n3\n```", ("cpp", "int main(){}\n")),
]


@pytest.mark.parametrize("text, expected", THINK_CASES)
def test_last_code_block_ignores_think_blocks(text, expected):
    assert last_code_block(text) == expected


def test_think_blocks_are_ignored_when_judging(reward, machine_unharmed):
    wrong = "a, b = map(int, input().split())\nprint(a - b)"
    right = "a, b = map(int, input().split())\nprint(a + b)"
    responses = [
        f"<think>\n```python\n{right}\n```\n</think>\n```python\n{wrong}\n```",  # the draft was right, the answer is not
        f"```python\n{right}\n```\n<think>\n```python\n{wrong}\n```\n</think>",  # reasoning after the answer
        f"<think>\n```python\n{right}\n```\n</think>\nI give up.",
    ]
    results = reward.score_batch(responses, [ADD_TESTS] * 3)
    assert [(r.reward, r.reason) for r in results] == [(0, "wrong_answer"), (1, "correct"), (0, "no_answer")]


def test_release_languages_we_do_not_run_are_unsupported(caplog):
    tags = ["c", "java", "go", "rust"]
    responses = [f"```{tag}\nmain\n```" for tag in tags] * 2
    with caplog.at_level("WARNING", logger="sdzero_mcore.rewards.code"), CodeReward(num_workers=1) as fresh:
        results = fresh.score_batch(responses, [ADD_TESTS] * len(responses))
    assert {(r.reward, r.extracted, r.reason) for r in results} == {(0, "main\n", "unsupported_language")}
    warnings = [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()]
    assert sorted(w.split("final program is ")[1].split(",")[0] for w in warnings) == sorted(tags)  # once each


# ---- the dataset's public `examples` (open-r1/codeforces-cots) ---------------------------------------

CF_EXAMPLES = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]


def _codeforces_cots_row(**fields) -> dict:
    """A row shaped like open-r1/codeforces-cots (subset solutions): no official tests, the
    statement's sample tests in `examples`, an R1 generation with its reasoning."""
    row = {
        "id": "4/A", "aliases": None, "contest_id": "4", "contest_name": "Round 4", "contest_type": "CF",
        "contest_start": 1268395200, "contest_start_year": 2010, "index": "A", "time_limit": 1.0,
        "memory_limit": 64, "title": "Sum", "description": "Print a + b.", "input_format": "Two integers.",
        "output_format": "One integer.", "examples": CF_EXAMPLES, "note": None, "editorial": None,
        "prompt": "You will be given a competitive programming problem.\n\nPrint a + b.",
        "generation": "<think>\nEasy.\n</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "finish_reason": "stop", "api_metadata": {"completion_tokens": 10, "prompt_tokens": 20, "total_tokens": 30},
        "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
    }
    row.update(fields)
    return row


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_codeforces_cots_examples_are_the_tests(tmp_path, reward, machine_unharmed):
    loaded = load_rows(_write_jsonl(tmp_path / "cots.jsonl", [_codeforces_cots_row()]))
    assert (loaded.fields.preset, loaded.fields.question, loaded.fields.tests) == ("codeforces", "prompt", "examples")
    question = loaded[0]
    assert question.tests == CF_EXAMPLES and question.answer is None
    cfg = load_config(overrides=[f"data.dataset={tmp_path / 'cots.jsonl'}"])
    code_reward = reward_fn_for(cfg, loaded.questions)
    assert isinstance(code_reward, CodeReward) and code_reward.checker == "lines"
    code_reward.close()
    target = reward_target(question)
    # the dataset's own generation, <think> and all, passes its examples; a wrong program fails one
    assert reward.score(question.extra["generation"], target).reason == "correct"
    assert reward.score(python("a, b = map(int, input().split())\nprint(a * b)"), target).reason == "wrong_answer"
    # explicit preset and field name read it too; official tests, where a row has them, come first
    official = [{"input": "2 2\n", "output": "4\n"}]
    both = load_rows(_write_jsonl(tmp_path / "both.jsonl", [_codeforces_cots_row(official_tests=official)]),
                     preset="codeforces")
    assert both.fields.tests == "official_tests" and both[0].tests == official
    named = load_rows(_write_jsonl(tmp_path / "named.jsonl", [_codeforces_cots_row()]), tests_field="examples")
    assert named[0].tests == CF_EXAMPLES


def test_codeforces_cots_row_without_examples_names_the_row_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "cots.jsonl", [_codeforces_cots_row(), _codeforces_cots_row(id="4/B", examples=[])])
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): field 'examples': no test cases"):
        load_rows(path)


def test_lines_comparison_when_judging(reward, machine_unharmed):
    trailing = python("a, b = map(int, input().split())\nprint(a + b, end='   \\n\\n')")
    extra_line = python("a, b = map(int, input().split())\nprint(a + b)\nprint(0)")
    split_line = python("print(1)\nprint(2)")
    results = reward.score_batch([trailing, extra_line], [ADD_TESTS] * 2)
    assert [r.reason for r in results] == ["correct", "wrong_answer"]
    one_line = [{"input": "", "output": "1 2\n"}]
    assert reward.score(split_line, one_line).reason == "wrong_answer"  # lines: 1 and 2 on two lines differ
    assert reward.score(split_line, {"tests": one_line, "checker": "tokens"}).reason == "correct"


# ---- judging ------------------------------------------------------------------------------------


def test_python_programs_are_judged(reward, machine_unharmed):
    cases = [
        (PY_ADD, 1, "correct"),
        (python("a, b = map(int, input().split())\nprint(a - b)"), 0, "wrong_answer"),
        (python("a, b = map(int, input().split())\nprint(a + b)\nraise ValueError('late')"), 0, "runtime_error"),
        (python("import sys\nsys.exit(3)"), 0, "runtime_error"),
        ("the answer is a + b", 0, "no_answer"),
        ("```java\nclass Main {}\n```", 0, "unsupported_language"),
    ]
    results = reward.score_batch([c[0] for c in cases], [ADD_TESTS] * len(cases))
    assert [(r.reward, r.reason) for r in results] == [(c[1], c[2]) for c in cases]
    assert results[0].extracted == "a, b = map(int, input().split())\nprint(a + b)\n"
    assert results[4].extracted is None


def test_checker_modes_from_the_problem(reward, machine_unharmed):
    third = python("print(1/3)")
    assert reward.score(third, {"tests": [{"input": "", "output": "0.333333333"}], "checker": "float"}).reward == 1
    assert reward.score(third, {"tests": [{"input": "", "output": "0.333333333"}]}).reason == "wrong_answer"
    assert reward.score(python("print('a  b')"), {"tests": [{"input": "", "output": "a b"}], "checker": "exact"}).reward == 0
    assert reward.score(python("print('a  b')"), json.dumps([{"input": "", "output": "a b"}])).reward == 0  # lines
    assert reward.score(python("print('a  b')"), json.dumps({"tests": [{"input": "", "output": "a b"}], "checker": "tokens"})).reward == 1


def test_cpp_programs_are_judged(reward, machine_unharmed):
    cases = [CPP_ADD, cpp("#include <cstdio>\nint main(){int a,b; scanf(\"%d %d\",&a,&b); printf(\"%d\\n\", a*b);}"),
             cpp("int main() { return undeclared; }")]
    results = reward.score_batch(cases, [ADD_TESTS] * 3)
    if shutil.which("g++") is None:
        assert [r.reason for r in results] == ["unsupported_language"] * 3
    else:
        assert [(r.reward, r.reason) for r in results] == [(1, "correct"), (0, "wrong_answer"), (0, "compile_error")]


def test_cpp_without_a_compiler_is_unsupported():
    with CodeReward(cxx="no-such-compiler-sdzero") as no_cxx:
        assert no_cxx.score(CPP_ADD, ADD_TESTS).reason == "unsupported_language"


def test_get_reward_fn_builds_code_reward():
    with get_reward_fn("code", time_limit_s=3.0) as built:
        assert isinstance(built, CodeReward) and built.time_limit_s == 3.0


# ---- containment --------------------------------------------------------------------------------


def _timed_score(reward, response, tests=ADD_TESTS):
    start = time.monotonic()
    result = reward.score(response, tests)
    return result, time.monotonic() - start


@pytest.mark.parametrize(
    "source",
    ["while True:\n    pass", "import time\ntime.sleep(3600)", "import signal, time\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"],
    ids=["busy", "sleeping", "ignores-SIGXCPU"],
)
def test_runaway_programs_time_out(reward, machine_unharmed, source):
    result, elapsed = _timed_score(reward, python(source))
    assert (result.reward, result.reason) == (0, "timeout")
    assert elapsed < RUN_BOUND_S, elapsed


def test_fork_bomb_is_contained(reward, machine_unharmed):
    result, elapsed = _timed_score(reward, python("import os\nwhile True:\n    os.fork()"))
    # The first failed fork raises in whichever process hits the limit; the run ends either way.
    assert result.reward == 0 and result.reason in ("runtime_error", "timeout"), result
    assert elapsed < RUN_BOUND_S, elapsed
    persistent = python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    result, elapsed = _timed_score(reward, persistent)
    assert (result.reward, result.reason) == (0, "timeout")
    assert elapsed < RUN_BOUND_S, elapsed


def test_process_limit_is_enforced(reward, machine_unharmed):
    # Count how many children a program can hold at once: RLIMIT_NPROC must stop it below the limit.
    source = (
        "import os, time\ncount = 0\nwhile count < 200:\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    count += 1\nprint(count)\n"
    )
    sandbox = reward.sandbox
    limits = Limits(cpu_s=5, wall_s=10, memory_bytes=256 << 20, max_processes=MAX_PROCESSES, max_file_bytes=1 << 20)
    with sandbox.workspace() as workspace:
        with open(os.path.join(workspace.box, "bomb.py"), "w") as handle:
            handle.write(source)
        run = sandbox.run([sandbox.python_executable, "-I", "bomb.py"], workspace, limits=limits, python_program=True)
    assert run.returncode == 0, run
    forked = int(run.stdout.decode())
    assert 0 < forked < MAX_PROCESSES, forked


def test_fork_bomb_does_not_starve_a_concurrent_sample(reward, machine_unharmed):
    if reward.sandbox.isolation != "namespaces":
        pytest.skip("rlimits isolation counts processes per uid across sandboxes (documented)")
    bomb = python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    # The honest program forks too (a subprocess), which fails if the bomb used up a shared count.
    honest = python(
        "import subprocess, sys\na, b = map(int, input().split())\n"
        "print(subprocess.run([sys.executable, '-c', f'print({a}+{b})'], capture_output=True, text=True).stdout.strip())"
    )
    results = reward.score_batch([bomb, honest], [ADD_TESTS, ADD_TESTS])
    assert [(r.reward, r.reason) for r in results] == [(0, "timeout"), (1, "correct")]


@pytest.mark.parametrize(
    "source",
    ["x = bytearray(1 << 30)\nprint(len(x))", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"],
    ids=["one-allocation", "growing"],
)
def test_memory_bomb_is_contained(reward, machine_unharmed, source):
    result, elapsed = _timed_score(reward, python(source))
    assert (result.reward, result.reason) == (0, "memory_limit")
    assert elapsed < RUN_BOUND_S, elapsed


def test_output_flood_is_cut(machine_unharmed):
    # A roomy wall limit: the flood takes well under a second, but a loaded shared machine can
    # delay the sandbox's start by seconds, and this test is about the classification.
    with CodeReward(time_limit_s=TIME_LIMIT_S, wall_time_limit_s=20.0, max_output_mb=1) as small_output:
        result = small_output.score(python("while True:\n    print('x' * 1000)"), ADD_TESTS)
    assert (result.reward, result.reason) == (0, "output_limit")


@contextlib.contextmanager
def _host_dir_writable_by(uid: int, mode: int = 0o777):
    """A directory outside the sandbox work dir and outside /tmp that the sandbox uid could write
    to (or, with mode 0o755, read) on the host, so only the sandbox stops the access."""
    candidates = ["/srv", "/opt"] if os.geteuid() == 0 else [os.path.expanduser("~")]
    for parent in candidates:
        try:
            path = tempfile.mkdtemp(prefix="sdzero_escape_", dir=parent)
        except OSError:
            continue
        try:
            os.chmod(path, mode)
            if os.geteuid() == 0 and mode == 0o777:
                os.chown(path, uid, uid)
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    pytest.skip(f"no writable directory outside /tmp among {candidates} for the escape test")


def test_writes_outside_the_work_dir_do_not_land(reward, machine_unharmed):
    if reward.sandbox.isolation != "namespaces":
        pytest.skip("rlimits isolation does not contain writes to world-writable directories (documented)")
    tmp_target = f"/tmp/sdzero_escape_{uuid.uuid4().hex}"
    with _host_dir_writable_by(reward.sandbox.run_as_uid) as host_dir:
        host_target = os.path.join(host_dir, "escaped.txt")
        source = (
            "import os\nresults = []\n"
            f"for path in ({tmp_target!r}, {host_target!r}, 'inside.txt'):\n"
            "    try:\n        open(path, 'w').write('x')\n        results.append('wrote')\n"
            "    except OSError as exc:\n        results.append(type(exc).__name__)\n"
            "print(results[2])\n"
            "import sys\nprint(results, file=sys.stderr)\n"
        )
        result = reward.score(python(source), [{"input": "", "output": "wrote"}])
        # The program ran to the end (it could write its own work dir), and nothing reached the host.
        assert (result.reward, result.reason) == (1, "correct")
        assert not os.path.exists(tmp_target)
        assert not os.path.exists(host_target)
        assert os.listdir(host_dir) == []


@contextlib.contextmanager
def _listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


def _assert_no_connection(server):
    with pytest.raises(BlockingIOError):
        server.accept()


NETWORK_PROGRAM = (
    "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\nprint('connected')"
)


def test_network_is_blocked(reward, machine_unharmed):
    with _listener() as server:
        port = server.getsockname()[1]
        result = reward.score(python(NETWORK_PROGRAM.format(port=port)), [{"input": "", "output": "connected"}])
        assert (result.reward, result.reason) == (0, "runtime_error")
        _assert_no_connection(server)
    if shutil.which("g++") and reward.sandbox.isolation == "namespaces":
        with _listener() as server:
            port = server.getsockname()[1]
            program = cpp(
                "#include <arpa/inet.h>\n#include <cstdio>\n#include <sys/socket.h>\nint main(){\n"
                "int s = socket(AF_INET, SOCK_STREAM, 0); sockaddr_in a{}; a.sin_family = AF_INET;\n"
                f"a.sin_port = htons({port}); inet_pton(AF_INET, \"127.0.0.1\", &a.sin_addr);\n"
                "if (connect(s, (sockaddr*)&a, sizeof a) == 0) puts(\"connected\"); else puts(\"blocked\"); }"
            )
            result = reward.score(program, [{"input": "", "output": "connected"}])
            assert (result.reward, result.reason) == (0, "wrong_answer")  # it printed "blocked"
            _assert_no_connection(server)


def test_rlimits_fallback_still_contains_python(machine_unharmed):
    with CodeReward(time_limit_s=TIME_LIMIT_S, max_processes=MAX_PROCESSES, isolation="rlimits") as fallback:
        assert fallback.sandbox.isolation == "rlimits"
        assert fallback.score(PY_ADD, ADD_TESTS).reason == "correct"
        with _listener() as server:
            port = server.getsockname()[1]
            result = fallback.score(python(NETWORK_PROGRAM.format(port=port)), [{"input": "", "output": "connected"}])
            assert (result.reward, result.reason) == (0, "runtime_error")
            _assert_no_connection(server)
        result, elapsed = _timed_score(fallback, python("while True:\n    pass"))
        assert (result.reward, result.reason) == (0, "timeout") and elapsed < RUN_BOUND_S
        result, _ = _timed_score(fallback, python("x = bytearray(1 << 30)"))
        assert result.reason == "memory_limit"


def test_rlimits_fallback_contains_a_fork_bomb_when_root(machine_unharmed):
    if os.geteuid() != 0:
        pytest.skip("as non-root, rlimits mode runs programs under the trainer's uid, whose processes share the limit")
    bomb = python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    with CodeReward(time_limit_s=TIME_LIMIT_S, wall_time_limit_s=WALL_TIME_LIMIT_S, max_processes=MAX_PROCESSES, isolation="rlimits") as fallback:
        result, elapsed = _timed_score(fallback, bomb)
    assert (result.reward, result.reason) == (0, "timeout")
    assert elapsed < RUN_BOUND_S, elapsed


# ---- hardening (issue 17): what hostile programs got through before ------------------------------


def _needs_namespaces(reward):
    if reward.sandbox.isolation != "namespaces":
        pytest.skip("rlimits isolation cannot contain this (documented in the README's sandbox section)")


@pytest.fixture(scope="module")
def roomy():
    """For programs that should finish and be judged: limits far from what they need, so that a
    load spike on a shared 2-core machine cannot turn them into timeouts."""
    with CodeReward(time_limit_s=5.0, wall_time_limit_s=20.0, memory_limit_mb=256, num_workers=2) as code_reward:
        yield code_reward


def test_proc_is_private(roomy, machine_unharmed):
    """A secret on a host process's command line must not be visible in the sandbox's /proc."""
    _needs_namespaces(roomy)
    secret = f"sdzero-secret-{uuid.uuid4().hex}"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", secret])
    try:
        source = (
            "import os\nfound = []\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
            "        found.append(open(f'/proc/{pid}/cmdline', 'rb').read())\n    except OSError:\n        pass\n"
            f"print('leaked' if any({secret!r}.encode() in c for c in found) else 'hidden', len(found))\n"
        )
        result = roomy.score(python(source), [{"input": "", "output": "hidden 2"}])
        # Two processes: the init of the program's own pid namespace and the program; the count
        # is in the expected output so that a /proc showing host processes fails even without
        # the secret.
        assert (result.reward, result.reason) == (1, "correct"), result
    finally:
        holder.kill()
        holder.wait()


def test_host_unix_sockets_are_unreachable(roomy, machine_unharmed):
    _needs_namespaces(roomy)
    with _host_dir_writable_by(roomy.sandbox.run_as_uid) as host_dir:
        path = os.path.join(host_dir, "host.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(4)
        server.setblocking(False)
        try:
            source = (
                "import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\ntry:\n"
                f"    s.connect({path!r})\n    print('connected')\nexcept OSError as exc:\n    print('blocked')\n"
            )
            result = roomy.score(python(source), [{"input": "", "output": "blocked"}])
            assert (result.reward, result.reason) == (1, "correct"), result
            _assert_no_connection(server)
        finally:
            server.close()


def test_world_readable_files_outside_the_work_dir_are_unreadable(roomy, machine_unharmed):
    """Expected outputs left world-readable on the host must not let a program score 1."""
    _needs_namespaces(roomy)
    with _host_dir_writable_by(roomy.sandbox.run_as_uid, mode=0o755) as host_dir:
        answers = os.path.join(host_dir, "expected.txt")
        with open(answers, "w") as handle:
            handle.write("the expected output 4f1c")
        os.chmod(answers, 0o644)
        source = f"try:\n    print(open({answers!r}).read())\nexcept OSError:\n    print('unreadable')"
        result = roomy.score(python(source), [{"input": "", "output": "the expected output 4f1c"}])
        assert (result.reward, result.reason) == (0, "wrong_answer"), result


WRITE_UNTIL_FULL = (
    "import os\nwritten = 0\nchunk = b'x' * (1 << 20)\n"
    "for i in range(200):\n    path = {where!r}[i % 3] + f'/f{{i}}'\n    try:\n"
    "        with open(path, 'wb') as handle:\n            handle.write(chunk)\n            handle.flush()\n"
    "        written += 1\n    except OSError:\n        break\nprint(written)\n"
)


def test_disk_use_per_sample_is_bounded(roomy, machine_unharmed):
    """The work dir, /tmp and /dev/shm share one quota (a tmpfs of max_disk_bytes)."""
    _needs_namespaces(roomy)
    sandbox = roomy.sandbox
    limits = Limits(cpu_s=5, wall_s=10, memory_bytes=256 << 20, max_processes=8, max_file_bytes=64 << 20,
                    max_disk_bytes=16 << 20)
    with sandbox.workspace() as workspace:
        with open(os.path.join(workspace.box, "fill.py"), "w") as handle:
            handle.write(WRITE_UNTIL_FULL.format(where=[".", "/tmp", "/dev/shm"]))
        run = sandbox.run([sandbox.python_executable, "-I", "fill.py"], workspace, limits=limits, python_program=True)
    assert run.returncode == 0, run
    written_mib = int(run.stdout.decode())
    assert 8 <= written_mib < 16, written_mib  # about the quota, far from the 200 MiB it tried


MEMORY_OUTSIDE_RLIMIT_AS = (
    "import ctypes, mmap, os\nlibc = ctypes.CDLL(None, use_errno=True)\nreport = []\n"
    "try:\n    fd = os.memfd_create('hoard')\n    report.append('memfd allowed')\nexcept OSError:\n    report.append('memfd denied')\n"
    # a tmpfs of its own has no size limit: mounted directly (the program is root of its user
    # namespace in namespaces mode) or in a new user namespace
    "report.append('mount allowed' if libc.mount(b'hoard', b'/tmp', b'tmpfs', 0, b'size=4g') == 0 else 'mount denied')\n"
    "report.append('userns allowed' if libc.unshare(0x10000000) == 0 else 'userns denied')\n"
    "report.append('shm allowed' if libc.shmget(0, 1 << 20, 0o1000 | 0o600) >= 0 else 'shm denied')\n"
    "print(' '.join(report))\n"
)


@pytest.mark.parametrize("isolation", ["auto", "rlimits"])
def test_memory_outside_the_address_space_limit_is_denied(machine_unharmed, isolation):
    """memfd files, SysV shared memory and a tmpfs in a namespace of the program's own are not
    counted by RLIMIT_AS: the seccomp launcher denies all three, in both modes."""
    with CodeReward(time_limit_s=5.0, wall_time_limit_s=20.0, isolation=isolation) as code_reward:
        result = code_reward.score(python(MEMORY_OUTSIDE_RLIMIT_AS), [{"input": "", "output": "memfd denied mount denied userns denied shm denied"}])
    assert (result.reward, result.reason) == (1, "correct"), result


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_on_either_stream_is_output_limit(machine_unharmed, stream):
    with CodeReward(time_limit_s=TIME_LIMIT_S, wall_time_limit_s=20.0, max_output_mb=1) as small_output:
        result = small_output.score(python(f"import sys\nwhile True:\n    print('x' * 1000, file=sys.{stream})"), ADD_TESTS)
    assert (result.reward, result.reason) == (0, "output_limit"), result


SLOW_ADD = python("import time\na, b = map(int, input().split())\ntime.sleep(1.0)\nprint(a + b)")
KILL_EVERYONE = python("import os, signal, time\ntime.sleep(0.3)\nos.kill(-1, signal.SIGKILL)\nprint('still here')")


@pytest.mark.parametrize("isolation", ["auto", "rlimits"])
def test_kill_all_does_not_reach_other_samples(machine_unharmed, isolation):
    """kill(-1, SIGKILL) from one sample must not kill another sample judged at the same time."""
    with CodeReward(time_limit_s=3.0, wall_time_limit_s=6.0, num_workers=2, isolation=isolation) as code_reward:
        results = code_reward.score_batch([KILL_EVERYONE, SLOW_ADD], [[{"input": "", "output": "x"}], ADD_TESTS[:1]])
    assert results[1].reason == "correct", results


def test_rlimits_fallback_leaves_no_setsid_daemon(machine_unharmed):
    """A double-forked setsid daemon (out of the process group, idle so RLIMIT_CPU never ends it)
    must not outlive the sample: as root each fallback workspace has its own uid, killed whole."""
    if os.geteuid() != 0:
        pytest.skip("without root the fallback cannot switch uids, so it cannot find a daemon (documented)")
    daemon = python(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
        "        os._exit(0)\n    os._exit(0)\ntime.sleep(0.2)\nprint('forked')"
    )
    with CodeReward(time_limit_s=5.0, wall_time_limit_s=20.0, isolation="rlimits") as fallback:
        result = fallback.score(daemon, [{"input": "", "output": "forked"}])
        assert (result.reward, result.reason) == (1, "correct"), result
        # Right after the score, not after the fixture's grace period; zombies (killed, waiting for
        # the machine's init to reap them) cannot run.
        survivors = [
            p.info for p in psutil.process_iter(["pid", "uids", "status", "cmdline"])
            if p.info["uids"] and p.info["uids"].real in FALLBACK_UIDS and p.info["status"] != psutil.STATUS_ZOMBIE
        ]
        assert survivors == []


@pytest.mark.parametrize("isolation", ["auto", "rlimits"])
def test_sandbox_start_up_has_its_own_deadline(machine_unharmed, monkeypatch, isolation):
    """The wall-clock limit starts when the program starts (a loaded machine's slow sandbox start
    must not eat it); a start-up that takes too long is a setup failure, cleaned up like a run."""
    with CodeReward(time_limit_s=TIME_LIMIT_S, isolation=isolation) as code_reward:
        sandbox = code_reward.sandbox
        limits = Limits(cpu_s=5, wall_s=20, memory_bytes=256 << 20, max_processes=8, max_file_bytes=1 << 20)
        with sandbox.workspace() as workspace:
            ran = sandbox.run([sandbox.python_executable, "-I", "-c", "import time; time.sleep(0.2)"], workspace, limits=limits)
            assert ran.returncode == 0 and ran.wall_s >= 0.2 and not ran.setup_failed, ran
            monkeypatch.setattr(sandbox_module, "SETUP_TIMEOUT_S", 0.001)  # no sandbox starts that fast
            hung = sandbox.run([sandbox.python_executable, "-I", "-c", "print('ran')"], workspace, limits=limits)
        # (The program may get to run before the kill lands: the run is a failure either way.)
        assert hung.setup_failed and hung.timed_out, hung
        assert b"did not start the program within 0.001 s" in hung.stderr
