"""--deepcompile (each decoder block through torch.compile, FSDP2's hooks outside it) trains
exactly as eager: the same losses, gradient norms and weights after two steps."""
from torch._dynamo.utils import counters

from eeyore.train import sft
from test_packing import _assert_same_runs, _flags, data  # noqa: F401  (data: the fixture)


def test_deepcompile_trains_as_eager(data, tmp_path):  # noqa: F811
    ckpt, sft_data, _ = data
    counters.clear()
    sft.main(_flags(ckpt, sft_data, tmp_path / "eager", "--input_key", "messages"))
    assert counters["stats"]["unique_graphs"] == 0
    sft.main(_flags(ckpt, sft_data, tmp_path / "compiled", "--input_key", "messages", "--deepcompile"))
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did go through the compiler
    _assert_same_runs(tmp_path / "eager", tmp_path / "compiled", ("loss", "grad_norm"))
