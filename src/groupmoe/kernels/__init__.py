"""Triton kernels for CUDA tensors. Import a kernel module only after checking
:func:`groupmoe.ops.backend.triton_enabled`; the torch paths in :mod:`groupmoe.ops` are the
reference and the CPU implementation."""
