"""From prompt grammar to conditioning: chunking, emphasis, schedules, AND, adapters in prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emaki.adapters.embeddings import Embedding, EmbeddingLibrary
from emaki.adapters.lora import apply_loras, read_lora
from emaki.cli import main
from emaki.conditioning import Conditioning
from emaki.errors import EmakiError
from emaki.infotext import parse_infotext
from emaki.models.saving import save_diffusers
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.prompts.encode import ScheduledGuidance, encode_prompts
from emaki.request import GenerationRequest
from emaki.sampling.guidance import CFGDenoiser, GuidedCond
from emaki.sampling.registry import get_sampler
from emaki.text.encoder import TextEncoder
from lora_fixtures import kohya_layers, kohya_tensors, save


@pytest.fixture(scope="module")
def bundle():
    return make_tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def enc(bundle):
    return TextEncoder(bundle.tokenizer, bundle.text_encoder)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(enc: TextEncoder, word: str) -> int:
    ids = enc.tokenize(word)
    assert len(ids) == 1, word
    return ids[0]


# -- chunking ---------------------------------------------------------------------------------


def test_plain_short_prompt_chunks_like_the_plain_encoder(enc) -> None:
    text = "a photo of a red apple, studio light"
    chunks = enc.tokenize_weighted([(text, 1.0)])
    assert [list(c) for c in chunks.ids] == enc.chunks(text)
    assert chunks.token_count == len(enc.tokenize(text))
    assert set(chunks.multipliers[0]) == {1.0}


def test_weights_follow_their_tokens(enc) -> None:
    chunks = enc.tokenize_weighted([("a ", 1.0), ("red apple", 1.5), (" tree", 0.5)])
    n_a, n_red = len(enc.tokenize("a")), len(enc.tokenize("red apple"))
    mults = chunks.multipliers[0]
    assert mults[0] == 1.0  # start token
    assert mults[1 : 1 + n_a] == (1.0,) * n_a
    assert mults[1 + n_a : 1 + n_a + n_red] == (1.5,) * n_red
    assert mults[1 + n_a + n_red] == 0.5
    assert set(mults[2 + n_a + n_red :]) == {1.0}  # end and padding


def test_break_pads_the_chunk_and_starts_a_new_one(enc) -> None:
    chunks = enc.tokenize_weighted([("cat", 1.0), ("BREAK", -1.0), ("dog", 1.0)])
    cat, dog = _ids(enc, "cat"), _ids(enc, "dog")
    assert len(chunks.ids) == 2
    assert chunks.ids[0][:3] == (enc.bos, cat, enc.eos)
    assert chunks.ids[1][:3] == (enc.bos, dog, enc.eos)
    assert chunks.token_count == 2
    # BREAK at the very start closes an empty chunk first, as A1111's tokenize_line does.
    assert len(enc.tokenize_weighted([("BREAK", -1.0), ("dog", 1.0)]).ids) == 2


def test_comma_backtracking_moves_the_words_after_the_last_comma(enc) -> None:
    cat, dog, comma = _ids(enc, "cat"), _ids(enc, "dog"), enc.comma_id
    text = "cat " * 70 + ", " + "dog " * 8
    chunks = enc.tokenize_weighted([(text, 1.0)])
    # 70 cats + comma = 71 tokens stay; the 8 dogs would overflow at the 5th: all 8 move.
    assert chunks.ids[0][1:73] == (cat,) * 70 + (comma, enc.eos)
    assert chunks.ids[1][1:10] == (dog,) * 8 + (enc.eos,)
    assert chunks.token_count == 79
    # Disabled (0), or a comma too far back: a hard split at 75 tokens.
    enc0 = TextEncoder(enc.tokenizer, enc.model, comma_backtrack=0)
    hard = enc0.tokenize_weighted([(text, 1.0)])
    assert hard.ids[0][1:77] == (cat,) * 70 + (comma,) + (dog,) * 4 + (enc.eos,)
    far = enc.tokenize_weighted([("cat , " + "dog " * 80, 1.0)])
    assert far.ids[0][1:4] == (cat, comma, dog) and far.ids[0][76] == enc.eos


def test_embedding_is_never_split_across_chunks(bundle, enc) -> None:
    width = bundle.text_encoder.get_input_embeddings().weight.shape[1]
    emb = Embedding("zqxstyle", torch.randn(3, width), "0" * 12, None)
    lib = EmbeddingLibrary([emb], bundle.tokenizer)
    te = TextEncoder(bundle.tokenizer, bundle.text_encoder, embeddings=lib)
    chunks = te.tokenize_weighted([("cat " * 73 + "zqxstyle", 1.0)])
    vocab = bundle.text_encoder.get_input_embeddings().weight.shape[0]
    assert chunks.ids[0][74] == enc.eos  # 73 cats, then the 3 vectors did not fit
    assert chunks.ids[1][1:4] == (vocab, vocab + 1, vocab + 2)
    assert chunks.token_count == 76 and chunks.embeddings == ("zqxstyle",)


# -- encoding with emphasis and embeddings ---------------------------------------------------------


def test_unweighted_text_encodes_exactly_as_before(enc) -> None:
    text = "a red apple on a table"
    ours = enc.encode_weighted([enc.tokenize_weighted([(text, 1.0)])])[0]
    assert torch.equal(ours.context, enc.encode(text).context)


def test_emphasis_modes(enc) -> None:
    pieces = [("a ", 1.0), ("red", 1.4), (" apple", 0.7)]
    chunks = enc.tokenize_weighted(pieces)
    plain = enc.encode_weighted([enc.tokenize_weighted([("a red apple", 1.0)])])[0].context
    w = torch.tensor(chunks.multipliers[0])[None, :, None]
    no_norm = enc.encode_weighted([chunks], emphasis="No norm")[0].context
    torch.testing.assert_close(no_norm, plain * w)
    original = enc.encode_weighted([chunks], emphasis="Original")[0].context
    # "Original": same direction per token as "No norm", rescaled so the chunk's mean is kept.
    torch.testing.assert_close(original.mean(), plain.mean(), rtol=1e-5, atol=1e-6)
    ratio = original / no_norm
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.flatten()[0])))
    ignore = enc.encode_weighted([chunks], emphasis="Ignore")[0].context
    assert torch.equal(ignore, plain)
    with pytest.raises(EmakiError, match="emphasis"):
        enc.encode_weighted([chunks], emphasis="loud")


def test_embedding_vectors_act_like_the_tokens_they_copy(bundle, enc) -> None:
    table = bundle.text_encoder.get_input_embeddings().weight.detach()
    vectors = table[[_ids(enc, "cat"), _ids(enc, "dog")]].clone()
    lib = EmbeddingLibrary([Embedding("zqxpet", vectors, "1" * 12, None)], bundle.tokenizer)
    te = TextEncoder(bundle.tokenizer, bundle.text_encoder, embeddings=lib)
    got = te.encode_weighted([te.tokenize_weighted([("a zqxpet on a mat", 1.0)])])[0]
    want = enc.encode("a cat dog on a mat")
    torch.testing.assert_close(got.context, want.context)
    assert bundle.text_encoder.get_input_embeddings().weight.shape[0] == table.shape[0]


# -- schedules and composable guidance ----------------------------------------------------------


class _Recorder:
    """A CFG stand-in that records which conditioning each model evaluation saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Conditioning]] = []

    def __call__(self, x, sigma, cond: GuidedCond):
        self.seen.append((len(self.seen), cond.positive))
        return x * 0.5


