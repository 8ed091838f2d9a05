"""Run model-written Python under bubblewrap and score it against test cases that never enter the sandbox.

The boundary is the kernel's, set up by bubblewrap (``bwrap``, Debian package ``bubblewrap``):
- new PID, network, mount, IPC, UTS and cgroup namespaces, plus a user namespace where one helps (see
  ``isolation()``: as root, a user namespace would map the program to host root, which the kernel
  exempts from the process limit, so a root trainer instead gives every sandbox its own unused
  unprivileged uid and no user namespace, unless the interpreter is reachable by that uid, in which
  case bwrap itself runs as that uid with a user namespace too);
- a root filesystem holding read-only binds of ``/usr``, ``/bin``, ``/lib*`` and the interpreter's
  prefix (``sys.base_prefix``) only: no project, no home directory, no ``/etc``, no ``/proc``; a
  private working directory ``/sandbox``, ``/tmp`` and ``/dev/shm``, each a small tmpfs that
  vanishes with the sandbox; a minimal ``/dev``;
- no capabilities, no new privileges, its own session, an environment of five variables, and
  ``--die-with-parent``;
- rlimits (CPU seconds, address space, file size, open files, processes, no core dumps) set by the
  runner before any model-written line runs, and a wall-clock deadline after which the trainer kills
  the whole PID namespace and waits until it is gone.
No seccomp filter is installed: no maintained Python binding of libseccomp installs from PyPI.

The verdict is computed in the trainer. Test cases are data: the sandbox receives the program and the
inputs only, runs each case in a fresh process, and sends back what the program printed or returned;
the trainer compares that with the expected values, which never leave it. Everything comes back
through one pipe, read with a byte cap and a deadline: nothing the program writes to a file or does
to its sandbox reaches the trainer, so exiting early, patching the runner, deleting tests or printing
fake results score exactly what a program with wrong answers scores. Old assert-style ``tests``
strings still run, through the same boundary, but their verdict comes from inside the sandbox and
can be forged (see ``parse_tests``).

Without bwrap the code reward refuses to run, unless ``POLICYOPT_UNSAFE_UNISOLATED_CODE=1`` opts in to
running model-written code as a plain subprocess of the trainer, with the trainer's rights.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

UNSAFE_ENV = "POLICYOPT_UNSAFE_UNISOLATED_CODE"
WORKDIR = "/sandbox"  # the program's working directory inside the sandbox
SANDBOX_UID = 65534  # the uid the program sees inside a user namespace
_UID_BASE = 2_000_000_000  # as root without a user namespace: one unused host uid per concurrent sandbox
_HOST_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                "PYTHONIOENCODING": "utf-8"}
_LOG_BYTES = 8192
_READY, _DONE = json.dumps({"ready": True}).encode(), json.dumps({"done": True}).encode()  # the runner's markers


class SandboxUnavailable(RuntimeError):
    """No isolation is available on this machine and unisolated execution was not opted in to."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (did not start, or could not be cleaned up): not the program's doing."""


class MalformedTests(ValueError):
    """A row's ``tests`` value is not in a format that ``parse_tests`` accepts."""


@dataclass
class SandboxLimits:
    wall_seconds: float = 5.0  # the whole program, all cases, from the moment the runner is ready
    case_seconds: float | None = None  # one case; None: only wall_seconds
    cpu_seconds: int = 5  # per process
    memory_bytes: int = 512 * 1024 * 1024  # address space, per process
    file_bytes: int = 1024 * 1024  # any one file written, including a case's stdout
    open_files: int = 64
    processes: int = 8  # all processes of the sandbox together
    disk_bytes: int = 16 * 1024 * 1024  # each of the tmpfs /sandbox, /tmp and /dev/shm
    answer_bytes: int = 256 * 1024  # one case's stdout or return value sent back; longer fails
    output_bytes: int = 4 * 1024 * 1024  # all that the trainer reads back from one program
    startup_seconds: float = 30.0  # until the runner is ready, else SandboxError (a host problem)


# ------------------------------------------------------------------------------------------ test cases


@dataclass(frozen=True)
class StdinCase:
    """Run the program as a script with ``stdin``; it passes when its stdout equals ``stdout``."""

    stdin: str
    stdout: str


