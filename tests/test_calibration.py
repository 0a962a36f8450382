"""The layer-wise loop itself: recorded layer inputs, shared-input statistics."""

from __future__ import annotations

import pytest
import torch

from sparsify.arch import find_layers, lookup
from sparsify.calibration import InMemoryLayers, LayerwiseRunner, run_layer
from sparsify.calibration.gather import gather_stats
from tests import zoo


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "opt", "bert"])
def test_layer_by_layer_replay_equals_the_full_forward(family):
    """Recording each layer's inputs and replaying layers one by one gives the model's own hidden states."""
    model = zoo.build(family)
    ids = torch.randint(3, zoo.VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    _, layers = find_layers(model, lookup(model.config.model_type))
    runner = LayerwiseRunner(model.base_model, layers, InMemoryLayers(layers), ids, batch_size=2)
    captured = runner.capture()
    hidden = captured.hidden
    with torch.no_grad():
        expected = model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
        for i, layer in enumerate(layers):
            assert torch.allclose(torch.cat(hidden), expected[i], atol=1e-5), f"input of layer {i}"
            hidden = run_layer(layer, hidden, captured.calls[i])
    assert len(captured.calls) == len(layers) and all(len(c) == 2 for c in captured.calls)


def test_shared_inputs_share_one_accumulator_with_correct_statistics():
    model = zoo.build("llama")
    layer = model.model.layers[0]
    ids = torch.randint(3, zoo.VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    runner = LayerwiseRunner(model.base_model, model.model.layers, InMemoryLayers(model.model.layers), ids, 2)
    captured = runner.capture()
    targets = {f"model.layers.0.{n}": layer.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    needs = {"hessian", "sq_norm", "sum", "abs_max", "active_count"}
    stats = gather_stats(layer, targets, needs, captured.hidden, captured.calls[0], torch.device("cpu"))

    inputs: dict[str, list[torch.Tensor]] = {k: [] for k in targets}
    handles = [m.register_forward_hook(lambda _m, a, _o, k=k: inputs[k].append(a[0])) for k, m in targets.items()]
    with torch.no_grad():
        run_layer(layer, captured.hidden, captured.calls[0])
    for h in handles:
        h.remove()
    for fqn in targets:
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[fqn]])  # (N, in)
        torch.testing.assert_close(stats[fqn]["hessian"], X.T @ X, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats[fqn]["sq_norm"], X.pow(2).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[fqn]["sum"], X.sum(0), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats[fqn]["abs_max"], X.abs().amax(0), rtol=0, atol=0)
        torch.testing.assert_close(stats[fqn]["active_count"], (X > 0).sum(0).float(), rtol=0, atol=0)
        assert stats[fqn].tokens == X.shape[0]
    q, k, g, u = (
        stats[f"model.layers.0.{n}"] for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj")
    )
    assert q is k and g is u  # one accumulator per distinct input
    assert stats["model.layers.0.self_attn.o_proj"] is not q
    assert set(q.values) == needs  # exactly what was asked for, nothing else


# ------------------------------------------------------------------------------ calibration inputs


def _layer_inputs(
    inputs: str, heal: bool = False, target: str = "model"
) -> tuple[list[list[torch.Tensor]], torch.nn.Module, torch.Tensor]:
    """Compress a tiny Llama in memory with Wanda 50% (and a heal step): every hidden-states batch each decoder
    layer was called on, in order, and the model and windows."""
    from sparsify.pipeline import compress_model
    from sparsify.recipe import parse_recipe

    model = zoo.build("llama")
    ids = torch.randint(3, zoo.VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    passes = [{"type": "prune", "method": "wanda", "sparsity": 0.5}] + (
        [{"type": "heal", "steps": 5, "target": target}] if heal else []
    )
    recipe = parse_recipe({"calibration": {"samples": 8, "seq_len": 16, "batch_size": 4, "inputs": inputs},
                           "passes": passes})  # fmt: skip
    calls: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(
            lambda m, args, kw, i=i: calls[i].append(args[0].detach().clone()), with_kwargs=True
        )
    dense = zoo.build("llama")  # the same seed: the dense model's own hidden states
    with torch.no_grad():
        expected = dense.model(input_ids=ids, output_hidden_states=True).hidden_states
    compress_model(model, recipe, ids)
    return calls, expected, ids


def test_dense_inputs_calibrate_each_layer_on_the_dense_models_hidden_states_in_one_forward():
    calls, expected, _ = _layer_inputs("dense")
    for i, seen in enumerate(calls):
        # one forward over the 3 batches (2 + 4 + 2 windows: statistics and the next layer's inputs), then the
        # compressed layer on the first batch for the errors
        assert [len(h) for h in seen] == [2, 4, 2, 2], f"layer {i}"
        torch.testing.assert_close(torch.cat(seen[:3]), expected[i], atol=1e-5, rtol=0)


def test_compressed_inputs_are_the_compressed_layers_outputs_in_two_forwards():
    calls, expected, _ = _layer_inputs("compressed")
    # the dense layer on the first batch (the errors' reference), statistics, then the compressed layer's outputs
    assert all([len(h) for h in seen] == [2, 2, 4, 2, 2, 4, 2] for seen in calls)
    torch.testing.assert_close(torch.cat(calls[0][1:4]), expected[0], atol=1e-5, rtol=0)  # layer 0: the same
    assert not torch.allclose(torch.cat(calls[1][1:4]), expected[1], atol=1e-3)  # later: layer 0 was pruned


def test_dense_inputs_heal_against_the_dense_layers_outputs():
    calls, expected, _ = _layer_inputs("dense", heal=True)
    for i, seen in enumerate(calls):  # the teacher is the statistics' forward: heal adds its steps, no dense run
        torch.testing.assert_close(torch.cat(seen[:3]), expected[i], atol=1e-5, rtol=0)
        assert [len(h) for h in seen[3:6]] == [2, 4, 2]  # heal's loss before the fit, over every window


def test_the_layer_target_takes_its_teacher_from_the_statistics_forward():
    """Sequential inputs, heal against the dense layer: the first statistics' forward ran the dense layer on those
    very inputs, so its outputs are the teacher; the model target runs the dense path (3 batches) besides."""
    by_layer, _, _ = _layer_inputs("compressed", heal=True, target="layer")
    by_model, _, _ = _layer_inputs("compressed", heal=True, target="model")
    for i, (seen_layer, seen_model) in enumerate(zip(by_layer, by_model, strict=True)):
        assert len(seen_layer) == len(seen_model) - 3, f"layer {i}"


def test_dense_targets_with_dense_inputs_is_refused_before_work():
    from sparsify.errors import SparsifyError
    from sparsify.pipeline import compress_model
    from sparsify.recipe import parse_recipe

    recipe = parse_recipe({"calibration": {"samples": 2, "seq_len": 16, "inputs": "dense"},
                           "passes": [{"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "dense_targets": True}]})  # fmt: skip
    model = zoo.build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsifyError, match=r"dense_targets.*inputs 'dense'"):
        compress_model(model, recipe, torch.randint(3, zoo.VOCAB, (2, 16)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_batch_count_known_before_sampling_is_the_batches_cut():
    from sparsify.calibration.capture import batch_count, calibration_batches

    for samples in range(1, 40):
        for batch_size in range(1, 9):
            got = len(calibration_batches(torch.zeros(samples, 2, dtype=torch.long), batch_size))
            assert batch_count(samples, batch_size) == got, (samples, batch_size)
