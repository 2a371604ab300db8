"""Evaluation: retention tables on real benchmarks - lm-eval text tasks on the three text paths
(`text_tasks`, with the lm-eval model "genieblue" in `harness`), VQA benchmarks from local files with
their standard metrics (`vqa`, `vqa_data`, `vqa_metrics`), judged chat (`judge`) - each written as
markdown, JSON and a chart (`report`) and resumable (`cache`); plus the demo's short-answer accuracy
(`answers`) and text retention checks (`text`)."""
