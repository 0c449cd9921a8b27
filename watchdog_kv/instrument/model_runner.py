"""The model runner: seeded sampling replayed for continuations, and CPU rewinds.

**Replayed draws.** vLLM gives a request with a ``seed`` (and a temperature above
zero) a ``torch.Generator`` of its own, seeded from it, and every sampling step
takes the same draws from it for that request whatever else is in the batch. A
continuation of such a request (:mod:`watchdog_kv.router.stream`) is a new request
on another decode, whose generator starts from the seed again; the router names
the draws the dead decode already spent (``vllm_xargs: {"watchdog_kv_draws": N}``,
one step per generated token), and this module advances the new request's
generator past them right after vLLM's model runner creates it
(``GPUModelRunner._update_states``), before its first sample. The continuation
then draws what the undisturbed run drew for token N+1 onwards.

What one step draws depends on the sampler vLLM picked: on x86 and Arm CPUs
(``TopKTopPSampler.forward_cpu``) one ``randint`` per step, which seeds that
token's Gumbel noise; otherwise (the native and CUDA samplers, and the CPU one
with fp64 Gumbel noise) one ``exponential_`` over a vocabulary-sized row. The
FlashInfer sampler's use of the generator is not known: there nothing is
replayed and the request is logged (``seeds.not_replayed``).

**CPU rewinds.** A step whose sample is thrown away (a prompt computed in chunks:
every chunk but the last) has its draws undone by vLLM with
``gen.set_offset(gen.get_offset() - 4)`` -- which a CPU generator refuses
(``RuntimeError: CPU Generator does not use offset``): in stock vLLM on CPU a
seeded request whose prompt is chunked kills its engine. Here the generator's
state is saved before such a step's sample and put back after it, and vLLM's
rewind does not see that generator, so the request is answered as if its prompt
had been computed in one step.
"""

from __future__ import annotations

from typing import Any

from watchdog_kv import wire
from watchdog_kv.guard import contained
from watchdog_kv.instrument.base import Instrumentor, Target, Wrapper
from watchdog_kv.telemetry import get_logger

__all__ = ["RUNNER_MODULE", "ModelRunnerInstrumentor", "advance"]

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"

_log = get_logger("watchdog_kv.seeds")


class ModelRunnerInstrumentor(Instrumentor):
    name = "seeds"
    targets = (
        Target(RUNNER_MODULE, "GPUModelRunner", "_update_states"),
        Target(RUNNER_MODULE, "GPUModelRunner", "_sample"),
        Target(RUNNER_MODULE, "GPUModelRunner", "_bookkeeping_sync"),
    )

    def hooks(self) -> list[str]:
        return ["seeds.replay_draws", "seeds.cpu_rewind"] if self.patched else []

    def wrapper(self, target: Target) -> Wrapper:
        return {
            "_update_states": _update_states,
            "_sample": _sample,
            "_bookkeeping_sync": _bookkeeping_sync,
        }[target.name]


def advance(runner: Any, generator: Any, steps: int) -> bool:
    """Take from ``generator`` what ``steps`` sampling steps of ``runner`` take; False
    when this sampler's draws are not known (nothing is taken)."""
    import torch

    sampler = getattr(runner, "sampler", None)
    topk_topp = getattr(sampler, "topk_topp_sampler", None)
    forward = getattr(getattr(topk_topp, "forward", None), "__func__", None)
    fp64 = bool(getattr(sampler, "use_fp64_gumbel", False))
    name = getattr(forward, "__name__", "")
    if name == "forward_cpu" and not fp64:
        torch.randint(0, 2**31, (steps,), generator=generator, dtype=torch.long)
        return True
    if name in ("forward_cpu", "forward_native") or (
        name == "forward_cuda" and not getattr(topk_topp, "use_flashinfer", False)
    ):
        vocab = int(runner.input_batch.vocab_size)
        row = torch.empty(
            vocab, dtype=torch.float64 if fp64 else torch.float32, device=generator.device
        )
        for _ in range(steps):
            row.exponential_(generator=generator)
        return True
    return False


def _update_states(wrapped: Any, self: Any, args: Any, kwargs: Any) -> Any:
    before = set(self.requests)
    result = wrapped(*args, **kwargs)
    scheduler_output = args[0] if args else kwargs["scheduler_output"]
    for new in scheduler_output.scheduled_new_reqs:
        if new.req_id in before:
            continue
        steps = wire.draws_to_skip(getattr(new.sampling_params, "extra_args", None))
        if not steps:
            continue
        with contained("seeds.replay_draws"):
            state = self.requests.get(new.req_id)
            generator = getattr(state, "generator", None)
            if generator is None:
                continue  # greedy: nothing is drawn
            if advance(self, generator, steps):
                _log.info("seeds.replayed", request_id=new.req_id, draws=steps)
            else:
                _log.error(
                    "seeds.not_replayed",
                    request_id=new.req_id,
                    draws=steps,
                    reason="this sampler's use of the generator is not known",
                )
    return result


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    """Row -> generator, for the seeded rows whose sample this step throws away, on CPU."""
    import numpy as np

    batch = runner.input_batch
    mask = runner.discard_request_mask.np[: batch.num_reqs]
    out = {}
    for i in np.nonzero(mask)[0]:
        generator = batch.generators.get(int(i))
        if generator is not None and generator.device.type == "cpu":
            out[int(i)] = generator
    return out


def _sample(wrapped: Any, self: Any, args: Any, kwargs: Any) -> Any:
    saved: dict[int, tuple[Any, Any]] = {}
    with contained("seeds.cpu_rewind"):
        saved = {i: (g, g.get_state()) for i, g in _discarded_cpu_generators(self).items()}
    self._watchdog_kv_rewind = saved
    return wrapped(*args, **kwargs)


def _bookkeeping_sync(wrapped: Any, self: Any, args: Any, kwargs: Any) -> Any:
    saved: dict[int, tuple[Any, Any]] = getattr(self, "_watchdog_kv_rewind", None) or {}
    hidden: dict[int, Any] = {}
    with contained("seeds.cpu_rewind"):
        self._watchdog_kv_rewind = {}
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in saved if i in generators}
    try:
        return wrapped(*args, **kwargs)
    finally:
        with contained("seeds.cpu_rewind"):
            self.input_batch.generators.update(hidden)
            for generator, state in saved.values():
                generator.set_state(state)
