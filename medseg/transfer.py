"""Transfer learning: start a training from the weights of a trained model.

``train.init_from`` names a medseg checkpoint (``best.pt``, ``last.pt``) or a model in MLflow
(``models:/<name>/<version>``, ``runs:/<id>/model``). ``train.init_part`` takes all its weights
(``all``: a task like the source one; the output layer is left out where the number of classes
differs) or the encoder's only (``encoder``: a new task on similar images). For a dataset with
few cases, ``train.freeze_epochs`` keeps the taken weights fixed for the first epochs, so the
new parts learn first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from medseg.config import NetworkConfig
from medseg.errors import ModelError

log = logging.getLogger(__name__)

# Where each network's encoder lives (parameter name prefixes, after any 2D wrapper's "net.").
ENCODER_PREFIXES = {
    "dynunet": ("input_block.", "downsamples.", "bottleneck."),
    "resenc": ("encoder.",),
    "flexunet": ("encoder.",),
    "segresnet": ("convInit.", "down_layers."),
}


@dataclass(frozen=True)
class Taken:
    """The names of the parameters taken from the source, and of those left as initialized."""

    taken: tuple[str, ...]
    left: tuple[str, ...]


def _is_encoder(name: str, network: str) -> bool:
    plain = name.removeprefix("net.")
    return plain.startswith(ENCODER_PREFIXES[network])


def take_weights(net: nn.Module, network: NetworkConfig, source: nn.Module, source_network: NetworkConfig,
                 part: str, where: str) -> Taken:
    """Copy ``source``'s weights into ``net``: every tensor of the same name and shape (``all``), or
    those of the encoder only (``encoder``). Raise ``ModelError`` where the networks differ."""
    if source_network.name != network.name:
        raise ModelError(f"{where}: expected a '{network.name}' network to start from, found '{source_network.name}'")
    if part == "encoder" and network.name not in ENCODER_PREFIXES:
        raise ModelError(f"train.init_part=encoder: the '{network.name}' network has no separate encoder; "
                         f"expected one of {sorted(ENCODER_PREFIXES)}, or init_part=all")
    own = net.state_dict()
    theirs = source.state_dict()
    wanted = [k for k in own if part == "all" or _is_encoder(k, network.name)]
    missing = [k for k in wanted if k not in theirs]
    if missing:
        raise ModelError(f"{where}: the model lacks {len(missing)} of the weights to take, e.g. {missing[0]} "
                         "(a network with other settings?)")
    mismatched = [k for k in wanted if theirs[k].shape != own[k].shape]
    if part == "encoder" and mismatched:
        raise ModelError(f"{where}: encoder weight {mismatched[0]} has shape {tuple(theirs[mismatched[0]].shape)}, "
                         f"expected {tuple(own[mismatched[0]].shape)} (other channels or stages?)")
    taken = [k for k in wanted if k not in mismatched]
    if mismatched:
        log.warning("%s: left out %d weights of another shape (the output layer for another label set?): %s",
                    where, len(mismatched), ", ".join(mismatched[:4]))
    own.update({k: theirs[k] for k in taken})
    net.load_state_dict(own)
    left = tuple(k for k in own if k not in taken)
    log.info("%s: took %d weights (%s), left %d as initialized", where, len(taken), part, len(left))
    return Taken(tuple(taken), left)


def drop_gradients(net: nn.Module, names: frozenset[str]) -> None:
    """Keep the named parameters fixed for this step: their gradients are dropped after the
    backward pass, so the optimizer leaves them (and their moments and weight decay) alone.
    Unlike turning ``requires_grad`` off, this keeps DistributedDataParallel's hooks intact."""
    if not names:
        return
    for name, param in net.named_parameters():
        if name in names:
            param.grad = None


def load_source(ref: str, tracking_uri: str | None) -> tuple[nn.Module, NetworkConfig]:
    """The network and network config of a checkpoint or MLflow model, on the CPU."""
    from medseg.modelio import load_model

    source, spec = load_model(ref, torch.device("cpu"), tracking_uri)
    return source, spec.network
