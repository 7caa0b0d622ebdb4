"""The feedback solve's methods: ``blocked`` (chunked scan, CPU) and ``recursive`` (known-statistics
solve on its ``schedule``, GPU/TPU), with the row statistics, the block product and the precision
tiers they share; each Pallas kernel (``*_gpu``, ``*_tpu``) sits beside the XLA twin it is tested
against."""
