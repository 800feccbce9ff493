"""One typed settings schema for the whole server.

Every field has a default. Values are layered, lowest first: defaults, a YAML file
(`--config FILE` or `CACHEBLEND_CONFIG`), environment variables (`CACHEBLEND_<NAME>`), and
CLI flags (`--<name-in-kebab-case>`). The same name is used everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, get_args

import json

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Mode = Literal["full_prefill", "prefix_cache", "full_reuse", "cacheblend"]
MODES: tuple[str, ...] = ("full_prefill", "prefix_cache", "full_reuse", "cacheblend")
SelectionSignal = Literal["attended", "stored", "sensitivity", "value", "key", "random"]
SELECTION_SIGNALS: tuple[str, ...] = get_args(SelectionSignal)
STORED_RANKING: tuple[str, ...] = ("attended", "stored")  # signals whose first check ranks by the stored sensitivity, with no fresh KV
READS_SENSITIVITY: tuple[str, ...] = STORED_RANKING + ("sensitivity",)  # signals whose chunks are probed at precompute

DEFAULT_DATA_DIR = Path.home() / ".cache" / "cacheblend"


def _split_list(value: Any) -> Any:
    """Lists come as JSON (`[1, 8]`) or comma lists (`1,8`) from env vars and flags."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def check_layer_rules(layers: Sequence[int], num_layers: Optional[int] = None) -> None:
    """Check layers: at least one, strictly increasing, inside the model (ValueError if not)."""
    if not layers:
        raise ValueError("check_layers must name at least one layer")
    if sorted(set(layers)) != list(layers):
        raise ValueError("check_layers must be strictly increasing")
    if num_layers is not None and not all(0 <= x < num_layers for x in layers):
        raise ValueError(f"check_layers must be layer indices in [0, {num_layers})")


def default_check_layers(signal: str) -> list[int]:
    """Where a signal selects unless told: `attended` and `stored` rank without fresh KV, so at
    layer 0 (whose KV of a chunk token is exact: it depends on the token alone); the others rank
    a fresh layer against the stored one, so at layer 1, the first where they differ."""
    return [0] if signal in STORED_RANKING else [1]


def check_ratio_rules(ratios: Sequence[float], num_check_layers: int) -> None:
    """Ratios: one per check layer, each in [0, 1], never rising (ValueError if not)."""
    if len(ratios) != num_check_layers:
        raise ValueError("check_ratios needs one ratio per check layer")
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError("check_ratios must lie in [0, 1]")
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError("check_ratios must not increase from one check layer to the next")


def _json_object(value: Any) -> Any:
    """Objects come as JSON text from env vars and flags."""
    return json.loads(value) if isinstance(value, str) else value


