"""Diffusion stage: A1111 prompt weights, chunked long prompts, the random presets, loading real
models from files the tests make (diffusers folder, single-file LDM checkpoint), and the generator."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from synthfar_ray import diffusion
from synthfar_ray.diffusion import (
    FaceGenerator,
    ModelConfig,
    SamplerConfig,
    build_pipeline,
    build_preset_components,
    check_model_paths,
    compile_options,
    images_to_uint8,
    model_content,
    model_label,
    preset_configs,
)
from synthfar_ray.prompt_weighting import (
    CHUNK_TOKENS,
    apply_token_weights,
    count_chunks,
    chunk_tokens,
    encode_weighted_prompts,
    parse_prompt_weights,
    tokenize_weighted,
)

from sd_checkpoint_util import pipeline_to_ldm, save_single_file

SIZE = 64
SAMPLER = SamplerConfig(steps=4, width=SIZE, height=SIZE)
TINY = ModelConfig(preset="tiny-random")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy shared 2-core box OpenMP's
    barriers between two threads made these tests ~15x slower in wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gen(one_torch_thread) -> FaceGenerator:
    return FaceGenerator(TINY, SAMPLER, device="cpu")


@pytest.fixture(scope="module")
def pipe(gen):
    return gen.pipe


def pose(x: int = 28, y: int = 20) -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[y:y + 20, x:x + 6] = (255, 0, 85)
    img[y + 4:y + 8, x - 10:x + 16] = (0, 255, 170)
    return img


def plain_encode(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        return pipe.text_encoder(ids)[0][0].float()


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize("prompt, expected", [
    ("a photo", [("a photo", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:1.4) b", [("a", 1.4), (" b", 1.0)]),
    ("(a: 0.5 )", [("a", 0.5)]),
    ("((a:1.5))", [("a", 1.5 * 1.1)]),
    ("((a:2) b:0.5)", [("a", 1.0), (" b", 0.5)]),  # 2 * 0.5 = 1.0 for a
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("x, (y:1.2), (z:1.2)", [("x, ", 1.0), ("y", 1.2), (", ", 1.0), ("z", 1.2)]),
])
def test_parse_weights_and_nesting(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("prompt, expected", [
    (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
    (r"(\(a\):1.2)", [("(a)", 1.2)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),          # escaped backslash
    ("a\\b", [("a\\b", 1.0)]),                 # lone backslash stays
    ("(a", [("(a", 1.0)]),                     # unclosed: literal, no weight
    ("a)", [("a)", 1.0)]),                     # closer without opener: literal
    ("a] [b", [("a] [b", 1.0)]),
    ("(a]", [("(a]", 1.0)]),                   # mismatched kinds stay literal
    ("((a)", [("(", 1.0), ("a", 1.1)]),        # the outer one never closes
    ("[a:1.3)", [("[a:1.3)", 1.0)]),           # explicit weight only closes a round bracket
    ("time: 12:30", [("time: 12:30", 1.0)]),   # colons without a weight are text
    ("()", []),
    ("", []),
])
def test_parse_escapes_and_unbalanced(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_chunk_tokens_frames_and_pads():
    ids = list(range(100, 180))  # 80 tokens -> 2 chunks
    weights = [2.0] * 80
    c_ids, c_w = chunk_tokens(ids, weights, bos=1, eos=2, pad=3)
    assert len(c_ids) == 2 and all(len(c) == 77 for c in c_ids)
    assert c_ids[0] == [1, *ids[:75], 2]
    assert c_ids[1] == [1, *ids[75:], 2] + [3] * 70
    assert c_w[1][:7] == [1.0] + [2.0] * 5 + [1.0] and set(c_w[1][7:]) == {1.0}
    padded, _ = chunk_tokens(ids, weights, 1, 2, 3, n_chunks=4)
    assert len(padded) == 4 and padded[3] == [1, 2] + [3] * 75
    assert chunk_tokens([], [], 1, 2, 3)[0] == [[1, 2] + [3] * 75]
    with pytest.raises(ValueError, match="need 2 chunks"):
        chunk_tokens(ids, weights, 1, 2, 3, n_chunks=1)


# ---------------------------------------------------------------- chunked, weighted encoder


def test_unweighted_short_prompt_equals_plain_encoder(pipe):
    prompt = "close-up photorealistic photo of a face"
    (emb,) = encode_weighted_prompts(pipe.tokenizer, pipe.text_encoder, [prompt])
    assert emb.shape == (77, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(emb, plain_encode(pipe, prompt), rtol=0, atol=0)
    # escapes are text: "\(x\)" encodes like the plain "(x)"
    (esc,) = encode_weighted_prompts(pipe.tokenizer, pipe.text_encoder, [r"a \(smiling\) face"])
    torch.testing.assert_close(esc, plain_encode(pipe, "a (smiling) face"), rtol=0, atol=0)


def test_long_prompt_is_chunked(pipe):
    words = ["x"] * 80 + ["y"] * 10  # one token per word with this tokenizer
    long_prompt = " ".join(words)
    ids, _ = tokenize_weighted(pipe.tokenizer, long_prompt)
    assert len(ids) == 90 > 77
    (emb,) = encode_weighted_prompts(pipe.tokenizer, pipe.text_encoder, [long_prompt])
    assert emb.shape == (2 * 77, pipe.text_encoder.config.hidden_size)
    # chunks are encoded independently: chunk 1 is the first 75 tokens, chunk 2 the rest
    torch.testing.assert_close(emb[:77], plain_encode(pipe, " ".join(words[:75])), rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[77:], plain_encode(pipe, " ".join(words[75:])), rtol=0, atol=1e-6)
    # a much longer one takes ceil(n / 75) chunks
    longer = " ".join(["z"] * 400)
    (emb3,) = encode_weighted_prompts(pipe.tokenizer, pipe.text_encoder, [longer])
    assert emb3.shape[0] == math.ceil(400 / CHUNK_TOKENS) * 77


def test_weight_scales_only_its_tokens(pipe):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    plain_prompt, weighted_prompt = "a cat sits", "a (cat:1.4) sits"
    ids, weights = tokenize_weighted(tok, weighted_prompt)
    assert ids == tokenize_weighted(tok, plain_prompt)[0]
    cat_rows = [1 + i for i, w in enumerate(weights) if w != 1.0]  # +1 for BOS
    assert len(cat_rows) == len(tok("cat", add_special_tokens=False).input_ids)

    (plain,) = encode_weighted_prompts(tok, enc, [plain_prompt])
    (raw,) = encode_weighted_prompts(tok, enc, [weighted_prompt], restore_mean=False)
    other = [r for r in range(77) if r not in cat_rows]
    torch.testing.assert_close(raw[cat_rows], 1.4 * plain[cat_rows])
    torch.testing.assert_close(raw[other], plain[other], rtol=0, atol=0)

    # With mean restoration, every row is rescaled by one common factor and the mean is kept.
    (restored,) = encode_weighted_prompts(tok, enc, [weighted_prompt])
    factor = restored[other] / plain[other]
    common = factor.flatten()[0]
    assert not torch.isclose(common, torch.tensor(1.0))  # the weighting did change the mean
    torch.testing.assert_close(factor, torch.full_like(factor, common.item()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(restored[cat_rows], 1.4 * common * plain[cat_rows], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restored.mean(), plain.mean(), rtol=1e-4, atol=1e-6)


def test_mean_restoration_skipped_when_mean_is_zero():
    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # mean 0: the ratio is undefined
    weights = torch.tensor([[1.0, 2.0]])
    out = apply_token_weights(hidden, weights)
    torch.testing.assert_close(out, hidden * weights.unsqueeze(-1))
    assert torch.isfinite(out).all()


def test_equal_lengths_by_padding_with_empty_chunks(pipe):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    pos, neg = encode_weighted_prompts(tok, enc, [" ".join(["w"] * 100), "ugly"], n_chunks=[2, 2])
    assert pos.shape == neg.shape == (154, enc.config.hidden_size)
    torch.testing.assert_close(neg[77:], plain_encode(pipe, ""), rtol=0, atol=0)  # an empty chunk


# ---------------------------------------------------------------- presets and scheduler


def test_scheduler_is_dpmpp_2m_karras(pipe):
    from diffusers import DPMSolverMultistepScheduler

    cfg = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert cfg.algorithm_type == "dpmsolver++" and cfg.solver_order == 2 and cfg.use_karras_sigmas is True
    assert cfg.beta_schedule == "scaled_linear" and cfg.beta_start == 0.00085 and cfg.beta_end == 0.012
    assert pipe.safety_checker is None


def test_preset_weights_depend_only_on_seed():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_preset_components("tiny-random", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = build_preset_components("tiny-random", seed=0)
    c = build_preset_components("tiny-random", seed=1)
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
    # the ControlNet's output convs are not zero, so the pose has an effect
    assert a["controlnet"].controlnet_mid_block.weight.abs().sum() > 0


def test_sd15_random_configs_have_sd15_sizes():
    """Built on the meta device: shapes only, no memory, no init time."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = preset_configs("sd15-random")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False, **cfg["controlnet_conditioning_channels"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    # Published sizes of SD1.5 / ControlNet v1.1 / SD VAE / CLIP ViT-L/14 text tower.
    assert count(unet) == pytest.approx(859.52e6, rel=0.002)
    assert count(controlnet) == pytest.approx(361.28e6, rel=0.002)
    assert count(vae) == pytest.approx(83.65e6, rel=0.002)
    assert count(text) == pytest.approx(123.06e6, rel=0.002)


