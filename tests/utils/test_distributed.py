import pytest

from nemo_aligner.utils.distributed import ParallelConfigError, validate_parallel_layout


@pytest.mark.parametrize("world,tp,pp,layers,dp", [(8, 2, 2, 4, 2), (2, 1, 2, 4, 1), (1, 1, 1, 3, 1), (6, 3, 1, None, 2)])
def test_valid_layouts(world, tp, pp, layers, dp):
    assert validate_parallel_layout(world, tp, pp, layers) == dp


@pytest.mark.parametrize("world,tp,pp,layers,needle", [
    (3, 2, 1, 4, "world size 3 is not divisible"),
    (4, 1, 2, 3, "model.num_layers=3 is not divisible by pipeline_model_parallel_size=2"),
    (4, 0, 1, 4, "must be >= 1"),
])
def test_invalid_layouts(world, tp, pp, layers, needle):
    with pytest.raises(ParallelConfigError, match=needle):
        validate_parallel_layout(world, tp, pp, layers)
