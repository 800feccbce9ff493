"""Eval variants: a small language naming cacheblend configurations, and the plan of what to run.

A variant is cacheblend with blend-level changes (check layers, ratios, signal: per request)
and/or engine-level ones (chunk precompute convention, chunk heads: a second engine sharing the
model and store). The plan deduplicates: a variant equal to a sweep row is run once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from bench.eval_harness import Harness, ModeSpec, base_spec, cacheblend_spec


@dataclass
class Variant:
    name: str
    description: str
    engine_overrides: dict = field(default_factory=dict)   # engine-level Settings overrides
    check_layers: Optional[tuple[int, ...]] = None
    check_ratios: Optional[tuple[float, ...]] = None
    selection_signal: Optional[str] = None

    @property
    def engine_key(self) -> str:
        if not self.engine_overrides:
            return "default"
        return ",".join(f"{k}={v}" for k, v in sorted(self.engine_overrides.items()))

    def spec(self, ratio: float, tagged: bool = False) -> ModeSpec:
        """The variant at `ratio` (a schedule keeps its own ratios); `tagged` puts the ratio in the
        label, for a variant run at several ratios."""
        r = self.check_ratios[-1] if self.check_ratios else ratio
        label = f"variant:{self.name}@{r:g}" if tagged and not self.check_ratios else f"variant:{self.name}"
        return ModeSpec(label, "cacheblend", r, self.check_layers, self.check_ratios, self.selection_signal,
                        self.engine_key)


ALL_VARIANTS = "default,head4,prefix_ctx,gradual,value_signal,key_signal,check0,check2,check3,random_sel"
VARIANT_HELP = ("default | headN (recompute the first N tokens of every chunk) | prefix_ctx / sink_ctx / passage_ctx "
                "(chunk KV precomputed after the prompt prefix / a sink token / the prefix and a neutral passage) | gradual (check layers 1,8,16 at ratios "
                ".2,.15,.1) | sched:1=.2/20=.05 (check layers and their ratios) | key_signal / value_signal / sensitivity_signal / stored_signal (check layer 0 alone) / stored_funnel | poolS (sensitivity with pool share S) | checkN (one check layer N) | random_sel (control: as many "
                f"tokens chosen at random instead of by deviation); 'all' = {ALL_VARIANTS}")


CONTEXTS = {"prefix_ctx": "the prompt prefix", "sink_ctx": "a sink token",
            "passage_ctx": "the prompt prefix and a neutral passage"}


def parse_variant(name: str, num_layers: int) -> Variant:
    name = name.strip()
    if name == "default":
        return Variant(name, "settings as given")
    if name.startswith("head") and name[4:].isdigit():
        n = int(name[4:])
        return Variant(name, f"recompute the first {n} tokens of every chunk", {"recompute_chunk_head": n})
    if name in CONTEXTS:
        return Variant(name, f"chunk KV precomputed after {CONTEXTS[name]}", {"chunk_context": name.removesuffix("_ctx")})
    if name == "gradual":
        layers = (1, 8, 16)
        if layers[-1] >= num_layers:  # small models: spread the same three steps over their depth
            layers = tuple(sorted({1, max(2, num_layers // 4), max(3, num_layers // 2)}))
            layers = tuple(x for x in layers if x < num_layers)
        ratios = (0.2, 0.15, 0.1)[-len(layers):] if len(layers) < 3 else (0.2, 0.15, 0.1)
        return Variant(name, f"gradual filtering: check layers {list(layers)} at ratios {list(ratios)}",
                       check_layers=layers, check_ratios=ratios)
    if name in ("key_signal", "value_signal"):
        sig = name.removesuffix("_signal")
        return Variant(name, f"HKVD selected by {sig} deviation alone", selection_signal=sig)
    if name == "sensitivity_signal":
        return Variant(name, "HKVD: the most context-sensitive of the most value-deviating tokens",
                       {"selection_signal": "sensitivity"}, selection_signal="sensitivity")
    if name == "stored_signal":
        return Variant(name, "HKVD: the most context-sensitive chunk tokens alone, chosen before layer 0 (check layer 0)",
                       {"selection_signal": "stored"}, check_layers=(0,), selection_signal="stored")
    if name == "stored_funnel":
        return Variant(name, "the stored ranking's funnel with its layer-8 check by value deviation alone (no attention weight)",
                       selection_signal="stored")
    if name == "random_sel":
        return Variant(name, "control: the same number of chunk tokens, chosen at random", selection_signal="random")
    if name.startswith("pool"):
        try:
            share = float(name[4:])
        except ValueError:
            raise ValueError(f"variant {name}: write poolSHARE, e.g. pool0.7") from None
        if not 0 < share <= 1:
            raise ValueError(f"variant {name}: the pool share must be in (0, 1]")
        return Variant(name, f"sensitivity signal, the {share:g} most value-deviating chunk tokens as its pool",
                       {"sensitivity_pool": share, "selection_signal": "sensitivity"}, selection_signal="sensitivity")
    if name.startswith("sched:"):
        return _schedule(name, num_layers)
    if name.startswith("check") and name[5:].isdigit():
        layer = int(name[5:])
        if not 0 <= layer < num_layers:
            raise ValueError(f"variant {name}: the model has layers 0..{num_layers - 1}")
        return Variant(name, f"one check layer at {layer}", check_layers=(layer,))
    raise ValueError(f"unknown variant {name!r}; known: {VARIANT_HELP}")


def _schedule(name: str, num_layers: int) -> Variant:
    """`sched:1=.2/20=.05`: check layer 1 keeps 20% of the chunk tokens, layer 20 keeps 5% of them."""
    try:
        pairs = [part.split("=") for part in name.removeprefix("sched:").split("/")]
        layers, ratios = tuple(int(layer) for layer, _ in pairs), tuple(float(r) for _, r in pairs)
    except ValueError:
        raise ValueError(f"variant {name}: write sched:LAYER=RATIO/LAYER=RATIO...") from None
    if list(layers) != sorted(set(layers)) or not 0 <= layers[0] or layers[-1] >= num_layers:
        raise ValueError(f"variant {name}: check layers must increase within 0..{num_layers - 1}")
    if any(not 0 <= r <= 1 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
        raise ValueError(f"variant {name}: ratios must be in [0, 1] and non-increasing")
    budget = schedule_budget(layers, ratios, num_layers)
    return Variant(name, f"check layers {list(layers)} at ratios {list(ratios)}: {budget:.2f} layers' worth of chunk "
                         f"tokens recomputed after layer {layers[0]}", check_layers=layers, check_ratios=ratios)


def schedule_budget(layers: Sequence[int], ratios: Sequence[float], num_layers: int) -> float:
    """Chunk-token recompute after the first check layer, in whole layers: a check layer still
    computes the tokens kept before it, its ratio holds from the next layer on."""
    bounds = list(layers[1:]) + [num_layers - 1]
    return sum(r * (end - start) for start, end, r in zip(layers, bounds, ratios))


def parse_variants(text: Optional[str], num_layers: int) -> list[Variant]:
    if not text:
        return []
    if text.strip() == "all":
        text = ALL_VARIANTS
    return [parse_variant(n, num_layers) for n in text.split(",") if n.strip()]


@dataclass
class Plan:
    specs: list[ModeSpec]           # everything run per question (deduplicated)
    sweep: list[ModeSpec]           # the rows of the main table, in order
    variants: list[tuple[Variant, ModeSpec, ModeSpec]]  # (variant, its spec, its engine's full_reuse)


def make_plan(harness: Harness, modes: Sequence[str], ratios: Sequence[float], variants: Sequence[Variant],
              variant_ratios: Sequence[float]) -> Plan:
    """full_prefill (the reference), the baseline `modes`, cacheblend at each ratio, then the
    variants at each of `variant_ratios`, each with its engine's full_reuse; engines are added to
    `harness`."""
    sweep = [base_spec("full_prefill")] + [base_spec(m) for m in modes if m in ("prefix_cache", "full_reuse")]
    sweep += [cacheblend_spec(r) for r in ratios]
    if not any(s.mode == "full_reuse" for s in sweep):
        sweep.append(base_spec("full_reuse"))  # the KL-below-full-reuse reference
    specs = list(sweep)
    seen = {s.identity: s for s in specs}
    var_rows = []
    for v in variants:
        harness.add_engine(v.engine_key, v.engine_overrides)
        reuse = seen.setdefault(base_spec("full_reuse", v.engine_key).identity, base_spec("full_reuse", v.engine_key))
        for ratio in variant_ratios:
            spec = v.spec(ratio, tagged=len(variant_ratios) > 1)
            if any(row[0] is v and row[1].identity == spec.identity for row in var_rows):
                continue  # a schedule: the same run at every ratio
            spec = seen.setdefault(spec.identity, spec)
            if spec not in specs:
                specs.append(spec)
            var_rows.append((v, spec, reuse))
        if reuse not in specs:
            specs.append(reuse)
    return Plan(specs, sweep, var_rows)