def _run(prompt: str, enc, steps: int, sampler: str = "Euler"):
    encoded = encode_prompts(enc, prompt, "", steps)
    rec = _Recorder()
    guide = ScheduledGuidance(rec)  # type: ignore[arg-type]
    sigmas = torch.linspace(10, 0, steps + 1)
    steps_seen: list[int] = []
    get_sampler(sampler)(
        guide,
        torch.zeros(1, 4, 2, 2),
        sigmas,
        cond=encoded.conds,
        callback=lambda info: (guide.on_step(info), steps_seen.append(info.i)),
    )
    return encoded, rec


def test_prompt_editing_switches_at_a1111_steps(enc) -> None:
    encoded, rec = _run("a [cat:dog:0.25] on a mat", enc, 8)
    cat, dog = enc.encode("a cat on a mat").context, enc.encode("a dog on a mat").context
    used = ["cat" if torch.equal(c.context, cat) else "dog" for _, c in rec.seen]
    assert torch.equal(rec.seen[-1][1].context, dog)
    # int(0.25 * 8) = 2: steps 0, 1, 2 (0-based) use "cat", as A1111's `step <= end` does.
    assert used == ["cat"] * 3 + ["dog"] * 5
    assert set(encoded.tokens) == {"a cat on a mat", "a dog on a mat", ""}  # "" = negative


