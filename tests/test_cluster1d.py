import pytest
import torch

from qareg.cluster1d import INITS, initial_representatives, lloyd
from qareg.errors import ConfigError


def sum_of_squares(values, reps):
    return (values.double().unsqueeze(1) - reps.double().unsqueeze(0)).square().min(1).values.sum()


@pytest.mark.parametrize("method", INITS)
def test_inits_are_sorted_within_range_and_have_k_entries(method):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5000, generator=g)
    reps = initial_representatives(values, 7, method, torch.Generator().manual_seed(0))
    assert reps.shape == (7,)
    assert (reps[1:] >= reps[:-1]).all()
    assert reps.min() >= values.min() and reps.max() <= values.max()


def test_kmeanspp_is_deterministic_for_a_seed():
    values = torch.randn(2000, generator=torch.Generator().manual_seed(3))
    a = initial_representatives(values, 5, "kmeans++", torch.Generator().manual_seed(7))
    b = initial_representatives(values, 5, "kmeans++", torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_lloyd_reaches_a_fixed_point_where_each_representative_is_its_cluster_mean():
    values = torch.cat([torch.randn(3000) * 0.1 - 2, torch.randn(1000) * 0.3 + 1,
                        torch.rand(2000) * 4 - 2])
    start = initial_representatives(values, 6, "linear")
    reps = lloyd(values, start)
    v = values.double()
    nearest = (v.unsqueeze(1) - reps.unsqueeze(0)).abs().argmin(1)
    for j in range(6):
        members = v[nearest == j]
        if members.numel():
            assert abs(members.mean().item() - reps[j].item()) < 1e-9
    assert sum_of_squares(values, reps) <= sum_of_squares(values, start)


def test_lloyd_finds_well_separated_clusters():
    centres = torch.tensor([-3.0, 0.0, 5.0])
    values = centres.repeat_interleave(100) + torch.randn(300) * 0.01
    reps = initial_representatives(values, 3, "kmeans")
    assert torch.allclose(reps.float(), centres, atol=0.01)


def test_unknown_init_names_the_valid_ones():
    with pytest.raises(ConfigError, match="kmeans\\+\\+"):
        initial_representatives(torch.randn(10), 2, "random")
