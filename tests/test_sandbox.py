"""Hostile completions score what a wrong program scores (0), and leave the trainer and the host unharmed.

Each attack runs under bubblewrap in both of its modes (see the ``trainer`` fixture) and, in one test,
from a trainer running as user nobody. Run ``python tests/test_sandbox.py`` to measure the sandbox's overhead.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest
from host_processes import processes_with

from policyopt.rewards import sandbox
from policyopt.rewards.builtin import BUILTIN_REWARDS
from policyopt.rewards.sandbox import (
    AssertCase,
    CallCase,
    SandboxError,
    SandboxLimits,
    SandboxUnavailable,
    StdinCase,
    MalformedTests,
    code_reward,
    extract_code,
    parse_tests,
    run_python,
    values_match,
)

FAST = SandboxLimits(wall_seconds=3.0, cpu_seconds=2, memory_bytes=256 * 1024 * 1024, file_bytes=64 * 1024)
HANG = SandboxLimits(wall_seconds=0.6, cpu_seconds=2, memory_bytes=256 * 1024 * 1024, file_bytes=64 * 1024)
PROJECT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"

CASES = [
    {"stdin": "2 3\n", "stdout": "5\n"},
    {"stdin": "10 -4\n", "stdout": "6"},
    {"call": "add", "args": [1, 2], "return": 3},
    {"call": "add", "args": [-5, 5], "return": 0},
]
CORRECT = textwrap.dedent("""
    import sys

    def add(a, b):
        return a + b

    if __name__ == "__main__":
        a, b = map(int, sys.stdin.read().split())
        print(add(a, b))
