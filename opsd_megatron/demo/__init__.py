"""Tiny, hub-free fixtures for the demo, the tests and the benchmarks: tiny HF models and a locally trained
tokenizer (`tiny`), the synthetic arithmetic task (`synthetic`) with its model (`task_model`), and the demo's
warm start (`warmstart`, shipped in `assets/warmstart`)."""
