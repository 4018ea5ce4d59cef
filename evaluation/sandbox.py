"""Run a model's program against its tests in a separate, limited process.

A reply is untrusted code. Each program runs:
- in a fresh temporary directory, removed afterwards, as its working directory and HOME;
- in its own Python (`-I`: no user site, no PYTHON* variables) with a bare environment;
- under resource limits set in the child before the program starts: address space (memory), CPU seconds, no new
  processes (RLIMIT_NPROC 0, so `fork` and `subprocess` fail), a cap on the size of files it writes (its
  output goes to files, so an endless print ends there), no core dumps;
- with no network where the OS allows it: in a fresh user and network namespace (`unshare --user --net`), whose
  only interface is a loopback that is down, so even 127.0.0.1 is unreachable. Where namespaces are not allowed
  the socket module is disabled in the child instead, which a determined program could undo; `isolation()` says
  which this machine has;
- under a wall-clock timeout, after which its whole process group is killed.

A program that hangs, forks, eats memory or reads the network fails its own item and harms nothing else.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
MAX_FILE_BYTES = 16 * 2**20  # per file written, the output files included
VERDICT_CHARS = 300  # of the program's last error line, kept in the record

# Runs in the child's Python before the program: the limits, the process guard, then (without a namespace) the
# socket guard. RLIMIT_NPROC does not bind root, whom containers and CI often run as, so new processes are also
# refused by a seccomp filter: clone, clone3, fork and vfork fail with EAGAIN (threads too, which a solution to a
# small task does not need).
_LAUNCHER = f"""
import ctypes, platform, resource, runpy, struct, sys
memory, cpu, guard = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, ({MAX_FILE_BYTES}, {MAX_FILE_BYTES}))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
ARCHES = {{"x86_64": (0xC000003E, (56, 57, 58, 435)), "aarch64": (0xC00000B7, (220, 435))}}
if platform.machine() in ARCHES:
    arch, calls = ARCHES[platform.machine()]
    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)
    # load arch; not ours: allow. load nr; each refused call jumps to the EAGAIN return; else allow.
    program = [op(0x20, 4), op(0x15, arch, 0, len(calls) + 1), op(0x20, 0)]
    program += [op(0x15, nr, len(calls) - i, 0) for i, nr in enumerate(calls)]
    program += [op(0x06, 0x7FFF0000), op(0x06, 0x00050000 | 11)]
    code = ctypes.create_string_buffer(b"".join(program))
    fprog = struct.pack("HxxxxxxQ", len(program), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: required to install a filter without privileges
    libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
if guard:
    import socket
    def _refuse(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.getaddrinfo = _refuse
sys.argv = ["solution.py"]
runpy.run_path("solution.py", run_name="__main__")
"""


@functools.cache
def isolation() -> str:
    """"namespace" when unprivileged user and network namespaces work here, else "socket-guard"."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return "socket-guard"
    try:
        probe = subprocess.run([unshare, "--user", "--net", "--map-root-user", "true"], capture_output=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "socket-guard"
    return "namespace" if probe.returncode == 0 else "socket-guard"


def run_program(program: str, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
                ) -> tuple[bool, str]:
    """Run `program` (solution and tests) and return (passed, verdict): passed when it exits with status 0 within
    the limits; the verdict is "passed", "timeout", "killed by SIGKILL" or the program's last error line."""
    namespaced = isolation() == "namespace"
    with tempfile.TemporaryDirectory(prefix="relat-eval-") as folder:
        work = Path(folder)
        (work / "solution.py").write_text(program, encoding="utf-8")
        command = [sys.executable, "-I", "-B", "-c", _LAUNCHER, str(memory_mb * 2**20), str(int(timeout) + 1),
                   "0" if namespaced else "1"]
        if namespaced:
            command = [shutil.which("unshare") or "unshare", "--user", "--net", "--map-root-user", *command]
        environment = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
        with open(work / "stdout", "wb") as stdout, open(work / "stderr", "wb") as stderr:
            process = subprocess.Popen(command, cwd=folder, env=environment, stdin=subprocess.DEVNULL,
                                       stdout=stdout, stderr=stderr, start_new_session=True)
            try:
                status = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return False, "timeout"
            finally:
                _kill_group(process)  # anything it left behind in its group (it cannot fork, but to be sure)
        if status == 0:
            return True, "passed"
        if status < 0:
            return False, f"killed by {signal.Signals(-status).name}"
        return False, _last_error(work / "stderr", status)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _last_error(path: Path, status: int) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return (lines[-1].strip() if lines else f"exit status {status}")[:VERDICT_CHARS]
