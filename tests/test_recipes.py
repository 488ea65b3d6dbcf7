"""End-to-end tests of the recipes in `recipes/` and of the shared recipe code (data, tokenizers, metrics).

Each recipe runs for real on a small slice of the shipped data with a tiny model (hidden 32, 2 layers, a few steps);
the saved folders are reloaded through the Auto classes, and the reported metrics are recomputed from the reloaded
model's own predictions. Bad data must fail with a message naming the file, the line or column, and what was
expected. The whole file runs in well under a minute on two shared CPU cores.
"""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EvalPrediction,
)

import hf_blueprint
from hf_blueprint.data import (
    DataError,
    build_label_maps,
    group_texts,
    load_raw_datasets,
    read_data_file,
    require_columns,
    split_contiguous_tail,
)
from hf_blueprint.metrics import classification_metrics, language_model_metrics, load_metric
from hf_blueprint.recipe_args import DataArguments, ModelArguments, build_config, parse_args
from hf_blueprint.tokenizer import SPECIAL_TOKEN_LIST, train_tokenizer


ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DATA = RECIPES / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
SST2 = DATA / "sst2"
TREC = DATA / "trec"

sys.path.insert(0, str(RECIPES))
import finetune_classification  # noqa: E402
import pretrain_causal_lm  # noqa: E402
import pretrain_masked_lm  # noqa: E402
import quickstart  # noqa: E402
import train_tokenizer as tokenizer_recipe  # noqa: E402  (not to shadow hf_blueprint's train_tokenizer)


TINY = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
        "max_position_embeddings=64,hidden_dropout_prob=0.0")
