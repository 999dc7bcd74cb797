"""pytest fixtures shipped with llmbatch (auto-loaded through the ``pytest11`` entry point)."""
