"""Hypernetworks: A1111/NovelAI files written here in their exact layout, and their effect.

Each file's MLPs are built in this test as explicit ``torch.nn.Sequential`` lists (the layer
order A1111's ``HypernetworkModule`` produces for the options, written out by hand), saved the
way A1111's ``Hypernetwork.save`` does, and the loaded modules must compute the same function.
The effect on the UNet is checked against a hand computation of attention with
``torch.nn.functional.scaled_dot_product_attention`` on the same diffusers ``Attention`` module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file
from torch import nn

from emaki.adapters.hypernetwork import (
    HypernetworkAttnProcessor,
    apply_hypernetworks,
    convert_hypernetwork,
    read_hypernetwork,
)
from emaki.errors import InvalidRequestError, ModelLoadError, ModelSaveError, PickleRefusedError
from emaki.models.families import tiny_configs
from emaki.models.tiny import make_tiny_bundle

CONTEXT = 48  # cross-attention width of the test UNet, unlike its block widths (32, 64)


def linear(a: int, b: int) -> nn.Linear:
    return nn.Linear(a, b)


def randomize(seq: nn.Sequential, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return seq.eval()


# Hand-written layer lists: (A1111 options, modules for width w), one per option combination.
COMBOS = {
    "nai-defaults": ({}, lambda w: [linear(w, 2 * w), linear(2 * w, w)]),
    "relu": (
        {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
         "use_dropout": False, "activate_output": False, "last_layer_dropout": False,
         "dropout_structure": [0, 0, 0]},
        lambda w: [linear(w, 2 * w), nn.ReLU(), linear(2 * w, w)],
    ),
    "swish-layernorm-activated-output": (
        {"layer_structure": [1, 2, 1], "activation_func": "swish", "is_layer_norm": True,
         "use_dropout": False, "activate_output": True, "last_layer_dropout": False},
        lambda w: [linear(w, 2 * w), nn.Hardswish(), nn.LayerNorm(2 * w),
                   linear(2 * w, w), nn.Hardswish(), nn.LayerNorm(w)],
    ),
    "dropout-from-flags": (  # older A1111 files: no dropout_structure stored
        {"layer_structure": [1, 2, 2, 1], "activation_func": "relu", "is_layer_norm": False,
         "use_dropout": True, "activate_output": False, "last_layer_dropout": True},
        lambda w: [linear(w, 2 * w), nn.ReLU(), nn.Dropout(0.3), linear(2 * w, 2 * w), nn.ReLU(),
                   nn.Dropout(0.3), linear(2 * w, w)],
    ),
    "dropout-without-last-layer": (
        {"layer_structure": [1, 2, 2, 1], "activation_func": "leakyrelu", "use_dropout": True,
         "activate_output": False, "last_layer_dropout": False},
        lambda w: [linear(w, 2 * w), nn.LeakyReLU(), nn.Dropout(0.3), linear(2 * w, 2 * w),
                   nn.LeakyReLU(), linear(2 * w, w)],
    ),
    "linear-layernorm-stored-dropout": (
        {"layer_structure": [1, 1.5, 1], "activation_func": "linear", "is_layer_norm": True,
         "use_dropout": True, "dropout_structure": [0, 0.1, 0], "last_layer_dropout": False,
         "activate_output": True},
        lambda w: [linear(w, w * 3 // 2), nn.LayerNorm(w * 3 // 2), nn.Dropout(0.1),
                   linear(w * 3 // 2, w), nn.LayerNorm(w)],
    ),
}  # fmt: skip


def hand_mlps(combo: str, widths, seed: int = 0) -> dict[int, tuple[nn.Sequential, nn.Sequential]]:
    build = COMBOS[combo][1]
    return {
        w: (
            randomize(nn.Sequential(*build(w)), seed + 2 * i),
            randomize(nn.Sequential(*build(w)), seed + 2 * i + 1),
        )
        for i, w in enumerate(widths)
    }


def a1111_state(seq: nn.Sequential, old_names: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of A1111's HypernetworkModule (its Sequential is the ``linear`` attribute)."""
    state = {f"linear.{k}": v.clone() for k, v in seq.state_dict().items()}
    if old_names:  # NovelAI's original key names
        state = {k.replace("linear.0.", "linear1.").replace("linear.1.", "linear2."): v
                 for k, v in state.items()}  # fmt: skip
    return state


def write_a1111(path: Path, combo: str, mlps, **overrides) -> Path:
    """What A1111's ``Hypernetwork.save`` writes (NovelAI files: widths only, old key names)."""
    options = dict(COMBOS[combo][0])
    nai = combo == "nai-defaults"
    data: dict = {w: (a1111_state(k, nai), a1111_state(v, nai)) for w, (k, v) in mlps.items()}
    if not nai:
        data.update(
            step=1000, name="stored name", weight_initialization="Normal",
            sd_checkpoint="e1441589", sd_checkpoint_name="v1-5", optional_info=None, **options,
        )  # fmt: skip
    data.update(overrides)
    torch.save(data, path)
    return path


