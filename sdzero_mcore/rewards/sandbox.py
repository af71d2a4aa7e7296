"""Running untrusted programs (model-written solutions) with limits, for the code reward.

Containment, from the outside in:
- Each program runs in a fresh work directory, in a new session, under rlimits set in preexec_fn
  (CPU time, address space, file size, stack, no core files) and a wall-clock timeout after which
  the whole process group is SIGKILLed.
- When the trainer runs as root the program runs as an unprivileged uid (default 65534, nobody):
  RLIMIT_NPROC is not enforced for root, root can read and write everything (including the
  trainer's data under /root), and root can signal every process on the machine.
- "namespaces" isolation (used when it works here, probed once per process): the program starts
  under `unshare --user --map-root-user --net --mount --pid --fork --kill-child` and a small shell
  step inside that makes every mount read-only except the work directory, mounts private tmpfs
  over /tmp, /var/tmp, /dev/shm and /run/lock, and then enters a second user+mount namespace
  (which locks those mounts: the program cannot unmount or remount them) with RLIMIT_NPROC set by
  prlimit. Effects: no network (an empty network namespace), no lasting writes outside the work
  directory (the private tmpfs vanish with the sandbox), no signals to processes outside it, and
  when the shell (pid 1 of the pid namespace) exits every process the program left behind is
  killed by the kernel; a `timeout` inside ends the program even if the trainer dies first.
  RLIMIT_NPROC is set inside the nested user namespace because Linux (>= 5.14) counts processes
  per (user namespace, uid) and checks the count of every enclosing namespace too: a limit set
  before the first unshare would be shared by all sandboxes running as the same uid, so one fork
  bomb would starve its neighbours.
- "rlimits" isolation (the fallback when user namespaces are unavailable): rlimits, the uid switch
  when root, and an environment without proxies; Python programs run under `-I -S` with a prelude
  that replaces socket.socket so connecting raises. This is weaker: C++ programs keep network
  access, files writable by the sandbox uid (world-writable dirs such as /tmp) can be written, and
  a process that calls setsid() leaves the process group and survives the kill (RLIMIT_CPU still
  ends it if it computes).

Not contained in either mode: reading files the sandbox uid may read (world-readable files).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import psutil

logger = logging.getLogger(__name__)

NOBODY_UID = 65534

# Exit status the in-namespace setup step uses when it cannot build the sandbox.
SETUP_FAILED_EXIT = 125

# Runs as pid 1 of the new pid namespace, as root of the new user namespace (mapped to the
# sandbox uid outside). $1 is the process limit for the program, $2 a wall-clock leash in whole
# seconds, $3 "verbose" to report mounts that could not be made read-only (the probe uses it); the
# program's argv follows.
_NAMESPACE_SETUP = r"""
nproc=$1; leash=$2; verbose=$3; shift 3
fail() { echo "sdzero-sandbox: $*" >&2; exit 125; }
mount --make-rprivate / 2>/dev/null || fail "cannot make the mount tree private"
# The work directory becomes its own mount, so it stays writable when its parent turns read-only;
# cd again so the shell's cwd is on that new mount rather than the one underneath.
mount --bind . . 2>/dev/null || fail "cannot bind-mount the work directory"
cd "$PWD" || fail "cannot enter the work directory"
while read -r _id _parent _dev _root mountpoint rest; do
  fstype=${rest#* - }; fstype=${fstype%% *}
  case "$fstype" in
    proc|sysfs|cgroup|cgroup2|devpts|mqueue|securityfs|debugfs|tracefs|fusectl|configfs|bpf|pstore|binfmt_misc|hugetlbfs) continue ;;
  esac
  [ "$mountpoint" = "$PWD" ] && continue
  mount -o remount,bind,ro "$mountpoint" 2>/dev/null \
    || { [ "$verbose" = verbose ] && echo "sdzero-sandbox: could not make $mountpoint read-only" >&2; }
