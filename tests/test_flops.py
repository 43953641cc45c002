"""The analytic FLOPs formula (ALGORITHM.md §6) against cases worked out by hand."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from prunevid.flops import DecoderShape, decode_flops, layer_flops, prefill_flops

# A toy decoder: d = 4 hidden, m = 8 MLP width, 3 layers, gated MLP.
# One layer over n = 10 tokens:
#   4 n d^2 = 4 * 10 * 16     =  640   (q, k, v, o projections)
#   2 n^2 d = 2 * 100 * 4     =  800   (scores and weighted values)
#   3 n d m = 3 * 10 * 4 * 8  =  960   (gate, up, down)
#   total                       2400
# Over n = 5 tokens: 4*5*16 + 2*25*4 + 3*5*4*8 = 320 + 200 + 480 = 1000.
TOY = DecoderShape(hidden=4, mlp=8, layers=3, gated=True)


def test_one_layer_by_hand() -> None:
    assert layer_flops(TOY, 10) == 2400
    assert layer_flops(TOY, 5) == 1000
    # Plain (non-gated) MLP: 2 n d m = 640 instead of 960 -> 640 + 800 + 640 = 2080.
    assert layer_flops(DecoderShape(4, 8, 3, gated=False), 10) == 2080


def test_prefill_with_and_without_stage2_by_hand() -> None:
    assert prefill_flops(TOY, 10) == 3 * 2400  # 7200: every layer at 10 tokens
    # Stage 2 at layer 0: layer 0 at 10 tokens, layers 1-2 at 5: 2400 + 2 * 1000 = 4400.
    assert prefill_flops(TOY, 10, 5, selected_layer=0) == 4400
    # At layer 1: layers 0-1 at 10, layer 2 at 5: 2 * 2400 + 1000 = 5800.
    assert prefill_flops(TOY, 10, 5, selected_layer=1) == 5800
    # Pruning after the last layer changes nothing.
    assert prefill_flops(TOY, 10, 5, selected_layer=2) == 7200


def test_decode_step_by_hand() -> None:
    # One new token over a cache of 9: per layer 4 d^2 + 2 (9 + 1) d + 3 d m = 64 + 80 + 96 = 240; x 3 layers.
    assert decode_flops(TOY, 9) == 720


def test_qwen2_half_billion_by_hand() -> None:
    # Qwen2-0.5B: d = 896, m = 4864, 24 layers; n = 1000 tokens, per layer:
    #   4 * 1000 * 896^2      = 4 * 1000 * 802,816      =  3,211,264,000
    #   2 * 1000^2 * 896                                =  1,792,000,000
    #   3 * 1000 * 896 * 4864 = 3 * 1000 * 4,358,144    = 13,074,432,000
    #   one layer                                         18,077,696,000; x 24 = 433,864,704,000
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24)
    shape = DecoderShape.from_config(config)
    assert shape == DecoderShape(896, 4864, 24, gated=True)
    assert layer_flops(shape, 1000) == 18_077_696_000
    assert prefill_flops(shape, 1000) == 433_864_704_000


def test_ratio_matches_retention_when_linear_terms_dominate() -> None:
    # With d and m much larger than n, FLOPs are nearly linear in n: pruning everything after
    # layer 0 of 2 to half the tokens predicts a speedup of almost 2 / 1.5.
    shape = DecoderShape(hidden=4096, mlp=11008, layers=2)
    ratio = prefill_flops(shape, 100) / prefill_flops(shape, 100, 50, selected_layer=0)
    assert ratio == pytest.approx(2 / 1.5, rel=1e-3)