""")

try:
    _ISOLATION = sandbox.isolation()
    _UNAVAILABLE = None if _ISOLATION.mode != "none" else f"{sandbox.UNSAFE_ENV}=1 and no bubblewrap"
except SandboxUnavailable as e:
    _ISOLATION, _UNAVAILABLE = None, str(e)
needs_bwrap = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"bubblewrap is not usable here: {_UNAVAILABLE}")


_MODES: dict[str, object] = {}


@pytest.fixture(params=["uid", "userns"])
def trainer(request, monkeypatch):
    """The two ways the sandbox isolates. "uid": a root trainer whose interpreter other users cannot read
    (under /root): no user namespace, an unused uid of the program's own. "userns": a user namespace, as
    any non-root trainer gets, and a root one whose interpreter anyone can read (here: the system's)."""
    if _UNAVAILABLE is not None:
        pytest.skip(f"bubblewrap is not usable here: {_UNAVAILABLE}")
    if request.param not in _MODES:
        with monkeypatch.context() as m:
            if request.param == "uid":
                if os.getuid() != 0:
                    pytest.skip("only a root trainer runs programs under a uid of their own")
                m.setattr(sandbox, "_reachable_by_others", lambda path: False)
            elif os.getuid() == 0:
                if not os.access(SYSTEM_PYTHON, os.X_OK):
                    pytest.skip(f"a root trainer gets a user namespace with {SYSTEM_PYTHON}, which is missing")
                python = os.path.realpath(SYSTEM_PYTHON)
                m.setattr(sandbox, "_interpreter", lambda: (python, os.path.dirname(os.path.dirname(python))))
            m.setattr(sandbox, "_isolation", None)
            _MODES[request.param] = sandbox.isolation()
    iso = _MODES[request.param]
    if iso.mode != request.param:
        pytest.skip(f"{request.param} mode is not available here (got {iso.describe()})")
    monkeypatch.setattr(sandbox, "_isolation", iso)
    return iso


@pytest.fixture
def fresh_isolation():
    """For tests that change what isolation() finds: forget it before and after."""
    sandbox.reset_isolation()
    yield
    sandbox.reset_isolation()


# --------------------------------------------------------------------------------- the host's side


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


class Host:
    """What an attack aims at, and the check that none of it changed."""

    def __init__(self, root: Path, owner: int | None = None):
        self.marker = f"policyopt-attack-{uuid.uuid4().hex}"
        self.secret = f"s3cr3t-{uuid.uuid4().hex}"
        self.target = root / "target"
        self.target.mkdir()
        self.victim = self.target / "victim.txt"
        self.victim.write_text("keep me")
        self.secret_file = root / "trainer-only.txt"
        self.secret_file.write_text(self.secret)
        self.secret_file.chmod(0o600)
        if owner is not None:
            for path in (root, self.target, self.victim, self.secret_file):
                os.chown(path, owner, owner)
        self.shared_tmp = Path(f"/tmp/{self.marker}")
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind("\0" + self.marker)
        self.unix.listen(8)
        self.unix.setblocking(False)
        user = ["setpriv", "--reuid", str(owner), "--regid", str(owner), "--clear-groups"] if owner is not None else []
        self.helper = subprocess.Popen(user + ["sleep", "120"], start_new_session=True)
        self.shm_before = _shm()

    def program(self, code: str, trainer_pid: int | str | None = None) -> str:
        replacements = {"TARGET": str(self.target), "VICTIM": str(self.victim), "SECRET_FILE": str(self.secret_file),
                        "HELPER_PID": str(self.helper.pid), "PORT": str(self.port), "MARKER": self.marker,
                        "SHARED_TMP": str(self.shared_tmp), "TRAINER_PID": str(trainer_pid or os.getpid()),
                        "PROJECT": str(PROJECT)}
        code = textwrap.dedent(code)
        for key, value in replacements.items():
            code = code.replace(key, value)
        return code

    def check(self) -> None:
        assert self.victim.read_text() == "keep me"
        assert sorted(p.name for p in self.target.iterdir()) == ["victim.txt"]
        assert self.secret_file.read_text() == self.secret
        assert not self.shared_tmp.exists()
        assert self.helper.poll() is None, "a process of the host was killed"
        for server in (self.server, self.unix):
            with pytest.raises(BlockingIOError):
                server.accept()
        assert processes_with(self.marker) == [], "a process outlived its sandbox"
        # other engineers' processes may add their own root-owned entries meanwhile; the sandbox's would not be
        new = [name for name in _shm() - self.shm_before
               if self.marker in name or name.startswith("fill-") or os.stat(f"/dev/shm/{name}").st_uid != 0]
        assert new == [], "the sandbox wrote into the host's /dev/shm"

    def close(self) -> None:
        self.helper.kill()
        self.helper.wait()
        self.server.close()
        self.unix.close()
        shutil.rmtree(self.shared_tmp, ignore_errors=True)


@pytest.fixture
def host(tmp_path, monkeypatch):
    h = Host(tmp_path)
    monkeypatch.setenv("POLICYOPT_TEST_SECRET", h.secret)
    yield h
    h.close()


# ----------------------------------------------------------------------------------------- attacks

LEAK_CASES = [{"call": "leak", "args": [], "return": "SECRET"}]  # "SECRET" is replaced by the real secret

# name -> (program, cases, limits). Each scores 0 and leaves the host as it was.
ATTACKS = {
    # exiting early or forging the verdict
    "sys.exit(0) before the tests": ("import sys\nsys.exit(0)", CASES, FAST),
    "os._exit(0) before the tests": ("import os\nos._exit(0)", CASES, FAST),
    "raise SystemExit(0)": ("raise SystemExit(0)", CASES, FAST),
    "reach __main__'s saved exit and sender": ("""
        import base64, os, sys
        main = sys.modules["__main__"]
        for name in ("_exit", "send", "run_case"):
            print(name, hasattr(main, name), file=sys.stderr)
        for fd in range(8):
            try:
                main.send(fd, {"i": 0, "exit": 0, "timeout": False, "truncated": False,
                               "out": base64.b64encode(b"5\\n").decode()})
                main.send(fd, {"done": True})
            except Exception as e:
                print(e, file=sys.stderr)
        os._exit(0)
    """, CASES, FAST),
    "patch the runner": ("""
        import os, sys
        main = sys.modules["__main__"]
        main.run_case = lambda i, case, job: {"i": i, "exit": 0, "timeout": False, "ok": True, "ret": "3"}
        main.send = lambda *args: None
        main.main = lambda: None
        os._exit(0)
    """, CASES, FAST),
    "delete the tests and the sources": ("""
        import gc, os
        for obj in gc.get_objects():
            if isinstance(obj, dict) and "cases" in obj:
                obj["cases"].clear()
            elif isinstance(obj, dict) and ("stdin" in obj or "call" in obj):
                obj.clear()
        for name in ("tests.py", "solution.py", "runner.py", "stdout.txt"):
            try:
                os.remove(name)
            except OSError:
                pass
    """, CASES, FAST),
    "print fake results on every fd": ("""
        import base64, json, os
        print("PASSED 4/4")
        print("ok")
        fake = [json.dumps({"i": i, "exit": 0, "timeout": False, "truncated": False, "ok": True, "ret": "3",
                            "out": base64.b64encode(b"5\\n").decode()}) for i in range(4)]
        line = ("\\n".join(fake) + '\\n{"done": true}\\n').encode()
        for fd in range(1024):
            try:
                os.write(fd, line)
            except OSError:
                pass
    """, CASES, FAST),
    # writes outside the working directory
    "clear the old hook's globals, then write outside": ("""
        import sys
        sys.modules["__main__"].__dict__.clear()
        open("TARGET/pwned", "w").write("x")
    """, CASES, FAST),
    "open(..., 'w') outside": ("open('TARGET/pwned', 'w').write('x')", CASES, FAST),
    "os.remove a host file": ("import os\nos.remove('VICTIM')", CASES, FAST),
    "shutil.rmtree a host directory": ("import shutil\nshutil.rmtree('TARGET')", CASES, FAST),
    "write to the shared /tmp": ("open('SHARED_TMP', 'w').write('x')", CASES, FAST),
    "os.rename into place": ("""
        import os
        open("mine", "w").write("x")
        for target in ("TARGET/pwned", "VICTIM", "/usr/pwned"):
            try:
                os.rename("mine", target)
            except OSError as e:
                print(e)
    """, CASES, FAST),
    "os.open with O_CREAT | O_RDONLY": ("import os\nos.open('TARGET/pwned', os.O_CREAT | os.O_RDONLY)", CASES, FAST),
    "os.mkfifo outside": ("import os\nos.mkfifo('TARGET/pwned')", CASES, FAST),
    "write into the interpreter and /usr": ("""
        import os, sys
        for path in (sys.prefix + "/pwned", "/usr/pwned", "/bin/pwned", "/etc/pwned", "/pwned"):
            try:
                open(path, "w").write("x")
            except OSError as e:
                print(e)
        raise SystemExit(1)
    """, CASES, FAST),
    # filling the sandbox
    "fill /dev/shm, /tmp and the working directory": ("""
        import os
        chunk = b"x" * 65536
        for where in ("/dev/shm", "/tmp", "."):
            for n in range(1024):
                try:
                    with open(f"{where}/fill-MARKER-{n}", "wb") as f:
                        f.write(chunk)
                except OSError:
                    break
    """, CASES, FAST),
    "huge output": ("while True:\n    print('x' * 10000)", CASES, FAST),
    "memory bomb": ("x = bytearray(10 ** 10)", CASES, FAST),
    "growing memory bomb": ("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))", CASES, FAST),
    "exhaust open files and processes": ("""
        import os, time
        files = []
        try:
            while True:
                files.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(100)
                children += 1
        except OSError:
            pass
        time.sleep(100)
    """, CASES, HANG),
    # the output channel
    "remove or replace the output channel": ("""
        import os
        for fd in range(3, 1024):
            try:
                os.close(fd)
            except OSError:
                pass
        zero = os.open("/dev/zero", os.O_RDWR)
        for fd in range(64):
            try:
                os.dup2(zero, fd)
            except OSError:
                pass
        for name in ("stdout.txt", "stderr.txt", "result"):
            try:
                os.mkfifo(name)
            except OSError:
                pass
    """, CASES, FAST),
    "symlinks to /dev/zero": ("""
        import os, sys
        for name in ("stdout.txt", "stderr.txt", "result", "out"):
            try:
                os.symlink("/dev/zero", name)
            except OSError:
                pass
        sys.stdout.buffer.write(open("/dev/zero", "rb").read(10 ** 8))
    """, CASES, FAST),
    "replace sys.stdout with an object that raises": ("""
        import sys

        class Broken:
            def write(self, text):
                raise OSError("no")

            def flush(self):
                raise OSError("no")

        sys.stdout = Broken()
        def add(a, b):
            return a + b
        print(5)
    """, CASES[:2], FAST),
    # processes
    "infinite loop": ("while True:\n    pass", CASES, HANG),
    "sleep forever": ("import time\ntime.sleep(1000)", CASES, HANG),
    "block on its own FIFO": ("import os\nos.mkfifo('f')\nopen('f').read()", CASES, HANG),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", CASES, FAST),
    "subprocess bomb": ("""
        import subprocess
        while True:
            subprocess.Popen(["/usr/bin/sleep", "100"], executable="/usr/bin/sleep")
    """, CASES, FAST),
    "multiprocessing bomb": ("import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
                             CASES, FAST),
    "a daemon that outlives the timeout": ("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/sleep", ["MARKER", "600"])
            os._exit(0)
        time.sleep(100)
    """, CASES, HANG),
    "a daemon left behind by a finished program": ("""
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/sleep", ["MARKER", "600"])
            os._exit(0)
    """, CASES, FAST),
    "signals to the parent, the trainer, a host process and everyone": ("""
        import ctypes, os, signal
        for pid in (TRAINER_PID, HELPER_PID):
            try:
                signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)
            except OSError as e:
                print(pid, e)
        for pid in (TRAINER_PID, HELPER_PID, 1, os.getppid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as e:
                print(pid, e)
        try:
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
        except OSError as e:
            print(e)
        os.kill(-1, signal.SIGKILL)
        ctypes.CDLL(None).kill(0, 9)
    """, CASES, FAST),
    "kill the sandbox's init and its runner": ("import os\nos.kill(1, 9)\nos.kill(os.getppid(), 9)", CASES, FAST),
    # network
    "sockets to 127.0.0.1 and an abstract unix socket": ("""
        import socket
        for address in (("127.0.0.1", PORT), ("::1", PORT)):
            try:
                socket.create_connection(address, timeout=1).sendall(b"hi")
            except OSError as e:
                print(e)
        s = socket.socket(socket.AF_UNIX)
        s.connect("\\0MARKER")
    """, CASES, FAST),
    "urllib to 127.0.0.1": ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:PORT', timeout=1)",
                            CASES, FAST),
    # reading what belongs to the trainer
    "read the trainer's environment": ("""
        import os, sys

        def leak():
            blobs = [repr(dict(os.environ))]
            for path in (f"/proc/{os.getppid()}/environ", f"//proc/{os.getppid()}/environ",
                         "/proc/TRAINER_PID/environ", "/proc/1/environ", "/proc/self/environ"):
                try:
                    blobs.append(open(path, "rb").read().decode(errors="replace"))
                except OSError as e:
                    blobs.append(str(e))
            text = "\\n".join(blobs)
            print(text, file=sys.stderr)
            for part in text.replace("\\0", "\\n").split("\\n"):
                if part.startswith("POLICYOPT_TEST_SECRET="):
                    return part.partition("=")[2]
            return text
    """, LEAK_CASES, FAST),
    "read a 0600 file of the trainer": ("""
        import sys

        def leak():
            try:
                text = open("SECRET_FILE").read()
            except OSError as e:
                text = str(e)
            print(text, file=sys.stderr)
            return text
    """, LEAK_CASES, FAST),
    "a nested user namespace with its own /proc": ("""
        import subprocess, sys

        def leak():
            script = "cat /proc/[0-9]*/environ; ls /proc; cat /proc/TRAINER_PID/environ"
            try:
                run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork",
                                      "--mount-proc", "sh", "-c", script], capture_output=True, timeout=2)
                text = (run.stdout + run.stderr).decode(errors="replace")
            except Exception as e:
                text = str(e)
            print(text, file=sys.stderr)
            for part in text.replace("\\0", "\\n").split("\\n"):
                if "POLICYOPT_TEST_SECRET=" in part:
                    return part.partition("POLICYOPT_TEST_SECRET=")[2]
            return text
    """, LEAK_CASES, FAST),
    "see the project, the home directory and the host's /proc": ("""
        import os

        def visible(path):
            return os.path.exists(path)
    """, [{"call": "visible", "args": [path], "return": True}
          for path in [str(PROJECT / "pyproject.toml"), "/proc/1", "/etc/passwd", "TARGET"]
          + [str(p) for p in sorted(Path.home().iterdir())[:3] if p.name != ".pyenv"]], FAST),
}


def _cases(cases, host: Host):
    """The cases with their placeholders filled in: the secret as an expected value, TARGET as an argument."""
    out = []
    for case in cases:
        case = dict(case)
        if case.get("return") == "SECRET":
            case["return"] = host.secret
        if "args" in case:
            case["args"] = [str(host.target) if arg == "TARGET" else arg for arg in case["args"]]
        out.append(case)
    return out


def _attack(name: str, host: Host):
    code, cases, limits = ATTACKS[name]
    start = time.monotonic()
    result = run_python(host.program(code), _cases(cases, host), limits)
    elapsed = time.monotonic() - start
    return result, elapsed


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_scores_zero_and_harms_nothing(name, trainer, host):
    result, elapsed = _attack(name, host)
    _, _, limits = ATTACKS[name]
    assert result.passed == 0, result
    assert elapsed < limits.wall_seconds + 5
    assert host.secret not in result.log
    assert len(result.log) <= 8192
    host.check()


def test_correct_program_scores_one_and_partial_credit_works(trainer):
    assert run_python(CORRECT, CASES, FAST).score == 1.0
    stdin_only = "a, b = map(int, input().split())\nprint(a + b)"
    assert run_python(stdin_only, CASES, FAST).verdicts == ["passed", "passed", "exit 1", "exit 1"]
    assert run_python(stdin_only, CASES, FAST).score == 0.5
    half_right = "def add(a, b):\n    return 3 if a > 0 else 7"
    assert run_python(half_right, CASES[2:], FAST).verdicts == ["passed", "wrong answer"]


def test_old_attacks_on_legacy_assert_tests(trainer, host):
    result = run_python("def f(x):\n    return 2 * x\n", "assert f(3) == 6", FAST)
    assert result.score == 1.0, result.log
    assert run_python("def f(x):\n    return 2 * x\n", "assert f(3) == 7", FAST).score == 0.0
    for code in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit(0)", "while True: pass",
                 "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "import os\nos.remove('VICTIM')"):
        assert run_python(host.program(code), "assert False", HANG).score == 0.0
    host.check()


def test_legacy_assert_verdict_can_be_forged(trainer):
    """Why data test cases exist: assert-style tests run in the program's process, so it can report success."""
    forged = "import os\nos.write(3, b'ok')\nos._exit(0)"
    assert run_python(forged, "assert False", FAST).score == 1.0
    assert run_python(forged, CASES, FAST).score == 0.0


