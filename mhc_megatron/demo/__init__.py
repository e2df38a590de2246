"""The tiny demo (``mhc-megatron demo``): data, model, training loop and report."""
