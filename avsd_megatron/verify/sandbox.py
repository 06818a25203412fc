"""Run untrusted Python (student completions) on stdin -> stdout tests: a bubblewrap sandbox and the test judge.

Sandbox (spec 3.4; the reference's training default was an unsandboxed subprocess, spec 6 item 9):

    /bin/sh -c 'echo $$ > <run cgroup>/cgroup.procs; exec "$@"'    a fresh cgroup per run (cgroup_limits), when
                                     this machine allows one: pids.max and a memory limit for ALL its processes
    bwrap --ro-bind /usr /usr ...    a filesystem view of only the system's /usr (+ /lib*, /bin, /sbin links) and
          --ro-bind <python prefix>  the interpreter's prefixes (venv and base installation); no /etc, /root,
                                     /home, /work, the checkout or host /tmp
          --perms 1777 --size N --tmpfs /tmp        private, size-capped /tmp; the work dir is /tmp/work
          --dev /dev --size N --tmpfs /dev/shm      a size-capped /dev/shm
          --ro-bind <prog> /tmp/work/main.py --proc /proc
          --unshare-net --unshare-pid --unshare-ipc --unshare-uts (--unshare-user --uid 65534 when not root)
          --cap-drop ALL (+ CAP_SETUID/SETGID as root, dropped by the setuid below)
          --die-with-parent --new-session --clearenv (+ a few PYTHON*/PATH variables)
          <python> -c <launcher> ...  as root: setgroups([]), setgid/setuid(65534) (no capabilities remain);
                                      RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, no core files (and RLIMIT_NPROC without
                                      a cgroup), then execs <python> main.py

Limits: wall time (the whole process group is SIGKILLed), CPU seconds (SIGXCPU), bytes written per file (stdout /
stderr are files, so a program that floods its output fails with EFBIG instead of filling the trainer's memory),
address space per process (MemoryError inside Python). For the whole sandbox, with a cgroup: at most
`max_processes` processes (forks past it fail with EAGAIN) and `memory_mb` of memory for all of them together,
tmpfs pages included (past it the kernel kills one; stderr says so). Without a cgroup (none can be created here:
`Sandbox.guarantee` says why and what holds instead, and construction warns once; `cgroup="require"` makes it an
error) the weaker guarantee is: RLIMIT_NPROC = max_processes for the sandbox's uid, which as root is the uid 65534
shared by every sandbox running at once on this host (and, unprivileged, the sandbox's own user namespace, Linux
>= 5.14), and memory is bounded per process only (RLIMIT_AS), so a sandbox may use up to max_processes x
memory_mb. Reported stdout/stderr are cut to `max_output_chars` (4000, spec 3.4); the judge compares the whole
captured stdout (see `run_tests`).

`SandboxConfig(kind="subprocess")` runs the same launcher without bubblewrap (the same cgroup and rlimits, no
filesystem, network or uid isolation); it warns, and must be asked for explicitly. A missing or unusable bwrap is
an error that says how to install it; there is no silent fallback.

Statuses of `run_tests` (spec 3.4), checked in this order, first failure returned:
    extraction_failure  no code (empty after extraction)
    syntax_error        `compile` fails (in the trainer process; nothing is executed)
    timeout             a test ran past the wall-time limit
    runtime_error       non-zero exit (exception, MemoryError, SIGXCPU, output past max_output_bytes, ...)
    wrong_answer        stdout differs from the expected output after `normalize_output`
    passed              every test passed
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from avsd_megatron.verify.cgroup_limits import SandboxCgroups

SANDBOX_KINDS = ("bwrap", "subprocess")
STATUSES = ("passed", "syntax_error", "runtime_error", "wrong_answer", "timeout", "extraction_failure")
Status = Literal["passed", "syntax_error", "runtime_error", "wrong_answer", "timeout", "extraction_failure"]

INSTALL_BWRAP = (
    "install bubblewrap (Debian/Ubuntu as root: `apt-get update && apt-get install -y bubblewrap`; "
    "Fedora: `dnf install bubblewrap`), or pass SandboxConfig(bwrap_path=...)"
)
_WORKDIR = "/tmp/work"
_PROBE_WALL_TIME_S = 60.0  # the start-up check's wall-time limit (see Sandbox.__init__)
_PROGRAM = "main.py"
# Runs inside the sandbox: apply the resource limits to itself, then exec the student program (limits are
# inherited across exec). Passing limits as argv keeps this one constant string.
_LAUNCHER = (
    "import os, resource, sys\n"
    "mem, cpu, fsize, nproc, uid = (int(v) for v in sys.argv[1:6])\n"
    "if uid >= 0 and os.getuid() == 0:\n"  # root in the sandbox: become an unprivileged uid (drops every capability)
    "    os.setgroups([]); os.setgid(uid); os.setuid(uid)\n"
    "if nproc > 0:\n"
    "    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))\n"
    "resource.setrlimit(resource.RLIMIT_AS, (mem, mem))\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))\n"  # soft < hard: SIGXCPU, not SIGKILL
    "resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "os.execv(sys.executable, [sys.executable, sys.argv[6]])\n"
)


@dataclass(frozen=True)
class TestCase:
    """One stdin -> stdout test of a code problem."""

    __test__ = False  # not a pytest class

    input: str
    output: str


class SandboxUnavailableError(RuntimeError):
    """bwrap is missing, or present but cannot create its namespaces here."""


@dataclass(frozen=True)
class SandboxConfig:
    """How student code is executed (spec 3.4 defaults)."""

    kind: Literal["bwrap", "subprocess"] = "bwrap"
    """"bwrap": bubblewrap sandbox. "subprocess": same limits, NO isolation (warns; local debugging only)."""
    wall_time_s: float = 2.0
    """Wall-clock limit per run (per test); past it the run is killed and the test is a timeout."""
    memory_mb: int = 512
    """RLIMIT_AS of the program, MiB (the Python interpreter itself needs ~30 MiB of it)."""
    cpu_time_s: int = 30
    """RLIMIT_CPU of the program, seconds (SIGXCPU past it)."""
    max_output_chars: int = 4000
    """Reported stdout/stderr are cut to this many characters."""
    max_output_bytes: int = 16 * 2**20
    """RLIMIT_FSIZE: writing more than this to stdout, stderr or any one file fails (EFBIG / SIGXFSZ)."""
    tmpfs_mb: int = 64
    """Size of the sandbox's private /tmp and, separately, of its /dev/shm (bwrap only)."""
    max_processes: int = 64
    """Processes (and threads) of the whole sandbox: the cgroup's pids.max (else RLIMIT_NPROC, module docstring)."""
    cgroup: Literal["auto", "require", "off"] = "auto"
    """Per-run cgroup for the whole-sandbox process and memory limits: 'auto' = when this machine allows one (else
    the weaker guarantee, with a warning), 'require' = error without one, 'off' = never."""
    sandbox_uid: int = 65534
    """Unprivileged uid (and gid) the program runs as (bwrap only; 65534 = nobody)."""
    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter that runs the program (default: the one running this code)."""
    bwrap_path: str | None = None
    """bwrap executable; None = look up `bwrap` on PATH."""

    def __post_init__(self) -> None:
        if self.kind not in SANDBOX_KINDS:
            raise ValueError(f"sandbox.kind={self.kind!r} is not one of {SANDBOX_KINDS}")
        if self.cgroup not in ("auto", "require", "off"):
            raise ValueError(f"sandbox.cgroup={self.cgroup!r} is not one of ('auto', 'require', 'off')")
        if not 0 < self.sandbox_uid < 2**31:
            raise ValueError(f"sandbox.sandbox_uid={self.sandbox_uid!r} must be a non-root uid")
        for name in ("wall_time_s", "memory_mb", "cpu_time_s", "max_output_chars", "max_output_bytes", "tmpfs_mb",
                     "max_processes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox.{name}={getattr(self, name)!r} must be > 0")
        if self.kind == "subprocess":
            warnings.warn(
                "SandboxConfig(kind='subprocess') runs model-written code WITHOUT a sandbox (no filesystem or "
                "network isolation; only resource limits); use kind='bwrap' for training and evaluation",
                RuntimeWarning,
                stacklevel=3,
            )


@dataclass(frozen=True)
class RunResult:
    """One execution of a program on one stdin."""

    returncode: int | None
    """Exit code; -N if killed by signal N (also for a program killed inside bwrap); None on timeout."""
    stdout: str
    """Captured stdout, cut to max_output_chars."""
    stderr: str
    """Captured stderr, cut to max_output_chars."""
    timed_out: bool
    wall_s: float
    full_stdout: str = field(repr=False, default="")
    """Whole captured stdout (at most max_output_bytes), for the judge."""


class Sandbox:
    """Executes Python programs under `SandboxConfig`. Construction checks that bwrap works (for kind="bwrap").

    Raises:
        SandboxUnavailableError: kind="bwrap" and bwrap is missing or cannot start a sandbox here.
        ValueError: cfg.python is not an executable.
    """

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.bwrap = None
        if shutil.which(cfg.python) is None:
            raise ValueError(f"sandbox.python={cfg.python!r} is not an executable")
        self.cgroups, why_not = (None, "sandbox.cgroup='off'") if cfg.cgroup == "off" else SandboxCgroups.detect()
        if self.cgroups is None and cfg.cgroup == "require":
            raise SandboxUnavailableError(f"sandbox.cgroup='require' but no cgroup can be created here: {why_not}")
        self.guarantee = _guarantee(cfg, self.cgroups, why_not)
        """What bounds the whole sandbox on this machine (module docstring), in words."""
        if self.cgroups is None and cfg.cgroup == "auto":
            _warn_once(f"sandbox: no per-run cgroup ({why_not}); {self.guarantee}")
        if cfg.kind == "bwrap":
            self.bwrap = _find_bwrap(cfg.bwrap_path)
            # A generous limit for the start-up check alone: a loaded machine may take seconds to start bwrap and
            # Python, which must not be mistaken for a broken sandbox (programs still get cfg.wall_time_s).
            probe = self.run("print('ok')", "", wall_time_s=max(cfg.wall_time_s, _PROBE_WALL_TIME_S))
            if probe.timed_out:
                raise SandboxUnavailableError(
                    f"bwrap at {self.bwrap!r} did not run a one-line program within {probe.wall_s:.0f} s; "
                    "the machine may be overloaded, or bwrap hangs here"
                )
            if probe.returncode != 0 or probe.stdout.strip() != "ok":
                raise SandboxUnavailableError(
                    f"bwrap at {self.bwrap!r} could not run a sandboxed program (exit {probe.returncode}): "
                    f"{probe.stderr.strip()[:500]!r}. It needs permission to create mount/pid/net namespaces "
                    "(root, or unprivileged user namespaces enabled); in a container, allow them or "
                    "run as root"
                )

    def run(self, code: str, stdin: str, *, wall_time_s: float | None = None) -> RunResult:
        """Run `code` as a Python 3 program with `stdin`; never raises for anything the program does.

        `wall_time_s` overrides `cfg.wall_time_s` for this run only (None = the config's limit).
        """
        cfg = self.cfg
        wall_limit = cfg.wall_time_s if wall_time_s is None else wall_time_s
        with tempfile.TemporaryDirectory(prefix="avsd_sandbox_") as host_dir:
            host = Path(host_dir)
            program = host / _PROGRAM
            program.write_text(code, encoding="utf-8")
            (host / "stdin").write_text(stdin, encoding="utf-8")
            argv = self._argv(program)
            run_cgroup = None
            if self.cgroups is not None:
                run_cgroup = self.cgroups.create(pids_max=cfg.max_processes, memory_bytes=cfg.memory_mb * 2**20)
                argv = run_cgroup.wrap(argv)
            with (
                open(host / "stdin", "rb") as fin,
                open(host / "stdout", "wb") as fout,
                open(host / "stderr", "wb") as ferr,
            ):
                start = time.perf_counter()
                proc = subprocess.Popen(
                    argv,
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=host_dir if cfg.kind == "subprocess" else "/",
                    env=_program_env(host_dir if cfg.kind == "subprocess" else _WORKDIR),
                    start_new_session=True,  # own process group: a timeout kills everything it started
                    close_fds=True,
                )
                timed_out = False
                try:
                    returncode = proc.wait(timeout=wall_limit)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc)
                    returncode = None
                wall_s = time.perf_counter() - start
            stdout = (host / "stdout").read_bytes().decode("utf-8", errors="replace")
            stderr = (host / "stderr").read_bytes().decode("utf-8", errors="replace")
            if run_cgroup is not None:
                if run_cgroup.oom_killed():
                    stderr += f"\nsandbox: a process was killed at the sandbox memory limit ({cfg.memory_mb} MiB)\n"
                run_cgroup.remove()
        if self.bwrap is not None and returncode is not None and returncode > 128:
            returncode = 128 - returncode  # bwrap reports a child killed by signal N as exit 128 + N
        limit = cfg.max_output_chars
        return RunResult(returncode, stdout[:limit], stderr[:limit], timed_out, wall_s, full_stdout=stdout)

    def _argv(self, program: Path) -> list[str]:
        cfg = self.cfg
        isolated = self.bwrap is not None
        nproc = 0 if self.cgroups is not None or not isolated else cfg.max_processes  # rlimit only as the fallback
        uid = cfg.sandbox_uid if isolated else -1
        limits = [str(cfg.memory_mb * 2**20), str(cfg.cpu_time_s), str(cfg.max_output_bytes), str(nproc), str(uid)]
        if not isolated:
            return [cfg.python, "-c", _LAUNCHER, *limits, str(program)]
        size = str(cfg.tmpfs_mb * 2**20)
        argv = [self.bwrap, *_system_view(), "--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
        argv += _interpreter_view(cfg.python)  # after the /tmp tmpfs, which would hide a venv under /tmp
        argv += ["--perms", "1777", "--dir", _WORKDIR, "--ro-bind", str(program), f"{_WORKDIR}/{_PROGRAM}"]
        argv += ["--chdir", _WORKDIR, "--dev", "/dev", "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
        argv += ["--proc", "/proc", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        if os.getuid() == 0:  # the launcher drops to sandbox_uid; nothing else is kept
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:  # unprivileged bwrap: a user namespace mapping us to sandbox_uid (no capabilities in it)
            argv += ["--unshare-user", "--uid", str(cfg.sandbox_uid), "--gid", str(cfg.sandbox_uid)]
        argv += ["--die-with-parent", "--new-session", "--clearenv"]
        for key, value in _program_env(_WORKDIR).items():
            argv += ["--setenv", key, value]
        return argv + [cfg.python, "-c", _LAUNCHER, *limits, _PROGRAM]


_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
"""The system's programs and shared libraries (a merged-/usr system has the last ones as links into /usr)."""


def _system_view() -> list[str]:
    """bwrap arguments binding the system directories read-only (links kept as links) and nothing else of /."""
    out = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            out += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            out += ["--ro-bind", path, path]
    return out


def _interpreter_view(python: str) -> list[str]:
    """Read-only binds of the interpreter's prefixes outside /usr: a venv (its pyvenv.cfg and site-packages) and
    the installation it points to (pyenv under /root, conda, ...). Only those directories: their parents appear
    as empty directories, so /root, /home or the checkout holding a venv stay hidden."""
    real = os.path.realpath(shutil.which(python) or python)
    candidates = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(real))}
    venv = os.path.dirname(os.path.dirname(os.path.abspath(shutil.which(python) or python)))
    if os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
        candidates.add(venv)
    out, made = [], set()
    for path in sorted(candidates):  # parents before children
        if any(path == d or path.startswith(d + "/") for d in _SYSTEM_DIRS) or not os.path.isdir(path):
            continue
        for parent in reversed(Path(path).parents[:-1]):  # bwrap would create them 0700: unusable for the uid
            if str(parent) not in made and not any(str(parent).startswith(c + "/") for c in made if c in candidates):
                out += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        out += ["--ro-bind", path, path]
        made.add(path)
    return out