def test_every_evaluation_of_a_step_uses_that_steps_prompt(enc) -> None:
    _, rec = _run("[cat|dog]", enc, 4, sampler="Heun")
    cat = enc.encode("cat").context
    used = ["cat" if torch.equal(c.context, cat) else "dog" for _, c in rec.seen]
    # Alternation's schedule ends at steps 1, 2, 3, 4 with cat, dog, cat, dog; with A1111's
    # `step <= end` rule 0-based steps 0-3 get cat, cat, dog, cat. Heun evaluates twice per step
    # except the last one (to sigma 0), and both evaluations of a step see that step's prompt.
    assert used == ["cat", "cat", "cat", "cat", "dog", "dog", "cat"]


def test_text_encoder_runs_once_per_distinct_text(bundle) -> None:
    calls: list[int] = []
    model = bundle.text_encoder
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        te = TextEncoder(bundle.tokenizer, model)
        encoded = encode_prompts(te, "[red|green|blue] apple", "[ugly:blurry:5]", 30)
    finally:
        handle.remove()
    assert len(encoded.tokens) == 5
    assert calls == [5]  # one batched call for 5 distinct texts, not one per step


def test_chunks_shared_by_scheduled_texts_are_encoded_once(bundle, enc) -> None:
    """A long prompt whose edit sits in its last chunk: its variants share the first chunks."""
    calls: list[int] = []
    model = bundle.text_encoder
    long = ", ".join(f"word{i}" for i in range(90))  # two full chunks and more
    prompt = f"{long}, [red|green|blue] apple"
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:  # a fresh encoder: the shared one has chunks of earlier tests cached
        encoded = encode_prompts(TextEncoder(bundle.tokenizer, model), prompt, "", 20)
    finally:
        handle.remove()
    chunks = [c for t in encoded.tokens.values() for c in t.ids]
    assert len(encoded.tokens) == 4 and len(chunks) > len(set(chunks))
    assert calls == [len(set(chunks))]  # one call, each distinct chunk once
    # and the result equals encoding each text on its own
    for text, tokens in encoded.tokens.items():
        alone = enc.encode_weighted([tokens])[0].context
        got = encoded.conds.parts[0][1].conds
        match = [
            c.context
            for c in got
            if c.context.shape == alone.shape and torch.allclose(c.context, alone, atol=1e-5)
        ]
        assert match or text == "", text


def test_encoded_chunks_are_cached_and_dropped_when_the_weights_change(bundle) -> None:
    """A repeated prompt encodes nothing; an edit re-encodes only its chunk; a weight changed in
    place (training) drops the cache, so states always equal a fresh encoder's."""
    import copy

    model = copy.deepcopy(bundle.text_encoder)
    te = TextEncoder(bundle.tokenizer, model)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    long = ", ".join(f"word{i}" for i in range(90))
    try:
        first = encode_prompts(te, f"{long}, red apple", "", 20)
        n = len({c for t in first.tokens.values() for c in t.ids})
        again = encode_prompts(te, f"{long}, red apple", "", 20)
        edited = encode_prompts(te, f"{long}, (green:1.2) apple", "", 20)
        assert calls == [n, 1]  # nothing for the repeat; the edited last chunk only
        assert torch.equal(
            first.conds.parts[0][1].conds[0].context, again.conds.parts[0][1].conds[0].context
        )
        fresh = TextEncoder(bundle.tokenizer, bundle.text_encoder)
        want = encode_prompts(fresh, f"{long}, (green:1.2) apple", "", 20)
        assert torch.allclose(
            edited.conds.parts[0][1].conds[0].context, want.conds.parts[0][1].conds[0].context
        )
        with torch.no_grad():
            next(model.parameters()).mul_(1.5)
        changed = encode_prompts(te, f"{long}, red apple", "", 20)
        assert calls[-1] == n  # everything re-encoded with the new weights
        ref = encode_prompts(TextEncoder(bundle.tokenizer, model), f"{long}, red apple", "", 20)
        got, exp = (
            changed.conds.parts[0][1].conds[0].context,
            ref.conds.parts[0][1].conds[0].context,
        )
        assert torch.equal(got, exp)
        assert not torch.allclose(got, first.conds.parts[0][1].conds[0].context)
    finally:
        handle.remove()


