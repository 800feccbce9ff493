"""The `cacheblend` command line."""
