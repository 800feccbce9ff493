"""CacheBlend inside vLLM V1, as an out-of-tree KV connector (no patch to vLLM).

    --kv-transfer-config '{"kv_connector": "CacheBlendConnector",
                           "kv_connector_module_path": "engine.vllm_connector",
                           "kv_role": "kv_both", "kv_connector_extra_config": {<cacheblend settings>}}'

A request asks for a blend with `kv_transfer_params={"cacheblend": {"chunks": [[start, end), ...],
<optional BlendParams: mode, recompute_ratio, ...>}}` (token positions in its prompt).

Scheduler side: such a request's blocks are salted with its blend (its KV is approximate and
must never be an exact prefix hit for another request; an identical blend may share them), and
the whole prompt but its last token is reported as provided by the connector, loaded
asynchronously: the request waits while others run. Worker side: the blend of that span runs on
vLLM's own layers, `max_num_batched_tokens` computed tokens per engine step (whole layers or
rows of one, as in the native engine), between vLLM's forward passes, so running streams keep decoding; when it
ends, its KV is written into vLLM's paged cache at the request's slots by the attention
backend's own writer and the request is reported loaded. vLLM then computes the last prompt
token over it, with its own kernels, and decodes as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole, KVConnectorTransferResults,
                                                                KVConnectorWorkerMetadata)

from config.settings import Settings
from engine.steps import run_for
from engine.prefill import Prefilled
from engine.request import RequestError
from engine.stats import prefill_record
from engine.vllm_blend import BlendRequest, VllmBlender
from engine.vllm_plugin import loaded_model

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.cacheblend")  # under vLLM's logger: its handlers and format

# Attention implementations whose `do_kv_cache_update` writes this project's [tokens, Hkv, D]
# K and V (post-RoPE, model dtype) into their own paged layout
SUPPORTED_ATTENTION = ("CPUAttentionBackendImpl", "FlashAttentionImpl")
PARAMS_KEY = "cacheblend"


@dataclass
class BlendLoad:
    request_id: str
    token_ids: list[int]      # the prompt but its last token (`request.end`): positions [start, end) are written
    request: BlendRequest
    start: int                # first position to write (before it: vLLM's own prefix-cache hit)
    block_ids: list[int]


@dataclass
class CacheBlendMetadata(KVConnectorMetadata):
    loads: list[BlendLoad] = field(default_factory=list)


@dataclass
class BlendRecords(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per engine step: how each blend finished in it was made (request id
    -> `prefill_record` fields); the request's final output carries it in `kv_transfer_params`."""
    records: dict[str, dict] = field(default_factory=dict)

    def aggregate(self, other: "BlendRecords") -> "BlendRecords":
        return BlendRecords({**self.records, **other.records})


class CacheBlendConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.settings = Settings(**extra)
        self._num_layers = vllm_config.model_config.hf_config.num_hidden_layers
        # scheduler side
        self._requests: dict[str, BlendRequest] = {}     # request id -> its blend
        self._start: dict[str, int] = {}                 # request id -> vLLM's own hit when matched
        self._to_load: dict[str, BlendLoad] = {}         # allocated since the last step: the worker starts them
        self._records: dict[str, dict] = {}              # request id -> its blend's record, until it finishes
        # worker side
        self._layers: list[tuple[int, Any, torch.Tensor]] = []  # (layer, vLLM's attention module, its paged KV)
        self.blender: Optional[VllmBlender] = None        # the blend and its chunk store (`engine/vllm_worker.py` reaches it)
        self._blends: dict[str, tuple[BlendLoad, Generator]] = {}  # request id -> its blend in progress
        self._loaded: set[str] = set()                   # blends done since the last report
        self._failed: set[str] = set()
        self._done: dict[str, dict] = {}                 # blends done since the last step: their records

    # --- scheduler side ---------------------------------------------------------------------

    def on_new_request(self, request: "Request") -> None:
        params = request.kv_transfer_params or {}
        try:
            blend = BlendRequest.parse(params.get(PARAMS_KEY), request.num_prompt_tokens, self.settings,
                                       self._num_layers, request.cache_salt or "")
        except RequestError as e:
            # the scheduler cannot refuse a request: it is served by a full prefill, loudly
            log.warning("request %s: not blended: %s: %s", request.request_id, e.param, e)
            return
        if blend is None:
            return
        self._requests[request.request_id] = blend
        # a blended block is approximate: salt the request's block hashes with its blend, so that
        # only the same blend of the same prompt can ever hit them
        digest = hashlib.sha256(json.dumps([blend.chunks, blend.salts, vars(blend.params)], default=str).encode()).hexdigest()[:16]
        request.cache_salt = f"{request.cache_salt or ''}|cacheblend:{digest}"
        request.block_hashes.clear()
        request.update_block_hashes()

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        if request.request_id not in self._requests:
            return 0, False
        self._start[request.request_id] = num_computed_tokens
        tokens = max(0, self._requests[request.request_id].end - num_computed_tokens)
        return tokens, tokens > 0

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        # called again, with 0, when the request's other blocks are allocated after the load
        if num_external_tokens > 0:
            self._to_load[request.request_id] = self._load(request, blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = CacheBlendMetadata(list(self._to_load.values()))
        self._to_load.clear()
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        # a load already allocated still goes to the worker: vLLM frees the blocks of a request
        # that waits on KV only once the worker reports that load finished (it stops it at once)
        self._requests.pop(request.request_id, None)
        self._start.pop(request.request_id, None)
        record = self._records.pop(request.request_id, None)
        return False, ({PARAMS_KEY: record} if record is not None else None)

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, BlendRecords):
            self._records.update(meta.records)

    def _load(self, request: "Request", block_ids: list[int]) -> BlendLoad:
        """What the worker needs for a request's blend: its prompt but the last token, and its slots."""
        rid = request.request_id
        blend = self._requests[rid]
        return BlendLoad(rid, list(request.prompt_token_ids[:blend.end]), blend, self._start.get(rid, 0), list(block_ids))

    # --- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        parallel = self._vllm_config.parallel_config
        if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
            raise RuntimeError("CacheBlendConnector: the blend runs the whole model in one worker; tensor and "
                               "pipeline parallelism are not supported yet (set both sizes to 1)")
        layers = self._vllm_config.compilation_config.static_forward_context
        for name, cache in kv_caches.items():
            impl = type(layers[name].impl).__name__
            if impl not in SUPPORTED_ATTENTION:
                raise RuntimeError(f"CacheBlendConnector: attention implementation {impl} (layer {name}) is not "
                                   f"supported; its KV layout is unknown to the blend (supported: "
                                   f"{', '.join(SUPPORTED_ATTENTION)})")
            self._layers.append((int(re.search(r"layers\.(\d+)\.", name).group(1)), layers[name], cache))
        model = loaded_model()
        if model is None:
            raise RuntimeError("CacheBlendConnector: the model vLLM loaded is not tracked: the `cacheblend` vLLM plugin "
                               "must be installed and enabled (pip install this project; VLLM_PLUGINS, if set, must "
                               "name `cacheblend`), and the model must be a Llama-architecture one")
        mc = self._vllm_config.model_config
        self.blender = VllmBlender(self.settings, model, mc.hf_config, Path(mc.model))
        log.info("CacheBlendConnector: blending on vLLM's layers (%s, %s, %d layers), chunk KV in %s",
                 self.blender.model.dtype, impl, len(kv_caches), ", ".join(self.blender.store.stats()))

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Start this step's new blends, then advance the blends in progress by this step's
        budget of computed tokens (every engine step calls this, with or without a forward)."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, CacheBlendMetadata)
        for load in meta.loads:
            self._blends[load.request_id] = (load, self.blender.blend_steps(load.token_ids, load.request))
        budget = self.settings.max_num_batched_tokens
        for rid, (load, steps) in list(self._blends.items()):
            if budget <= 0:
                break
            try:
                done, spent = run_for(steps, budget)
                budget -= spent
                if done is None:
                    continue
                self._write_pages(load, done)
            except Exception:  # a failed blend must not take the engine down: vLLM recomputes or fails the request
                log.exception("request %s: blend failed; reporting its load as failed", rid)
                self._failed.add(rid)
            del self._blends[rid]
            self._loaded.add(rid)

    def _write_pages(self, load: BlendLoad, pre: Prefilled) -> None:
        t0 = time.perf_counter()
        cache, stats = pre.result.cache, pre.result.stats
        s, e = load.start, load.request.end
        pos = torch.arange(s, e)
        blocks = torch.tensor(load.block_ids)
        slots = (blocks[pos // self.block_size] * self.block_size + pos % self.block_size).to(cache.k.device)
        for layer, attn, kv_cache in self._layers:
            k = cache.k[layer, :, s:e].transpose(0, 1).contiguous()  # [e - s, Hkv, D]
            v = cache.v[layer, :, s:e].transpose(0, 1).contiguous()
            attn.impl.do_kv_cache_update(attn, k, v, kv_cache, slots)
        log.debug("request %s: blended %d tokens (%d recomputed, %.3fs computing), wrote [%d, %d) into vLLM's pages "
                  "in %.3fs", load.request_id, stats.num_tokens, stats.recomputed_tokens, stats.compute_s, s, e,
                  time.perf_counter() - t0)
        self._done[load.request_id] = prefill_record(pre)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        for rid in finished_req_ids & self._blends.keys():  # aborted mid-blend: stop it, release its blocks
            self._blends.pop(rid)[1].close()
            self._loaded.add(rid)
        loaded, failed = self._loaded, self._failed
        self._loaded, self._failed = set(), set()
        return KVConnectorTransferResults(finished_recving=loaded, failed_recving=failed)

    def build_connector_worker_meta(self) -> Optional[BlendRecords]:
        if not self._done:
            return None
        meta, self._done = BlendRecords(self._done), {}
        return meta

    def shutdown(self) -> None:
        if self.blender is not None:
            self.blender.store.close()  # flushes writes still queued for the slower tiers
            log.info("CacheBlendConnector: chunk store flushed and closed")

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # a request's forward runs only after its blend is written

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # chunk KV is stored when a chunk is first computed, never cut from a request

    def wait_for_save(self) -> None:
        return
