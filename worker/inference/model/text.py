"""The CLIP text encoders, transformers' CLIPTextModel (SD1.5, SDXL's first) and CLIPTextModelWithProjection (SDXL's
second, OpenCLIP bigG) with their CLIPTokenizers, used the way diffusers' SD and SDXL pipelines do."""
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
# model_index.json class name -> the transformers class, for the encoders we implement.
MODEL_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


class TextEncoder:
    """One CLIP text encoder. `penultimate`: the hidden states before the last layer (SDXL) instead of the final
    layer-normed ones (SD1.5)."""

    def __init__(self, model: CLIPTextModel | CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 penultimate: bool = False):
        self.model, self.tokenizer, self.penultimate = model, tokenizer, penultimate
        # A tokenizer_config.json without model_max_length reports a huge default; the position table bounds it.
        self.max_length: int = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        # Some SD2-style encoders were trained with an attention mask; diffusers passes it only then.
        self.use_attention_mask = bool(getattr(model.config, "use_attention_mask", False))

    @classmethod
    def from_folder(cls, folder: Path, device, dtype: torch.dtype, variant: str | None = None,
                    component: str = "text_encoder", tokenizer: str = "tokenizer",
                    model_class: str = "CLIPTextModel", penultimate: bool = False) -> "TextEncoder":
        """Load `folder`/`component` (safetensors only) and `folder`/`tokenizer`.

        `variant="fp16"` reads `component`/model.fp16.safetensors. Any missing, unexpected or mis-shaped weight is
        an error: transformers would otherwise fill the gap with random weights and only log a warning.
        """
        folder = Path(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder / tokenizer)
        # Read on the CPU, then moved: a device_map would need accelerate (SDXL's bigG encoder is ~1.4 GB in fp16).
        model, info = MODEL_CLASSES[model_class].from_pretrained(
            folder / component, use_safetensors=True, dtype=dtype, variant=variant, output_loading_info=True)
        problems = {name: info[name] for name in LOADING_PROBLEMS if info.get(name)}
        if problems:
            raise ValueError(f"{folder / component}: weights do not match the config: {problems}")
        return cls(model.to(device).eval().requires_grad_(False), tokenizer, penultimate)

    @staticmethod
    def expected_shapes(config_folder: Path, model_class: str = "CLIPTextModel") \
            -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """(parameter and persistent buffer shapes, non-persistent buffer names) for the config in `config_folder`.

        Built on the meta device: no memory, no init. Older checkpoints also saved the non-persistent buffers
        (e.g. position_ids), so a loader may tolerate those names.
        """
        config = CLIPTextConfig.from_pretrained(config_folder)
        with torch.device("meta"):
            model = MODEL_CLASSES[model_class](config)
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        return shapes, {name for name, _ in model.named_buffers()} - shapes.keys()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_size(self) -> int | None:
        """The projected pooled embedding's size (CLIPTextModelWithProjection), None for a plain CLIPTextModel."""
        return self.model.config.projection_dim if isinstance(self.model, CLIPTextModelWithProjection) else None

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, hidden) hidden states, tokenized exactly as the diffusers pipelines' encode_prompt."""
        return self.encode_with_pooled(prompts)[0]

    @torch.no_grad()
    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (B, max_length, hidden), projected pooled embedding (B, projection_dim) or None)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.device) if self.use_attention_mask else None
        out = self.model(tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return hidden, getattr(out, "text_embeds", None)

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` including the start and end tokens; above max_length the prompt gets truncated."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)


class DualTextEncoder:
    """SDXL's two encoders (CLIP ViT-L, then OpenCLIP bigG with its projection), as StableDiffusionXLPipeline's
    encode_prompt uses them: both encoders' penultimate hidden states, concatenated, and the second's pooled
    projection."""

    def __init__(self, first: TextEncoder, second: TextEncoder):
        if second.pooled_size is None:
            raise ValueError("the second SDXL text encoder must be a CLIPTextModelWithProjection (its pooled output "
                             "conditions the UNet)")
        self.encoders = (first, second)

    @property
    def max_length(self) -> int:
        return min(encoder.max_length for encoder in self.encoders)

    @property
    def hidden_size(self) -> int:
        return sum(encoder.hidden_size for encoder in self.encoders)

    @property
    def pooled_size(self) -> int:
        return self.encoders[1].pooled_size

    @property
    def device(self) -> torch.device:
        return self.encoders[1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoders[1].dtype

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_with_pooled(prompts)[0]

    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (B, max_length, hidden 1 + hidden 2), pooled (B, projection_dim)), in the second's dtype."""
        (first, _), (second, pooled) = (encoder.encode_with_pooled(prompts) for encoder in self.encoders)
        return torch.cat([first.to(second.device), second], dim=-1).to(self.dtype), pooled

    def count_tokens(self, prompt: str) -> int:
        return max(encoder.count_tokens(prompt) for encoder in self.encoders)
