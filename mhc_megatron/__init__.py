"""mhc-megatron: Manifold-Constrained Hyper-Connections (mHC) for Megatron-LM.

Where things live: the maths in :mod:`mhc_megatron.ops`, the command line in
:mod:`mhc_megatron.cli`.
"""

__version__ = "0.1.0"
