"""``fsseg-inspect``: what a checkpoint (or adapter file) holds, without running it."""

from __future__ import annotations

from fsseg.adapters.artifact import KIND as ADAPTER_KIND
from fsseg.checkpoint import model_from_checkpoint


def describe(payload: dict, source: str) -> str:
    """A readable summary of an fsseg checkpoint or adapter file."""
    lines = [f"{source}: {payload.get('kind', 'checkpoint')}"]
    if payload.get("kind") == ADAPTER_KIND:
        counts = payload.get("parameters", {})
        lines += [
            f"  method: {payload['method']} {payload.get('options', {})}",
            f"  structures: {', '.join(payload['structures'])}",
            f"  trained tensors: {len(payload['state_dict'])} ({counts.get('trainable', '?'):,} of "
            f"{counts.get('total', '?'):,} parameters)"
            if counts
            else "",
            f"  base checkpoint sha256: {payload['base_sha256']}",
        ]
    else:
        model = model_from_checkpoint(payload, source)
        lines.append(f"  architecture: {payload['arch']['name']} {payload['arch']['kwargs']}")
        lines.append(f"  parameters: {sum(p.numel() for p in model.parameters()):,}")
        for group, params in model.parameter_groups().items():
            lines.append(f"    {group:<20} {sum(p.numel() for p in params):>12,}")
        template = payload["template"]
        lines.append(
            f"  template: {template['name']} ({len(template['structures'])} structures: "
            f"{', '.join(template['structures'][:8])}{', ...' if len(template['structures']) > 8 else ''})"
        )
        for key in ("epoch", "step", "source"):
            if key in payload:
                lines.append(f"  {key}: {payload[key]}")
    pre = payload.get("preprocessing", {})
    lines.append("  preprocessing: " + ", ".join(f"{k} {v}" for k, v in pre.items()))
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in payload.get("versions", {}).items()))
    return "\n".join(line for line in lines if line)