done < /proc/self/mountinfo
# Private scratch space instead of the machine's world-writable directories.
for dir in /tmp /var/tmp /dev/shm /run/lock; do
  [ -d "$dir" ] || continue
  mount -t tmpfs -o size=16m,mode=1777 sdzero-tmp "$dir" 2>/dev/null || fail "cannot mount a private $dir"
done
# The work directory usually lives under /tmp, now hidden. The shell's cwd still points at it, so
# bind it back at the same path inside the new tmpfs: programs (and Python, which makes its script
# path absolute) see the path they were given. --no-canonicalize: mount would otherwise turn "."
# into its path string, which now names the empty directory in the tmpfs.
mkdir -p "$PWD" 2>/dev/null; mount --no-canonicalize --bind . "$PWD" 2>/dev/null || fail "cannot re-expose the work directory"
cd "$PWD" || fail "cannot enter the work directory"
# Not exec: this shell stays pid 1, so the program gets ordinary signal semantics (pid 1 ignores
# default-action signals such as SIGXCPU) and its leftovers die with this shell. The program's
# status comes back as the shell's: 128 + n when signal n killed it. The trainer enforces the wall
# limit; `timeout` is a leash that still ends the program if the trainer dies first.
timeout --signal=KILL "$leash" unshare --user --mount --map-current-user -- prlimit --nproc="$nproc" -- "$@"
"""
# What actually runs: the comments stay here, out of every sandbox's command line (ps, logs).
_NAMESPACE_SETUP_COMMAND = "\n".join(
    line for line in _NAMESPACE_SETUP.splitlines() if line.strip() and not line.lstrip().startswith("#")
)

# Fallback network block for Python programs (rlimits isolation only): replaces the socket
# constructors, then runs the program file as __main__. Best effort: ctypes can still reach libc.
_PYTHON_SOCKET_BLOCK = r"""
import runpy, socket, sys
def _blocked(*args, **kwargs):
    raise PermissionError("network access is disabled in the sdzero sandbox")
class _BlockedSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _blocked()
socket.socket = socket.SocketType = _BlockedSocket
socket.create_connection = socket.create_server = socket.socketpair = socket.fromfd = _blocked
import _socket
_socket.socket = _BlockedSocket
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/nonexistent",
    "TMPDIR": "/tmp",
}


@dataclass(frozen=True)
class Limits:
    """Per-run limits. cpu_s is rounded up to whole seconds (RLIMIT_CPU's unit)."""

    cpu_s: float
    wall_s: float
    memory_bytes: int
    max_processes: int
    max_file_bytes: int

    def __post_init__(self) -> None:
        for name in ("cpu_s", "wall_s", "memory_bytes", "max_processes", "max_file_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunResult:
    """How a sandboxed run ended.

    returncode: the program's exit status (0..255) when it exited, None when it did not finish.
    signal: the signal that killed it when known (from the status, or SIGKILL from our timeout).
    timed_out: the wall-clock limit passed and the process group was killed.
    setup_failed: the sandbox itself could not be built (nothing of the program ran).
    """

    returncode: Optional[int]
    signal: Optional[int]
    timed_out: bool
    setup_failed: bool
    stdout: bytes
    stderr: bytes
    wall_s: float


@dataclass(frozen=True)
class Workspace:
    root: str  # private to the trainer: holds the stdin/stdout/stderr files
    box: str  # the program's cwd, writable by the sandbox uid


def _apply_rlimits(rlimits: tuple[tuple[int, int, int], ...]) -> None:
    # Runs in the child between fork and exec (after the uid switch), so it only calls
    # setrlimit: anything that takes locks could deadlock in a child forked from a threaded parent.
    for which, soft, hard in rlimits:
        resource.setrlimit(which, (soft, hard))


def _remove_tree(path: str) -> None:
    """rmtree that also removes what a program made unreadable (chmod 000 directories)."""

    def fix_and_retry(function, failed_path, _exc_info):
        parent = os.path.dirname(failed_path)
        for target in (parent, failed_path):
            with contextlib.suppress(OSError):
                os.chmod(target, 0o700)
        function(failed_path)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=fix_and_retry)