def test_composable_parts_combine_with_their_weights() -> None:
    g = torch.Generator().manual_seed(0)
    eps = {k: torch.randn(4, 8, 8, generator=g) for k in (1.0, 2.0, 3.0, 0.0)}

    def inner(x, sigma, cond):
        e = torch.stack([eps[float(c[0, 0])] for c in cond.context])
        return x - sigma[:, None, None, None] * e

    def c(v: float, length: int = 3) -> Conditioning:
        return Conditioning(torch.full((1, length, 5), v))

    cond = GuidedCond(c(1.0), c(0.0), 1.2, ((0.8, c(2.0)), (-0.5, c(3.0, length=6))))
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0])
    out = CFGDenoiser(inner, scale=6.0)(x, sigma, cond)
    d = {k: x - 2.0 * e for k, e in eps.items()}
    want = d[0.0] + 6.0 * (
        1.2 * (d[1.0] - d[0.0]) + 0.8 * (d[2.0] - d[0.0]) - 0.5 * (d[3.0] - d[0.0])
    )
    torch.testing.assert_close(out, want)


def test_and_prompt_parts_reach_guidance(enc) -> None:
    encoded = encode_prompts(enc, "a cat :1.5 AND a dog AND fog :-0.3", "blurry AND x", 10)
    guided = encoded.conds.at(0)
    weights = [w for w, _ in guided.parts]
    assert weights == [1.5, 1.0, -0.3]
    torch.testing.assert_close(guided.parts[1][1].context, enc.encode("a dog").context)
    # AND is plain text in the negative prompt (A1111).
    torch.testing.assert_close(guided.negative.context, enc.encode("blurry AND x").context)


# -- the pipeline: tags, adapters, infotext ----------------------------------------------------


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def models(tmp_path_factory, bundle):
    root = tmp_path_factory.mktemp("models-folder")
    (root / "lora").mkdir()
    (root / "embeddings").mkdir()
    tensors = kohya_tensors(kohya_layers(bundle, conv=False), rank=4, alpha=4.0, seed=3)
    save(root / "lora" / "inkwash.safetensors", tensors)
    width = bundle.text_encoder.get_input_embeddings().weight.shape[1]
    save_file(
        {"emb_params": torch.randn(2, width)}, str(root / "embeddings" / "zqxglow.safetensors")
    )
    return root


def test_lora_tag_equals_applying_the_lora(bundle, models) -> None:
    pipe = Pipeline(bundle, models=models)
    req = GenerationRequest(prompt="a cat <lora:inkwash:0.7>", seed=3, steps=4, sampler="Euler")
    tagged = pipe.generate(req)
    lora = read_lora(models / "lora" / "inkwash.safetensors", bundle)
    ref = Pipeline(apply_loras(bundle, [(lora, 0.7, 0.7)]), models=models)
    plain = ref.generate(GenerationRequest(prompt="a cat", seed=3, steps=4, sampler="Euler"))
    assert np.array_equal(_pixels(tagged.images[0]), _pixels(plain.images[0]))
    params = parse_infotext(tagged.infotexts[0]).params
    assert params["Lora hashes"] == f"inkwash: {lora.hash}"
    assert parse_infotext(tagged.infotexts[0]).prompt == "a cat <lora:inkwash:0.7>"
    # The shared model is untouched: the plain prompt gives the plain model's image.
    base = pipe.generate(GenerationRequest(prompt="a cat", seed=3, steps=4, sampler="Euler"))
    unpatched = Pipeline(bundle).generate(
        GenerationRequest(prompt="a cat", seed=3, steps=4, sampler="Euler")
    )
    assert np.array_equal(_pixels(base.images[0]), _pixels(unpatched.images[0]))
    assert not np.array_equal(_pixels(base.images[0]), _pixels(tagged.images[0]))


def test_lora_files_are_read_once_until_they_change(bundle, models, tmp_path, monkeypatch) -> None:
    import shutil

    import emaki.adapters.lora as lora_module

    root = tmp_path / "models"
    shutil.copytree(models, root)
    reads: list[str] = []
    real = lora_module.read_lora
    monkeypatch.setattr(
        lora_module,
        "read_lora",
        lambda path, *a, **k: reads.append(path.name) or real(path, *a, **k),
    )
    pipe = Pipeline(bundle, models=root)
    req = GenerationRequest(prompt="a cat <lora:inkwash:0.9>", seed=3, steps=3, sampler="Euler")
    before = pipe.generate(req)
    assert _pixels(pipe.generate(req).images[0]).tolist() == _pixels(before.images[0]).tolist()
    assert reads == ["inkwash.safetensors"]
    tensors = kohya_tensors(kohya_layers(bundle, conv=False), rank=2, alpha=2.0, seed=9)
    save(root / "lora" / "inkwash.safetensors", tensors)  # another LoRA under the same name
    after = pipe.generate(req)
    assert reads == ["inkwash.safetensors"] * 2
    assert not np.array_equal(_pixels(after.images[0]), _pixels(before.images[0]))
    ref = Pipeline(bundle, models=root).generate(req)
    assert np.array_equal(_pixels(after.images[0]), _pixels(ref.images[0]))


