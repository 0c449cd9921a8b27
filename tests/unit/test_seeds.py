"""Seeded sampling (watchdog_kv.instrument.model_runner), against vLLM 0.32's own sampler classes.

The replay is checked with vLLM's real ``Sampler`` (its CPU Gumbel path and the
fp64 one) on a fixed sequence of logits: a generator advanced past N steps draws,
from step N on, exactly the tokens the undisturbed run drew -- in another row of
another batch. The CPU rewind is checked on vLLM's real model-runner methods with
a stand-in runner object holding only what those methods read (a whole runner
needs a loaded model); tests/integration/test_resilience.py covers both on real
servers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

np = pytest.importorskip("numpy", reason="the vLLM stack is not installed (the lint session)")
torch = pytest.importorskip("torch", reason="the vLLM stack is not installed (the lint session)")

from watchdog_kv import config, wire  # noqa: E402
from watchdog_kv.instrument import model_runner as seeds  # noqa: E402
from watchdog_kv.instrument.base import active_layers  # noqa: E402

torch = pytest.importorskip("torch", reason="torch is not installed here")
sampler_mod = pytest.importorskip("vllm.v1.sample.sampler", reason="vLLM is not installed here")


def sample_steps(sampler, logits_seq, row, temps, generators, vocab):
    """The token sampled at ``row`` for each logits in ``logits_seq``; the other rows
    of the batch get logits of their own."""
    import vllm._custom_ops  # noqa: F401  (loads the CPU sampling kernels)
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    noise = torch.Generator().manual_seed(99)
    size = len(temps)
    out = []
    for logits_row in logits_seq:
        logits = torch.randn(size, vocab, generator=noise) * 3
        logits[row] = logits_row
        temperature = torch.tensor(temps, dtype=torch.float32)
        greedy = temperature < 1e-5
        metadata = SamplingMetadata(
            temperature=temperature,
            all_greedy=bool(greedy.all()),
            all_random=bool((~greedy).all()),
            top_p=None,
            top_k=torch.tensor([20] * size, dtype=torch.int32),
            generators=generators,
            max_num_logprobs=None,
            no_penalties=True,
            prompt_token_ids=None,
            frequency_penalties=torch.zeros(size),
            presence_penalties=torch.zeros(size),
            repetition_penalties=torch.ones(size),
            output_token_ids=[[] for _ in range(size)],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=LogitsProcessors([]),
        )
        tokens, _ = sampler.sample(logits.clone(), metadata)
        out.append(int(tokens[row]))
    return out


@pytest.mark.parametrize("fp64", [False, True], ids=["cpu-gumbel", "fp64-exponential"])
def test_an_advanced_generator_draws_what_the_undisturbed_run_drew(fp64):
    vocab, steps, sent, seed = 512, 16, 6, 1234
    sampler = sampler_mod.Sampler(use_fp64_gumbel=fp64)
    runner = SimpleNamespace(sampler=sampler, input_batch=SimpleNamespace(vocab_size=vocab))
    source = torch.Generator().manual_seed(42)
    logits_seq = [torch.randn(vocab, generator=source) * 2 for _ in range(steps)]

    alone = {0: torch.Generator().manual_seed(seed)}
    undisturbed = sample_steps(sampler, logits_seq, 0, [0.8], alone, vocab)

    def continued(advanced: bool) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        if advanced:
            assert seeds.advance(runner, generator, sent)
        others = {1: generator, 2: torch.Generator().manual_seed(7)}  # another row and batch
        return sample_steps(sampler, logits_seq[sent:], 1, [0.0, 0.8, 1.0], others, vocab)

    assert continued(advanced=True) == undisturbed[sent:]
    assert continued(advanced=False) != undisturbed[sent:]  # the control: the draws matter


def test_an_unknown_sampler_is_not_advanced():
    runner = SimpleNamespace(sampler=SimpleNamespace(topk_topp_sampler=None))
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    assert not seeds.advance(runner, generator, 3)
    assert torch.equal(generator.get_state(), state)


def test_draws_are_read_only_from_a_whole_positive_count():
    def params(value):
        return {wire.DRAWS: value}

    assert wire.draws_to_skip(params(5)) == 5
    assert [wire.draws_to_skip(params(v)) for v in (0, -1, True, "5", 2.0)] == [0] * 5
    assert wire.draws_to_skip(None) == 0


def runner_for_rewind(generator):
    """What vLLM's _sample and _bookkeeping_sync read of a runner, for one seeded row
    whose sample this step throws away (a prompt chunk)."""
    batch = SimpleNamespace(num_reqs=1, generators={0: generator})
    mask = SimpleNamespace(np=np.array([True]))
    return SimpleNamespace(input_batch=batch, discard_request_mask=mask)


def test_stock_vllm_rewinds_a_cpu_generator_with_an_offset_it_does_not_have():
    generator = torch.Generator().manual_seed(3)
    with pytest.raises(RuntimeError, match="offset"):
        generator.set_offset(generator.get_offset() - 4)


def test_a_thrown_away_sample_leaves_the_generator_as_it_was():
    runner_mod = pytest.importorskip("vllm.v1.worker.gpu_model_runner")
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    rewound = []

    def sample(runner, *_):  # vLLM's sampler: one draw for the row
        torch.randint(0, 2**31, (1,), generator=runner.input_batch.generators[0])

    def bookkeeping(runner, *_):  # vLLM's rewind loop, as written in 0.32
        for i in np.nonzero(runner.discard_request_mask.np[: runner.input_batch.num_reqs])[0]:
            gen = runner.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)
        rewound.append(dict(runner.input_batch.generators))
        return "kept"

    runner = runner_for_rewind(generator)
    assert callable(runner_mod.GPUModelRunner._bookkeeping_sync)
    seeds._sample(lambda *a: sample(runner, *a), runner, (None, None), {})
    assert seeds._bookkeeping_sync(lambda *a: bookkeeping(runner, *a), runner, (), {}) == "kept"
    assert rewound == [{}]  # vLLM's rewind did not see the CPU generator
    assert runner.input_batch.generators == {0: generator}
    assert torch.equal(generator.get_state(), before)


def test_install_uninstall_install_patches_and_restores_the_runner():
    runner_mod = pytest.importorskip("vllm.v1.worker.gpu_model_runner")
    cls = runner_mod.GPUModelRunner
    originals = {name: vars(cls)[name] for name in ("_update_states", "_sample")}
    inst = seeds.ModelRunnerInstrumentor()
    settings = config.load({})
    try:
        assert inst.instrument(settings)
        assert inst.hooks() == ["seeds.replay_draws", "seeds.cpu_rewind"]
        assert active_layers(cls, "_update_states") == 1
        inst.uninstrument()
        assert {name: vars(cls)[name] for name in originals} == originals
        assert inst.instrument(settings) and inst.instrument(settings)  # idempotent
        assert active_layers(cls, "_sample") == 1
    finally:
        inst.uninstrument()
    assert {name: vars(cls)[name] for name in originals} == originals
