"""The recipes lose nothing and check their arguments and data before any work (issue 16).

- Output folders: a folder that holds a run is refused unless the user replaces it (`--overwrite_output_dir`) or resumes
  it; a resume refuses checkpoints of another model config, so neither the resume nor the checkpoint rotation touches
  another run; `--resume_from_checkpoint false` does not resume; `train_tokenizer.py` refuses a file as its folder.
- Arguments used only after training (sampling, beam search, lengths, masking, sample counts, epochs) are refused by
  name before any data is tokenized, any tokenizer trained or any step run: the tests replace `Trainer.train` and the
  tokenizer training with a tripwire, so a check that comes too late fails the test instead of passing it.
- The final model is saved before anything that can still fail (sampling, evaluation, translations).
- Data: labels that differ only by whitespace or by int/float spelling are one class; mixed kinds, a number as text,
  column-oriented JSON, a byte-order mark, a corrupt .gz and an unknown encoding fail (or are read) with the file named.

Everything runs in process, on tiny data, with a tiny model; only the tests that need a saved run train (2-4 steps).
"""

import gzip
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_blueprint.recipe_args
from hf_blueprint.data import (
    DataError,
    build_label_maps,
    load_raw_datasets,
    map_labels,
    read_data_file,
    require_text,
)
from hf_blueprint.recipe_args import DataArguments
from hf_blueprint.tokenizer import FAMILIES, special_tokens_per_text, train_tokenizer
from hf_blueprint.training_guards import CheckpointMismatchError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))
import finetune_classification  # noqa: E402
import pretrain_causal_lm  # noqa: E402
import pretrain_masked_lm  # noqa: E402
import quickstart  # noqa: E402
import train_tokenizer as tokenizer_recipe  # noqa: E402
import train_translation  # noqa: E402

TINY = ("hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64,"
        "hidden_dropout_prob=0.0")