def probe(width: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(2, 7, width, generator=torch.Generator().manual_seed(seed))


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", list(COMBOS))
def test_a1111_files_load_with_every_option_combination(tmp_path, combo):
    widths = (CONTEXT, 32)
    mlps = hand_mlps(combo, widths)
    path = write_a1111(tmp_path / f"{combo}.pt", combo, mlps)
    net = read_hypernetwork(path, allow_pickle=True)
    assert net.name == combo and net.path == path
    assert net.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert sorted(net.layers) == sorted(widths)
    for w in widths:
        for loaded, hand in zip(net.layers[w], mlps[w]):
            assert not loaded.training
            x = probe(w)
            torch.testing.assert_close(loaded(x), hand(x), rtol=0, atol=1e-6)


def test_pickled_file_needs_the_opt_in(tmp_path):
    path = write_a1111(tmp_path / "h.pt", "relu", hand_mlps("relu", (CONTEXT,)))
    with pytest.raises(PickleRefusedError):
        read_hypernetwork(path)


def one_line_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        read_hypernetwork(path, allow_pickle=True)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    for fragment in fragments:
        assert fragment in message


def test_keys_that_do_not_match_the_options_are_refused(tmp_path):
    mlps = hand_mlps("relu", (CONTEXT,))
    k_state, v_state = a1111_state(mlps[CONTEXT][0]), a1111_state(mlps[CONTEXT][1])
    options = COMBOS["relu"][0]
    missing = tmp_path / "missing.pt"
    del k_state["linear.2.bias"]
    torch.save({CONTEXT: (k_state, v_state), **options}, missing)
    one_line_error(missing, "missing keys", "linear.2.bias")
    # The same weights under options that add a layer norm: the second linear layer moves.
    layer_norm = write_a1111(tmp_path / "ln.pt", "relu", mlps, is_layer_norm=True)
    one_line_error(layer_norm, "missing keys", "linear.4.weight")
    # Layer-norm weights under options without one: keys the module does not have.
    combo = "swish-layernorm-activated-output"
    no_norm = write_a1111(tmp_path / "no-ln.pt", combo, hand_mlps(combo, (CONTEXT,)),
                          is_layer_norm=False)  # fmt: skip
    one_line_error(no_norm, "unexpected keys", "linear.5.weight")
    wrong_shape = write_a1111(tmp_path / "shape.pt", "relu", mlps, layer_structure=[1, 3, 1])
    one_line_error(wrong_shape, "shape")


def test_bad_options_and_contents_are_refused(tmp_path):
    mlps = hand_mlps("relu", (CONTEXT,))
    one_line_error(write_a1111(tmp_path / "act.pt", "relu", mlps, activation_func="bogus"),
                   "activation")  # fmt: skip
    one_line_error(write_a1111(tmp_path / "ls.pt", "relu", mlps, layer_structure=[2, 2, 1]),
                   "layer_structure")  # fmt: skip
    one_line_error(
        write_a1111(tmp_path / "drop.pt", "relu", mlps, dropout_structure=[0, 1.5, 0]),
        "dropout_structure",
    )
    empty = tmp_path / "empty.pt"
    torch.save({"name": "x", "layer_structure": [1, 2, 1]}, empty)
    one_line_error(empty, "not a hypernetwork")
    single = tmp_path / "single.pt"
    torch.save({CONTEXT: a1111_state(mlps[CONTEXT][0])}, single)
    one_line_error(single, "pair")


def write_safetensors_form(path: Path, combo: str, mlps, metadata: dict[str, str]) -> Path:
    """The documented safetensors form: ``<width>.<0|1>.<key>`` tensors, options as JSON text."""
    tensors = {
        f"{w}.{i}.{key}": value.contiguous()
        for w, pair in mlps.items()
        for i, seq in enumerate(pair)
        for key, value in a1111_state(seq).items()
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_safetensors_form_loads_without_pickles(tmp_path):
    mlps = hand_mlps("swish-layernorm-activated-output", (CONTEXT, 64))
    path = write_safetensors_form(
        tmp_path / "h.safetensors",
        "swish-layernorm-activated-output",
        mlps,
        {"layer_structure": "[1, 2, 1]", "activation_func": "swish", "is_layer_norm": "true",
         "activate_output": "true"},
    )  # fmt: skip
    net = read_hypernetwork(path)  # no allow_pickle needed
    for w in (CONTEXT, 64):
        for loaded, hand in zip(net.layers[w], mlps[w]):
            x = probe(w)
            torch.testing.assert_close(loaded(x), hand(x), rtol=0, atol=1e-6)
    bad = tmp_path / "bad.safetensors"
    save_file({"768.2.linear.0.weight": torch.zeros(2, 2)}, str(bad))
    one_line_error(bad, "768.2.linear.0.weight")


def test_convert_pickle_to_safetensors(tmp_path):
    combo = "dropout-from-flags"
    mlps = hand_mlps(combo, (CONTEXT, 32))
    source = write_a1111(tmp_path / "old.pt", combo, mlps)
    target = convert_hypernetwork(source, tmp_path / "old.safetensors", allow_pickle=True)
    net = read_hypernetwork(target)
    for w in (CONTEXT, 32):
        for loaded, hand in zip(net.layers[w], mlps[w]):
            x = probe(w)
            torch.testing.assert_close(loaded(x), hand(x), rtol=0, atol=1e-6)
    with pytest.raises(ModelSaveError):
        convert_hypernetwork(source, target, allow_pickle=True)
    with pytest.raises(PickleRefusedError):
        convert_hypernetwork(source, tmp_path / "other.safetensors")
    nai = write_a1111(tmp_path / "nai.pt", "nai-defaults", hand_mlps("nai-defaults", (CONTEXT,)))
    converted = convert_hypernetwork(nai, tmp_path / "nai.safetensors", allow_pickle=True)
    assert CONTEXT in read_hypernetwork(converted).layers


# --- applying to the UNet --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle():
    configs = tiny_configs("sd1")
    configs.unet["cross_attention_dim"] = CONTEXT
    return make_tiny_bundle("sd1", configs=configs)


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, CONTEXT, generator=g)
    return x, torch.tensor([500.0, 20.0]), context


@torch.no_grad()
def unet_out(unet, seed: int = 0) -> torch.Tensor:
    x, t, context = unet_inputs(seed)
    return unet(x, t, encoder_hidden_states=context).sample


def load(tmp_path: Path, combo: str, mlps, name: str = "net"):
    return read_hypernetwork(write_a1111(tmp_path / f"{name}.pt", combo, mlps), allow_pickle=True)


def attention_modules(unet, suffix: str) -> dict[str, Attention]:
    return {n: m for n, m in unet.named_modules() if n.endswith(suffix)}


@torch.no_grad()
def hand_attention(attn: Attention, hidden: torch.Tensor, ctx_k, ctx_v) -> torch.Tensor:
    """Multi-head attention of the module's projections, by hand."""
    b, heads = hidden.shape[0], attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(ctx_k), attn.to_v(ctx_v)
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return attn.to_out[0](out.transpose(1, 2).reshape(b, -1, q.shape[-1]))


def chained(context: torch.Tensor, steps) -> torch.Tensor:
    for seq, mult in steps:
        context = context + mult * seq(context)
    return context


def test_zero_last_layer_leaves_the_unet_output_bit_identical(tmp_path, bundle):
    mlps = hand_mlps("relu", (CONTEXT, 32, 64))  # every attention layer of the test UNet
    for pair in mlps.values():
        for seq in pair:
            nn.init.zeros_(seq[-1].weight)
            nn.init.zeros_(seq[-1].bias)
    patched = apply_hypernetworks(bundle, [(load(tmp_path, "relu", mlps), 1.0)])
    processors = [m.processor for m in patched.unet.modules() if isinstance(m, Attention)]
    assert all(isinstance(p, HypernetworkAttnProcessor) for p in processors)
    assert torch.equal(unet_out(patched.unet), unet_out(bundle.unet))


def test_cross_attention_keys_and_values_follow_the_hand_computation(tmp_path, bundle):
    mlps = hand_mlps("swish-layernorm-activated-output", (CONTEXT,))
    net = load(tmp_path, "swish-layernorm-activated-output", mlps)
    before = unet_out(bundle.unet)
    patched = apply_hypernetworks(bundle, [(net, 0.8)])
    seq_k, seq_v = mlps[CONTEXT]
    g = torch.Generator().manual_seed(9)
    context = torch.randn(2, 7, CONTEXT, generator=g)
    originals = dict(bundle.unet.named_modules())
    for name, attn in attention_modules(patched.unet, "attn2").items():
        hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
        with torch.no_grad():
            got = attn(hidden, encoder_hidden_states=context)
            plain = originals[name](hidden, encoder_hidden_states=context)
        expected = hand_attention(
            attn, hidden, chained(context, [(seq_k, 0.8)]), chained(context, [(seq_v, 0.8)])
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert (got - plain).abs().max() > 1e-3  # the hypernetwork does change it
    for name, attn in attention_modules(patched.unet, "attn1").items():  # no 32/64 modules
        assert attn.processor.__class__ is originals[name].processor.__class__
        hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
        with torch.no_grad():
            assert torch.equal(attn(hidden), originals[name](hidden))
    assert not torch.equal(unet_out(patched.unet), before)
    assert torch.equal(unet_out(bundle.unet), before)  # the original is untouched


def test_self_attention_width_modules_change_attn1_like_a1111(tmp_path, bundle):
    mlps = hand_mlps("relu", (32,))
    patched = apply_hypernetworks(bundle, [(load(tmp_path, "relu", mlps), 1.0)])
    seq_k, seq_v = mlps[32]
    g = torch.Generator().manual_seed(4)
    changed = []
    for name, attn in patched.unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        if isinstance(attn.processor, HypernetworkAttnProcessor):
            changed.append(name)
    assert changed and all(n.endswith("attn1") for n in changed)
    assert {n.split(".")[0] for n in changed} == {"down_blocks", "up_blocks"}  # 32 wide, not mid
    attn = patched.unet.get_submodule(changed[0])
    hidden = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        got = attn(hidden)
    expected = hand_attention(attn, hidden, hidden + seq_k(hidden), hidden + seq_v(hidden))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_several_hypernetworks_apply_in_order(tmp_path, bundle):
    first = hand_mlps("relu", (CONTEXT,), seed=10)
    second = hand_mlps("dropout-without-last-layer", (CONTEXT,), seed=20)
    net1 = load(tmp_path, "relu", first, "first")
    net2 = load(tmp_path, "dropout-without-last-layer", second, "second")
    patched = apply_hypernetworks(bundle, [(net1, 0.7), (net2, 1.3)])
    name = next(iter(attention_modules(patched.unet, "attn2")))
    attn = patched.unet.get_submodule(name)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 7, CONTEXT, generator=g)
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=context)
    (k1, v1), (k2, v2) = first[CONTEXT], second[CONTEXT]
    in_order = hand_attention(
        attn, hidden, chained(context, [(k1, 0.7), (k2, 1.3)]),
        chained(context, [(v1, 0.7), (v2, 1.3)]),
    )  # fmt: skip
    reversed_order = hand_attention(
        attn, hidden, chained(context, [(k2, 1.3), (k1, 0.7)]),
        chained(context, [(v2, 1.3), (v1, 0.7)]),
    )  # fmt: skip
    torch.testing.assert_close(got, in_order, rtol=1e-5, atol=1e-6)
    assert (got - reversed_order).abs().max() > 1e-4


