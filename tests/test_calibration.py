"""The layer-wise loop itself: recorded layer inputs, shared-input statistics."""

from __future__ import annotations

import pytest
import torch

from sparsify.arch import find_layers, lookup
from sparsify.calibration import InMemoryLayers, LayerwiseRunner, run_layer
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
    stats = runner.collect(layer, targets, needs, captured.hidden, captured.calls[0])

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