# ---------------------------------------------------------------- generation


def test_output_shape_and_seed_determinism(gen):
    p, n = ["a (smiling:1.2) face"] * 2, ["ugly"] * 2
    first = gen(p, n, [pose()] * 2, [7, 8])
    again = gen(p, n, [pose()] * 2, [7, 8])
    assert first.shape == (2, SIZE, SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)                      # same seed -> same image
    assert np.abs(first[0].astype(int) - first[1]).mean() > 1  # different seeds -> different images
    assert first.std() > 1                                     # not a blank image


def test_seed_gives_same_image_alone_or_in_batch(gen):
    long_prompt = "portrait, " + ", ".join(["detailed skin"] * 12)  # > 77 tokens: 2+ chunks
    alone = gen(["a face"], ["bad"], [pose()], [42])
    batch = gen([long_prompt, "a face", "an old man"], ["bad", "bad", "(worst quality:1.4)"],
                [pose(20), pose(), pose(36)], [5, 42, 9])
    np.testing.assert_allclose(batch[1].astype(int), alone[0].astype(int), atol=2)
    assert np.abs(batch[0].astype(int) - alone[0]).mean() > 1


def test_prompt_and_pose_change_the_image(gen):
    base = gen(["a face"], [""], [pose()], [3])[0].astype(int)
    other_prompt = gen(["a (face:1.5), grey hair"], [""], [pose()], [3])[0]
    other_pose = gen(["a face"], [""], [pose(10, 5)], [3])[0]
    assert np.abs(base - other_prompt).mean() > 0.5
    assert np.abs(base - other_pose).mean() > 0.1  # the random ControlNet's effect is milder


