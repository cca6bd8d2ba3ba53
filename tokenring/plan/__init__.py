"""The plan model: spans, blocks, transfers, steps and payloads; traffic per link; the derived backward."""
