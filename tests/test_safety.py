"""Nothing written outside, nothing published that should not be, nothing overwritten without being asked.

The converter and the model card handle folders and files that come from elsewhere (a downloaded checkpoint, a
sentence-transformers pipeline, a user's data file). These tests try them as an attacker would (paths in a folder's
own files that point out of it, symbolic links, absolute paths) and as a careless user would (an output folder that
already holds something, the source as its own output, weights too large for float16, a folder of an architecture
the converter does not know).
"""

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import transformers

import hf_blueprint
from conftest import TINY, build_tokenizer
from hf_blueprint.convert import ConversionError, convert, copy_tokenizer, main
from hf_blueprint.paths import UnsafePathError, safe_join


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A saved BertModel (1 layer, hidden 16) with a tokenizer: the smallest source the converter accepts."""
    folder = tmp_path_factory.mktemp("source") / "bert"
    config = transformers.BertConfig(vocab_size=TINY["vocab_size"], hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    build_tokenizer(add_cls_sep=True).save_pretrained(folder)
    return folder


def source_copy(bert_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny source folder, to plant things into."""
    folder = tmp_path / "src"
    folder.mkdir()
    for path in bert_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def files_under(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# Paths read from a folder stay inside it
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry, reason", [
    ("/etc", "absolute"), ("../outside", r"'\.\.'"), ("pool/../../outside", r"'\.\.'"), ("..\\outside", r"'\.\.'"),
    ("C:\\Windows", "absolute"), ("", "empty"), (3, "not a path"),
])
def test_safe_join_refuses_entries_that_leave_the_folder_by_name(tmp_path, entry, reason):
    with pytest.raises(UnsafePathError, match=reason) as caught:
        safe_join(tmp_path, entry, "modules.json, module 1 'path'")
    assert "modules.json, module 1 'path'" in str(caught.value)


def test_safe_join_refuses_a_symlink_that_resolves_outside(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="symbolic link") as caught:
        safe_join(tmp_path / "folder", "link/file.txt", "the test")
    assert "link/file.txt" in str(caught.value)
    assert safe_join(tmp_path / "folder", "sub/file.txt", "the test") == tmp_path / "folder" / "sub" / "file.txt"


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_modules_json_path_leaving_the_source_is_refused_and_nothing_is_written(bert_folder, tmp_path, kind):
    source = source_copy(bert_folder, tmp_path)
    (tmp_path / "escaped").mkdir()
    (tmp_path / "escaped" / "config.json").write_text("{}")  # what the module path would copy from outside
    entry = "../escaped" if kind == "relative" else str(tmp_path / "escaped")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": entry, "type": "sentence_transformers.models.Pooling"}]
    (source / "modules.json").write_text(json.dumps(modules))
    output = tmp_path / "deep" / "out"
    with pytest.raises(UnsafePathError) as caught:
        convert(source, output)
    assert "modules.json" in str(caught.value) and repr(entry) in str(caught.value)
    assert not (tmp_path / "deep").exists()  # refused before anything was written, beside the output or in it


