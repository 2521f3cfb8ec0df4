"""Model loading: local folders and the Hub cache, strict key checks, pickle refusal, fp16 variants, the text
encoder against diffusers' encode_prompt, and the tiny model writer (loaded by diffusers too)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from safetensors.torch import load_file, save_file

from worker.inference.model import loader
from worker.inference.model.loader import (ModelLoadError, check_device_runs, cpu_has_native_bfloat16,
                                           load_components, resolve_dtype, resolve_model_folder)
from worker.inference.model.text import TextEncoder
from worker.inference.model.tiny import SCHEDULER_CONFIG, WORDS, main as tiny_main, write_tiny_model

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
LONG_PROMPT = " ".join(["a red cat sitting on a blue chair"] * 12)  # ~100 tokens: truncated at 77
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(str(tiny_model_dir), device="cpu", dtype=torch.float32)


def _edit_weights(path, edit):
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _assert_state_equals_file(module, path, dtype=torch.float32):
    expected = load_file(path)
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor.to(dtype)), name


def test_local_folder_loads_every_weight_strictly(components, tiny_model_dir):
    assert components.path == tiny_model_dir.resolve()
    assert components.device == torch.device("cpu") and components.dtype == torch.float32
    assert components.scheduler_config == SCHEDULER_CONFIG
    assert components.unet.config.in_channels == 9
    _assert_state_equals_file(components.unet, tiny_model_dir / UNET_WEIGHTS)
    _assert_state_equals_file(components.vae, tiny_model_dir / VAE_WEIGHTS)
    for module in (components.unet, components.vae, components.text_encoder.model):
        assert not module.training
        assert not any(p.requires_grad or p.is_meta for p in module.parameters())


@pytest.mark.parametrize("problem, edit, expected", [
    ("missing", lambda s: s.pop("conv_in.weight"), "missing keys: conv_in.weight"),
    ("unexpected", lambda s: s.update({"conv_in.extra": torch.zeros(2)}), "unexpected keys: conv_in.extra"),
    ("mis-shaped", lambda s: s.update({"conv_out.bias": torch.zeros(5)}),
     "shape mismatches: conv_out.bias (file [5], model [4])"),
])
def test_weight_mismatch_names_file_and_key(model_copy, problem, edit, expected):
    _edit_weights(model_copy / UNET_WEIGHTS, edit)
    with pytest.raises(ModelLoadError) as error:
        load_components(str(model_copy), device="cpu")
    assert str(model_copy / UNET_WEIGHTS) in str(error.value)
    assert expected in str(error.value)


def test_text_encoder_mismatch_names_file_and_key(model_copy):
    path = model_copy / "text_encoder" / "model.safetensors"
    _edit_weights(path, lambda s: s.pop("text_model.final_layer_norm.bias"))
    with pytest.raises(ModelLoadError, match="missing keys: (text_model.)?final_layer_norm.bias") as error:
        load_components(str(model_copy), device="cpu")
    assert str(path) in str(error.value)


def test_old_checkpoints_with_saved_position_ids_load(model_copy):
    # Text encoders saved before transformers 4.31 (SD1.5's among them) hold this now non-persistent buffer.
    path = model_copy / "text_encoder" / "model.safetensors"
    _edit_weights(path, lambda s: s.update({"text_model.embeddings.position_ids": torch.arange(77)[None]}))
    encoder = load_components(str(model_copy), device="cpu").text_encoder
    assert encoder.encode(["a cat"]).shape == (1, 77, 32)


def test_legacy_vae_attention_names_load(model_copy, tiny_model_dir):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(state):
        for name in [n for n in state if ".attentions." in n]:
            for new, old in legacy.items():
                if f".{new}." in name:
                    state[name.replace(f".{new}.", f".{old}.")] = state.pop(name)

    _edit_weights(model_copy / VAE_WEIGHTS, rename)
    assert any(".query." in name for name in load_file(model_copy / VAE_WEIGHTS))
    vae = load_components(str(model_copy), device="cpu", dtype=torch.float32).vae
    _assert_state_equals_file(vae, tiny_model_dir / VAE_WEIGHTS)


@pytest.mark.parametrize("component, suffix", [("unet", ".bin"), ("vae", ".ckpt"), ("text_encoder", ".pt")])
def test_pickle_checkpoints_are_refused_unread(model_copy, tmp_path, component, suffix):
    marker = tmp_path / "pickle-was-executed"
    # Protocol-0 pickle for open(marker, "w"): unpickling it would create the marker file.
    payload = f"cbuiltins\nopen\n(S'{marker}'\nS'w'\ntR.".encode()
    for weights in (model_copy / component).glob("*.safetensors"):
        weights.unlink()
    (model_copy / component / f"weights{suffix}").write_bytes(payload)
    with pytest.raises(ModelLoadError, match="pickle.*arbitrary code.*safetensors") as error:
        load_components(str(model_copy), device="cpu")
    assert f"weights{suffix}" in str(error.value)
    assert not marker.exists()


def _write_fp16_variant(folder, relative, offset):
    """A variant file whose values differ from the full file's, to tell which one was loaded."""
    state = {name: (t + offset).half() for name, t in load_file(folder / relative).items()}
    variant = folder / relative.replace(".safetensors", ".fp16.safetensors")
    save_file(state, variant, metadata={"format": "pt"})
    return variant