def test_multiplier_zero_and_empty_list_leave_the_model_unchanged(tmp_path, bundle):
    net = load(tmp_path, "relu", hand_mlps("relu", (CONTEXT, 32, 64)))
    processors = {
        n: m.processor for n, m in bundle.unet.named_modules() if isinstance(m, Attention)
    }
    before = unet_out(bundle.unet)
    zero = apply_hypernetworks(bundle, [(net, 0.0)])
    assert torch.equal(unet_out(zero.unet), before)
    assert apply_hypernetworks(bundle, []) is bundle
    full = apply_hypernetworks(bundle, [(net, 1.0)])
    assert full.unet is not bundle.unet and full.text_encoder is bundle.text_encoder
    assert not torch.equal(unet_out(full.unet), before)
    assert torch.equal(unet_out(bundle.unet), before)
    for name, module in bundle.unet.named_modules():
        if isinstance(module, Attention):
            assert module.processor is processors[name]
    with pytest.raises(InvalidRequestError):
        apply_hypernetworks(bundle, [(net, float("nan"))])


def test_contexts_on_another_device_or_dtype_leave_the_loaded_modules_alone(tmp_path):
    mlps = hand_mlps("relu", (CONTEXT,))
    net = load(tmp_path, "relu", mlps)
    mlp_k, mlp_v = net.layers[CONTEXT]
    processor = HypernetworkAttnProcessor([(mlp_k, mlp_v, 1.0)])
    # "meta" stands in for a GPU: the MLPs are copied there, the loaded ones stay on the CPU.
    ctx_k, ctx_v = processor.contexts(torch.empty(2, 7, CONTEXT, device="meta"))
    assert ctx_k.device.type == ctx_v.device.type == "meta"
    assert all(p.device.type == "cpu" for p in mlp_k.parameters())
    # Half-precision contexts are transformed in float32 and given back in their own dtype.
    context = probe(CONTEXT).bfloat16()
    ctx_k, _ = processor.contexts(context)
    assert ctx_k.dtype == torch.bfloat16
    with torch.no_grad():
        expected = context.float() + mlps[CONTEXT][0](context.float())
    torch.testing.assert_close(ctx_k, expected.bfloat16())