def test_batch_validation(gen):
    with pytest.raises(ValueError, match="differ in length"):
        gen(["a", "b"], ["c"], [pose(), pose()], [1, 2])
    with pytest.raises(ValueError, match="pose image 0"):
        gen(["a"], ["c"], [np.zeros((SIZE, SIZE), np.uint8)], [1])
    assert gen([], [], [], []).shape == (0, SIZE, SIZE, 3)


def test_non_finite_output_is_flagged_and_black_not_clipped(gen, caplog):
    """A real NaN: a weight of 1e60 overflows the prompt embedding to inf, the image to NaN."""
    huge = "(face:1" + "0" * 60 + ")"
    images, finite = gen.generate(["a face", f"a {huge}"], ["bad", "bad"], [pose(), pose()], [4, 5])
    assert finite.tolist() == [True, False]
    assert not images[1].any()  # black, not clipped noise
    alone, ok = gen.generate(["a face"], ["bad"], [pose()], [4])
    assert ok.all()
    np.testing.assert_allclose(images[0].astype(int), alone[0].astype(int), atol=2)  # its neighbour is unharmed
    with caplog.at_level("WARNING", logger="synthfar_ray.diffusion"):
        assert not gen([f"a {huge}"], ["bad"], [pose()], [5]).any()
    assert "non-finite" in caplog.text


