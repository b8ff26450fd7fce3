import pytest
from fedinterest.shared.noise_calibration import smallest_noise
from fedinterest.shared.privacy import gaussian_epsilon


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 8.0])
def test_smallest_noise_never_overspends_and_is_tight(epsilon):
    def spent(z):
        return gaussian_epsilon(z, 1e-5, count=3)

    z = smallest_noise(spent, epsilon)
    assert spent(z) <= epsilon
    assert spent(z / 1.005) > epsilon  # one bisection step less noise would pass the budget


def test_smallest_noise_out_of_reach():
    with pytest.raises(ValueError, match="out of reach"):
        smallest_noise(lambda z: 10.0 / z, 0.01, hi=50.0)