def test_symlinked_tokenizer_file_pointing_outside_is_refused_by_name(bert_folder, tmp_path):
    source = source_copy(bert_folder, tmp_path)
    secret = tmp_path / "private_key.txt"
    secret.write_text("do not publish")
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.json").symlink_to(secret)
    with pytest.raises(UnsafePathError, match="tokenizer.json") as caught:
        convert(source, tmp_path / "out")
    assert "symbolic link" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_directory_symlink_in_the_source_does_not_carry_a_copy_outside(bert_folder, tmp_path):
    """A module folder that is a link to a folder outside the source is refused, whatever lies there."""
    source = source_copy(bert_folder, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "1_Pooling").mkdir(parents=True)
    (elsewhere / "1_Pooling" / "config.json").write_text("{}")
    (source / "1_Pooling").symlink_to(elsewhere / "1_Pooling", target_is_directory=True)
    (source / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling"}]))
    with pytest.raises(UnsafePathError, match="1_Pooling"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlink_inside_a_module_folder_pointing_outside_is_refused(bert_folder, tmp_path):
    source = source_copy(bert_folder, tmp_path)
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").symlink_to(tmp_path / "secret.json")
    (source / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling"}]))
    with pytest.raises(UnsafePathError, match="config.json"):
        convert(source, tmp_path / "out")


def test_links_that_stay_inside_the_source_and_the_hub_cache_layout_still_convert(bert_folder, tmp_path):
    """What must keep working: a link to a file of the source itself, and a Hub cache snapshot, whose every file
    links into the repository's `blobs` folder."""
    repo = tmp_path / "models--tiny--bert"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in bert_folder.iterdir():
        blob = repo / "blobs" / f"blob-{path.name}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (snapshot / "1_Pooling").mkdir()
    (repo / "blobs" / "pooling").write_text('{"pooling_mode_mean_tokens": true}')
    (snapshot / "1_Pooling" / "config.json").symlink_to(repo / "blobs" / "pooling")
    (snapshot / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": ""},
                                                       {"idx": 1, "name": "1", "path": "1_Pooling"}]))
    (snapshot / "templates").mkdir()
    (snapshot / "templates" / "chat.jinja").write_text("{{ messages }}")
    (snapshot / "chat_template.jinja").symlink_to(Path("templates", "chat.jinja"))  # inside the folder itself
    convert(snapshot, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (bert_folder / "tokenizer.json").read_bytes()
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text()) == {
        "pooling_mode_mean_tokens": True}
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


def test_copy_tokenizer_replaces_a_symlink_in_the_output_instead_of_writing_through_it(bert_folder, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    output = tmp_path / "out"
    output.mkdir()
    (output / "tokenizer.json").symlink_to(victim)
    copy_tokenizer(bert_folder, output)
    assert victim.read_text() == "untouched"
    assert not (output / "tokenizer.json").is_symlink()
    assert (output / "tokenizer.json").read_bytes() == (bert_folder / "tokenizer.json").read_bytes()


def test_trainer_state_path_comes_from_where_it_was_read_not_from_the_file(tmp_path):
    from hf_blueprint import visualize

    (tmp_path / "run").mkdir()
    state = {"log_history": [{"loss": 1.0, "step": 1}], "_path": "/home/someone/secret/run/trainer_state.json"}
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps(state))
    assert visualize.load_trainer_state(tmp_path / "run")["_path"] == str(tmp_path / "run" / "trainer_state.json")


def test_training_curves_link_stays_inside_the_output_folder(tmp_path):
    from hf_blueprint import visualize

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "README.md").write_text("# card\n")
    (tmp_path / "picture.png").write_bytes(b"not really a png")
    with pytest.raises(UnsafePathError, match="picture.png"):
        visualize.link_training_curves(tmp_path / "run", "../picture.png")
    assert (tmp_path / "run" / "README.md").read_text() == "# card\n"


# ---------------------------------------------------------------------------------------------------------------------
# The converter's output folder: never overwritten without being asked
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_refuses_a_non_empty_output_before_loading_any_weights(bert_folder, tmp_path):
    source = source_copy(bert_folder, tmp_path)
    (source / "model.safetensors").write_bytes(b"garbage: loading this would fail with another error")
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="overwrite") as caught:
        convert(source, output)
    assert str(output) in str(caught.value)
    assert files_under(output) == {"notes.txt": b"my notes"}


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_convert_refuses_an_output_that_overlaps_the_source(bert_folder, tmp_path, where):
    source = source_copy(bert_folder, tmp_path)
    if where == "around":  # the source sits inside the output folder
        output = tmp_path
    else:
        output = source if where == "same" else source / "converted"
    before = files_under(source)
    with pytest.raises(ConversionError, match="overwrite"):
        convert(source, output)
    assert files_under(source) == before


def used_output_folder(tmp_path: Path) -> Path:
    """An output folder holding an earlier model's weights, a note, and a config.json that links outside."""
    output = tmp_path / "out"
    output.mkdir()
    (tmp_path / "victim.json").write_text("untouched")
    (output / "config.json").symlink_to(tmp_path / "victim.json")  # writing through it would land outside
    (output / "notes.txt").write_text("kept")
    (output / "pytorch_model.bin").write_bytes(b"a previous model's weights")
    return output


