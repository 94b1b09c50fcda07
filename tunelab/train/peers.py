"""When one process of a multi-process run fails, every process exits non-zero, and the message names the rank.

Each failing process leaves one line in the process group's key-value store (torchrun's agent hosts it, so it
outlives the processes). A process whose collective fails because a peer vanished reads the store: a peer that
wrote a reason is quoted; one that wrote nothing (kill -9, the OOM killer) is named as silent. A user error every
process meets alike (a missing model folder) is printed once, by rank 0; the others exit quietly with its code.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from tunelab.errors import TrainingError, TunelabError
from tunelab.train.parallel import Parallel

_KEY = "tunelab/failed/{}"
_LOST = "lost contact with the other processes"
_COMM_WORDS = ("Connection reset", "Connection closed", "Broken pipe", "NCCL", "ProcessGroup", "timed out",
               "Socket Timeout", "connection refused")


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _post(rank: int, msg: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.set(_KEY.format(rank), msg)
        except (RuntimeError, OSError):  # the store's host is gone too: nothing to tell
            pass


def _posted(ranks: range | list[int], wait_s: float) -> dict[int, str]:
    """What these ranks wrote, waiting up to `wait_s` for those that have not written yet."""
    store = _store()
    found: dict[int, str] = {}
    if store is None:
        return found
    end = time.monotonic() + wait_s
    while True:
        for r in ranks:
            key = _KEY.format(r)
            try:
                if r not in found and store.check([key]):
                    found[r] = store.get(key).decode()
            except (RuntimeError, OSError):
                return found
        if len(found) == len(ranks) or time.monotonic() > end:
            return found
        time.sleep(0.1)


def is_comm_failure(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError)
                                             and any(w in str(e) for w in _COMM_WORDS))


def explain(par: Parallel, wait_s: float = 3.0) -> str:
    """Why this process lost its peers: the first rank that wrote a reason, or the ranks that wrote nothing."""
    _post(par.rank, _LOST)
    posted = _posted(range(par.world_size), wait_s)
    failed = {r: m for r, m in posted.items() if m != _LOST}
    if failed:
        r = min(failed)
        return f"rank {r} failed: {failed[r]} (rank {par.rank} stops too)"
    silent = [str(r) for r in range(par.world_size) if r not in posted]
    if silent:
        who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(silent)}"
        return (f"{who} of this run ended without an error message (killed? out of memory?); rank {par.rank} stops "
                "too. Continue from the last checkpoint with --resume")
    return f"rank {par.rank} {_LOST} of this run"


@contextmanager
def guard(par: Parallel) -> Iterator[None]:
    """Wrap a whole run: a failing process tells the others why; a user error that rank 0 reports as well is
    left to rank 0 to print."""
    if not par.enabled:
        yield
        return
    try:
        yield
    except TunelabError as e:
        _ignore_sigterm()  # this process is ending; torchrun's agent must not cut its message short
        _post(par.rank, str(e))
        if not par.is_main and _posted([0], 3.0).get(0) == str(e):
            raise SystemExit(e.exit_code) from None
        raise
    except Exception as e:
        _ignore_sigterm()
        _post(par.rank, (str(e).splitlines() or [type(e).__name__])[0][:300])
        raise


@contextmanager
def named_failures(par: Parallel) -> Iterator[None]:
    """Inside the run: a collective that failed because a peer went away becomes one line naming that peer."""
    if not par.enabled:
        yield
        return
    try:
        yield
    except Exception as e:
        if not is_comm_failure(e):
            raise
        old = _ignore_sigterm()  # torchrun's agent is tearing the run down: say why first
        try:
            raise TrainingError(explain(par)) from None
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)


def _ignore_sigterm():
    try:
        return signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        return None
