"""Hostile completions score 0 and leave the trainer and the machine unharmed."""

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from policyopt.rewards import sandbox
from policyopt.rewards.sandbox import SandboxLimits, code_reward, extract_code, run_python

FAST = SandboxLimits(wall_seconds=3.0, cpu_seconds=2, memory_bytes=256 * 1024 * 1024, file_bytes=64 * 1024)


@pytest.fixture(params=["isolated", "in-process guards only"])
def mode(request, monkeypatch):
    if request.param == "isolated":
        if sandbox._interpreter()[1] is False:
            pytest.skip("kernel isolation needs root and a python that user nobody can run")
    else:  # what a non-root trainer gets: the audit-hook layer and resource limits alone
        import sys

        monkeypatch.setattr(sandbox, "_interpreter", lambda: (sys.executable, False))
    return request.param


def _fails_fast(code, tests="", limits=FAST):
    start = time.monotonic()
    result = run_python(code, tests, limits)
    assert time.monotonic() - start < limits.wall_seconds + 5
    assert not result.passed, result
    return result


def test_good_and_bad_solutions(mode):
    assert run_python("def f(x):\n    return 2 * x\n", "assert f(3) == 6", FAST).passed
    assert not run_python("def f(x):\n    return 2 * x\n", "assert f(3) == 7", FAST).passed


def test_exiting_early_does_not_skip_the_tests(mode):
    _fails_fast("import sys\nsys.exit(0)", "assert False")
    _fails_fast("import os\nos._exit(0)", "assert False")
    _fails_fast("raise SystemExit(0)", "assert False")


def test_infinite_loop_is_cut_off(mode):
    result = _fails_fast("while True:\n    pass")
    assert result.timed_out or result.returncode != 0


def test_fork_bomb_cannot_fork(mode):
    code = "import os\nwhile True:\n    os.fork()"
    _fails_fast(code)
    _fails_fast("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])")
    _fails_fast("import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()")
    time.sleep(0.2)
    leftovers = subprocess.run(["pgrep", "-f", "sleep 100"], capture_output=True, text=True).stdout.split()
    assert leftovers == []


def test_memory_bomb_hits_the_limit(mode):
    _fails_fast("x = bytearray(10 ** 10)")
    _fails_fast("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))")


def test_cannot_write_outside_its_directory(mode, tmp_path):
    target = tmp_path / "pwned.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    _fails_fast(f"open({str(target)!r}, 'w').write('x')")
    _fails_fast(f"import os\nos.remove({str(victim)!r})")
    _fails_fast(f"import shutil\nshutil.rmtree({str(tmp_path)!r})")
    shared_tmp = f"/tmp/policyopt-pwned-{uuid.uuid4().hex}"  # world-writable, so only the guards stop it
    _fails_fast(f"open({shared_tmp!r}, 'w').write('x')")
    assert not target.exists() and victim.read_text() == "keep me"
    assert not os.path.exists(shared_tmp)
    # its own working directory is fine
    assert run_python("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'", "",
                      FAST).passed


def test_environment_secrets_do_not_leak(mode, monkeypatch):
    monkeypatch.setenv("POLICYOPT_TEST_SECRET", "s3cr3t-value")
    code = ("import os\nprint(dict(os.environ))\n"
            "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\nexcept Exception as e:\n    print(e)\n")
    result = run_python(code, "", FAST)
    assert "s3cr3t-value" not in result.stdout + result.stderr
    _fails_fast("import os", "assert 'POLICYOPT_TEST_SECRET' in os.environ")


def test_no_network(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)
    port = server.getsockname()[1]
    connections = []

    def accept():
        try:
            connections.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    _fails_fast(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')")
    _fails_fast("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=1)")
    thread.join()
    server.close()
    assert connections == []


def test_cannot_kill_the_parent(mode):
    _fails_fast("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    _fails_fast("import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)")
    _fails_fast("import ctypes\nctypes.CDLL(None).kill(0, 9)")
    assert True  # still alive


def test_huge_output_is_capped(mode):
    result = _fails_fast("while True:\n    print('x' * 10000)")
    assert len(result.stdout) <= 4096


def test_code_reward_scores_a_batch():
    completions = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
                   "while True: pass", "anything"]
    tests = ["assert add(2, 3) == 5"] * 3 + [None]
    assert code_reward(None, completions, tests, limits=FAST) == [1.0, 0.0, 0.0, None]


def test_extract_code():
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("z = 3") == "z = 3"
