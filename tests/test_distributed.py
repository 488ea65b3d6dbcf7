"""Multi-process training (issue 4), on CPUs: 2 processes over gloo, launched the way users launch GPU runs.

Each launch costs ~10 s of imports, so each runs several recipe trainings and the tests below assert on what its
ranks recorded (tests/distributed_worker.py writes one JSON file per rank):

- `killed_launch`: `accelerate launch --config_file recipes/accelerate/ddp.yaml`, the causal-LM recipe (checkpoints
  every 2 steps), killed with SIGKILL (every process) while rank 0 is halfway through writing checkpoint-6.
- `ddp_launch`: torchrun, no --use_cpu (the package's launch guard must make the ranks one DDP run): the killed run
  resumed with --resume_from_checkpoint true, the same run uninterrupted, and the classification recipe.
- `fsdp_launch`: `accelerate launch --config_file recipes/accelerate/fsdp2.yaml`, the causal-LM recipe through the
  Trainer's FSDP2 path (accelerate enables FSDP only for GPUs: the worker lets the CPU ranks pass for GPU ones).
- `zero3_launch` (opt-in, BLUEPRINT_RUN_DEEPSPEED=1): DeepSpeed ZeRO-3 through recipes/accelerate/deepspeed_zero3.yaml.

Every multi-process result is compared with the same recipe run in this process at the same global batch (8: one
process x 8, or two x 4). Models are tiny and dropout-free, so the only difference is the order of float sums.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

import hf_blueprint
from hf_blueprint.training_guards import (
    DistributedLaunchError,
    check_distributed_launch,
    checkpoint_problems,
    is_complete_checkpoint,
    prepare_distributed_launch,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE_CONFIGS = RECIPES / "accelerate"
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"

sys.path.insert(0, str(RECIPES))
import finetune_classification  # noqa: E402
import pretrain_causal_lm  # noqa: E402

TOLERANCE = 1e-5
STEPS = 8
GLOBAL_BATCH = 8
PROMPT = [5, 6, 7, 8]  # token ids continued greedily by sharded and gathered models alike
LAUNCH_TIMEOUT = 300
TINY = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64,"
        "hidden_dropout_prob=0.0,attention_dropout=0.0,activation_dropout=0.0")
COMMON = ["--max_steps", str(STEPS), "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "0",
          "--log_level", "warning", "--disable_tqdm", "true", "--report_to", "none", "--dataloader_num_workers", "0",
          "--dataloader_pin_memory", "false", "--ddp_find_unused_parameters", "false"]


# =====================================================================================================================
# Data, recipe arguments, launching
# =====================================================================================================================


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """20,000 characters of tinyshakespeare; 400 SST-2 training rows and 64 dev rows."""
    folder = tmp_path_factory.mktemp("data")
    shakespeare = folder / "shakespeare.txt"
    shakespeare.write_text((RECIPES / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:20000])
    train = (RECIPES / "data/sst2/train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    dev = (RECIPES / "data/sst2/dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "train.tsv").write_text("".join(train[:401]))
    (folder / "dev.tsv").write_text("".join(dev[:65]))
    return {"shakespeare": str(shakespeare), "train": str(folder / "train.tsv"), "dev": str(folder / "dev.tsv")}


def causal_argv(data, output_dir, processes: int, *extra) -> list:
    return ["--train_file", data["shakespeare"], "--tokenizer_type", "char", "--block_size", "32",
            "--config_overrides", TINY, "--do_eval", "false", "--sample_max_new_tokens", "0",
            "--save_steps", "2", *COMMON, "--per_device_train_batch_size", str(GLOBAL_BATCH // processes),
            "--output_dir", str(output_dir), *extra]


def classification_argv(data, output_dir, processes: int) -> list:
    return ["--train_file", data["train"], "--validation_file", data["dev"], "--tokenizer_vocab_size", "300",
            "--config_overrides", TINY, "--save_strategy", "no", *COMMON,
            "--per_device_train_batch_size", str(GLOBAL_BATCH // processes), "--per_device_eval_batch_size", "16",
            "--output_dir", str(output_dir)]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun() -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port


def accelerate_launch(config: str) -> list:
    # --mixed_precision no: the shipped configs ask for bf16, meant for GPUs.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", free_port()]


def launch_env() -> dict:
    """The environment of a user's shell without GPUs: no launcher variables, nothing that forces the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TORCH_EXTENSIONS_DIR=os.environ.get(
                   "TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")))
    return env


