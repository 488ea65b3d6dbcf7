"""Smoke tests of benchmarks/compare_peers.py (Blueprint vs litgpt and x-transformers) and benchmarks/train_loop.py
(the recipe's Trainer vs a plain loop), at tiny sizes. A peer library that is not installed is skipped, and the
report is checked to say so; `pip install -e '.[bench]'` installs x-transformers, litgpt installs with --no-deps
(its pins conflict with transformers 5; docs/BENCHMARKS.md)."""

import pytest
import torch

from test_benchmark import assert_ratio, load_benchmark, table_rows

peers = load_benchmark("compare_peers")
PEERS = ["litgpt", "x-transformers"]


def require(library: str):
    reason = peers.missing_library(library)
    if reason is not None:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------------------------
# The peers build the same model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", peers.STYLES)
@pytest.mark.parametrize("library", PEERS)
def test_peer_parameter_count_is_the_blueprint_s_less_the_switches_it_lacks(library, style):
    """Llama-style: exactly the Blueprint's count. GPT-2-style: less what the library has no switch for (litgpt: the
    learned position table; x-transformers: attention and LayerNorm biases), counted from the shape."""
    require(library)
    shape = peers.shape_of("tiny", style)
    blueprint = peers.build("blueprint", shape, "cpu", torch.float32)
    peer = peers.build(library, shape, "cpu", torch.float32)
    assert blueprint.num_parameters() - peer.num_parameters() == peers.expected_parameter_difference(library, shape)
    if style == "llama":
        assert peers.expected_parameter_difference(library, shape) == 0


