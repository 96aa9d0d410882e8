"""Datasets: IOI prompts and base/source pairs, and a word-level tokenizer for tests."""