def test_dev_shm_is_gone_afterwards(trainer, host):
    code, cases, limits = ATTACKS["fill /dev/shm, /tmp and the working directory"]
    run_python(host.program(code), cases, limits)
    look = "import os\ndef seen(path):\n    return sorted(os.listdir(path))"
    cases = [{"call": "seen", "args": [path], "return": []} for path in ("/dev/shm", "/tmp", ".")]
    result = run_python(look, cases, FAST)
    assert result.score == 1.0, result.log  # the next sandbox starts empty
    host.check()


def test_per_case_timeout_keeps_partial_credit(trainer):
    code = "x = input()\nwhile x == 'loop':\n    pass\nprint(x)"
    cases = [{"stdin": "a", "stdout": "a"}, {"stdin": "loop", "stdout": "loop"}, {"stdin": "b", "stdout": "b"}]
    limits = SandboxLimits(wall_seconds=5, case_seconds=0.5, cpu_seconds=2, memory_bytes=256 * 1024 * 1024)
    result = run_python(code, cases, limits)
    assert result.verdicts == ["passed", "timed out", "passed"]


def test_code_reward_scores_a_batch(trainer):
    completions = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
                   "while True: pass", "anything", CORRECT, "def add(a, b):\n    return a + b"]
    tests = ["assert add(2, 3) == 5"] * 3 + [None, json.dumps(CASES), CASES]
    assert code_reward(None, completions, tests, limits=HANG) == [1.0, 0.0, 0.0, None, 1.0, 0.5]
    assert BUILTIN_REWARDS["code_all"](None, completions[4:], tests[4:], limits=FAST) == [1.0, 0.0]
    assert BUILTIN_REWARDS["code"](None, completions[4:], tests[4:], limits=FAST) == [1.0, 0.5]