@dataclass(frozen=True)
class CallCase:
    """Call ``call(*args, **kwargs)`` after executing the program; it passes when the return value,
    converted to JSON, equals ``expected``. ``call`` may be ``"Class.method"`` (called on ``Class()``)."""

    call: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    expected: Any = None


@dataclass(frozen=True)
class AssertCase:
    """Legacy: run ``source`` (e.g. assert statements) after the program, in its namespace. The program
    runs in the same process as these tests, so it can always forge this verdict."""

    source: str


TestCase = StdinCase | CallCase | AssertCase


def _case_from_dict(item: Any, where: str) -> StdinCase | CallCase:
    if not isinstance(item, dict):
        raise MalformedTests(f"{where}: a test case must be an object, got {type(item).__name__}")
    keys = set(item)
    if "stdin" in keys or "stdout" in keys:
        if keys != {"stdin", "stdout"}:
            raise MalformedTests(f"{where}: a stdin case has exactly the keys stdin and stdout, got {sorted(keys)}")
        if not isinstance(item["stdin"], str) or not isinstance(item["stdout"], str):
            raise MalformedTests(f"{where}: stdin and stdout must be strings")
        return StdinCase(item["stdin"], item["stdout"])
    if "call" in keys:
        unknown = keys - {"call", "args", "kwargs", "return"}
        if unknown or "return" not in keys:
            raise MalformedTests(f"{where}: a call case has the keys call, args, kwargs, return "
                                  f"(return required), got {sorted(keys)}")
        args, kwargs = item.get("args", []), item.get("kwargs", {})
        if not isinstance(item["call"], str) or not item["call"]:
            raise MalformedTests(f"{where}: call must be a function name")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise MalformedTests(f"{where}: args must be a list and kwargs an object")
        return CallCase(item["call"], tuple(args), dict(kwargs), item["return"])
    raise MalformedTests(f"{where}: a test case has either stdin/stdout or call/args/kwargs/return, "
                          f"got {sorted(keys)}")


def parse_tests(tests: Any) -> list[TestCase] | None:
    """The test cases of one row's ``tests`` value; None when it has none.

    Data, whose verdict the program cannot forge: a list of cases, or a JSON string holding one, each
    - ``{"stdin": "1 2\\n", "stdout": "3\\n"}``: run the program as a script (``__name__ == "__main__"``)
      with that input; passes when its stdout matches, ignoring trailing whitespace on each line and
      trailing blank lines, and it exits with status 0;
    - ``{"call": "add", "args": [1, 2], "kwargs": {}, "return": 3}``: execute the program (as module
      ``solution``), call ``add(1, 2)`` (``"Class.method"`` calls it on ``Class()``); passes when the return
      value, converted to JSON (tuples become lists), equals ``return`` (see ``values_match``).
    Legacy code, whose verdict the program can forge (it runs in the same process as these lines and can
    report success itself): any other string, e.g. ``"assert add(1, 2) == 3"``, or a list of such strings
    (or a JSON string holding one), joined by lines; passes when it runs to its end.
    """
    if tests is None or (isinstance(tests, (str, list, tuple)) and len(tests) == 0):
        return None
    if isinstance(tests, str):
        try:
            decoded = json.loads(tests) if tests.lstrip().startswith("[") else None
        except ValueError:
            decoded = None  # not JSON: test code that happens to start with "["
        if not isinstance(decoded, list) or not decoded:
            return [AssertCase(tests)]
        tests = decoded
    if isinstance(tests, (list, tuple)):
        if all(isinstance(item, str) for item in tests):
            return [AssertCase("\n".join(tests))]
        if not all(isinstance(item, dict) for item in tests):
            raise MalformedTests("tests must be a list of test-case objects or a list of test-code strings, "
                                 f"got a list of {', '.join(sorted({type(item).__name__ for item in tests}))}")
        return [_case_from_dict(item, f"test case {i}") for i, item in enumerate(tests)]
    raise MalformedTests(f"tests must be a list of cases, a JSON string or test code, got {type(tests).__name__}")


