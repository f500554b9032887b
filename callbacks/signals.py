"""SIGINT (Ctrl-C), SIGTERM and SIGUSR1 stop a run at a batch boundary, so the last.ckpt saved there resumes exactly.

Lightning handles SIGTERM only this way (and SIGUSR1 under SLURM auto-requeue by saving from inside the signal
handler); a Ctrl-C raises KeyboardInterrupt wherever the step is, and the checkpoint saved then holds a half-done
step. Here all three signals go through one handler that only notes the signal; `trainer.received_sigterm` is set at
once on one process, and on several at the start of the next training batch, where the ranks agree on it (one
all-reduce: a collective inside a signal handler would meet whatever collective the other ranks are in, and ranks
stopping on their own flags would save a sharded checkpoint alone). Lightning's loops then stop every rank after the
same batch, ModelCheckpoint's `save_on_exception` saves last.ckpt there, and the process exits with 130 after
SIGINT (the shell's convention for Ctrl-C), 0 after SIGTERM or SIGUSR1. A second Ctrl-C stops at once, as Lightning
does (its checkpoint is then not exact). Under SLURM with auto-requeue (Lightning's default there), the requeue
signal (SIGUSR1 unless set otherwise) also requeues the job once last.ckpt is saved; the requeued job continues from
it with resume=auto on its command line. A launcher's handler of these signals or of submitit's preemption signal
(SIGUSR2, or SUBMITIT_PREEMPT_SIGNAL), e.g. submitit's requeue-and-exit, is called once last.ckpt is saved.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

log = logging.getLogger(__name__)


class StopOnSignal(L.Callback):
    """Installs `BatchBoundarySignals` on the trainer and has the ranks agree on a signal at each training batch."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning registers the connector's handlers after this hook, and has no public way to replace them.
        if not isinstance(trainer._signal_connector, BatchBoundarySignals):
            trainer._signal_connector = BatchBoundarySignals(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        trainer._signal_connector.agree()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # Lightning's stop (a SystemExit) on any of the signals
            signum = trainer._signal_connector.signum
            exception.code = 128 + signal.SIGINT if signum == signal.SIGINT else 0
            if signum is not None:  # what status.json records (framework/runner.finish)
                exception.add_note(f"{signal.Signals(signum).name} at a batch boundary")


class BatchBoundarySignals(_SignalConnector):
    def __init__(self, trainer: L.Trainer) -> None:
        super().__init__(trainer)
        # Set here too: a run that fails before Lightning registers the handlers still tears the connector down.
        self.noted: list[int] = []  # the signals received, first first
        self.requeue_signal: int | None = None
        self.deferred: dict = {}

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self.noted = []
        self._original_handlers = self._get_current_signal_handlers()
        environment = self.trainer._accelerator_connector.cluster_environment
        slurm = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        self.requeue_signal = environment.requeue_signal if slurm else None
        signals = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, self.requeue_signal} - {None}
        # A handler installed before, by a launcher (submitit's requeue on its preemption signal), runs once
        # last.ckpt is saved instead of in the middle of a step.
        launcher = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        self.deferred = {
            signum: handler
            for signum in signals | {launcher}
            if callable(handler := self._original_handlers.get(signum)) and handler is not signal.default_int_handler
        }
        for signum in signals | set(self.deferred):
            self._register_signal(signum, self.note)

    @property
    def signum(self) -> int | None:
        return self.noted[0] if self.noted else None

    def note(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.noted:
            raise KeyboardInterrupt
        if not self.noted:
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once, without an exact checkpoint)" if signum == signal.SIGINT else ""
            message = f"Received {name}: stopping at the next batch boundary, saving checkpoints/last.ckpt{again}"
            log.warning(rank_prefixed_message(message, self.trainer.local_rank))
        if signum not in self.noted:
            self.noted.append(signum)
        if self.trainer.world_size == 1:
            self.received_sigterm = True

    def agree(self) -> None:
        """Sets `received_sigterm` on every rank when any rank noted a signal; every rank calls it at the same point."""
        if not self.received_sigterm:
            self.received_sigterm = self.trainer.strategy.reduce_boolean_decision(bool(self.noted), all=False)

    def teardown(self) -> None:
        # After the checkpoint: on_exception has saved last.ckpt by the time Lightning tears the trainer down.
        stopped = self.noted if self.received_sigterm else []
        if self.requeue_signal in stopped and self.trainer.is_global_zero:
            requeue()
        super().teardown()
        for signum in stopped:
            if signum in self.deferred:
                self.deferred[signum](signum, None)


def requeue() -> None:
    """`scontrol requeue` this SLURM job (an array job's task), as Lightning's auto-requeue does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("requeueing SLURM job %s failed: %s", job, result.stderr.strip())
