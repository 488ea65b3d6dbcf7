"""The ablation runner (`python -m hf_blueprint.ablate`) and the per-layer gradient-norm callback.

- validation: a bad spec is refused before anything runs, naming the field;
- planning: one-at-a-time cells vary one switch each from the base;
- integration: the tiny spec (2 cells x 2 seeds, 4 steps) runs through the causal-LM recipe; a runner killed during
  its second run resumes with only the unfinished runs redone; the tables hold every cell, with mean and sd equal to
  those of the per-seed numbers in runs.csv; a third invocation runs nothing; a diverged and a failed run are
  recorded as such; a spec changed under finished runs is refused before anything runs;
- callbacks: the gradient groups partition the parameters by block, and the logged norms are the pre-clip norms.
"""

import contextlib
import csv
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hf_blueprint import BlueprintDecoderConfig, BlueprintDecoderForCausalLM, BlueprintSeq2SeqConfig
from hf_blueprint.ablate import AblationError, SpecError, load_spec, main, plan, run_ablation
from hf_blueprint.callbacks import GradientNormCallback, gradient_groups, gradient_norms


REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "recipes" / "configs" / "ablations" / "example_tiny.yaml"


@pytest.fixture
def in_repo(monkeypatch):
    """Spec paths (and the data paths of the recipe configs) are relative to the folder the runner starts in."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny_spec(tmp_path, **changes) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------------
# Validation: refused before anything runs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, named", [
    ({"recipe": "pretrain_gpt"}, "recipe"),
    ({"config": "recipes/configs/no_such_config.yaml"}, "config"),
    ({"grid": {"num_hiden_layers": [1, 2]}}, "num_hiden_layers"),
    ({"grid": {}}, "grid"),
    ({"grid": {"num_hidden_layers": []}}, "grid.num_hidden_layers"),
    ({"grid": {"num_hidden_layers": [1, 1]}}, "grid.num_hidden_layers"),
    ({"grid": {"position_embedding_type": ["learned", "sideways"]}}, "position_embedding_type"),
    ({"grid": {"learning_rate": ["fast"]}}, "learning_rate"),
    ({"one_at_a_time": {"num_hidden_layers": [2]}}, "one_at_a_time"),  # beside the grid: one of the two
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"seeds": [-1]}, "seeds"),
    ({"seeds": "1,2"}, "seeds"),
    ({"base": {"seed": 3}}, "base.seed"),
    ({"base": {"output_dir": "x"}}, "base.output_dir"),
    ({"metrics": []}, "metrics"),
    ({"sedes": [1]}, "sedes"),
])
def test_bad_spec_is_refused_naming_the_field(tmp_path, in_repo, changes, named):
    out = tmp_path / "out"
    with pytest.raises(SpecError, match=named.replace(".", r"\.")):
        run_ablation(tiny_spec(tmp_path, **changes), output_dir=str(out), stream=io.StringIO())
    assert not out.exists()


def test_command_line_reports_a_spec_error_with_exit_code_2(tmp_path, in_repo, capsys):
    assert main([str(tiny_spec(tmp_path, seeds=[])), "--output_dir", str(tmp_path / "out")]) == 2
    assert "seeds" in capsys.readouterr().err


def test_output_folder_of_something_else_is_refused(tmp_path, in_repo):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(AblationError, match="not an ablation's folder"):
        run_ablation(SPEC, output_dir=str(out), stream=io.StringIO())
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


def overrides_of(command: list[str]) -> dict:
    value = command[command.index("--config_overrides") + 1]
    return dict(item.split("=", 1) for item in value.split(","))


def test_one_at_a_time_varies_each_switch_alone_from_the_base(tmp_path, in_repo):
    path = tiny_spec(tmp_path, grid=None, seeds=[5],
                     one_at_a_time={"num_hidden_layers": [1, 2], "learning_rate": [0.01]})
    notes = []
    runs = plan(load_spec(path, str(tmp_path / "out")), notes)
    assert [run.cell.values for run in runs] == [{}, {"num_hidden_layers": 2}, {"learning_rate": 0.01}]
    assert any("num_hidden_layers=1" in note for note in notes)  # the base value: the base cell covers it
    base, deeper, faster = (run.command for run in runs)
    # The spec's model fields win over the config file's; the fields it does not name keep the file's values.
    assert overrides_of(base)["num_hidden_layers"] == "1"
    assert overrides_of(base)["norm_position"] == "pre"
    assert overrides_of(deeper) == {**overrides_of(base), "num_hidden_layers": "2"}
    assert overrides_of(faster) == overrides_of(base)
    assert faster[faster.index("--learning_rate") + 1] == "0.01" and "--learning_rate" not in base
    assert all(run.command[run.command.index("--seed") + 1] == "5" for run in runs)


def test_each_cell_shows_the_values_its_run_has(tmp_path, in_repo):
    # num_key_value_heads follows num_attention_heads unless set: the cell with 2 query heads has 2 key/value heads,
    # and its row says so (not the base cell's 4).
    path = tiny_spec(tmp_path, grid=None, seeds=[0], base={"max_steps": 4, "num_attention_heads": 4},
                     one_at_a_time={"num_attention_heads": [2], "num_key_value_heads": [1]})
    runs = plan(load_spec(path, str(tmp_path / "out")))
    assert [run.cell.shown for run in runs] == [
        {"num_attention_heads": "4", "num_key_value_heads": "4"},
        {"num_attention_heads": "2", "num_key_value_heads": "2"},
        {"num_attention_heads": "4", "num_key_value_heads": "1"},
    ]


def test_grid_is_the_cartesian_product_with_seeds_outermost(tmp_path, in_repo):
    path = tiny_spec(tmp_path, seeds=[1, 2],
                     grid={"position_embedding_type": ["learned", "rope"], "warmup_steps": [0, 1]})
    runs = plan(load_spec(path, str(tmp_path / "out")))
    cells = [(run.cell.values["position_embedding_type"], run.cell.values["warmup_steps"]) for run in runs]
    assert cells == [("learned", 0), ("learned", 1), ("rope", 0), ("rope", 1)] * 2
    assert [run.seed for run in runs] == [1] * 4 + [2] * 4
    assert len({run.folder for run in runs}) == 8


# ---------------------------------------------------------------------------------------------------------------------
# Integration: the tiny spec through the causal-LM recipe
# ---------------------------------------------------------------------------------------------------------------------


def wait_for(condition, timeout: float, what: str, process=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the runner exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_killed_ablation_resumes_redoing_only_unfinished_runs_and_tabulates_every_cell(tmp_path, in_repo):
    out = tmp_path / "ablation"
    runs = plan(load_spec(SPEC, str(out)))
    assert len(runs) == 4 and len({run.cell.index for run in runs}) == 2

    # A runner killed (with its recipe) during its second run.
    log = open(tmp_path / "first_invocation.log", "w")
    runner = subprocess.Popen([sys.executable, "-m", "hf_blueprint.ablate", str(SPEC), "--output_dir", str(out)],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: runs[1].folder.joinpath("recipe.log").is_file(), 240, "the second run to start", runner)
        time.sleep(1.0)  # into the recipe's start-up
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already: the wait above reports why
            os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
        log.close()
    assert runs[0].result_path.is_file()
    assert not runs[1].result_path.exists()
    leftover = runs[1].output / "checkpoint-1" / "half-written"  # what a run killed while saving leaves
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_text("partial")
    first_result = runs[0].result_path.read_bytes(), runs[0].result_path.stat().st_mtime_ns

    summary = run_ablation(SPEC, output_dir=str(out), jobs=2, stream=io.StringIO())
    assert sorted(summary.executed) == sorted(run.id for run in runs[1:])
    assert summary.skipped == [runs[0].id]
    assert (runs[0].result_path.read_bytes(), runs[0].result_path.stat().st_mtime_ns) == first_result
    assert not leftover.exists()  # the killed run's folder was cleared and the run redone from scratch
    assert summary.statuses == {run.id: "ok" for run in runs}

    # runs.csv: one row per (cell, seed); results.csv: one row per cell, mean and sd of its seeds' numbers.
    rows = read_csv(out / "runs.csv")
    assert sorted((r["position_embedding_type"], r["seed"]) for r in rows) == \
        sorted((run.cell.values["position_embedding_type"], str(run.seed)) for run in runs)
    for row, run in zip(rows, runs):
        assert float(row["eval_loss"]) == json.loads(run.result_path.read_text())["metrics"]["eval_loss"]
    cells = read_csv(out / "results.csv")
    assert sorted(c["position_embedding_type"] for c in cells) == ["learned", "rope"]
    for cell in cells:
        assert cell["seeds"] == cell["ok"] == "2"
        for metric in ("eval_loss", "eval_accuracy"):
            values = [float(r[metric]) for r in rows if r["position_embedding_type"] == cell["position_embedding_type"]]
            assert float(cell[f"{metric}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert float(cell[f"{metric}_sd"]) == pytest.approx(statistics.stdev(values), rel=1e-12)
            assert cell[f"{metric}_n"] == "2"
    table = (out / "results.md").read_text()
    assert "| 1 | learned | 2 / 2 |" in table and "| 2 | rope | 2 / 2 |" in table
    figures = {path.name for path in summary.figures}
    assert {"learning_curves.png", "eval_loss_vs_position_embedding_type.png"} <= figures

    # Everything finished: a third invocation runs nothing and touches no run.
    stamps = {run.id: run.result_path.stat().st_mtime_ns for run in runs}
    again = run_ablation(SPEC, output_dir=str(out), stream=io.StringIO())
    assert again.executed == [] and sorted(again.skipped) == sorted(stamps)
    assert {run.id: run.result_path.stat().st_mtime_ns for run in runs} == stamps
    assert "executed 0 runs" in (out / "ablate.log").read_text().splitlines()[-1]


@pytest.fixture(scope="module")
def diverged_and_failed(tmp_path_factory):
    """One diverged and one failed run. A learning rate of 1e30 makes the loss NaN within a few steps (the recipe's
    guard stops the run); a block of 64 tokens with a 32-position table is refused by the recipe once it has built
    the model."""
    folder = tmp_path_factory.mktemp("diverged_and_failed")
    spec = yaml.safe_load(SPEC.read_text())
    spec.update(seeds=[1], grid={"block_size": [32, 64]})
    spec["base"].update(learning_rate=1.0e30, max_steps=3)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = folder / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setenv("OMP_NUM_THREADS", "1")
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            exit_code = main([str(path), "--output_dir", str(out), "--jobs", "2"])
    return spec, out, exit_code, stderr.getvalue()


def test_diverged_and_failed_runs_are_recorded_not_dropped(diverged_and_failed):
    _, out, exit_code, stderr = diverged_and_failed
    assert exit_code == 1 and "failed" in stderr  # a failed run: exit code 1
    rows = {row["block_size"]: row for row in read_csv(out / "runs.csv")}
    assert rows["32"]["status"] == "diverged"
    assert 1 <= int(rows["32"]["diverged_at_step"]) <= 3
    assert rows["64"]["status"] == "failed"
    assert "block_size" in rows["64"]["note"]
    failed = json.loads((out / "runs" / rows["64"]["run"] / "result.json").read_text())
    assert failed["returncode"] != 0 and failed["log_tail"]
    cells = {cell["block_size"]: cell for cell in read_csv(out / "results.csv")}
    assert (cells["32"]["ok"], cells["32"]["diverged"], cells["32"]["failed"]) == ("0", "1", "0")
    assert (cells["64"]["ok"], cells["64"]["diverged"], cells["64"]["failed"]) == ("0", "0", "1")
    table = (out / "results.md").read_text()
    assert "seed 1 diverged" in table and "seed 1 failed" in table


def test_changed_spec_under_finished_runs_is_refused_before_running(diverged_and_failed, tmp_path, in_repo):
    spec, out, _, _ = diverged_and_failed
    spec = {**spec, "base": {**spec["base"], "max_steps": 4}}
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    results = sorted((out / "runs").glob("*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    with pytest.raises(AblationError, match="block_size=32__seed1.*other settings"):
        run_ablation(path, output_dir=str(out), stream=io.StringIO())
    assert [p.stat().st_mtime_ns for p in results] == stamps


# ---------------------------------------------------------------------------------------------------------------------
# Callbacks: per-layer gradient norms
# ---------------------------------------------------------------------------------------------------------------------


def tiny_decoder(**overrides):
    config = BlueprintDecoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                    **overrides)
    torch.manual_seed(0)
    return BlueprintDecoderForCausalLM(config)


def test_gradient_groups_are_the_blocks_the_embeddings_and_the_head():
    model = tiny_decoder(norm_position="pre", tie_word_embeddings=False, position_embedding_type="learned")
    ids = torch.randint(0, 50, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    norms = gradient_norms(gradient_groups(model))

    def norm_of(parameters):
        return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in parameters])).item()

    embeddings = [model.model.embed_tokens.weight, model.model.embed_positions.weight]
    head = [model.model.norm.weight, model.model.norm.bias, model.lm_head.weight]
    assert set(norms) == {"embeddings", "layer_0", "layer_1", "layer_2", "head"}
    for index, block in enumerate(model.model.layers):
        assert norms[f"layer_{index}"] == pytest.approx(norm_of(block.parameters()), rel=1e-5)
    assert norms["embeddings"] == pytest.approx(norm_of(embeddings), rel=1e-5)
    assert norms["head"] == pytest.approx(norm_of(head), rel=1e-5)
    total = norm_of(model.parameters())
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(total, rel=1e-5)


def test_gradient_groups_of_an_encoder_decoder_name_the_stack():
    from hf_blueprint import BlueprintForConditionalGeneration

    config = BlueprintSeq2SeqConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16)
    groups = gradient_groups(BlueprintForConditionalGeneration(config))
    assert {"encoder_layer_0", "encoder_layer_1", "decoder_layer_0", "decoder_layer_1"} <= set(groups)
    assert sum(len(ps) for ps in groups.values()) == len(list(BlueprintForConditionalGeneration(config).parameters()))


def train_with_gradient_norms(tmp_path, max_grad_norm: float):
    from transformers import Trainer, TrainingArguments

    model = tiny_decoder(norm_position="pre", tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (24, 12), generator=generator)]
    args = TrainingArguments(output_dir=str(tmp_path / f"clip{max_grad_norm}"), max_steps=3, logging_steps=1,
                             max_grad_norm=max_grad_norm, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradientNormCallback()])
    trainer.train()
    trainer.save_state()
    state = json.loads((Path(args.output_dir) / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_gradient_norm_callback_logs_pre_clip_norms_into_trainer_state(tmp_path):
    unclipped = train_with_gradient_norms(tmp_path, max_grad_norm=0.0)
    clipped = train_with_gradient_norms(tmp_path, max_grad_norm=1e-3)  # far below the norm: every step is clipped
    groups = {"grad_norm/embeddings", "grad_norm/layer_0", "grad_norm/layer_1", "grad_norm/layer_2", "grad_norm/head"}
    assert [entry["step"] for entry in unclipped] == [1, 2, 3]
    for entry in unclipped + clipped:
        assert groups <= set(entry)
    # The groups partition the parameters: together they make the Trainer's total norm.
    for entry in unclipped:
        assert math.sqrt(sum(entry[g] ** 2 for g in groups)) == pytest.approx(entry["grad_norm"], rel=1e-5)
    # Step 1 sees the same weights and batch either way: the clipped run logs the gradients before clipping.
    assert clipped[0]["grad_norm"] > 1e-3
    for group in groups:
        assert clipped[0][group] == pytest.approx(unclipped[0][group], rel=1e-4)


SHIPPED_SPECS = REPO / "recipes" / "configs" / "ablations"


@pytest.mark.parametrize("spec", sorted(path.name for path in SHIPPED_SPECS.glob("*.yaml")))
def test_shipped_spec_plans_every_cell_and_seed(spec, tmp_path, in_repo):
    # A typo in a shipped experiment (a switch no recipe flag or config field has, a value out of range) fails here,
    # not hours into the run docs/ABLATIONS.md asks a reader to make.
    runs = plan(load_spec(SHIPPED_SPECS / spec, str(tmp_path / "out")))
    seeds = yaml.safe_load((SHIPPED_SPECS / spec).read_text())["seeds"]
    assert runs and len(runs) % len(seeds) == 0
    assert {run.command[run.command.index("--seed") + 1] for run in runs} == {str(seed) for seed in seeds}