def write_plan(folder: Path, runs: list, **options) -> Path:
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"results_dir": str(folder), "runs": runs, **options}))
    return plan


def read_ranks(folder: Path) -> list:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def launch(command: list, folder: Path, runs: list, **options) -> dict:
    """Runs a 2-process launch of the worker to completion; returns its output and what each rank recorded."""
    plan = write_plan(folder, runs, **options)
    result = subprocess.run([*command, str(WORKER), str(plan)], cwd=ROOT, env=launch_env(), capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return {"output": output, "ranks": read_ranks(folder)}


def saved_weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def logged_losses(folder) -> list:
    history = json.loads((Path(folder) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> dict:
    """The reference: each recipe in this process (one rank, batch 8)."""
    import datasets
    import logging
    import transformers

    folder = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The recipes set library verbosity and logger levels, as transformers' examples do; other test files must not
    # see that.
    loggers = [logging.getLogger(name) for name in ("hf_blueprint", "__main__", None)]
    levels = (transformers.logging.get_verbosity(), datasets.logging.get_verbosity(), [lg.level for lg in loggers])
    try:
        causal = pretrain_causal_lm.main(causal_argv(data, folder / "causal", 1))
        classification = finetune_classification.main(classification_argv(data, folder / "classification", 1))
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(levels[0])
        datasets.logging.set_verbosity(levels[1])
        for logger, level in zip(loggers, levels[2]):
            logger.setLevel(level)
    return {"causal": folder / "causal", "classification": folder / "classification",
            "causal_results": causal, "classification_results": classification}


@pytest.fixture(scope="module")
def ddp_launch(killed_launch, data, tmp_path_factory) -> dict:
    """One torchrun launch, three runs: the killed run resumed (on a copy of what it left), the same run from
    scratch and uninterrupted, and the classification recipe."""
    folder = tmp_path_factory.mktemp("ddp")
    shutil.copytree(killed_launch["output_dir"], folder / "resumed")
    runs = [{"recipe": "pretrain_causal_lm",
             "argv": causal_argv(data, folder / "resumed", 2, "--resume_from_checkpoint", "true")},
            {"recipe": "pretrain_causal_lm", "argv": causal_argv(data, folder / "causal", 2)},
            {"recipe": "finetune_classification", "argv": classification_argv(data, folder / "classification", 2)}]
    result = launch(torchrun(), folder, runs)
    return {**result, "resumed": folder / "resumed", "causal": folder / "causal",
            "classification": folder / "classification"}


@pytest.fixture(scope="module")
def fsdp_launch(data, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp2")
    # The recipe's own end-of-run sample too: with sharded parameters both ranks must generate it together.
    argv = causal_argv(data, folder / "causal", 2, "--sample_max_new_tokens", "8", "--sample_do_sample", "false")
    runs = [{"recipe": "pretrain_causal_lm", "argv": argv}]
    result = launch(accelerate_launch("fsdp2.yaml"), folder, runs, fsdp_on_cpu=True, sharded_generate=PROMPT)
    return {**result, "causal": folder / "causal"}


def run_of(launch_result: dict, index: int) -> list:
    """Run `index` of a launch, as each of the two ranks recorded it."""
    return [rank["runs"][index] for rank in launch_result["ranks"]]


FAMILIES = {"causal_lm": ("causal", 1), "classification": ("classification", 2)}  # folder, run of ddp_launch


# =====================================================================================================================
# 1. DDP through torchrun: one run of two ranks, identical replicas, the numbers of one process
# =====================================================================================================================


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_ranks_form_one_run_without_use_cpu(family, ddp_launch):
    # torchrun on a machine without GPUs, and no --use_cpu: the launch guard must put both ranks in one gloo group.
    for rank, run in enumerate(run_of(ddp_launch, FAMILIES[family][1])):
        assert (run["world_size"], run["torch_world_size"], run["process_index"]) == (2, 2, rank)
        assert run["device"].startswith("cpu") and run["distributed_type"] == "DistributedType.MULTI_CPU"
        assert run["wrapper"] == "DistributedDataParallel"
        assert run["find_unused_parameters"] is False  # and DDP raised nothing: no head leaves a parameter unused
        assert run["global_step"] == STEPS


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_ranks_end_with_identical_weights_and_tokenizer(family, ddp_launch):
    first, second = run_of(ddp_launch, FAMILIES[family][1])
    assert first["local_weights_sha256"] == second["local_weights_sha256"]
    # Each rank trains its own tokenizer from the same data: they must agree, or the replicas read different ids.
    assert first["tokenizer_sha256"] == second["tokenizer_sha256"]


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_matches_one_process_at_the_same_global_batch(family, ddp_launch, one_process):
    folder = FAMILIES[family][0]
    ours, reference = logged_losses(ddp_launch[folder]), logged_losses(one_process[folder])
    assert len(ours) == len(reference) == STEPS
    assert max(abs(a - b) for a, b in zip(ours, reference)) < TOLERANCE, (ours, reference)
    assert max_difference(saved_weights(ddp_launch[folder]), saved_weights(one_process[folder])) < TOLERANCE


def test_ddp_evaluation_gathers_every_example_once(ddp_launch, one_process):
    ours = json.loads((ddp_launch["classification"] / "eval_results.json").read_text())
    reference = one_process["classification_results"]
    assert ours["eval_accuracy"] == reference["eval_accuracy"]
    assert abs(ours["eval_loss"] - reference["eval_loss"]) < TOLERANCE


# =====================================================================================================================
# 2. FSDP2 through accelerate's config and the Trainer: blocks sharded, numbers of one process, a loadable model
# =====================================================================================================================


def test_fsdp2_makes_every_block_and_the_root_a_unit(fsdp_launch):
    for run in run_of(fsdp_launch, 0):
        assert (run["world_size"], run["distributed_type"]) == (2, "DistributedType.FSDP")
        # fully_shard per TransformerBlock (the class in _no_split_modules and in fsdp2.yaml), and the whole model
        # (accelerate also groups the tied embedding with the final norm and lm_head).
        blocks = [name for name, kind in run["fsdp_units"].items() if kind == "FSDPTransformerBlock"]
        assert blocks == ["model.layers.0", "model.layers.1"]
        assert run["fsdp_units"][""] == "FSDPBlueprintDecoderForCausalLM"


def test_fsdp2_each_rank_holds_one_shard_of_every_block_parameter(fsdp_launch):
    first, second = run_of(fsdp_launch, 0)
    block_parameters = [name for name in first["shards"] if ".layers." in name]
    assert block_parameters
    for name in block_parameters:
        local = first["shards"][name]["local"], second["shards"][name]["local"]
        assert sum(local) == first["shards"][name]["global"] and max(local) < first["shards"][name]["global"], name
    assert first["local_weights_sha256"] != second["local_weights_sha256"]  # two different halves, not copies


def test_fsdp2_keeps_parameter_names_and_tied_embeddings(fsdp_launch, one_process):
    reference = AutoModelForCausalLM.from_pretrained(one_process["causal"])
    for run in run_of(fsdp_launch, 0):
        # A checkpoint's keys are these names: sharding must not rename (or untie) anything.
        assert run["parameter_names"] == [name for name, _ in reference.named_parameters()]
        assert run["lm_head_tied"] is True


def test_fsdp2_matches_one_process_at_the_same_global_batch(fsdp_launch, one_process):
    ours, reference = logged_losses(fsdp_launch["causal"]), logged_losses(one_process["causal"])
    assert len(ours) == len(reference) == STEPS
    assert max(abs(a - b) for a, b in zip(ours, reference)) < TOLERANCE, (ours, reference)
    weights = saved_weights(fsdp_launch["causal"])
    # The gathered state dict holds the tied output projection as a tensor of its own: saved twice, and equal.
    assert torch.equal(weights.pop("lm_head.weight"), weights["model.embed_tokens.weight"])
    assert max_difference(weights, saved_weights(one_process["causal"])) < TOLERANCE


def test_fsdp2_saved_model_loads_and_generates_on_one_process(fsdp_launch, one_process):
    model = AutoModelForCausalLM.from_pretrained(fsdp_launch["causal"]).eval()
    assert isinstance(model, hf_blueprint.BlueprintDecoderForCausalLM)
    # The saved tokenizer is the run's: the one-process run's vocabulary, one embedding row per token.
    tokenizer = AutoTokenizer.from_pretrained(fsdp_launch["causal"])
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(one_process["causal"]).get_vocab()
    assert len(tokenizer) == model.config.vocab_size
    # The sharded model, generating on both ranks at once, and the gathered one here write the same tokens.
    generated = [rank["generated"] for rank in fsdp_launch["ranks"]]
    assert generated[0] == generated[1] == greedy_generate(model)


def test_fsdp2_recipe_draws_its_sample_on_the_sharded_model(fsdp_launch):
    main_rank, other_rank = run_of(fsdp_launch, 0)
    assert len(main_rank["recipe_results"]["sample"]) > 0  # generated by both ranks in step, kept by rank 0
    assert "sample" not in other_rank["recipe_results"]


def greedy_generate(model) -> list:
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                pad_token_id=model.config.pad_token_id)
    return output[0].tolist()


# =====================================================================================================================
# 3. A multi-process launch without GPUs trains as one run, or stops saying how to launch
# =====================================================================================================================


SHIPPED_CONFIGS = {
    "ddp.yaml": ("multi_gpu", {}),
    "fsdp2.yaml": ("use_fsdp", {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT",
                                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                "fsdp_transformer_layer_cls_to_wrap": "TransformerBlock"}),
    "deepspeed_zero2.yaml": ("use_deepspeed", {"zero_stage": 2}),
    "deepspeed_zero3.yaml": ("use_deepspeed", {"zero_stage": 3, "zero3_save_16bit_model": True}),
    "multi_node.yaml": ("multi_gpu", {"num_machines": 2, "num_processes": 16}),
}


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_shipped_accelerate_config_selects_its_engine(config):
    # As `accelerate launch --config_file` reads it: a misspelt key or value fails here, not on a GPU cluster.
    from accelerate.commands import launch as accelerate_launch_module

    engine, settings = SHIPPED_CONFIGS[config]
    args = accelerate_launch_module.launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE_CONFIGS / config), "train.py"])
    args, _, _ = accelerate_launch_module._validate_launch_command(args)
    engines = {name: getattr(args, name) for name in ("multi_gpu", "use_fsdp", "use_deepspeed")}
    assert engines == {name: name == engine for name in engines}
    assert args.mixed_precision == "bf16"
    assert {key: getattr(args, key) for key in settings} == settings


