"""Evaluation: short-answer VQA accuracy and text retention (logit equality, text QA, perplexity)."""
