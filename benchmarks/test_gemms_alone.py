"""The GEMM-only comparison (gemms_alone.py) times the products the FLOP counts describe: its spinal
sequence, per layer and by window, makes exactly SpinalConfig.step_flops, and its dense sequence
dense_baseline_step_flops, in every mode."""
import pytest
from torch.utils.flop_counter import FlopCounterMode

from gemms_alone import dense_gemms, spinal_gemms
from spinal_ops.config import MODES, SpinalConfig

CONFIGS = {
    "partitioned": SpinalConfig(in_features=12, layer_width=3, num_layers=5, split_size=4, out_features=2),
    "wrapping": SpinalConfig(in_features=10, layer_width=2, num_layers=4, split_size=4, out_features=3),
    "one_layer": SpinalConfig(in_features=6, layer_width=4, num_layers=1, split_size=3, out_features=5),
}


def counted_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_gemm_sequences_make_the_analytic_flops(name, mode):
    config, batch = CONFIGS[name], 7
    for grouped in (False, True):
        assert counted_flops(spinal_gemms(config, batch, mode, grouped)) == config.step_flops(batch, mode)
    assert counted_flops(dense_gemms(config, batch, mode)) == config.dense_baseline_step_flops(batch, mode)