def _group_has_live_members(pgid: int) -> bool:
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                return True
        except (OSError, psutil.Error):  # exited meanwhile
            continue
    return False


def kill_process_group(pgid: int, timeout_s: float = 5.0) -> bool:
    """SIGKILL every process in the group and wait until none is running; False if some outlive
    timeout_s. Zombies count as gone: they cannot run, and orphans among them wait for the
    machine's init to reap them (about 2 s on this machine's init), which is not worth waiting for."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # none left (or only others' zombies)
            return True
        if not _group_has_live_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class Sandbox:
    """Runs argv vectors contained (see the module docstring).

    isolation: "auto" (namespaces when the probe succeeds, else rlimits), "namespaces" (raise if
        unavailable) or "rlimits".
    run_as_uid: uid for programs; default NOBODY_UID when the trainer is root, else the trainer's
        own uid (the uid cannot change without root). The group becomes the same number.
    python_executable: interpreter for Python programs; default: sys.executable if the sandbox uid
        can run it, else the first of python3 on PATH, /usr/local/bin/python3, /usr/bin/python3
        that it can run (a root-owned pyenv/conda under /root is not reachable by nobody).
    workdir_parent: where work directories are created (default tempfile.gettempdir()).
    """

    def __init__(
        self,
        isolation: str = "auto",
        run_as_uid: Optional[int] = None,
        python_executable: Optional[str] = None,
        workdir_parent: Optional[str] = None,
    ) -> None:
        if isolation not in ("auto", "namespaces", "rlimits"):
            raise ValueError(f"isolation must be 'auto', 'namespaces' or 'rlimits', got {isolation!r}")
        self.is_root = os.geteuid() == 0
        if run_as_uid is None:
            run_as_uid = NOBODY_UID if self.is_root else os.geteuid()
        if run_as_uid != os.geteuid() and not self.is_root:
            raise ValueError(f"run_as_uid={run_as_uid} needs root; this process runs as uid {os.geteuid()}")
        if run_as_uid == 0:
            raise ValueError("run_as_uid=0 would run untrusted programs as root; pick an unprivileged uid")
        self.run_as_uid = run_as_uid
        self.requested_isolation = isolation
        self.workdir_parent = workdir_parent or tempfile.gettempdir()
        self._requested_python = python_executable
        self._probe_lock = threading.Lock()
        self._probe_result: Optional[tuple] = None
        self.readonly_failures: list[str] = []  # mounts the probe could not make read-only

    # ---- probing ---------------------------------------------------------------------------

    @property
    def isolation(self) -> str:
        """"namespaces" or "rlimits": what this machine supports (probed on first use)."""
        return self._probed()[0]

    @property
    def python_executable(self) -> str:
        return self._probed()[1]

    def _probed(self) -> tuple:
        with self._probe_lock:
            if self._probe_result is None:
                key = (self.requested_isolation, self.run_as_uid, self._requested_python, self.workdir_parent)
                if key not in _PROBE_CACHE:
                    _PROBE_CACHE[key] = self._probe()
                self._probe_result = _PROBE_CACHE[key]
                self.readonly_failures = list(self._probe_result[3])
            return self._probe_result

    def _probe(self) -> tuple:
        """(isolation, python executable, tool paths, mounts left writable), found by running
        trivial programs through each configuration."""
        found = {name: shutil.which(name) for name in ("unshare", "prlimit", "mount", "sh", "timeout")}
        tools = {name: path for name, path in found.items() if path}
        limits = Limits(cpu_s=10, wall_s=20, memory_bytes=1 << 30, max_processes=16, max_file_bytes=1 << 20)
        isolation = "rlimits"
        readonly_failures: list[str] = []
        why_not = ""
        if self.requested_isolation in ("auto", "namespaces"):
            missing = [name for name, path in found.items() if path is None]
            if missing:
                why_not = f"missing tools: {', '.join(missing)}"
            else:
                with self.workspace() as ws:
                    result = self._run(["true"], ws, limits, "namespaces", tools, verbose_setup=True)
                if result.returncode == 0:
                    isolation = "namespaces"
                    readonly_failures = [
                        line.split("could not make ", 1)[1].rsplit(" read-only", 1)[0]
                        for line in result.stderr.decode(errors="replace").splitlines()
                        if "could not make" in line
                    ]
                    if readonly_failures:
                        logger.warning("sandbox: these mounts stay writable inside the sandbox: %s", readonly_failures)
                else:
                    why_not = (
                        f"`unshare --user --net --mount --pid` failed (exit {result.returncode}): "
                        f"{result.stderr.decode(errors='replace').strip()[-500:]}"
                    )
            if isolation != "namespaces":
                if self.requested_isolation == "namespaces":
                    raise RuntimeError(f"namespace isolation is unavailable here: {why_not}")
                logger.warning(
                    "sandbox: user/network namespaces unavailable (%s); falling back to rlimits isolation: "
                    "Python programs get a socket-blocking prelude, C++ programs keep network access", why_not
                )
        python = self._pick_python(limits, isolation, tools)
        return isolation, python, tools, tuple(readonly_failures)

    def _pick_python(self, limits: Limits, isolation: str, tools: dict) -> str:
        if self._requested_python:
            candidates = [self._requested_python]
        else:
            candidates = [sys.executable, shutil.which("python3"), "/usr/local/bin/python3", "/usr/bin/python3"]
        seen, failures = set(), []
        for candidate in candidates:
            if not candidate or candidate in seen or not os.path.exists(candidate):
                continue
            seen.add(candidate)
            try:
                with self.workspace() as ws:
                    result = self._run(
                        [candidate, "-I", "-c", "import sys; print(sys.version.split()[0])"], ws, limits, isolation, tools
                    )
            except OSError as exc:  # rlimits mode: exec itself fails (e.g. EACCES under /root)
                failures.append(f"{candidate}: {exc}")
                continue
            if result.returncode == 0:
                if candidate != sys.executable:
                    logger.warning(
                        "sandbox: Python programs run with %s (Python %s): the trainer's interpreter %s is not "
                        "executable by sandbox uid %d", candidate, result.stdout.decode().strip(), sys.executable, self.run_as_uid,
                    )
                return candidate
            failures.append(f"{candidate}: exit {result.returncode}, {result.stderr.decode(errors='replace').strip()[-200:]}")
        raise RuntimeError(
            f"no Python interpreter is executable by sandbox uid {self.run_as_uid}; pass python_executable= "
            f"(tried: {'; '.join(failures) or 'none found'})"
        )

    # ---- running ---------------------------------------------------------------------------

    @staticmethod
    def _kill_namespace_init(process: subprocess.Popen) -> None:
        """SIGKILL the pid-1 shell of the sandbox's pid namespace (the kernel then kills every
        process in it) and let unshare reap it. Killing unshare first would orphan the shell, and
        the orphan's zombie lingers until the machine's init reaps it (about 2 s on this machine's
        init), which a process-group wait would have to sit out."""
        try:
            children = psutil.Process(process.pid).children()
        except psutil.Error:
            return
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=2.0)

    @contextlib.contextmanager
    def workspace(self) -> Iterator[Workspace]:
        """A fresh work directory for one program (its cwd), removed with everything in it afterwards."""
        root = tempfile.mkdtemp(prefix="sdzero_sandbox_", dir=self.workdir_parent)
        try:
            # The sandbox uid may pass through root to its box but not list or open root's files
            # (stdin/stdout/stderr live there).
            os.chmod(root, 0o711)
            box = os.path.join(root, "box")
            os.mkdir(box, 0o700)
            if self.is_root:
                os.chown(box, self.run_as_uid, self.run_as_uid)
            yield Workspace(root=root, box=box)
        finally:
            _remove_tree(root)

    def run(
        self,
        argv: Sequence[str],
        workspace: Workspace,
        *,
        limits: Limits,
        stdin: bytes = b"",
        python_program: bool = False,
    ) -> RunResult:
        """Run argv with cwd = workspace.box under limits. python_program: argv is
        [interpreter, *flags, script] and may get the rlimits-mode socket prelude."""
        isolation, _, tools, _ = self._probed()
        return self._run(argv, workspace, limits, isolation, tools, stdin=stdin, python_program=python_program)

    def _run(
        self,
        argv: Sequence[str],
        workspace: Workspace,
        limits: Limits,
        isolation: str,
        tools: dict,
        *,
        stdin: bytes = b"",
        python_program: bool = False,
        verbose_setup: bool = False,
    ) -> RunResult:
        argv = list(argv)
        rlimits = [
            (resource.RLIMIT_CPU, math.ceil(limits.cpu_s), math.ceil(limits.cpu_s) + 1),
            (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
            (resource.RLIMIT_STACK, limits.memory_bytes, limits.memory_bytes),
            (resource.RLIMIT_FSIZE, limits.max_file_bytes, limits.max_file_bytes),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        if isolation == "namespaces":
            command = [
                tools["unshare"], "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
                "--", tools["sh"], "-c", _NAMESPACE_SETUP_COMMAND, "sdzero-sandbox", str(limits.max_processes),
                str(math.ceil(limits.wall_s) + 5), "verbose" if verbose_setup else "quiet", *argv,
            ]
        else:
            rlimits.append((resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes))
            if python_program:
                interpreter, *flags, script = argv
                flags = [flag for flag in flags if flag not in ("-I", "-S")]
                argv = [interpreter, "-I", "-S", *flags, "-c", _PYTHON_SOCKET_BLOCK, script]
            command = argv

        user_kwargs = {}
        if self.is_root:
            user_kwargs = dict(user=self.run_as_uid, group=self.run_as_uid, extra_groups=[])
        stdin_path = os.path.join(workspace.root, "stdin")
        stdout_path = os.path.join(workspace.root, "stdout")
        stderr_path = os.path.join(workspace.root, "stderr")
        with open(stdin_path, "wb") as handle:
            handle.write(stdin)
        # Files, not pipes: output is bounded by RLIMIT_FSIZE instead of by our memory, and there
        # is no pipe to deadlock on.
        with open(stdin_path, "rb") as fin, open(stdout_path, "wb+") as fout, open(stderr_path, "wb+") as ferr:
            start = time.monotonic()
            process = subprocess.Popen(
                command,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=workspace.box,
                env=dict(_CHILD_ENV),
                close_fds=True,
                start_new_session=True,
                preexec_fn=functools.partial(_apply_rlimits, tuple(rlimits)),
                **user_kwargs,
            )
            timed_out = False
            try:
                process.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                if isolation == "namespaces":
                    self._kill_namespace_init(process)
            # Always, not only on timeout: in rlimits mode a finished program may have left
            # background children in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not kill_process_group(process.pid):
                logger.error("sandbox: processes of group %d survived SIGKILL for 5 s", process.pid)
            wall_s = time.monotonic() - start
            fout.seek(0)
            stdout = fout.read()
            ferr.seek(0)
            stderr = ferr.read()

        raw = process.returncode
        returncode: Optional[int]
        signum: Optional[int]
        if timed_out:
            returncode, signum = None, signal.SIGKILL
        elif raw < 0:  # the direct child died of a signal (rlimits mode, or the launcher itself)
            returncode, signum = None, -raw
        elif isolation == "namespaces" and raw > 128 and raw - 128 < signal.NSIG:
            # The pid-1 shell reports a program killed by signal n as 128 + n. A program that
            # exits with such a code on purpose reads the same; both are failures anyway.
            returncode, signum = None, raw - 128
        else:
            returncode, signum = raw, None
        setup_failed = (
            isolation == "namespaces" and raw == SETUP_FAILED_EXIT and stderr.startswith(b"sdzero-sandbox:")
        )
        return RunResult(
            returncode=returncode, signal=signum, timed_out=timed_out, setup_failed=setup_failed,
            stdout=stdout, stderr=stderr, wall_s=wall_s,
        )


# Probe results per configuration, shared by every Sandbox of this process (the probe runs a few
# sandboxed processes; the answer does not change while the process lives).
_PROBE_CACHE: dict = {}
