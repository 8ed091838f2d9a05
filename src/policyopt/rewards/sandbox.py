"""Run model-written Python in a separate, locked-down process, and a code reward built on it.

Layers, from the kernel up (each one stops a class of hostile completion on its own):
- a fresh temporary working directory, deleted afterwards;
- resource limits: CPU seconds, address space, size of any file written (stdout and stderr go to
  files, so huge output is cut off too), open files, and no core dumps;
- a wall-clock limit, after which the whole process group is killed (its own session);
- when the trainer runs as root: a new network namespace (no interfaces up, so no network) and the
  unprivileged ``nobody`` user, which cannot signal the trainer, read its environment or write
  outside world-writable places; RLIMIT_NPROC=1 then forbids fork bombs outright;
- an environment holding nothing of the parent's (no secrets, no tokens);
- inside the child, an audit hook (PEP 578) that refuses sockets, subprocesses, forks, signals,
  ctypes, and file writes or deletes outside the working directory. This last layer is what a
  non-root trainer relies on for network and process isolation; it is a guard rail, not a
  security boundary, so run untrusted code as root-in-a-container or in a VM for real isolation.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..data.loading import completion_text

_CLONE_NEWNET = 0x40000000
_NOBODY = 65534

# Runs first inside the child: installs the audit hook, then executes the model's code.
_RUNNER = textwrap.dedent('''
    import os, sys
    WORKDIR = os.path.realpath(os.getcwd())
    BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
               "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
               "os.putenv", "os.unsetenv", "os.chdir", "pty.spawn", "signal.pthread_kill"}
    PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                   "os.symlink", "os.truncate", "shutil.rmtree", "shutil.move", "os.utime"}

    def _inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except Exception:
            return False
        return real == WORKDIR or real.startswith(WORKDIR + os.sep)

    def hook(event, args):
        if event in BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args:
            path, mode, flags = args[0], args[1] if len(args) > 1 else "r", args[2] if len(args) > 2 else 0
            if isinstance(path, int):
                return
            writing = (mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
            text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
            if writing and not _inside(path):
                raise PermissionError(f"sandbox: writing {text!r} outside the working directory")
            if text.startswith("/proc/") and not text.startswith("/proc/self/"):
                raise PermissionError("sandbox: other processes are off limits")
        elif event in PATH_EVENTS and args and not _inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the working directory")

    sys.addaudithook(hook)
    del hook

    import posix, traceback
    _exit = posix._exit

    def _refuse(*args, **kwargs):
        raise PermissionError("sandbox: exiting early is not allowed")

    os._exit = posix._exit = _refuse  # so code cannot report success without running the tests
    sources = []
    for name in ("solution.py", "tests.py"):
        with open(name) as f:
            sources.append((name, f.read()))
    try:
        namespace = {"__name__": "__main__"}
        for name, source in sources:
            exec(compile(source, name, "exec"), namespace)
        sys.stdout.flush()
    except BaseException:  # SystemExit included: success means the tests ran to the end
        traceback.print_exc()
        _exit(1)
    _exit(0)
''')


@dataclass
class SandboxLimits:
    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 1024 * 1024
    file_bytes: int = 1024 * 1024  # also caps stdout and stderr
    open_files: int = 64


@dataclass
class SandboxResult:
    passed: bool  # exited with status 0 within the limits
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str


def _limit_child(limits: SandboxLimits, isolate: bool):
    def setup():  # runs in the child between fork and exec: only async-signal-safe work here
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if isolate:
            if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNET) != 0:
                os._exit(97)  # refuse to run unisolated when isolation was expected
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    return setup


def _world_executable(path: str) -> bool:
    """True when every directory above ``path`` and the file itself can be used by any user."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return False


def _interpreter() -> tuple[str, bool]:
    """(python to run, whether to isolate as nobody). Isolation needs root and a python nobody can run."""
    if not (hasattr(os, "getuid") and os.getuid() == 0):
        return sys.executable, False
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and _world_executable(candidate):
            return candidate, True
    warnings.warn("sandbox: no python that user nobody can run; code runs as root with only in-process guards")
    return sys.executable, False


def run_python(code: str, tests: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Execute ``code`` then ``tests`` in one namespace in the sandbox; ``passed`` means the tests ran to
    the end without an exception, within every limit."""
    limits = limits or SandboxLimits()
    python, isolate = _interpreter()
    workdir = Path(tempfile.mkdtemp(prefix="policyopt-sandbox-"))
    try:
        (workdir / "solution.py").write_text(code)
        (workdir / "tests.py").write_text(tests)
        (workdir / "runner.py").write_text(_RUNNER)
        if isolate:
            os.chown(workdir, _NOBODY, _NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        with open(workdir / "stdout.txt", "wb") as out, open(workdir / "stderr.txt", "wb") as err:
            if isolate:
                os.chown(workdir / "stdout.txt", _NOBODY, _NOBODY)
                os.chown(workdir / "stderr.txt", _NOBODY, _NOBODY)
            proc = subprocess.Popen(
                [python, "-I", "-S", "runner.py"], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, preexec_fn=_limit_child(limits, isolate), close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole session, including anything it spawned
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        read = lambda name: (workdir / name).read_bytes()[:4096].decode("utf-8", "replace")  # noqa: E731
        return SandboxResult(passed=proc.returncode == 0 and not timed_out, returncode=proc.returncode,
                             timed_out=timed_out, stdout=read("stdout.txt"), stderr=read("stderr.txt"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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


def code_reward(prompts, completions, tests, limits: SandboxLimits | None = None, **kwargs) -> list[float | None]:
    """1.0 when the completion's code followed by the row's ``tests`` (e.g. assert statements) exits
    cleanly in the sandbox, else 0.0; None for rows without tests. Runs completions in parallel."""
    jobs = []
    for completion, test in zip(completions, tests):
        if not test:
            jobs.append(None)
            continue
        test_code = test if isinstance(test, str) else "\n".join(test)
        jobs.append((extract_code(completion_text(completion)), test_code))
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda job: None if job is None else run_python(*job, limits=limits), jobs))
    return [None if r is None else float(r.passed) for r in results]
