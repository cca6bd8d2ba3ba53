"""Placement: how tokens are spread over ranks (layouts, documents and their balanced placement, token masks)."""