QUIET = ["--log_level", "error", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0",
         "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--logging_steps", "5"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine two spin-waiting OpenMP threads
    # made a training step up to 40x slower (docs/RESULTS.md). Restored for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_library_logging():
    # The recipes set transformers' and datasets' verbosity and the level of the package's and the root logger, as the
    # examples do; other test files (e.g. ones that catch the package's warnings) must not see it.
    import datasets
    import logging

    loggers = [logging.getLogger(name) for name in ("hf_blueprint", "__main__", None)]
    before = transformers.logging.get_verbosity(), datasets.logging.get_verbosity(), [lg.level for lg in loggers]
    yield
    transformers.logging.set_verbosity(before[0])
    datasets.logging.set_verbosity(before[1])
    for logger, level in zip(loggers, before[2]):
        logger.setLevel(level)


def write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory) -> str:
    """The first 20,000 characters of tinyshakespeare: 18,000 train / 2,000 validation."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000]
    return write(tmp_path_factory.mktemp("data") / "shakespeare.txt", text)


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory) -> dict:
    """400 SST-2 training rows and 64 dev rows, as .tsv files in the GLUE layout."""
    folder = tmp_path_factory.mktemp("sst2")
    train = SST2.joinpath("train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    dev = SST2.joinpath("dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    return {"train": write(folder / "train.tsv", "".join(train[:401])),
            "dev": write(folder / "dev.tsv", "".join(dev[:65]))}


# ---------------------------------------------------------------------------------------------------------------------
# Metric modules: loaded by path through `evaluate`, computed from the predictions they are given
# ---------------------------------------------------------------------------------------------------------------------


def test_accuracy_module_counts_correct_predictions():
    accuracy = load_metric("accuracy")
    references = [0, 1, 2, 0, 1, 2]
    assert accuracy.compute(predictions=[0, 1, 1, 2, 1, 0], references=references)["accuracy"] == pytest.approx(0.5)
    # One more wrong prediction lowers it by exactly one example.
    assert accuracy.compute(predictions=[1, 1, 1, 2, 1, 0], references=references)["accuracy"] == pytest.approx(2 / 6)
    assert accuracy.compute(predictions=[0, 1, 1, 2, 1, 0], references=references, normalize=False)["accuracy"] == 3


def test_f1_module_macro_averages_per_class_scores():
    f1 = load_metric("f1")
    predictions, references = [0, 2, 1, 0, 0, 1], [0, 1, 2, 0, 1, 2]
    # Class 0: P = 2/3, R = 1 -> F1 0.8; classes 1 and 2: no true positives -> 0. Macro = 0.8 / 3.
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx(0.8 / 3)
    assert f1.compute(predictions=predictions, references=references, average=None)["f1"] == pytest.approx(
        [0.8, 0.0, 0.0])
    assert f1.compute(predictions=predictions, references=references, average="micro")["f1"] == pytest.approx(1 / 3)
    # Fixing one prediction (the 2nd: 2 -> 1) gives class 1 a true positive: 3 predicted, 2 true -> F1 2/5.
    fixed = [0, 1, 1, 0, 0, 1]
    assert f1.compute(predictions=fixed, references=references)["f1"] == pytest.approx((0.8 + 0.4 + 0.0) / 3)
    # Macro differs from accuracy when classes are imbalanced: a majority-class guesser scores 0.9 vs 0.47.
    lazy = f1.compute(predictions=[0] * 10, references=[0] * 9 + [1])["f1"]
    assert lazy == pytest.approx((2 * 9 / 19 + 0.0) / 2)


def test_perplexity_module_is_exp_of_mean_negative_log_likelihood():
    perplexity = load_metric("perplexity")
    result = perplexity.compute(predictions=[math.log(0.5), math.log(0.25)])
    assert result["perplexity"] == pytest.approx(math.sqrt(8))  # exp(-(ln 1/2 + ln 1/4) / 2) = 2^1.5
    assert result["num_tokens"] == 2
    # A worse prediction for one token raises the perplexity.
    assert perplexity.compute(predictions=[math.log(0.5), math.log(0.1)])["perplexity"] > result["perplexity"]
    with pytest.raises(ValueError, match="expected log-probabilities"):
        perplexity.compute(predictions=[0.7, 2.3])


def test_classification_metrics_score_the_argmax_of_the_logits():
    compute = classification_metrics()
    logits = np.array([[2.0, 0.1], [0.3, 1.0], [1.5, -1.0], [0.0, 0.4]])
    labels = np.array([0, 1, 1, 1])
    metrics = compute(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    logits[2] = [-1.0, 1.5]  # the wrong prediction becomes right
    assert compute(EvalPrediction(predictions=logits, label_ids=labels))["accuracy"] == pytest.approx(1.0)


def test_language_model_metrics_match_the_cross_entropy_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[1, 4:] = -100  # padding: not scored
    for causal in (True, False):
        preprocess, compute = language_model_metrics(causal=causal)
        log_probs, argmax = preprocess(logits, labels)
        metrics = compute(EvalPrediction(predictions=(log_probs.numpy(), argmax.numpy()), label_ids=labels.numpy()))
        scored_logits, scored_labels = (logits[:, :-1], labels[:, 1:]) if causal else (logits, labels)
        loss = torch.nn.functional.cross_entropy(scored_logits.reshape(-1, 11), scored_labels.reshape(-1))
        assert metrics["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
        mask = scored_labels != -100
        expected_accuracy = (scored_logits.argmax(-1)[mask] == scored_labels[mask]).float().mean().item()
        assert metrics["accuracy"] == pytest.approx(expected_accuracy)


# ---------------------------------------------------------------------------------------------------------------------
# Data: formats, splits, and clear errors for bad data
# ---------------------------------------------------------------------------------------------------------------------


def test_trec_reader_replaces_the_0xf0_byte_as_the_original_loaders_do(caplog):
    with caplog.at_level("WARNING", logger="hf_blueprint.data"):
        train = read_data_file(str(TREC / "train_5500.label"))
    assert len(train) == 5452
    assert "sister city" in train[65]["text"] and train[65]["__line__"] == 66
    assert "line(s) [66]" in caplog.text and "0xF0" in caplog.text
    counts = {label: train["label"].count(label) for label in set(train["label"])}
    assert counts == {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}
    test = read_data_file(str(TREC / "TREC_10.label"))
    assert len(test) == 500 and test[0] == {"text": "How far is it from Denver to Aspen ?", "label": "NUM",
                                            "fine_label": "NUM:dist", "__line__": 1}


def test_undecodable_bytes_name_the_file_line_and_byte(tmp_path):
    path = write(tmp_path / "corpus.txt", b"first line\nsecond \xff line\n")
    with pytest.raises(DataError, match=r"corpus.txt, line 2, column 8: byte 0xFF is not valid utf-8"):
        read_data_file(path)
    # The same byte in a TREC file that is not the known 0xF0 is an error too, not silently replaced.
    path = write(tmp_path / "questions.label", b"DESC:def What is a \xff ?\n")
    with pytest.raises(DataError, match=r"questions.label, line 1, column 20: byte 0xFF"):
        read_data_file(path)
    assert read_data_file(path, encoding="latin-1")[0]["text"] == "What is a \xff ?"


@pytest.mark.parametrize("name", ["empty.txt", "empty.tsv", "empty.label", "blank.csv"])
def test_empty_file_is_an_error_naming_it(tmp_path, name):
    path = write(tmp_path / name, "\n  \n" if name.startswith("blank") else "")
    with pytest.raises(DataError, match=rf"{name} is empty: expected"):
        read_data_file(path)


def test_malformed_rows_name_their_line(tmp_path):
    path = write(tmp_path / "bad.tsv", "sentence\tlabel\ngood one\t1\ntoo\tmany\tfields\n")
    with pytest.raises(DataError, match=r"bad.tsv, line 3: expected 2 fields \['sentence', 'label'\]"):
        read_data_file(path)
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_data_file(path)
    path = write(tmp_path / "bad.label", "DESC:def What is it ?\nno label here\n")
    with pytest.raises(DataError, match=r"bad.label, line 2: expected 'COARSE:fine question text'"):
        read_data_file(path)


def test_missing_columns_and_values_name_the_file_and_column(tmp_path):
    data_args = DataArguments(train_file=write(tmp_path / "train.csv", "review,stars\ngreat,5\nbad,1\n"),
                              validation_file=write(tmp_path / "dev.json", '[{"text": "ok", "label": 1}, '
                                                                          '{"text": "meh"}]'))
    raw, sources = load_raw_datasets(data_args, contiguous_validation=False)
    with pytest.raises(DataError, match=r"train.csv: no column 'text' \(expected it as --text_column_name\); "
                                        r"the columns are \['review', 'stars'\]"):
        require_columns(raw, sources, {"text": "--text_column_name"})
    with pytest.raises(DataError, match=r"train.csv: no column 'label' \(expected it as --label_column_name\)"):
        require_columns(raw, sources, {"review": "--text_column_name", "label": "--label_column_name"})
    del raw["train"]
    with pytest.raises(DataError, match=r"dev.json, record 2 of the JSON list: column 'label' \(--label_column_name\) has no value"):
        require_columns(raw, sources, {"text": "--text_column_name", "label": "--label_column_name"})


def test_labels_unseen_in_training_are_an_error(tmp_path):
    data_args = DataArguments(
        train_file=write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\nc,pos\n"),
        validation_file=write(tmp_path / "dev.csv", "text,label\nd,neg\ne,neutral\n"),
    )
    raw, sources = load_raw_datasets(data_args, contiguous_validation=False)
    with pytest.raises(DataError, match=r"dev.csv, line 3: label 'neutral' in column 'label' never occurs in the "
                                        r"training data .*train.csv.*training labels: \['neg', 'pos'\]"):
        build_label_maps(raw, sources, "label")
    del raw["validation"]
    id2label, label2id = build_label_maps(raw, sources, "label")
    assert id2label == {0: "neg", 1: "pos"} and label2id == {"neg": 0, "pos": 1}


def test_integer_labels_are_numbered_numerically_across_formats(tmp_path):
    data_args = DataArguments(train_file=write(tmp_path / "t.csv", "text,label\na,10\nb,2\nc,1\n"),
                              validation_file=write(tmp_path / "v.jsonl", '{"text": "d", "label": 2}\n'))
    raw, sources = load_raw_datasets(data_args, contiguous_validation=False)
    id2label, _ = build_label_maps(raw, sources, "label")
    assert id2label == {0: "1", 1: "2", 2: "10"}  # CSV "2" and JSON 2 are one class


def test_contiguous_split_is_nanogpts_character_split():
    train = read_data_file(str(SHAKESPEARE))
    head, tail = split_contiguous_tail(train, 10, "text")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)  # nanoGPT: data[:int(n * 0.9)]
    assert "".join(head["text"]) == text[:n] and len(text[:n]) == 1_003_854
    assert "".join(tail["text"]) == text[n:] and len(text[n:]) == 111_540


def test_group_texts_packs_whole_blocks_and_copies_labels():
    packed = group_texts({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_size=4, labels=True)
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the remainder [9] is dropped
    assert packed["labels"] == packed["input_ids"]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_text_and_adds_nothing(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:5000]
    tokenizer = train_tokenizer(text.splitlines(keepends=True), tokenizer_type="char", family="decoder")
    assert len(tokenizer) == len(SPECIAL_TOKEN_LIST) + len(set(text))
    sample = "First Citizen:\nBefore we  proceed!\n"
    ids = tokenizer(sample)["input_ids"]
    assert len(ids) == len(sample) and tokenizer.decode(ids) == sample  # no [CLS], not glued, spaces kept
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(sample)["input_ids"] == ids and reloaded.decode(ids) == sample
    assert reloaded.convert_ids_to_tokens(reloaded("#")["input_ids"]) == ["[UNK]"]  # never seen in training


def test_word_tokenizer_keeps_frequent_words_and_maps_rare_ones_to_unk(tmp_path):
    texts = ["what is a cat ?", "what is a dog ?", "who owns the cat ?", "a zebra"]
    tokenizer = train_tokenizer(texts, tokenizer_type="word", family="encoder")  # min_frequency 2 by default
    vocab = set(tokenizer.get_vocab()) - set(SPECIAL_TOKEN_LIST)
    assert vocab == {"what", "is", "a", "cat", "?"}  # dog, who, owns, the, zebra were seen once
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("what is a zebra?")["input_ids"])
    assert tokens == ["[CLS]", "what", "is", "a", "[UNK]", "?", "[SEP]"]  # punctuation splits off the word
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.decode(reloaded("what is a cat ?")["input_ids"], skip_special_tokens=True) == "what is a cat ?"
    assert len(train_tokenizer(texts, tokenizer_type="word", min_frequency=1, family="encoder")) == len(
        SPECIAL_TOKEN_LIST) + 10


def test_sentence_validation_split_holds_out_whole_sentences_and_their_long_phrases(tmp_path):
    script = DATA / "sst_sentences" / "make_sentence_validation.py"
    subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path), "--num_sentences", "50"], check=True,
                   capture_output=True)

    def rows(name):
        lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        assert lines[0] == "sentence\tlabel"
        return [tuple(line.rsplit("\t", 1)) for line in lines[1:]]

    train, validation, test = rows("train.tsv"), rows("validation.tsv"), rows("test.tsv")
    glue = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(validation) == 50 and len(test) == 1821 and 0 < len(glue) - len(train) < len(glue) // 10
    train_phrases = {phrase for phrase, _ in train}
    for sentence, _ in validation:
        words = sentence.split()
        spans = {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 3, len(words) + 1)}
        assert not spans & train_phrases  # no phrase of 3+ words of a held-out sentence is left in training
    assert {label for _, label in validation + test} == {"0", "1"}


def test_pretraining_corpus_keeps_each_text_as_the_fine_tuning_reads_it(tmp_path, monkeypatch):
    # A word-level vocabulary is case-sensitive: a lowercased corpus made TREC's "What", "How", "Who" [UNK] for the
    # model pretrained on it, which then fine-tuned 10 points below one from scratch.
    monkeypatch.syspath_prepend(str(DATA))
    import make_pretraining_corpus

    write(tmp_path / "sst2" / "train_sentences.tsv", "sentence\tlabel\na gorgeous , witty movie .\t1\n")
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\nwitty movie\t1\n")
    make_pretraining_corpus.main(["--sst2_dir", str(tmp_path / "sst2"), "--output", str(tmp_path / "corpus.txt")])
    lines = set((tmp_path / "corpus.txt").read_text(encoding="utf-8").splitlines())
    training, test = ({" ".join(question.split()) for question in make_pretraining_corpus.trec_questions(path)}
                      for path in (str(DATA / "trec" / "train_5500.label"), str(DATA / "trec" / "TREC_10.label")))
    assert training <= lines
    assert not (test - training) & lines  # (10 test questions are also training questions in TREC itself)
    assert {"a gorgeous , witty movie .", "witty movie"} <= lines


def test_bpe_tokenizer_families_and_round_trip(tmp_path):
    lines = SST2.joinpath("train.tsv").read_text(encoding="utf-8").splitlines()[1:3001]
    texts = [line.rsplit("\t", 1)[0] for line in lines]
    encoder = train_tokenizer(texts, tokenizer_type="bpe", vocab_size=600, family="encoder")
    decoder = train_tokenizer(texts, tokenizer_type="bpe", vocab_size=600, family="decoder")
    assert encoder.get_vocab() == decoder.get_vocab()  # one vocabulary; training is deterministic
    assert len(encoder) == 600
    sentence = "a gorgeous , witty , seductive movie ."
    enc_tokens = encoder.convert_ids_to_tokens(encoder(sentence)["input_ids"])
    assert enc_tokens[0] == "[CLS]" and enc_tokens[-1] == "[SEP]"
    pair = encoder.convert_ids_to_tokens(encoder("one", "two")["input_ids"])
    assert pair[0] == "[CLS]" and pair.count("[SEP]") == 2
    dec_ids = decoder(sentence)["input_ids"]
    assert decoder.decode(dec_ids) == sentence and not set(dec_ids) & {encoder.cls_token_id, encoder.sep_token_id}
    assert encoder.decode(encoder(sentence)["input_ids"], skip_special_tokens=True) == sentence
    encoder.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.mask_token == "[MASK]" and reloaded.pad_token == "[PAD]" and reloaded.eos_token == "<|endoftext|>"
    assert reloaded(sentence)["input_ids"] == encoder(sentence)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------------
# Arguments: config files, config overrides, --help
# ---------------------------------------------------------------------------------------------------------------------


def test_config_file_then_flags_that_override_it(tmp_path):
    config = write(tmp_path / "run.yaml", "train_file: a.txt\nblock_size: 32\nmax_steps: 7\nlearning_rate: 1.0e-3\n"
                                          "lr_scheduler_kwargs: {min_lr: 1.0e-4}\nkeep_linebreaks: false\n")
    _, data_args, lm_args, training_args = parse_args(
        (ModelArguments, DataArguments, pretrain_causal_lm.CausalLMArguments, transformers.TrainingArguments),
        [config, "--max_steps", "9", "--output_dir", str(tmp_path)],
    )
    assert (data_args.train_file, lm_args.block_size, training_args.learning_rate) == ("a.txt", 32, 1e-3)
    assert training_args.max_steps == 9 and data_args.keep_linebreaks is False
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-4}


def test_config_overrides_read_none_as_a_choice_where_it_is_one():
    config = build_config(ModelArguments(model_type="blueprint_decoder", config_overrides=(
        "position_embedding_type=none,norm_type=none,sliding_window=none,num_key_value_heads=None")))
    assert (config.position_embedding_type, config.norm_type) == ("none", "none")
    assert config.sliding_window is None and config.num_key_value_heads == config.num_attention_heads


def test_config_overrides_are_validated_by_the_config():
    args = ModelArguments(model_type="blueprint_decoder",
                          config_overrides="hidden_size=64,num_attention_heads=4,position_embedding_type=rope,"
                                           "sliding_window=none,use_cache=false")
    config = build_config(args)
    assert (config.hidden_size, config.num_attention_heads, config.head_dim, config.num_key_value_heads) == (
        64, 4, 16, 4)  # derived fields follow the new heads and width
    assert config.position_embedding_type == "rope" and config.use_cache is False
    with pytest.raises(ValueError, match=r"\['hiden_size'\] are not fields of BlueprintDecoderConfig"):
        build_config(ModelArguments(model_type="blueprint_decoder", config_overrides="hiden_size=64"))
    with pytest.raises(ValueError, match="position_embedding_type='spiral' is not supported"):
        build_config(ModelArguments(model_type="blueprint_decoder", config_overrides="position_embedding_type=spiral"))


@pytest.mark.parametrize("recipe, flags", [
    (tokenizer_recipe, ["--tokenizer_type", "--family", "--train_file", "--dataset_name", "--push_to_hub"]),
    (pretrain_causal_lm, ["--block_size", "--config_overrides", "--resume_from_checkpoint", "--push_to_hub"]),
    (pretrain_masked_lm, ["--mlm_probability", "--mask_replace_prob", "--line_by_line", "--max_train_samples"]),
    (finetune_classification, ["--label_column_name", "--model_name_or_path", "--validation_file", "--test_file"]),
    (quickstart, ["--prompt", "--hidden_size", "--max_steps", "--push_to_hub"]),
])
def test_help_documents_every_flag(recipe, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert recipe.__doc__.strip().splitlines()[0] in help_text
    for flag in flags:
        assert flag in help_text


# ---------------------------------------------------------------------------------------------------------------------
# Recipes end to end
# ---------------------------------------------------------------------------------------------------------------------


def test_train_tokenizer_recipe_saves_a_folder_autotokenizer_loads(tmp_path, shakespeare_slice):
    output_dir = tmp_path / "tok"
    results = tokenizer_recipe.main(["--train_file", shakespeare_slice, "--tokenizer_type", "char",
                                    "--output_dir", str(output_dir)])
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    train_part = Path(shakespeare_slice).read_text(encoding="utf-8")[:18000]  # the validation 10% is held out
    assert len(tokenizer) == results["vocab_size"] == len(SPECIAL_TOKEN_LIST) + len(set(train_part))
    assert tokenizer.decode(tokenizer("First Citizen:\n")["input_ids"]) == "First Citizen:\n"


CAUSAL_STEPS = 150  # enough for the tiny model to use context: it must beat every unigram model on the validation text


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, shakespeare_slice):
    """pretrain_causal_lm from a YAML config file plus command-line overrides, saving a checkpoint every 50 steps."""
    folder = tmp_path_factory.mktemp("clm")
    config = write(folder / "clm.yaml", f"train_file: {shakespeare_slice}\ntokenizer_type: char\nblock_size: 32\n"
                                        f"config_overrides: {TINY},position_embedding_type=learned,norm_position=pre\n"
                                        "max_steps: 50\nlearning_rate: 1.0e-2\n")
    output_dir = folder / "out"
    results = pretrain_causal_lm.main([config, *QUIET, "--max_steps", str(CAUSAL_STEPS), "--save_steps", "50",
                                       "--output_dir", str(output_dir), "--sample_prompt", "KING:",
                                       "--sample_max_new_tokens", "80", "--sample_do_sample", "false",
                                       "--eval_block_sizes", "48"])
    return results, output_dir


def test_causal_lm_recipe_trains_evaluates_samples_and_saves(causal_run, shakespeare_slice):
    results, output_dir = causal_run
    assert results["global_step"] == CAUSAL_STEPS  # the command-line --max_steps won over the config file's 50
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, hf_blueprint.BlueprintDecoderForCausalLM)
    assert (model.config.hidden_size, model.config.position_embedding_type) == (32, "learned")
    assert model.config.vocab_size == len(tokenizer)
    assert (output_dir / "README.md").is_file() and (output_dir / f"checkpoint-{CAUSAL_STEPS}").is_dir()
    card = (output_dir / "README.md").read_text()
    assert "## Architecture" in card and "| `position_embedding_type` | `'learned'` |" in card  # the Blueprint card
    assert (output_dir / "training_curves.png").is_file() and "training_curves.png" in card

    # The model uses context: its loss is below that of the best unigram model of the validation text itself (the
    # entropy of its character frequencies; by Gibbs' inequality no unigram model, whatever its frequencies, does
    # better). A model that only learned how often each character occurs fails this.
    validation = Path(shakespeare_slice).read_text(encoding="utf-8")[18000:]
    frequencies = np.array(list(Counter(validation).values())) / len(validation)
    assert results["eval_loss"] < -(frequencies * np.log(frequencies)).sum()
    # The reported loss is that of the saved model on the last 10% of the text, recomputed here independently.
    ids = [tokenizer(line)["input_ids"] for line in validation.splitlines(keepends=True)]
    blocks = torch.tensor(group_texts({"input_ids": ids}, block_size=32)["input_ids"])
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    assert results["eval_loss"] == pytest.approx(loss, abs=1e-4)
    assert results["eval_perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)

    # Past the 64-position table the sample slides its window (greedy here: no special token can cut it short);
    # the reloaded model generates the same text.
    assert len(results["sample"]) == 80
    assert pretrain_causal_lm.generate_sample(model, tokenizer, "KING:", seed=0) == results["sample"]


def test_causal_lm_recipe_scores_the_validation_text_at_other_lengths(causal_run, shakespeare_slice):
    results, output_dir = causal_run
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    validation = Path(shakespeare_slice).read_text(encoding="utf-8")[18000:]
    ids = [tokenizer(line)["input_ids"] for line in validation.splitlines(keepends=True)]
    blocks = torch.tensor(group_texts({"input_ids": ids}, block_size=48)["input_ids"])
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    assert results["eval_len48_loss"] == pytest.approx(loss, abs=1e-4)
    assert results["sample_tokens"] == 80 and results["sample_tokens_per_second"] > 0


def test_causal_lm_recipe_saves_the_default_chat_template(causal_run):
    from hf_blueprint.chat import DEFAULT_CHAT_TEMPLATE

    _, output_dir = causal_run
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Speak."}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered == "User: Speak.\nAssistant:"


def test_causal_lm_recipe_takes_a_chat_template_and_checks_it_first(tmp_path, shakespeare_slice):
    missing = tmp_path / "no_such_template.jinja"
    with pytest.raises(FileNotFoundError, match="no_such_template.jinja"):
        pretrain_causal_lm.main(["--train_file", shakespeare_slice, "--output_dir", str(tmp_path / "out"),
                                 "--chat_template", str(missing)])
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written


def test_causal_lm_recipe_resumes_from_its_checkpoint(causal_run, shakespeare_slice):
    _, output_dir = causal_run
    results = pretrain_causal_lm.main([
        "--train_file", shakespeare_slice, "--tokenizer_name", str(output_dir), "--block_size", "32",
        "--config_overrides", f"{TINY},position_embedding_type=learned,norm_position=pre", *QUIET,
        "--max_steps", str(CAUSAL_STEPS + 2), "--learning_rate", "1e-2", "--save_strategy", "no",
        "--output_dir", str(output_dir), "--resume_from_checkpoint", "true", "--sample_max_new_tokens", "0",
    ])
    assert results["global_step"] == CAUSAL_STEPS + 2
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == CAUSAL_STEPS + 2 and "sample" not in results


MASKED_LM_ARGS = ["--line_by_line", "--max_seq_length", "48", "--tokenizer_vocab_size", "400", "--config_overrides",
                  TINY, *QUIET, "--max_steps", "40", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, sst2_slice):
    output_dir = tmp_path_factory.mktemp("mlm") / "out"
    results = pretrain_masked_lm.main(["--train_file", sst2_slice["train"], *MASKED_LM_ARGS, "--learning_rate", "5e-3",
                                       "--output_dir", str(output_dir)])
    return results, output_dir


def test_masked_lm_recipe_trains_and_saves_an_encoder(masked_run, sst2_slice, tmp_path):
    results, output_dir = masked_run
    model = AutoModelForMaskedLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, hf_blueprint.BlueprintEncoderForMaskedLM)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a fine film")["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert results["global_step"] == 40 and math.isfinite(results["eval_loss"])
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_token_nll"]))
    # Trained against untrained: the same run at learning rate 0 (the same initial weights, batches and masking) scores
    # the masked tokens of the same validation sentences worse, in loss and in accuracy.
    untrained = pretrain_masked_lm.main(["--train_file", sst2_slice["train"], *MASKED_LM_ARGS, "--learning_rate", "0",
                                         "--output_dir", str(tmp_path / "untrained")])
    assert results["eval_loss"] < untrained["eval_loss"] - 0.5
    assert results["eval_accuracy"] > untrained["eval_accuracy"]


def _predict(model, tokenizer, texts, max_length):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.argmax(-1).numpy()


def _body_weights_equal(model, checkpoint_model) -> bool:
    ours, theirs = model.base_model.state_dict(), checkpoint_model.base_model.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_finetune_from_the_mlm_checkpoint(masked_run, sst2_slice, tmp_path):
    _, mlm_dir = masked_run
    output_dir = tmp_path / "ft"
    # Learning rate 0: the saved body must be exactly the pretrained encoder, proving it was loaded, not re-initialized.
    results = finetune_classification.main([
        "--model_name_or_path", str(mlm_dir), "--train_file", sst2_slice["train"],
        "--validation_file", sst2_slice["dev"], *QUIET, "--max_steps", "2", "--learning_rate", "0",
        "--save_strategy", "no", "--output_dir", str(output_dir),
    ])
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    assert isinstance(model, hf_blueprint.BlueprintEncoderForSequenceClassification)
    assert _body_weights_equal(model, AutoModelForMaskedLM.from_pretrained(mlm_dir))
    assert model.config.id2label == {0: "0", 1: "1"} and results["family"] == "encoder"
    dev = [line.rsplit("\t", 1) for line in Path(sst2_slice["dev"]).read_text().splitlines()[1:]]
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    predictions = _predict(model, tokenizer, [text for text, _ in dev], 64)
    assert results["eval_accuracy"] == pytest.approx(np.mean(predictions == np.array([int(y) for _, y in dev])))


def test_finetune_from_the_causal_lm_checkpoint(causal_run, tmp_path):
    _, clm_dir = causal_run
    train = write(tmp_path / "train.jsonl", "".join(
        json.dumps({"text": text, "label": label}) + "\n"
        for text, label in [("KING: hail", "royal"), ("Citizen: bread", "common"), ("QUEEN: rest", "royal"),
                            ("Citizen: corn", "common")] * 4))
    results = finetune_classification.main([
        "--model_name_or_path", str(clm_dir), "--train_file", train, "--validation_split_percentage", "25",
        *QUIET, "--max_steps", "2", "--learning_rate", "0", "--save_strategy", "no",
        "--output_dir", str(tmp_path / "ft"),
    ])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft")
    assert isinstance(model, hf_blueprint.BlueprintDecoderForSequenceClassification)
    assert _body_weights_equal(model, AutoModelForCausalLM.from_pretrained(clm_dir))
    assert model.config.label2id == {"common": 0, "royal": 1} and results["family"] == "decoder"
    assert "eval_accuracy" in results and "eval_macro_f1" in results


def test_classification_from_scratch_on_trec(tmp_path):
    output_dir = tmp_path / "trec"
    results = finetune_classification.main([
        "--train_file", str(TREC / "train_5500.label"), "--test_file", str(TREC / "TREC_10.label"),
        "--max_train_samples", "600", "--max_eval_samples", "100", "--tokenizer_vocab_size", "500",
        "--config_overrides", f"{TINY},classifier_pooling=mean", *QUIET, "--max_steps", "15",
        "--learning_rate", "3e-3", "--save_strategy", "no", "--output_dir", str(output_dir),
    ])
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert list(model.config.label2id) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    # The test metrics are those of the saved model's predictions on the first 100 official test questions.
    test = read_data_file(str(TREC / "TREC_10.label")).select(range(100))
    predictions = _predict(model, tokenizer, list(test["text"]), 64)
    references = np.array([model.config.label2id[label] for label in test["label"]])
    assert results["test_accuracy"] == pytest.approx(np.mean(predictions == references))
    per_class = []
    for c in np.union1d(predictions, references):
        tp = np.sum((predictions == c) & (references == c))
        per_class.append(2 * tp / (np.sum(predictions == c) + np.sum(references == c)))
    assert results["test_macro_f1"] == pytest.approx(np.mean(per_class))
    assert results["train_examples"] == 600 and "eval_accuracy" in results  # validation carved out of train


def test_classification_rejects_validation_labels_training_never_saw(tmp_path):
    train = write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\t1\nodd\t2\n")
    with pytest.raises(DataError, match=r"dev.tsv, line 3: label '2' in column 'label' never occurs"):
        finetune_classification.main(["--train_file", train, "--validation_file", dev, "--output_dir",
                                      str(tmp_path / "out"), *QUIET])


def test_quickstart_runs_as_a_script(tmp_path, shakespeare_slice):
    output_dir = tmp_path / "quick"
    completed = subprocess.run(
        [sys.executable, str(RECIPES / "quickstart.py"), "--train_file", shakespeare_slice, "--max_steps", "5",
         "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--block_size", "32",
         "--sample_max_new_tokens", "40", "--save_strategy", "no", "--output_dir", str(output_dir)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out
    assert "| reloaded model, same sample" in out and "| yes" in out
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.num_hidden_layers == 1
    assert (output_dir / "attention_map.png").is_file() and (output_dir / "training_curves.png").is_file()
    assert len(AutoTokenizer.from_pretrained(output_dir / "tokenizer")) == len(AutoTokenizer.from_pretrained(output_dir))


# ---------------------------------------------------------------------------------------------------------------------
# Padding-free batches (--padding_free): the same training as padded batches, without computing on padding
# ---------------------------------------------------------------------------------------------------------------------


def test_padding_free_classification_recipe_matches_the_padded_run(tmp_path, sst2_slice):
    def run(*extra):
        return finetune_classification.main([
            "--train_file", sst2_slice["train"], "--validation_file", sst2_slice["dev"], "--tokenizer_vocab_size",
            "400", "--config_overrides", f"{TINY},classifier_pooling=mean", *QUIET, "--max_steps", "6",
            "--learning_rate", "3e-3", "--save_strategy", "no", "--output_dir", str(tmp_path / f"run{len(extra)}"),
            *extra,
        ])

    padded, padding_free = run(), run("--padding_free")
    assert (padded["batches"], padding_free["batches"]) == ("padded", "padding-free (examples packed into one row)")
    assert padding_free["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-5)
    assert padding_free["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
    assert padding_free["eval_accuracy"] == padded["eval_accuracy"]


def test_unlabeled_test_file_is_predicted_in_file_order(tmp_path, sst2_slice):
    # group_by_length also reorders evaluation batches in transformers 5; the written predictions must not move.
    texts = [line.rsplit("\t", 1)[0] for line in Path(sst2_slice["dev"]).read_text(encoding="utf-8").splitlines()[1:]]
    test_file = write(tmp_path / "test.tsv", "sentence\n" + "".join(f"{text}\n" for text in texts))
    results = finetune_classification.main([
        "--train_file", sst2_slice["train"], "--test_file", test_file, "--validation_split_percentage", "10",
        "--tokenizer_vocab_size", "400", "--config_overrides", TINY, *QUIET, "--max_steps", "80",
        "--learning_rate", "1e-2", "--save_strategy", "no", "--train_sampling_strategy", "group_by_length",
        "--output_dir", str(tmp_path / "out"),
    ])
    written = Path(results["test_predictions_file"]).read_text(encoding="utf-8").splitlines()
    assert written[0] == "index\tprediction" and len(written) == len(texts) + 1
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        expected = [model.config.id2label[int(model(**tokenizer(text, truncation=True, return_tensors="pt")).logits.argmax())]
                    for text in texts]
    assert [line.split("\t")[1] for line in written[1:]] == expected
    assert len(set(expected)) > 1  # both classes predicted: an order mistake would show


def test_padding_free_masked_lm_recipe_matches_the_padded_run(masked_run, sst2_slice, tmp_path):
    padded, _ = masked_run
    padding_free = pretrain_masked_lm.main(["--train_file", sst2_slice["train"], *MASKED_LM_ARGS, "--learning_rate",
                                            "5e-3", "--output_dir", str(tmp_path / "out"), "--padding_free"])
    # The same seed masks the same tokens in both layouts, so the losses agree to float rounding.
    assert padding_free["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-5)
    assert padding_free["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
    assert padding_free["eval_accuracy"] == padded["eval_accuracy"]


def test_padding_free_masked_lm_needs_line_by_line(tmp_path, sst2_slice):
    with pytest.raises(ValueError, match="--padding_free needs --line_by_line"):
        pretrain_masked_lm.main(["--train_file", sst2_slice["train"], "--padding_free", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("recipe", [finetune_classification, pretrain_masked_lm])
def test_help_explains_padding_free(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--padding_free" in help_text and "position_ids restart at 0 for each" in help_text


# ---------------------------------------------------------------------------------------------------------------------
# Translation: train_translation.py, the sacrebleu module, parallel data
# ---------------------------------------------------------------------------------------------------------------------

import gzip  # noqa: E402

import sacrebleu  # noqa: E402
from transformers import AutoModelForSeq2SeqLM  # noqa: E402

import train_translation  # noqa: E402
from hf_blueprint.metrics import TranslationMetrics, moses_lowercase_tokenize  # noqa: E402

MULTI30K = DATA / "multi30k"
TRANSLATION_TINY = TINY.replace("hidden_size=32", "hidden_size=64") + ",norm_position=pre"


def read_gz_lines(path: Path, count: int | None = None) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1][:count]


def test_sacrebleu_module_scores_corpus_bleu_with_its_signature():
    bleu = load_metric("sacrebleu")
    # By hand: 1-gram 5/6 ("the" is clipped to the reference's one), 2-gram 3/5, 3-gram 2/4, 4-gram 1/3, equal
    # lengths (no brevity penalty): BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    result = bleu.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on a mat"]])
    assert result["score"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert result["counts"] == [5, 3, 2, 1] and result["totals"] == [6, 5, 4, 3] and result["bp"] == 1.0
    assert result["signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    # Several references per prediction: each prediction is scored against its own (the second matches here).
    two = bleu.compute(predictions=["a b c d e", "f g h i j"], references=[["x", "a b c d e"], ["f g h i j", "y"]])
    assert two["score"] == pytest.approx(100.0) and two["signature"].startswith("nrefs:2|")
    # Casing counts unless lowercase=True; 13a splits the final period off.
    cased = bleu.compute(predictions=["The cat sat on the mat."], references=["the cat sat on the mat."])
    lowered = bleu.compute(predictions=["The cat sat on the mat."], references=["the cat sat on the mat."],
                           lowercase=True)
    assert cased["score"] < 100 and lowered["score"] == pytest.approx(100.0) and "case:lc" in lowered["signature"]
    with pytest.raises(ValueError, match="same number of references"):
        bleu.compute(predictions=["a", "b"], references=[["a"], ["b", "c"]])


def test_tokenized_lowercase_bleu_uses_the_official_multi30k_references():
    # The preprocessing of bleu_tok_lc, applied to the raw German test2016 references, gives the official
    # lc.norm.tok file that the published Multi30k numbers (fairseq BLEU) are computed against, line for line.
    raw = read_gz_lines(MULTI30K / "test_2016_flickr.de.gz")
    official = read_gz_lines(MULTI30K / "test_2016_flickr.lc.norm.tok.de.gz")
    assert len(raw) == len(official) == 1000
    assert moses_lowercase_tokenize(raw, "de") == official
    assert sum(len(line.split()) for line in official) == 12103  # fairseq's reflen on test2016


def test_parallel_text_and_tables_read_into_a_column_per_language(tmp_path):
    write(tmp_path / "train.en", "A dog runs.\nTwo men talk.\r\n")
    write(tmp_path / "train.de.gz", gzip.compress("Ein Hund rennt.\nZwei Männer reden.\n".encode()))
    for given in ("train", "train.en"):  # the prefix, or the source file itself
        dataset, source = train_translation.read_parallel_text(str(tmp_path / given), "en", "de")
        assert dataset["en"] == ["A dog runs.", "Two men talk."] and dataset["de"][1] == "Zwei Männer reden."
        assert dataset["__line__"] == [1, 2] and source.endswith("train.en + " + str(tmp_path / "train.de.gz"))
    # The shipped Multi30k files, gzipped, by prefix.
    dataset, _ = train_translation.read_parallel_text(str(MULTI30K / "val"), "en", "de")
    assert len(dataset) == 1014 and dataset[0] == {"en": "A group of men are loading cotton onto a truck",
                                                   "de": "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen",
                                                   "__line__": 1}
    # run_translation.py's JSON format, as a file and as a dataset folder (what --dataset_name loads).
    record = json.dumps({"translation": {"en": "A cat.", "de": "Eine Katze."}}) + "\n"
    folder = tmp_path / "hub_like"
    write(folder / "train.jsonl", record * 4)
    write(folder / "validation.jsonl", record)
    mt_args = train_translation.TranslationArguments()
    model_args = train_translation.TranslationModelArguments(cache_dir=str(tmp_path / "cache"))
    raw, sources = train_translation.load_translation_data(DataArguments(dataset_name=str(folder)), mt_args, seed=0,
                                                           model_args=model_args)
    assert set(raw) == {"train", "validation"} and raw["validation"][0]["de"] == "Eine Katze."
    raw, sources = train_translation.load_translation_data(
        DataArguments(train_file=str(folder / "train.jsonl"), validation_split_percentage=25), mt_args, seed=0,
        model_args=model_args)
    assert (len(raw["train"]), len(raw["validation"])) == (3, 1) and "random 25%" in sources["validation"]


EN = "A dog runs.\nTwo men talk.\nA girl sings.\n"
DE = "Ein Hund rennt.\nZwei Männer reden.\nEin Mädchen singt.\n"
# case -> (files to write, --train_file, the error expected)
BAD_TRANSLATION_DATA = {
    "count mismatch": ({"train.en": EN, "train.de": DE.split("\n", 1)[0] + "\n"}, "train",
                       r"train.en has 3 lines but .*train.de has 1: line 2 of .*train.en has no translation"),
    "empty file": ({"train.en": EN, "train.de": ""}, "train", r"train.de is empty: expected one sentence per line"),
    "empty line": ({"train.en": EN, "train.de": DE.replace("Zwei Männer reden.", " ")}, "train",
                   r"train.de, line 2: empty line, but a sentence was expected \(its translation, line 2 of "
                   r".*train.en: 'Two men talk.'\)"),
    "bad byte": ({"train.en": EN.encode() + b"Caf\xe9\n", "train.de": DE + "Café\n"}, "train",
                 r"train.en, line 4, column 4: byte 0xE9 is not valid utf-8"),
    "missing file": ({"train.en": EN}, "train.en", r"found neither .*train.de nor .*train.de.gz"),
    "bad translation column": (
        {"train.jsonl": json.dumps({"translation": {"en": "A dog.", "de": "Ein Hund."}}) + "\n"
                        + json.dumps({"translation": {"en": "A cat."}}) + "\n"}, "train.jsonl",
        r"train.jsonl, line 2: column 'translation' holds \{'en': 'A cat.', 'de': None\}; expected an object with "
        r"the keys 'en' and 'de'"),
    "missing language column": ({"train.tsv": "en\tfr\nA dog.\tUn chien.\n"}, "train.tsv",
                                r"train.tsv: no column 'de' \(expected it as --target_lang\); the columns are "
                                r"\['en', 'fr'\]"),
    "empty cell": ({"train.tsv": "en\tde\nA dog.\tEin Hund.\n \tLeer.\n"}, "train.tsv",
                   r"train.tsv, line 3: column 'en' holds ' '; expected a non-empty sentence"),
}


@pytest.mark.parametrize("case", list(BAD_TRANSLATION_DATA))
def test_bad_translation_data_names_the_file_and_line(tmp_path, case):
    files, train_file, expected = BAD_TRANSLATION_DATA[case]
    for name, content in files.items():
        write(tmp_path / name, content)
    data_args = DataArguments(train_file=str(tmp_path / train_file), validation_split_percentage=0)
    with pytest.raises(DataError, match=expected):
        train_translation.load_translation_data(data_args, train_translation.TranslationArguments(), seed=0,
                                                model_args=train_translation.TranslationModelArguments())


def test_translation_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_translation.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert train_translation.__doc__.strip().splitlines()[0] in help_text
    for flag in ("--source_lang", "--num_beams", "--length_penalty", "--label_smoothing_factor",
                 "--predict_with_generate", "--max_train_samples", "--resume_from_checkpoint", "--dataset_name"):
        assert flag in help_text


# A toy language pair a tiny model learns completely in seconds: each English word has one German word, in the same
# order. Learned for real (every test sentence translated exactly, on 1 or 2 threads and seeds 0-4), not just far
# enough to score above zero: a half-learned task sits on BLEU's cliff, where 3-token outputs have no 4-grams.
TOY_WORDS = {"dog": "Hund", "man": "Mann", "woman": "Frau", "child": "Kind", "runs": "rennt", "sits": "sitzt",
             "red": "rot", "blue": "blau", "water": "Wasser", "house": "Haus"}


def toy_pairs(count: int, rng) -> tuple[str, str]:
    sentences = [[rng.choice(list(TOY_WORDS)) for _ in range(rng.randint(2, 5))] for _ in range(count)]
    english = "".join(" ".join(words).capitalize() + ".\n" for words in sentences)
    german = "".join(" ".join(TOY_WORDS[word] for word in words).capitalize() + ".\n" for words in sentences)
    return english, german


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory):
    """train_translation on 300 toy pairs (train gzipped, as Multi30k ships), 16 validation and 16 test pairs: 500 steps
    of 32 pairs with a warm-up, which learn the task on every seed tried (300 steps, or batches of 8, did not)."""
    import random

    folder = tmp_path_factory.mktemp("mt")
    rng = random.Random(0)
    for split, count in (("train", 300), ("val", 16), ("test", 16)):
        english, german = toy_pairs(count, rng)
        compress = gzip.compress if split == "train" else bytes
        write(folder / f"{split}.en{'.gz' if split == 'train' else ''}", compress(english.encode()))
        write(folder / f"{split}.de{'.gz' if split == 'train' else ''}", compress(german.encode()))
    output_dir = folder / "out"
    results = train_translation.main([
        "--train_file", str(folder / "train"), "--validation_file", str(folder / "val.en"),
        "--test_file", str(folder / "test"), "--tokenizer_vocab_size", "600", "--max_target_length", "32",
        "--config_overrides", TRANSLATION_TINY, *QUIET, "--max_steps", "500", "--per_device_train_batch_size", "32",
        "--learning_rate", "2e-3", "--warmup_steps", "50", "--save_strategy", "no", "--num_beams", "3",
        "--length_penalty", "0.8", "--num_examples_to_print", "2",
        # transformers then also groups the evaluation batches by length; the written translations must not be.
        "--train_sampling_strategy", "group_by_length", "--logging_steps", "100",
        "--output_dir", str(output_dir),
    ])
    return results, output_dir, folder


def test_translation_recipe_trains_translates_and_saves(translation_run, capsys):
    results, output_dir, folder = translation_run
    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, hf_blueprint.BlueprintForConditionalGeneration)
    assert model.config.vocab_size == len(tokenizer) == results["vocab_size"]
    assert model.config.decoder_start_token_id == tokenizer.eos_token_id  # fairseq's and Marian's start token
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("Ein Hund.")["input_ids"])
    assert tokens[-1] == tokenizer.eos_token and tokenizer.eos_token not in tokens[:-1]  # the seq2seq family
    assert (model.generation_config.num_beams, model.generation_config.length_penalty) == (3, 0.8)
    assert (model.config.num_hidden_layers, model.config.decoder_layers) == (2, 2)  # the override reaches both
    assert results["global_step"] == 500 and results["train_pairs"] == 300
    card = (output_dir / "README.md").read_text()
    assert "AutoModelForSeq2SeqLM" in card and "| `decoder_layers` | `2` |" in card

    # The reported test BLEU is that of the saved model's own beam-search translations: regenerated here from the
    # reloaded folder with its saved settings, they are the same texts and score the same numbers.
    sources = (folder / "test.en").read_text(encoding="utf-8").splitlines()
    references = (folder / "test.de").read_text(encoding="utf-8").splitlines()
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**batch)
    translations = [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert len(set(translations)) > 8  # the translations depend on the source, so their order is checked here
    assert translations == results["test_translations"]
    assert (output_dir / "test_translations.txt").read_text(encoding="utf-8").splitlines() == translations
    scores = TranslationMetrics(tokenizer, "de").score(translations, references)
    assert results["test_bleu"] == pytest.approx(scores["bleu"])
    assert results["test_bleu_tok_lc"] == pytest.approx(scores["bleu_tok_lc"])
    # It learned to translate: most test sentences come out exactly as the reference, and on chrF (character n-grams,
    # graded where BLEU jumps) the trained model is far above the same model untrained, decoding with the same settings.
    assert sum(t == r for t, r in zip(translations, references)) >= 12
    torch.manual_seed(0)
    untrained = AutoModelForSeq2SeqLM.from_config(model.config).eval()
    untrained.generation_config = model.generation_config
    with torch.no_grad():
        untrained_translations = tokenizer.batch_decode(untrained.generate(**batch), skip_special_tokens=True)
    chrf_trained = sacrebleu.corpus_chrf(translations, [references]).score
    chrf_untrained = sacrebleu.corpus_chrf([t.strip() for t in untrained_translations], [references]).score
    assert chrf_trained > 90 and chrf_untrained < chrf_trained - 50, (chrf_trained, chrf_untrained)
    assert results["bleu_signatures"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert results["bleu_signatures"]["bleu_tok_lc"].startswith("nrefs:1|case:lc|eff:no|tok:none")
    assert "eval_bleu" in results and len(results["eval_translations"]) == 16


def test_translation_metrics_score_the_generated_ids(translation_run):
    # compute_metrics as the Trainer calls it: generated ids padded with [PAD] within a batch and -100 between
    # batches, labels padded with -100. Changing one translation changes the score.
    results, output_dir, folder = translation_run
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    references = (folder / "test.de").read_text(encoding="utf-8").splitlines()[:4]
    translations = results["test_translations"][:4]

    def padded(ids_list, value):
        width = max(len(ids) for ids in ids_list) + 2
        return np.array([ids + [value] * (width - len(ids)) for ids in ids_list])

    metrics = TranslationMetrics(tokenizer, "de")
    generated = [[tokenizer.eos_token_id] + tokenizer(text)["input_ids"] for text in translations]
    generated[0] += [tokenizer.pad_token_id]
    labels = [tokenizer(text_target=text)["input_ids"] for text in references]
    scores = metrics(EvalPrediction(predictions=padded(generated, -100), label_ids=padded(labels, -100)))
    assert scores == pytest.approx(metrics.score(translations, references))
    perfect = metrics.score(references, references)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["bleu_tok_lc"] == pytest.approx(100.0)
    assert references[0] != references[1]
    one_wrong = metrics.score([references[1]] + references[1:], references)  # sentence 0 given another's translation
    assert one_wrong["bleu"] < perfect["bleu"] and one_wrong["bleu_tok_lc"] < perfect["bleu_tok_lc"]


def test_translation_recipe_refuses_bad_data_before_training(tmp_path):
    write(tmp_path / "train.en", "A dog runs.\nTwo men talk.\n")
    write(tmp_path / "train.de", "Ein Hund rennt.\n")
    with pytest.raises(DataError, match=r"train.en has 2 lines but .*train.de has 1"):
        train_translation.main(["--train_file", str(tmp_path / "train"), "--output_dir", str(tmp_path / "out"),
                                *QUIET])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The shipped configs of the quality runs (docs/RESULTS.md)
# ---------------------------------------------------------------------------------------------------------------------

SHIPPED_CONFIGS = {
    "shakespeare_char.yaml": pretrain_causal_lm,
    "sst2_mlm.yaml": pretrain_masked_lm,
    "sst2_scratch.yaml": finetune_classification,
    "sst2_bpe_mean.yaml": finetune_classification,
    "trec_scratch.yaml": finetune_classification,
    "multi30k_en_de.yaml": train_translation,
    "mlm_corpus.yaml": pretrain_masked_lm,
    "causal_corpus.yaml": pretrain_causal_lm,
    "sst2_minilm.yaml": finetune_classification,
    "trec_minilm.yaml": finetune_classification,
}


def test_every_shipped_config_is_checked():
    assert sorted(SHIPPED_CONFIGS) == sorted(path.name for path in (RECIPES / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_shipped_config_parses_and_gives_a_valid_model_config(name, tmp_path):
    # A typo in a shipped config (an unknown flag or config field, a value out of range) fails here, not minutes
    # into the run it documents.
    recipe = SHIPPED_CONFIGS[name]
    model_args, *_ = parse_args(recipe.ARGUMENTS, [str(RECIPES / "configs" / name), "--output_dir", str(tmp_path)],
                                recipe.DEFAULTS)
    if model_args.model_name_or_path is not None:
        # Fine-tuned from weights made by another run: the config's comments must say how to make them.
        comments = [line for line in (RECIPES / "configs" / name).read_text(encoding="utf-8").splitlines()
                    if line.startswith("#")]
        assert any(model_args.model_name_or_path in line for line in comments)
        return
    config = build_config(model_args)
    assert config.model_type == model_args.model_type
