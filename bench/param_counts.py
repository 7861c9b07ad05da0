"""Trainable parameters of every adaptation method, one target structure, on SwinUNETR-48 (the 62M network of
the FSEFT papers) and on the tiny UNet of the demo, beside the reference code's count for the same placement
(computed by instantiating the reference code; see the developers' method notes). A method that does not apply
to a backbone (AdaptFormer needs transformer blocks) shows no count there; DoRA and IA³ have no reference count.

    python bench/param_counts.py
"""

from __future__ import annotations

from results_file import write_result

from fsseg.adapters import adapt_model, list_methods
from fsseg.errors import FssegError
from fsseg.models import create_model
from fsseg.templates import load_template

MODELS = {"swinunetr": "SwinUNETR-48", "unet_tiny": "tiny UNet (demo)"}
# The reference code's trainable parameters on SwinUNETR-48 for one structure (FSEFT: fewshot-finetuning).
REFERENCE = {
    "lp": 49,
    "adapter": 124_465,
    "ft-last": 209_713,
    "ft": 62_186_659,
    "scratch": 62_186_659,
    "lora": 69_169,
    "bias": 210_739,
    "affine-ln": 17_329,
    "adaptformer": 47_697,
}
QUESTION = (
    "How many parameters does each adaptation method train, for one target structure? Counted on the "
    "networks as fsseg builds them, beside the reference code's count for the same placement."
)
COMMAND = "python bench/param_counts.py"
COLUMNS = {
    "model": "network",
    "method": "method",
    "trainable": "trainable",
    "total": "total",
    "reference": "reference code",
}


def main() -> None:
    template = load_template()
    rows = []
    for name, label in MODELS.items():
        base = create_model(name, num_classes=len(template))
        for method in sorted(list_methods()):
            try:
                trainable, total = adapt_model(base, template, ["liver"], method).parameter_counts()
            except FssegError:  # not applicable to this backbone
                trainable, total = None, None
            rows.append(
                {
                    "model": label,
                    "method": method,
                    "trainable": trainable,
                    "total": total,
                    "reference": REFERENCE.get(method),
                }
            )
            print(f"{label:<18} {method:<12} {trainable if trainable is not None else '-':>12}", flush=True)
    print(f"wrote {write_result('param_counts', rows, QUESTION, COMMAND, COLUMNS)}")


if __name__ == "__main__":
    main()
