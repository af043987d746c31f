"""Scoring predictions as the challenge does, and pictures of them."""
