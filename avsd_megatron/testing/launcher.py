"""Run a function on W gloo ranks in fresh processes and bring each rank's return value back: `run_on_ranks`.

    results = run_on_ranks(my_rank_fn, 4, 2, 2, timeout=300)   # my_rank_fn(2, 2) on ranks 0..3 -> [r0, r1, r2, r3]

How a launch works:
- The parent starts a `TCPStore` server on a free localhost port (port 0, so no probing race) and starts W processes.
  Default start method: `forkserver`. The first launch starts one server process that imports torch and Megatron
  (`_FORKSERVER_PRELOAD`) and every rank of every later launch is forked from it: ~0.5 s per launch instead of
  ~5-10 s of imports per rank with `spawn`. Plain `fork` of the parent is never used (unsafe once torch has run).
  The server lives as long as the parent process and keeps the environment it started with; ranks still get the
  parent's current `sys.path`. Use `start_method="spawn"` for ranks that touch CUDA. Each child connects to the store,
  calls `torch.distributed.init_process_group("gloo", store=..., rank=r, world_size=W)`, limits torch to
  `cpu_count // W` threads, runs `fn(*args, **kwargs)`, and sends its pickled return value to the parent.
- `fn` is pickled by reference, so it must be a module-level function of an importable module (a test file in the
  `tests` package, or a script's `__main__` behind an `if __name__ == "__main__":` guard). Arguments and return
  values must be picklable; tensors come back by value (plain pickle, no shared memory).
- The first failing rank fails the launch: `RankError` names the rank and carries its traceback. Ranks still blocked
  in collectives are then killed, as are all ranks when `timeout` passes (`TimeoutError` names the ranks that did
  not report). Each child runs in its own process group so that its own children (e.g. `dist_checkpointing`
  writers) are killed with it.
- Teardown in every child, success or not: `parallel_state.destroy_model_parallel()` if Megatron was initialised,
  then `destroy_process_group()`.

`init_megatron(tp, pp, seed=...)` is the one-liner a rank function calls to get real Megatron-Core on CPU: it installs
the `megatron_on_cpu` patches for the rest of that (throwaway) child process, initialises `parallel_state` and seeds
the RNGs. It refuses to run outside a launched child so it can never patch the pytest process.

Cost: with `spawn` each child pays the interpreter start plus imports (torch ~2 s, megatron.core ~3 s of CPU); with
the default forkserver only the first launch does. Still, return everything a test needs from one launch per
parallel configuration.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankError", "init_megatron", "run_on_ranks"]

_HOST = "127.0.0.1"
# Imported once by the forkserver (a missing one is skipped), so forked ranks start with them loaded.
_FORKSERVER_PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.pipeline_parallel",
    "megatron.core.models.gpt",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "avsd_megatron.testing",
)
# Seconds the parent keeps collecting reports after the first failure before killing the remaining ranks, so that
# a second genuine error (not just a peer's broken-connection error) still reaches the message.
_ERROR_GRACE_S = 2.0


class RankError(RuntimeError):
    """One or more ranks raised; the message names each failing rank and carries its traceback."""


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    start_method: Literal["forkserver", "spawn"] = "forkserver",
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks in fresh processes; return `[result of rank 0, ...]`.

    Args:
        fn: module-level function (picklable by reference); runs after `init_process_group("gloo")`.
        world_size: number of ranks W >= 1.
        *args, **kwargs: passed to `fn` on every rank; must be picklable. `timeout` and `start_method` are the
            launcher's own keywords and never reach `fn`.
        timeout: seconds for the whole launch (start-up included) and for every gloo collective.
        start_method: "forkserver" (default) forks ranks from a server process that imported torch and Megatron
            once per parent process (~0.5 s per launch instead of ~5-10 s); "spawn" starts bare interpreters.
            Ranks that use CUDA need "spawn": importing Megatron in the server touches CUDA, and torch refuses CUDA
            in a process forked after that ("Cannot re-initialize CUDA in forked subprocess").
    Returns:
        list of W return values, indexed by rank.
    Raises:
        TypeError: `fn` is a lambda or a nested function (spawned children could not import it).
        ValueError: `world_size < 1` or `timeout <= 0`.
        RankError: a rank raised, returned something unpicklable, or died without reporting. Failures are listed
            in the order they reached the parent; the first is usually the cause, later ones often its echo
            (a peer's broken gloo connection).
        TimeoutError: not all ranks reported within `timeout` seconds.
    """
    _check_importable(fn)
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be > 0 seconds")
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method={start_method!r} is not one of ('forkserver', 'spawn')")

    store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout))
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))  # only read when the server first starts
    receivers, procs = [], []
    reports: dict[int, tuple[str, Any]] = {}
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child_main,
                args=(rank, world_size, store.port, timeout, send_end, fn, args, kwargs),
                name=f"avsd-rank{rank}",
                daemon=False,
            )
            proc.start()
            send_end.close()  # the child holds the only write end: EOF on recv_end means the child is gone
            receivers.append(recv_end)
            procs.append(proc)
        reports = _collect(receivers, procs, timeout)
    finally:
        _reap(procs, kill=len(reports) < len(procs) or any(st != "ok" for st, _ in reports.values()))
        for recv_end in receivers:
            recv_end.close()
        del store

    errors = [(rank, msg) for rank, (status, msg) in reports.items() if status != "ok"]
    if errors:
        where = f"{fn.__module__}.{fn.__qualname__}"
        parts = [f"rank {rank}/{world_size} failed in {where}:\n{msg}" for rank, msg in errors]
        raise RankError("\n".join(parts))
    missing = [rank for rank in range(world_size) if rank not in reports]
    if missing:
        raise TimeoutError(
            f"ranks {missing} of {world_size} did not report within timeout={timeout}s "
            f"(running {fn.__module__}.{fn.__qualname__}); all ranks were killed"
        )
    return [pickle.loads(reports[rank][1]) for rank in range(world_size)]


