"""What runs a checkpoint sparsify wrote, beyond what transformers runs itself.

- :mod:`.format`: the sparsify-attention config (``sparsify_attention``, ``sparsify_<family>`` model types).
- :mod:`.attention`: the ``sparsify`` attention function (pattern masks) and its registration.
- :mod:`.cache`: the bounded decoding cache of windowed layers.
- :mod:`.moe`: MoE blocks with one Linear per expert.
- :mod:`.quantized`: a Linear stored as compressed-tensors stores it, and its int kernels.

These modules build on :mod:`sparsify.algorithms` only; reading and writing checkpoints
(:mod:`sparsify.checkpoint`) builds on them, and :func:`sparsify.load` (:mod:`sparsify.loading`) on both.
"""