QUIET = ["--log_level", "error", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0",
         "--report_to", "none", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"]


# The recipes' tests share their thread count, logging restoration and file writer.
from test_recipes import _one_torch_thread, _restore_library_logging, write  # noqa: E402, F401  (fixtures)


def folder_contents(folder: Path) -> dict:
    """Every file under `folder` with its bytes: equal before and after means nothing was written or deleted."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A few kilobytes of each kind of data the recipes read."""
    folder = tmp_path_factory.mktemp("data")
    text = (RECIPES / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:6000]
    sst2 = (RECIPES / "data" / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:121]
    english = "".join(f"{a} {b} runs.\n" for a in ("A dog", "The man", "A child") for b in ("quickly", "slowly"))
    german = "".join(f"{a} {b} rennt.\n" for a in ("Ein Hund", "Der Mann", "Ein Kind") for b in ("schnell", "langsam"))
    write(folder / "pairs.en", english * 4)
    write(folder / "pairs.de", german * 4)
    return {"text": write(folder / "text.txt", text), "sst2": write(folder / "sst2.tsv", "".join(sst2)),
            "pairs": str(folder / "pairs")}


def recipe_argv(name: str, data: dict, output_dir: Path) -> list:
    """Valid arguments for each recipe (no --max_steps: the tests that train add it)."""
    output = ["--output_dir", str(output_dir)]
    if name == "pretrain_causal_lm":
        return ["--train_file", data["text"], "--tokenizer_type", "char", "--block_size", "32",
                "--config_overrides", TINY, "--sample_max_new_tokens", "0", *QUIET, *output]
    if name == "pretrain_masked_lm":
        return ["--train_file", data["sst2"], "--line_by_line", "--max_seq_length", "32", "--tokenizer_vocab_size",
                "300", "--config_overrides", TINY, *QUIET, *output]
    if name == "finetune_classification":
        return ["--train_file", data["sst2"], "--tokenizer_vocab_size", "300", "--config_overrides", TINY, *QUIET,
                *output]
    if name == "train_translation":
        return ["--train_file", data["pairs"], "--tokenizer_vocab_size", "300", "--max_target_length", "16",
                "--config_overrides", TINY, "--num_beams", "1", "--num_examples_to_print", "0", *QUIET, *output]
    if name == "train_tokenizer":
        return ["--train_file", data["text"], "--tokenizer_type", "char", *output]
    if name == "quickstart":
        return ["--train_file", data["text"], "--hidden_size", "32", "--num_hidden_layers", "1",
                "--num_attention_heads", "2", "--block_size", "32", "--torch_threads", "0", *QUIET, *output]
    raise KeyError(name)


RECIPE_MODULES = {"pretrain_causal_lm": pretrain_causal_lm, "pretrain_masked_lm": pretrain_masked_lm,
                  "finetune_classification": finetune_classification, "train_translation": train_translation,
                  "train_tokenizer": tokenizer_recipe, "quickstart": quickstart}
TRAINING_RECIPES = ["pretrain_causal_lm", "pretrain_masked_lm", "finetune_classification", "train_translation"]


class WorkStarted(AssertionError):
    """Raised by the tripwires: the recipe began the work a check should have come before."""


def start_work(*args, **kwargs):
    raise WorkStarted("training started before the arguments were checked")


@pytest.fixture
def tripwire(monkeypatch):
    """Training and tokenizer training raise `WorkStarted`: a test expecting an argument error then fails if the
    recipe got that far."""
    monkeypatch.setattr(transformers.Trainer, "train", start_work)
    monkeypatch.setattr(hf_blueprint.recipe_args, "train_tokenizer", start_work)
    monkeypatch.setattr(tokenizer_recipe, "train_tokenizer", start_work)


# =====================================================================================================================
# Output folders: nothing lost
# =====================================================================================================================


@pytest.mark.parametrize("name", [*TRAINING_RECIPES, "train_tokenizer", "quickstart"])
def test_an_output_dir_that_holds_a_run_is_refused(name, data, tmp_path, tripwire):
    output_dir = tmp_path / "run"
    write(output_dir / "model.safetensors", b"the weights of an earlier run")
    write(output_dir / "checkpoint-10" / "trainer_state.json", "{}")
    before = folder_contents(output_dir)
    with pytest.raises(FileExistsError, match=rf"--output_dir {output_dir} is not empty \(it holds checkpoint-10, "
                                              rf"model.safetensors\).*--overwrite_output_dir"):
        RECIPE_MODULES[name].main(recipe_argv(name, data, output_dir))
    assert folder_contents(output_dir) == before


@pytest.mark.parametrize("name", [*TRAINING_RECIPES, "train_tokenizer"])
def test_an_output_dir_that_is_a_file_is_refused(name, data, tmp_path, tripwire):
    # train_tokenizer used to log an error inside save_pretrained and report success with nothing saved.
    output_dir = Path(write(tmp_path / "not_a_folder", "a file the user keeps"))
    with pytest.raises(FileExistsError, match=rf"--output_dir {output_dir} is a file, not a folder"):
        RECIPE_MODULES[name].main(recipe_argv(name, data, output_dir))
    assert output_dir.read_text() == "a file the user keeps"


def test_train_tokenizer_replaces_a_folder_only_when_asked(data, tmp_path):
    output_dir = tmp_path / "tok"
    tokenizer_recipe.main(recipe_argv("train_tokenizer", data, output_dir))
    with pytest.raises(FileExistsError, match="is not empty"):
        tokenizer_recipe.main(recipe_argv("train_tokenizer", data, output_dir))
    results = tokenizer_recipe.main([*recipe_argv("train_tokenizer", data, output_dir), "--overwrite_output_dir"])
    assert len(AutoTokenizer.from_pretrained(output_dir)) == results["vocab_size"]


def causal_argv(data, output_dir, *extra) -> list:
    return [*recipe_argv("pretrain_causal_lm", data, output_dir), "--do_eval", "false", "--logging_steps", "1",
            *extra]


@pytest.fixture(scope="module")
def earlier_run(data, tmp_path_factory) -> Path:
    """A finished causal-LM run of 4 steps with checkpoints at steps 2 and 4, kept as a pristine copy."""
    output_dir = tmp_path_factory.mktemp("earlier") / "run"
    pretrain_causal_lm.main(causal_argv(data, output_dir, "--max_steps", "4", "--save_steps", "2"))
    assert {p.name for p in output_dir.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return output_dir


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_overwrite_output_dir_replaces_the_run_and_its_checkpoints(earlier_run, data, tmp_path):
    output_dir = copy_of(earlier_run, tmp_path)
    results = pretrain_causal_lm.main(causal_argv(data, output_dir, "--max_steps", "2", "--save_steps", "2",
                                                  "--overwrite_output_dir"))
    assert results["global_step"] == 2
    # The earlier run's checkpoint-4 is gone: a later `--resume_from_checkpoint true` would take it for this run's.
    assert {p.name for p in output_dir.glob("checkpoint-*")} == {"checkpoint-2"}
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2


def test_resume_continues_the_run_in_the_folder(earlier_run, data, tmp_path):
    output_dir = copy_of(earlier_run, tmp_path)
    results = pretrain_causal_lm.main(causal_argv(data, output_dir, "--max_steps", "6", "--save_steps", "2",
                                                  "--resume_from_checkpoint", "true"))
    assert results["global_step"] == 6 and (output_dir / "checkpoint-6").is_dir()


def test_resume_continues_a_classifier_whose_training_set_its_problem_type(data, tmp_path):
    # The first loss of a run that leaves problem_type unset sets it in the model config: its checkpoints then hold
    # one that the resuming run has not set yet, which is the same run, not another.
    output_dir = tmp_path / "run"
    argv = recipe_argv("finetune_classification", data, output_dir)
    finetune_classification.main([*argv, "--max_steps", "2", "--save_steps", "2"])
    assert json.loads((output_dir / "checkpoint-2" / "config.json").read_text())["problem_type"] is not None
    results = finetune_classification.main([*argv, "--max_steps", "4", "--save_steps", "2",
                                            "--resume_from_checkpoint", "true"])
    assert results["global_step"] == 4 and (output_dir / "checkpoint-4").is_dir()


def test_resume_refuses_a_checkpoint_of_another_config(earlier_run, data, tmp_path, monkeypatch):
    output_dir = copy_of(earlier_run, tmp_path)
    before = folder_contents(output_dir)
    monkeypatch.setattr(transformers.Trainer, "train", start_work)
    wider = TINY.replace("hidden_size=32", "hidden_size=48")
    argv = causal_argv(data, output_dir, "--max_steps", "6", "--resume_from_checkpoint", "true")
    argv[argv.index(TINY)] = wider
    with pytest.raises(CheckpointMismatchError, match=rf"{output_dir / 'checkpoint-4'} holds a model of another "
                                                      rf"configuration than this run's \(head_dim: 16 in the "
                                                      rf"checkpoint, 24 in this run; hidden_size: 32 in the "
                                                      rf"checkpoint, 48 in this run\)"):
        pretrain_causal_lm.main(argv)
    assert folder_contents(output_dir) == before  # the earlier run's checkpoints are all there, unchanged


def test_resume_refuses_an_output_dir_whose_checkpoints_the_rotation_would_delete(earlier_run, data, tmp_path,
                                                                                    monkeypatch):
    # Resuming from a matching checkpoint elsewhere, into a folder holding another model's checkpoint: the rotation
    # (--save_total_limit 1) would delete it.
    output_dir = tmp_path / "other"
    shutil.copytree(earlier_run / "checkpoint-2", output_dir / "checkpoint-9")
    config = json.loads((output_dir / "checkpoint-9" / "config.json").read_text())
    (output_dir / "checkpoint-9" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    before = folder_contents(output_dir)
    monkeypatch.setattr(transformers.Trainer, "train", start_work)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-9 holds a model of another configuration.*"
                                                      r"num_hidden_layers: 2 in the checkpoint, 1 in this run"):
        pretrain_causal_lm.main(causal_argv(data, output_dir, "--max_steps", "6", "--save_total_limit", "1",
                                            "--resume_from_checkpoint", str(earlier_run / "checkpoint-4")))
    assert folder_contents(output_dir) == before


def test_resume_and_overwrite_together_are_refused(earlier_run, data, tmp_path, tripwire):
    output_dir = copy_of(earlier_run, tmp_path)
    with pytest.raises(ValueError, match="--overwrite_output_dir and --resume_from_checkpoint true contradict"):
        pretrain_causal_lm.main(causal_argv(data, output_dir, "--resume_from_checkpoint", "true",
                                            "--overwrite_output_dir"))


@pytest.mark.parametrize("value", ["false", "False"])
def test_resume_from_checkpoint_false_does_not_resume(value, earlier_run, data, tmp_path, tripwire):
    # As transformers' own Trainer.train(resume_from_checkpoint=False): no resume. In a folder that holds a run, that
    # makes it a new run into a folder that is not empty.
    with pytest.raises(FileExistsError, match="is not empty"):
        pretrain_causal_lm.main(causal_argv(data, copy_of(earlier_run, tmp_path), "--resume_from_checkpoint", value))


def test_resume_from_checkpoint_false_trains_from_scratch(data, tmp_path):
    results = pretrain_causal_lm.main(causal_argv(data, tmp_path / "run", "--max_steps", "1", "--save_strategy",
                                                  "no", "--resume_from_checkpoint", "false"))
    assert results["global_step"] == 1


# =====================================================================================================================
# The final model is saved before anything after training can fail
# =====================================================================================================================


def fail(*args, **kwargs):
    raise RuntimeError("a step after training failed")


# recipe -> (extra arguments, (owner, name) of what is made to fail after training)
AFTER_TRAINING = {
    "pretrain_causal_lm": (["--sample_max_new_tokens", "4"], (pretrain_causal_lm, "generate_sample")),
    "pretrain_masked_lm": ([], (transformers.Trainer, "evaluate")),
    "finetune_classification": ([], (transformers.Trainer, "evaluate")),
    "train_translation": ([], (train_translation, "predict_in_order")),
}


@pytest.mark.parametrize("name", sorted(AFTER_TRAINING))
def test_the_final_model_is_saved_before_what_can_fail_after_training(name, data, tmp_path, monkeypatch):
    extra, (owner, attribute) = AFTER_TRAINING[name]
    monkeypatch.setattr(owner, attribute, fail)
    output_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a step after training failed"):
        RECIPE_MODULES[name].main([*recipe_argv(name, data, output_dir), "--max_steps", "2", "--save_strategy", "no",
                                   *extra])
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"} <= {
        p.name for p in output_dir.iterdir()}
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2
    saved = transformers.AutoConfig.from_pretrained(output_dir)
    assert saved.hidden_size == 32


def test_the_sampling_settings_are_saved_with_the_model(data, tmp_path):
    output_dir = tmp_path / "run"
    pretrain_causal_lm.main(causal_argv(data, output_dir, "--max_steps", "1", "--save_strategy", "no",
                                        "--sample_temperature", "0.6", "--sample_top_k", "7", "--sample_top_p", "0.9"))
    generation = AutoModelForCausalLM.from_pretrained(output_dir).generation_config
    assert (generation.do_sample, generation.temperature, generation.top_k, generation.top_p) == (True, 0.6, 7, 0.9)


# =====================================================================================================================
# Arguments used after training are checked before it
# =====================================================================================================================

# (recipe, arguments added to the valid ones, the error expected)
BAD_ARGUMENTS = {
    "block_size 0": ("pretrain_causal_lm", ["--block_size", "0"], r"--block_size must be at least 2.*got 0"),
    "block_size -5": ("pretrain_causal_lm", ["--block_size", "-5"], r"--block_size must be at least 2.*got -5"),
    "block_size 1": ("pretrain_causal_lm", ["--block_size", "1"], r"--block_size must be at least 2 \(a block of one"),
    "temperature 0": ("pretrain_causal_lm", ["--sample_temperature", "0"], r"--sample_temperature must be a number "
                                                                           r"above 0, got 0.0"),
    "temperature nan": ("pretrain_causal_lm", ["--sample_temperature", "nan"], r"--sample_temperature .* got nan"),
    "temperature -1": ("pretrain_causal_lm", ["--sample_temperature", "-1"], r"--sample_temperature .* got -1.0"),
    "top_k -1": ("pretrain_causal_lm", ["--sample_top_k", "-1"], r"--sample_top_k must be 0 \(all tokens\) or more"),
    "top_p 0": ("pretrain_causal_lm", ["--sample_top_p", "0"], r"--sample_top_p must be in \(0, 1\], got 0.0"),
    "top_p 1.5": ("pretrain_causal_lm", ["--sample_top_p", "1.5"], r"--sample_top_p must be in \(0, 1\], got 1.5"),
    "top_p nan": ("pretrain_causal_lm", ["--sample_top_p", "nan"], r"--sample_top_p must be in \(0, 1\], got nan"),
    "sample length -1": ("pretrain_causal_lm", ["--sample_max_new_tokens", "-1"], r"--sample_max_new_tokens must be"),
    "max_train_samples 0": ("pretrain_causal_lm", ["--max_train_samples", "0"],
                            r"--max_train_samples must be at least 1.*got 0: training would have no data"),
    "max_eval_samples 0": ("finetune_classification", ["--max_eval_samples", "0"],
                           r"--max_eval_samples must be at least 1.*got 0"),
    "num_train_epochs 0": ("finetune_classification", ["--num_train_epochs", "0"],
                           r"--num_train_epochs 0.0: expected a positive, finite number of epochs"),
    "num_train_epochs nan": ("pretrain_masked_lm", ["--num_train_epochs", "nan"], r"--num_train_epochs nan: expected"),
    "mlm_probability 0": ("pretrain_masked_lm", ["--mlm_probability", "0"], r"--mlm_probability must be in \(0, 1\)"),
    "mlm_probability 1": ("pretrain_masked_lm", ["--mlm_probability", "1"], r"--mlm_probability must be in \(0, 1\)"),
    "mlm_probability nan": ("pretrain_masked_lm", ["--mlm_probability", "nan"], r"--mlm_probability .* got nan"),
    "replace shares": ("pretrain_masked_lm", ["--mask_replace_prob", "0.9", "--random_replace_prob", "0.2"],
                       r"--mask_replace_prob 0.9 and --random_replace_prob 0.2 add up to more than 1"),
    "mlm length 0": ("pretrain_masked_lm", ["--max_seq_length", "0"], r"--max_seq_length must be at least 1"),
    "mlm length 2": ("pretrain_masked_lm", ["--max_seq_length", "2"],
                     r"--max_seq_length 2 leaves no room for a text token: a new encoder tokenizer adds 2 special "
                     r"token\(s\) to every example. Give --max_seq_length 3 or more"),
    "classification length 0": ("finetune_classification", ["--max_seq_length", "0"],
                                r"--max_seq_length must be at least 1, got 0"),
    "classification length 1": ("finetune_classification", ["--max_seq_length", "1"],
                                r"--max_seq_length 1 leaves no room for a text token"),
    "num_beams 0": ("train_translation", ["--num_beams", "0"], r"--num_beams must be at least 1, got 0"),
    "length_penalty nan": ("train_translation", ["--length_penalty", "nan"], r"--length_penalty must be a finite"),
    "max_target_length 0": ("train_translation", ["--max_target_length", "0"], r"--max_target_length must be at least"),
    "max_target_length 1": ("train_translation", ["--max_target_length", "1"],
                            r"--max_target_length 1 leaves no room for a text token: a new seq2seq tokenizer adds 1"),
    "max_source_length 1": ("train_translation", ["--max_source_length", "1"],
                            r"--max_source_length 1 leaves no room for a text token"),
    "generation_num_beams 0": ("train_translation", ["--generation_num_beams", "0"],
                               r"--generation_num_beams must be at least 1"),
    "generation_max_length 1": ("train_translation", ["--generation_max_length", "1"],
                                r"--generation_max_length must be at least 2"),
    "tokenizer max_train_samples 0": ("train_tokenizer", ["--max_train_samples", "0"],
                                      r"--max_train_samples must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_arguments_used_after_training_are_refused_before_it(case, data, tmp_path, tripwire):
    name, extra, expected = BAD_ARGUMENTS[case]
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=expected):
        RECIPE_MODULES[name].main([*recipe_argv(name, data, output_dir), *extra])
    assert not output_dir.exists()


def test_a_given_tokenizer_is_checked_by_what_it_adds(data, tmp_path, tripwire):
    # An encoder tokenizer adds [CLS] and [SEP]: --max_seq_length 2 leaves no room, whoever trained the tokenizer.
    tokenizer = train_tokenizer(["a fine film", "a dull film"] * 3, tokenizer_type="word", min_frequency=1,
                                family="encoder")
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=rf"--max_seq_length 2 leaves no room for a text token: {tmp_path / 'tok'} "
                                         rf"adds 2 special token\(s\)"):
        finetune_classification.main([*recipe_argv("finetune_classification", data, tmp_path / "run"),
                                      "--tokenizer_name", str(tmp_path / "tok"), "--max_seq_length", "2"])


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_per_text_is_what_the_trained_tokenizer_adds(family):
    tokenizer = train_tokenizer(["one two three", "two three four"] * 3, tokenizer_type="word", min_frequency=1,
                                family=family)
    for pair in (False, True):
        assert special_tokens_per_text(family, pair) == tokenizer.num_special_tokens_to_add(pair=pair)


def test_an_unknown_encoding_is_refused_naming_the_file(data, tmp_path, tripwire):
    with pytest.raises(DataError, match=rf"--encoding 'utf-9' \(for {data['sst2']}\) is not a text encoding"):
        finetune_classification.main([*recipe_argv("finetune_classification", data, tmp_path / "run"),
                                      "--encoding", "utf-9"])
    path = write(tmp_path / "train.csv", "text,label\na,1\n")
    with pytest.raises(DataError, match=rf"{path}: --encoding 'utf-9' is not a text encoding"):
        read_data_file(path, encoding="utf-9")


# =====================================================================================================================
# Data: one class per label, clear errors naming the file and line
# =====================================================================================================================


def splits(tmp_path, train: tuple[str, str], validation: tuple[str, str] | None = None):
    data_args = DataArguments(train_file=write(tmp_path / train[0], train[1]),
                              validation_file=write(tmp_path / validation[0], validation[1]) if validation else None,
                              validation_split_percentage=0)
    return load_raw_datasets(data_args, contiguous_validation=False)


def test_labels_that_differ_only_by_surrounding_whitespace_are_one_class(tmp_path):
    raw, sources = splits(tmp_path, ("train.tsv", "sentence\tlabel\ngood\tpos\nbad\tneg\nfine\t pos\nawful\tneg \n"),
                          ("dev.tsv", "sentence\tlabel\nok\tpos \n"))
    id2label, label2id = build_label_maps(raw, sources, "label")
    assert id2label == {0: "neg", 1: "pos"}
    assert map_labels(raw, "label", label2id)["train"]["labels"] == [1, 0, 1, 0]


def test_json_labels_0_1_and_1_0_are_two_classes_named_as_integers(tmp_path):
    raw, sources = splits(tmp_path, ("train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'
                                                    '{"text": "c", "label": 1.0}\n'),
                          ("dev.csv", "text,label\nd,1\n"))
    id2label, label2id = build_label_maps(raw, sources, "label")
    assert id2label == {0: "0", 1: "1"}
    assert map_labels(raw, "label", label2id)["train"]["labels"] == [0, 1, 1]


def test_a_label_column_mixing_numbers_and_text_names_the_lines(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'
                                           '{"text": "c", "label": "pos"}\n')
    with pytest.raises(DataError, match=rf"{path}: column 'label' mixes kinds of values: line 1 holds 0 \(a number\), "
                                        rf"line 3 holds 'pos' \(text\)"):
        read_data_file(path)
    path = write(tmp_path / "list.json", '[{"text": "a", "label": "1"}, {"text": "b", "label": 1}]')
    with pytest.raises(DataError, match=r"list.json: column 'label' mixes kinds of values: record 1 of the JSON list "
                                        r"holds '1' \(text\), record 2 of the JSON list holds 1 \(a number\)"):
        read_data_file(path)


def test_an_empty_label_is_refused_naming_the_line(tmp_path):
    raw, sources = splits(tmp_path, ("train.tsv", "sentence\tlabel\ngood\tpos\nbad\t  \nfine\tneg\n"))
    with pytest.raises(DataError, match=r"train.tsv, line 3: column 'label' holds '  ', an empty label"):
        build_label_maps(raw, sources, "label")


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    bom = b"\xef\xbb\xbf"
    table = read_data_file(write(tmp_path / "excel.csv", bom + "sentence,label\ngood,1\n".encode()))
    assert table.column_names[:2] == ["sentence", "label"] and table[0]["sentence"] == "good"
    assert read_data_file(write(tmp_path / "text.txt", bom + b"First line\n"))[0]["text"] == "First line\n"
    # A bad byte is still reported where it is, counted without the mark.
    with pytest.raises(DataError, match=r"bad.txt, line 1, column 3: byte 0xFF"):
        read_data_file(write(tmp_path / "bad.txt", bom + b"ab\xff\n"))


def test_a_number_where_text_is_expected_names_the_file_and_line(tmp_path, data, tripwire):
    path = write(tmp_path / "train.jsonl", '{"text": 5, "label": 0}\n{"text": 7, "label": 1}\n')
    raw, sources = load_raw_datasets(DataArguments(train_file=path, validation_split_percentage=0),
                                     contiguous_validation=False)
    with pytest.raises(DataError, match=rf"{path}, line 1: column 'text' \(--text_column_name\) holds 5 \(int\); "
                                        rf"expected text"):
        require_text(raw, sources, {"text": "--text_column_name"})
    with pytest.raises(DataError, match=r"train.jsonl, line [12]: column 'text' \(--text_column_name\) holds [57]"):
        finetune_classification.main(["--train_file", path, "--output_dir", str(tmp_path / "run"), *QUIET])


def test_column_oriented_json_is_refused_naming_the_file(tmp_path):
    path = write(tmp_path / "columns.json", json.dumps({"text": ["a", "b", "c"], "label": [0, 1, 0]}, indent=1))
    with pytest.raises(DataError, match=rf"{path}: one JSON object of columns \('text': 3 values, 'label': 3 values\); "
                                        rf"expected one object per example"):
        read_data_file(path)


def test_values_arrow_cannot_hold_in_one_column_name_the_file(tmp_path):
    path = write(tmp_path / "nested.jsonl", '{"text": "a", "meta": {"x": 1}}\n{"text": "b", "meta": {"x": "one"}}\n')
    with pytest.raises(DataError, match=rf"{path}: the values of a column do not share one type"):
        read_data_file(path)


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_corrupt_gz_file_is_a_data_error_naming_it(damage, tmp_path):
    whole = gzip.compress("Ein Hund rennt.\n".encode() * 200)
    write(tmp_path / "train.en", "A dog runs.\n" * 200)
    path = write(tmp_path / "train.de.gz", whole[: len(whole) // 2] if damage == "truncated" else b"PK\x03\x04 zip")
    with pytest.raises(DataError, match=rf"{path}: not a whole gzip file"):
        train_translation.read_parallel_text(str(tmp_path / "train"), "en", "de")


def test_no_training_step_for_data_errors(tmp_path, tripwire):
    # The data checks of the translation recipe run before its tokenizer is trained.
    write(tmp_path / "train.en", "A dog runs.\n")
    write(tmp_path / "train.de.gz", b"\x1f\x8b\x08 cut")
    with pytest.raises(DataError, match="not a whole gzip file"):
        train_translation.main(["--train_file", str(tmp_path / "train"), "--output_dir", str(tmp_path / "run"),
                                *QUIET])


def test_a_schedule_that_trains_nothing_is_refused_naming_the_flag(tmp_path):
    args = hf_blueprint.recipe_args.RecipeTrainingArguments(output_dir=str(tmp_path), do_train=True,
                                                            num_train_epochs=math.inf)
    with pytest.raises(ValueError, match="--num_train_epochs inf: expected a positive, finite number"):
        hf_blueprint.recipe_args.prepare_run(args)
