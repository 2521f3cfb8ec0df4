"""The denoise loop runner: one step function, run eagerly or replayed from a CUDA graph.

A step is: guidance batch -> UNet (with SDXL's pooled text and time ids) -> guidance combine -> scheduler update (-> latent blending for 4-channel UNets).
It reads and writes only static device buffers and the step index tensor, and has no host syncs, so the same code
runs eagerly and inside `torch.cuda.graph` capture. Graphs are captured once per key (batch, size, scheduler,
steps, dtype, ...) and replayed for every step of every later job with that key.

Between steps the host reports progress and checks for cancellation. It keeps one step in flight, waiting on the
CUDA event of the step before, so progress reflects the GPU's real position without draining the queue.
"""
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

import kernels
from worker.inference.names import GRAPH_MODES

log = logging.getLogger("inpaint.denoise")


class InpaintCancelled(Exception):
    """The progress callback asked to stop."""


@dataclass
class DenoiseInputs:
    latents: torch.Tensor                  # (B, 4, h, w) initial latents
    text: torch.Tensor                     # (G*B, 77, D): [negatives; prompts] when guided (G = 2)
    condition: torch.Tensor | None         # (G*B, 5, h, w) mask + masked-image latents (9-channel UNets)
    guidance_scale: float                  # > 1 means classifier-free guidance
    step_noise: torch.Tensor | None        # (T, B, 4, h, w) per-step ancestral noise
    blend: tuple | None                    # (image_latents, noise, mask) for 4-channel UNets, each (B, ., h, w)
    text_embeds: torch.Tensor | None = None  # SDXL: (G*B, P) pooled text embeddings, [negatives; prompts]
    time_ids: torch.Tensor | None = None     # SDXL: (G*B, 5 or 6) micro-conditioning, [negatives; prompts]

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


class StepState:
    """The static buffers one step reads and writes: copies of a job's inputs, refilled for every job."""

    def __init__(self, inputs: DenoiseInputs):
        device = inputs.latents.device
        self.latents = inputs.latents.clone()
        self.text = inputs.text.clone()
        self.condition = None if inputs.condition is None else inputs.condition.clone()
        self.step_noise = None if inputs.step_noise is None else inputs.step_noise.clone()
        self.blend = None if inputs.blend is None else tuple(t.contiguous().clone() for t in inputs.blend)
        self.text_embeds = None if inputs.text_embeds is None else inputs.text_embeds.clone()
        self.time_ids = None if inputs.time_ids is None else inputs.time_ids.clone()
        self.guided = inputs.guided
        self.guidance = torch.full((), inputs.guidance_scale, device=device, dtype=torch.float32)
        self.index = torch.zeros((), device=device, dtype=torch.int64)

    def load(self, inputs: DenoiseInputs, begin: int) -> None:
        self.latents.copy_(inputs.latents)
        self.text.copy_(inputs.text)
        for mine, theirs in ((self.condition, inputs.condition), (self.step_noise, inputs.step_noise),
                             (self.text_embeds, inputs.text_embeds), (self.time_ids, inputs.time_ids)):
            if mine is not None:
                mine.copy_(theirs)
        for mine, theirs in zip(self.blend or (), inputs.blend or ()):
            mine.copy_(theirs)
        self.guidance.fill_(inputs.guidance_scale)
        self.index.fill_(begin)


def denoise_step(unet, sampler, s: StepState) -> None:
    """One denoising step at index `s.index`, in place; advances the index. No host syncs."""
    i = s.index
    x = s.latents
    model_in = sampler.scale_model_input(torch.cat([x, x]) if s.guided else x, i)
    if s.condition is not None:
        model_in = torch.cat([model_in, s.condition], dim=1)
    eps = unet(model_in, sampler.timestep(i), s.text, text_embeds=s.text_embeds, time_ids=s.time_ids)
    if s.guided:
        uncond, cond = eps.chunk(2)
        eps = uncond + s.guidance.to(eps.dtype) * (cond - uncond)
    # index_select, not [i]: indexing with a 0-dim tensor reads it back to the host.
    noise = None if s.step_noise is None else s.step_noise.index_select(0, i.view(1))[0]
    x = sampler.step(eps, x, i, noise=noise)
    if s.blend is not None:
        x = _blend_known_region(sampler, s.blend, x, i)
    s.latents.copy_(x)
    s.index.add_(1)


def _blend_known_region(sampler, blend, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """4-channel UNets: outside the mask, the image's latents noised to the next step's level (clean at the end)."""
    image_latents, noise, mask = blend
    last = sampler.num_steps - 1
    noised = sampler.add_noise(image_latents, noise, torch.clamp(i + 1, max=last))
    known = torch.where(i < last, noised, image_latents)
    return (1 - mask) * known + mask * x


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    state: StepState
    sampler: object


class GraphCache:
    """Least-recently-used cache of captured step graphs, keyed by everything that fixes their shapes."""

    def __init__(self, capacity: int, capture: Callable):
        if capacity < 1:
            raise ValueError(f"max_graphs: {capacity} must be at least 1")
        self.capacity, self._capture = capacity, capture
        self._entries: OrderedDict = OrderedDict()
        self.captures = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key, *args):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = self._capture(*args)
        self.captures += 1
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry


