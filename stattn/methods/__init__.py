"""The attention-control methods built on the op, one subpackage each.

Each method keeps its pieces side by side: ``controller`` (the :class:`stattn.Controller` a user
installs), ``core`` (the fused path on the op and its kernels, where the method has one) and
``reference`` (the eager PyTorch reading of the released code, the oracle of the tests).
"""
