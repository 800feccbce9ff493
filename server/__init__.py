"""The OpenAI-compatible HTTP server: `build_app(settings)` and the `cacheblend serve` command."""