def graph_key(sampler, inputs: DenoiseInputs) -> tuple:
    """Everything a captured step bakes in; what changes per job (values, guidance scale, start) is read at replay."""
    def shape(t):
        return None if t is None else tuple(t.shape)

    return (tuple(inputs.latents.shape), inputs.latents.dtype, str(inputs.latents.device), tuple(inputs.text.shape),
            shape(inputs.condition), inputs.guided, sampler.name, sampler.num_steps, inputs.step_noise is not None,
            inputs.blend is not None, shape(inputs.text_embeds), shape(inputs.time_ids), kernels.kernel_mode())


def warm_up(unet, sampler, state: StepState, begin: int, runs: int = 2) -> None:
    """Run the step at the job's first index, a few times: cuDNN picks its algorithms and Triton tunes its kernels
    here rather than during capture. Each run restarts at `begin`, so a job of one step reads no table past its end."""
    for _ in range(runs):
        state.index.fill_(begin)
        denoise_step(unet, sampler, state)


_POOL = None


def capture_cuda_graph(unet, sampler, inputs: DenoiseInputs, begin: int) -> _Graph:
    """Warm up on a side stream, then capture one step; all graphs share one memory pool."""
    global _POOL
    sampler.reset(inputs.latents, begin)
    state = StepState(inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up(unet, sampler, state, begin)
    torch.cuda.current_stream().wait_stream(side)
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=_POOL):
        denoise_step(unet, sampler, state)
    log.info("cuda graph captured", extra={"key": repr(graph_key(sampler, inputs))})
    return _Graph(graph=graph, state=state, sampler=sampler)


class DenoiseRunner:
    """Runs the denoise loop; `capture` (default: a real CUDA graph) is injectable so the cache can be tested."""

    def __init__(self, unet, mode: str = "auto", max_graphs: int = 8, capture: Callable | None = None):
        if mode not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs: {mode!r} is not one of {', '.join(GRAPH_MODES)}")
        self.unet, self.mode = unet, mode
        self._capture_fn = capture or capture_cuda_graph
        # partial, not a lambda over self: no reference cycle keeps a dropped runner's graphs and UNet alive
        self.graphs = GraphCache(max_graphs, functools.partial(self._capture_fn, unet))
        self._failed_keys: set = set()

    @property
    def captures(self) -> int:
        """CUDA graphs this runner captured so far (the service reads it into its metrics)."""
        return self.graphs.captures

    def uses_graphs(self, device: torch.device) -> bool:
        return self.mode != "off" and (device.type == "cuda" or self._capture_fn is not capture_cuda_graph)

    def run(self, sampler, inputs: DenoiseInputs, begin: int, callback=None) -> torch.Tensor:
        """Denoise from table index `begin` to the end; returns the final latents (a fresh tensor)."""
        device = inputs.latents.device
        if device.type != "cuda":
            return self._run(sampler, inputs, begin, callback)
        with torch.cuda.device(device):  # streams, graphs and events act on the current device: make it this one
            return self._run(sampler, inputs, begin, callback)

    def _run(self, sampler, inputs: DenoiseInputs, begin: int, callback) -> torch.Tensor:
        key = graph_key(sampler, inputs)
        if self.uses_graphs(inputs.latents.device) and key not in self._failed_keys:
            entry = self._graph_for(key, sampler, inputs, begin)
            if entry is not None:
                entry.sampler.reset(inputs.latents, begin)
                entry.state.load(inputs, begin)
                return self._loop(lambda: entry.graph.replay(), entry.state, sampler.num_steps - begin, callback)
        sampler.reset(inputs.latents, begin)
        state = StepState(inputs)
        state.index.fill_(begin)
        return self._loop(lambda: denoise_step(self.unet, sampler, state), state, sampler.num_steps - begin,
                          callback)

    def forget_graphs(self) -> None:
        """Drop every captured graph, and the record of keys that failed to capture (memory may have been why)."""
        self.graphs.clear()
        self._failed_keys.clear()

    def _graph_for(self, key, sampler, inputs: DenoiseInputs, begin: int):
        try:
            return self.graphs.get(key, sampler, inputs, begin)
        except torch.OutOfMemoryError:
            raise  # not this shape's fault: the job's caller frees memory and runs it again
        except Exception as error:  # any other capture failure: run this key eagerly from now on
            self._failed_keys.add(key)
            log.warning("cuda graph capture failed; running eagerly", extra={"reason": repr(error),
                                                                            "key": repr(key)})
            if self.mode == "on":
                raise
            return None

    @staticmethod
    def _loop(step: Callable, state: StepState, total: int, callback) -> torch.Tensor:
        on_cuda = state.latents.device.type == "cuda"
        pending = None
        for done in range(1, total + 1):
            step()
            if on_cuda:
                event = torch.cuda.Event()
                event.record()
                if pending is not None:
                    pending.synchronize()  # the previous step is finished; this one stays queued
                pending = event
            if callback is not None and callback(done, total) is False:
                raise InpaintCancelled(f"canceled after step {done} of {total}")
        return state.latents.clone()
