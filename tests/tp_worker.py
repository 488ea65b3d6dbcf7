"""One rank of the tensor-parallel launch of tests/test_tensor_parallel.py:

    torchrun --nproc_per_node 2 tests/tp_worker.py PLAN.json

For every saved folder of the plan it loads the model with `tp_plan="auto"` (transformers shards it over the ranks),
records its logits and greedy generation, saves it again (rank 0 writes the gathered weights), and trains a few
steps (a plain AdamW loop, and the Trainer); rank 0 writes what it saw to `results.pt` in the plan's folder. A config
whose heads do not divide over the ranks is loaded last and must be refused before any weight is read.
"""

import json
import os
import sys
import warnings

import torch

torch.set_num_threads(1)  # 2 shared cores, one process per core

import hf_blueprint  # noqa: E402,F401  (registers the Blueprint models with the Auto classes)
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, Trainer  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM,
                "seq2seq": AutoModelForSeq2SeqLM}


def gathered(state_dict: dict) -> dict:
    return {name: (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()
            for name, tensor in state_dict.items()}


def train_with_a_plain_loop(model, batch: torch.Tensor, steps: int) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "weights": gathered(model.state_dict())}


def train_with_the_trainer(model, batch: torch.Tensor, steps: int, output_dir: str) -> dict:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from datasets import Dataset

    # lr 1e-3: AdamW turns the ~1e-7 gradient differences of the sharded sums on near-zero coordinates into update
    # differences proportional to lr (1.3e-5 after 4 steps at 3e-3 with gradient clipping; 4e-6 at 1e-3).
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True)
    # accelerate takes tensor parallelism (its ParallelismConfig) for accelerator ranks only: let the CPU ranks pass
    # for GPU ones at the one place it decides, so that the Trainer's whole TP path runs here as on GPUs.
    if args.world_size > 1:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    data = Dataset.from_dict({"input_ids": batch.tolist(), "labels": batch.tolist()})
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "weights": gathered(model.state_dict()), "tp_size": trainer.get_tp_size()}


def train_with_the_recipe(plan: dict, sharded: bool) -> dict:
    """The causal-LM recipe from the plan's checkpoint, with --tp_size 2 on the sharded launch."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
    import pretrain_causal_lm
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    parse_args = pretrain_causal_lm.parse_args

    def parse_then_pass_for_gpus(*args, **kwargs):  # as in train_with_the_trainer
        parsed = parse_args(*args, **kwargs)
        if sharded:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        return parsed

    pretrain_causal_lm.parse_args = parse_then_pass_for_gpus
    output_dir = os.path.join(plan["output_dir"], "recipe-tp" if sharded else "recipe-single")
    argv = ["--model_name_or_path", plan["recipe_model"], "--train_file", plan["recipe_text"], "--block_size", "16",
            "--max_steps", str(plan["steps"]), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--do_eval", "false", "--sample_max_new_tokens", "0",
            "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--log_level", "warning", "--output_dir", output_dir, "--tp_size", "2" if sharded else "1"]
    results = pretrain_causal_lm.main(argv)
    weights = load_file(os.path.join(output_dir, "model.safetensors")) if int(os.environ.get("RANK", 0)) == 0 else {}
    return {"train_loss": results.get("train_loss"), "weights": weights}


def main(plan_file: str):
    warnings.filterwarnings("ignore")
    plan = json.loads(open(plan_file).read())
    sharded = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    load = dict(tp_plan="auto") if sharded else {}
    ids = torch.tensor(plan["input_ids"])
    results = {}
    for case in plan["cases"]:
        model = AUTO_CLASSES[case["head"]].from_pretrained(case["folder"], **load).eval()
        inputs = dict(input_ids=ids)
        if case["head"] == "seq2seq":
            inputs["decoder_input_ids"] = ids[:, :4]
        entry = {"sharded": hasattr(model.get_output_embeddings().weight, "device_mesh")}
        with torch.no_grad():
            entry["logits"] = model(**inputs).logits
        if case["head"] != "masked_lm":
            entry["generated"] = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=-1)
        if case.get("save_to"):
            model.save_pretrained(case["save_to"] + ("" if sharded else "-single"))
        if case.get("train"):
            g = torch.Generator().manual_seed(0)
            batch = torch.randint(3, case["vocab_size"], (4, 12), generator=g)
            entry["plain_loop"] = train_with_a_plain_loop(model, batch, plan["steps"])
            trained = AUTO_CLASSES[case["head"]].from_pretrained(case["folder"], **load)
            entry["trainer"] = train_with_the_trainer(trained, batch, plan["steps"], plan["output_dir"])
        results[case["name"]] = entry
    results["recipe"] = train_with_the_recipe(plan, sharded)
    try:
        AutoModelForCausalLM.from_pretrained(plan["indivisible_folder"], **load)
        results["indivisible"] = "loaded"
    except ValueError as error:
        results["indivisible"] = str(error)
    if rank == 0:
        torch.save(results, os.path.join(plan["output_dir"], "results-tp.pt" if sharded else "results-single.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