def numpy_path_uint8(images: np.ndarray) -> np.ndarray:
    """What generation did before output_type="pt": diffusers' float32 "np" images, non-finite
    images zeroed, then numpy's rint and clip."""
    images = images.copy()
    images[~np.isfinite(images).reshape(len(images), -1).all(axis=1)] = 0.0
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uint8_on_device_rounds_like_the_numpy_path(dtype):
    # Every rounding tie (k + 0.5) / 255, its neighbours, the ends, and one NaN image.
    ties = torch.tensor([(k + 0.5) / 255 for k in range(255)], dtype=torch.float32)
    values = torch.cat([ties, torch.nextafter(ties, torch.ones(255)), torch.nextafter(ties, torch.zeros(255)),
                        torch.tensor([0.0, 1.0, 1 / 255])]).to(dtype)
    images = torch.cat([values, torch.rand(3 * 16 * 16 - len(values), dtype=torch.float32).to(dtype)])
    images = torch.stack([images.reshape(3, 16, 16), images.flip(0).reshape(3, 16, 16)])
    images = torch.cat([images, images[:1].clone().index_fill_(2, torch.tensor([3]), float("nan"))])
    u8, finite = images_to_uint8(images)
    # diffusers' "np" output: channels last, then .float() (fp16 widened before the multiply).
    as_np = images.permute(0, 2, 3, 1).float().numpy()
    assert finite.tolist() == [True, True, False]
    assert u8.dtype == np.uint8 and u8.shape == (3, 16, 16, 3) and u8.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(u8, numpy_path_uint8(as_np))
    assert not u8[2].any()


def test_pt_output_gives_the_bytes_of_the_np_output(gen):
    """The same pipeline call with output_type="np" (the old path) and "pt" (now): identical uint8."""
    pos, neg = gen._encode(["a face", "an old man"], ["bad", "bad"])

    def run(output_type):
        return gen.pipe(prompt_embeds=torch.stack(pos), negative_prompt_embeds=torch.stack(neg),
                        image=[diffusion._to_pil(pose(), 0)] * 2, num_inference_steps=SAMPLER.steps,
                        height=SIZE, width=SIZE, output_type=output_type,
                        generator=[torch.Generator("cpu").manual_seed(s) for s in (1, 2)]).images

    u8, finite = images_to_uint8(run("pt"))
    assert finite.all()
    np.testing.assert_array_equal(u8, numpy_path_uint8(np.asarray(run("np"), dtype=np.float32)))


def test_prompts_tokenized_once_and_negative_encoded_once(monkeypatch):
    g = FaceGenerator(TINY, SAMPLER, device="cpu")
    tokenized: list[str] = []
    real_tokenize = diffusion.tokenize_weighted
    monkeypatch.setattr(diffusion, "tokenize_weighted", lambda tok, p: tokenized.append(p) or real_tokenize(tok, p))
    encoded: list[int] = []  # sequences per text-encoder call
    g.pipe.text_encoder.register_forward_pre_hook(lambda _m, args: encoded.append(args[0].shape[0]))
    negative = "(worst quality:1.4), " + ", ".join(["blurry"] * 12)
    assert count_chunks(g.pipe.tokenizer, negative) == 2
    prompts = ["a face", "a (smiling:1.2) child", "an old man"]

    first = g.generate(prompts, [negative] * 3, [pose()] * 3, [1, 2, 3])
    assert sorted(tokenized) == sorted(prompts + [negative])  # each text once, the shared negative once
    assert encoded == [3 * 2, 2]  # the positives (padded to 2 chunks), then the negative alone
    tokenized.clear(), encoded.clear()
    again = g.generate(prompts, [negative] * 3, [pose()] * 3, [1, 2, 3])
    assert sorted(tokenized) == sorted(prompts) and encoded == [3 * 2]  # the negative comes from the cache
    np.testing.assert_array_equal(first[0], again[0])
    # The cached embedding is the negative's own encoding, padded as its row needs.
    (fresh,) = encode_weighted_prompts(g.pipe.tokenizer, g.pipe.text_encoder, [negative], n_chunks=2)
    torch.testing.assert_close(g._negatives[(negative, 2)], fresh)
    # A row whose positive needs more chunks gets the negative padded to that count: a second entry.
    g.generate([" ".join(["w"] * 200)], [negative], [pose()], [4])
    assert sorted(g._negatives) == [(negative, 2), (negative, 3)]


