"""Universal structure templates: ordered structure names with stable ids, and the name aliases.

A template fixes the output channels of a foundation model: structure ``id`` k is channel ``k - 1``.
Templates and aliases are data files next to this module; adding one needs no code.

>>> template = load_template("fseft29")
>>> template.channel("gall")  # an alias of "gallbladder"
3
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fsseg.errors import ConfigError
from fsseg.outputs import check_file_name

DEFAULT_TEMPLATE = "fseft29"
_DATA_DIR = Path(__file__).resolve().parent


def normalize_name(name: str) -> str:
    """Lower-case a structure name and read spaces and hyphens as underscores."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


@lru_cache(maxsize=1)
def _alias_table() -> dict[str, str]:
    data = json.loads((_DATA_DIR / "aliases.json").read_text())
    table: dict[str, str] = {}
    for canonical, aliases in data["aliases"].items():
        for alias in aliases:
            table[normalize_name(alias)] = canonical
    return table


def canonical_name(name: str) -> str:
    """The canonical spelling of a structure name (``"gall"`` -> ``"gallbladder"``).

    Names without an alias are returned normalised; they may lie outside every template. A name that could not be
    part of a file name (a path separator, a control character) is refused: structure names name output files.
    """
    key = normalize_name(check_file_name(name, "structure name"))
    return _alias_table().get(key, key)


@lru_cache(maxsize=1)
def structure_groups() -> dict[str, tuple[str, ...]]:
    """Named groups of structures (``flare9``, ``abdomen``, ...) from ``groups.json``."""
    data = json.loads((_DATA_DIR / "groups.json").read_text())
    return {name: tuple(canonical_name(m) for m in members) for name, members in data["groups"].items()}


def expand_structures(names: list[str] | tuple[str, ...]) -> list[str]:
    """Canonical structure names, group names replaced by their members, repeats dropped, order kept."""
    out: list[str] = []
    for name in names:
        members = structure_groups().get(normalize_name(name), (canonical_name(name),))
        out.extend(m for m in members if m not in out)
    return out


@dataclass(frozen=True)
class Template:
    """An ordered list of structures; structure ``ids[i]`` is output channel ``i``."""

    name: str
    structures: tuple[str, ...]
    ids: tuple[int, ...]
    description: str = ""

    def __len__(self) -> int:
        return len(self.structures)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self.structures

    def channel(self, name: str) -> int | None:
        """The output channel of ``name`` (aliases accepted), or None when the template lacks it."""
        canonical = canonical_name(name)
        return self.structures.index(canonical) if canonical in self.structures else None

    def require_channel(self, name: str) -> int:
        """Like :meth:`channel`, but an unknown name raises with the closest valid names."""
        channel = self.channel(name)
        if channel is None:
            raise ConfigError(
                f"structure '{name}' is not in template '{self.name}'{suggest_name(name, self.structures)}"
            )
        return channel

    def to_dict(self) -> dict:
        """A JSON-serialisable description, as stored in checkpoints."""
        return {"name": self.name, "structures": list(self.structures), "ids": list(self.ids)}

    @classmethod
    def from_dict(cls, data: dict) -> Template:
        return cls(name=data["name"], structures=tuple(data["structures"]), ids=tuple(data["ids"]))


def available_templates() -> list[str]:
    """Names of the templates shipped with fsseg."""
    return sorted(p.stem for p in _DATA_DIR.glob("*.json") if p.stem not in ("aliases", "groups"))


def load_template(name_or_path: str | Path = DEFAULT_TEMPLATE) -> Template:
    """Load a shipped template by name, or a template JSON file by path.

    Raises:
        ConfigError: unknown template name, unreadable file, or duplicate names/ids.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = _DATA_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(
                f"unknown template '{name_or_path}'; available: {', '.join(available_templates())} "
                "(or a path to a JSON file)"
            )
    try:
        data = json.loads(path.read_text())
        entries = data["structures"]
        ids = tuple(int(entry["id"]) for entry in entries)
        names = tuple(canonical_name(entry["name"]) for entry in entries)
    except FileNotFoundError:
        raise ConfigError(f"{path}: template file not found") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a valid template file ({error})") from None
    for label, values in (("name", names), ("id", ids)):
        duplicates = sorted({str(v) for v in values if values.count(v) > 1})
        if duplicates:
            raise ConfigError(f"{path}: duplicate structure {label}(s): {', '.join(duplicates)}")
    return Template(
        name=data.get("name", path.stem), structures=names, ids=ids, description=data.get("description", "")
    )


def suggest_name(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean liver?)`` for a name close to one of ``choices``, else ""."""
    close = difflib.get_close_matches(normalize_name(name), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""
