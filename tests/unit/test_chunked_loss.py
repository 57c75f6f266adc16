import torch
import torch.nn.functional as F

from posttrain.losses import IGNORE_INDEX, chunked_cross_entropy_sum, module_head, shift_labels, shift_labels_packed


def test_chunked_equals_unchunked_loss_and_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=False)
    hidden = torch.randn(3, 17, 32, requires_grad=True)
    labels = torch.randint(0, 1000, (3, 17))
    labels[0, :5] = IGNORE_INDEX
    labels[2, 10:] = IGNORE_INDEX
    full = F.cross_entropy(head(hidden).float().reshape(-1, 1000), labels.reshape(-1), reduction="sum")
    g_full = torch.autograd.grad(full, [hidden, head.weight])
    for chunk in (1, 7, 64, 4096):
        got = chunked_cross_entropy_sum(hidden, module_head(head), labels, chunk)
        assert abs(got.item() - full.item()) <= 1e-5 * abs(full.item())
        g = torch.autograd.grad(got, [hidden, head.weight])
        for a, b in zip(g, g_full):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_shift_labels_packed_never_crosses_examples():
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shift_labels(labels).tolist() == [[2, 3, 4, 5, 6, IGNORE_INDEX]]
    assert shift_labels_packed(labels, pos).tolist() == [[2, 3, IGNORE_INDEX, 5, 6, IGNORE_INDEX]]