# ------------------------------------------------------------- a runner taken over: the trainer's side

HOSTILE_RUNNERS = {
    "floods the answer pipe": ("import os\nos.write(1, b'{\"ready\": true}\\n')\n"
                               "while True:\n    os.write(1, b'x' * 65536)"),
    "floods it with newlines and /dev/zero": ("import os\nos.write(1, b'{\"ready\": true}\\n')\n"
                                              "z = open('/dev/zero', 'rb')\nwhile True:\n"
                                              "    os.write(1, b'\\n' * 1000 + z.read(65536))"),
    "says ready, then nothing": "import os, time\nos.write(1, b'{\"ready\": true}\\n')\ntime.sleep(100)",
    "exits without an answer": "import os\nos.write(1, b'{\"ready\": true}\\n')",
    "floods stderr": ("import os\nos.write(1, b'{\"ready\": true}\\n')\nos.write(2, b'e' * (1 << 20))\n"
                      "os.write(1, b'{\"done\": true}\\n')"),
    "sends garbage and forged answers": "\n".join([
        "import base64, json, os",
        "w = lambda m: os.write(1, (m if isinstance(m, str) else json.dumps(m)).encode() + b'\\n')",
        "w({'ready': True})",
        "w('[' * 100000)",
        "w('{\"i\": 1e999999}')",
        "w({'i': True, 'exit': 0, 'timeout': False, 'truncated': False, 'out': base64.b64encode(b'5').decode()})",
        "w({'i': 0, 'exit': 0, 'timeout': False, 'truncated': False, 'out': '!!not base64!!'})",
        "w({'i': 1, 'exit': 0, 'timeout': False, 'truncated': False, 'out': base64.b64encode(b'6').decode()})",
        "w({'i': 1, 'exit': 0, 'timeout': False, 'truncated': False, 'out': base64.b64encode(b'6').decode()})",
        "w({'i': 2, 'exit': 0, 'timeout': False, 'truncated': False, 'ret': '[' * 100000})",
        "w({'i': 3, 'exit': False, 'timeout': False, 'truncated': False, 'ret': '0'})",
        "w({'i': 3, 'ok': True})",
        "w({'i': 99, 'exit': 0, 'timeout': False, 'truncated': False, 'ret': '3'})",
        "w({'done': True})",
    ]),
}


