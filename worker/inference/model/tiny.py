"""Write a tiny random inpainting model in the diffusers folder layout.

    python -m worker.inference.model.tiny DIR [--family sd15|sdxl] [--in-channels 9|4] [--vae-scale 2|8] [--seed N]

The folder loads with our loader and with diffusers' StableDiffusionInpaintPipeline (--family sdxl:
StableDiffusionXLInpaintPipeline, two text encoders and the text_time UNet), so tests and demos run the whole stack
in seconds on a CPU. Only our own modules and transformers are used; diffusers is not needed.
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from worker.inference.model.unet import UNet2DConditionModel, UNetConfig
from worker.inference.model.vae import AutoencoderKL, VAEConfig

DIFFUSERS_VERSION = "0.30.0"  # the format version the files follow, written as diffusers does
WEIGHT_SCALE = 0.7            # shrinks the default init so tiny random images stay away from 0 and 255
# VAE downsampling -> its blocks: 2 is the fastest at the tests' small sizes; 8 is SD's (64x64 latents at 512x512).
VAE_BLOCKS = {2: 2, 8: 4}
FAMILIES = ("sd15", "sdxl")

# Equal to stable-diffusion-v1-5/stable-diffusion-inpainting's scheduler/scheduler_config.json.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
# Equal to diffusers/stable-diffusion-xl-1.0-inpainting-0.1's scheduler/scheduler_config.json.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.21.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_TIME_EMBED_DIM = 8  # sinusoidal channels per micro-conditioning value (SDXL: 256)
TEXT_WIDTH = 32          # hidden size of every tiny text encoder, and the pooled projection's size

# Short words that become single tokens; everything else still tokenizes, byte by byte.
WORDS = (
    "a an the of on in at to and with by for from is it this that photo picture painting drawing image "
    "cat dog bird horse car house tree flower sky sea sun moon cloud grass road wall door window table chair "
    "red blue green yellow black white gray orange pink purple brown dark light big small old new "
    "high quality detailed blurry bad ugly art style man woman face hand eye hair"
).split()

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
TEXT_MODEL_PREFIX = "text_model."


def unet_config(in_channels: int) -> dict:
    """A tiny UNet config with the same keys as SD1.5-inpainting's unet/config.json."""
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [32, 64], "center_input_sample": False,
        "cross_attention_dim": 32, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": in_channels,
        "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 32, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }


def sdxl_unet_config(in_channels: int, requires_aesthetics_score: bool = False) -> dict:
    """A tiny UNet config with SDXL's features: text_time addition embedding (two text encoders' widths, the pooled
    projection and 5 or 6 time ids), per-block heads and transformer depths, linear projections."""
    time_ids = 5 if requires_aesthetics_score else 6
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM, "attention_head_dim": [2, 4], "block_out_channels": [32, 64],
        "center_input_sample": False, "cross_attention_dim": 2 * TEXT_WIDTH,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": in_channels, "layers_per_block": 1,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "projection_class_embeddings_input_dim": TEXT_WIDTH + time_ids * SDXL_TIME_EMBED_DIM, "sample_size": 32,
        "transformer_layers_per_block": [1, 2], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }


def vae_config(scale: int = 2, family: str = "sd15") -> dict:
    """A tiny VAE config with the same keys as SD1.5's (or SDXL's) vae/config.json, downsampling by `scale`."""
    blocks = VAE_BLOCKS[scale]
    sdxl = {"force_upcast": True, "scaling_factor": 0.13025} if family == "sdxl" else {}
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "block_out_channels": [32] + [64] * (blocks - 1),
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 1, "norm_num_groups": 32, "out_channels": 3, "sample_size": 64,
        "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * blocks, **sdxl,
    }


