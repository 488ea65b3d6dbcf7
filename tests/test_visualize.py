"""Tests of hf_blueprint.visualize: attention maps, training curves and the model summary.

The data behind each picture is checked against the model itself (`output_attentions`, `num_parameters`, the
Trainer's log), and each picture is rendered for tiny models of both families into a temporary file and read
back: the right size, not blank, one panel per layer/head requested. Everything is local: a WordLevel tokenizer
built here, tiny models from configs, a 5-step Trainer run. The picture tests skip when matplotlib (the `[viz]`
extra) is missing; the data tests and the missing-matplotlib message test run regardless.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import hf_blueprint
from hf_blueprint import visualize as viz


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


HAS_MATPLOTLIB = _has_matplotlib()
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason=f"matplotlib missing: {viz.INSTALL_HINT}")

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat hid",
    "the old fox saw a bird in the tree",
    "one small bird sang $ two big dogs slept",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
TEXT = "the cat sat on the mat and the dog ran"  # 10 tokens
FAMILIES = ["encoder", "decoder"]
DPI = 60  # small pictures: the tests check structure, not looks


def build_tokenizer():
    """WordLevel over the words of SENTENCES, whitespace split, wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", bos_token="<s>",
                                       eos_token="</s>", model_max_length=32)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_config(family: str, **overrides):
    fields = dict(vocab_size=len(build_tokenizer()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0, initializer_range=0.2,
                  pad_token_id=0, bos_token_id=5, eos_token_id=6)
    fields.update(overrides)
    cls = hf_blueprint.BlueprintDecoderConfig if family == "decoder" else hf_blueprint.BlueprintEncoderConfig
    return cls(**fields)


def tiny_model(family: str, head: str = "lm", seed: int = 0, **overrides):
    names = {("encoder", "lm"): "BlueprintEncoderForMaskedLM", ("decoder", "lm"): "BlueprintDecoderForCausalLM",
             ("encoder", "cls"): "BlueprintEncoderForSequenceClassification",
             ("decoder", "cls"): "BlueprintDecoderForSequenceClassification",
             ("encoder", "base"): "BlueprintEncoderModel", ("decoder", "base"): "BlueprintDecoderModel"}
    torch.manual_seed(seed)
    return getattr(hf_blueprint, names[family, head])(tiny_config(family, **overrides)).eval()


def model_attentions(model, input_ids, attention_mask=None) -> torch.Tensor:
    """What the model itself returns for output_attentions=True, as (layers, heads, q, k) of the first row."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    return torch.stack(out.attentions)[:, 0].float()


def read_png(path):
    from matplotlib.image import imread

    image = imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def assert_picture(path, figure, panels: int):
    """The PNG has the figure's size in pixels, is not blank, and the figure has one axes per panel."""
    assert len(figure.axes) == panels
    image = read_png(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert abs(image.shape[0] - height) < 1 and abs(image.shape[1] - width) < 1  # Agg truncates to whole pixels
    rgb = image[..., :3]
    assert float(rgb.std()) > 0.02, "blank picture"
    assert len({tuple(p) for p in rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 5000)]}) > 10


# ---------------------------------------------------------------------------------------------------------------------
# Attention: the data equals output_attentions
# ---------------------------------------------------------------------------------------------------------------------


ATTENTION_CASES = [
    ("encoder", {}),
    ("decoder", {}),
    ("decoder", {"num_key_value_heads": 2, "position_embedding_type": "rope", "norm_position": "pre"}),
    ("encoder", {"sliding_window": 2, "position_embedding_type": "alibi"}),
]


@pytest.mark.parametrize("family, overrides", ATTENTION_CASES, ids=["encoder", "decoder", "decoder-gqa-rope",
                                                                      "encoder-window-alibi"])
