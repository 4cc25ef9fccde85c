"""Guidance weights against the DESIGN.md table, computed independently here by hand."""
import pytest
import torch

from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance, mix_from_gammas, mixing_matrix


def test_corrsynth_weights_and_recompute_after_a_row_leaves():
    gd = Guidance.corrsynth([0, 0, 0, 0, 1, 1], g=2.5)
    gam = gd.gamma_matrix(list(range(6)))
    w4 = (2.5 - 1) / 3
    for m in range(4):
        for n in range(4):
            assert gam[m, n].item() == pytest.approx(0.0 if m == n else w4)
    assert gam[4, 5].item() == pytest.approx(1.5) and gam[5, 4].item() == pytest.approx(1.5)
    assert gam[:4, 4:].abs().sum() == 0 and gam[4:, :4].abs().sum() == 0
    # row 2 finished: the three remaining rows of group 0 share (g - 1) / 2
    gam = gd.gamma_matrix([0, 1, 3, 4, 5])
    assert gam[0, 1].item() == pytest.approx(0.75) and gam[2, 0].item() == pytest.approx(0.75)
    # group 1 down to one row: plain sampling for it
    gam = gd.gamma_matrix([0, 1, 3, 5])
    assert gam[3].abs().sum() == 0


def test_m_corrsynth_cross_and_intra_label_weights():
    labels = ["a", "a", "b", "c"]
    gd = Guidance.m_corrsynth([0, 0, 0, 0], labels, gamma=0.6, delta=0.3)
    gam = gd.gamma_matrix([0, 1, 2, 3])
    # row 0 (label a): one same-label row (1) -> δ/1; two cross-label rows (2, 3) -> γ/2 each
    assert gam[0].tolist() == pytest.approx([0.0, 0.3, 0.3, 0.3])
    # row 2 (label b): no same-label rows; three cross -> γ/3
    assert gam[2].tolist() == pytest.approx([0.2, 0.2, 0.0, 0.2])


def test_cfg_leader_with_several_shadows_and_mix_form():
    gd = Guidance.cfg([0, 0, 0], shadow_of=[None, 0, 0], g=3.0)
    gam = gd.gamma_matrix([0, 1, 2])
    assert gam[0].tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert gam[1:].abs().sum() == 0  # shadows are not guided (their token is the leader's)
    mix = mix_from_gammas(gam)
    assert mix[0].tolist() == pytest.approx([3.0, -1.0, -1.0])
    assert mix.sum(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0])  # rows of mix sum to 1


def test_no_guidance_gives_no_mix():
    assert mixing_matrix(None, [0, 1]) is None
    assert mixing_matrix(Guidance.corrsynth([0, 0], g=1.0), [0, 1]) is None  # g = 1: no contrast


def test_explicit_matrix_restricted_to_active_rows_of_a_group():
    gammas = torch.tensor([[0, 0.5, 0.2], [0.1, 0, 0.4], [0.3, 0.3, 0]])
    gd = Guidance.explicit([0, 0, 1], gammas)
    gam = gd.gamma_matrix([0, 1, 2])
    assert torch.allclose(gam, torch.tensor([[0, 0.5, 0], [0.1, 0, 0], [0, 0, 0]]))


@pytest.mark.parametrize("make, message", [
    (lambda: Guidance.corrsynth([0, 1], g=2.0), "at least 2 rows"),
    (lambda: Guidance.corrsynth([0, 0], g=0.5), "scale"),
    (lambda: Guidance.corrsynth([0, 0], g=float("nan")), "scale"),
    (lambda: Guidance.m_corrsynth([0, 0], ["a", "b"], gamma=-1, delta=0), "gamma"),
    (lambda: Guidance.m_corrsynth([0, 0], ["a", "b"], gamma=1, delta=1e9), "delta"),
    (lambda: Guidance.m_corrsynth([0, 0], ["a"], gamma=1, delta=0), "one label per row"),
    (lambda: Guidance.cfg([0, 1], shadow_of=[None, 0], g=2), "leader's group"),
    (lambda: Guidance.cfg([0, 0], shadow_of=[1, 0], g=2), "sample row"),
    (lambda: Guidance.explicit([0, 0], torch.zeros(3, 3)), r"\[2, 2\]"),
])
def test_bad_guidance_raises_clear_errors(make, message):
    with pytest.raises(DivgenError, match=message):
        make()
