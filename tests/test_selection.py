"""HKVD selection math, alone."""

import math

import pytest
import torch

from engine import selection
from engine.selection import (FIRST_STAGE, attention_mass, context_sensitivity, funnel_schedule, kv_deviation, num_selected, select_hkvd, select_pooled,
                              sensitivity_layers)


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


def test_pooled_selection_ranks_the_most_deviating_pool_by_sensitivity():
    dev = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.1, 0.2])
    sens = torch.tensor([0.0, 5.0, 1.0, 3.0, 99.0, 98.0])
    # pool of 4 by deviation: 0..3; of those the 2 most sensitive are 1 and 3 (4, 5 never qualify)
    assert select_pooled(dev, sens, 2, 4).tolist() == [1, 3]
    # a pool smaller than k widens to k: plain HKVD
    assert select_pooled(dev, sens, 3, 1).tolist() == [0, 1, 2]
    assert select_pooled(dev, sens, 6, 4).tolist() == [0, 1, 2, 3, 4, 5]


def test_pooled_selection_with_a_full_pool_is_pure_sensitivity():
    dev = torch.rand(50)
    sens = torch.rand(50)
    assert select_pooled(dev, sens, 7, 50).tolist() == select_hkvd(sens, 7).tolist()


@pytest.mark.parametrize("row_block", [256, 2])  # one block of rows, or blocks with a short last one
def test_attention_mass_is_the_rows_causal_softmax_averaged_over_heads_and_rows(monkeypatch, row_block):
    monkeypatch.setattr(selection, "ROW_BLOCK", row_block)
    torch.manual_seed(0)
    H, Hkv, N, D = 6, 2, 12, 8
    q, K = torch.randn(H, 3, D), torch.randn(Hkv, N, D)
    q_pos = torch.tensor([5, 9, 11])
    expected = torch.zeros(N)
    for h in range(H):
        for r, p in enumerate(q_pos.tolist()):
            scores = K[h // (H // Hkv), : p + 1] @ q[h, r] / math.sqrt(D)   # the keys row r may see
            expected[: p + 1] += scores.softmax(dim=0) / (H * 3)
    keys = torch.tensor([0, 4, 7, 10, 11])
    assert torch.allclose(attention_mass(q, q_pos, K, keys), expected[keys], atol=1e-6)
    assert torch.allclose(attention_mass(q, q_pos, K, torch.arange(N)).sum(), torch.tensor(1.0), atol=1e-5)
    # a key after every row gets nothing
    assert attention_mass(q[:, :1], q_pos[:1], K, torch.tensor([6, 11])).tolist() == [0.0, 0.0]


def test_sensitivity_layers_sit_a_sixth_to_three_tenths_deep():
    assert list(sensitivity_layers(30)) == [5, 6, 7, 8]
    assert list(sensitivity_layers(32)) == [5, 6, 7, 8]
    assert list(sensitivity_layers(4)) == [1]
    assert list(sensitivity_layers(1)) == [0]


def test_context_sensitivity_is_relative_movement_summed_over_the_layers():
    values = torch.ones(3, 2, 4, 8)      # [L, Hkv, T, D]: energy 16 per token in every layer
    probed = values.clone()
    probed[1, 0, 2, 0] += 2.0            # token 2 moves by 4 (squared) in layer 1
    probed[2, 1, 3, :] += 1.0            # token 3 moves by 8 in layer 2
    probed[0, :, 0, :] += 5.0            # layer 0 is outside the window: ignored
    got = context_sensitivity(values, probed, range(1, 3))
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 4 / 16, 8 / 16]))


def test_funnel_spends_the_ratio_budget_in_two_stages():
    for r, want in [(0.15, (0.2112, 0.1267)), (0.08, (0.1671, 0.0468)), (0.05, (0.1403, 0.0156))]:
        layers, (early, late) = funnel_schedule(r, 30)
        assert layers == (0, 8)
        assert 8 * early + 21 * late == pytest.approx(r * 29)    # as many token-layers as r at every layer
        assert (early, late) == pytest.approx(want, abs=1e-4)
    for r, share in FIRST_STAGE:                                 # the chosen first stages, exactly
        assert funnel_schedule(r, 30)[1][0] == pytest.approx(share)
    widths = [funnel_schedule(r, 30)[1][0] / r for r in (0.15, 0.08, 0.05)]
    assert widths == sorted(widths)                              # the lower the ratio, the wider the first stage


def test_funnel_is_one_stage_at_large_ratios_and_a_full_prefill_at_one():
    assert funnel_schedule(1.0, 30) == ((0, 8), (1.0, 1.0))
    assert funnel_schedule(0.5, 30) == ((0, 8), (0.5, 0.5))  # past about 0.26 both stages keep r
    early, late = funnel_schedule(0.03, 30)[1]
    assert late == 0.0 and 8 * early == pytest.approx(0.03 * 29)  # a tiny budget goes to the first stage
    assert funnel_schedule(0.0, 30)[1] == (0.0, 0.0)
    previous = (0.0, 0.0)
    for r in [i / 100 for i in range(101)]:                  # both stages grow with the ratio
        _, stages = funnel_schedule(r, 30)
        assert stages[0] >= stages[1] >= 0.0 and stages[0] >= previous[0] and stages[1] >= previous[1]
        assert 8 * stages[0] + 21 * stages[1] == pytest.approx(r * 29)
        previous = stages


def test_funnel_of_a_shallow_model_is_layer_zero_alone():
    assert funnel_schedule(0.15, 1) == ((0,), (0.15,))
    assert funnel_schedule(0.15, 2) == ((0,), (0.15,))       # its middle check would be its last layer
    assert funnel_schedule(0.15, 4)[0] == (0, 1)
