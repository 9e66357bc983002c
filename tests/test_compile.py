"""torch.compile(fullgraph=True, dynamic=True) over groupmoe: no graph breaks, one graph across
token counts (no recompile per size), results equal to eager in fp32, bad input failing with
the same errors, and nothing stacked kept for backward."""

import pytest
import torch

import groupmoe
from moe_cases import compiled_and_eager, rel_err


def counting_backend(backend="inductor"):
    """A dynamo backend that records the id of each compiled frame (a restarted analysis of
    the same frame, as dynamo does to specialise a float, counts once) and the set of ids."""
    torch._dynamo.reset()
    compiled, inner = set(), torch._dynamo.lookup_backend(backend)

    def count(gm, example_inputs):
        compiled.add(str(torch._guards.CompileContext.current_compile_id()))
        return inner(gm, example_inputs)

    return count, compiled


def compile_counting(fn, backend="inductor"):
    """``torch.compile(fn, fullgraph=True, dynamic=True)`` and the set of graphs it compiles."""
    count, graphs = counting_backend(backend)
    return torch.compile(fn, fullgraph=True, dynamic=True, backend=count), graphs


def _grads(module, *tensors):
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(tensors)})
    return grads


def _assert_close(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for n in want:
        assert rel_err(got[n], want[n]) < tol, n


BLOCKS = {
    "qwen2-like": dict(hidden_size=24, intermediate_size=12, num_experts=6, top_k=2,
                       shared_intermediate_size=16),
    "gpt-oss-like": dict(hidden_size=24, intermediate_size=12, num_experts=4, top_k=2,
                         router="topk_softmax", router_bias=True, activation="gptoss",
                         expert_bias=True, save="none"),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_moe_block(name):
    torch.manual_seed(0)
    block = groupmoe.MoEBlock(**BLOCKS[name])
    if name == "qwen2-like":
        explained = torch._dynamo.explain(block)(torch.randn(10, 24))
        assert explained.graph_break_count == 0, explained.break_reasons
    compiled, graphs = compile_counting(block)
    for t in (11, 16, 27):
        got, want = compiled_and_eager(
            compiled, block, torch.randn(2, t, 24),
            lambda r: r[0].square().sum() + r[1].logsumexp(-1).sum())
        assert rel_err(got[0], want[0]) < 1e-6
        _assert_close(got[1], want[1])
    assert len(graphs) == 1  # one graph for every token count


def _layer_step(layer, rotary, fn, t, hidden):
    torch.manual_seed(t)
    layer.zero_grad(set_to_none=True)
    x = torch.randn(1, t, hidden, requires_grad=True)
    pos = torch.arange(t)[None]
    out = fn(x, attention_mask=None, position_ids=pos, position_embeddings=rotary(x, pos))
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return out.detach(), _grads(layer, x)


@pytest.mark.parametrize("name,backend", [("qwen3_moe", "inductor"), ("gpt_oss", "aot_eager")])
def test_transformers5_decoder_layer(name, backend):
    """A whole decoder layer (attention, router, shared parts and groupmoe's experts); gpt-oss's
    biases and activation under Inductor are covered by test_moe_block (CPU Inductor compiles
    C++, so the suite keeps its Inductor runs few)."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("stacked experts need transformers 5")
    from test_transformers import build

    model = build(name)
    assert groupmoe.patch(model).patched
    layer, rotary = model.model.layers[-1], model.model.rotary_emb
    compiled, graphs = compile_counting(layer, backend)
    for t in (9, 14):
        got, want = (_layer_step(layer, rotary, fn, t, 32) for fn in (compiled, layer))
        assert rel_err(got[0], want[0]) < 1e-5
        _assert_close(got[1], want[1])
    assert len(graphs) == 1


def _saved_by(fn, *args) -> list:
    """Every tensor the forward of ``fn(*args)`` saves for backward (compiled graphs save
    through save_for_backward too, so the hooks see them)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args)
    return saved


def test_modulelist_blocks_keep_no_stacked_weights():
    """transformers 4.x-style ModuleList blocks: compiled equal to eager, one graph, and the
    compiled graph saves the experts' own weights for backward, never a stacked copy."""
    from test_modulelist import MixtralSparseMoeBlock, Model, Qwen3MoeSparseMoeBlock

    for cls in (Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock):
        torch.manual_seed(0)
        model = Model(cls(h=16, i=8, e=6))
        groupmoe.patch(model)
        compiled, graphs = compile_counting(model)
        for t in (5, 9):
            got, want = compiled_and_eager(compiled, model, torch.randn(2, t, 16),
                                           lambda r: r[0].square().sum())
            assert rel_err(got[0], want[0]) < 1e-6
            _assert_close(got[1], want[1])
        assert len(graphs) == 1
        saved = _saved_by(compiled, torch.randn(2, 7, 16, requires_grad=True))
        assert saved and not any(t.dim() == 3 and t.shape[0] == 6 for t in saved)


@pytest.mark.parametrize("name,quantized", [("qwen3_moe", False), ("gpt_oss", True)])
def test_peft_lora_on_experts_and_qlora(name, quantized):
    """peft LoRA on the expert stacks (and on attention), on bf16-free fp32 stacks or on NF4
    ones from groupmoe.quantize_experts: every decoder layer compiled, as the HF Trainer's
    torch_compile does; loss and every gradient equal to eager."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("stacked experts need transformers 5")
    from groupmoe.integrations import expert_lora_targets
    from test_transformers import build, tokens
    from test_transformers_4bit import _peft, _quantize

    # three layers: the second and third must reuse the first's graph (torch's parametrize
    # gives each 4-bit experts module a class of its own unless patch shares one)
    model = build(name, num_hidden_layers=3,
                  **({"layer_types": ["full_attention"] * 3} if name == "gpt_oss" else {}))
    if quantized:
        _quantize(model, "groupmoe", False)
    model = _peft(model, expert_lora_targets(model), 0)
    groupmoe.patch(model)

    def step(tok):
        model.zero_grad(set_to_none=True)
        out = model(tok, labels=tok, use_cache=False)  # a KV cache's state is a guard
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}

    batches = [tokens(seed=1, seq=12), tokens(seed=2, seq=17)]
    want = [step(b) for b in batches]
    count, graphs = counting_backend("aot_eager")
    for layer in model.base_model.model.model.layers:
        layer.compile(fullgraph=True, dynamic=True, backend=count)
    for (loss, grads), b in zip(want, batches):
        got_loss, got = step(b)
        assert abs(float(got_loss - loss)) < 1e-5
        assert any("lora_" in n and "experts" in n for n in got)
        _assert_close(got, grads)
    # the layers share one graph; the first layer's input needs no grad (frozen embeddings),
    # which is a second one
    assert len(graphs) == 2


def test_bad_input_fails_the_same_way_compiled():
    torch.manual_seed(0)
    block = groupmoe.MoEBlock(16, 8, 4, 2)
    compiled, _ = compile_counting(block, "aot_eager")
    x = torch.randn(6, 16)
    compiled(x)
    x[3, 5] = float("nan")
    errors = []
    for fn in (compiled, block):
        with pytest.raises(FloatingPointError) as err:
            fn(x)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "token 3" in errors[0]

    experts = block.experts
    compiled_experts, _ = compile_counting(experts, "aot_eager")
    ids = torch.tensor([[0, 1], [2, 4], [1, 3]])  # expert 4 of 4
    errors = []
    for fn in (compiled_experts, experts):
        with pytest.raises(ValueError) as err:
            fn(torch.randn(3, 16), ids, torch.rand(3, 2))
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "out of range" in errors[0]

    # shape checks fail while dynamo traces: the same ValueError from torch.compile's default
    # mode; under fullgraph=True dynamo reports it as an "observed exception" whose cause
    # carries the same message
    with pytest.raises(ValueError) as err:
        block(torch.randn(5, 12))
    message = str(err.value)
    assert "hidden size 12" in message
    with pytest.raises(ValueError, match=message):
        torch.compile(block, dynamic=True, backend="aot_eager")(torch.randn(5, 12))
    with pytest.raises(Exception) as err:
        compiled(torch.randn(5, 12))
    chain = [err.value]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    assert any(message in str(e) for e in chain)


def test_weight_grad_store_is_eager_only():
    from groupmoe.parallel import WeightGradStore

    block = groupmoe.MoEBlock(16, 8, 4, 2)
    compiled, _ = compile_counting(block, "aot_eager")
    with WeightGradStore(), pytest.raises(Exception, match="eager mode only"):
        compiled(torch.randn(4, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_bf16_compiled_matches_eager(backend, monkeypatch):
    """bf16 on CUDA with the Triton kernels inside the ops: compiled equal to eager up to the
    compiled router's own rounding."""
    from groupmoe.ops import backend as backends

    monkeypatch.setattr(backends, "_backend", backend)
    torch.manual_seed(0)
    block = groupmoe.MoEBlock(256, 128, 16, 4, router="topk_softmax", router_bias=True,
                              activation="gptoss", expert_bias=True, device="cuda",
                              dtype=torch.bfloat16)
    compiled, graphs = compile_counting(block)
    for t in (200, 333):
        got, want = compiled_and_eager(
            compiled, block, torch.randn(t, 256, device="cuda", dtype=torch.bfloat16),
            lambda r: r[0].float().square().sum())
        assert rel_err(got[0], want[0]) < 2e-2
        _assert_close(got[1], want[1], tol=3e-2)
    assert len(graphs) == 1
