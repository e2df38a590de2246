"""Checkpoint conversion between mhc-megatron and upstream Megatron-LM's mHC (``mhc-megatron convert-checkpoint``)."""
