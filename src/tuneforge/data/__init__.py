"""From jsonl lines to token rows: formats -> templates -> encode -> pack."""
