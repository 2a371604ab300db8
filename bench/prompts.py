"""Chat questions the benchmark scripts send (bench/decode.py's batch, bench/serve_load.py's clients):
one list, imported by both (`python bench/<script>.py` puts bench/ on the import path)."""

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "What is 12 times 7?",
    "Name a large mammal.",
    "Why is the sky blue?",
]