def test_shipped_ddp_config_starts_two_cpu_ranks_of_one_run(killed_launch):
    for rank, run in enumerate(killed_launch["ranks_at_kill"]):
        assert (run["world_size"], run["torch_world_size"], run["process_index"]) == (2, 2, rank)


def accelerate_launcher_env(monkeypatch, tmp_path, *flags) -> dict:
    """The environment `accelerate launch FLAGS train.py` gives its script, computed by accelerate's own code."""
    from accelerate.commands import launch as accelerate_launch_module
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    monkeypatch.setattr(accelerate_launch_module, "default_config_file", str(tmp_path / "no_default_config.yaml"))
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    args = accelerate_launch_module.launch_command_parser().parse_args([*flags, "train.py"])
    args, _, _ = accelerate_launch_module._validate_launch_command(args)
    # The single-process launcher: neither torchrun-based (multi_gpu, fsdp, deepspeed) nor mpirun.
    assert not (args.multi_gpu or args.use_fsdp or args.use_deepspeed or args.mpirun_hostfile)
    return prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("flags", [["--cpu", "--num_processes", "2"], ["--num_processes", "2"], ["multi_cpu"]],
                         ids=["cpu-flag", "no-gpus", "multi-cpu-config"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="accelerate starts several processes when it sees GPUs")
def test_accelerate_launch_that_starts_one_process_is_refused(flags, monkeypatch, tmp_path):
    if flags == ["multi_cpu"]:
        config = tmp_path / "multi_cpu.yaml"
        config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\n"
                          "num_processes: 2\nmixed_precision: 'no'\nuse_cpu: true\n")
        flags = ["--config_file", str(config)]
    env = accelerate_launcher_env(monkeypatch, tmp_path, *flags)
    with pytest.raises(DistributedLaunchError, match=r"started only this one[\s\S]*torchrun --nproc_per_node N"):
        prepare_distributed_launch(environ=env)


