"""relat_server: the OpenAI-compatible HTTP service and the `relat` command."""
