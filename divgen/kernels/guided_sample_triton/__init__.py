"""Fused guided sampling (CorrSynth, CFG, plain) from logits, in Triton.

Same tokens as ``divgen.kernels.reference`` (DESIGN.md, "The math"; the reference's docstring is
the contract, including its rules for non-finite input). Entry points: ``guided_sample_step``
(the capturable step on a ``SamplePlan``: device buffers only, no host sync) and
``guided_sample`` (direct callers: checks, then the step).

One module per part of the algorithm, each with its derivation, in reading order:

* ``device``: constants and device helpers; the mix (the math below), tiles and noise;
* ``stats``: pass 1, each row's lse and α threshold;
* ``gumbel``: the sample pass (Gumbel-max over the mixed, cut scores) and the select pass;
* ``rounds``: top-k / top-p by sample / verify rounds, and the decision that settles a row;
* ``bisect``: the exact bisection of both thresholds behind the rounds;
* ``step``: the host side, a fixed launch list per plan (capturable in a CUDA graph).

Compiled figures (sm_90 / sm_80 registers, spills, shared memory, instructions per logit) are
measured by ``tests/test_kernels_compile.py``; see ``kernels/README.md``.

Equality with the reference: with the same noise the tokens are those of the reference except
where two scores lie within float rounding (~1e-6 relative) of each other: s is summed in another
order, 1/T multiplies instead of dividing, and the GPU's log differs from torch's in the last bit;
likewise a top-p mass within rounding of top_p · total (summed in another order) may fall either way.
"""
from divgen.kernels.guided_sample_triton.device import (
    CUDA_STATS_BLOCK_V, CUDA_TILES, GUMBEL_MAX, KEY_BELOW_ALL, MAX_CHUNKS, NUM_LEVELS, NUM_PIVOTS, PIVOT_BITS,
    SAMPLE_ROUNDS, STATE_ACCEPTED, STATE_BISECT, STATE_OPEN, STATE_REFINE, THRESHOLD_PASSES,
)
from divgen.kernels.guided_sample_triton.step import (
    LaunchConfig, Tiles, fuses_stats, guided_sample, guided_sample_step, launch_config, launch_count,
    prepare_plan, tile_shape, uniform_noise,
)

__all__ = [
    "CUDA_STATS_BLOCK_V", "CUDA_TILES", "GUMBEL_MAX", "KEY_BELOW_ALL", "MAX_CHUNKS", "NUM_LEVELS", "NUM_PIVOTS",
    "PIVOT_BITS", "SAMPLE_ROUNDS", "STATE_ACCEPTED", "STATE_BISECT", "STATE_OPEN", "STATE_REFINE", "THRESHOLD_PASSES",
    "LaunchConfig", "Tiles", "fuses_stats", "guided_sample", "guided_sample_step", "launch_config", "launch_count",
    "prepare_plan", "tile_shape", "uniform_noise",
]
