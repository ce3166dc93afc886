"""Deployment exports of models with spinal layers: torch.export, AOTInductor (CPU), ONNX (onnxruntime).

Every exported model is run on a batch size other than the one it was traced with (the batch
dimension is dynamic) and held to contract §4 against the float64 reference.
"""
import pytest
import torch
from contract import ATOL_PER_SCALE, assert_within_contract, make_config, random_params
from torch import nn

from spinal_ops import ACTIVATIONS, SpinalLinear, available_backends
from spinal_ops.reference import spinal_forward

BATCH = torch.export.Dim("batch")


class Model(nn.Module):
    """A spinal head behind a dense layer, as in a classifier."""

    def __init__(self, spinal: SpinalLinear):
        super().__init__()
        self.features = nn.Linear(5, spinal.in_features)
        self.head = spinal

    def forward(self, x):
        return self.head(torch.relu(self.features(x)))


def make_model(out_features=3, activation="relu", bias=True, backend="auto", seed=0) -> Model:
    """in_features 7, split 4, three layers: the windows of layers 1 and 2 wrap past the end."""
    config = make_config(in_features=7, out_features=out_features, activation=activation, bias=bias)
    spinal = SpinalLinear(7, out_features, layer_width=5, num_layers=3, activation=activation, bias=bias, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in random_params(config, generator)._asdict().items():
            if value is not None:
                getattr(spinal, name).copy_(value)
    torch.manual_seed(seed)
    return Model(spinal).eval()


def assert_matches_reference(model: Model, x: torch.Tensor, got: torch.Tensor, label: str) -> None:
    """``got`` (float32 output of an exported ``model`` on ``x``) against the float64 reference."""
    with torch.no_grad():
        features = torch.relu(model.features(x))
        params = model.head.params()
        expected = spinal_forward(features.double(), type(params)(*(p if p is None else p.double() for p in params)), model.head.config)
        eager = spinal_forward(features, params, model.head.config)
    assert_within_contract(label, got, expected, eager, torch.float32)


def test_no_spinal_op_has_a_global_decomposition():
    # Inductor refuses (under CI=1) to fall back to an op that has one, and would otherwise
    # decompose it: the fused ops must stay single calls in torch.compile and AOTInductor.
    for name in ("native_forward", "native_backward", "hoisted_forward", "hoisted_backward", "triton_forward", "triton_backward"):
        if hasattr(torch.ops.spinal_ops, name):
            assert not torch._decomp.get_decompositions([getattr(torch.ops.spinal_ops, name).default]), name


def test_torch_export_keeps_the_fused_op_and_its_numbers():
    model = make_model()
    x = torch.randn(4, 5)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: BATCH},))
    assert "spinal_ops.native_forward" in program.graph_module.code
    assert "spinal_ops.native_forward" in program.run_decompositions().graph_module.code
    other = torch.randn(9, 5)
    with torch.no_grad():
        got = program.module()(other)
        assert torch.equal(got, model(other))
    assert_matches_reference(model, other, got, "torch.export")


@pytest.mark.slow
def test_aot_inductor_package_runs_on_cpu(tmp_path):
    model = make_model(activation="gelu")
    program = torch.export.export(model, (torch.randn(4, 5),), dynamic_shapes=({0: BATCH},))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    other = torch.randn(9, 5)
    got = loaded(other)
    with torch.no_grad():
        torch.testing.assert_close(got, model(other), rtol=0, atol=ATOL_PER_SCALE[torch.float32])
    assert_matches_reference(model, other, got, "AOTInductor")


# ---- ONNX ---------------------------------------------------------------------------------

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# What a spinal layer may become: products, windows, the bias/recurrence adds, activations.
STANDARD_OPS = {
    "Gemm", "MatMul", "Add", "Mul", "Div", "Sub", "Slice", "Concat", "Reshape", "Gather", "Constant",
    "Relu", "LeakyRelu", "Gelu", "Sigmoid", "Tanh", "Erf", "Pow", "Identity",
}


def export_onnx(model: Model, path) -> "onnx.ModelProto":
    torch.onnx.export(model, (torch.randn(4, 5),), str(path), dynamo=True, dynamic_shapes=({0: BATCH},), verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("variant", ["projection", "no_projection", "no_bias"])
def test_onnx_export_is_standard_ops_and_matches_reference(tmp_path, activation, variant):
    model = make_model(out_features=None if variant == "no_projection" else 3, activation=activation, bias=variant != "no_bias")
    proto = export_onnx(model, tmp_path / "model.onnx")
    ops = [(node.domain, node.op_type) for node in proto.graph.node]
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    op_types = {op_type for _, op_type in ops}
    assert op_types <= STANDARD_OPS, op_types - STANDARD_OPS
    assert op_types & {"Gemm", "MatMul"} and "Slice" in op_types and "Concat" in op_types
    other = torch.randn(9, 5)
    assert_matches_reference(model, other, run_onnx(tmp_path / "model.onnx", other), f"onnxruntime {activation} {variant}")


def test_onnx_export_of_the_triton_op(tmp_path):
    if not available_backends()["triton"]:
        pytest.skip(f"triton backend: {available_backends()['triton'].reason}")
    model = make_model(backend="triton")
    program = torch.export.export(model, (torch.randn(4, 5),), dynamic_shapes=({0: BATCH},))
    assert "spinal_ops.triton_forward" in program.graph_module.code
    export_onnx(model, tmp_path / "model.onnx")
    other = torch.randn(9, 5)
    assert_matches_reference(model, other, run_onnx(tmp_path / "model.onnx", other), "onnxruntime triton op")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_onnx_exporter_also_gives_standard_ops(tmp_path):
    model = make_model(activation="leaky_relu")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(4, 5),), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    proto = onnx.load(str(path))
    op_types = {node.op_type for node in proto.graph.node}
    assert op_types <= STANDARD_OPS, op_types - STANDARD_OPS
    other = torch.randn(9, 5)
    assert_matches_reference(model, other, run_onnx(path, other), "onnxruntime, TorchScript exporter")


def test_onnx_export_of_an_exported_program_names_the_fused_op(tmp_path):
    """What cannot be exported says so: an ExportedProgram already holds spinal_ops::native_forward,
    which has no ONNX translation (the module itself exports, above)."""
    if not available_backends()["cpu"]:
        pytest.skip(f"cpu backend: {available_backends()['cpu'].reason}")
    program = torch.export.export(make_model(backend="cpu"), (torch.randn(4, 5),))
    with pytest.raises(torch.onnx.OnnxExporterError, match=r"spinal_ops\.native_forward"):
        torch.onnx.export(program, (torch.randn(4, 5),), str(tmp_path / "model.onnx"), dynamo=True, verbose=False)