def _normalise_stdout(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def values_match(expected: Any, got: Any) -> bool:
    """JSON values equal: same types (true is not 1), numbers within a relative or absolute 1e-9 when
    either is a float, lists in order, objects by key."""
    try:
        return _match(expected, got)
    except RecursionError:
        return False


def _match(expected: Any, got: Any) -> bool:
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if isinstance(expected, int) and isinstance(got, int):
            return expected == got
        return math.isclose(expected, got, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(expected) == len(got) and all(_match(a, b) for a, b in zip(expected, got))
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(_match(expected[k], got[k]) for k in expected)
    if expected is None or got is None:
        return expected is None and got is None
    return type(expected) is type(got) and expected == got


# ------------------------------------------------------------------------- the runner inside the sandbox

# Runs as ``python -I -B -c RUNNER`` in the sandbox. It reads the job (program and inputs, never the
# expected values) from stdin, drops to the given uid, sets the rlimits, says "ready" and then runs each
# case in a forked process whose stdin, stdout, stderr and result fd are memfds the runner holds. What
# it sends back on its stdout is only data the trainer checks; nothing in here is trusted after "ready".
_RUNNER = r'''
import base64, builtins, io, json, os, resource, select, signal, sys, traceback

def send(fd, message):
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]

def scratch(name):  # a file with no name the program could replace
    try:
        return os.memfd_create(name)
    except (AttributeError, OSError):
        import tempfile
        fd, path = tempfile.mkstemp()
        os.unlink(path)
        return fd

def read_all(fd, limit):
    return os.pread(fd, limit + 1, 0)

def child(kind, case, job):
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = sys.__stdout__ = out = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = sys.__stderr__ = err = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    status = 1
    try:
        namespace = {"__name__": "solution" if kind == "call" else "__main__", "__builtins__": builtins}
        if kind == "stdin":
            try:
                exec(compile(job["code"], "solution.py", "exec"), namespace)
                status = 0
            except SystemExit as e:
                status = 0 if e.code in (None, 0) else 1
                if isinstance(e.code, str):
                    print(e.code, file=err)
        elif kind == "call":
            exec(compile(job["code"], "solution.py", "exec"), namespace)
            owner, _, method = case["call"].partition(".")
            function = namespace[owner]
            if method:
                function = getattr(function(), method)
            text = json.dumps(function(*case["args"], **case["kwargs"])).encode()
            while text:
                text = text[os.write(3, text):]
            status = 0
        else:
            exec(compile(job["code"], "solution.py", "exec"), namespace)
            exec(compile(case["source"], "tests.py", "exec"), namespace)
            os.write(3, b"ok")
            status = 0
    except BaseException:
        try:
            traceback.print_exc(file=err)
        except BaseException:
            pass
    for stream in (sys.stdout, out, err):
        try:
            stream.flush()
        except BaseException:
            status = 1 if stream is out else status
    os._exit(status)

def run_case(i, case, job):
    kind = "stdin" if "stdin" in case else "call" if "call" in case else "assert"
    fds = [scratch(name) for name in ("stdin", "stdout", "stderr", "result")]
    data = case.get("stdin", "").encode()
    while data:
        data = data[os.write(fds[0], data):]
    os.lseek(fds[0], 0, os.SEEK_SET)
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            child(kind, case, job)
        finally:
            os._exit(1)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    timed_out = False
    timeout = job["case_seconds"]
    try:
        pidfd = os.pidfd_open(pid)
        timed_out = not select.select([pidfd], [], [], timeout)[0]
        os.close(pidfd)
    except (AttributeError, OSError):  # no pidfd: only the trainer's wall-clock limit applies
        pass
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever the case left behind in its process group
    except OSError:
        pass
    while True:  # as the namespace's init, reap what was orphaned to it
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    cap = job["answer_bytes"]
    message = {"i": i, "exit": os.waitstatus_to_exitcode(status), "timeout": timed_out}
    if kind == "stdin":
        out = read_all(fds[1], cap)
        message["out"], message["truncated"] = base64.b64encode(out[:cap]).decode(), len(out) > cap
    elif kind == "call":
        result = read_all(fds[3], cap)
        message["ret"], message["truncated"] = result[:cap].decode("utf-8", "replace"), len(result) > cap
    else:
        message["ok"] = read_all(fds[3], 2) == b"ok"
    message["err"] = read_all(fds[2], 1 << 16)[-1000:].decode("utf-8", "replace")
    for fd in fds:
        os.close(fd)
    return message

def main():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an init ignores what it has no handler for
    chunks = []
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    job = json.loads(b"".join(chunks))
    uid = job["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
            raise SystemExit("sandbox runner: could not drop privileges")
    limits = job["limits"]
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", limits["cpu"]), ("RLIMIT_AS", limits["memory"]),
                        ("RLIMIT_FSIZE", limits["file"]), ("RLIMIT_NOFILE", limits["files"]),
                        ("RLIMIT_NPROC", limits["processes"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    channel = os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    send(channel, {"ready": True})
    for i, case in enumerate(job["cases"]):
        send(channel, run_case(i, case, job))
    send(channel, {"done": True})

main()
'''


# ------------------------------------------------------------------------------------- isolation setup


@dataclass(frozen=True)
class Isolation:
    """How programs are run on this machine: ``isolation()`` finds it once and reports it."""

    mode: str  # "userns": bwrap with a user namespace; "uid": bwrap, no user namespace, own uid; "none"
    python: str  # the interpreter run inside
    bwrap: str | None = None
    version: str = ""
    namespaces: tuple[str, ...] = ()
    as_host_uid: bool = False  # "userns" as root: bwrap itself runs as an unused unprivileged uid
    flags: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.mode == "none":
            return (f"UNISOLATED ({UNSAFE_ENV}=1): model-written code runs as a plain subprocess with uid "
                    f"{os.getuid()}, with rlimits and a deadline only")
        who = {"userns": f"uid {SANDBOX_UID} in a user namespace" + (", an unused host uid outside"
                                                                     if self.as_host_uid else ""),
               "uid": "an unused unprivileged host uid (a user namespace would map it to root)"}[self.mode]
        prefix = os.path.dirname(os.path.dirname(self.python))
        extra = "" if prefix == "/usr" or prefix.startswith("/usr/") else f", {prefix}"
        return (f"{self.version}: namespaces {', '.join(self.namespaces)}; runs as {who}; no capabilities; "
                f"read-only /usr, /bin, /lib*{extra}; private tmpfs {WORKDIR}, /tmp, /dev/shm; no /proc; "
                "no seccomp filter")


_isolation: Isolation | None = None
_isolation_lock = threading.Lock()
_warned_unisolated = False


def _find_bwrap() -> str | None:
    return shutil.which("bwrap") or (os.access("/usr/bin/bwrap", os.X_OK) and "/usr/bin/bwrap") or None


def _interpreter() -> tuple[str, str]:
    """(python to run in the sandbox, its prefix): the base interpreter, never a virtual environment."""
    prefix = os.path.realpath(sys.base_prefix)
    names = [f"python{sys.version_info[0]}.{sys.version_info[1]}", f"python{sys.version_info[0]}", "python"]
    for name in names:
        candidate = os.path.realpath(os.path.join(prefix, "bin", name))
        if candidate.startswith(prefix + os.sep) and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate, prefix
    executable = os.path.realpath(sys.executable)
    return executable, os.path.dirname(os.path.dirname(executable))


def _reachable_by_others(path: str) -> bool:
    """True when a user with no relation to the owners can reach and run ``path``."""
    try:
        if not os.stat(path).st_mode & 0o005:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _root_layout(python: str, prefix: str) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    bound = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    made: set[str] = set()

    def bind(path: str) -> None:
        if any(path == b or path.startswith(b + os.sep) for b in bound):
            return
        parents = []
        parent = os.path.dirname(path)
        while parent not in ("/", "") and parent not in made:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for parent in reversed(parents):  # bwrap would make them 0700, closed to the program's uid
            args.extend(["--perms", "0755", "--dir", parent])
            made.add(parent)
        args.extend(["--ro-bind", path, path])
        bound.append(path)

    bind(prefix)
    bind(os.path.dirname(python))
    args += ["--dev", "/dev"]
    for path in (WORKDIR, "/tmp", "/dev/shm"):
        args += ["--size", "{disk}", "--perms", "1777", "--tmpfs", path]
    args += ["--chdir", WORKDIR, "--hostname", "sandbox", "--clearenv"]
    for key, value in _SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    return args


def _bwrap_flags(mode: str, bwrap_help: str, python: str, prefix: str) -> tuple[str, ...]:
    if mode == "userns":
        ns = ["--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        if "--disable-userns" in bwrap_help:
            ns.append("--disable-userns")
        caps = ["--cap-drop", "ALL"]
    else:  # as root without a user namespace: the runner drops to its own uid, so it needs these two
        ns = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        caps = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    # --as-pid-1: the runner is the namespace's init, so its end ends the namespace and bwrap (its parent)
    # reaps it; with bwrap's own init in between, bwrap could exit first and orphan it. An init also
    # cannot be sent SIGKILL from inside its namespace.
    return tuple(ns + caps + ["--as-pid-1", "--die-with-parent", "--new-session"] + _root_layout(python, prefix))


def _namespaces(mode: str) -> tuple[str, ...]:
    base = ("pid", "net", "mount", "ipc", "uts", "cgroup")
    return ("user",) + base if mode == "userns" else base


def isolation() -> Isolation:
    """Find, once, the strongest isolation that works here; raise SandboxUnavailable if there is none and
    ``POLICYOPT_UNSAFE_UNISOLATED_CODE=1`` is not set."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _detect()
            logger.info("code sandbox: %s", _isolation.describe())
    if _isolation.mode == "none":
        _warn_unisolated()
    return _isolation


def reset_isolation() -> None:
    """Forget what ``isolation()`` found (for tests, or after installing bubblewrap)."""
    global _isolation
    with _isolation_lock:
        _isolation = None


def _warn_unisolated() -> None:
    global _warned_unisolated
    if not _warned_unisolated:
        _warned_unisolated = True
        warnings.warn(
            f"{UNSAFE_ENV}=1: model-written code runs WITHOUT a sandbox, as a plain subprocess with your "
            f"uid ({os.getuid()}): it can read and change your files, use the network, signal or trace "
            "your processes (the trainer included) and leave processes behind. Only rlimits and a deadline "
            "apply; the verdict is still computed outside the program. Install bubblewrap instead.",
            RuntimeWarning, stacklevel=3)


def _detect() -> Isolation:
    python, prefix = _interpreter()
    bwrap = _find_bwrap()
    problems = []
    if bwrap is None:
        problems.append("bwrap is not installed")
    else:
        try:
            probe = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30, env=_HOST_ENV)
            version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30,
                                     env=_HOST_ENV).stdout.strip() or "bwrap"
            bwrap_help = probe.stdout + probe.stderr
        except (OSError, subprocess.SubprocessError) as e:
            bwrap_help, version = "", ""
            problems.append(f"{bwrap} does not run: {e}")
        if version:
            candidates = []
            if os.getuid() == 0:
                if _reachable_by_others(python) and _reachable_by_others(prefix):
                    candidates.append(("userns", True))
                candidates.append(("uid", False))
            else:
                candidates.append(("userns", False))
            for mode, as_host_uid in candidates:
                iso = Isolation(mode=mode, python=python, bwrap=bwrap, version=version,
                                namespaces=_namespaces(mode), as_host_uid=as_host_uid,
                                flags=_bwrap_flags(mode, bwrap_help, python, prefix))
                try:
                    _run_job(iso, {"code": "", "cases": []}, SandboxLimits())
                    return iso
                except SandboxError as e:
                    problems.append(f"{mode} mode: {e}")
    if os.environ.get(UNSAFE_ENV) == "1":
        logger.warning("code sandbox unavailable (%s); running unisolated as %s=1 asks", "; ".join(problems),
                       UNSAFE_ENV)
        return Isolation(mode="none", python=os.path.realpath(sys.executable))
    raise SandboxUnavailable(
        "the code reward runs model-written programs under bubblewrap, which is not usable here ("
        + "; ".join(problems) + "). Install Debian's bubblewrap package (apt-get install bubblewrap; "
        "a trainer that is not root also needs the kernel to allow unprivileged user namespaces), or set "
        f"{UNSAFE_ENV}=1 to run the programs unisolated, with the trainer's rights (they can then read and "
        "change anything the trainer can)")


# ---------------------------------------------------------------------------------- running one program

_slot_lock = threading.Lock()
_free_slots: list[int] = []
_slot_count = 0


def _acquire_slot() -> int:
    global _slot_count
    with _slot_lock:
        if _free_slots:
            return _free_slots.pop()
        _slot_count += 1
        return _slot_count - 1


def _release_slot(slot: int) -> None:
    with _slot_lock:
        _free_slots.append(slot)


def _slot_uid(slot: int) -> int:
    return _UID_BASE + (os.getpid() % 100_000) * 1024 + slot % 1024


@dataclass
class _Raw:
    answers: list[dict | None]
    timed_out: bool  # the wall-clock limit ran out before "done"
    overflowed: bool  # more than output_bytes came back
    done: bool
    log: str
    returncode: int | None = None


def _job_limits(limits: SandboxLimits) -> dict:
    return {"cpu": int(limits.cpu_seconds), "memory": int(limits.memory_bytes), "file": int(limits.file_bytes),
            "files": int(limits.open_files), "processes": int(limits.processes)}


def _command(iso: Isolation, info_fd: int | None, limits: SandboxLimits) -> list[str]:
    runner = [iso.python, "-I", "-B", "-c", _RUNNER]
    if iso.mode == "none":
        return runner
    flags = [str(int(limits.disk_bytes)) if flag == "{disk}" else flag for flag in iso.flags]
    return [iso.bwrap or "bwrap", *flags, "--info-fd", str(info_fd), "--", *runner]


class _Sandbox:
    """One running sandbox: the bwrap process (its own session) and a pidfd on its PID namespace's init."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.ns_pidfd: int | None = None

    def watch_namespace(self, info: bytes) -> None:
        """From bwrap's --info-fd report (written before any model code runs): the init's host pid."""
        if self.ns_pidfd is not None:
            return
        try:
            pid = json.loads(info)["child-pid"]
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1:
                self.ns_pidfd = os.pidfd_open(pid)
        except (ValueError, KeyError, TypeError, OSError, AttributeError, RecursionError):
            pass

    def kill(self) -> None:
        """Kill the whole process tree and wait until it is gone."""
        proc = self.proc
        if self.ns_pidfd is not None:
            # Killing the namespace's init kills every process in it; its pidfd turns readable once it has
            # exited, which the kernel allows only after all the others are gone. bwrap, its parent, then
            # reaps it and exits: killing bwrap first would leave the init to the host's PID 1 to reap, and
            # an unreaped zombie still counts against its uid's process limit.
            try:
                signal.pidfd_send_signal(self.ns_pidfd, signal.SIGKILL)
            except OSError:
                pass
            poller = select.poll()  # not select(): the trainer's fds may be past FD_SETSIZE
            poller.register(self.ns_pidfd, select.POLLIN)
            gone = bool(poller.poll(10_000))
            os.close(self.ns_pidfd)
            self.ns_pidfd = None
            if not gone:
                raise SandboxError(f"the PID namespace of sandbox {proc.pid} did not die after SIGKILL")
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if proc.returncode is None:  # not reaped yet, so its group id cannot have been reused
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap, its own session; --die-with-parent does the rest
            except (ProcessLookupError, PermissionError):
                pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired as e:
            raise SandboxError(f"sandbox process {proc.pid} did not exit after SIGKILL") from e


def _run_job(iso: Isolation, job: dict, limits: SandboxLimits) -> _Raw:
    """Run one program with its cases' inputs and return what came back through the pipe. Raises
    SandboxError only for failures that are not the program's: no model code runs before "ready"."""
    slot = _acquire_slot()
    uid = _slot_uid(slot)
    job = dict(job, uid=uid if iso.mode == "uid" else None, limits=_job_limits(limits),
               case_seconds=limits.case_seconds, answer_bytes=int(limits.answer_bytes))
    payload = json.dumps(job).encode()
    info_r = info_w = None
    tmpdir = None
    try:
        popen_kwargs: dict = {}
        if iso.mode == "none":
            tmpdir = tempfile.mkdtemp(prefix="policyopt-unisolated-")
            popen_kwargs["cwd"] = tmpdir
        else:
            info_r, info_w = os.pipe()
            popen_kwargs["pass_fds"] = (info_w,)
            if iso.as_host_uid:
                popen_kwargs.update(user=uid, group=uid, extra_groups=[])
        try:
            proc = subprocess.Popen(_command(iso, info_w, limits), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=_HOST_ENV, close_fds=True, start_new_session=True,
                                    umask=0o022, **popen_kwargs)
        except OSError as e:
            raise SandboxError(f"could not start the sandbox: {e}") from e
        if info_w is not None:
            os.close(info_w)
            info_w = None
        box = _Sandbox(proc)
        try:
            raw = _collect(box, info_r, payload, len(job["cases"]), limits)
        finally:
            box.kill()
        raw.returncode = proc.returncode
        if raw.answers is None:
            raise SandboxError(raw.log)
        return raw
    finally:
        for fd in (info_r, info_w):
            if fd is not None:
                os.close(fd)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        _release_slot(slot)


def _collect(box: _Sandbox, info_r: int | None, payload: bytes, num_cases: int, limits: SandboxLimits) -> _Raw:
    """Feed the job, then read the answer pipe until "done", its end, the byte cap or the deadline. Never
    reads a file, and holds at most output_bytes of answers and _LOG_BYTES of stderr."""
    proc = box.proc
    selector = selectors.DefaultSelector()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
    selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
    selector.register(proc.stdout.fileno(), selectors.EVENT_READ, "channel")
    selector.register(proc.stderr.fileno(), selectors.EVENT_READ, "log")
    if info_r is not None:
        os.set_blocking(info_r, False)
        selector.register(info_r, selectors.EVENT_READ, "info")
    sent = received = 0
    pending, log, info = bytearray(), bytearray(), bytearray()
    lines: list[bytes] = []
    ready_at: float | None = None
    start = time.monotonic()
    timed_out = overflowed = done = stop = False
    try:
        while not stop:
            now = time.monotonic()
            deadline = start + limits.startup_seconds if ready_at is None else ready_at + limits.wall_seconds
            if now >= deadline:
                timed_out = True
                break
            for key, _ in selector.select(timeout=deadline - now):
                fd, what = key.fd, key.data
                if what == "stdin":
                    try:
                        sent += os.write(fd, payload[sent:sent + (1 << 16)])
                    except BlockingIOError:
                        continue
                    except OSError:
                        sent = len(payload)
                    if sent >= len(payload):
                        selector.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if what == "channel":
                    if not data:
                        stop = True
                        break
                    data = data[:limits.output_bytes - received]
                    received += len(data)
                    complete = []
                    if b"\n" in data:
                        *complete, rest = (bytes(pending) + data).split(b"\n")
                        pending = bytearray(rest)
                    else:
                        pending += data
                    for line in complete:
                        if ready_at is None:
                            if line != _READY:
                                stop = True
                                break
                            ready_at = time.monotonic()
                        elif line == _DONE:
                            done = stop = True
                            break
                        elif line.startswith(b"{") and len(lines) < 2 * num_cases + 2:
                            lines.append(line)  # more than two answers per case could change nothing
                    if stop:
                        break
                    if received >= limits.output_bytes:
                        overflowed = stop = True
                        break
                elif what == "log":
                    if not data or len(log) >= _LOG_BYTES:
                        selector.unregister(fd)  # past the cap the sandbox blocks on its own pipe
                    else:
                        log += data[:_LOG_BYTES - len(log)]
                else:
                    if data and len(info) < 65536:
                        info += data
                    else:
                        selector.unregister(fd)
                        box.watch_namespace(bytes(info))
    finally:
        selector.close()
    if info_r is not None and box.ns_pidfd is None:
        # bwrap writes its report before the runner starts, so it is there now unless bwrap failed
        while len(info) < 65536:
            try:
                data = os.read(info_r, 65536)
            except OSError:
                break
            if not data:
                break
            info += data
        box.watch_namespace(bytes(info))
    if ready_at is None and not timed_out:  # it ended before "ready": its complaint may be on its way
        _drain(proc.stderr.fileno(), log, time.monotonic() + 2)
    text = log.decode("utf-8", "replace")
    if ready_at is None:
        reason = text.strip() or "no output"
        reason = (f"the sandbox did not start within {limits.startup_seconds:g}s: {reason}" if timed_out
                  else f"the sandbox did not start: {reason}")
        return _Raw(answers=None, timed_out=False, overflowed=False, done=False, log=reason)  # type: ignore[arg-type]
    return _Raw(answers=_answers(lines, num_cases), timed_out=timed_out, overflowed=overflowed, done=done,
                log=text)


def _drain(fd: int, log: bytearray, deadline: float) -> None:
    """Read ``fd`` into ``log`` until its end, _LOG_BYTES or the deadline."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(log) < _LOG_BYTES and (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            break
        try:
            data = os.read(fd, _LOG_BYTES - len(log))
        except BlockingIOError:
            continue
        except OSError:
            break
        if not data:
            break
        log += data


def _answers(lines: list[bytes], num_cases: int) -> list[dict | None]:
    answers: list[dict | None] = [None] * num_cases
    seen: set[int] = set()
    for line in lines:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(message, dict):
            continue
        index = message.get("i")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_cases:
            continue
        if index in seen:  # two answers to one case: neither counts
            answers[index] = None
            continue
        seen.add(index)
        answers[index] = message
    return answers


# -------------------------------------------------------------------------------------------- verdicts


@dataclass
class SandboxResult:
    passed: int  # test cases passed
    total: int
    verdicts: list[str]  # per case: "passed", "wrong answer", "timed out", "exit N", "no answer", ...
    timed_out: bool  # the program's wall-clock limit ran out
    returncode: int | None
    log: str  # what the program wrote to stderr (untrusted text, for debugging only)
    isolation: str

    @property
    def score(self) -> float:
        """Fraction of test cases passed."""
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _verdict(case: TestCase, answer: dict | None) -> str:
    if answer is None:
        return "no answer"
    if answer.get("timeout") is True:
        return "timed out"
    exit_code = answer.get("exit")
    if exit_code != 0 or isinstance(exit_code, bool):
        return f"exit {exit_code}" if isinstance(exit_code, int) else "no exit status"
    if answer.get("truncated") is not False and not isinstance(case, AssertCase):
        return "output too long"
    if isinstance(case, StdinCase):
        out = answer.get("out")
        if not isinstance(out, str):
            return "no answer"
        try:
            text = base64.b64decode(out, validate=True).decode("utf-8")
        except ValueError:
            return "wrong answer"
        return "passed" if _normalise_stdout(text) == _normalise_stdout(case.stdout) else "wrong answer"
    if isinstance(case, CallCase):
        ret = answer.get("ret")
        if not isinstance(ret, str):
            return "no answer"
        try:
            value = json.loads(ret)
        except (ValueError, RecursionError):
            return "wrong answer"
        return "passed" if values_match(case.expected, value) else "wrong answer"
    return "passed" if answer.get("ok") is True else "failed"


def _job_case(case: TestCase) -> dict:
    if isinstance(case, StdinCase):
        return {"stdin": case.stdin}
    if isinstance(case, CallCase):
        return {"call": case.call, "args": list(case.args), "kwargs": case.kwargs}
    return {"source": case.source}


def run_program(code: str, cases: list[TestCase], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` against ``cases`` in the sandbox and compare its answers here, outside it."""
    limits = limits or SandboxLimits()
    iso = isolation()
    raw = _run_job(iso, {"code": code, "cases": [_job_case(case) for case in cases]}, limits)
    verdicts = [_verdict(case, answer) for case, answer in zip(cases, raw.answers)]
    errors = [a["err"] for a in raw.answers if a is not None and isinstance(a.get("err"), str) and a["err"]]
    log = "\n".join(errors + ([raw.log] if raw.log else []))[:_LOG_BYTES]
    return SandboxResult(passed=verdicts.count("passed"), total=len(cases), verdicts=verdicts,
                         timed_out=raw.timed_out, returncode=raw.returncode, log=log, isolation=iso.describe())


def run_python(code: str, tests: Any = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """``run_program`` with a row's ``tests`` value in any format ``parse_tests`` accepts; no tests at all
    means one legacy case that passes when the program runs to the end."""
    cases = parse_tests(tests) or [AssertCase("")]
    return run_program(code, cases, limits)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python ... ``` or ``` ... ```), else the whole completion."""
    if "```" not in completion:
        return completion
    blocks = completion.split("```")[1::2]
    if not blocks:
        return completion
    block = blocks[-1]
    first, _, rest = block.partition("\n")
    return rest if first.strip().isalpha() or first.strip() == "" else block


def code_reward(prompts, completions, tests, limits: SandboxLimits | None = None, all_pass: bool = False,
                **kwargs) -> list[float | None]:
    """The fraction of the row's test cases that the completion's code passes in the sandbox (1.0 or 0.0
    for legacy assert-style tests; with ``all_pass``, 1.0 only when every case passes); None for rows
    without tests. Runs completions in parallel."""
    from ..data.loading import completion_text

    jobs = []
    for row, (completion, test) in enumerate(zip(completions, tests)):
        try:
            cases = parse_tests(test)
        except MalformedTests as e:
            raise MalformedTests(f"tests of sample {row}: {e}") from None
        jobs.append(None if cases is None else (extract_code(completion_text(completion)), cases))
    if any(job is not None for job in jobs):
        isolation()  # refuse (or warn) once, before starting anything

    def score(job):
        if job is None:
            return None
        result = run_program(*job, limits=limits)
        return float(result.all_passed) if all_pass else result.score

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(score, jobs))
