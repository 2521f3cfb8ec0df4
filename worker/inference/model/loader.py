"""Find a model (a local folder or a Hugging Face Hub id) and load its UNet, VAE and text encoder(s).

The family comes from model_index.json's `_class_name`: SD1.5-architecture pipelines (one CLIP text encoder) or
SDXL pipelines (two text encoders and the UNet's text_time conditioning); anything else is refused by name.

Safetensors only: unpickling a .bin/.ckpt/.pt file can execute arbitrary code, so those files are refused unread.
Every module is built on the meta device and takes its tensors straight from the file on the target device after a
check of every key and shape, so weights are never held twice and a mismatch is an error naming the file and the
keys instead of silently random weights.
"""
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open

from worker.inference.model.text import DualTextEncoder, TextEncoder
from worker.inference.model.unet import UNet2DConditionModel, UNetConfig
from worker.inference.model.vae import AutoencoderKL, VAEConfig
from worker.inference.names import DTYPES, dtype_key

log = logging.getLogger("inpaint.loader")

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# All a pipeline needs besides weights; pickle weights, ONNX, Flax and sample images stay on the Hub.
HUB_METADATA_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*"]
# model_index.json `_class_name` -> family. Plain (4-channel) and inpainting (9-channel) UNets load in each.
FAMILIES = {
    "StableDiffusionInpaintPipeline": "sd15", "StableDiffusionPipeline": "sd15",
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionXLInpaintPipeline": "sdxl", "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
# The SDXL text encoders we implement, as model_index.json names them.
SDXL_TEXT_ENCODERS = {"text_encoder": ("tokenizer", "CLIPTextModel"),
                      "text_encoder_2": ("tokenizer_2", "CLIPTextModelWithProjection")}
# Checkpoints saved before diffusers 0.14 name the VAE attention projections as its retired AttentionBlock did;
# diffusers renames them on load, and so do we (only where the new name is a key the model expects).
LEGACY_ATTENTION_KEY = re.compile(r"^(?P<block>.+)\.(?P<name>query|key|value|proj_attn)\.(?P<kind>weight|bias)$")
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# CPU flags (/proc/cpuinfo) of native bfloat16 arithmetic: AMX tiles or AVX-512 BF16 dot products.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")
TEXT_MODEL_PREFIX = "text_model."
LISTED_KEYS = 8  # how many offending keys an error message lists


class ModelLoadError(Exception):
    """The model cannot be found or loaded; the service reports it with error code model_unavailable."""
    code = "model_unavailable"


@dataclass(frozen=True)
class ModelFamily:
    """What model_index.json says about the pipeline; the two flags are SDXL's and read only there."""
    name: str                                   # "sd15" or "sdxl"
    force_zeros_for_empty_prompt: bool = False  # negative_prompt None -> zero negative embeddings (with guidance)
    requires_aesthetics_score: bool = False     # time ids end in an aesthetic score instead of the target size

    @property
    def time_ids(self) -> int:
        """Micro-conditioning values per image: original size, crop top-left, then target size or aesthetic score."""
        return 5 if self.requires_aesthetics_score else 6


@dataclass
class ModelComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: TextEncoder | DualTextEncoder
    scheduler_config: dict  # scheduler/scheduler_config.json
    path: Path              # the resolved local folder
    device: torch.device
    dtype: torch.dtype
    family: ModelFamily = field(default_factory=lambda: ModelFamily("sd15"))


def load_components(model: str, device=None, dtype=None, revision: str | None = None, cache_dir=None,
                    local_files_only: bool = False) -> ModelComponents:
    """Load a diffusers-layout SD model. device: cuda if available else cpu; dtype (None or "auto"): float16 on
    cuda, bfloat16 on a CPU with native bfloat16 arithmetic (AMX, AVX-512 BF16), else float32.

    With float16 the repo's fp16 variant files are used where present (half the download and no cast).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_device_runs(device, dtype)
    variant = "fp16" if dtype == torch.float16 else None
    start = time.perf_counter()
    folder = resolve_model_folder(model, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only, variant=variant)
    family = model_family(folder)
    unet = load_module(folder / "unet", UNetConfig, UNet2DConditionModel, device, dtype, variant)
    check_unet_family(folder, unet, family)
    text_encoder = load_text_encoders(folder, family, device, dtype, variant)
    if family.name == "sdxl":
        check_sdxl_dimensions(folder, unet, text_encoder, family)
    components = ModelComponents(
        unet=unet, vae=load_vae(folder, family, device, dtype, variant), text_encoder=text_encoder,
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        path=folder, device=device, dtype=dtype, family=family)
    log.info("model_loaded model=%s folder=%s device=%s dtype=%s seconds=%.2f", model, folder, device,
             str(dtype).removeprefix("torch."), time.perf_counter() - start)
    return components


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device or a name like 'cuda', 'cuda:1', 'cpu'; got {device!r}") \
            from error


def resolve_dtype(dtype, device: torch.device, cpuinfo: Path = CPUINFO) -> torch.dtype:
    if dtype is None or (isinstance(dtype, str) and dtype_key(dtype) == "auto"):
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bfloat16(cpuinfo) else torch.float32
    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype_key(dtype) in DTYPES:
        return getattr(torch, DTYPES[dtype_key(dtype)])
    raise ValueError(f"dtype must be one of auto, float16, bfloat16, float32 (or a torch dtype of those); "
                     f"got {dtype!r}")


def cpu_has_native_bfloat16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU's flags list AMX or AVX-512 BF16. There oneDNN runs bfloat16 convolutions and matmuls about
    twice as fast as float32 (measured: benchmarks/results); elsewhere bfloat16 is emulated and slower than float32.
    No /proc/cpuinfo (macOS, Windows) or no flags line (ARM's says "Features") reads as no."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.partition(":")[2].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def check_device_runs(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before any download, a CUDA device this process cannot use or a dtype its GPU has no arithmetic for:
    either would otherwise fail at the first job, or (bfloat16 before Ampere) run emulated, many times slower."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {device}: no CUDA GPU is visible to this process (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r}, or no driver); use cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ModelLoadError(f"device {device}: this process sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    major, minor = torch.cuda.get_device_capability(device)
    if dtype == torch.bfloat16 and major < 8:
        raise ModelLoadError(f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer (Ampere); "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use float16")


def resolve_model_folder(model: str, revision: str | None = None, cache_dir=None, local_files_only: bool = False,
                         variant: str | None = None) -> Path:
    """A local folder as is; a Hub id as its snapshot folder in the Hub cache, downloading only the files needed.

    With `variant` ("fp16") the variant weights are fetched, and the full ones only for components lacking them.
    local_files_only and HF_HUB_OFFLINE=1 use the cache alone.
    """
    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise ModelLoadError(f"model must be a Hub id like 'org/name' or a local folder; got {model!r}")
    model = str(model)
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model folder {model} does not exist or is not a folder")
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    components = list(WEIGHT_NAMES)
    if variant is None:
        return _snapshot(model, HUB_METADATA_PATTERNS + _weight_patterns(components, None), **hub)
    try:
        folder = _snapshot(model, HUB_METADATA_PATTERNS + _weight_patterns(components, variant), **hub)
    except ModelLoadError as error:
        if not isinstance(error.__cause__, IncompleteSnapshotError):
            raise
        # Offline, and the cache holds this revision without the variant files: use the full ones.
        return _snapshot(model, HUB_METADATA_PATTERNS + _weight_patterns(components, None), **hub)
    # Components the model has (its config came with the metadata) but not in the variant: their full files.
    lacking = [c for c in components if (folder / c).is_dir()
               and not (folder / c / f"{WEIGHT_NAMES[c]}.{variant}.safetensors").is_file()]
    if lacking:
        folder = _snapshot(model, HUB_METADATA_PATTERNS + _weight_patterns(lacking, None), **hub)
    return folder


def _weight_patterns(components: list[str], variant: str | None) -> list[str]:
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return [f"{c}/{WEIGHT_NAMES[c]}{suffix}" for c in components]


def _snapshot(model: str, patterns: list[str], revision, cache_dir, local_files_only) -> Path:
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, allow_patterns=patterns))
    except HFValidationError as error:
        raise ModelLoadError(f"model {model!r} is neither a local folder nor a valid Hub id: {error}") from error
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        where = f"revision {revision!r}" if revision else "the default revision"
        raise ModelLoadError(f"model {model!r} ({where}) is not a local folder and could not be fetched from the "
                             f"Hugging Face Hub cache or network: {type(error).__name__}: {error}") from error


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"missing file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def model_family(folder: Path) -> ModelFamily:
    """The family model_index.json names, with SDXL's pipeline flags (diffusers' defaults where absent)."""
    path = folder / "model_index.json"
    index = read_json(path)
    class_name = index.get("_class_name")
    if class_name not in FAMILIES:
        raise ModelLoadError(f"{path}: _class_name {class_name!r} is not a supported pipeline; supported: "
                             f"{', '.join(FAMILIES)}")
    if FAMILIES[class_name] == "sd15":
        return ModelFamily("sd15")
    for name, (_, model_class) in SDXL_TEXT_ENCODERS.items():
        entry = index.get(name)
        if not isinstance(entry, list) or entry[-1:] != [model_class]:
            raise ModelLoadError(f"{path}: {class_name} with {name}={entry!r} is not supported: this loader "
                                 f"implements SDXL with both text encoders ({name} = {model_class}); SDXL refiner-"
                                 "style checkpoints without the first encoder are not supported")
    flags = {key: index.get(key, default) for key, default in
             (("force_zeros_for_empty_prompt", True), ("requires_aesthetics_score", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ModelLoadError(f"{path}: {key} must be true or false, got {value!r}")
    return ModelFamily("sdxl", **flags)


def check_unet_family(folder: Path, unet: UNet2DConditionModel, family: ModelFamily) -> None:
    """SDXL pipelines need the text_time addition embedding, SD1.5 ones must not have it."""
    if unet.config.text_time != (family.name == "sdxl"):
        found = unet.config.addition_embed_type
        raise ModelLoadError(f"{folder / 'unet' / 'config.json'}: addition_embed_type={found!r} does not fit the "
                             f"{family.name} pipeline of {folder / 'model_index.json'} (SDXL needs 'text_time', "
                             "SD1.5 none)")


def check_sdxl_dimensions(folder: Path, unet: UNet2DConditionModel, text: DualTextEncoder,
                          family: ModelFamily) -> None:
    """The UNet's cross-attention and addition embedding widths against the text encoders and the time ids."""
    config, path = unet.config, folder / "unet" / "config.json"
    if config.cross_attention_dim != text.hidden_size:
        raise ModelLoadError(f"{path}: cross_attention_dim={config.cross_attention_dim} differs from the two text "
                             f"encoders' hidden sizes together ({text.hidden_size})")
    expected = text.pooled_size + family.time_ids * config.addition_time_embed_dim
    if config.projection_class_embeddings_input_dim != expected:
        hint = ("; model_index.json's requires_aesthetics_score may be wrong"
                if abs(config.projection_class_embeddings_input_dim - expected) == config.addition_time_embed_dim
                else "")
        raise ModelLoadError(f"{path}: projection_class_embeddings_input_dim="
                             f"{config.projection_class_embeddings_input_dim}, but the pooled text embedding "
                             f"({text.pooled_size}) and {family.time_ids} time ids of {config.addition_time_embed_dim} "
                             f"make {expected}{hint}")


