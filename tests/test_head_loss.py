"""The fused head + cross-entropy equals lm_head(h) followed by F.cross_entropy, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.head_loss import IGNORE_INDEX, LinearCrossEntropySum, fused_head_applies, head_cross_entropy_sum
from models.transformer import Transformer
from tests.model_helpers import moe_cfg


def _reference(h, weight, labels):
    return F.cross_entropy((h @ weight.t()).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_fused_loss_and_grads_match_plain(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(50, 24, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[[0, 7, 36]] = IGNORE_INDEX
    ref = _reference(h, w, labels)
    gh, gw = torch.autograd.grad(ref * 3.0, (h, w))
    out = LinearCrossEntropySum.apply(h, w, labels, chunk, True)
    fh, fw = torch.autograd.grad(out * 3.0, (h, w))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-6)
    assert fh[[0, 7, 36]].abs().max() == 0  # ignored tokens get no gradient


def test_all_tokens_ignored_gives_zero_loss_and_grads():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    labels = torch.full((6,), IGNORE_INDEX)
    out = LinearCrossEntropySum.apply(h, w, labels, 4, True)
    out.backward()
    assert float(out.detach()) == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_no_grad_and_frozen_weight():
    torch.manual_seed(1)
    head = nn.Linear(8, 12, bias=False)
    h = torch.randn(2, 5, 8)
    labels = torch.randint(0, 12, (2, 5))
    with torch.no_grad():
        loss, count = head_cross_entropy_sum(head, h, labels)
    torch.testing.assert_close(loss, _reference(h.reshape(-1, 8), head.weight, labels.flatten()))
    assert int(count) == 10
    head.weight.requires_grad_(False)
    h.requires_grad_(True)
    loss, _ = head_cross_entropy_sum(head, h, labels)
    loss.backward()
    ref_h = h.detach().clone().requires_grad_(True)
    _reference(ref_h.reshape(-1, 8), head.weight, labels.flatten()).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)


def test_bf16_autocast_close_to_plain():
    torch.manual_seed(2)
    head = nn.Linear(16, 32, bias=False)
    h = torch.randn(20, 16, requires_grad=True)
    labels = torch.randint(0, 32, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = head_cross_entropy_sum(head, h, labels)
        ref = F.cross_entropy(head(h).float(), labels, reduction="sum")
    assert loss.dtype == torch.float32
    fused = torch.autograd.grad(loss, (h, head.weight))
    plain = torch.autograd.grad(ref, (h, head.weight))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def test_fused_path_only_for_plain_heads():
    head = nn.Linear(4, 6, bias=False)
    assert fused_head_applies(head)
    assert not fused_head_applies(nn.Linear(4, 6, bias=True))
    handle = head.register_forward_hook(lambda *a: None)
    assert not fused_head_applies(head)  # hooks (FSDP on the head, probes) must see the forward
    handle.remove()
    assert fused_head_applies(head)


def test_transformer_fused_equals_plain_head_with_mtp():
    """The whole model: fused head (default) vs plain head (forced by a hook) give the same loss and grads."""
    torch.manual_seed(3)
    model = Transformer(moe_cfg(num_nextn_predict_layers=1))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    out = model(ids, labels)
    loss = out.loss(0.3)
    fused = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    handle = model.lm_head.register_forward_hook(lambda *a: None)
    out_plain = model(ids, labels)
    plain = torch.autograd.grad(out_plain.loss(0.3), list(model.parameters()), allow_unused=True)
    handle.remove()
    torch.testing.assert_close(out.lm_loss_sum, out_plain.lm_loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mtp_loss_sums, out_plain.mtp_loss_sums, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), fused, plain):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
