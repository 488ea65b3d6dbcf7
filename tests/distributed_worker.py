"""One rank of a multi-process launch of tests/test_distributed.py: runs recipes, as a user would, and records what
each rank saw.

    torchrun --nproc_per_node 2 tests/distributed_worker.py PLAN.json

PLAN.json (written by the test) holds `runs`, a list of `{"recipe": "pretrain_causal_lm", "argv": [...]}` run one
after the other in this process through the recipe's own `main(argv)`, and `results_dir`, where each rank writes
`rank<N>.json`: for every Trainer.train call, the world size and wrapper the Trainer used, digests of the weights and
tokenizer this rank holds, and how the parameters are sharded. The file is rewritten as each run starts and ends,
so a launch that is killed still leaves what it saw.

Optional keys of the plan:
- `fsdp_on_cpu`: accelerate turns FSDP on only for accelerator devices (on CPU it silently trains with DDP). This
  makes the CPU ranks pass for GPU ones at the one place accelerate decides, so that the Trainer's whole FSDP2 path
  (wrapping by `_no_split_modules`, sharded parameters, state-dict gathering on save) runs here as on GPUs.
- `stall_in_checkpoint`: N: rank 0 writes half of checkpoint-N's weights, leaves a `stalled` file, and waits to be
  killed (a kill -9 landing mid-save).
- `sharded_generate`: token ids; after the runs, every rank takes part in a greedy `generate()` continuing them
  with the last trained model, sharded (FSDP2, ZeRO-3): each forward gathers the parameters from all ranks, so all
  ranks must call it.
"""

import hashlib
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)  # before any work: 2 shared cores, one process per core

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(TESTS_DIR), "recipes"))

import transformers  # noqa: E402

import finetune_classification  # noqa: E402
import pretrain_causal_lm  # noqa: E402

RECIPES = {"pretrain_causal_lm": pretrain_causal_lm, "finetune_classification": finetune_classification}


def tensor_digest(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def local(parameter: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a parameter: the shard of an FSDP2 DTensor or of a ZeRO-3 parameter, else all of it."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter


def global_numel(parameter: torch.Tensor) -> int:
    return parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()


def describe_model(trainer) -> dict:
    """What this rank holds after training: wrapper, sharding, and digests of its weights."""
    from torch.distributed.fsdp import FSDPModule

    model = trainer.model
    wrapped = trainer.model_wrapped
    parameters = list(model.named_parameters())
    shards = {name: {"local": local(p).numel(), "global": global_numel(p)} for name, p in parameters}
    description = {
        "wrapper": type(wrapped).__name__,
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "parameter_names": [name for name, _ in parameters],
        "shards": shards,
        "local_weights_sha256": tensor_digest(local(p) for _, p in parameters),
        "fsdp_units": {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, FSDPModule)},
    }
    if hasattr(model, "lm_head"):
        description["lm_head_tied"] = model.lm_head.weight is model.get_input_embeddings().weight
    if trainer.processing_class is not None:
        vocab = json.dumps(sorted(trainer.processing_class.get_vocab().items())).encode()
        description["tokenizer_sha256"] = hashlib.sha256(vocab).hexdigest()
    return description


class Recorder:
    """Wraps Trainer.train (the recipes build their Trainer inside `run`) to note what every call saw."""

    def __init__(self, results_dir: str, rank: int):
        self.path = os.path.join(results_dir, f"rank{rank}.json")
        self.rank = rank
        self.runs: list[dict] = []
        self.trainers = []
        self.extra: dict = {}

    def write(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump({"rank": self.rank, "runs": self.runs, **self.extra}, f, indent=1)
        os.replace(self.path + ".tmp", self.path)

    def install(self):
        original = transformers.Trainer.train
        recorder = self

        def train(trainer, *args, **kwargs):
            record = {"world_size": trainer.args.world_size, "process_index": trainer.args.process_index,
                      "torch_world_size": torch.distributed.get_world_size()
                      if torch.distributed.is_initialized() else 1,
                      "device": str(trainer.args.device)}
            if kwargs.get("resume_from_checkpoint"):
                record["resumed_from"] = os.path.basename(str(kwargs["resume_from_checkpoint"]))
            recorder.runs.append(record)
            recorder.trainers.append(trainer)
            recorder.write()
            output = original(trainer, *args, **kwargs)
            record.update(describe_model(trainer), finished=True, global_step=trainer.state.global_step)
            recorder.write()
            return output

        transformers.Trainer.train = train


def pass_cpu_ranks_for_gpu_ones(recipe):
    """After the recipe parsed its flags (TrainingArguments set up a MULTI_CPU gloo group), let accelerate see the
    distributed type of GPU ranks, the only ones for which it enables the FSDP plugin of `accelerate launch`."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    parse_args = recipe.parse_args

    def parse_then_pass_for_gpus(*args, **kwargs):
        parsed = parse_args(*args, **kwargs)
        assert PartialState().distributed_type == DistributedType.MULTI_CPU, PartialState().distributed_type
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        return parsed

    recipe.parse_args = parse_then_pass_for_gpus


def stall_in_checkpoint(step: int, results_dir: str):
    """Rank 0 leaves checkpoint-`step`'s weights half-written and waits for the kill."""
    import transformers.modeling_utils as modeling_utils

    real_save = modeling_utils.safe_save_file
    folder = f"{os.sep}checkpoint-{step}{os.sep}"

    def stalling_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if folder in str(filename):
            with open(filename, "rb") as f:
                data = f.read()
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            with open(os.path.join(results_dir, "stalled"), "w") as f:
                f.write(str(filename))
            time.sleep(600)

    modeling_utils.safe_save_file = stalling_save


def sharded_generate(trainer, prompt: list) -> list:
    """Greedy decoding of a model whose parameters are sharded across the ranks. Every rank calls generate(): each
    forward gathers the shards from all ranks, and transformers keeps the ranks' decoding loops in step
    (synced_gpus, on by default under FSDP and ZeRO-3)."""
    model = trainer.model
    model.eval()
    prompt = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                pad_token_id=model.config.pad_token_id)
    return output[0].tolist()


def main(plan_path: str):
    with open(plan_path) as f:
        plan = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    recorder = Recorder(plan["results_dir"], rank)
    recorder.install()
    if plan.get("stall_in_checkpoint") and rank == 0:
        stall_in_checkpoint(plan["stall_in_checkpoint"], plan["results_dir"])
    if plan.get("fsdp_on_cpu"):
        for recipe in RECIPES.values():
            pass_cpu_ranks_for_gpu_ones(recipe)
    for run in plan["runs"]:
        recipe = RECIPES[run["recipe"]]
        results = recipe.main(run["argv"])
        recorder.runs[-1]["recipe_results"] = {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
        recorder.write()
    if plan.get("sharded_generate"):
        recorder.extra["generated"] = sharded_generate(recorder.trainers[-1], plan["sharded_generate"])
        recorder.write()


if __name__ == "__main__":
    main(sys.argv[1])