def init_megatron(
    tp: int = 1, pp: int = 1, *, seed: int = 1234, create_gloo_process_groups: bool = False, **parallel_kwargs: Any
) -> None:
    """In a `run_on_ranks` child: install the CPU patches, initialise Megatron's `parallel_state`, seed the RNGs.

    Args:
        tp: tensor_model_parallel_size.
        pp: pipeline_model_parallel_size; data parallel size is `world_size // (tp * pp)`.
        seed: passed to `model_parallel_cuda_manual_seed` (CPU RNG tracker states) and `torch.manual_seed`.
        create_gloo_process_groups: Megatron's duplicate gloo groups; off by default, since every group is gloo
            here already and each one costs a rendezvous. Turn on for code that asks for `*_group_gloo`.
        **parallel_kwargs: further keywords for `parallel_state.initialize_model_parallel`.
    Raises:
        RuntimeError: no default process group (not inside `run_on_ranks`), or Megatron already initialised.
        ValueError: `world_size` is not a multiple of `tp * pp`.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "init_megatron() must run inside a run_on_ranks() child (no default process group here); "
            "it patches torch.cuda for the rest of the process"
        )
    world_size = dist.get_world_size()
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world_size={world_size} is not a multiple of tp*pp={tp}*{pp}")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from avsd_megatron.runtime.megatron_cpu import install

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("Megatron parallel_state is already initialised in this process; call init_megatron once")
    install()  # for the rest of this child process; the process exits after the launch
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        create_gloo_process_groups=create_gloo_process_groups,
        **parallel_kwargs,
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def _check_importable(fn: Callable[..., Any]) -> None:
    """Spawned children import `fn` by module and qualified name; reject what they could not find."""
    qualname = getattr(fn, "__qualname__", "")
    if not callable(fn) or "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(
            f"run_on_ranks needs a module-level function (spawned ranks import it by name); got {fn!r}. "
            "Move it to module level in an importable module (e.g. a test file in the tests package)."
        )


def _child_main(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    conn: multiprocessing.connection.Connection,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Entry point of one rank: own process group, gloo init, run `fn`, report, tear down."""
    os.setpgid(0, 0)  # own process group: the parent can kill this rank together with anything it spawned
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    report: tuple[str, Any]
    try:
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
        result = fn(*args, **kwargs)
        try:
            report = ("ok", pickle.dumps(result))
        except Exception as exc:  # noqa: BLE001 - reported to the parent with the type of the bad value
            report = ("error", f"return value of type {type(result).__name__} is not picklable: {exc!r}")
    except BaseException:  # noqa: BLE001 - every failure, SystemExit included, goes to the parent
        report = ("error", traceback.format_exc())
    finally:
        teardown_error = _teardown()
    if teardown_error and report[0] == "ok":
        report = ("error", f"teardown failed:\n{teardown_error}")
    conn.send(report)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()


def _teardown() -> str | None:
    """Destroy Megatron's groups (if it was initialised) and the default process group; return a traceback or None."""
    try:
        parallel_state = sys.modules.get("megatron.core.parallel_state")
        if parallel_state is not None and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        return traceback.format_exc()
    return None


def _collect(
    receivers: list[multiprocessing.connection.Connection], procs: list[Any], timeout: float
) -> dict[int, tuple[str, Any]]:
    """Wait for every rank's report; stop early (after a short grace) once one has failed or died."""
    deadline = time.monotonic() + timeout
    reports: dict[int, tuple[str, Any]] = {}
    open_ranks = set(range(len(procs)))
    while open_ranks:
        now = time.monotonic()
        if now >= deadline:
            break
        ready = multiprocessing.connection.wait([receivers[r] for r in open_ranks], timeout=deadline - now)
        for conn in ready:
            rank = receivers.index(conn)
            open_ranks.discard(rank)
            try:
                reports[rank] = conn.recv()
            except EOFError:
                procs[rank].join(1.0)
                reports[rank] = ("error", f"process exited with code {procs[rank].exitcode} without reporting")
        if any(status != "ok" for status, _ in reports.values()):
            deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
    return reports


def _reap(procs: list[Any], kill: bool) -> None:
    """Join the ranks; SIGKILL (whole process group) any still running, at once if `kill`, else after 10 s."""
    for proc in procs:
        if not kill:
            proc.join(10.0)
        if proc.is_alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the rank made itself a group leader: pgid == its pid
            except ProcessLookupError:  # killed before it ran setpgid: no such group yet
                proc.kill()
            proc.join()