def test_accelerate_launch_of_one_process_is_let_through(monkeypatch, tmp_path):
    env = accelerate_launcher_env(monkeypatch, tmp_path, "--cpu")
    assert prepare_distributed_launch(environ=env) is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU is chosen only on machines without GPUs")
def test_ranks_without_gpus_are_put_on_the_cpu_unless_already_there():
    assert prepare_distributed_launch(environ={"WORLD_SIZE": "2"}) is True
    assert prepare_distributed_launch(use_cpu=True, environ={"WORLD_SIZE": "2"}) is False
    assert prepare_distributed_launch(environ={"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"}) is False
    assert prepare_distributed_launch(environ={"OMPI_COMM_WORLD_SIZE": "4"}) is True  # mpirun


def test_rank_that_sees_itself_alone_is_refused():
    from types import SimpleNamespace

    alone = SimpleNamespace(world_size=1, distributed_state=None, fsdp="", device=torch.device("cpu"))
    with pytest.raises(DistributedLaunchError, match=r"WORLD_SIZE=2.*each would train alone.*--use_cpu true"):
        check_distributed_launch(alone, environ={"WORLD_SIZE": "2"})
    check_distributed_launch(alone, environ={})  # one process, no launcher: fine


def test_malformed_world_size_is_named():
    with pytest.raises(DistributedLaunchError, match=r"WORLD_SIZE='two': expected a whole number"):
        prepare_distributed_launch(environ={"WORLD_SIZE": "two"})


