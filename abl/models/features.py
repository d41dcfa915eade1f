"""Intermediate feature maps of the project's models, for the defenses and attacks that
work on them (NAD's attention maps, DFST's style statistics and compromised neurons)."""

from __future__ import annotations

import torch

#: modules that only normalise, activate or pool: a group's output is the last module before them
_NOT_A_GROUP = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.AvgPool2d,
                torch.nn.Dropout, torch.nn.Identity)


def residual_groups(model: torch.nn.Module, image_size: int) -> list[torch.nn.Module]:
    """The modules whose outputs NAD distils: for each feature-map shape along
    ``model.body``, the last module (not a BatchNorm, activation or pooling) producing it.
    WRN-16-1 gives its three groups, a ResNet its four stages, the small CNN its convs."""
    shapes: dict[int, tuple[int, ...]] = {}
    children = list(model.body.children())  # type: ignore[union-attr]
    hooks = [c.register_forward_hook(lambda m, _i, out, k=i: shapes.__setitem__(k, tuple(out.shape[1:])))
             for i, c in enumerate(children)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    last: dict[tuple[int, ...], int] = {}
    for i, c in enumerate(children):
        if not isinstance(c, _NOT_A_GROUP) and len(shapes[i]) == 3:
            last[shapes[i]] = i
    return [children[i] for i in sorted(last.values())]


def group_outputs(model: torch.nn.Module, groups: list[torch.nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``groups`` (modules of ``model``) for the batch ``x``, in order, from
    one forward pass."""
    outs: dict[int, torch.Tensor] = {}
    hooks = [g.register_forward_hook(lambda _m, _i, out, k=i: outs.__setitem__(k, out)) for i, g in enumerate(groups)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [outs[i] for i in range(len(groups))]