def weights_file(component: Path, name: str, variant: str | None) -> Path:
    """`name`.`variant`.safetensors if asked for and present, else `name`.safetensors; pickle files are refused."""
    candidates = ([component / f"{name}.{variant}.safetensors"] if variant else []) + \
        [component / f"{name}.safetensors"]
    for path in candidates:
        if path.is_file():
            return path
    pickles = sorted(p.name for p in component.glob("*") if p.suffix in PICKLE_SUFFIXES) \
        if component.is_dir() else []
    if pickles:
        raise ModelLoadError(
            f"{component}: only pickle checkpoints found ({', '.join(pickles)}); refused because unpickling can "
            f"execute arbitrary code. Convert them to {name}.safetensors (safetensors format).")
    raise ModelLoadError(f"missing weights file {candidates[-1]}")


def check_state_shapes(path: Path, expected: dict[str, tuple], found: dict[str, tuple],
                       tolerated: set[str] = frozenset()) -> None:
    """Raise if the file's keys and shapes differ from the model's; `tolerated` extra keys are allowed."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys() - tolerated)
    mismatched = [f"{key} (file {list(found[key])}, model {list(expected[key])})"
                  for key in sorted(expected.keys() & found.keys()) if tuple(found[key]) != tuple(expected[key])]
    problems = [f"{label}: {_listed(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if keys]
    if problems:
        raise ModelLoadError(f"{path}: weights do not match the model config; " + "; ".join(problems))


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else ""
    return ", ".join(keys[:LISTED_KEYS]) + more


def _modern_key(key: str, expected: dict) -> str:
    match = LEGACY_ATTENTION_KEY.match(key)
    if match is None or key in expected:
        return key
    renamed = f"{match['block']}.{LEGACY_ATTENTION_NAMES[match['name']]}.{match['kind']}"
    return renamed if renamed in expected else key


def _text_model_key(key: str, known: set[str]) -> str:
    """The model's name for a checkpoint key. Hub checkpoints say "text_model.encoder..."; transformers 5's
    CLIPTextModel dropped that level (and strips it on load), transformers 4's has it."""
    for candidate in (key, key.removeprefix(TEXT_MODEL_PREFIX), TEXT_MODEL_PREFIX + key):
        if candidate in known:
            return candidate
    return key


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def read_checked_state(path: Path, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    """The file's tensors for `module` (built on meta), read straight to `device`, floats cast to `dtype`.

    Keys and shapes are checked from the file header before any tensor is read.
    """
    meta_state = module.state_dict()
    expected = {name: tuple(tensor.shape) for name, tensor in meta_state.items()}
    # Older checkpoints also saved non-persistent buffers; the module rebuilds those itself.
    tolerated = {name for name, _ in module.named_buffers()} - expected.keys()
    try:
        with safe_open(path, framework="pt", device=_safetensors_device(device)) as file:
            keys = {_modern_key(key, expected): key for key in file.keys()}
            check_state_shapes(path, expected, {new: tuple(file.get_slice(old).get_shape())
                                                for new, old in keys.items()}, tolerated)
            state = {}
            for new, old in keys.items():
                if new in expected:
                    tensor = file.get_tensor(old)
                    state[new] = tensor.to(dtype) if meta_state[new].is_floating_point() else tensor
            return state
    except SafetensorError as error:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {error}") from error


def load_module(component: Path, config_cls, module_cls, device: torch.device, dtype: torch.dtype,
                variant: str | None) -> torch.nn.Module:
    """Build `module_cls(config_cls.from_dict(config.json))` on meta and assign the checked weights to it."""
    config_path = component / "config.json"
    config_data = read_json(config_path)
    try:
        config = config_cls.from_dict(config_data)
    except (TypeError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{config_path}: unsupported {module_cls.__name__} config: {error}") from error
    weights = weights_file(component, WEIGHT_NAMES[component.name], variant)
    with torch.device("meta"):
        module = module_cls(config)
    module.load_state_dict(read_checked_state(weights, module, device, dtype), strict=True, assign=True)
    still_meta = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise ModelLoadError(f"{module_cls.__name__} has tensors neither in {weights} nor built at construction: "
                             f"{_listed(still_meta)}")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_vae(folder: Path, family: ModelFamily, device: torch.device, dtype: torch.dtype,
             variant: str | None) -> AutoencoderKL:
    """The VAE in `dtype`; SDXL's in float32 when its config says force_upcast (it overflows in float16), as
    diffusers' SDXL pipelines run it. The weights pass through `dtype` first, as diffusers' upcast_vae() does."""
    vae = load_module(folder / "vae", VAEConfig, AutoencoderKL, device, dtype, variant)
    if family.name == "sdxl" and vae.config.force_upcast:
        vae = vae.float()
    return vae


def load_text_encoders(folder: Path, family: ModelFamily, device: torch.device, dtype: torch.dtype,
                       variant: str | None) -> TextEncoder | DualTextEncoder:
    if family.name == "sd15":
        return load_text_encoder(folder, device, dtype, variant)
    first, second = (load_text_encoder(folder, device, dtype, variant, name, tokenizer, model_class, True)
                     for name, (tokenizer, model_class) in SDXL_TEXT_ENCODERS.items())
    try:
        return DualTextEncoder(first, second)
    except ValueError as error:
        raise ModelLoadError(f"{folder}: {error}") from error


def load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype, variant: str | None,
                      name: str = "text_encoder", tokenizer: str = "tokenizer", model_class: str = "CLIPTextModel",
                      penultimate: bool = False) -> TextEncoder:
    component = folder / name
    read_json(component / "config.json")
    if not any((folder / tokenizer / file).is_file() for file in ("vocab.json", "tokenizer.json")):
        raise ModelLoadError(f"missing tokenizer files in {folder / tokenizer} (vocab.json + merges.txt, "
                             "or tokenizer.json)")
    weights = weights_file(component, WEIGHT_NAMES[name], variant)
    expected, tolerated = TextEncoder.expected_shapes(component, model_class)
    try:
        with safe_open(weights, framework="pt", device="cpu") as file:
            found = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except SafetensorError as error:
        raise ModelLoadError(f"{weights} is not a readable safetensors file: {error}") from error
    known = expected.keys() | tolerated
    check_state_shapes(weights, expected, {_text_model_key(key, known): shape for key, shape in found.items()},
                       tolerated)
    file_variant = variant if variant and weights.name == f"model.{variant}.safetensors" else None
    try:
        return TextEncoder.from_folder(folder, device, dtype, variant=file_variant, component=name,
                                       tokenizer=tokenizer, model_class=model_class, penultimate=penultimate)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the text encoder from {component}: {error}") from error