# =====================================================================================================================
# 4. kill -9 of the whole run, then --resume_from_checkpoint: the half-written checkpoint is skipped, bitwise result
# =====================================================================================================================


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every process under it (torchrun starts each rank in a session of its own)."""
    import psutil

    parent = psutil.Process(process.pid)
    processes = parent.children(recursive=True) + [parent]
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, alive


@pytest.fixture(scope="module")
def killed_launch(data, tmp_path_factory) -> dict:
    """The causal-LM run of `ddp_launch`, through accelerate and the shipped ddp.yaml, killed (every process, SIGKILL)
    while rank 0 is halfway through writing checkpoint-6: checkpoints 2 and 4 are complete."""
    import time

    folder = tmp_path_factory.mktemp("killed")
    output_dir = folder / "causal"
    plan = write_plan(folder, [{"recipe": "pretrain_causal_lm", "argv": causal_argv(data, output_dir, 2)}],
                      stall_in_checkpoint=6)
    with open(folder / "launch.log", "w") as log:
        process = subprocess.Popen([*accelerate_launch("ddp.yaml"), str(WORKER), str(plan)], cwd=ROOT,
                                   env=launch_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            while not (folder / "stalled").exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the run never stalled in its save (exit {process.poll()}):\n"
                                f"{(folder / 'launch.log').read_text()[-4000:]}")
                time.sleep(0.2)
            kill_process_tree(process)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    return {"output_dir": output_dir, "ranks_at_kill": [rank["runs"][0] for rank in read_ranks(folder)]}


def test_kill_during_save_leaves_a_half_written_checkpoint_after_complete_ones(killed_launch):
    output_dir = killed_launch["output_dir"]
    assert is_complete_checkpoint(output_dir / "checkpoint-2") and is_complete_checkpoint(output_dir / "checkpoint-4")
    problems = " ".join(checkpoint_problems(output_dir / "checkpoint-6"))
    assert "trainer_state.json" in problems and "model.safetensors" in problems
    # The hazard the guard exists for: transformers' own pick for --resume_from_checkpoint true.
    assert get_last_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-6")
    assert not (output_dir / "checkpoint-8").exists()


def test_resume_skips_the_half_written_checkpoint_and_says_why(ddp_launch):
    output = ddp_launch["output"]
    assert "Not resuming from" in output and "checkpoint-6: no trainer_state.json" in output
    for run in run_of(ddp_launch, 0):
        assert (run["resumed_from"], run["world_size"], run["global_step"]) == ("checkpoint-4", 2, STEPS)


def test_resumed_run_ends_bitwise_equal_to_the_uninterrupted_run(ddp_launch):
    ours, uninterrupted = saved_weights(ddp_launch["resumed"]), saved_weights(ddp_launch["causal"])
    assert ours.keys() == uninterrupted.keys()
    assert [name for name in ours if not torch.equal(ours[name], uninterrupted[name])] == []
    resumed, fresh = run_of(ddp_launch, 0), run_of(ddp_launch, 1)
    assert resumed[0]["local_weights_sha256"] == resumed[1]["local_weights_sha256"] \
        == fresh[0]["local_weights_sha256"]


# =====================================================================================================================
# Wrap-friendly models (one process): the block class is named for wrapping, no head leaves a parameter unused
# =====================================================================================================================

TINY_CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=32, pad_token_id=0, bos_token_id=1, hidden_dropout_prob=0.0)
HEADS = {
    "BlueprintEncoderForMaskedLM": "encoder", "BlueprintEncoderForSequenceClassification": "encoder",
    "BlueprintEncoderForTokenClassification": "encoder", "BlueprintDecoderForCausalLM": "decoder",
    "BlueprintDecoderForSequenceClassification": "decoder", "BlueprintForConditionalGeneration": "seq2seq",
}
CONFIG_CLASSES = {"encoder": "BlueprintEncoderConfig", "decoder": "BlueprintDecoderConfig",
                  "seq2seq": "BlueprintSeq2SeqConfig"}


def tiny_head(name: str, **overrides):
    config = getattr(hf_blueprint, CONFIG_CLASSES[HEADS[name]])(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(0)
    return getattr(hf_blueprint, name)(config)


@pytest.mark.parametrize("name", HEADS)
def test_no_split_modules_names_the_block_class_of_every_stack(name):
    import yaml

    model = tiny_head(name)
    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    stacks = 2 if HEADS[name] == "seq2seq" else 1  # the encoder-decoder has a stack of each kind
    assert len(blocks) == stacks * TINY_CONFIG["num_hidden_layers"]
    # The FSDP2 config wraps by class name: it must name the same class.
    fsdp = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in model._no_split_modules


def loss_of(name: str, model) -> torch.Tensor:
    ids = torch.randint(2, TINY_CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    labels = {"Sequence": torch.tensor([0, 1]), "Token": torch.tensor([[0, 1] * 4] * 2)}
    label = next((value for key, value in labels.items() if key in name), ids)
    return model(input_ids=ids, labels=label).loss


@pytest.mark.parametrize("name,overrides", [
    *[(name, {}) for name in HEADS],
    *[(name, {"position_embedding_type": "learned", "norm_position": "pre", "embedding_norm": True,
              "tie_word_embeddings": False, "type_vocab_size": 2}) for name in HEADS],
    ("BlueprintEncoderForSequenceClassification", {"add_pooling_layer": True}),
    ("BlueprintEncoderForMaskedLM", {"add_pooling_layer": True}),
    ("BlueprintEncoderForTokenClassification", {"add_pooling_layer": True}),
], ids=lambda value: value if isinstance(value, str) else ",".join(value) or "defaults")
def test_every_parameter_of_a_head_gets_a_gradient(name, overrides):
    # What DDP's find_unused_parameters=False needs: one backward reaches every parameter.
    model = tiny_head(name, **overrides).train()
    loss_of(name, model).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


class HeadExamples(torch.utils.data.Dataset):
    """16 fixed examples with the labels `name` trains on."""

    def __init__(self, name: str):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, TINY_CONFIG["vocab_size"], (16, 8), generator=g)
        self.labels = self.ids
        if "Sequence" in name:
            self.labels = torch.randint(0, 2, (16,), generator=g)
        elif "Token" in name:
            self.labels = torch.randint(0, 2, (16, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("name", HEADS)
def test_two_accumulated_half_batches_train_like_one_batch(name, tmp_path):
    # The Trainer multiplies a loss by the number of accumulation steps, and of ranks, unless the model says
    # (accepts_loss_kwargs) that it normalizes the loss itself: the contract behind "2 ranks x 4 == 1 x 8".
    from transformers import Trainer, TrainingArguments

    runs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, learning_rate=1e-3, logging_steps=1,
                                 save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=tiny_head(name), args=args, train_dataset=HeadExamples(name))
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.model.state_dict()))
    (whole_losses, whole), (accumulated_losses, accumulated) = runs
    assert max(abs(a - b) for a, b in zip(whole_losses, accumulated_losses)) < TOLERANCE
    assert max_difference(whole, accumulated) < TOLERANCE


# =====================================================================================================================
# 5. DeepSpeed ZeRO-3 (opt-in: its first run compiles a communication op for ~2 minutes)
# =====================================================================================================================


def _deepspeed_skip_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install -e '.[deepspeed]')"
    if os.environ.get("BLUEPRINT_RUN_DEEPSPEED", "") not in ("1", "true"):
        return ("DeepSpeed on CPU compiles an op on its first run (~2 min, cached in TORCH_EXTENSIONS_DIR): "
                "set BLUEPRINT_RUN_DEEPSPEED=1 to run it")
    return None


requires_deepspeed = pytest.mark.skipif(_deepspeed_skip_reason() is not None, reason=str(_deepspeed_skip_reason()))


@pytest.fixture(scope="module")
def zero3_start(one_process, data, tmp_path_factory) -> dict:
    """ZeRO-3 builds a model from scratch already partitioned (deepspeed.zero.Init), which draws other initial weights
    than one process does from the same seed: both runs start from the one-process checkpoint instead. This is the
    one-process run from there."""
    folder = tmp_path_factory.mktemp("zero3_reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain_causal_lm.main(causal_argv(data, folder / "causal", 1, "--model_name_or_path",
                                            str(one_process["causal"])))
    finally:
        torch.set_num_threads(threads)
    return {"checkpoint": str(one_process["causal"]), "reference": folder / "causal"}


@pytest.fixture(scope="module")
def zero3_launch(zero3_start, data, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("zero3")
    runs = [{"recipe": "pretrain_causal_lm",
             "argv": causal_argv(data, folder / "causal", 2, "--model_name_or_path", zero3_start["checkpoint"])}]
    return {**launch(accelerate_launch("deepspeed_zero3.yaml"), folder, runs, sharded_generate=PROMPT),
            "causal": folder / "causal"}


@requires_deepspeed
def test_zero3_shards_every_block_parameter_across_the_ranks(zero3_launch):
    first, second = run_of(zero3_launch, 0)
    for run in (first, second):
        assert (run["world_size"], run["distributed_type"]) == (2, "DistributedType.DEEPSPEED")
    for name in (name for name in first["shards"] if ".layers." in name):
        total = first["shards"][name]["global"]
        # ZeRO pads each partition to equal size: two halves of at least the whole.
        assert first["shards"][name]["local"] < total and first["shards"][name]["local"] + \
            second["shards"][name]["local"] >= total, name


@requires_deepspeed
def test_zero3_saves_whole_weights_that_match_one_process(zero3_launch, zero3_start):
    ours, reference = logged_losses(zero3_launch["causal"]), logged_losses(zero3_start["reference"])
    assert len(ours) == len(reference) == STEPS
    assert max(abs(a - b) for a, b in zip(ours, reference)) < TOLERANCE, (ours, reference)
    assert max_difference(saved_weights(zero3_launch["causal"]), saved_weights(zero3_start["reference"])) < TOLERANCE


@requires_deepspeed
def test_generate_after_zero3_training(zero3_launch):
    model = AutoModelForCausalLM.from_pretrained(zero3_launch["causal"]).eval()
    generated = [rank["generated"] for rank in zero3_launch["ranks"]]
    assert generated[0] == generated[1] == greedy_generate(model)
