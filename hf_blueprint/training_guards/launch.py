"""Multi-process launches on machines without GPUs: one DDP run over gloo, or a clear stop, never N lone runs."""

from __future__ import annotations

import logging
import os

import torch


logger = logging.getLogger(__name__)


class DistributedLaunchError(RuntimeError):
    """A multi-process launch that would not train as one run (see `prepare_distributed_launch`)."""


# How a launcher tells a process the size of the run: torchrun, `accelerate launch --multi_gpu` and the deepspeed
# launcher set WORLD_SIZE; mpirun (`accelerate launch --mpirun_hostfile`) sets its own variables.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

CPU_LAUNCH_HELP = (
    "On a machine without GPUs, start one process per rank through torchrun, directly or through accelerate:\n"
    "    torchrun --nproc_per_node N recipes/<recipe>.py ...\n"
    "    accelerate launch --multi_gpu --num_processes N recipes/<recipe>.py ...\n"
    "and the recipe trains with DDP over gloo (README, 'Scaling out')."
)


def launched_world_size(environ=None) -> int:
    """The number of processes the launcher started for this run (1 when there is no launcher)."""
    environ = os.environ if environ is None else environ
    for name in WORLD_SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise DistributedLaunchError(f"Environment variable {name}={value!r}: expected a whole number of "
                                             f"processes.") from None
    return 1


def prepare_distributed_launch(use_cpu: bool = False, environ=None) -> bool:
    """Before `TrainingArguments` is built: whether this process must train on the CPU for the launched processes to
    train as one run. True means "add `--use_cpu true`"; a launch that cannot be one run raises.

    Two launches go wrong on a machine without GPUs, with no more than a warning from accelerate or transformers:

    - torchrun (or `accelerate launch --multi_gpu`, or a DeepSpeed launch) without `--use_cpu`: every rank sets
      itself up as a single, non-distributed process, so N copies train alone on the full data and overwrite each
      other's output. With `--use_cpu true` the ranks join a gloo process group and train with DDP (or DeepSpeed).
    - `accelerate launch --cpu --num_processes N` (or a MULTI_CPU accelerate config, or `--num_processes N` without
      GPUs): accelerate starts ONE process, which would train alone. Nothing can turn it into N processes from the
      inside, so this raises `DistributedLaunchError` saying how to launch instead.

    `use_cpu` is the value of the Trainer flag; `environ` defaults to `os.environ`.
    """
    environ = os.environ if environ is None else environ
    world_size = launched_world_size(environ)
    if world_size == 1:
        # accelerate's single-process launcher exports ACCELERATE_USE_CPU always, and MASTER_ADDR only when it was
        # asked for more than one process or machine; a real distributed launch also exports the world size.
        if "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ and "LOCAL_RANK" not in environ:
            raise DistributedLaunchError(
                "`accelerate launch` was asked for several processes (--num_processes, --num_machines or a "
                "MULTI_CPU config) but started only this one, which would train alone: accelerate starts one "
                "process per rank only through its torchrun-based launchers (--multi_gpu, --use_fsdp, "
                "--use_deepspeed) or mpirun (--mpirun_hostfile).\n" + CPU_LAUNCH_HELP
                + "\n(If you meant to run a single process, unset MASTER_ADDR.)"
            )
        return False
    if use_cpu or _truthy(environ.get("ACCELERATE_USE_CPU")) or _has_accelerator():
        return False
    logger.info(f"{world_size} processes launched on a machine without GPUs: training on the CPU over gloo "
                f"(--use_cpu true).")
    return True


def check_distributed_launch(training_args, environ=None) -> None:
    """After `TrainingArguments` is built: every launched process must see the same run of `launched_world_size`
    processes. Raises `DistributedLaunchError` otherwise (a rank that believes it is alone)."""
    environ = os.environ if environ is None else environ
    launched = launched_world_size(environ)
    if launched > 1 and training_args.world_size != launched:
        raise DistributedLaunchError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but this one sees a run of "
            f"{training_args.world_size} process(es) (distributed type: "
            f"{getattr(training_args.distributed_state, 'distributed_type', None)}): each would train alone. "
            f"Without GPUs pass --use_cpu true.\n" + CPU_LAUNCH_HELP
        )
    if launched > 1 and (training_args.fsdp or _truthy(environ.get("ACCELERATE_USE_FSDP"))) \
            and training_args.device.type == "cpu":
        logger.warning("FSDP was requested, but accelerate runs FSDP on GPUs only: on the CPU this run trains with "
                       "DDP (a full copy of the model on every rank).")


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, NPU, ...
    if accelerator is not None and accelerator.is_available():
        return True
    return torch.cuda.is_available()