def model_index() -> dict:
    """model_index.json as diffusers writes it for StableDiffusionInpaintPipeline without a safety checker."""
    return {
        "_class_name": "StableDiffusionInpaintPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def sdxl_model_index(requires_aesthetics_score: bool = False) -> dict:
    """model_index.json as diffusers/stable-diffusion-xl-1.0-inpainting-0.1 has it."""
    return {
        "_class_name": "StableDiffusionXLInpaintPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
        "requires_aesthetics_score": requires_aesthetics_score, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table: the BPE alphabet, so every string has a tokenization."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _apply_merges(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none is listed."""
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def bpe_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """CLIP-layout vocab: the 256 byte symbols, the same with "</w>", merged words, then the special tokens.

    Merges are added until each listed word encodes to a single token under the merges of all words before it,
    so every merge result is in the vocab and the words stay single tokens whatever their order.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks[parts[0], parts[1]] = len(ranks)
            tokens.append(parts[0] + parts[1])
            parts = _apply_merges(parts, ranks)
    tokens += [BOS, EOS]
    merges = [f"{left} {right}" for left, right in ranks]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def write_tokenizer(folder: Path, pad_token: str = EOS) -> dict[str, int]:
    """CLIP's tokenizer files; SDXL's second tokenizer (OpenCLIP's) pads with "!" instead of the end token."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return vocab


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _shrink_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(WEIGHT_SCALE)
    return module


def _write_module(folder: Path, config: dict, module: torch.nn.Module) -> None:
    _write_json(folder / "config.json", config)
    state = {name: tensor.contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def _write_text_encoder(folder: Path, vocab: dict[str, int], model_class=CLIPTextModel, hidden_act="quick_gelu",
                        pad_token: str = EOS) -> None:
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=TEXT_WIDTH, hidden_act=hidden_act,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[pad_token])
    if len(vocab) > config.vocab_size:
        raise ValueError(f"tokenizer vocab ({len(vocab)}) must fit the text encoder's {config.vocab_size} embeddings")
    config.architectures = [model_class.__name__]
    config.save_pretrained(folder)
    # Keys as every SD checkpoint on the Hub has them ("text_model." first): transformers 4 needs that level and
    # transformers 5, whose CLIPTextModel dropped it, strips it on load.
    state = {name if name.startswith(TEXT_MODEL_PREFIX) or name == "text_projection.weight"
             else TEXT_MODEL_PREFIX + name: tensor.contiguous()
             for name, tensor in model_class(config).state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def write_tiny_model(folder: Path, in_channels: int = 9, seed: int = 0, vae_scale: int = 2, family: str = "sd15",
                     requires_aesthetics_score: bool = False) -> Path:
    """Write the tiny model into `folder` (created if needed) and return it. Same seed, same bytes.

    family "sdxl": the StableDiffusionXLInpaintPipeline layout; `requires_aesthetics_score` is SDXL's pipeline flag.
    """
    if in_channels not in (4, 9):
        raise ValueError(f"in_channels must be 9 (inpainting UNet) or 4 (plain SD UNet), got {in_channels!r}")
    if vae_scale not in VAE_BLOCKS:
        raise ValueError(f"vae_scale must be {' or '.join(map(str, VAE_BLOCKS))}, got {vae_scale!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if requires_aesthetics_score and family != "sdxl":
        raise ValueError("requires_aesthetics_score is an SDXL pipeline flag: use family='sdxl'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = family == "sdxl"
    _write_json(folder / "model_index.json", sdxl_model_index(requires_aesthetics_score) if sdxl else model_index())
    _write_json(folder / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER_CONFIG if sdxl else SCHEDULER_CONFIG)
    unet_dict = sdxl_unet_config(in_channels, requires_aesthetics_score) if sdxl else unet_config(in_channels)
    # Forked so that writing a model leaves the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _shrink_(UNet2DConditionModel(UNetConfig.from_dict(unet_dict)))
        _write_module(folder / "unet", unet_dict, unet)
        vae = _shrink_(AutoencoderKL(VAEConfig.from_dict(vae_config(vae_scale, family))))
        _write_module(folder / "vae", vae_config(vae_scale, family), vae)
        _write_text_encoder(folder / "text_encoder", write_tokenizer(folder / "tokenizer"))
        if sdxl:  # OpenCLIP bigG's layout: GELU, a pooled projection, "!" padding
            _write_text_encoder(folder / "text_encoder_2", write_tokenizer(folder / "tokenizer_2", pad_token="!"),
                                CLIPTextModelWithProjection, hidden_act="gelu", pad_token="!")
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.inference.model.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="output folder (created if needed)")
    parser.add_argument("--family", choices=FAMILIES, default="sd15",
                        help="sd15 (default): StableDiffusionInpaintPipeline layout; sdxl: StableDiffusionXLInpaint")
    parser.add_argument("--in-channels", type=int, choices=(9, 4), default=9,
                        help="9 = inpainting UNet (default), 4 = plain SD UNet")
    parser.add_argument("--vae-scale", type=int, choices=sorted(VAE_BLOCKS), default=2,
                        help="image-to-latent downsampling: 2 (default, fastest at small sizes) or 8 (as SD's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_model(args.folder, in_channels=args.in_channels, seed=args.seed, vae_scale=args.vae_scale,
                           family=args.family))


if __name__ == "__main__":
    main()
