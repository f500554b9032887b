"""Multi-process jobs under Hydra, multiruns included (lightning-hydra-template issue 393).

Lightning starts DDP ranks 1..N-1 by running the launching command again. Under Hydra it reuses `sys.argv`
and `hydra.run.dir`, which in a multirun (`python run.py -m trainer=ddp_sim seed=1,2`) restarts the whole sweep
in every rank and points the ranks at a run dir that is not the job's. `job_command` starts one rank of the
current job instead: run.py with that job's own overrides, writing into the job's dir.

A multirun also runs its jobs one after another in one process, so a job must leave that process as it found
it: `isolated_job` restores the environment Lightning changes for its ranks (with LOCAL_RANK left set, the next
job's trainer believes its ranks were started by torchrun and waits for them) and ends the process group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

ENTRY_POINT = Path(__file__).resolve().parents[1] / "run.py"
# What tells Lightning that a process is one rank of a job (its own launcher, torchrun, SLURM)
RANK_VARIABLES = (
    "LOCAL_RANK",
    "NODE_RANK",
    "RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
)


def job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working dir for DDP rank `local_rank` of the running Hydra job (single run or multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra = HydraConfig.get()
    command = [
        sys.executable,
        str(ENTRY_POINT),
        *hydra.overrides.task,
        f'hydra.run.dir="{hydra.runtime.output_dir}"',  # quoted: Hydra's override grammar
        f"hydra.job.name={hydra.job.name}_rank_{local_rank}",
        "hydra.output_subdir=null",
    ]  # rank 0 alone writes .hydra/
    return command, get_original_cwd()


def use_job_command_for_ranks() -> None:
    """Make Lightning's script launcher start ranks with `job_command` (it looks the function up when it starts
    them, so replacing the module attribute is enough)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = job_command


def single_process_environment() -> dict[str, str]:
    """os.environ without the variables that make Lightning treat a process as a rank of a distributed job: for a
    separate job started from one rank (e.g. training the shapes classifier to explain), which must not join it."""
    return {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}


@contextmanager
def isolated_job() -> Iterator[None]:
    """Run a job; afterwards restore os.environ and end the process group, ready for the next job."""
    environment = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