class _RecordingPipe:
    """The pipeline, recording the batch size of each diffusion call."""

    def __init__(self, pipe):
        self._pipe, self.batches = pipe, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self.batches.append(kwargs["prompt_embeds"].shape[0])
        return self._pipe(**kwargs)


def test_compiled_generator_pads_every_call_to_one_batch_shape(gen, monkeypatch):
    """With model.compile on CUDA every call runs at the static batch size (here forced on CPU):
    a short batch and the sub-batches of different chunk counts are padded, the padding discarded."""
    recorder = _RecordingPipe(gen.pipe)
    monkeypatch.setattr(gen, "pipe", recorder)
    long_prompt = "portrait, " + ", ".join(["detailed skin"] * 12)
    plain, _ = gen.generate([long_prompt, "a face", "an old man"], ["bad"] * 3, [pose()] * 3, [5, 42, 9])
    assert recorder.batches == [1, 2]  # eager: one call per chunk count, unpadded
    monkeypatch.setattr(gen, "static_batch", 4)
    padded, finite = gen.generate([long_prompt, "a face", "an old man"], ["bad"] * 3, [pose()] * 3, [5, 42, 9])
    assert recorder.batches[2:] == [4, 4] and padded.shape == (3, SIZE, SIZE, 3) and finite.all()
    # Each row is still its own seed's image (batched fp32 differs by a pixel level at most).
    np.testing.assert_allclose(padded.astype(int), plain.astype(int), atol=2)


def test_compile_settings_static_shapes_and_a_shared_cache_dir(tmp_path, monkeypatch):
    import tempfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = tmp_path / "compile-cache"
    options = compile_options(ModelConfig(compile=True, compile_mode="max-autotune", compile_cache_dir=str(cache)))
    assert options == {"mode": "max-autotune", "dynamic": False}
    assert cache.is_dir() and cache_dir() == str(cache)  # where Inductor (and Triton under it) caches now
    default = diffusion.compile_cache_dir(ModelConfig(compile=True))
    assert default == os.path.join(tempfile.gettempdir(), "synthfar-compile-cache")  # one per node
    # Where the cache lives never changes a dataset's fingerprint; a default compile_mode neither
    # (datasets made before these settings existed keep their hash).
    before = {"preset", "base", "base_config", "controlnet", "dtype", "compile", "seed"}
    assert set(model_content(ModelConfig(compile_cache_dir="/x").model_dump(mode="json"))) == before
    assert model_content(ModelConfig(compile_mode="max-autotune").model_dump(mode="json"))["compile_mode"] == "max-autotune"
    # On CPU, compile is left off (a warning), so the CPU path never pads.
    g = FaceGenerator(ModelConfig(preset="tiny-random", compile=True), SAMPLER, device="cpu", batch_size=8)
    assert g.static_batch is None and getattr(g.pipe.unet, "_compiled_call_impl", None) is None


def test_model_paths_checked_up_front_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    # Local paths are made absolute when validated (workers have other working directories); hub ids stay.
    cfg = ModelConfig(base="./models/humans.safetensors", base_config="owner/sd15")
    assert cfg.base == str(tmp_path / "models" / "humans.safetensors") and cfg.base_config == "owner/sd15"
    assert ModelConfig(base="humans.ckpt").base == str(tmp_path / "humans.ckpt")
    check_model_paths(ModelConfig())  # hub ids: nothing to check locally
    ckpt = tmp_path / "humans.safetensors"
    ckpt.write_bytes(b"")
    cases = [
        ("model.base", dict(base="/nonexistent"), "/nonexistent"),
        ("model.base", dict(base="./humans-v2.safetensors"), str(tmp_path / "humans-v2.safetensors")),
        ("model.base_config", dict(base=str(ckpt), base_config="~/no-such-sd15"), os.path.expanduser("~/no-such-sd15")),
        ("model.controlnet", dict(base=str(ckpt), controlnet="./missing-cn"), str(tmp_path / "missing-cn")),
    ]
    for setting, kwargs, path in cases:
        with pytest.raises(FileNotFoundError) as err:
            check_model_paths(ModelConfig(**kwargs))
        assert str(err.value).startswith(f"{setting}: {path} does not exist") and "\n" not in str(err.value)
    with caplog.at_level("WARNING", logger="synthfar_ray.diffusion"):
        check_model_paths(ModelConfig(preset="tiny-random", base="/nonexistent/humans.safetensors"))
    assert "model.base=/nonexistent/humans.safetensors ignored" in caplog.text


