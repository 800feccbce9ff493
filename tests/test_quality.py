"""Quality sampling against full prefill, and the ratio controller."""

import pytest
import torch

from conftest import PASSAGES, QUESTION
from engine.quality import RatioController, first_token_kl, token_f1
from engine.request import BlendParams
from engine.sampling import SamplingParams


def test_token_f1_and_kl_basics():
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([1, 2], [3, 4]) == 0.0
    assert token_f1([1, 2, 3, 4], [1, 2]) == pytest.approx(2 / 3)
    logits = torch.tensor([2.0, 1.0, 0.0])
    assert first_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert first_token_kl(logits, torch.tensor([0.0, 1.0, 2.0])) > 0.5


def test_controller_moves_up_below_target_down_above_band_and_holds_between():
    c = RatioController(0.15, 0.05, 0.5, target=0.9, step=0.05, window=2, hysteresis=0.05)
    assert c.observe(0.0) is None
    assert c.observe(1.0) == "up" and c.ratio == pytest.approx(0.2)      # mean 0.5 < 0.9
    assert c.observe(1.0) is None and c.observe(1.0) == "down" and c.ratio == pytest.approx(0.15)
    c2 = RatioController(0.15, 0.05, 0.5, target=0.9, step=0.05, window=1, hysteresis=0.2)
    assert c2.observe(1.0) == "hold"  # 1.0 < 0.9 + 0.2: inside the band
    c3 = RatioController(0.5, 0.05, 0.5, target=0.9, step=0.05, window=1, hysteresis=0.0)
    assert c3.observe(0.0) == "hold" and c3.ratio == 0.5  # already at max


def _engine(settings, **overrides):
    from engine.llm_engine import LLMEngine

    return LLMEngine(settings.model_copy(update=overrides))


def _request(eng, i, ratio=None):
    segs = eng.chat_segments([{"role": "user", "content": QUESTION}], [eng.chunk_from_text(p) for p in PASSAGES])
    return eng.make_request(f"q{i}", segs, SamplingParams(max_tokens=4, temperature=0), BlendParams(mode="cacheblend", recompute_ratio=ratio))


def test_sampled_requests_produce_quality_samples(engine, settings):
    eng = _engine(settings, quality_sample_rate=1.0, quality_compare_tokens=4)
    samples = []
    eng.quality.on_quality.append(samples.append)
    eng.generate([_request(eng, 0, ratio=1.0)])
    assert len(samples) == 1
    s = samples[0]
    assert s.mode == "cacheblend" and s.kl < 1e-4 and s.top1_agree and s.f1 == 1.0  # ratio 1.0 is full prefill


def test_controller_raises_ratio_when_agreement_is_forced_low(settings):
    # a target above 1 cannot be met: every decision must raise the ratio
    eng = _engine(settings, quality_sample_rate=1.0, quality_compare_tokens=2, controller_enabled=True,
                  controller_window=1, controller_target_agreement=1.0, controller_hysteresis=0.0, recompute_ratio=0.0,
                  controller_min_ratio=0.0, controller_step=0.1)
    eng.quality.controller.target = 1.01
    decisions = []
    eng.quality.on_controller.append(lambda d, r: decisions.append((d, r)))
    eng.generate([_request(eng, 0)])
    eng.generate([_request(eng, 1)])
    assert [d for d, _ in decisions] == ["up", "up"]
    assert eng.recompute_ratio == pytest.approx(0.2)


def test_controller_lowers_ratio_when_quality_is_high(settings):
    eng = _engine(settings, quality_sample_rate=1.0, quality_compare_tokens=2, controller_enabled=True,
                  controller_window=1, controller_target_agreement=0.5, controller_hysteresis=0.1, recompute_ratio=0.5,
                  controller_step=0.1)
    decisions = []
    eng.quality.on_controller.append(lambda d, r: decisions.append(d))
    eng.generate([_request(eng, 0)])  # request uses the engine's ratio: 0.5 -> agreement 1
    assert decisions == ["down"] and eng.recompute_ratio == pytest.approx(0.4)


def test_quality_rerun_yields_to_new_requests(settings):
    """The full_prefill re-run goes a layer at a time and never delays a waiting request."""
    eng = _engine(settings, quality_sample_rate=1.0, quality_compare_tokens=2)
    eng.add_request(_request(eng, 0))
    while eng.scheduler.has_work():
        eng.step()
    assert eng.quality.num_queued == 1 and not eng.quality.in_progress  # queued behind the served request
    eng.step()                                # first layer of the re-run
    assert eng.quality.in_progress
    eng.add_request(_request(eng, 1))
    out = eng.step()
    assert out and out[0].request_id == "q1"  # the new request was prefilled first
    assert eng.quality.in_progress            # the re-run is paused, not dropped
    while eng.has_work():
        eng.step()
    assert not eng.quality.in_progress and eng.quality.num_queued == 0
