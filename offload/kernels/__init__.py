"""Kernels: each has a pure-torch reference beside its compiled binding (``csrc/``)."""
