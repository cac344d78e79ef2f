"""Weight-only quantization of checkpoints (AWQ, round-to-nearest), written for TensorRT-LLM.

Nothing is imported here: plan.py reads `quant.schemes` (torch-free), and importing the package
must not pull torch in. Entry points: `quant.quantize.quantize_checkpoint(src, out, QuantParams)`,
`quant.quality.evaluate(float_ckpt, quant_ckpt)`, `quant.schemes.SCHEMES`.
"""
