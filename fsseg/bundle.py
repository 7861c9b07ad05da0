"""What a MONAI bundle exported by fsseg-export-bundle runs besides MONAI's own components.

The bundle's preprocessing, inversion and writing are MONAI transforms named in its ``inference.json``; three
parts are fsseg's, so that the bundle's masks are fsseg-predict's: :class:`BundleNetwork` (the checkpoint's model,
or the adapted models, rebuilt from the description in the config; ``models/model.pt`` is its state dict),
:class:`BundleInferer` (fsseg's sliding window: two passes for frozen-backbone adapters, probabilities kept in
float16) and :class:`LabelMapd` (fsseg's label map from native-grid probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, cast

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import nn

from fsseg.adapters import Composition, adapt_model, get_method
from fsseg.config import from_dict
from fsseg.data.transforms import IMAGE
from fsseg.inference.predictor import (
    FrozenBackbone,
    InferenceSettings,
    LabelMap,
    Network,
    Predictor,
    prediction_network,
)
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import Template


class BundleNetwork(nn.Module):
    """The checkpoint's model (``adapters`` empty) or one adapted model per adapter, over the kept ``channels``.

    Args:
        arch: the base checkpoint's ``{"name", "kwargs"}``.
        template: the base checkpoint's template (as stored in checkpoints).
        adapters: per adapter its ``method``, ``options``, ``compose`` and ``structures`` (as adapter files hold them).
        channels: which of the concatenated output channels are predicted, in order.
        structures: their names.
    """

    def __init__(
        self, arch: dict, template: dict, adapters: Sequence[dict], channels: Sequence[int], structures: Sequence[str]
    ) -> None:
        super().__init__()
        template_ = Template.from_dict(template)
        base = create_model(arch["name"], num_classes=len(template_), **arch["kwargs"])
        self.adapted = bool(adapters)
        self.models = nn.ModuleList(
            [base]
            if not adapters
            else [
                adapt_model(
                    base,
                    template_,
                    spec["structures"],
                    spec["method"],
                    from_dict(get_method(spec["method"]).config_cls, spec["options"]),
                    from_dict(Composition, spec.get("compose") or {}),
                )
                for spec in adapters
            ]
        )
        self.channels, self.structures = list(channels), list(structures)

    def prediction_network(self) -> Network | FrozenBackbone:
        """What fsseg-predict slides over a scan for these models."""
        return prediction_network(list(self.models), self.channels, self.adapted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, *roi) windows -> (B, K, *roi) logits, in one pass."""
        network = self.prediction_network()
        return network.heads(network.features(x)) if isinstance(network, FrozenBackbone) else network(x)


class BundleInferer(Inferer):
    """fsseg's sliding window over a preprocessed scan: sigmoid probabilities (B=1, K, ...) as fsseg-predict
    computes them (kept in float16 between the window and the inversion, as there)."""

    def __init__(
        self,
        preprocessing: dict,
        overlap: float = 0.5,
        sw_batch_size: int | None = None,
        amp: bool = True,
        cpu_bf16: bool = False,
    ) -> None:
        super().__init__()
        self.preprocessing = Preprocessing.from_dict(preprocessing)
        self.settings = InferenceSettings(overlap=overlap, sw_batch_size=sw_batch_size, amp=amp, cpu_bf16=cpu_bf16)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> MetaTensor:
        # MONAI's evaluator hands the MetaTensor batch and the bundle's network
        image, bundle = cast(MetaTensor, inputs), cast(BundleNetwork, network)
        device = next(bundle.parameters()).device
        predictor = Predictor(bundle.prediction_network(), bundle.structures, self.preprocessing, device, self.settings)
        probabilities = predictor.model_space_probabilities({IMAGE: image[0]})
        return MetaTensor(probabilities.float()[None], meta=image.meta, applied_operations=image.applied_operations)


class LabelMapd(MapTransform):
    """Native-grid probabilities (K, X, Y, Z) -> one uint8 label map (1, X, Y, Z), ids 1..K, as fsseg-predict
    assigns them."""

    def __init__(self, keys: Sequence[str], threshold: float = 0.5, largest_component: bool = False) -> None:
        super().__init__(keys)
        self.settings = InferenceSettings(threshold=threshold, largest_component=largest_component)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities: Any = d[key]  # (K, X, Y, Z) tensor, a MetaTensor after Invertd
            labels = LabelMap(probabilities.shape[1:], self.settings)
            for k in range(probabilities.shape[0]):
                labels.add(k, torch.as_tensor(probabilities[k]).float().cpu().clamp(0, 1))
            meta = probabilities.meta if isinstance(probabilities, MetaTensor) else {}
            d[key] = MetaTensor(labels.label[None], meta=meta)
        return d
