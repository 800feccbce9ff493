"""Resolving a request once, at submit: its length against the context, and its blend spec.

Pure functions: the settings, the client's overrides and the model's depth in, a validated
`BlendSpec` (or a RequestError naming the parameter at fault) out.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from config.settings import MODES, SELECTION_SIGNALS, STORED_RANKING, Settings, check_layer_rules, check_ratio_rules, default_check_layers
from engine.request import BlendParams, BlendSpec, Request, RequestError
from engine.sampling import SamplingParams
from engine.segments import Segment
from engine.selection import funnel_schedule

# The modes that reuse chunk (and turn) KV at new positions (the others compute every token or reuse an exact prefix)
BLEND_MODES = ("full_reuse", "cacheblend")


def resolve_request(request_id: str, segments: Sequence[Segment], sampling: SamplingParams, blend: BlendParams,
                    settings: Settings, num_layers: int, default_ratio: float, max_model_len: int, input_param: str,
                    user_turn: tuple[int, ...] = (), salt: str = "", tenant: str = "default") -> Request:
    """The request resolved once: max_tokens against the context (None: up to the limit) and
    the blend spec from `blend` over the settings; RequestError names the bad field. A turn to
    keep is kept only by a blend mode."""
    n = sum(len(s) for s in segments)
    max_tokens = resolve_max_tokens(n, sampling.max_tokens, max_model_len, input_param)
    mode, spec = resolve_blend(blend, settings, num_layers, default_ratio)
    return Request(request_id, tuple(segments), dataclasses.replace(sampling, max_tokens=max_tokens), mode, spec,
                   user_turn if mode in BLEND_MODES else (), salt=salt, tenant=tenant)


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: Optional[int], max_model_len: int, input_param: str) -> int:
    """The completion budget, checked against the context length (None: up to the limit)."""
    if num_prompt_tokens == 0:
        raise RequestError("the prompt is empty", input_param)
    if num_prompt_tokens >= max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                           f"{num_prompt_tokens} input tokens. Please reduce the length of the input.", "input")
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion.", "max_tokens")
    return max_tokens


def resolve_blend(params: BlendParams, settings: Settings, num_layers: int, default_ratio: float) -> tuple[str, BlendSpec]:
    """(mode, spec) from the client's overrides over the settings; `default_ratio` is the
    server's current ratio (the controller may have moved it from `settings.recompute_ratio`)."""
    mode = params.mode or settings.mode
    if mode not in MODES:
        raise RequestError(f"unknown mode {mode!r}; one of {', '.join(MODES)}", "cacheblend.mode")
    if mode != "cacheblend":
        return mode, BlendSpec()
    signal = params.selection_signal or settings.selection_signal
    if signal not in SELECTION_SIGNALS:
        raise RequestError(f"selection_signal must be one of {', '.join(SELECTION_SIGNALS)}", "cacheblend.selection_signal")
    ratio = params.recompute_ratio if params.recompute_ratio is not None else default_ratio
    if not 0.0 <= ratio <= 1.0:
        raise RequestError("recompute_ratio must lie in [0, 1]", "cacheblend.recompute_ratio")
    # the server's check layers and ratios go with its signal; a request naming another signal gets that one's
    own = params.check_layers is None and signal == settings.selection_signal
    layers = params.check_layers if params.check_layers is not None else settings.check_layers if own else None
    if params.check_ratios is not None:
        ratios = params.check_ratios
    elif own and params.recompute_ratio is None:
        ratios = settings.check_ratios
    else:
        ratios = None
    if layers is None and ratios is None:
        layers, ratios = default_schedule(signal, ratio, num_layers)
    else:
        layers = layers if layers is not None else default_check_layers(signal)
        ratios = ratios if ratios is not None else [ratio] * len(layers)
    try:
        check_layer_rules(layers, num_layers)
    except ValueError as e:
        raise RequestError(str(e), "cacheblend.check_layers") from None
    try:
        check_ratio_rules(ratios, len(layers))
    except ValueError as e:
        raise RequestError(str(e), "cacheblend.recompute_ratio") from None
    return mode, BlendSpec(tuple(layers), tuple(ratios), signal, settings.sensitivity_pool, ratio)


def default_schedule(signal: str, ratio: float, num_layers: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A signal's check layers and ratios when nobody sets them: the stored ranking's two-stage
    funnel (`funnel_schedule`; also random's, the control, so that it recomputes as many tokens
    as the default), else its one check layer at `ratio`."""
    if signal in STORED_RANKING + ("random",):
        return funnel_schedule(ratio, num_layers)
    return tuple(default_check_layers(signal)), (ratio,)
