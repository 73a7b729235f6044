"""Device and dtype: where a Program's tensors live and in which floating-point type.

The recipe's `runtime: {device, dtype}` is resolved here once, so asking for a device that
does not exist fails with one line before anything is loaded. The dtype is fixed when the
model is captured: Hugging Face models upcast norms and rotary embeddings to fp32 and cast
back, and torch.export records those casts with concrete dtypes (and the cleanup pass folds
the ones that were no-ops), so a graph captured in one dtype is not the graph of another.
The device is not: a captured graph names its device only in constants (`aten.to.device`,
factory ops, metadata asserts), which `graph_on` rewrites while it moves the weights. That is
how an artifact stays device-independent (saved from a CPU copy) and loads onto any device.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import fx

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.compiler.recipe import Recipe  # recipe imports the passes, which import this module

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for `runtime.device`, or one line saying why it cannot be used."""
    if str(name).split(":")[0] not in DEVICES:
        raise LmforgeError(f"runtime.device must be one of {', '.join(DEVICES)} (got {str(name)!r})")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        where = "this torch build has no CUDA device" if torch.version.cuda is None else "no CUDA device is visible"
        raise LmforgeError(f"runtime.device is 'cuda' but {where} (torch {torch.__version__})")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for `runtime.dtype` (float32, bfloat16 or float16)."""
    text = str(name).removeprefix("torch.")
    if text not in DTYPES:
        raise LmforgeError(f"runtime.dtype must be one of {', '.join(DTYPES)} (got {text!r})")
    return getattr(torch, text)


def module_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating-point dtype of a model's first floating-point weight."""
    weight = next((t for t in module.parameters() if t.is_floating_point()), None)
    if weight is None:
        weight = next((t for t in module.buffers() if t.is_floating_point()), torch.empty(0))
    return weight.device, weight.dtype


def graph_device(graph_module: fx.GraphModule) -> torch.device:
    """The device a program's weights are on (cpu for a graph without weights)."""
    weight = next(iter(graph_module.buffers()), None)
    return weight.device if weight is not None else torch.device("cpu")


def _retarget(value: object, device: torch.device) -> object:
    return device if isinstance(value, torch.device) else value


def graph_on(graph_module: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of `graph_module` whose weights are on `device` and whose device constants name
    it (in `torch.cond` branches too). Tensors already there are shared, not copied; the
    source graph is left as it was."""
    graph = copy.deepcopy(graph_module.graph)
    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, lambda value: _retarget(value, device))
        node.kwargs = fx.node.map_aggregate(node.kwargs, lambda value: _retarget(value, device))
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op != "get_attr" or hasattr(root, node.target):
            continue
        value = getattr(graph_module, node.target)
        if isinstance(value, fx.GraphModule):
            root.add_module(node.target, graph_on(value, device))
        elif isinstance(value, torch.Tensor):
            root.register_buffer(node.target, value.to(device))
        else:
            setattr(root, node.target, value)
    moved = fx.GraphModule(root, graph)
    moved.recompile()
    return moved


def place_model(model: torch.nn.Module, device: str | None, dtype: str | None) -> torch.nn.Module:
    """`model` on `device` in `dtype` (None: as it is). Like a Hugging Face pipeline given a
    device, this moves the model itself (`nn.Module.to` works in place): a second copy of an
    8 B model would not fit where the first one just did."""
    current_device, current_dtype = module_placement(model)
    target_device = resolve_device(device) if device is not None else current_device
    target_dtype = resolve_dtype(dtype) if dtype is not None else current_dtype
    if (target_device.type, target_dtype) != (current_device.type, current_dtype):
        model.to(device=target_device, dtype=target_dtype)
    return model


def with_runtime(recipe: Recipe, device: str | None = None, dtype: str | None = None) -> Recipe:
    """`recipe` with `runtime.device` / `runtime.dtype` replaced where given (the `device=` and
    `dtype=` arguments of `optimize` and `load`, `lmforge run --device`), checked the same way.
    The resulting device is checked here, before any model is loaded."""
    update = {}
    if device is not None:
        update["device"] = resolve_device(device).type
    if dtype is not None:
        update["dtype"] = str(resolve_dtype(dtype)).removeprefix("torch.")
    if update:
        recipe = recipe.model_copy(update={"runtime": recipe.runtime.model_copy(update=update)})
    if recipe.runtime.device is not None:
        resolve_device(recipe.runtime.device)
    return recipe
