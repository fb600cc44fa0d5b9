"""``prefix-attn train`` under ``torchrun``: one process per device, data-parallel.

Detected from the environment torchrun sets (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); without it nothing here runs. Each process takes
``--batch-size`` N rows of every micro-batch of N x WORLD_SIZE the single process would run
(:meth:`Group.share`), and one all-reduce per step sums the prefixes' token-weighted
gradients, the loss and the token counts (:meth:`Group.reduce_step`): every rank then holds
the gradient of the whole step and takes the same optimizer step. The prefixes are small; no
DDP wrapper is needed. Rank 0 alone writes the output folder (:meth:`Group.on_main`, the
others waiting for its outcome); warnings and bars are rank 0's."""
from __future__ import annotations

import datetime
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch

from . import cli_args, train_state
from .train_state import PROG, TrainError

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("nccl", "gloo")


class Agreed(Exception):
    """Another rank failed before the run started, and said so: exit with ``code``, silently."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def launched() -> bool:
    """Whether torchrun (or another launcher setting ``WORLD_SIZE`` > 1) started this process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return True  # start() names the bad value


def env_rank() -> int:
    """This process's ``RANK`` (0 outside torchrun, or when unreadable: start() says why)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _env_int(key: str) -> int:
    value = os.environ.get(key)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TrainError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for a multi-process run, but "
                         f"{key}={value!r} is not a number: start the run with torchrun "
                         "(torchrun --nproc-per-node N -m prefix_attn.cli train ...)") from None


def start(device_name: Optional[str], backend: Optional[str]) -> Optional["Group"]:
    """The process group of a torchrun launch (None without one: ``--dist-backend`` is then
    ignored). ``--device cuda`` takes ``cuda:LOCAL_RANK``; the backend is ``backend``, by default
    nccl on CUDA and gloo on the CPU. A :class:`TrainError` for a device or backend that cannot
    work, and for a process group that does not start (naming MASTER_ADDR / MASTER_PORT)."""
    if not launched():
        return None
    world, rank, local = (_env_int(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    device = torch.device("cpu")
    if device_name is not None:
        device, problem = cli_args.device_problem(device_name)
        if problem is not None:
            raise TrainError(problem)
    if device.type == "cuda":
        if device.index is not None:
            raise _alike(TrainError(f"--device {device_name}: under torchrun each process takes the GPU of its "
                                    f"LOCAL_RANK: pass --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)"))
        count = torch.cuda.device_count()
        if local >= count:
            raise TrainError(f"--device cuda: LOCAL_RANK {local}, but this machine shows {count} GPU"
                             f"{'' if count == 1 else 's'}: run at most {count} processes per node "
                             "(torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise _alike(TrainError("--dist-backend nccl needs --device cuda (NCCL runs on GPUs only); on the CPU "
                                "use --dist-backend gloo (the default there)"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import torch.distributed as dist

    if not dist.is_available():
        raise _alike(TrainError(f"WORLD_SIZE={world}: this torch has no torch.distributed"))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    except Exception as exc:  # a missing variable, an unreachable or busy address, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ENV)
        raise TrainError(f"cannot start the process group ({backend}; {where}): {reason}; start the run "
                         "with torchrun, or check that MASTER_ADDR:MASTER_PORT is this run's rendezvous "
                         "address, reachable from every node") from None
    return Group(rank, world, local, device, backend)


def _alike(exc: TrainError) -> TrainError:
    """``exc``, an error of the options every rank reaches alike before the process group
    exists: said by rank 0 alone (each rank saying it printed it once per process)."""
    exc.everywhere = True
    return exc


class Group:
    """This process's place in the run and the collectives the trainer needs. Every method
    that communicates is called by all ranks at the same point."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device, backend: str):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.backend = device, backend
        self.main = rank == 0
        # the tensors exchanged: on the GPU for nccl, on the CPU for gloo
        self._comm = device if backend == "nccl" else torch.device("cpu")
        self.started = False  # set by agree(): from then on a failure of one rank is its own
        self.stop: Optional[int] = None  # the signal every rank stops for, agreed at each step
        self.together = False  # every rank ends on the same error (set by report())
        train_state.set_quiet(not self.main)

    # -- the run's start -----------------------------------------------------------------
    def agree(self, code: int) -> List[int]:
        """Every rank's status (0: ready to write) at the one point before anything is
        written; a failing rank calls it from its error handler, the others on their way."""
        import torch.distributed as dist

        codes = torch.zeros(self.world, dtype=torch.float64, device=self._comm)
        codes[self.rank] = code
        dist.all_reduce(codes)
        self.started = True
        return [int(c) for c in codes.tolist()]

    def ready(self) -> None:
        """:meth:`agree` of a rank whose checks passed; :class:`Agreed` when another's failed."""
        failed = [c for c in self.agree(0) if c]
        if failed:
            raise Agreed(failed[0])

    def report(self, kind: str, message: str, code: int, everywhere: bool) -> int:
        """Say an error once and return the exit status every rank shares: before the start,
        the first failing rank's (its message, other ranks silent); after it, rank 0's for an
        error every rank reached (``everywhere``), else this rank's own, naming it."""
        self.together = everywhere or not self.started
        if not self.started:
            codes = self.agree(code)
            first = next(r for r, c in enumerate(codes) if c)
            if first == self.rank:
                _say(kind, message)
            return codes[first]
        if everywhere:
            if self.main:
                _say(kind, message)
        else:
            _say(kind, f"rank {self.rank}: {message}")
        return code

    # -- steps ---------------------------------------------------------------------------
    def share(self, batch: Sequence, size: int) -> list:
        """This rank's rows of a step's ``batch``: of each slice of ``size`` x WORLD_SIZE rows
        (a micro-batch of the single process with ``--batch-size`` ``size`` x WORLD_SIZE), the
        rank-th ``size`` (fewer, or none, in a short last slice)."""
        span = size * self.world
        return [row for at in range(0, len(batch), span)
                for row in batch[at + self.rank * size:at + (self.rank + 1) * size]]

    def reduce_step(self, params: Sequence[torch.nn.Parameter], loss_sum: Optional[torch.Tensor],
                    learnt: int, tokens: int, stepped: bool, received: Optional[int]):
        """One all-reduce of a step: each parameter's gradient (the sum of its token losses
        here; None where no rank's rows reached it) becomes the sum over ranks divided by the
        step's learnt tokens, as one process computing the whole step gives. Returns (mean
        token loss, tokens run, whether any rank reached a prefix); sets :attr:`stop` to the
        signal some rank received (the largest number), None when none did."""
        import torch.distributed as dist

        f64 = dict(dtype=torch.float64, device=self._comm)
        grads = [torch.zeros(p.numel(), **f64) if p.grad is None else p.grad.detach().reshape(-1).to(**f64)
                 for p in params]
        flags = [float(p.grad is not None) for p in params]
        loss = torch.zeros(1, **f64) if loss_sum is None else loss_sum.detach().reshape(1).to(**f64)
        signals = train_state.StopSignals.SIGNALS
        counts = torch.tensor(flags + [learnt, tokens, float(stepped)] + [float(received == s) for s in signals],
                              **f64)
        flat = torch.cat(grads + [loss, counts])
        dist.all_reduce(flat)
        at = 0
        total_learnt = float(flat[-len(signals) - 3])
        for p, flag in zip(params, flat[-len(counts):-len(counts) + len(params)].tolist()):
            part = flat[at:at + p.numel()]
            at += p.numel()
            p.grad = (part / total_learnt).view_as(p).to(p.device, p.dtype) if flag else None
        tail = flat[-len(signals) - 3:].tolist()
        stops = [int(s) for s, n in zip(signals, tail[3:]) if n]
        self.stop = max(stops) if stops else None
        mean = float(flat[at]) / total_learnt if total_learnt else float("nan")
        return mean, int(tail[1]), tail[2] > 0

    def sum(self, values: Sequence[float]) -> List[float]:
        """``values`` summed over the ranks (float64)."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's values of ``params`` on every rank (they start the same, drawn from --seed
        or loaded from the checkpoint; this makes sure)."""
        import torch.distributed as dist

        for p in params:
            t = p.data.to(self._comm)
            dist.broadcast(t, 0)
            p.data.copy_(t)

    # -- the output folder ---------------------------------------------------------------
    def on_main(self, write: Callable[[], object]) -> None:
        """``write()`` on rank 0, the others waiting for its outcome: its error raises there,
        and :class:`Agreed` (silent, rank 0's exit status) on the others."""
        failed = 0
        error = None
        if self.main:
            try:
                write()
            except (Exception, train_state.Interrupted) as exc:
                failed, error = _status(exc), exc
        failed = int(self.sum([failed])[0])
        if failed:
            if error is not None:
                error.everywhere = True  # said by rank 0; the others exit with Agreed
                raise error
            raise Agreed(failed)

    def close(self, wait: bool) -> None:
        """End the process group (after a barrier with ``wait``: every rank ends here)."""
        import torch.distributed as dist

        train_state.set_quiet(False)
        if not dist.is_initialized():
            return
        try:
            if wait:
                dist.barrier()
        except Exception:  # a peer that already left (a signal it took after an all-reduce, while
            pass  # this rank agreed on the stop): the exit status is decided; gloo says "reset by peer"
        finally:
            dist.destroy_process_group()


def _say(kind: str, message: str) -> None:
    print(f"{PROG}: {kind}: {message}", file=sys.stderr)


def _status(exc: BaseException) -> int:
    """The exit status ``prefix-attn train`` gives for ``exc``."""
    if isinstance(exc, train_state.Interrupted):
        return 128 + exc.signum
    return 2 if isinstance(exc, TrainError) else 1
