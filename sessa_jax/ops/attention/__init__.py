"""Causal attention's methods: ``blocked`` (chunked, portable) and the vendor ``backends``
(cuDNN on GPU, splash attention on TPU)."""