@needs_bwrap
@pytest.mark.parametrize("name", list(HOSTILE_RUNNERS))
def test_a_hostile_runner_cannot_harm_the_trainer(name, monkeypatch):
    """Even code that took over the runner only gets bytes into a capped pipe that the trainer parses."""
    sandbox.isolation()
    monkeypatch.setattr(sandbox, "_RUNNER", HOSTILE_RUNNERS[name])
    limits = SandboxLimits(wall_seconds=1.0, output_bytes=1 << 20)
    start = time.monotonic()
    result = run_python(CORRECT, CASES, limits)
    assert time.monotonic() - start < 8
    assert result.passed == 0, result
    assert len(result.log) <= 8192


@needs_bwrap
def test_a_runner_that_never_starts_is_a_sandbox_error(monkeypatch):
    sandbox.isolation()
    monkeypatch.setattr(sandbox, "_RUNNER", "import time\ntime.sleep(100)")
    with pytest.raises(SandboxError, match="did not start within 1s"):
        run_python(CORRECT, CASES, SandboxLimits(startup_seconds=1.0))


# -------------------------------------------------------------------------------- an unprivileged trainer

_DRIVER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from policyopt.rewards import sandbox
from policyopt.rewards.sandbox import SandboxLimits, run_python
from concurrent.futures import ThreadPoolExecutor
jobs = json.load(sys.stdin)
iso = sandbox.isolation()
results = {"isolation": iso.mode, "described": iso.describe(), "uid": os.getuid()}