# ---------------------------------------------------------------- loading real models from files


@pytest.fixture(scope="module")
def saved_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    pipe.save_pretrained(str(folder))
    return folder


def test_load_diffusers_folder_gives_same_images(gen, saved_folder):
    loaded = FaceGenerator(ModelConfig(base=str(saved_folder), controlnet=str(saved_folder / "controlnet")),
                           SAMPLER, device="cpu")
    args = (["a (young:1.3) woman"], ["blurry"], [pose()], [11])
    np.testing.assert_array_equal(loaded(*args), gen(*args))
    assert loaded.pipe.scheduler.config.use_karras_sigmas is True


def test_single_file_checkpoint_round_trip(pipe, saved_folder, tmp_path, monkeypatch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    # The test helper is the exact inverse of diffusers' own LDM -> diffusers conversion.
    ldm = pipeline_to_ldm(pipe)
    assert any(k.startswith("model.diffusion_model.output_blocks.") for k in ldm)
    for converted, module in ((convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config)), pipe.unet),
                              (convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config)), pipe.vae)):
        ref = module.state_dict()
        assert set(converted) == set(ref)
        assert all(torch.equal(converted[k], ref[k]) for k in ref)

    ckpt = tmp_path / "humans-tiny.safetensors"
    save_single_file(pipe, str(ckpt))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(base=str(ckpt), base_config=str(saved_folder), controlnet=str(saved_folder / "controlnet"))
    loaded = build_pipeline(cfg, device="cpu")
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.scheduler.config.algorithm_type == "dpmsolver++"
    assert model_label(cfg) == "humans-tiny.safetensors+controlnet"


def test_loading_errors_name_the_path(saved_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*does not exist"):
        build_pipeline(ModelConfig(base=str(missing)), device="cpu")
    with pytest.raises(FileNotFoundError, match="no-such-dir.*does not exist"):
        build_pipeline(ModelConfig(base=str(tmp_path / "no-such-dir" / "x")), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*without model_index.json"):
        build_pipeline(ModelConfig(base=str(empty)), device="cpu")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="model.safetensors.*single file.*base_config"):
        build_pipeline(ModelConfig(base=str(ckpt)), device="cpu")
    with pytest.raises(ValueError, match="base_config.*empty.*model_index.json"):
        build_pipeline(ModelConfig(base=str(ckpt), base_config=str(empty)), device="cpu")
    with pytest.raises(FileNotFoundError, match="controlnet.*missing-cn"):
        build_pipeline(ModelConfig(base=str(saved_folder), controlnet=str(tmp_path / "missing-cn")), device="cpu")
    # an uncached hub id offline: a clear error naming the id, not a download attempt
    with pytest.raises(OSError, match="lllyasviel/control_v11p_sd15_openpose"):
        build_pipeline(ModelConfig(base=str(saved_folder), controlnet="lllyasviel/control_v11p_sd15_openpose"), device="cpu")


# ---------------------------------------------------------------- configs and labels


def test_config_validation():
    with pytest.raises(ValidationError, match="multiple of 8"):
        SamplerConfig(width=60)
    with pytest.raises(ValidationError):
        SamplerConfig(steps=0)
    with pytest.raises(ValidationError):
        ModelConfig(preset="huge-random")
    with pytest.raises(ValidationError):
        ModelConfig(bse="typo")
    assert SamplerConfig() == SamplerConfig(steps=15, guidance_scale=7.5, controlnet_scale=0.8, width=512, height=512)


def test_model_label():
    assert model_label(TINY) == "preset:tiny-random"
    assert model_label(ModelConfig(preset="sd15-random", seed=3)) == "preset:sd15-random:seed3"
    assert model_label(ModelConfig()) == "stable-diffusion-v1-5/stable-diffusion-v1-5+lllyasviel/control_v11p_sd15_openpose"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp16_generation():
    g = FaceGenerator(TINY, SAMPLER, device="cuda")
    assert g.pipe.unet.dtype == torch.float16
    assert g.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    images = g(["a face"] * 2, ["bad"] * 2, [pose()] * 2, [1, 1])
    assert images.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(images[0].astype(int), images[1].astype(int), atol=3)  # same seed
    assert images.std() > 1