IntList = Annotated[list[int], NoDecode, BeforeValidator(_split_list)]
JSONObject = Annotated[dict[str, Any], NoDecode, BeforeValidator(_json_object)]
FloatList = Annotated[list[float], NoDecode, BeforeValidator(_split_list)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CACHEBLEND_", extra="forbid", validate_default=True)

    # --- model ---
    model: str = Field("embedded", description="Local Hugging Face model directory, or 'embedded' for SmolLM2-135M-Instruct")
    served_model_name: Optional[str] = Field(None, description="Model name reported by the API (default: derived from --model)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Compute dtype (auto: bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX whose torch runs bf16 GEMMs on them, else float32)")
    max_model_len: int = Field(8192, ge=16, description="Longest prompt + completion in tokens")
    data_dir: Path = Field(DEFAULT_DATA_DIR, description="Folder for the converted embedded model (read at start-up; servers may share it)")
    state_dir: Optional[Path] = Field(None, description="Folder for everything this server writes: the chunk registry (chunks/), document records (documents/) and the disk KV tier (kv/); give each server its own (default: data_dir)")

    backend: Literal["native", "vllm"] = Field("native", description="Generation engine: native (this project's), or vllm (vLLM's V1 engine, with the blend in its CacheBlend KV connector; needs pip install -e .[vllm])")
    vllm_engine_args: JSONObject = Field(default_factory=dict, description="backend vllm: extra vLLM engine arguments as a JSON object, over the ones these settings give (e.g. {\"enforce_eager\": true})")

    # --- blending ---
    mode: Mode = Field("cacheblend", description="Prefill mode: full_prefill | prefix_cache | full_reuse | cacheblend")
    recompute_ratio: float = Field(0.15, ge=0.0, le=1.0, description="Share of chunk tokens recomputed per layer after the first check layer: the attended and stored signals' default schedule spends it as two stages (about 1.4x it up to layer 8 of 30, 0.84x it after), the others keep it from their check layer on; 1.0 = full prefill")
    check_layers: Optional[IntList] = Field(None, description="Layers where HKVD tokens are selected (comma list; default: the signal's schedule: 0 and 8 of 30 for the attended and stored signals, whose first choice needs no computed layer, 1 for the others; 0 for those two when only check_ratios is set)")
    check_ratios: Optional[FloatList] = Field(None, description="Ratio per check layer, non-increasing (default: the signal's schedule for recompute_ratio; with check_layers, recompute_ratio at each)")
    selection_signal: SelectionSignal = Field("attended", description="How HKVD tokens are picked: attended (as stored, each ranking weighted by how much the question attends to the token: at layer 0 the stored sensitivity times the attention of a look-ahead of the question over the stored KV, at later check layers the fresh value deviation times the fresh attention; measured best), stored (the chunk tokens whose KV the precompute found most context-sensitive, chosen before the check layer is computed: at check layer 0 the dropped tokens are never computed; later check layers keep the most value-deviating of them), sensitivity (of the most value-deviating tokens at the check layer, the most context-sensitive), value or key deviation alone (random: a control for research)")
    sensitivity_pool: float = Field(0.5, gt=0.0, le=1.0, description="sensitivity signal: share of chunk tokens pre-selected by value deviation at the first check layer")
    chunk_context: Literal["sink", "prefix", "passage"] = Field("passage", description="Precompute convention: what is in front of each chunk: the default prompt prefix and a neutral passage (measured best: most chunks follow another passage), the prefix alone (exact KV for a chunk right after it), or a sink token")
    recompute_chunk_head: int = Field(0, ge=0, description="Always recompute the first N tokens of every chunk (their own attention sink)")
    prefix_cache_bytes: int = Field(512 << 20, ge=0, description="Bytes of exact leading-segment KV kept for prefix reuse")
    turn_reuse: bool = Field(True, description="Keep the KV of chat turns (messages) in the chunk store and blend it back when a turn reappears at another position")

    # --- scheduling and decoding ---
    max_num_seqs: int = Field(16, ge=1, description="Requests decoded together in one batch")
    max_queue: int = Field(64, ge=1, description="Waiting requests before new ones get 503")
    max_num_batched_tokens: int = Field(8192, ge=1, description="While streams are decoding, a prefill advances by at most this many computed tokens per step (whole layers, or rows of one: chunked prefill inside a layer), then every stream gets its next token (a prefill with nobody decoding runs to its end); lower: smoother streams, later first tokens")
    max_itl_slowdown: float = Field(0.0, ge=0.0, description="While streams are decoding, each step's prefill piece is also sized (from the measured cost of a computed token) so the step lasts at most this many times its decode alone: a stream's inter-token gap while others prefill; 0 (default): by max_num_batched_tokens alone (first tokens and throughput first); 3: smoother streams under load, for later first tokens and fewer requests/s; 1.5: p99 gap within 3x a stream's idle gap, for about 6x later first tokens (BENCHMARKS.md). Native engine")
    seed: int = Field(0, description="Default sampling seed")

    # --- chunk KV store ---
    kv_storage_dtype: Literal["float32", "float16", "bfloat16", "float8_e4m3fn"] = Field("float16", description="Dtype chunk KV is stored in")
    kv_device_bytes: int = Field(2 << 30, ge=0, description="Capacity of the GPU tier (CUDA only)")
    kv_cpu_bytes: int = Field(4 << 30, ge=0, description="Capacity of the host-memory tier")
    kv_disk_bytes: int = Field(32 << 30, ge=0, description="Capacity of the disk tier (0 disables it)")
    kv_disk_path: Optional[Path] = Field(None, description="Disk tier folder, to put KV on another disk than the rest of the state (default: <state_dir>/kv)")
    kv_disk_write: Literal["through", "back"] = Field("through", description="Disk tier written on put (through) or on eviction from CPU (back)")
    redis_url: Optional[str] = Field(None, description="redis://host:port/db for the shared tier")
    redis_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="TTL of chunk KV in Redis")
    redis_max_bytes: int = Field(256 << 20, ge=0, description="Largest blob written to Redis")
    redis_timeout_s: float = Field(0.5, gt=0, description="Redis socket timeout")
    s3_endpoint: Optional[str] = Field(None, description="S3-compatible endpoint URL for the shared tier")
    s3_bucket: Optional[str] = Field(None, description="S3 bucket for chunk KV")
    s3_prefix: str = Field("cacheblend/", description="Key prefix inside the bucket")

    # --- server ---
    host: str = Field("127.0.0.1", description="Bind address")
    port: int = Field(8000, ge=0, le=65535, description="Bind port")
    api_key: Optional[str] = Field(None, description="Bearer token required on /v1 routes and the API docs (tenant 'default', admin)")
    api_keys_file: Optional[Path] = Field(None, description="JSON list of tenants' hashed API keys and limits (reloaded on SIGHUP; see README 'Tenants')")
    api_docs: bool = Field(True, description="Serve /docs, /redoc and /openapi.json (behind --api-key when one is set)")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="Largest accepted request body")
    max_chunks_per_request: int = Field(64, ge=1, description="Most chunks in one request")
    max_chunk_tokens: int = Field(4096, ge=1, description="Longest chunk in tokens")
    chat_preamble: str = Field("", description="Text put in the last user turn before the chunks")
    completion_prefix: str = Field("", description="Text put before the chunks in /v1/completions")
    log_format: Literal["text", "json"] = Field("text", description="Log line format")
    log_level: str = Field("INFO", description="Log level")

    # --- documents ---
    document_chunk_tokens: int = Field(512, ge=16, description="Tokens per piece of a document registered with POST /v1/documents (capped by max_chunk_tokens)")
    document_overlap_tokens: int = Field(32, ge=0, description="Tokens each document piece repeats from the end of the previous one")
    max_document_chars: int = Field(2_000_000, ge=1, description="Longest document in characters (its JSON body must also fit max_body_bytes)")

    # --- quality monitoring ---
    quality_sample_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests also run with full_prefill to measure quality")
    quality_compare_tokens: int = Field(16, ge=1, description="Greedy tokens compared per sampled request")
    controller_enabled: bool = Field(False, description="Adjust recompute_ratio from sampled agreement")
    controller_min_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Lowest ratio the controller sets")
    controller_max_ratio: float = Field(0.5, ge=0.0, le=1.0, description="Highest ratio the controller sets")
    controller_target_agreement: float = Field(0.9, ge=0.0, le=1.0, description="Top-1 agreement the controller keeps")
    controller_step: float = Field(0.05, gt=0.0, le=1.0, description="Ratio change per controller decision")
    controller_window: int = Field(8, ge=1, description="Sampled requests per controller decision")
    controller_hysteresis: float = Field(0.05, ge=0.0, le=1.0, description="Agreement band above target before the ratio is lowered")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        layers = self.check_layers if self.check_layers is not None else default_check_layers(self.selection_signal)
        check_layer_rules(layers)
        if self.check_ratios is not None:  # alone: for the signal's single check layer
            check_ratio_rules(self.check_ratios, len(layers))
        if 0 < self.max_itl_slowdown <= 1:
            raise ValueError("max_itl_slowdown must be 0 (off) or above 1 (a step is its decode plus a prefill piece)")
        if self.document_overlap_tokens >= self.document_chunk_tokens:
            raise ValueError("document_overlap_tokens must be smaller than document_chunk_tokens")
        if self.controller_min_ratio > self.controller_max_ratio:
            raise ValueError("controller_min_ratio must not exceed controller_max_ratio")
        return self

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.data_dir

    @property
    def resolved_kv_disk_path(self) -> Path:
        return self.kv_disk_path if self.kv_disk_path is not None else self.resolved_state_dir / "kv"
