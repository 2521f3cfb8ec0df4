"""The seven samplers as plain tensor math, with no host syncs in the per-step functions.

Each sampler reproduces the diffusers scheduler built `from_config` of the model's scheduler config: the same
timesteps, sigmas and update rule, including the defaults each diffusers class takes for keys the config lacks.

Everything that depends only on the step index is precomputed at construction into device tables, using the
same float32 expressions diffusers evaluates (so the values match it bit for bit). `scale_model_input`, `step`
and `add_noise` take the step index as a 0-dim int64 device tensor, read the tables with `index_select`, branch
with `torch.where` and keep their history in preallocated buffers updated with `copy_`, so a CUDA graph captured
once replays every step of every job with the index changed in place. (Indexing a tensor with a 0-dim tensor,
`table[i]`, reads i on the host; `Sampler.timestep(i)` is the sync-free way to get the UNet's timestep.)
"""
import abc
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from worker.inference.names import SCHEDULERS

_CLASS_NAMES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
                "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler"}

_COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        trained_betas=None, prediction_type="epsilon", steps_offset=0)
_SIGMA_DEFAULTS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                       final_sigmas_type="zero")

# The __init__ defaults of each diffusers class, for the keys our samplers read. A key the model's config lacks
# takes the default of the class being built, not of the class the config was written for.
_DEFAULTS = {
    "PNDMScheduler": dict(_COMMON_DEFAULTS, skip_prk_steps=False, set_alpha_to_one=False,
                          timestep_spacing="leading"),
    "DDIMScheduler": dict(_COMMON_DEFAULTS, rescale_betas_zero_snr=False, clip_sample=True, clip_sample_range=1.0,
                          set_alpha_to_one=True, thresholding=False, timestep_spacing="leading"),
    "DDPMScheduler": dict(_COMMON_DEFAULTS, rescale_betas_zero_snr=False, variance_type="fixed_small",
                          clip_sample=True, clip_sample_range=1.0, thresholding=False, timestep_spacing="leading"),
    "EulerDiscreteScheduler": dict(_COMMON_DEFAULTS, **_SIGMA_DEFAULTS, rescale_betas_zero_snr=False,
                                   interpolation_type="linear", sigma_min=None, sigma_max=None,
                                   timestep_spacing="linspace", timestep_type="discrete"),
    "EulerAncestralDiscreteScheduler": dict(_COMMON_DEFAULTS, rescale_betas_zero_snr=False,
                                            timestep_spacing="linspace"),
    "DPMSolverMultistepScheduler": dict(_COMMON_DEFAULTS, **_SIGMA_DEFAULTS, rescale_betas_zero_snr=False,
                                        solver_order=2, thresholding=False, algorithm_type="dpmsolver++",
                                        solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                                        use_lu_lambdas=False, use_flow_sigmas=False,
                                        lambda_min_clipped=-float("inf"), variance_type=None,
                                        timestep_spacing="linspace", use_dynamic_shifting=False),
}

# Keys diffusers reads with hasattr(config, key): from_config keeps them even for a class without that parameter.
_READ_IF_PRESENT = ("sigma_min", "sigma_max")

# Options our samplers implement, per key; any other value is refused with a clear error.
_SUPPORTED = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "thresholding": (False,),
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", None),
    "interpolation_type": ("linear",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero", "sigma_min"),
    "solver_order": (1, 2),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun"),
}


def scheduler_name_for_config(config: dict) -> str:
    """Our sampler name for a diffusers scheduler config ("PNDMScheduler" -> "pndm")."""
    class_name = config.get("_class_name")
    if class_name == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_karras" if config.get("use_karras_sigmas") else "dpmpp_2m"
    for name, known in _CLASS_NAMES.items():
        if known == class_name:
            return name
    raise ValueError(f"scheduler config: _class_name {class_name!r} is not supported; supported: "
                     f"{', '.join(sorted(set(_CLASS_NAMES.values())))}")


