"""HKVD selection math, alone."""

import math

import torch

from engine.selection import kv_deviation, num_selected, select_hkvd


def test_num_selected_is_ceil_without_float_fuzz():
    assert num_selected(0.15, 100) == 15
    assert num_selected(0.15, 101) == math.ceil(0.15 * 101) == 16
    assert num_selected(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert num_selected(0.0, 50) == 0
    assert num_selected(1.0, 50) == 50


def test_select_picks_largest_in_index_order():
    dev = torch.tensor([0.1, 5.0, 0.3, 9.0, 2.0])
    assert select_hkvd(dev, 2).tolist() == [1, 3]
    assert select_hkvd(dev, 10).tolist() == [0, 1, 2, 3, 4]


def test_deviation_is_per_token_over_heads_and_dims():
    cached = torch.zeros(2, 3, 4)
    fresh = torch.zeros(2, 3, 4)
    fresh[1, 2, 0] = 3.0
    fresh[0, 0, :] = 1.0
    assert kv_deviation(fresh, cached).tolist() == [4.0, 0.0, 9.0]