def randomized(blueprint):
    """Weights far from the initialization (whose small values would hide a mis-mapped norm or bias)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in blueprint.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return blueprint


# (library, style, Blueprint switches that make the Blueprint the model the library builds)
SAME_MODEL = [
    ("litgpt", "llama", {}),
    ("litgpt", "gpt2", {"position_embedding_type": "none"}),  # litgpt has no learned position table
    ("x-transformers", "llama", {}),
    ("x-transformers", "gpt2", {"attention_bias": False, "norm_bias": False}),  # it has no such biases
]


@pytest.mark.parametrize("library, style, switches", SAME_MODEL, ids=[f"{lib}-{st}" for lib, st, _ in SAME_MODEL])
def test_peer_with_copied_weights_computes_the_blueprint_s_logits(library, style, switches):
    require(library)
    # x-transformers' RMSNorm has no epsilon (x / ||x|| * sqrt(d)): an epsilon far below the mean square matches it.
    shape = peers.shape_of("tiny", style, norm_eps=1e-12 if style == "llama" else 1e-5)
    torch.manual_seed(0)
    config = peers.blueprint_config(shape)
    for key, value in switches.items():
        setattr(config, key, value)
    import hf_blueprint

    blueprint = randomized(hf_blueprint.BlueprintDecoderForCausalLM(config).eval())
    peer = peers.build(library, shape, "cpu", torch.float32)
    assert blueprint.num_parameters() == peer.num_parameters()
    copy = peers.copy_blueprint_into_litgpt if library == "litgpt" else peers.copy_blueprint_into_x_transformers
    copy(blueprint, peer.model)
    peer.model.eval()
    input_ids = peers.example_ids(shape, "cpu")
    with torch.no_grad():
        expected = blueprint(input_ids=input_ids).logits
        actual = peer.logits(input_ids)
    assert expected.abs().max() > 1.0  # logits far from zero: agreement is not that of two near-zero outputs
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # The same training loss: the peer's cross-entropy over its logits, the Blueprint's blockwise one without them.
    blockwise = blueprint(input_ids=input_ids, labels=input_ids, return_logits=False)
    assert blockwise.logits is None
    torch.testing.assert_close(peer.loss(input_ids), blockwise.loss, rtol=1e-5, atol=1e-5)
    # And the same greedy continuation through each library's own KV cache.
    prompt = peers.prompt_of(input_ids, 2)
    with torch.no_grad():
        expected_tokens = blueprint.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                             min_new_tokens=4, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
        assert torch.equal(peer.generate(prompt, 4), expected_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


MEASURES = ["training step", "inference forward", "greedy generation, batch 1", "greedy generation, batch 8",
            "training step peak memory"]


@pytest.fixture(scope="module")
def peer_report(tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("peers") / "peers.md"
    assert peers.main(["--size", "tiny", "--repeats", "1", "--output", str(output)]) == 0
    return output.read_text()


def test_peer_report_has_every_row_for_every_installed_library(peer_report):
    present = ["blueprint"] + [library for library in PEERS if peers.missing_library(library) is None]
    names = [peers.LIBRARY_NAMES[library] for library in present]
    header = next(line for line in peer_report.splitlines() if line.startswith("| style | measure |"))
    assert [cell.strip() for cell in header.split("|")[4:4 + len(names)]] == names
    for style in peers.STYLES:
        rows = table_rows(peer_report, f"{style} | ")
        rows = [row for row in rows if len(row) > 3 and row[1] in MEASURES]
        assert [row[1] for row in rows] == MEASURES, style
        for row in rows:
            values = row[3:3 + len(names)]
            assert all(float(value) >= 0 for value in values), row
            for index, ratio in enumerate(row[3 + len(names):]):
                if float(values[1 + index]) > 0:
                    assert_ratio(ratio, values[0], values[1 + index])
    for library in PEERS:
        skipped = f"Skipped {peers.LIBRARY_NAMES[library]}:" in peer_report
        assert skipped == (peers.missing_library(library) is not None), library


def test_peer_report_lists_parameter_counts_and_what_explains_a_difference(peer_report):
    rows = [row for row in table_rows(peer_report, "") if len(row) == 5 and row[1] in peers.LIBRARY_NAMES.values()]
    assert {(row[0], row[1]) for row in rows} >= {(style, "Blueprint") for style in peers.STYLES}
    for style, library, parameters, difference, explained in rows:
        assert (explained == "same model") == (difference == "0"), (style, library)


# ---------------------------------------------------------------------------------------------------------------------
# The training loop: recipe vs plain loop
# ---------------------------------------------------------------------------------------------------------------------


train_loop = load_benchmark("train_loop")


def test_plain_loop_follows_the_recipe_s_learning_rate_schedule():
    """The plain loop sets at each step the learning rate transformers' cosine_with_min_lr schedule gives the recipe's
    optimizer (shakespeare_char.yaml: 1e-3, 100 warm-up steps, min 1e-4 at step 2,000)."""
    from types import SimpleNamespace

    from transformers import get_scheduler

    args = SimpleNamespace(learning_rate=1e-3, warmup_steps=100, max_steps=2000, lr_scheduler_kwargs={"min_lr": 1e-4})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=100, num_training_steps=2000,
                              scheduler_specific_kwargs={"min_lr": 1e-4})
    for step in range(2000):
        assert train_loop.learning_rate(step, args) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_train_loop_benchmark_times_the_recipe_and_the_plain_loops(tmp_path):
    output = tmp_path / "loop.md"
    steps, warmup = 6, 2
    assert train_loop.main(["--steps", str(steps), "--warmup", str(warmup), "--repeats", "1",
                            "--output", str(output), "--recipe-flags", "--max_train_samples", "400"]) == 0
    text = output.read_text()
    rows = table_rows(text, "")
    loops = [row for row in rows if len(row) == 5 and row[0] in ("recipe", *train_loop.PLAIN_VARIANTS)]
    assert [row[0] for row in loops] == ["recipe", *train_loop.PLAIN_VARIANTS]
    recipe_mean, recipe_median = loops[0][1], loops[0][2]
    for name, mean, median, ratio_of_means, ratio_of_medians in loops:
        assert float(mean) > 0 and float(median) > 0, name
        assert_ratio(ratio_of_means, recipe_mean, mean)
        assert_ratio(ratio_of_medians, recipe_median, median)
    assert loops[0][3] == loops[0][4] == "1.000"