def make_sampler(name: str, config: dict, num_inference_steps: int, device, dtype=torch.float32) -> "Sampler":
    """The sampler `name`, as diffusers' scheduler of that kind built `from_config(config)`.

    `dtype` is the dtype of the coefficient tables; float32 holds diffusers' values exactly.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} is not a floating-point torch dtype")
    cfg = _resolve_config(name, config)
    if not _is_index(num_inference_steps) or not 1 <= num_inference_steps <= cfg["num_train_timesteps"]:
        raise ValueError(f"num_inference_steps: {num_inference_steps!r} must be an integer from 1 to "
                         f"{cfg['num_train_timesteps']} (the config's num_train_timesteps)")
    return _SAMPLER_CLASSES[name](name, cfg, int(num_inference_steps), torch.device(device), dtype)


def _resolve_config(name: str, config: dict) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config: expected a dict (scheduler_config.json), got {type(config).__name__}")
    class_name = _CLASS_NAMES[name]
    cfg = {key: config.get(key, default) for key, default in _DEFAULTS[class_name].items()}
    cfg.update({key: config[key] for key in _READ_IF_PRESENT if key in config})
    if name.startswith("dpmpp_2m"):
        cfg["use_karras_sigmas"] = name == "dpmpp_2m_karras"
    for key, allowed in _SUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"scheduler config: {key}={cfg[key]!r} is not supported for {name} ({class_name}); "
                             f"supported: {', '.join(repr(a) for a in allowed)}")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Tables, computed as diffusers computes them (float32 torch where diffusers uses torch, numpy where it uses numpy)


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (arXiv 2305.08891, algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_bar = root ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _alphas_cumprod(cfg: dict, sigma_based: bool) -> torch.Tensor:
    """(num_train_timesteps,) float32 on the CPU.

    With zero terminal SNR the last alpha is 0, an infinite sigma; the sigma-based schedulers floor it at 2**-24.
    """
    n, schedule = cfg["num_train_timesteps"], cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = _betas_for_alpha_bar(n)
    zero_snr = cfg.get("rescale_betas_zero_snr", False)
    if zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_snr and sigma_based:
        alphas_cumprod[-1] = 2 ** -24
    return alphas_cumprod


def _ascending_integer_timesteps(cfg: dict, steps: int) -> np.ndarray:
    """The PNDM/DDIM/DDPM timesteps in ascending order (DDIM and DDPM use them reversed)."""
    total, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, total - 1, steps).round().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (total // steps)).round().astype(np.int64) + cfg["steps_offset"]
    return np.round(np.arange(total, 0, -total / steps))[::-1].astype(np.int64) - 1


def _float_timesteps(cfg: dict, steps: int) -> np.ndarray:
    """Euler's and Euler ancestral's (descending, float32)."""
    total, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, total - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        timesteps = (np.arange(0, steps) * (total // steps)).round()[::-1].copy().astype(np.float32)
        return timesteps + cfg["steps_offset"]
    return np.arange(total, 0, -total / steps).round().copy().astype(np.float32) - 1


def _sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of a sigma, by interpolating log sigmas (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def _karras_sigmas(cfg: dict, descending_sigmas: np.ndarray, steps: int) -> np.ndarray:
    """Karras et al. (2022) rho=7 spacing between the config's (or the schedule's) smallest and largest sigma."""
    sigma_min, sigma_max = cfg.get("sigma_min"), cfg.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else descending_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else descending_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def _final_sigma(cfg: dict, alphas_cumprod: torch.Tensor):
    if cfg["final_sigmas_type"] == "sigma_min":
        return ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Samplers


def _is_index(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _at(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """table[i] as a 0-dim tensor, without the host sync that indexing with a tensor does."""
    return table.index_select(0, i.reshape(1)).reshape(())


class Sampler(abc.ABC):
    """A diffusers scheduler as device tables plus history buffers; see the module docstring.

    name: one of SCHEDULERS. order: diffusers' scheduler.order (a strength start index is t_start * order).
    init_noise_sigma: python float. timesteps: (T,) float32 on the device, the UNet's timestep at table index i
    (T = num_steps = len(diffusers' timesteps); PNDM has num_inference_steps + 1, or + 9 with Runge-Kutta).
    """

    order = 1
    history: tuple[str, ...] = ()   # names of the per-job buffers shaped like the sample
    sigma_based = False             # the schedule is kept as sigmas (Euler, DPM-Solver)

    def __init__(self, name: str, cfg: dict, steps: int, device: torch.device, dtype: torch.dtype):
        self.name, self.config, self.num_inference_steps = name, cfg, steps
        self.device, self.table_dtype = device, dtype
        self.alphas_cumprod = _alphas_cumprod(cfg, self.sigma_based)
        self.init_noise_sigma = 1.0
        self._begin = torch.zeros((), dtype=torch.int64, device=device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._build()

    @abc.abstractmethod
    def _build(self) -> None:
        """Sets `timesteps`, `_noise_levels` (one value per timestep, read by add_noise) and the step tables."""

    def _table(self, values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self.device, self.table_dtype)

    def _set_timesteps(self, values) -> None:
        self.timesteps = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self.device, torch.float32)
        self.num_steps = len(values)

    def timestep(self, i: torch.Tensor) -> torch.Tensor:
        """timesteps[i] (0-dim) for a 0-dim device index, without the host sync `timesteps[i]` does."""
        return _at(self.timesteps, i)

    def draws_noise(self, i: int) -> bool:
        """Whether step i takes a random draw (in diffusers' order); step() then needs that draw as `noise`."""
        return False

    def reset(self, sample: torch.Tensor, begin: int) -> None:
        """Zero the history for a job whose latents look like `sample`, starting at table index `begin`.

        Same shape, dtype and device as before: the buffers are zeroed in place, so a captured graph stays valid.
        """
        if not _is_index(begin) or not 0 <= begin < self.num_steps:
            raise ValueError(f"begin: {begin!r} must be an integer from 0 to {self.num_steps - 1} "
                             f"({self.name} with {self.num_inference_steps} steps has {self.num_steps} timesteps)")
        for key in self.history:
            buffer = self._buffers.get(key)
            if buffer is not None and buffer.shape == sample.shape and buffer.dtype == sample.dtype \
                    and buffer.device == sample.device:
                buffer.zero_()  # in place: a CUDA graph captured on this buffer stays valid
            else:
                self._buffers[key] = torch.zeros_like(sample, memory_format=torch.contiguous_format)
        self._begin.fill_(int(begin))

    def _buffer(self, key: str) -> torch.Tensor:
        if key not in self._buffers:
            raise RuntimeError(f"{self.name}: call reset(sample, begin) before the first step")
        return self._buffers[key]

    def scale_model_input(self, sample: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return sample

    @abc.abstractmethod
    def step(self, model_output: torch.Tensor, sample: torch.Tensor, i: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """The previous sample; `i` is the 0-dim int64 device index; history buffers are updated in place."""

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i) -> torch.Tensor:
        """Noise clean latents to the noise level of table index `i` (an int, or a 0-dim int64 device tensor)."""
        if isinstance(i, torch.Tensor):
            level = _at(self._noise_levels, i)
        else:
            if not _is_index(i) or not 0 <= i < self.num_steps:
                raise ValueError(f"i: {i!r} must be an integer index from 0 to {self.num_steps - 1}")
            level = self._noise_levels[int(i)]
        # diffusers casts the level to the latents' dtype before deriving the scales from it; so do we
        return self._noised(original, noise, level.to(original.dtype))

    @abc.abstractmethod
    def _noised(self, original: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """original and noise mixed at `level` (alphas_cumprod or sigma, 0-dim, in the latents' dtype)."""


class _AlphaSampler(Sampler):
    """The DDPM family (PNDM, DDIM, DDPM): tables read alphas_cumprod at integer timesteps."""

    def _set_integer_timesteps(self, descending: np.ndarray) -> None:
        total = self.config["num_train_timesteps"]
        if descending.max() >= total:
            raise ValueError(f"num_inference_steps: {self.num_inference_steps} with steps_offset "
                             f"{self.config['steps_offset']} gives timestep {descending.max()}, past the last "
                             f"training timestep {total - 1}")
        self._set_timesteps(descending)
        self._noise_levels = self._table(self.alphas_cumprod[torch.from_numpy(descending.astype(np.int64))])

    def _noised(self, original, noise, level):
        return level ** 0.5 * original + (1 - level) ** 0.5 * noise

    def _alphas_at(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at timesteps t; before timestep 0, 1 with set_alpha_to_one, else alphas_cumprod[0]."""
        final = torch.tensor(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], final)

    def _predicted_x0(self, model_output, sample, sqrt_alpha, sqrt_beta):
        if self.config["prediction_type"] == "v_prediction":
            x0 = sqrt_alpha * sample - sqrt_beta * model_output
        else:
            x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
        if self.config["clip_sample"]:
            x0 = x0.clamp(-self.config["clip_sample_range"], self.config["clip_sample_range"])
        return x0


@dataclass(frozen=True)
class _PNDMRule:
    """What PNDM does at one value of its step counter, as diffusers' step_prk / step_plms do it.

    eps = (w . (model output, last stored eps, the one before, the one before that, accumulator)) * scale / divisor
    """

    weights: tuple
    timestep_pair: Callable           # table timestep t -> (the t the formula uses, the previous t)
    scale: float = 1.0
    divisor: float = 1.0
    accumulator_keep: float = 1.0     # accumulator <- keep * accumulator + add * model output
    accumulator_add: float = 0.0
    push: bool = True                 # store this model output as the newest eps
    save_sample: bool = False         # remember this step's sample
    from_saved_sample: bool = False   # step from the remembered sample instead of this one


class PNDMSampler(_AlphaSampler):
    """PNDM: Runge-Kutta warm-up (unless skip_prk_steps), then PLMS, a 4th-order linear multistep method.

    The counter c = i - begin picks a rule (the last rule holds for every later c). PLMS after skip_prk_steps:
    c == 0 is an Euler step that remembers its sample; c == 1 redoes it from that sample with the mean of both
    eps (so its formula timestep is the table's plus one stride, and this eps is never stored); c >= 2 is
    Adams-Bashforth of order 2, 3, then 4. With the warm-up, c < 12 are three 4-stage Runge-Kutta steps over
    the 12 PRK timesteps, which leave the 3 stored eps the 4th-order PLMS steps need from c == 12 on.
    """

    history = ("ets1", "ets2", "ets3", "cur_sample", "accumulator")

    def _build(self) -> None:
        cfg = self.config
        steps, total = self.num_inference_steps, cfg["num_train_timesteps"]
        ascending = _ascending_integer_timesteps(cfg, steps)
        stride = total // steps
        if cfg["skip_prk_steps"]:
            # the second-largest timestep is repeated (its second use is the c == 1 step)
            timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
            rules = self._plms_warmup_rules(stride)
        else:
            if steps < 4:
                raise ValueError(f"num_inference_steps: {steps} is too few for pndm with skip_prk_steps=False "
                                 "(its Runge-Kutta warm-up needs at least 4)")
            prk = np.array(ascending[-4:]).repeat(2) + np.tile(np.array([0, stride // 2]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
            timesteps = np.concatenate([prk, ascending[:-3][::-1]]).astype(np.int64)
            rules = self._runge_kutta_rules(prk, stride)
        self._set_integer_timesteps(timesteps)
        self._rule_count = len(rules)
        self._build_rule_tables(rules, timesteps)

    @staticmethod
    def _plms_rule(stride: int, **overrides) -> _PNDMRule:
        return _PNDMRule(**{"weights": (55, -59, 37, -9, 0), "scale": 1 / 24,
                            "timestep_pair": lambda t: (t, t - stride), **overrides})

    def _plms_warmup_rules(self, stride: int) -> list:
        plms = self._plms_rule
        return [plms(stride, weights=(1, 0, 0, 0, 0), scale=1, save_sample=True),
                plms(stride, weights=(1, 1, 0, 0, 0), scale=1, divisor=2, push=False, from_saved_sample=True,
                     timestep_pair=lambda t: (t + stride, t)),
                plms(stride, weights=(3, -1, 0, 0, 0), scale=1, divisor=2),
                plms(stride, weights=(23, -16, 5, 0, 0), scale=1, divisor=12),
                plms(stride)]

    def _runge_kutta_rules(self, prk: np.ndarray, stride: int) -> list:
        """Stage k of each 4-stage step: the model outputs are summed with weights 1/6, 1/3, 1/3, 1/6."""
        rules = []
        for c in range(len(prk)):
            stage, start = c % 4, int(prk[c // 4 * 4])
            half = 0 if c % 2 else stride // 2
            pair = (lambda t, start=start, half=half: (start, t - half))
            if stage == 3:
                rule = _PNDMRule(weights=(1 / 6, 0, 0, 0, 1), accumulator_keep=0.0, push=False,
                                 from_saved_sample=True, timestep_pair=pair)
            else:
                rule = _PNDMRule(weights=(1, 0, 0, 0, 0), accumulator_keep=0.0 if stage == 0 else 1.0,
                                 accumulator_add=1 / 6 if stage == 0 else 1 / 3, push=stage == 0,
                                 save_sample=stage == 0, from_saved_sample=True, timestep_pair=pair)
            rules.append(rule)
        return rules + [self._plms_rule(stride)]

    def _build_rule_tables(self, rules: list, timesteps: np.ndarray) -> None:
        total = self.config["num_train_timesteps"]
        self._weights = self._table([[*r.weights, r.scale, r.divisor, r.accumulator_keep, r.accumulator_add]
                                     for r in rules])
        self._flags = torch.tensor([[r.push, r.save_sample, r.from_saved_sample] for r in rules], device=self.device)
        # (rule, table index) -> formula coefficients, flattened to rule * T + i. A (rule, index) pair that no begin
        # reaches may name a timestep past the schedule; clamping keeps it inside the table.
        pairs = [rule.timestep_pair(int(t)) for rule in rules for t in timesteps]
        t_used = torch.tensor([min(used, total - 1) for used, _ in pairs])
        t_prev = torch.tensor([prev for _, prev in pairs])
        self._coefficient_tables = [self._table(c) for c in self._coefficients(t_used, t_prev)]

    def _coefficients(self, t: torch.Tensor, prev_t: torch.Tensor) -> tuple:
        """(sqrt alpha_t, sqrt beta_t, sample coefficient, alpha_prev - alpha_t, denominator): formula (9)."""
        alpha, alpha_prev = self.alphas_cumprod[t], self._alphas_at(prev_t)
        beta, beta_prev = 1 - alpha, 1 - alpha_prev
        denominator = alpha * beta_prev ** 0.5 + (alpha * beta * alpha_prev) ** 0.5
        return alpha ** 0.5, beta ** 0.5, (alpha_prev / alpha) ** 0.5, alpha_prev - alpha, denominator

    def step(self, model_output, sample, i, noise=None):
        ets1, ets2, ets3, cur_sample, accumulator = (self._buffer(k) for k in self.history)
        rule = torch.clamp(i - self._begin, min=0, max=self._rule_count - 1)  # a table row, whatever i is
        w0, w1, w2, w3, w_acc, scale, divisor, keep, add = \
            self._weights.index_select(0, rule.reshape(1)).reshape(-1).unbind()
        push, save_sample, from_saved = self._flags.index_select(0, rule.reshape(1)).reshape(-1).unbind()
        eps = (w0 * model_output + w1 * ets1 + w2 * ets2 + w3 * ets3 + w_acc * accumulator) * scale / divisor
        saved = torch.where(save_sample, sample, cur_sample)
        base = torch.where(from_saved, saved, sample)
        flat = rule * self.num_steps + i
        sqrt_alpha, sqrt_beta, sample_coeff, alpha_diff, denominator = (
            _at(table, flat) for table in self._coefficient_tables)
        if self.config["prediction_type"] == "v_prediction":
            eps = sqrt_alpha * eps + sqrt_beta * base
        prev_sample = sample_coeff * base - alpha_diff * eps / denominator
        ets3.copy_(torch.where(push, ets2, ets3))
        ets2.copy_(torch.where(push, ets1, ets2))
        ets1.copy_(torch.where(push, model_output, ets1))
        accumulator.copy_(keep * accumulator + add * model_output)
        cur_sample.copy_(saved)
        return prev_sample


class DDIMSampler(_AlphaSampler):
    """Deterministic DDIM (eta = 0, as the Stable Diffusion pipelines call it)."""

    def _build(self) -> None:
        cfg = self.config
        timesteps = _ascending_integer_timesteps(cfg, self.num_inference_steps)[::-1].copy()
        self._set_integer_timesteps(timesteps)
        stride = cfg["num_train_timesteps"] // self.num_inference_steps
        alpha = self.alphas_cumprod[torch.from_numpy(timesteps)]
        alpha_prev = self._alphas_at(torch.from_numpy(timesteps) - stride)
        self._sqrt_alpha, self._sqrt_beta = self._table(alpha ** 0.5), self._table((1 - alpha) ** 0.5)
        self._sqrt_alpha_prev = self._table(alpha_prev ** 0.5)
        self._direction = self._table((1 - alpha_prev) ** 0.5)

    def step(self, model_output, sample, i, noise=None):
        sqrt_alpha, sqrt_beta = _at(self._sqrt_alpha, i), _at(self._sqrt_beta, i)
        x0 = self._predicted_x0(model_output, sample, sqrt_alpha, sqrt_beta)
        if self.config["prediction_type"] == "v_prediction":
            eps = sqrt_alpha * model_output + sqrt_beta * sample
        else:
            eps = model_output
        return _at(self._sqrt_alpha_prev, i) * x0 + _at(self._direction, i) * eps


class DDPMSampler(_AlphaSampler):
    """Ancestral DDPM: posterior mean plus noise of the configured variance, drawn only while t > 0."""

    def _build(self) -> None:
        timesteps = _ascending_integer_timesteps(self.config, self.num_inference_steps)[::-1].copy()
        self._set_integer_timesteps(timesteps)
        self._draws = [bool(t > 0) for t in timesteps]
        alpha = self.alphas_cumprod[torch.from_numpy(timesteps)]
        # the previous timestep is the next table entry; after the last one alpha_prev is 1
        alpha_prev = torch.cat([alpha[1:], torch.tensor([1.0])])
        beta, beta_prev = 1 - alpha, 1 - alpha_prev
        current_alpha = alpha / alpha_prev
        current_beta = 1 - current_alpha
        self._sqrt_alpha, self._sqrt_beta = self._table(alpha ** 0.5), self._table(beta ** 0.5)
        self._x0_coeff = self._table(alpha_prev ** 0.5 * current_beta / beta)
        self._sample_coeff = self._table(current_alpha ** 0.5 * beta_prev / beta)
        variance = torch.clamp(beta_prev / beta * current_beta, min=1e-20)
        if self.config["variance_type"] == "fixed_large":
            std = current_beta ** 0.5
        elif self.config["variance_type"] == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(variance))
        else:
            std = variance ** 0.5
        self._noise_std = self._table(std * torch.tensor(self._draws, dtype=torch.float32))

    def draws_noise(self, i: int) -> bool:
        return self._draws[i]

    def step(self, model_output, sample, i, noise=None):
        """`noise`: this step's draw when draws_noise(i) (zeros are fine where it is False); None adds none."""
        x0 = self._predicted_x0(model_output, sample, _at(self._sqrt_alpha, i), _at(self._sqrt_beta, i))
        prev_sample = _at(self._x0_coeff, i) * x0 + _at(self._sample_coeff, i) * sample
        if noise is not None:
            prev_sample = prev_sample + _at(self._noise_std, i) * noise
        return prev_sample


class _SigmaSampler(Sampler):
    """Euler and Euler ancestral: the sample is x0 + sigma * eps; the model sees it scaled to unit variance."""

    sigma_based = True

    def _set_sigmas(self, sigmas: np.ndarray) -> None:
        """sigmas: (T + 1,) float32 as diffusers stores them, ending with the final sigma."""
        sigma = torch.from_numpy(sigmas)
        self.sigmas = sigma
        self._sigma = self._table(sigma)
        self._input_scale = self._table((sigma ** 2 + 1) ** 0.5)
        self._v_output = self._table(-sigma / (sigma ** 2 + 1) ** 0.5)
        self._v_skip = self._table(sigma ** 2 + 1)
        self._noise_levels = self._sigma
        max_sigma = sigma.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            self.init_noise_sigma = float(max_sigma)
        else:
            self.init_noise_sigma = float((max_sigma ** 2 + 1) ** 0.5)

    def scale_model_input(self, sample, i):
        return sample / _at(self._input_scale, i)

    def _noised(self, original, noise, level):
        return original + noise * level

    def _derivative(self, model_output, sample32, i):
        sigma = _at(self._sigma, i)
        if self.config["prediction_type"] == "v_prediction":
            x0 = model_output * _at(self._v_output, i) + sample32 / _at(self._v_skip, i)
        else:
            x0 = sample32 - sigma * model_output
        return (sample32 - x0) / sigma


class EulerSampler(_SigmaSampler):
    """Euler's method on the probability-flow ODE in sigma (no churn, as the pipelines call it)."""

    def _build(self) -> None:
        cfg = self.config
        timesteps = _float_timesteps(cfg, self.num_inference_steps)
        train_sigmas = _train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = _karras_sigmas(cfg, sigmas, self.num_inference_steps)
            timesteps = np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        final = _final_sigma(cfg, self.alphas_cumprod)
        self._set_sigmas(np.concatenate([sigmas, [final]]).astype(np.float32))
        self._set_timesteps(timesteps.astype(np.float32))
        self._dt = self._table(self.sigmas[1:] - self.sigmas[:-1])

    def step(self, model_output, sample, i, noise=None):
        sample32 = sample.to(torch.float32)  # diffusers steps Euler in float32
        derivative = self._derivative(model_output, sample32, i)
        return (sample32 + derivative * _at(self._dt, i)).to(model_output.dtype)


class EulerAncestralSampler(_SigmaSampler):
    """Euler down to sigma_down, then fresh noise of std sigma_up, at every step."""

    def _build(self) -> None:
        timesteps = _float_timesteps(self.config, self.num_inference_steps)
        train_sigmas = _train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self._set_sigmas(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._set_timesteps(timesteps)
        sigma_from, sigma_to = self.sigmas[:-1], self.sigmas[1:]
        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        self._sigma_up, self._dt = self._table(sigma_up), self._table(sigma_down - sigma_from)

    def draws_noise(self, i: int) -> bool:
        return True

    def step(self, model_output, sample, i, noise=None):
        if noise is None:
            raise ValueError("noise: euler_a adds fresh noise at every step; pass that step's noise")
        sample32 = sample.to(torch.float32)
        derivative = self._derivative(model_output, sample32, i)
        prev_sample = sample32 + derivative * _at(self._dt, i)
        return (prev_sample + noise * _at(self._sigma_up, i)).to(model_output.dtype)


class DPMSolverSampler(Sampler):
    """DPM-Solver++ (2M): a second-order multistep solver in log-SNR on the predicted x0.

    The first step after `begin` is first order (no previous x0 yet), and so is the final step when diffusers
    lowers it (final sigma zero, or lower_order_final with fewer than 15 steps, or euler_at_final).
    """

    history = ("previous_x0",)
    sigma_based = True

    def _build(self) -> None:
        cfg = self.config
        steps = self.num_inference_steps
        timesteps = self._dpm_timesteps(steps)
        train_sigmas = _train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = _karras_sigmas(cfg, np.flip(train_sigmas).copy(), steps)
            timesteps = np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        final = _final_sigma(cfg, self.alphas_cumprod)
        sigma = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
        self.sigmas = sigma
        self._set_timesteps(torch.from_numpy(np.asarray(timesteps)).to(torch.int64).numpy())
        self._build_solver_tables(sigma)

    def _dpm_timesteps(self, steps: int) -> np.ndarray:
        cfg = self.config
        total, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
        # timesteps whose log-SNR is below lambda_min_clipped are left out (none by default)
        lambdas = torch.log(torch.sqrt(self.alphas_cumprod)) - torch.log(torch.sqrt(1 - self.alphas_cumprod))
        clipped = torch.searchsorted(torch.flip(lambdas, [0]), cfg["lambda_min_clipped"])
        last = int(total - clipped)
        if spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = last // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg["steps_offset"]
        return np.arange(last, 0, -total / steps).round().copy().astype(np.int64) - 1

    def _build_solver_tables(self, sigma: torch.Tensor) -> None:
        """The update, written as diffusers writes it so that it rounds the same way:
        x_prev = (sigma_t / sigma_s) * sample - first * x0 + second * D1,  D1 = (x0 - previous x0) / r0,
        where D1 is zero on first-order steps.
        """
        count = self.num_steps
        alpha_all = 1 / ((sigma ** 2 + 1) ** 0.5)
        sigma_all = sigma * alpha_all
        lambda_all = torch.log(alpha_all) - torch.log(sigma_all)
        alpha_s, sigma_s, lambda_s = alpha_all[:-1], sigma_all[:-1], lambda_all[:-1]
        alpha_t, sigma_t, lambda_t = alpha_all[1:], sigma_all[1:], lambda_all[1:]
        h = lambda_t - lambda_s
        # the log-SNR stride of the step before; row 0 never runs second order (c == 0 there)
        h_before = torch.cat([torch.ones(1), lambda_s[1:] - lambda_s[:-1]])
        first = alpha_t * (torch.exp(-h) - 1.0)
        if self.config["solver_type"] == "midpoint":
            second = -(0.5 * first)
        else:
            second = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        self._alpha_s, self._sigma_s = self._table(alpha_s), self._table(sigma_s)
        self._sample_coeff, self._first, self._second = (self._table(v) for v in (sigma_t / sigma_s, first, second))
        self._inverse_r0 = self._table(1.0 / (h_before / h))
        cfg = self.config
        lower_final = cfg["euler_at_final"] or (cfg["lower_order_final"] and count < 15) \
            or cfg["final_sigmas_type"] == "zero"
        forced = [cfg["solver_order"] == 1 or (row == count - 1 and lower_final) for row in range(count)]
        self._forced_first_order = torch.tensor(forced, device=self.device)
        self._noise_levels = self._table(sigma[:-1])

    def _noised(self, original, noise, level):
        alpha = 1 / ((level ** 2 + 1) ** 0.5)
        return alpha * original + (level * alpha) * noise

    def step(self, model_output, sample, i, noise=None):
        alpha_s, sigma_s = _at(self._alpha_s, i), _at(self._sigma_s, i)
        if self.config["prediction_type"] == "v_prediction":
            x0 = alpha_s * sample - sigma_s * model_output
        else:
            x0 = (sample - sigma_s * model_output) / alpha_s
        previous_x0 = self._buffer("previous_x0")
        first_order = (i == self._begin) | _at(self._forced_first_order, i)
        # where, not a product: 1 / r0 is infinite on a final step to sigma 0 (always first order)
        d1 = torch.where(first_order, 0.0, _at(self._inverse_r0, i)) * (x0 - previous_x0)
        prev_sample = (_at(self._sample_coeff, i) * sample.to(torch.float32) - _at(self._first, i) * x0
                       + _at(self._second, i) * d1)
        previous_x0.copy_(x0)
        return prev_sample.to(model_output.dtype)


_SAMPLER_CLASSES = {"pndm": PNDMSampler, "ddim": DDIMSampler, "ddpm": DDPMSampler, "euler": EulerSampler,
                    "euler_a": EulerAncestralSampler, "dpmpp_2m": DPMSolverSampler,
                    "dpmpp_2m_karras": DPMSolverSampler}
