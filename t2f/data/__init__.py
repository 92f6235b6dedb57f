"""Data: source readers, WebDataset shard writer and streaming loader, recaptioner vocabulary."""