def test_separate_text_and_unet_multipliers(bundle, models) -> None:
    pipe = Pipeline(bundle, models=models)
    req = GenerationRequest(prompt="a cat <lora:inkwash:te=0:unet=1>", seed=1, steps=3)
    lora = read_lora(models / "lora" / "inkwash.safetensors", bundle)
    ref = Pipeline(apply_loras(bundle, [(lora, 0.0, 1.0)]))
    want = ref.generate(GenerationRequest(prompt="a cat", seed=1, steps=3))
    assert np.array_equal(_pixels(pipe.generate(req).images[0]), _pixels(want.images[0]))


def test_embedding_trigger_is_used_and_recorded(bundle, models) -> None:
    pipe = Pipeline(bundle, models=models)
    result = pipe.generate(GenerationRequest(prompt="zqxglow cat", seed=2, steps=3))
    params = parse_infotext(result.infotexts[0]).params
    lib = pipe.embedding_library()
    assert lib is not None
    assert params["TI hashes"] == f"zqxglow: {lib.get('zqxglow').hash}"


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        ("a <lora:inkwsh:1>", "inkwash"),  # the closest name is suggested
        ("a <lora:inkwash:lots>", "not a number"),
        ("a <lyco:inkwash:1>", "unknown extra network"),
    ],
)
def test_bad_tags_are_clear_errors(bundle, models, prompt, needle) -> None:
    with pytest.raises(EmakiError, match=needle):
        Pipeline(bundle, models=models).generate(GenerationRequest(prompt=prompt, steps=2))


def test_emphasis_and_comments_in_infotext(bundle) -> None:
    pipe = Pipeline(bundle)
    req = GenerationRequest(
        prompt="a (cat:1.3) # a note\nsitting", seed=1, steps=2, emphasis="No norm"
    )
    info = parse_infotext(pipe.generate(req).infotexts[0])
    assert info.params["Emphasis"] == "No norm"
    assert "note" not in info.prompt and "(cat:1.3)" in info.prompt


def test_prompt_command_shows_schedule_and_tokens(bundle, tmp_path, capsys) -> None:
    model = tmp_path / "tiny"
    save_diffusers(bundle, model)
    code = main(
        ["prompt", "a [cat:dog:0.5] (red:1.2) <lora:x:0.5>", "--steps", "10", "--model", str(model)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "extra network: <lora:x:0.5>" in out
    assert "steps 1-6: 'a cat (red:1.2)'" in out and "steps 7-10: 'a dog (red:1.2)'" in out
    n = len(TextEncoder(bundle.tokenizer, bundle.text_encoder).tokenize("a cat red"))
    assert f"[{n}/75 tokens]" in out
    assert "'red' x1.2" in out


def test_vae_per_request_from_the_models_folder(bundle, tmp_path) -> None:
    from dataclasses import replace

    from emaki.models.saving import bundle_to_compvis

    donor = make_tiny_bundle("sd1", seed=99)
    (tmp_path / "vae").mkdir()
    vae_file = tmp_path / "vae" / "crisp.safetensors"
    vae_state = {k: v for k, v in bundle_to_compvis(donor).items() if k.startswith("first_stage")}
    save_file(vae_state, str(vae_file))
    pipe = Pipeline(bundle, models=tmp_path)
    req = GenerationRequest(prompt="a cat", seed=4, steps=3, vae="crisp")
    got = pipe.generate(req)
    want = Pipeline(replace(bundle, vae=donor.vae)).generate(replace(req, vae=None))
    assert np.array_equal(_pixels(got.images[0]), _pixels(want.images[0]))
    params = parse_infotext(got.infotexts[0]).params
    assert params["VAE"] == "crisp" and len(params["VAE hash"]) == 10
    base = pipe.generate(replace(req, vae=None))
    assert not np.array_equal(_pixels(base.images[0]), _pixels(got.images[0]))
    assert "VAE" not in parse_infotext(base.infotexts[0]).params
    with pytest.raises(EmakiError, match="crisp"):
        pipe.generate(replace(req, vae="crips"))
