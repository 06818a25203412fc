"""One cgroup per sandbox run: a process count and a memory limit for everything the program starts, together.

    cgroups, why_not = SandboxCgroups.detect()          # None + the reason where this machine allows none
    run = cgroups.create(pids_max=64, memory_bytes=512 * 2**20)
    argv = run.wrap(["bwrap", ...])                     # sh moves itself into the cgroup, then execs bwrap
    ...                                                 # the program and every child it forks are inside
    run.oom_killed(); run.remove()                      # kills what is left, removes the directories

Both cgroup versions are handled. v1 (separate `pids` and `memory` hierarchies under /sys/fs/cgroup/<controller>):
the run's cgroups are children of this process's own cgroup in each (from /proc/self/cgroup); pids.max and
memory.limit_in_bytes (+ memory.memsw.limit_in_bytes when swap is accounted). v2 (one unified hierarchy): a child
of this process's cgroup, which must have `pids` and `memory` in its cgroup.subtree_control (a delegated
subtree); pids.max, memory.max, memory.swap.max = 0. `detect` creates and removes a probe cgroup, so "available"
means it worked here, as this user; the reason it gives otherwise is what the sandbox states as its weaker
guarantee.

The process is moved in from outside the sandbox and before it starts anything: `wrap` prefixes the command with a
`/bin/sh -c` that writes its own pid to each cgroup.procs and then execs the command, so there is no window in
which a fork escapes (a Popen `preexec_fn` would do the same but is unsafe in a threaded trainer). tmpfs pages the
program writes (/tmp, /dev/shm) are charged to its memory cgroup too.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunCgroup", "SandboxCgroups"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
_COUNTER = itertools.count()
_MOVE_IN = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; n=$((n-1)); done; ' \
           'exec "$@"'
MOVE_FAILED_EXIT = 125
"""Exit status of the wrapper when it could not enter a cgroup (the command did not start)."""


def _own_paths() -> dict[str, str]:
    """controller (v1) or '' (v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


@dataclass(frozen=True)
class RunCgroup:
    """The cgroup directories of one run (one per v1 hierarchy, or one v2 directory)."""

    dirs: tuple[Path, ...]
    version: int

    def wrap(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", _MOVE_IN, "sh", str(len(self.dirs)), *map(str, self.dirs), *argv]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this run for the memory limit."""
        for d in self.dirs:
            for name in ("memory.events", "memory.oom_control"):  # v2 / v1 (kernel >= 4.13): "oom_kill N"
                path = d / name
                if path.is_file():
                    for line in path.read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and int(value) > 0:
                            return True
        return False

    def remove(self, timeout_s: float = 5.0) -> None:
        """SIGKILL whatever is still inside, then remove the directories (an rmdir fails while tasks remain)."""
        deadline = time.monotonic() + timeout_s
        for d in self.dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    for pid in (d / "cgroup.procs").read_text().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    time.sleep(0.01)


class SandboxCgroups:
    """Where this process can create per-run cgroups with pids and memory limits (module docstring)."""

    def __init__(self, parents: tuple[Path, ...], version: int) -> None:
        self.parents, self.version = parents, version

    @classmethod
    def detect(cls) -> tuple[SandboxCgroups | None, str]:
        """(usable cgroups, '') or (None, why not), after creating and removing a probe cgroup."""
        try:
            own = _own_paths()
        except OSError as err:
            return None, f"cannot read /proc/self/cgroup ({err})"
        reasons = []
        v1 = [CGROUP_ROOT / c / own[c].lstrip("/") for c in ("pids", "memory") if c in own]
        if len(v1) == 2 and all((CGROUP_ROOT / c / "cgroup.procs").is_file() for c in ("pids", "memory")):
            found = cls._probe(cls(tuple(v1), 1))
            if found[0] is not None:
                return found
            reasons.append(found[1])
        if "" in own:
            for mount in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
                if (mount / "cgroup.controllers").is_file():
                    parent = mount / own[""].lstrip("/")
                    control = parent / "cgroup.subtree_control"
                    enabled = control.read_text().split() if control.is_file() else []
                    if not {"pids", "memory"} <= set(enabled):
                        reasons.append(f"cgroup v2 {parent} does not delegate pids and memory to children "
                                       f"(cgroup.subtree_control: {enabled})")
                        continue
                    found = cls._probe(cls((parent,), 2))
                    if found[0] is not None:
                        return found
                    reasons.append(found[1])
        return None, "; ".join(reasons) or "no pids + memory cgroup hierarchy found under /sys/fs/cgroup"

    @staticmethod
    def _probe(candidate: SandboxCgroups) -> tuple[SandboxCgroups | None, str]:
        try:
            candidate.create(pids_max=8, memory_bytes=64 * 2**20).remove()
        except OSError as err:
            return None, f"cannot create a cgroup under {candidate.parents[0]} ({err.strerror or err})"
        return candidate, ""

    def create(self, *, pids_max: int, memory_bytes: int) -> RunCgroup:
        """A fresh cgroup (one per hierarchy) with the limits written; raises OSError (and leaves none behind)."""
        name = f"avsd-sandbox-{os.getpid()}-{next(_COUNTER)}-{uuid.uuid4().hex[:8]}"
        run = RunCgroup(tuple(parent / name for parent in self.parents), self.version)
        try:
            for d in run.dirs:
                d.mkdir()
                if self.version == 1:
                    if (d / "pids.max").exists():
                        (d / "pids.max").write_text(str(pids_max))
                    if (d / "memory.limit_in_bytes").exists():
                        (d / "memory.limit_in_bytes").write_text(str(memory_bytes))
                        if (d / "memory.memsw.limit_in_bytes").exists():  # after the memory limit: it must be >=
                            (d / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                else:
                    (d / "pids.max").write_text(str(pids_max))
                    (d / "memory.max").write_text(str(memory_bytes))
                    if (d / "memory.swap.max").exists():
                        (d / "memory.swap.max").write_text("0")
        except OSError:
            for d in run.dirs:
                if d.exists():
                    d.rmdir()
            raise
        return run
