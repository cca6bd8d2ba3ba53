"""Proofs that a plan computes exact attention: pair by pair, by rectangles, by counting (masked), replicated."""
