"""The CLIP text encoder: transformers' CLIPTextModel and CLIPTokenizer, used the way diffusers' SD pipelines do."""
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


class TextEncoder:
    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer):
        self.model, self.tokenizer = model, tokenizer
        # A tokenizer_config.json without model_max_length reports a huge default; the position table bounds it.
        self.max_length: int = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        # Some SD2-style encoders were trained with an attention mask; diffusers passes it only then.
        self.use_attention_mask = bool(getattr(model.config, "use_attention_mask", False))

    @classmethod
    def from_folder(cls, folder: Path, device, dtype: torch.dtype, variant: str | None = None) -> "TextEncoder":
        """Load `folder`/text_encoder (safetensors only) and `folder`/tokenizer.

        `variant="fp16"` reads text_encoder/model.fp16.safetensors. Any missing, unexpected or mis-shaped weight is
        an error: transformers would otherwise fill the gap with random weights and only log a warning.
        """
        folder = Path(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        # Read on the CPU, then moved: a device_map would need accelerate, and the encoder is small (~250 MB).
        model, info = CLIPTextModel.from_pretrained(
            folder / "text_encoder", use_safetensors=True, dtype=dtype, variant=variant, output_loading_info=True)
        problems = {name: info[name] for name in LOADING_PROBLEMS if info.get(name)}
        if problems:
            raise ValueError(f"{folder / 'text_encoder'}: weights do not match the config: {problems}")
        return cls(model.to(device).eval().requires_grad_(False), tokenizer)

    @staticmethod
    def expected_shapes(config_folder: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """(parameter and persistent buffer shapes, non-persistent buffer names) for the config in `config_folder`.

        Built on the meta device: no memory, no init. Older checkpoints also saved the non-persistent buffers
        (e.g. position_ids), so a loader may tolerate those names.
        """
        config = CLIPTextConfig.from_pretrained(config_folder)
        with torch.device("meta"):
            model = CLIPTextModel(config)
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

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, hidden) last hidden states, tokenized exactly as StableDiffusionPipeline.encode_prompt."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.device) if self.use_attention_mask else None
        return self.model(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` including the start and end tokens; above max_length the prompt gets truncated."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)
