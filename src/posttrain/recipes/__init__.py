"""The recipes that ship with posttrain, and how a command finds one by path or by name.

The YAML files in the folders beside this module are package data (``pyproject.toml``), so an installed wheel
has them as well as a source checkout: ``posttrain sft tiny/sft`` runs ``tiny/sft.yaml`` from here, and
``posttrain quickstart`` runs ``pipelines/quickstart.yaml``. Folders: ``tiny/`` (CPU, minutes), ``sft/`` and
``grpo/`` (the Qwen notebooks, one GPU), ``pipelines/`` (stages chained by ``posttrain run``), ``accelerate/``
(``accelerate launch --config_file`` files).

Resolution, in order: an existing file path as given (a user's own recipe always wins); else the name of a
shipped recipe, with or without ``.yaml`` (a leading ``recipes/``, the folder they lived in before they were
package data, is accepted too); else a ``UserError`` that lists the shipped names.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parent

# kind -> the folders that hold it; a training recipe is any YAML outside pipelines/ and accelerate/
_FOLDERS = {"pipeline": ("pipelines",), "accelerate": ("accelerate",)}


def names(kind: str | None = None) -> list[str]:
    """Shipped names (``folder/stem``), sorted. ``kind``: None for all, ``"recipe"`` for training recipes,
    ``"pipeline"`` or ``"accelerate"``."""
    found = sorted(p.relative_to(ROOT).with_suffix("").as_posix() for p in ROOT.rglob("*.yaml"))
    if kind is None:
        return found
    special = {f for folders in _FOLDERS.values() for f in folders}
    wanted = _FOLDERS.get(kind)
    return [n for n in found if (n.split("/")[0] in wanted if wanted else n.split("/")[0] not in special)]


def find(name: str | Path) -> Path | None:
    """The shipped file called ``name`` (``tiny/sft``, ``tiny/sft.yaml`` or ``recipes/tiny/sft.yaml``), else None.
    Only listed names match, so ``../`` cannot reach outside the folder."""
    key = Path(name).as_posix().removeprefix("./").removeprefix("recipes/")
    key = key.removesuffix(".yaml").removesuffix(".yml")
    return ROOT / f"{key}.yaml" if key in names() else None


def resolve(path_or_name: str | Path, kind: str = "recipe", error: type[UserError] = UserError) -> Path:
    """An existing file as given, else the shipped file of that name; ``error`` (a ``UserError``) names the shipped
    files of ``kind`` when neither exists."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = find(path_or_name)
    if shipped is not None:
        return shipped
    raise error(f"{kind} file not found: {path_or_name} ({path_or_name} does not exist, and it is not the name of "
                f"a {kind} that ships with posttrain). Give the path to a .yaml file, or one of: "
                f"{', '.join(names(kind))}")
