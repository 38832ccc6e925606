"""Raw sources: the canonical record contract, the pre-flight check of a mapping, readers."""
