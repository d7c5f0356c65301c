"""GPU path: the torch backend on CUDA tensors (cuSPARSE CSR, Triton BSR for fp16/bf16).

Skipped without a GPU. The same dispatch and torch.sparse code runs on CPU tensors in test_modules.py."""
import pytest
import torch
import torchvision
from torch.nn.utils import prune

import sparsert
from sparsert import SparseConv2d, SparseLinear
from sparsert.ops import CALLS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def _pruned_resnet18(amount):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    convs = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=amount)
    for m, name in convs:
        prune.remove(m, name)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_resnet18_on_cuda_matches_dense(dtype):
    model = _pruned_resnet18(0.9)
    sparse = sparsert.sparsify(model).to("cuda", dtype)
    dense = model.to("cuda", dtype)
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=dtype)
    before = sum(v for k, v in CALLS.items() if k.startswith("torch."))
    with torch.no_grad():
        out, ref = sparse(x), dense(x)
    assert sum(v for k, v in CALLS.items() if k.startswith("torch.")) > before  # sparse path ran
    assert all(m.values.is_cuda and m.values.dtype == dtype
               for m in sparse.modules() if isinstance(m, (SparseConv2d, SparseLinear)))
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", [16, 32, 64])
def test_bsr_linear_uses_triton(dtype, block):
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256)
    with torch.no_grad():  # block-pruned mask: whole block x block tiles are zero
        keep = (torch.rand(256 // block, 512 // block) < 0.3).repeat_interleave(block, 0).repeat_interleave(block, 1)
        lin.weight.mul_(keep)
    layer = SparseLinear.from_dense(lin, format=f"bsr{block}").to("cuda", dtype)
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    before = CALLS["torch.triton_bsr_dense_mm"]
    out = layer(x)
    assert CALLS["torch.triton_bsr_dense_mm"] == before + 1
    ref = torch.nn.functional.linear(x.float(), lin.weight.cuda(), lin.bias.cuda())
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_module_moves_back_to_cpu():
    lin = torch.nn.Linear(64, 32)
    prune.l1_unstructured(lin, "weight", 0.9)
    prune.remove(lin, "weight")
    layer = SparseLinear.from_dense(lin).cuda()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x.cuda()).cpu(), lin(x), rtol=1e-4, atol=1e-5)
    layer = layer.cpu()
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)
