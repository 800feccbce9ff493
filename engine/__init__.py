"""CacheBlend engine: model, blend prefill, decoding."""
