"""The tile-kernel comparison (tile_gemm_vs_blas.py) times the products of a training step: its
sequence makes SpinalConfig.step_flops less the forward's output projection (which runs on the
few-column kernel, not on either), and both kernels compute the same products on it."""
import pytest

from spinal_ops.config import SpinalConfig
from tile_gemm_vs_blas import harness, training_products

CONFIGS = {
    "projection": SpinalConfig(in_features=40, layer_width=24, num_layers=3, split_size=20, out_features=10),
    "no_projection": SpinalConfig(in_features=30, layer_width=16, num_layers=2, split_size=15, out_features=None),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_sequence_makes_the_training_flops(name):
    config, batch = CONFIGS[name], 9
    flops = sum(2 * m * n * k for products in training_products(config, batch).values() for *_, m, n, k in products)
    projection = 2 * batch * config.hidden_features * (config.out_features or 0)
    assert flops == config.step_flops(batch, "train") - projection


def test_both_kernels_compute_the_same_products():
    module = harness()
    if not module.instructions():
        pytest.skip("the tile kernel does not run on this CPU")
    for products in training_products(CONFIGS["projection"], batch=37).values():
        assert module.Sequence(products).max_difference() < 1e-4
