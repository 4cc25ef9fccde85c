"""divgen kernels: Triton ops with pure-torch twins of the same signature in ``reference``.

``guided_sample`` dispatches once per call on the logits' device: the Triton kernel on CUDA,
the torch reference elsewhere (CPU, or CUDA without triton).
"""
from divgen.kernels.reference import uniform_noise  # noqa: F401