def test_attention_data_equals_output_attentions(tokenizer, family, overrides):
    model = tiny_model(family, **overrides).train()  # attention_data runs in eval mode and restores the mode
    tokens, attentions = viz.attention_data(model, tokenizer, TEXT)
    assert model.training
    model.eval()

    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    assert tokens == TEXT.split()
    assert attentions.shape == (2, 4, n, n) and attentions.dtype == torch.float32
    torch.testing.assert_close(attentions, model_attentions(model, ids), rtol=0, atol=1e-7)
    torch.testing.assert_close(attentions.sum(-1), torch.ones(2, 4, n), rtol=0, atol=1e-5)

    q, k = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    forbidden = torch.zeros(n, n, dtype=torch.bool)
    if family == "decoder":
        forbidden |= k > q  # the causal upper triangle
    if overrides.get("sliding_window"):
        forbidden |= (q - k).abs() >= overrides["sliding_window"]
    assert torch.all(attentions[..., forbidden] == 0), "masked positions must get exactly zero attention"
    assert torch.all(attentions[..., ~forbidden] > 0)
    assert torch.equal(viz.masked_positions(attentions), forbidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_data_padding_gets_zero(tokenizer, family):
    model = tiny_model(family)
    real = len(TEXT.split())
    tokens, attentions = viz.attention_data(model, tokenizer, TEXT, pad_to=real + 4)
    assert tokens == TEXT.split() + ["[PAD]"] * 4

    encoding = tokenizer(TEXT, padding="max_length", max_length=real + 4, return_tensors="pt")
    assert encoding["attention_mask"][0, real:].eq(0).all()
    expected = model_attentions(model, encoding["input_ids"], encoding["attention_mask"])
    torch.testing.assert_close(attentions, expected, rtol=0, atol=1e-7)
    assert torch.all(attentions[:, :, :real, real:] == 0), "real tokens must not attend to padding"
    torch.testing.assert_close(attentions[:, :, :real].sum(-1), torch.ones(2, 4, real), rtol=0, atol=1e-5)
    if family == "decoder":
        assert torch.all(attentions[..., :real, :real].triu(1) == 0)
    # The real tokens see the same weights as without padding.
    _, unpadded = viz.attention_data(model, tokenizer, TEXT)
    torch.testing.assert_close(attentions[:, :, :real, :real], unpadded, rtol=0, atol=1e-6)


def test_attention_data_truncates_to_the_position_table(tokenizer):
    model = tiny_model("decoder", max_position_embeddings=6)
    tokens, attentions = viz.attention_data(model, tokenizer, TEXT)
    assert tokens == TEXT.split()[:6] and attentions.shape[-1] == 6
    with pytest.raises(ValueError, match="non-empty"):
        viz.attention_data(model, tokenizer, "")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rollout(tokenizer, family):
    _, attentions = viz.attention_data(tiny_model(family), tokenizer, TEXT)
    n = attentions.shape[-1]
    rollout = viz.attention_rollout(attentions)
    assert rollout.shape == (2, n, n)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, n), rtol=0, atol=1e-5)

    eye = torch.eye(n)
    steps = [0.5 * eye + 0.5 * layer.mean(0) for layer in attentions]
    steps = [step / step.sum(-1, keepdim=True) for step in steps]
    torch.testing.assert_close(rollout[0], steps[0])
    torch.testing.assert_close(rollout[1], steps[1] @ steps[0])
    # Without the residual term it is the plain product of the head-averaged maps.
    mean = viz.head_average(attentions)
    torch.testing.assert_close(viz.attention_rollout(attentions, residual=0.0)[-1], mean[1] @ mean[0])
    if family == "decoder":
        assert torch.all(rollout.triu(1) == 0), "rollout of a causal model stays causal"
    with pytest.raises(ValueError):
        viz.attention_rollout(attentions, residual=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Attention: the pictures
# ---------------------------------------------------------------------------------------------------------------------


@needs_matplotlib
@pytest.mark.parametrize("family", FAMILIES)
def test_plot_attention_per_head(tmp_path, tokenizer, family):
    tokens, attentions = viz.attention_data(tiny_model(family), tokenizer, TEXT)
    output = tmp_path / "heads.png"
    figure = viz.plot_attention(tokens, attentions, view="heads", layers=[0, -1], heads=[1, 3], output=output,
                                formats=["png", "svg"], dpi=DPI)
    assert_picture(output, figure, panels=4)
    assert "<svg" in (tmp_path / "heads.svg").read_text()[:2000]

    # The picture shows the data: each panel's image is that layer/head's matrix, masked cells masked.
    import numpy as np

    for ax, (layer, head) in zip(figure.axes, [(0, 1), (0, 3), (1, 1), (1, 3)]):
        assert ax.get_title() == f"layer {layer} · head {head}"
        shown = ax.images[0].get_array()
        np.testing.assert_allclose(shown.data, attentions[layer, head].numpy())
        causal = np.triu(np.ones((len(tokens),) * 2, dtype=bool), 1)
        assert np.array_equal(np.ma.getmaskarray(shown), causal if family == "decoder" else ~np.ones_like(causal))
    bottom_left = figure.axes[2]
    assert [t.get_text() for t in bottom_left.get_xticklabels()] == [t.replace("$", r"\$") for t in tokens]
    assert [t.get_text() for t in bottom_left.get_yticklabels()] == tokens


@needs_matplotlib
@pytest.mark.parametrize("family", FAMILIES)
def test_plot_attention_mean_and_rollout(tmp_path, tokenizer, family):
    import numpy as np

    model = tiny_model(family)
    tokens, attentions = viz.attention_data(model, tokenizer, "one small bird sang $ two big dogs")
    assert "$" in tokens  # a dollar sign must not start matplotlib math mode
    mean = viz.plot_attention(tokens, attentions, view="mean", output=tmp_path / "mean.png", dpi=DPI)
    assert_picture(tmp_path / "mean.png", mean, panels=2)
    np.testing.assert_allclose(mean.axes[1].images[0].get_array().data, attentions[1].mean(0).numpy(), rtol=1e-6)

    rollout = viz.plot_attention(tokens, attentions, view="rollout", layers=[-1], output=tmp_path / "roll.png",
                                 dpi=DPI)
    assert_picture(tmp_path / "roll.png", rollout, panels=1)
    np.testing.assert_allclose(rollout.axes[0].images[0].get_array().data,
                               viz.attention_rollout(attentions)[-1].numpy(), rtol=1e-6)

    written = viz.write_attention_map(model, tokenizer, TEXT, tmp_path / "recipe.png", view="mean", dpi=DPI)
    assert written == tmp_path / "recipe.png" and read_png(written).shape[0] > 100

    with pytest.raises(ValueError, match="heads"):
        viz.plot_attention(tokens, attentions, view="mean", heads=[0])
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        viz.plot_attention(tokens, attentions, layers=[5])


# ---------------------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------------------


def write_trainer_state(folder, task: str, steps: int = 60, logging_steps: int = 10, eval_steps: int = 20,
                        config: bool = True):
    """A trainer_state.json as the Trainer writes it: a train entry every `logging_steps` (loss, grad_norm,
    learning_rate with warmup then linear decay), an eval entry every `eval_steps`, the end-of-training summary."""
    folder.mkdir(parents=True, exist_ok=True)
    history = []
    for step in range(logging_steps, steps + 1, logging_steps):
        loss = 1.0 + 3.0 * math.exp(-step / 20)
        lr = 1e-3 * min(1.0, step / 20) * (1 - step / (steps + 10))
        history.append({"loss": round(loss, 4), "grad_norm": 1.0 / step ** 0.5, "learning_rate": lr,
                        "epoch": step / 30, "step": step})
        if step % eval_steps == 0:
            entry = {"eval_loss": loss + 0.2, "eval_runtime": 0.5, "eval_samples_per_second": 100.0,
                     "epoch": step / 30, "step": step}
            if task == "classification":
                entry["eval_accuracy"] = 0.5 + 0.4 * (1 - math.exp(-step / 20))
            history.append(entry)
    history.append({"train_runtime": 12.0, "train_samples_per_second": 10.0, "train_loss": 2.0, "epoch": 2.0,
                    "step": steps})
    state = {"global_step": steps, "epoch": 2.0, "max_steps": steps, "logging_steps": logging_steps,
             "eval_steps": eval_steps, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if not config:
        return state
    architecture = "BlueprintDecoderForCausalLM" if task == "lm" else "BlueprintEncoderForSequenceClassification"
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return state


def test_training_curves_data(tmp_path):
    state = write_trainer_state(tmp_path / "lm", "lm")
    data = viz.training_curves_data(tmp_path / "lm")
    assert list(data) == ["loss", "perplexity", "learning_rate", "grad_norm"]
    train_steps, train_loss = data["loss"]["train"]
    assert train_steps == [10, 20, 30, 40, 50, 60]
    assert data["loss"]["eval"][0] == [20, 40, 60]
    assert data["perplexity"]["train"][1] == pytest.approx([math.exp(x) for x in train_loss])
    assert data["learning_rate"]["learning rate"][1] == [e["learning_rate"] for e in state["log_history"]
                                                        if "learning_rate" in e]
    assert "train_loss" not in str(data)  # the summary entry is not a curve point

    write_trainer_state(tmp_path / "cls", "classification")
    data = viz.training_curves_data(tmp_path / "cls" / "trainer_state.json")
    assert list(data) == ["loss", "accuracy", "learning_rate", "grad_norm"]
    assert data["accuracy"]["eval"][0] == [20, 40, 60]

    # A logged eval_perplexity wins over exp(eval_loss); the latest checkpoint is found inside a folder.
    logged = [{"eval_loss": 2.0, "eval_perplexity": 7.0, "step": 5}, {"loss": 2.5, "step": 5}]
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-12").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    (tmp_path / "run" / "checkpoint-12" / "trainer_state.json").write_text(json.dumps({"log_history": logged}))
    data = viz.training_curves_data(tmp_path / "run")
    assert data["perplexity"]["eval"] == ([5], [7.0])
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        viz.training_curves_data(tmp_path / "nowhere")


@needs_matplotlib
@pytest.mark.parametrize("task, panels", [("lm", 3), ("classification", 3)])
def test_plot_training_curves(tmp_path, task, panels):
    write_trainer_state(tmp_path, task)
    figure = viz.plot_training_curves(tmp_path, output=tmp_path / "curves.png", formats=["png", "svg"], dpi=DPI)
    assert_picture(tmp_path / "curves.png", figure, panels=panels)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == (["loss", "perplexity", "learning rate"] if task == "lm"
                      else ["loss", "accuracy", "learning rate"])
    assert (tmp_path / "curves.svg").stat().st_size > 1000
    assert [line.get_label().split(":")[0] for line in figure.axes[0].get_lines()] == ["train", "eval"]

    picked = viz.plot_training_curves(tmp_path, panels=["learning_rate", "grad_norm"], dpi=DPI)
    assert len(picked.axes) == 2
    with pytest.raises(ValueError, match="No logged values"):
        viz.plot_training_curves(tmp_path, panels=["accuracy" if task == "lm" else "perplexity"])


@needs_matplotlib
def test_real_trainer_run_curves_and_model_card(tmp_path, tokenizer):
    """A real 5-step Trainer run: its trainer_state.json draws, and the recipes' hook writes the PNG into the
    output folder and links it from the model card."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model("decoder").train()
    ids = tokenizer(SENTENCES[0] + " " + SENTENCES[1])["input_ids"]
    rows = [{"input_ids": ids[i: i + 8], "labels": ids[i: i + 8]} for i in range(0, 8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, learning_rate=1e-3, warmup_steps=2, logging_steps=1,
                             eval_strategy="steps", eval_steps=2, save_strategy="no", report_to="none",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4])
    trainer.train()
    trainer.save_state()

    data = viz.training_curves_data(tmp_path, task="lm")
    assert data["loss"]["train"][0] == [1, 2, 3, 4, 5]
    assert data["loss"]["eval"][0][:2] == [2, 4]
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert data["loss"]["train"][1] == pytest.approx(logged)
    assert data["learning_rate"]["learning rate"][1][0] < data["learning_rate"]["learning rate"][1][1]  # warmup

    figure = viz.plot_training_curves(tmp_path, output=tmp_path / "from_state.png", task="lm", dpi=DPI)
    assert_picture(tmp_path / "from_state.png", figure, panels=3)

    path = viz.add_training_curves(trainer)
    assert path == tmp_path / viz.TRAINING_CURVES_FILENAME and path.is_file()
    read_png(path)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert f"]({viz.TRAINING_CURVES_FILENAME})" in card
    assert viz.link_training_curves(tmp_path) and (tmp_path / "README.md").read_text() == card  # idempotent


# ---------------------------------------------------------------------------------------------------------------------
# Model summary
# ---------------------------------------------------------------------------------------------------------------------


def documented_fields():
    """Every switch of the Blueprint configs: the fields BlueprintConfig adds to PretrainedConfig."""
    import dataclasses

    from transformers import PretrainedConfig

    base = {f.name for f in dataclasses.fields(PretrainedConfig)}
    tokens = {"use_cache", "pad_token_id", "bos_token_id", "eos_token_id"}
    return [f.name for f in dataclasses.fields(hf_blueprint.BlueprintConfig) if f.name not in base | tokens]


@pytest.mark.parametrize("family, head, norm_position", [
    ("encoder", "lm", "post"), ("decoder", "lm", "pre"), ("encoder", "cls", "pre"), ("decoder", "cls", "post")])
def test_model_summary(tmp_path, family, head, norm_position):
    overrides = dict(norm_position=norm_position, ffn_type="glu" if head == "cls" else "mlp",
                     position_embedding_type="learned" if family == "encoder" else "rope")
    model = tiny_model(family, head, **overrides)
    summary = viz.model_summary(model)

    switches = {row["switch"]: row["value"] for row in summary["architecture"]}
    assert set(documented_fields()) <= set(switches)
    assert all(switches[name] == getattr(model.config, name) for name in documented_fields())
    assert summary["family"] == family and summary["norm_position"] == norm_position

    counts = {row["component"]: row["parameters"] for row in summary["parameters"]}
    assert summary["total_parameters"] == model.num_parameters() == sum(counts.values())
    assert counts["attention (2 blocks)"] == sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert counts["feed-forward (2 blocks)"] == sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert ("position embeddings" in counts) == (family == "encoder")  # learned table vs rope
    assert ("final norm" in counts) == (norm_position == "pre")
    if head == "lm":
        assert summary["tied_embeddings"] and any(c.startswith("LM head") for c in counts)
    else:
        assert counts["classifier"] == model.classifier.weight.numel() + model.classifier.bias.numel()

    kinds = [step["kind"] for step in summary["block"]]
    if norm_position == "pre":  # Pre-LN: the norm comes before each sub-layer
        assert kinds == ["norm", "attention", "add", "norm", "ffn", "add"]
    else:  # Post-LN: after each residual add
        assert kinds == ["attention", "add", "norm", "ffn", "add", "norm"]
    assert [step["residual_from"] for step in summary["block"] if step["kind"] == "add"] == [-1, 2]
    assert ("GLU" in summary["block"][kinds.index("ffn")]["label"]) == (head == "cls")

    # From a saved folder (config.json only, built on the meta device): the same summary.
    model.save_pretrained(tmp_path)
    from_folder = viz.model_summary(tmp_path)
    assert from_folder["parameters"] == summary["parameters"] and from_folder["model"] == summary["model"]
    text = viz.format_model_summary(summary)
    assert "`norm_position`" in text and f"{summary['total_parameters']:,}" in text


@needs_matplotlib
@pytest.mark.parametrize("family, norm_position", [("encoder", "post"), ("decoder", "pre")])
def test_plot_model_summary(tmp_path, family, norm_position):
    model = tiny_model(family, norm_position=norm_position)
    figure = viz.plot_model_summary(model, output=tmp_path / "summary.png", dpi=DPI)
    assert_picture(tmp_path / "summary.png", figure, panels=3)
    diagram, table, bars = figure.axes
    assert ("Pre-LN" if norm_position == "pre" else "Post-LN") in diagram.get_title()
    # In the drawing, bottom to top, the first norm sits below the attention for Pre-LN and above it for Post-LN.
    heights = {}
    for text in diagram.texts:
        heights.setdefault(text.get_text(), text.get_position()[1])
    attention = next(y for label, y in heights.items() if "multi-head self-attention" in label)
    first_norm = min(y for label, y in heights.items() if label == "LayerNorm")
    assert (first_norm < attention) == (norm_position == "pre")
    assert ("Final LayerNorm" in heights) == (norm_position == "pre")
    assert len(bars.patches) == len(viz.model_summary(model)["parameters"])
    assert table.tables and len(table.tables[0].get_celld()) >= 4 * len(documented_fields())


# ---------------------------------------------------------------------------------------------------------------------
# Command line, headless, and without matplotlib
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("viz_model")
    tiny_model("decoder", norm_position="pre").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_trainer_state(folder, "lm", config=False)  # the model's own config.json says it is a causal LM
    return folder


@needs_matplotlib
def test_command_line(tmp_path, model_folder, capsys):
    paths = viz.main(["attention", str(model_folder), "--text", TEXT, "--views", "heads", "rollout",
                      "--layers", "-1", "--heads", "0", "2", "-o", str(tmp_path / "att.png"), "--format", "png",
                      "svg", "--dpi", str(DPI)])
    assert sorted(p.name for p in paths) == ["att_heads.png", "att_heads.svg", "att_rollout.png", "att_rollout.svg"]
    assert read_png(tmp_path / "att_heads.png").shape[1] > read_png(tmp_path / "att_rollout.png").shape[1]

    assert viz.main(["curves", str(model_folder), "--dpi", str(DPI)]) == [model_folder / "training_curves.png"]
    read_png(model_folder / "training_curves.png")

    paths = viz.main(["summary", str(model_folder), "--markdown", "-o", str(tmp_path / "summary.svg")])
    assert paths == [tmp_path / "summary.svg"]
    out = capsys.readouterr().out
    assert "| Blocks | `norm_position` | `'pre'` |" in out and "wrote" in out

    viz.main(["summary", "--preset", "gpt2", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_parameters"] == 124439808  # GPT-2 small, built on the meta device

    with pytest.raises(SystemExit, match="trainer_state.json"):
        viz.main(["curves", str(tmp_path)])


@pytest.fixture(scope="module")
def subprocess_run(tmp_path_factory, model_folder):
    """One fresh interpreter (imports cost seconds) that first hides matplotlib, as if it were not installed, then
    (if installed) brings it back and draws through the command line with no display and a GUI backend named in
    MPLBACKEND: the pictures never go through pyplot, so no display is needed."""
    tmp_path = tmp_path_factory.mktemp("viz_subprocess")
    write_trainer_state(tmp_path, "lm")
    script = textwrap.dedent(f"""
        import contextlib, io, runpy, sys
        sys.modules["matplotlib"] = None  # as if it were not installed
        import hf_blueprint
        from hf_blueprint import visualize as viz
        assert not [m for m in sys.modules if m.startswith("matplotlib") and sys.modules[m] is not None]
        data = viz.training_curves_data({str(tmp_path)!r})
        assert "loss" in data
        config = hf_blueprint.BlueprintEncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)
        assert viz.model_summary(config)["total_parameters"] > 0
        try:
            viz.plot_training_curves({str(tmp_path)!r})
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        assert viz.write_training_curves({str(tmp_path)!r}) is None  # recipes go on without the picture
        try:
            viz.main(["curves", {str(tmp_path)!r}])
        except SystemExit as exit:
            print("CLI-EXIT:", exit.code)
        sys.argv = ["python -m hf_blueprint.visualize", "--help"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_module("hf_blueprint.visualize", run_name="__main__")
            except SystemExit as exit:
                assert exit.code == 0
        print("HELP:", out.getvalue(), "END-HELP")

        del sys.modules["matplotlib"]  # installed after all: now draw, headless
        try:
            import matplotlib
        except ImportError:
            sys.exit(0)
        sys.argv = ["python -m hf_blueprint.visualize", "attention", {str(model_folder)!r}, "--text", "the cat sat",
                    "--views", "mean", "-o", {str(tmp_path / "a.png")!r}, "--dpi", "50"]
        runpy.run_module("hf_blueprint.visualize", run_name="__main__")
        viz.main(["curves", {str(model_folder)!r}, "-o", {str(tmp_path / "c.png")!r}, "--dpi", "50"])
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        print("HEADLESS-OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(MPLBACKEND="TkAgg", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, result.stdout


def test_without_matplotlib_clear_message(subprocess_run):
    """matplotlib absent: the package and the data functions work, `--help` works, and drawing fails with a message
    that names the extra to install."""
    tmp_path, out = subprocess_run
    assert "IMPORT-ERROR:" in out and "pip install 'hf_blueprint[viz]'" in out.split("IMPORT-ERROR:")[1]
    assert "CLI-EXIT: error:" in out and "hf_blueprint[viz]" in out.split("CLI-EXIT:")[1].split("HELP:")[0]
    help_text = out.split("HELP:")[1].split("END-HELP")[0]
    assert "attention" in help_text and "curves" in help_text and "summary" in help_text
    assert not (tmp_path / viz.TRAINING_CURVES_FILENAME).exists()


@needs_matplotlib
def test_headless_command_line(subprocess_run):
    """No display, MPLBACKEND naming a GUI backend: the command line still writes its pictures, without pyplot."""
    tmp_path, out = subprocess_run
    assert "HEADLESS-OK" in out
    assert "wrote " + str(tmp_path / "a.png") in out
    read_png(tmp_path / "a.png")
    read_png(tmp_path / "c.png")
