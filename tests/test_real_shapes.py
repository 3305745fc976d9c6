"""The CUDA decode step at real LLaMA shapes against the eager path (GPU only).

The kernel tests run tiny shapes; the GEMV and attention tables choose their configs by shape, batch and context,
so the configs the 7B, 13B, LLaMA-3-8B (grouped-query) and 70B shapes take, and the guessed ones of a shape no
table has (LLaMA-3.2-3B), at the batches and contexts
``wkvq bench`` times and between them, run only here: two layers of a random model of each shape, its 4-bit
cache filled with random codes (:func:`tests.helpers.real_shape_decode_errors`). ``benchmarks/shape_probe.py``
prints the same errors for any list of cases. And the prefill's peak memory at two layers of real shapes against
transformers fp16's.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import real_shape_decode_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode step's kernels at real shapes: CUDA")

CASES = [("7b", b, 2048) for b in (1, 2, 3, 5, 8, 16, 32)] + [
    ("7b", 1, 32768), ("7b", 8, 32768), ("13b", 1, 2048), ("13b", 8, 2048), ("13b", 1, 32768), ("8b", 1, 2048),
    ("8b", 4, 2048), ("8b", 1, 32768), ("70b", 1, 2048), ("70b", 1, 32768), ("3b", 1, 2048), ("3b", 3, 2048),
    ("7b", 1, 8192), ("8b", 1, 8192), ("13b", 1, 8192),  # the step's split counts at p8192 (ATTN_KV_TABLE)
    ("7b", 1, 4096), ("8b", 1, 4096), ("13b", 1, 4096), ("8b", 1, 16384), ("13b", 1, 16384),  # and p4096, p16384
    ("3b", 1, 16384), ("3b", 1, 32768), ("70b", 1, 8192),  # no entry at batch 1 from 4096: kv4.placement_splits
    ("7b", 2, 32768), ("7b", 4, 4096), ("13b", 2, 16384), ("8b", 4, 8192), ("70b", 2, 4096),  # and at batches 2-4
    ("13b", 4, 512)]  # a cell no table has: the nearest entry (kv4.nearest_entry), splits cut
# float16 activations on both paths (the eager one dequantizes to float16 and multiplies in cuBLAS), and from the
# second step on a written token's codes may differ by one where the two paths round K or V differently. Measured
# on an H200: 6e-4 to 1.4e-3, 3.5e-3 at 70B's third step; a lost split of 16 at 7B b1 p32768: 4.7e-2 to 6.5e-2
TOL = 1e-2


@pytest.mark.parametrize("shape,batch,prompt", CASES)
def test_decode_step_at_real_shapes_matches_eager(shape, batch, prompt):
    errs = real_shape_decode_errors(shape, batch, prompt)
    assert max(errs) < TOL, errs


def test_the_check_sees_a_lost_split():
    """The check's power: the eager path with the key codes of the last 1/16 of a 32768-token past redrawn (what a
    kernel that lost one of the attention's 16 splits, or read it from the wrong place, would compute) is far outside
    the tolerance."""
    errs = real_shape_decode_errors("7b", 1, 32768, lost=1 / 16)
    assert min(errs) > 2 * TOL, errs


@pytest.mark.parametrize("shape", ["7b", "8b"])
def test_prefill_holds_no_more_than_fp16(shape):
    """The W4KV4 prefill's peak memory above its model and cache is at most transformers fp16's (one forward into
    a StaticCache, the last token's logits): two layers of the shape, 8192 tokens. Until the thirty-ninth session a
    layer's gate_up output lived on until the next layer's replaced it, so a 7B prefill of 32768 tokens held 5.23 GB
    against fp16's 3.26 (``benchmarks/prefill_bench.py --memory``)."""
    from benchmarks.prefill_bench import fp16_prefill, wkvq_prefill
    from converter.bench import llama_config

    config = llama_config(shape)
    config.num_hidden_layers = 2
    ours, fp16 = wkvq_prefill(config, 8192, 1)["peak_GB"], fp16_prefill(config, 8192, 1)["peak_GB"]
    assert ours <= fp16, (ours, fp16)