def _guarantee(cfg: SandboxConfig, cgroups: SandboxCgroups | None, why_not: str) -> str:
    if cgroups is not None:
        return (f"cgroup v{cgroups.version} per run: at most {cfg.max_processes} processes and {cfg.memory_mb} MiB "
                "for the whole sandbox")
    if cfg.kind == "subprocess":
        return f"no whole-sandbox limit ({why_not}); memory per process only (RLIMIT_AS {cfg.memory_mb} MiB)"
    return (f"weaker guarantee: RLIMIT_NPROC {cfg.max_processes} for uid {cfg.sandbox_uid} (as root shared by "
            f"every sandbox running at once; unprivileged, per user namespace), memory per process only (RLIMIT_AS "
            f"{cfg.memory_mb} MiB, so up to {cfg.max_processes} x that for the sandbox)")


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _find_bwrap(path: str | None) -> str:
    found = shutil.which(path or "bwrap")
    if found is None:
        what = f"bwrap_path={path!r} is not an executable" if path else "`bwrap` is not on PATH"
        raise SandboxUnavailableError(f"SandboxConfig(kind='bwrap'): {what}; {INSTALL_BWRAP}")
    return found


def _program_env(home: str) -> dict[str, str]:
    """The program's whole environment: nothing of the trainer's (tokens, paths) leaks in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# Judge


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of running a program on a list of tests (first failure, spec 3.4)."""

    status: Status
    tests_run: int = 0
    """Tests executed, the failing one included."""
    failing_input: str | None = None
    expected_output: str | None = None
    actual_output: str | None = None
    """stdout of the failing run, cut to max_output_chars."""
    error_type: str | None = None
    """Exception class name from the traceback, or "killed by SIGXCPU", "exit code 3", ... (runtime_error)."""
    traceback: str | None = None
    """Traceback (syntax_error: the compile error; runtime_error: stderr), cut to max_output_chars."""
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def normalize_output(text: str) -> str:
    """Output comparison form (spec 3.4): \\r\\n and \\r -> \\n, each line right-stripped, trailing blank lines
    dropped. Leading whitespace and blank lines in the middle still count."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def run_tests(
    code: str,
    tests: Sequence[TestCase],
    sandbox: Sandbox,
    *,
    compare_truncated_output: bool = False,
) -> ExecutionResult:
    """Run `code` on each test in order and return the first failure, else "passed" (statuses: module docstring).

    Args:
        code: the extracted program ("" -> extraction_failure).
        tests: stdin/expected-stdout pairs; an empty list passes once the code compiles.
        sandbox: where to run.
        compare_truncated_output: compare stdout cut to max_output_chars, as the reference did (a correct
            program whose output is longer than that then fails). Default False: compare the whole stdout.
    """
    if not code.strip():
        return ExecutionResult("extraction_failure")
    limit = sandbox.cfg.max_output_chars
    try:
        compile(code, _PROGRAM, "exec")
    except (SyntaxError, ValueError) as err:  # ValueError: NUL bytes in the source
        text = "".join(traceback.format_exception_only(err))
        return ExecutionResult("syntax_error", error_type=type(err).__name__, traceback=text[:limit])
    total_s = 0.0
    for i, case in enumerate(tests):
        result = sandbox.run(code, case.input)
        total_s += result.wall_s
        common = dict(tests_run=i + 1, failing_input=case.input, wall_s=total_s)
        if result.timed_out:
            return ExecutionResult("timeout", **common)
        if result.returncode != 0:
            return ExecutionResult(
                "runtime_error",
                actual_output=result.stdout,
                error_type=error_type(result.stderr, result.returncode),
                traceback=result.stderr,
                **common,
            )
        produced = result.stdout if compare_truncated_output else result.full_stdout
        if normalize_output(produced) != normalize_output(case.output):
            return ExecutionResult(
                "wrong_answer", expected_output=case.output, actual_output=result.stdout, **common
            )
    return ExecutionResult("passed", tests_run=len(tests), wall_s=total_s)


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


def error_type(stderr: str, returncode: int | None) -> str:
    """Exception class from the last traceback line, else the signal or exit code."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and not lines[-1].startswith(" "):
        match = _EXCEPTION_LINE.match(lines[-1])
        if match and any(line.startswith("Traceback") for line in lines):
            return match.group(1)
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