def run(job):
    name, code, cases, limits = job
    result = run_python(code.replace("TRAINER_PID", str(os.getpid())), cases, SandboxLimits(**limits))
    return name, [result.passed, result.total, result.log]

with ThreadPoolExecutor(4) as pool:  # side by side, as code_reward runs them
    results.update(pool.map(run, jobs))
print(json.dumps(results))
"""


@needs_bwrap
def test_attacks_on_an_unprivileged_trainer():
    if os.getuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs root (to become nobody), setpriv and {SYSTEM_PYTHON}")
    nobody = 65534
    top = Path(tempfile.mkdtemp(prefix="policyopt-nobody-"))  # pytest's tmp_path is closed to other users
    top.chmod(0o755)
    root = top / "trainer"
    root.mkdir()
    h = Host(root, owner=nobody)
    try:
        jobs = [("correct", CORRECT, CASES, vars(FAST))]
        for name, (code, cases, limits) in ATTACKS.items():
            jobs.append((name, h.program(code, trainer_pid="TRAINER_PID"), _cases(cases, h), vars(limits)))
        driver = root / "driver.py"
        driver.write_text(_DRIVER)
        # a copy of the package where nobody can read it (the checkout may be under a closed home)
        shutil.copytree(PROJECT / "src" / "policyopt", top / "src" / "policyopt",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [top / "src", *(top / "src").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = {"PATH": "/usr/bin:/bin", "POLICYOPT_TEST_SECRET": h.secret, "LANG": "C.UTF-8"}
        proc = subprocess.run(["setpriv", "--reuid", str(nobody), "--regid", str(nobody), "--clear-groups",
                               SYSTEM_PYTHON, str(driver), str(top / "src")], input=json.dumps(jobs),
                              capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout)
        assert results["uid"] == nobody and results["isolation"] == "userns", results["described"]
        assert results.pop("correct")[:2] == [4, 4]
        for name in ATTACKS:
            passed, total, log = results[name]
            assert passed == 0, (name, log)
            assert h.secret not in log, name
        h.check()
    finally:
        h.close()
        shutil.rmtree(top, ignore_errors=True)


# ------------------------------------------------------------------- without bubblewrap: refuse, or opt in


def test_refuses_without_bubblewrap(monkeypatch, fresh_isolation):
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap.*POLICYOPT_UNSAFE_UNISOLATED_CODE=1"):
        code_reward(None, [CORRECT], [CASES])
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        BUILTIN_REWARDS["code"](None, [CORRECT], [CASES])
    assert code_reward(None, [CORRECT], [None]) == [None]  # nothing to run, nothing refused


def test_refuses_when_bubblewrap_cannot_start(monkeypatch, fresh_isolation, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: str(fake))
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="did not start: bwrap: No permissions"):
        sandbox.isolation()


def test_unisolated_only_when_opted_in_by_name(monkeypatch, fresh_isolation):
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    monkeypatch.setattr(sandbox, "_warned_unisolated", False)
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "yes")  # only "1" opts in
    with pytest.raises(SandboxUnavailable):
        sandbox.isolation()
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    sandbox.reset_isolation()
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox"):
        iso = sandbox.isolation()
    assert iso.mode == "none" and "UNISOLATED" in iso.describe()
    # benign programs only: unisolated, a hostile one could do anything the test runner can
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert code_reward(None, [CORRECT, "import sys\nsys.exit(0)", "a, b = map(int, input().split())\nprint(a + b)"],
                           [CASES] * 3, limits=FAST) == [1.0, 0.0, 0.5]


# ------------------------------------------------------------------------------ the test-case format


def test_parse_tests_formats():
    assert parse_tests(None) is None and parse_tests("") is None and parse_tests([]) is None
    assert parse_tests(CASES) == [StdinCase("2 3\n", "5\n"), StdinCase("10 -4\n", "6"),
                                  CallCase("add", (1, 2), {}, 3), CallCase("add", (-5, 5), {}, 0)]
    assert parse_tests(json.dumps(CASES)) == parse_tests(CASES)
    assert parse_tests([{"call": "f", "kwargs": {"x": 1}, "return": None}]) == [CallCase("f", (), {"x": 1}, None)]
    assert parse_tests("assert f(1) == 2") == [AssertCase("assert f(1) == 2")]
    assert parse_tests(["assert f(1) == 2", "assert f(2) == 4"]) == [AssertCase("assert f(1) == 2\nassert f(2) == 4")]
    assert parse_tests("[1, 2] == f()") == [AssertCase("[1, 2] == f()")]  # not JSON: code
    assert parse_tests(json.dumps(["assert f(1) == 2", "assert f(2) == 4"])) == parse_tests(["assert f(1) == 2",
                                                                                          "assert f(2) == 4"])
    for bad in ([{"stdin": "x"}], [{"call": "f", "args": [1]}], [{"stdin": 1, "stdout": "1"}], [{"what": 1}],
                [{"call": "f", "args": {}, "return": 1}], [{"stdin": "", "stdout": "", "extra": 1}], 42, "[1, 2]",
                [{"stdin": "", "stdout": ""}, "assert True"]):
        with pytest.raises(MalformedTests):
            parse_tests(bad)
    with pytest.raises(MalformedTests, match="sample 1"):
        code_reward(None, ["x", "y"], [None, [{"stdin": "x"}]])


def test_values_match():
    assert values_match([1, {"a": 2.0}], [1, {"a": 2}])
    assert values_match(0.1 + 0.2, 0.3) and not values_match(0.3, 0.31)
    assert not values_match(True, 1) and not values_match(1, True) and not values_match(None, 0)
    assert not values_match([1, 2], [2, 1]) and not values_match({"a": 1}, {"a": 1, "b": 2})
    assert not values_match("1", 1) and not values_match(float("nan"), float("nan"))
    deep = []
    for _ in range(100000):
        deep = [deep]
    assert not values_match(deep, deep[0])


def test_extract_code():
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("z = 3") == "z = 3"


# ------------------------------------------------------------------------------------------- overhead


def measure_overhead(runs: int = 20) -> dict[str, float]:
    """Median seconds per trivial program (one stdin case): under bwrap, and as a plain subprocess with
    the same runner; and bwrap's own cost around ``python -c pass``."""
    iso = sandbox.isolation()
    plain = sandbox.Isolation(mode="none", python=iso.python)
    job = {"code": "print(input())", "cases": [{"stdin": "x"}]}
    timings: dict[str, list[float]] = {"bwrap": [], "plain": [], "bwrap python -c pass": [],
                                       "python -c pass": []}
    flags = [str(FAST.disk_bytes) if f == "{disk}" else f for f in iso.flags]
    for _ in range(runs):
        for key, run in (("bwrap", lambda: sandbox._run_job(iso, job, FAST)),
                         ("plain", lambda: sandbox._run_job(plain, job, FAST)),
                         ("bwrap python -c pass", lambda: subprocess.run([iso.bwrap, *flags, iso.python, "-I", "-c",
                                                                           "pass"], check=True)),
                         ("python -c pass", lambda: subprocess.run([iso.python, "-I", "-c", "pass"], check=True))):
            start = time.perf_counter()
            run()
            timings[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in timings.items()}


@needs_bwrap
def test_sandbox_overhead_is_small():
    medians = measure_overhead(runs=5)
    print(" ".join(f"{k}={v * 1000:.0f}ms" for k, v in medians.items()))
    assert medians["bwrap"] - medians["plain"] < 0.5  # generous: CI machines are shared; see README for numbers


if __name__ == "__main__":
    result = measure_overhead(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
    print(sandbox.isolation().describe())
    for key, value in result.items():
        print(f"{key:>22}: {value * 1000:6.1f} ms")
    print(f"{'overhead per program':>22}: {(result['bwrap'] - result['plain']) * 1000:6.1f} ms")
