"""Tools to test TokenRing and its backends: problems, reference checks, multi-rank tasks."""
