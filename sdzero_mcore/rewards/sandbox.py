"""Running untrusted programs (model-written solutions) with limits, for the code reward.

Containment, from the outside in:
- Each program gets a fresh workspace (Sandbox.workspace) and runs in a new session under rlimits
  set in preexec_fn (CPU time, address space, file size, stack, no core files) and a wall-clock
  timeout after which the whole process group is SIGKILLed. The wall clock starts when the
  program starts (the launcher below reports it): building the sandbox has its own deadline,
  SETUP_TIMEOUT_S, so a loaded machine's slow start-up does not eat the program's time. stdout and stderr go to files the
  program cannot read back; a stream that reaches the file-size limit is reported as such
  (RunResult.output_limit_hit), whichever stream it was.
- Every program (and the compiler) starts through a seccomp launcher (_SECCOMP_EXEC, x86_64 and
  aarch64) that denies what would hold memory or disk outside the limits, or reach past the
  sandbox: memfd_create/memfd_secret and SysV shared memory (pages no address-space limit counts),
  mount and every other mount-API call (a tmpfs of its own), unshare/setns and namespace flags to
  clone (a user namespace in which it could mount), clone3 (its flags live in memory a filter
  cannot read; libc falls back to clone), ptrace and process_vm_* and pidfd_getfd (reaching into a
  process with more privileges), chroot, kill(-1) (every process of the uid) and foreign ABIs (x32,
  i386 entry points with other syscall numbers).
- When the trainer runs as root the program runs as an unprivileged uid: RLIMIT_NPROC is not
  enforced for root, root can read and write everything, and root can signal every process.
- "namespaces" isolation (used when it works here, probed once per process): the program starts
  under `unshare --user --map-root-user --net --mount --pid --ipc --fork --kill-child` as uid
  `run_as_uid` (default nobody). A shell step inside (pid 1 of that pid namespace) builds a new root
  on a tmpfs of `Limits.max_disk_bytes` and pivots into it, so the host's tree is gone, not just
  hidden: it holds read-only bind mounts of only what programs need (/usr and the top-level links
  into it, the interpreter's and compiler's prefixes, the dynamic loader's cache and
  /etc/alternatives), /dev with null, zero, full, random and urandom, a fresh procfs, and /work,
  /tmp, /var/tmp, /dev/shm on the same tmpfs (one disk quota for everything the sample writes). The workspace's files are
  copied into /work; named outputs (the compiled binary) are copied back out after the program.
  The program then runs in a second user, mount and pid namespace with its own procfs (it sees
  only its own processes, never the setup shell, which holds the host's work directory) and
  RLIMIT_NPROC set by prlimit there (Linux counts processes per user namespace and uid, so each
  sandbox has its own count). Effects: no network and no host socket files (an empty network
  namespace, and no host path that holds sockets is mounted), no host files beyond the read-only
  system paths (test data never reaches the sandbox), no writes that outlive it, no signals out of
  it, and when the shell exits the kernel kills every process the program left behind; a `timeout`
  inside ends it even if the trainer dies first.
- "rlimits" isolation (the fallback when user namespaces are unavailable): rlimits, the seccomp
  launcher and, for Python programs, a prelude that replaces socket.socket. As root, every
  workspace gets its own uid from `fallback_uids` (held with an abstract socket, see
  _FallbackUids), so RLIMIT_NPROC and signals reach only that sample's processes; when a run ends
  every process of that uid is killed (setsid daemons included), and when the workspace closes its
  files in /tmp, /var/tmp and /dev/shm are removed.

What each mode cannot contain (also in the README's sandbox section):
- both: memory is bounded per process (RLIMIT_AS) times RLIMIT_NPROC, plus the tmpfs quota in
  namespaces mode, plus kernel memory for pipes, sockets and page tables. No cgroup limit is set:
  the machines this was built and tested on offer no cgroup v2 memory controller (cgroup v1
  only), so instead of an untested cgroup path the memory no rlimit counts is denied (seccomp).
  CPU time is per process (RLIMIT_CPU), so up to max_processes busy processes each get cpu_s.
- rlimits: the host filesystem: every file the sandbox uid may read (world-readable test data, a
  secret in a world-readable file) is readable, /proc lists every host process and its command
  line, world-writable directories are writable (disk bounded per file only, and files in
  tmpfs-backed ones such as /dev/shm hold memory), host Unix sockets are reachable, and C++
  programs have network access. Without root (one uid for trainer and programs) a program can also
  signal the trainer's processes by pid, and a setsid daemon outlives the run until RLIMIT_CPU ends it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import resource
import select
import shutil
import signal
import socket
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
# Per-workspace uids of the rlimits fallback (root only): a block far above ordinary users and the
# usual subordinate-uid ranges, so that no other process on the machine runs as one of them.
FALLBACK_UIDS = range(2_100_000_000, 2_100_000_256)

# Exit status the setup step and the seccomp launcher use when they cannot build the sandbox.
SETUP_FAILED_EXIT = 125
# How long the sandbox's start-up (mounts, copies, the launcher) may take before the program runs;
# its wall-clock limit starts after that. Normally a fraction of a second; generous for a loaded
# machine, and the run is a setup failure past it.
SETUP_TIMEOUT_S = 60.0

# Host paths a program may need, exposed read-only in namespaces mode (those that exist): the
# system tree, the dynamic loader's cache (ld.so reads no other file of /etc at run time) and the
# alternatives links some distributions install compilers through. The interpreter's and
# compiler's prefixes are added per sandbox. Nothing else of the host is visible.
SYSTEM_PATHS = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/alternatives",
)

# Runs as pid 1 of the new pid namespace, as root of the new user namespace (mapped to the
# sandbox uid outside). Arguments: the process limit, a wall-clock leash in whole seconds,
# "verbose" to report mounts that could not be made read-only (the probe uses it), the tmpfs size
# in bytes, the host paths to expose (newline-separated), the names to copy back into the
# workspace after the program (space-separated), the launcher's interpreter and code, the
# descriptor the launcher reports the program's start on; the program's argv follows. The
# workspace is the cwd.
_NAMESPACE_SETUP = r"""
nproc=$1; leash=$2; verbose=$3; quota=$4; expose=$5; outputs=$6; launcher=$7; seccomp=$8; started=$9; shift 9
fail() { echo "sdzero-sandbox: $*" >&2; exit 125; }
box=$PWD
mount --make-rprivate / 2>/dev/null || fail "cannot make the mount tree private"
# The new root lives on the workspace's empty "root" directory; its tmpfs is the sample's quota.
new=${box%/*}/root
mount -t tmpfs -o "size=$quota,mode=755" sdzero-root "$new" 2>/dev/null || fail "cannot mount the sandbox root"
mkdir -p "$new/proc" "$new/dev/shm" "$new/tmp" "$new/var/tmp" "$new/work" "$new/.old" || fail "cannot build the sandbox root"
chmod 1777 "$new/tmp" "$new/var/tmp" "$new/dev/shm"
# Read-only views of the system paths: symbolic links (/bin -> usr/bin) are recreated as links.
printf '%s\n' "$expose" | while IFS= read -r path; do
  [ -n "$path" ] || continue
  mkdir -p "$new${path%/*}"
  if [ -L "$path" ]; then
    ln -sfn "$(readlink "$path")" "$new$path"
  elif [ -e "$path" ]; then
    if [ -d "$path" ]; then mkdir -p "$new$path"; else : > "$new$path"; fi
    # One mount call (bind, then read-only) per path: each call is a process, on every run.
    if ! mount -o bind,ro "$path" "$new$path" 2>/dev/null; then
      mountpoint -q "$new$path" 2>/dev/null || mount --bind "$path" "$new$path" 2>/dev/null \
        || { echo "sdzero-sandbox: cannot expose $path" >&2; exit 125; }
      [ "$verbose" = verbose ] && echo "sdzero-sandbox: could not make $path read-only" >&2
    fi
  fi
done || exit 125
for dev in null zero full random urandom; do
  : > "$new/dev/$dev" && mount --bind "/dev/$dev" "$new/dev/$dev" 2>/dev/null || fail "cannot expose /dev/$dev"
done
ln -s /proc/self/fd "$new/dev/fd"; ln -s /proc/self/fd/0 "$new/dev/stdin"
ln -s /proc/self/fd/1 "$new/dev/stdout"; ln -s /proc/self/fd/2 "$new/dev/stderr"
mount -t proc proc "$new/proc" 2>/dev/null || fail "cannot mount a private /proc"
cp -R --preserve=mode "$box/." "$new/work/" 2>/dev/null || fail "cannot copy the workspace in"
# Kept open across the pivot to copy outputs back; the program never gets it (the launcher closes
# every descriptor but 0-2), and cannot reach it through /proc: the program's pid namespace does
# not contain this shell. The number avoids the start descriptor's (a single digit: sh's limit).
boxfd=3; [ "$started" = 3 ] && boxfd=4
eval "exec $boxfd<\"\$box\"" || fail "cannot open the workspace"
pivot_root=$(PATH=$PATH:/usr/sbin:/sbin command -v pivot_root) || fail "pivot_root not found"
cd "$new" && "$pivot_root" . .old 2>/dev/null && umount -l /.old 2>/dev/null && rmdir /.old || fail "cannot pivot into the sandbox root"
cd /work || fail "cannot enter /work"
# Not exec: this shell stays pid 1 here and an init (sh) is pid 1 of the program's own pid
# namespace, so the program gets ordinary signal semantics (pid 1 ignores default-action signals
# such as SIGXCPU) and its leftovers die with the namespaces. The program's status comes back as
# 128 + n when signal n killed it. `timeout` is a leash in case the trainer dies first.
timeout --signal=KILL "$leash" unshare --user --mount --pid --fork --kill-child --mount-proc --map-current-user -- \
  prlimit --nproc="$nproc" -- "$launcher" -I -S -c "$seccomp" "$started" sh -c '"$@"; exit $?' sdzero-init "$@"
status=$?
for name in $outputs; do
  if [ -f "/work/$name" ] && [ ! -L "/work/$name" ]; then
    cp --preserve=mode "/work/$name" "/proc/self/fd/$boxfd/$name" 2>/dev/null || fail "cannot copy $name out"
  fi
done
exit $status
"""
# What actually runs: the comments stay here, out of every sandbox's command line (ps, logs).
_NAMESPACE_SETUP_COMMAND = "\n".join(
    line for line in _NAMESPACE_SETUP.splitlines() if line.strip() and not line.lstrip().startswith("#")
)

# The seccomp launcher: `python -I -S -c _SECCOMP_EXEC FD program args...` installs the filter
# described in the module docstring, writes one byte to descriptor FD (the trainer starts the
# program's wall clock there, so the sandbox's own start-up does not count against the program),
# closes every descriptor but stdin, stdout and stderr (the program inherits nothing else), and
# execs the program. A syscall denied by number returns EPERM
# (ENOSYS for clone3 and foreign ABIs, which libc treats as "not available"). Without a filter for
# this machine's architecture it refuses to run anything (fail closed).
_SECCOMP_EXEC = r"""
import ctypes, os, struct, sys
ARCHES = {
    "x86_64": (0xC000003E, dict(memfd_create=319, memfd_secret=447, shmget=29, mount=165, umount2=166,
        pivot_root=155, chroot=161, unshare=272, setns=308, open_tree=428, move_mount=429, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, ptrace=101, process_vm_readv=310,
        process_vm_writev=311, pidfd_getfd=438), 56, 435, 62, True),
    "aarch64": (0xC00000B7, dict(memfd_create=279, memfd_secret=447, shmget=194, mount=40, umount2=39,
        pivot_root=41, chroot=51, unshare=97, setns=268, open_tree=428, move_mount=429, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, ptrace=117, process_vm_readv=270,
        process_vm_writev=271, pidfd_getfd=438), 220, 435, 129, False),
}
machine = os.uname().machine
if machine not in ARCHES:
    sys.stderr.write("sdzero-sandbox: no seccomp filter for architecture %s\n" % machine)
    sys.exit(125)
arch, denied, clone, clone3, kill, x32 = ARCHES[machine]
LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
NAMESPACE_FLAGS = 0x10000000 | 0x00020000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000 | 0x02000000
code = []  # (op, k, jump-true label, jump-false label); labels resolve to relative offsets below
code.append((LD, 4, None, None))
code.append((JEQ, arch, None, "enosys"))
code.append((LD, 0, None, None))
if x32:
    code.append((JGE, 0x40000000, "enosys", None))
for number in denied.values():
    code.append((JEQ, number, "eperm", None))
code.append((JEQ, clone3, "enosys", None))
code.append((JEQ, clone, "clone", None))
code.append((JEQ, kill, "kill", None))
code.append((RET, ALLOW, None, None))
labels = {}
labels["clone"] = len(code)
code += [(LD, 16, None, None), (JSET, NAMESPACE_FLAGS, "eperm", None), (RET, ALLOW, None, None)]
labels["kill"] = len(code)
code += [(LD, 16, None, None), (JEQ, 0xFFFFFFFF, "eperm", None), (RET, ALLOW, None, None)]
labels["eperm"] = len(code)
code.append((RET, EPERM, None, None))
labels["enosys"] = len(code)
code.append((RET, ENOSYS, None, None))
raw = b"".join(
    struct.pack("HBBI", op, labels[jt] - i - 1 if jt else 0, labels[jf] - i - 1 if jf else 0, k)
    for i, (op, k, jt, jf) in enumerate(code)
)
program = ctypes.create_string_buffer(raw)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(code), ctypes.addressof(program))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
if libc.prctl(38, 1, None, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
    sys.stderr.write("sdzero-sandbox: cannot install the seccomp filter: %s\n" % os.strerror(ctypes.get_errno()))
    sys.exit(125)
os.write(int(sys.argv[1]), b"1")
os.closerange(3, os.sysconf("SC_OPEN_MAX"))
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write("%s: %s\n" % (sys.argv[2], exc.strerror))
    sys.exit(127)
"""

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


MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Per-run limits. cpu_s is rounded up to whole seconds (RLIMIT_CPU's unit). max_disk_bytes:
    the tmpfs that holds /work, /tmp, /var/tmp and /dev/shm in namespaces mode (the workspace's
    files count against it too); the rlimits fallback bounds disk per file only."""

    cpu_s: float
    wall_s: float
    memory_bytes: int
    max_processes: int
    max_file_bytes: int
    max_disk_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        for name in ("cpu_s", "wall_s", "memory_bytes", "max_processes", "max_file_bytes", "max_disk_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunResult:
    """How a sandboxed run ended.

    returncode: the program's exit status (0..255) when it exited, None when it did not finish.
    signal: the signal that killed it when known (from the status, or SIGKILL from our timeout).
    timed_out: the wall-clock limit passed and the process group was killed.
    setup_failed: the sandbox itself could not be built (nothing of the program ran).
    output_limit_hit: stdout or stderr reached the file-size limit (the program may have died of
        it in any way: SIGXFSZ, an EFBIG error it could not even report, or a later crash).
    """

    returncode: Optional[int]
    signal: Optional[int]
    timed_out: bool
    setup_failed: bool
    stdout: bytes
    stderr: bytes
    wall_s: float
    output_limit_hit: bool = False


@dataclass(frozen=True)
class Workspace:
    root: str  # private to the trainer: holds the stdin/stdout/stderr files
    box: str  # the program's files; its cwd in rlimits mode, copied to /work in namespaces mode
    uid: int  # the uid its programs run as


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

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=fix_and_retry)
    elif os.path.lexists(path):
        os.unlink(path)


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


def _uid_has_live_processes(uid: int) -> bool:
    for process in psutil.process_iter(["uids", "status"]):
        uids = process.info["uids"]
        if uids and uid in uids and process.info["status"] != psutil.STATUS_ZOMBIE:
            return True
    return False


def kill_uid(uid: int, python: str, timeout_s: float = 5.0) -> bool:
    """SIGKILL every process running as ``uid`` (root only) and wait until none is left; False if
    some outlive timeout_s. kill(-1) sent as that uid reaches exactly its processes, in one pass
    the kernel makes under the task-list lock, so a fork bomb cannot outrun it (a process with a
    pending SIGKILL cannot finish a fork)."""
    deadline = time.monotonic() + timeout_s
    while _uid_has_live_processes(uid):
        subprocess.run(
            [python, "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
            user=uid, group=uid, extra_groups=[], env=dict(_CHILD_ENV), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, check=False,
        )
        if time.monotonic() >= deadline:
            return not _uid_has_live_processes(uid)
        time.sleep(0.01)
    return True


# World-writable places a fallback-mode program can leave files in (removed by uid afterwards).
_SHARED_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


def _remove_files_of(uid: int, directories: Sequence[str] = _SHARED_SCRATCH) -> None:
    for directory in directories:
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        _remove_tree(entry.path)


class _FallbackUids:
    """Hands out the per-workspace uids of the rlimits fallback. A uid is held by binding an
    abstract Unix socket named after it: the name is unique machine-wide (per network namespace),
    so trainers in other processes (other ranks) never get the same uid, the kernel releases it
    when the holder closes it or dies, and no lock file is left anywhere."""

    def __init__(self, uids: range) -> None:
        self.uids = uids

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        for uid in self.uids:
            holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                holder.bind(f"\0sdzero-sandbox-uid-{uid}")
            except OSError:  # held by another workspace
                holder.close()
                continue
            try:
                yield uid
            finally:
                holder.close()
            return
        raise RuntimeError(
            f"all {len(self.uids)} sandbox uids ({self.uids.start}..{self.uids.stop - 1}) are in use; "
            f"judge fewer samples at once or pass a larger fallback_uids range"
        )


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def install_prefix(executable: str) -> str:
    """The installation prefix of an executable (/opt/conda for /opt/conda/bin/python3)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(executable)))


class Sandbox:
    """Runs argv vectors contained (see the module docstring).

    isolation: "auto" (namespaces when the probe succeeds, else rlimits), "namespaces" (raise if
        unavailable) or "rlimits".
    run_as_uid: uid for programs in namespaces mode (and in rlimits mode without root); default
        NOBODY_UID when the trainer is root, else the trainer's own uid (the uid cannot change
        without root). The group becomes the same number.
    fallback_uids: the uids rlimits mode gives one per workspace when the trainer is root.
    python_executable: interpreter for Python programs and the seccomp launcher; default:
        sys.executable if the sandbox uid can run it, else the first of python3 on PATH,
        /usr/local/bin/python3, /usr/bin/python3 that it can run (a root-owned pyenv/conda under
        /root is not reachable by nobody).
    readable_paths: host paths programs may read besides SYSTEM_PATHS and the interpreter's prefix
        (namespaces mode), e.g. the prefix of a compiler installed outside /usr.
    workdir_parent: where workspaces are created (default tempfile.gettempdir()).
    """

    def __init__(
        self,
        isolation: str = "auto",
        run_as_uid: Optional[int] = None,
        python_executable: Optional[str] = None,
        workdir_parent: Optional[str] = None,
        readable_paths: Sequence[str] = (),
        fallback_uids: range = FALLBACK_UIDS,
    ) -> None:
        if isolation not in ("auto", "namespaces", "rlimits"):
            raise ValueError(f"isolation must be 'auto', 'namespaces' or 'rlimits', got {isolation!r}")
        self.is_root = os.geteuid() == 0
        if run_as_uid is None:
            run_as_uid = NOBODY_UID if self.is_root else os.geteuid()
        if run_as_uid != os.geteuid() and not self.is_root:
            raise ValueError(f"run_as_uid={run_as_uid} needs root; this process runs as uid {os.geteuid()}")
        if run_as_uid == 0 or 0 in fallback_uids:
            raise ValueError("uid 0 would run untrusted programs as root; pick unprivileged uids")
        if not len(fallback_uids):
            raise ValueError("fallback_uids is empty")
        self.run_as_uid = run_as_uid
        self.requested_isolation = isolation
        self.workdir_parent = workdir_parent or tempfile.gettempdir()
        self.readable_paths = tuple(readable_paths)
        self._fallback_uids = _FallbackUids(fallback_uids)
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

    @property
    def per_workspace_uids(self) -> bool:
        """Whether each workspace runs as its own uid (rlimits mode as root)."""
        return self.isolation == "rlimits" and self.is_root

    def _probed(self) -> tuple:
        with self._probe_lock:
            if self._probe_result is None:
                key = (self.requested_isolation, self.run_as_uid, self._requested_python, self.workdir_parent,
                       self.readable_paths)
                if key not in _PROBE_CACHE:
                    _PROBE_CACHE[key] = self._probe()
                self._probe_result = _PROBE_CACHE[key]
                self.readonly_failures = list(self._probe_result[3])
            return self._probe_result

    def _probe(self) -> tuple:
        """(isolation, python executable, tool paths, mounts left writable), found by running a
        trivial Python program through each configuration with each candidate interpreter."""
        found = {name: shutil.which(name) for name in ("unshare", "prlimit", "mount", "sh", "timeout")}
        tools = {name: path for name, path in found.items() if path}
        if self.requested_isolation in ("auto", "namespaces"):
            missing = [name for name, path in found.items() if path is None]
            if missing:
                why_not = f"missing tools: {', '.join(missing)}"
            else:
                try:
                    python, stderr = self._pick_python("namespaces", tools, verbose_setup=True)
                except RuntimeError as exc:
                    why_not = str(exc)
                else:
                    readonly_failures = [
                        line.split("could not make ", 1)[1].rsplit(" read-only", 1)[0]
                        for line in stderr.splitlines() if "could not make" in line
                    ]
                    if readonly_failures:
                        logger.warning("sandbox: these mounts stay writable inside the sandbox: %s", readonly_failures)
                    return "namespaces", python, tools, tuple(readonly_failures)
            if self.requested_isolation == "namespaces":
                raise RuntimeError(f"namespace isolation is unavailable here: {why_not}")
            logger.warning(
                "sandbox: user/network namespaces unavailable (%s); falling back to rlimits isolation, which cannot "
                "hide the host's files, processes or sockets (see the README's sandbox section)", why_not
            )
        python, _ = self._pick_python("rlimits", tools)
        return "rlimits", python, tools, ()

    def _pick_python(self, isolation: str, tools: dict, verbose_setup: bool = False) -> tuple[str, str]:
        """The first candidate interpreter that runs a program under ``isolation`` (it is also the
        seccomp launcher), with that run's stderr."""
        if self._requested_python:
            candidates = [self._requested_python]
        else:
            candidates = [sys.executable, shutil.which("python3"), "/usr/local/bin/python3", "/usr/bin/python3"]
        limits = Limits(cpu_s=10, wall_s=20, memory_bytes=1 << 30, max_processes=16, max_file_bytes=1 << 20)
        seen, failures = set(), []
        for candidate in candidates:
            if not candidate or candidate in seen or not os.path.exists(candidate):
                continue
            seen.add(candidate)
            try:
                with self._workspace(isolation, python=candidate) as ws:
                    result = self._run(
                        [candidate, "-I", "-c", "import sys; print(sys.version.split()[0])"], ws, limits, isolation, tools,
                        python=candidate, verbose_setup=verbose_setup,
                    )
            except OSError as exc:  # rlimits mode: exec itself fails (e.g. EACCES under /root)
                failures.append(f"{candidate}: {exc}")
                continue
            stderr = result.stderr.decode(errors="replace")
            if result.returncode == 0:
                if candidate != sys.executable:
                    logger.warning(
                        "sandbox: Python programs run with %s (Python %s): the trainer's interpreter %s is not "
                        "executable by sandbox uid %d", candidate, result.stdout.decode().strip(), sys.executable, ws.uid,
                    )
                return candidate, stderr
            failures.append(f"{candidate}: exit {result.returncode}, {stderr.strip()[-300:]}")
        raise RuntimeError(
            f"no Python interpreter runs under {isolation} isolation as the sandbox uid; pass python_executable= "
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

    def workspace(self) -> contextlib.AbstractContextManager[Workspace]:
        """A fresh workspace for one program, removed with everything in it afterwards (and, in
        rlimits mode as root, every process and scratch file of its uid)."""
        return self._workspace(self.isolation)

    @contextlib.contextmanager
    def _workspace(self, isolation: str, python: Optional[str] = None) -> Iterator[Workspace]:
        """python: the interpreter that kills the uid's processes (rlimits mode as root); default
        the probed one (the probe passes the candidate it is trying)."""
        with contextlib.ExitStack() as stack:
            if isolation == "rlimits" and self.is_root:
                uid = stack.enter_context(self._fallback_uids.hold())
            else:
                uid = self.run_as_uid
            root = tempfile.mkdtemp(prefix="sdzero_sandbox_", dir=self.workdir_parent)
            stack.callback(_remove_tree, root)
            if isolation == "rlimits" and self.is_root:
                # Last in, first out: kill its processes, then remove its files (and the workspace).
                stack.callback(_remove_files_of, uid)
                stack.callback(kill_uid, uid, python or self.python_executable)
            # The sandbox uid may pass through root to its box but not list or open root's files
            # (stdin/stdout/stderr live there).
            os.chmod(root, 0o711)
            box = os.path.join(root, "box")
            os.mkdir(box, 0o700)
            os.mkdir(os.path.join(root, "root"), 0o700)  # namespaces mode mounts the sandbox's root here
            if self.is_root:
                os.chown(box, uid, uid)
            yield Workspace(root=root, box=box, uid=uid)

    def run(
        self,
        argv: Sequence[str],
        workspace: Workspace,
        *,
        limits: Limits,
        stdin: bytes = b"",
        python_program: bool = False,
        outputs: Sequence[str] = (),
    ) -> RunResult:
        """Run argv in the workspace under limits. python_program: argv is [interpreter, *flags,
        script] and may get the rlimits-mode socket prelude. outputs: names of files the program
        writes in its cwd that later runs in this workspace need (the compiled binary)."""
        isolation, python, tools, _ = self._probed()
        return self._run(argv, workspace, limits, isolation, tools, python=python, stdin=stdin,
                         python_program=python_program, outputs=outputs)

    def _expose_paths(self, python: str) -> list[str]:
        paths = [*SYSTEM_PATHS, install_prefix(python), *self.readable_paths]
        return [path for path in dict.fromkeys(paths) if os.path.lexists(path)]

    def _run(
        self,
        argv: Sequence[str],
        workspace: Workspace,
        limits: Limits,
        isolation: str,
        tools: dict,
        *,
        python: str,
        stdin: bytes = b"",
        python_program: bool = False,
        verbose_setup: bool = False,
        outputs: Sequence[str] = (),
    ) -> RunResult:
        argv = list(argv)
        for name in outputs:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"outputs must be plain file names in the work directory, got {name!r}")
        rlimits = [
            (resource.RLIMIT_CPU, math.ceil(limits.cpu_s), math.ceil(limits.cpu_s) + 1),
            (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
            (resource.RLIMIT_STACK, limits.memory_bytes, limits.memory_bytes),
            (resource.RLIMIT_FSIZE, limits.max_file_bytes, limits.max_file_bytes),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        started_read, started_write = os.pipe()
        if isolation == "namespaces":
            command = [
                tools["unshare"], "--user", "--map-root-user", "--net", "--mount", "--pid", "--ipc", "--fork",
                "--kill-child", "--", tools["sh"], "-c", _NAMESPACE_SETUP_COMMAND, "sdzero-sandbox",
                str(limits.max_processes), str(math.ceil(limits.wall_s) + 5), "verbose" if verbose_setup else "quiet",
                str(limits.max_disk_bytes), "\n".join(self._expose_paths(python)), " ".join(outputs), python,
                _SECCOMP_EXEC, str(started_write), *argv,
            ]
        else:
            rlimits.append((resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes))
            if python_program:
                interpreter, *flags, script = argv
                flags = [flag for flag in flags if flag not in ("-I", "-S")]
                argv = [interpreter, "-I", "-S", *flags, "-c", _PYTHON_SOCKET_BLOCK, script]
            command = [python, "-I", "-S", "-c", _SECCOMP_EXEC, str(started_write), *argv]

        user_kwargs = {}
        if self.is_root:
            user_kwargs = dict(user=workspace.uid, group=workspace.uid, extra_groups=[])
        stdin_path = os.path.join(workspace.root, "stdin")
        stdout_path = os.path.join(workspace.root, "stdout")
        stderr_path = os.path.join(workspace.root, "stderr")
        # Mode 0600: in rlimits mode programs share /tmp with the workspaces, and another sample's
        # input is none of their business.
        with open(stdin_path, "wb", opener=_private_opener) as handle:
            handle.write(stdin)
        # Files, not pipes: output is bounded by RLIMIT_FSIZE instead of by our memory, and there
        # is no pipe to deadlock on.
        with open(stdin_path, "rb") as fin, open(stdout_path, "wb+", opener=_private_opener) as fout, \
                open(stderr_path, "wb+", opener=_private_opener) as ferr, open(started_read, "rb", buffering=0) as started:
            try:
                process = subprocess.Popen(
                    command,
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=workspace.box,
                    env=dict(_CHILD_ENV),
                    close_fds=True,
                    pass_fds=(started_write,),
                    start_new_session=True,
                    preexec_fn=functools.partial(_apply_rlimits, tuple(rlimits)),
                    **user_kwargs,
                )
            finally:
                os.close(started_write)
            # The launcher's byte (or end of file: everything exited before it) starts the clock.
            setup_hung = not select.select([started], [], [], SETUP_TIMEOUT_S)[0]
            start = time.monotonic()
            timed_out = False
            try:
                if setup_hung:
                    raise subprocess.TimeoutExpired(command, SETUP_TIMEOUT_S)
                process.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                if isolation == "namespaces":
                    self._kill_namespace_init(process)
            # Always, not only on timeout: in rlimits mode a finished program may have left
            # background children in its group (and, as root, anywhere else under its uid).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not kill_process_group(process.pid):
                logger.error("sandbox: processes of group %d survived SIGKILL for 5 s", process.pid)
            if isolation == "rlimits" and self.is_root and not kill_uid(workspace.uid, python):
                logger.error("sandbox: processes of uid %d survived SIGKILL for 5 s", workspace.uid)
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
        setup_failed = setup_hung or (raw == SETUP_FAILED_EXIT and stderr.startswith(b"sdzero-sandbox:"))
        if setup_hung:
            stderr += f"sdzero-sandbox: the sandbox did not start the program within {SETUP_TIMEOUT_S:g} s\n".encode()
        return RunResult(
            returncode=returncode, signal=signum, timed_out=timed_out, setup_failed=setup_failed,
            stdout=stdout, stderr=stderr, wall_s=wall_s,
            output_limit_hit=max(len(stdout), len(stderr)) >= limits.max_file_bytes,
        )


# Probe results per configuration, shared by every Sandbox of this process (the probe runs a few
# sandboxed processes; the answer does not change while the process lives).
_PROBE_CACHE: dict = {}
