"""relat_client: a small httpx client for the relat server (depends on neither relat_core nor relat_server)."""
