"""benchmarks/moe_layer.py: FLOP count, shape parsing, the agreement check and an end-to-end tiny run."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_layer.py"
_spec = importlib.util.spec_from_file_location("moe_layer_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_expert_flops_counts_swiglu_forward_and_backward():
    shape = bench.Shape(num_experts=8, top_k=2, d_model=4, d_ff=3)
    # 10 tokens * 2 = 20 rows; forward 2 * 20 * (4*6 + 3*4) = 1440; backward twice that.
    assert bench.expert_flops(10, shape) == 3 * 1440


@pytest.mark.parametrize("text", ["8x2x64", "8x2x64xa", "8x0x64x32", "2x4x64x32"])
def test_shape_parse_rejects_bad_entries(text):
    with pytest.raises(ValueError, match="--shapes"):
        bench.Shape.parse(text)


def test_shape_parse_and_presets():
    assert bench.Shape.parse("64x6x2048x1408") == bench.Shape(64, 6, 2048, 1408)
    for preset in bench.PRESETS.values():
        assert all(bench.Shape.parse(text) for text in preset["shapes"].split(","))


def _models(dtype=torch.float32):
    block_classes = bench.load_transformers_block()[:2]
    shape = bench.Shape(num_experts=4, top_k=2, d_model=16, d_ff=8)
    return bench.build_models(shape, device=torch.device("cpu"), dtype=dtype, block_classes=block_classes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agreement_check_passes_with_copied_weights(dtype):
    models = _models(dtype)
    x, grad = torch.randn(1, 32, 16, dtype=dtype), torch.randn(1, 32, 16, dtype=dtype)
    lines, ok = bench.check_agreement(models, x, grad)
    assert ok, lines
    assert sum(line.endswith(" ok") for line in lines) == 4  # 2 implementations x (output, input grad)


def test_agreement_check_catches_a_wrong_weight():
    models = _models()
    with torch.no_grad():
        models["transformers"].experts.down_proj[1] *= 1.1
    lines, ok = bench.check_agreement(models, torch.randn(1, 32, 16), torch.randn(1, 32, 16))
    assert not ok
    assert any("MISMATCH" in line for line in lines)


def test_main_prints_a_table_for_every_implementation(capsys):
    bench.main(["--device", "cpu", "--tokens", "64", "--shapes", "4x2x16x8,8x1x16x16", "--warmup", "0", "--iters", "1"])
    output = capsys.readouterr().out
    table = [line for line in output.splitlines() if line.startswith("| E=")]
    assert len(table) == 2 * 5
    for name in (bench.DENSE, bench.OURS, bench.OURS_EXPERTS, bench.HF_EAGER, bench.HF_GROUPED):
        assert sum(f"| {name} |" in line for line in table) == 2
    # The dense row is its own reference; transformers grouped_mm is its own reference.
    assert all(line.split("|")[5].strip() == "1.00" for line in table if f"| {bench.DENSE} |" in line)
    assert all(line.split("|")[6].strip() == "1.00" for line in table if f"| {bench.HF_GROUPED} |" in line)
    assert "MISMATCH" not in output


def test_cuda_without_a_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        bench.main(["--preset", "h100"])
    assert "--device cuda" in capsys.readouterr().err