def test_fp16_variant_preferred_for_float16_with_full_file_fallback(model_copy):
    variant = _write_fp16_variant(model_copy, UNET_WEIGHTS, offset=1.0)
    half = load_components(str(model_copy), device="cpu", dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16
    _assert_state_equals_file(half.unet, variant, torch.float16)
    _assert_state_equals_file(half.vae, model_copy / VAE_WEIGHTS, torch.float16)  # no variant: full file
    full = load_components(str(model_copy), device="cpu", dtype=torch.float32)
    _assert_state_equals_file(full.unet, model_copy / UNET_WEIGHTS)


def test_text_encoder_fp16_variant(model_copy):
    _write_fp16_variant(model_copy, "text_encoder/model.safetensors", offset=1.0)
    half = load_components(str(model_copy), device="cpu", dtype="fp16").text_encoder
    full = load_components(str(model_copy), device="cpu", dtype="float32").text_encoder
    assert half.dtype == torch.float16
    assert torch.equal(_final_norm_bias(half), _final_norm_bias(full).half() + 1)


def _final_norm_bias(encoder):
    # transformers 5's CLIPTextModel has no text_model level; transformers 4's has.
    return next(p for name, p in encoder.model.named_parameters() if name.endswith("final_layer_norm.bias"))


@pytest.fixture
def hub_cache(tiny_model_dir, tmp_path):
    """A Hugging Face cache holding org/tiny at COMMIT, with refs/main pointing there."""
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def test_hub_id_loads_from_cache_offline(hub_cache):
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / COMMIT
    for revision in (None, "main", COMMIT):
        loaded = load_components("org/tiny", device="cpu", dtype=torch.float32, revision=revision,
                                 cache_dir=hub_cache, local_files_only=True)
        assert loaded.path == snapshot
    _assert_state_equals_file(loaded.unet, snapshot / UNET_WEIGHTS)


def test_offline_cache_without_variant_files_falls_back_to_full_files(hub_cache):
    """The Hub lists fp16 files the cache never fetched (say, the worker ran in float32 before)."""
    repo = hub_cache / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    listed = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    listed += ["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    write_tree_cache(str(repo), COMMIT, {path: TreeCacheEntry(size=1, blob_id="0" * 40) for path in listed})
    loaded = load_components("org/tiny", device="cpu", dtype=torch.float16, cache_dir=hub_cache,
                             local_files_only=True)
    _assert_state_equals_file(loaded.unet, snapshot / UNET_WEIGHTS, torch.float16)


OFFLINE_SCRIPT = """
import sys
from worker.inference.model.loader import ModelLoadError, resolve_model_folder
print(resolve_model_folder("org/tiny", cache_dir=sys.argv[1], variant="fp16"))
try:
    resolve_model_folder("org/unknown", cache_dir=sys.argv[1])
except ModelLoadError as error:
    print(error)
"""


def test_hf_hub_offline_env_is_honoured(hub_cache):
    # huggingface_hub reads HF_HUB_OFFLINE when imported, hence a fresh interpreter.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(hub_cache)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    found, missing = run.stdout.strip().split("\n", 1)
    assert found == str(hub_cache / "models--org--tiny" / "snapshots" / COMMIT)
    assert "model 'org/unknown'" in missing and "HF_HUB_OFFLINE" in missing


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model 'org/no-such-model' .*not a local folder.*Hugging Face Hub"):
        resolve_model_folder("org/no-such-model", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(ModelLoadError, match="neither a local folder nor a valid Hub id"):
        resolve_model_folder("not a valid id!", cache_dir=tmp_path, local_files_only=True)


def test_missing_local_folder_and_files_are_named(model_copy, tmp_path):
    with pytest.raises(ModelLoadError, match="model folder .*nowhere does not exist"):
        resolve_model_folder(str(tmp_path / "nowhere"))
    (model_copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError, match="missing file .*scheduler_config.json"):
        load_components(str(model_copy), device="cpu")
    (model_copy / "vae" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="missing file .*vae/config.json"):
        load_components(str(model_copy), device="cpu")
    (model_copy / UNET_WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match=f"missing weights file .*{UNET_WEIGHTS}"):
        load_components(str(model_copy), device="cpu")


def test_unsupported_config_names_file(model_copy):
    config_path = model_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["attention_type"] = "gated"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unet/config.json.*attention_type"):
        load_components(str(model_copy), device="cpu")


def test_dtype_names_and_bad_values():
    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("Float32", cpu) == resolve_dtype(torch.float32, cpu) == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of auto, float16, bfloat16, float32"):
        resolve_dtype("int8", cpu)


def _cpuinfo(tmp_path, flags: str):
    # Two logical CPUs, as /proc/cpuinfo lists them: a block per CPU, each with its own flags line.
    block = f"processor\t: {{}}\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: {flags}\n\n"
    path = tmp_path / "cpuinfo"
    path.write_text(block.format(0) + block.format(1))
    return path


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx2 avx512f avx512_bf16 amx_tile", torch.bfloat16),   # Cooper Lake and later: AVX-512 BF16
    ("fpu sse2 avx2 avx512f amx_bf16 amx_tile", torch.bfloat16),      # AMX alone
    ("fpu sse2 avx2 avx512f avx512bw avx512vl", torch.float32),       # AVX-512 without BF16: emulated, slower
    ("fpu sse2 avx2 avx512_bf16x", torch.float32),                    # whole flags only
])
def test_auto_dtype_on_cpu_follows_the_bfloat16_flags(tmp_path, flags, expected):
    cpuinfo = _cpuinfo(tmp_path, flags)
    for auto in (None, "auto", "AUTO"):
        assert resolve_dtype(auto, torch.device("cpu"), cpuinfo) == expected
    assert resolve_dtype("float32", torch.device("cpu"), cpuinfo) == torch.float32  # a dtype given still wins
    assert resolve_dtype(None, torch.device("cuda"), cpuinfo) == torch.float16


def test_auto_dtype_without_cpu_flags_is_float32(tmp_path):
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # ARM names its flags "Features"
    assert not cpu_has_native_bfloat16(arm)
    assert not cpu_has_native_bfloat16(tmp_path / "missing")  # macOS, Windows: no /proc/cpuinfo
    assert resolve_dtype("auto", torch.device("cpu"), tmp_path / "missing") == torch.float32


def test_auto_dtype_loads_in_the_resolved_dtype(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loader, "cpu_has_native_bfloat16", lambda cpuinfo=None: True)
    components = load_components(str(tiny_model_dir), device="cpu", dtype="auto")
    assert components.dtype == torch.bfloat16
    assert components.unet.conv_in.weight.dtype == components.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert components.text_encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="device must be"):
        load_components("org/x", device="gpu0")


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda as seen on a host with the given GPUs: (name, compute capability) pairs."""
    def install(*gpus):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[device.index or 0][1])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpus[device.index or 0][0])
    return install


@pytest.mark.parametrize("device, dtype", [("cuda", torch.bfloat16), ("cuda:1", torch.float16),
                                           ("cpu", torch.bfloat16)])
def test_a_device_and_dtype_the_host_can_run_are_accepted(fake_gpus, device, dtype):
    fake_gpus(("NVIDIA H100", (9, 0)), ("Tesla T4", (7, 5)))
    check_device_runs(torch.device(device), dtype)


@pytest.mark.parametrize("gpus, device, dtype, message", [
    ((), "cuda", torch.float16, "device cuda: no CUDA GPU is visible to this process.*use cpu"),
    ([("NVIDIA H100", (9, 0))], "cuda:1", torch.float16,
     r"device cuda:1: this process sees 1 GPU\(s\), cuda:0 to cuda:0"),
    ([("NVIDIA H100", (9, 0)), ("Tesla T4", (7, 5))], "cuda:1", torch.bfloat16,
     r"bfloat16 needs a GPU of compute capability 8.0.*Tesla T4 is 7.5: use float16"),
])
def test_a_device_or_dtype_the_host_cannot_run_fails_before_loading(fake_gpus, gpus, device, dtype, message):
    fake_gpus(*gpus)
    with pytest.raises(ModelLoadError, match=message):
        check_device_runs(torch.device(device), dtype)
    with pytest.raises(ModelLoadError, match=message):   # before the model is looked for: it does not exist
        load_components("/no/such/model", device=device, dtype=dtype)


def test_text_encoder_matches_diffusers_encode_prompt(components, tiny_model_dir):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    prompts = ["a photo of a cat", "", LONG_PROMPT]
    negatives = ["blurry", "ugly hands!", ""]
    theirs, their_negatives = pipe.encode_prompt(prompts, "cpu", 1, True, negatives)
    encoder = components.text_encoder
    assert torch.equal(encoder.encode(prompts), theirs)
    assert torch.equal(encoder.encode(negatives), their_negatives)
    assert encoder.encode(prompts).shape == (3, 77, 32)


def test_count_tokens_and_vocabulary(components):
    encoder = components.text_encoder
    assert encoder.max_length == 77
    assert encoder.count_tokens("a photo of a cat") == 7  # start + 5 words + end
    assert encoder.count_tokens(LONG_PROMPT) > encoder.max_length
    assert all(encoder.count_tokens(word) == 3 for word in WORDS)
    assert encoder.count_tokens("zqx") > 3  # unknown words still tokenize, byte by byte
    with pytest.raises(TypeError, match="prompts must be a list of str"):
        encoder.encode("a cat")


def test_tiny_model_loads_in_diffusers(tiny_model_dir, components):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
    assert pipe.vae_scale_factor == components.vae.scale_factor == 2
    for theirs, ours in ((pipe.unet, components.unet), (pipe.vae, components.vae),
                         (pipe.text_encoder, components.text_encoder.model)):
        their_state, our_state = theirs.state_dict(), ours.state_dict()
        assert their_state.keys() == our_state.keys()
        assert all(torch.equal(their_state[name], our_state[name]) for name in our_state)


def test_tiny_writer_is_deterministic_and_has_a_cli(tmp_path, tiny_model_dir):
    tiny_main([str(tmp_path / "again"), "--seed", "0"])
    for relative in (UNET_WEIGHTS, VAE_WEIGHTS, "text_encoder/model.safetensors", "tokenizer/vocab.json"):
        assert (tmp_path / "again" / relative).read_bytes() == (tiny_model_dir / relative).read_bytes(), relative
    other = write_tiny_model(tmp_path / "plain", in_channels=4, seed=1)
    plain = load_components(str(other), device="cpu")
    assert plain.unet.config.in_channels == 4
    assert not torch.equal(load_file(other / VAE_WEIGHTS)["encoder.conv_in.weight"],
                           load_file(tiny_model_dir / VAE_WEIGHTS)["encoder.conv_in.weight"])
    index = json.loads((other / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline" and index["requires_safety_checker"] is False
    with pytest.raises(ValueError, match="in_channels must be 9"):
        write_tiny_model(tmp_path / "bad", in_channels=3)
    tiny_main([str(tmp_path / "sd-scale"), "--vae-scale", "8"])
    assert load_components(str(tmp_path / "sd-scale"), device="cpu").vae.scale_factor == 8
    with pytest.raises(ValueError, match="vae_scale must be 2 or 8"):
        write_tiny_model(tmp_path / "bad", vae_scale=4)


def test_text_encoder_from_folder_directly(tiny_model_dir):
    encoder = TextEncoder.from_folder(tiny_model_dir, "cpu", torch.float32)
    assert encoder.hidden_size == 32 and encoder.device == torch.device("cpu")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), family="sdxl")


@pytest.fixture
def sdxl_copy(sdxl_dir, tmp_path):
    return shutil.copytree(sdxl_dir, tmp_path / "sdxl")


def _edit_index(folder, **changes):
    path = folder / "model_index.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_sdxl_folder_loads_two_encoders_and_matches_diffusers_encode_prompt(sdxl_dir):
    diffusers = pytest.importorskip("diffusers")
    components = load_components(str(sdxl_dir), device="cpu", dtype=torch.float32)
    assert components.family.name == "sdxl" and components.family.force_zeros_for_empty_prompt
    assert not components.family.requires_aesthetics_score and components.unet.config.text_time
    pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    prompts = ["a photo of a cat", "", LONG_PROMPT]
    theirs, _, their_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    hidden, pooled = components.text_encoder.encode_with_pooled(prompts)
    assert hidden.shape == (3, 77, 64) and pooled.shape == (3, 32)
    assert torch.equal(hidden, theirs) and torch.equal(pooled, their_pooled)


def test_sdxl_vae_runs_in_float32_under_float16(sdxl_dir, tiny_model_dir):
    sdxl = load_components(str(sdxl_dir), device="cpu", dtype=torch.float16)
    assert sdxl.unet.conv_in.weight.dtype == torch.float16 and sdxl.vae.encoder.conv_in.weight.dtype == torch.float32
    sd15 = load_components(str(tiny_model_dir), device="cpu", dtype=torch.float16)  # SD1.5 pipelines never upcast
    assert sd15.vae.encoder.conv_in.weight.dtype == torch.float16


@pytest.mark.parametrize("changes, message", [
    ({"_class_name": "StableDiffusion3InpaintPipeline"}, "'StableDiffusion3InpaintPipeline' is not a supported"),
    ({"text_encoder": [None, None]}, "without the first encoder are not supported"),
    ({"text_encoder_2": ["transformers", "T5EncoderModel"]}, "text_encoder_2=.*T5EncoderModel"),
    ({"requires_aesthetics_score": True}, "requires_aesthetics_score may be wrong"),
    ({"force_zeros_for_empty_prompt": "yes"}, "force_zeros_for_empty_prompt must be true or false"),
    ({"_class_name": "StableDiffusionInpaintPipeline"}, "addition_embed_type='text_time' does not fit the sd15"),
])
def test_unsupported_sdxl_layouts_are_refused_by_name(sdxl_copy, changes, message):
    _edit_index(sdxl_copy, **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_components(str(sdxl_copy), device="cpu")


def test_sdxl_unet_config_features_we_lack_are_refused(sdxl_copy):
    path = sdxl_copy / "unet" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"time_cond_proj_dim": 256}))  # LCM-distilled SDXL
    with pytest.raises(ModelLoadError, match="time_cond_proj_dim"):
        load_components(str(sdxl_copy), device="cpu")


def test_a_folder_without_model_index_is_named(model_copy):
    (model_copy / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match="missing file .*model_index.json"):
        load_components(str(model_copy), device="cpu")


def test_tiny_cli_writes_sdxl(tmp_path, sdxl_dir):
    tiny_main([str(tmp_path / "xl"), "--family", "sdxl"])
    for relative in (UNET_WEIGHTS, "text_encoder_2/model.safetensors", "tokenizer_2/special_tokens_map.json"):
        assert (tmp_path / "xl" / relative).read_bytes() == (sdxl_dir / relative).read_bytes(), relative
    with pytest.raises(ValueError, match="requires_aesthetics_score is an SDXL pipeline flag"):
        write_tiny_model(tmp_path / "bad", requires_aesthetics_score=True)
