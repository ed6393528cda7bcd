"""Quality testbed: a small FLUX-architecture text-to-image model trained from scratch.

FLUX.1-dev weights are not available here, so quantization quality is measured on a
substitute with FLUX's own transformer (BFL key layout), trained on procedurally
rendered scenes and scored by GenEval-style rules.

Modules, one job each:
    scenes     scene grammar, captions, GPU renderer
    prompts    train / evaluation / calibration splits
    score      rule-based GenEval-like scorer
    flux       the FLUX transformer (BFL layout) and token packing helpers
    text       word tokenizer and the small text encoder (T5 + CLIP roles)
    sampling   rectified-flow sampling with FLUX's shifted schedule
    checkpoint save / load of the two safetensors files
    train      `python -m testbed.train` (one GPU, stops by wall clock, resumable)
    resume     compact training checkpoints for training over several commands
    evaluate   held-out evaluation API and CLI
"""