def test_cli_refuses_a_non_empty_output_with_one_error_line(bert_folder, tmp_path, capsys):
    output = used_output_folder(tmp_path)
    before = files_under(tmp_path)
    assert main([str(bert_folder), str(output)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "--overwrite" in error and str(output) in error
    assert files_under(tmp_path) == before


def test_overwrite_replaces_the_model_and_never_writes_through_a_link(bert_folder, tmp_path):
    output = used_output_folder(tmp_path)
    assert main([str(bert_folder), str(output), "--overwrite"]) == 0
    assert (tmp_path / "victim.json").read_text() == "untouched"
    assert json.loads((output / "config.json").read_text())["model_type"] == "blueprint_encoder"
    assert (output / "notes.txt").read_text() == "kept"  # overwrite replaces the model, not unrelated files
    assert not (output / "pytorch_model.bin").exists()  # a stale weights file could be loaded by mistake
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim.json"]  # no staging folder left
    reloaded = hf_blueprint.BlueprintEncoderModel.from_pretrained(output)
    reference = transformers.BertModel.from_pretrained(bert_folder)
    assert torch.equal(reloaded.get_input_embeddings().weight, reference.get_input_embeddings().weight)


# ---------------------------------------------------------------------------------------------------------------------
# The converter's numerics: no silent inf
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, value", [("float16", 1.0e5), ("bfloat16", 3.4e38)])
def test_convert_to_a_narrower_dtype_refuses_weights_it_cannot_hold(bert_folder, tmp_path, dtype, value):
    source = source_copy(bert_folder, tmp_path)
    model = transformers.BertModel.from_pretrained(source)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight[0, 0] = -value
    model.save_pretrained(source)
    assert math.isinf(torch.tensor(-value).to(getattr(torch, dtype)).item())  # the cast really overflows

    with pytest.raises(ConversionError) as caught:
        convert(source, tmp_path / "out", dtype=dtype)
    message = str(caught.value)
    assert "encoder.layer.0.output.dense.weight" in message and dtype in message
    assert f"{value:.4g}" in message
    assert not (tmp_path / "out").exists()

    converted = convert(source, tmp_path / "out32", dtype="float32")  # the same weights in a dtype that holds them
    assert all(torch.isfinite(p).all() for p in converted.parameters())
    assert max(p.abs().max().item() for p in converted.parameters()) == pytest.approx(value, rel=1e-6)


def test_convert_to_float16_keeps_weights_that_fit(bert_folder, tmp_path):
    converted = convert(bert_folder, tmp_path / "out", dtype="float16")
    assert next(converted.parameters()).dtype == torch.float16
    assert all(torch.isfinite(p).all() for p in converted.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# The converter's command line: one error line, exit code 2, no traceback
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "t5"}, "'t5'"),
    ({"model_type": "made_up_model"}, "'made_up_model'"),
    ({"hidden_size": 8}, "no model_type"),
    ("{not json", "not valid JSON"),
    (["a", "list"], "not a JSON object"),
])
def test_cli_unsupported_or_broken_config_is_one_error_line(tmp_path, capsys, config, expected):
    """An unsupported type is named with the supported ones; a broken config.json is named with what is wrong."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert main([str(source), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert expected in captured.err and "config.json" in captured.err
    if isinstance(config, dict) and "model_type" in config:
        for supported in ("gpt2", "bert", "llama", "mistral", "qwen2", "blueprint_encoder", "blueprint_decoder"):
            assert supported in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "missing_tokenizer_folder"])
def test_cli_bad_source_folders_are_one_error_line(bert_folder, tmp_path, capsys, case):
    source, extra = tmp_path / "src", []
    if case == "file":
        source.write_text("not a folder")
    elif case == "no_config":
        source.mkdir()
        (source / "model.safetensors").write_bytes(b"")
    elif case == "missing_tokenizer_folder":
        source, extra = bert_folder, ["--tokenizer", str(tmp_path / "no_such_tokenizer")]
    assert main([str(source), str(tmp_path / "out"), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    named = tmp_path / "no_such_tokenizer" if case == "missing_tokenizer_folder" else source
    assert str(named) in captured.err
    assert not (tmp_path / "out").exists()


def test_loading_a_pickled_weights_file_runs_no_code(tmp_path):
    """The docs say loading a `pytorch_model.bin` goes through `torch.load(weights_only=True)`: a pickle that would
    run code when unpickled is refused, and the code does not run. (What the converter loads goes the same way.)"""
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hf_blueprint.BlueprintDecoderConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        hf_blueprint.BlueprintDecoderForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Model cards: no local paths, every reported metric
# ---------------------------------------------------------------------------------------------------------------------


def tiny_classifier():
    config = hf_blueprint.BlueprintEncoderConfig(**{**TINY, "num_hidden_layers": 1}, num_labels=2)
    torch.manual_seed(0)
    return hf_blueprint.BlueprintEncoderForSequenceClassification(config)


def test_model_card_names_the_data_file_not_where_it_sat(tmp_path):
    from transformers import TrainingArguments

    from hf_blueprint.model_card import build_model_card

    private = "/home/someone/private/projects/sst/train.csv"
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    card = build_model_card(tiny_classifier(), task="text-classification", dataset=private, training_args=args,
                            finetuned_from="/home/someone/private/checkpoints/bert-tiny")
    assert "/home/someone" not in card.content and "private" not in card.content
    assert "train.csv" in card.content and "bert-tiny" in card.content
    assert card.data.base_model is None  # a local folder is not a Hub model id


def test_model_card_keeps_hub_ids_and_relative_paths(tmp_path):
    from hf_blueprint.model_card import build_model_card

    card = build_model_card(tiny_classifier(), task="text-classification", dataset="stanfordnlp/sst2",
                            finetuned_from="google-bert/bert-base-uncased")
    assert card.data.datasets == ["stanfordnlp/sst2"] and card.data.base_model == "google-bert/bert-base-uncased"
    card = build_model_card(tiny_classifier(), task="text-classification",
                            dataset="recipes/data/tinyshakespeare/input.txt")
    assert card.data.datasets == ["tinyshakespeare"]


def test_every_metric_a_recipe_reports_reaches_the_model_index(tmp_path):
    """The names come from the metric functions the recipes use: classification's accuracy and macro-F1 through
    trainer.evaluate (validation and test); the language models' perplexity, token NLL and accuracy, the causal
    recipe's loss_perplexity and translation's BLEUs reported through trainer.log_metrics, as the recipes do."""
    import numpy as np
    from datasets import Dataset
    from huggingface_hub import ModelCard
    from transformers import EvalPrediction, Trainer, TrainingArguments

    from hf_blueprint.metrics import TranslationMetrics, classification_metrics, language_model_metrics
    from hf_blueprint.model_card import use_blueprint_model_card

    rows = [{"input_ids": [2, 10 + i, 20 + i, 3], "labels": i % 2} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=tiny_classifier(), args=args, train_dataset=Dataset.from_list(rows),
                      eval_dataset=Dataset.from_list(rows), compute_metrics=classification_metrics())
    use_blueprint_model_card(trainer, task="text-classification")
    trainer.train()
    validation = trainer.evaluate()
    test = trainer.evaluate(Dataset.from_list(rows), metric_key_prefix="test")
    _, language_model = language_model_metrics(causal=False)
    scored = EvalPrediction(predictions=(np.log([[0.5, 0.25, 0.125]]), np.array([[4, 5, 9]])),
                            label_ids=np.array([[4, 6, 9]]))
    reported_eval = {f"eval_{name}": value for name, value in language_model(scored).items()}
    reported_eval["eval_loss_perplexity"] = 2.5
    trainer.log_metrics("eval", reported_eval)
    bleu = TranslationMetrics(build_tokenizer(), "de").score(["the cat sat on the mat"], ["the cat sat on a mat"])
    reported_test = {f"test_{name}": value for name, value in bleu.items()}
    trainer.log_metrics("test", reported_test)
    trainer.create_model_card(dataset="train.tsv")

    card = ModelCard.load(tmp_path / "run" / "README.md")
    results = card.data.to_dict()["model-index"][0]["results"]
    by_split = {}
    for result in results:
        split = result["dataset"].get("split")
        for metric in result["metrics"]:
            by_split.setdefault(split, {})[metric["name"]] = metric
    # What was reported last wins where a name repeats (eval_accuracy), as the card takes the latest value.
    expected = {"validation": {**{k: v for k, v in validation.items() if k.startswith("eval_")}, **reported_eval},
                "test": {**{k: v for k, v in test.items() if k.startswith("test_")}, **reported_test}}
    speed = ("_runtime", "_samples_per_second", "_steps_per_second")
    for split, metrics in expected.items():
        values = sorted(round(float(v), 4) for k, v in metrics.items() if not k.endswith(speed))
        assert sorted(m["value"] for m in by_split[split].values()) == values, (split, by_split.get(split))
    types = {split: {m["type"] for m in metrics.values()} for split, metrics in by_split.items()}
    assert {"loss", "accuracy", "f1", "perplexity"} <= types["validation"] and {"bleu", "accuracy"} <= types["test"]
    assert "macro" in next(m["name"] for m in by_split["validation"].values() if m["type"] == "f1").lower()
