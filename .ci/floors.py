"""Print pip constraints that pin every runtime dependency of pyproject.toml, and of its optional extras other
than ``dev`` (test tools, no floor promised), to its floor (its ``>=`` version).

With ``--python``, print the floor of ``requires-python`` instead (the interpreter the floor suite runs on).

torchvision (Ultralytics' dependency, and our ``torchvision`` extra's) must match torch: it is pinned to the release
made for the torch floor, so that pip does not pick a newer torchvision that needs a newer torch, and the extra's
floor must be that release.
"""

import re
import sys
from pathlib import Path

import tomllib

TORCHVISION_FOR_TORCH = {"2.6": "0.21.0", "2.7": "0.22.0", "2.8": "0.23.0", "2.9": "0.24.0", "2.10": "0.25.0"}

pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
if sys.argv[1:] == ["--python"]:
    print(re.fullmatch(r">=\s*(3\.\d+)", pyproject["project"]["requires-python"]).group(1))
    sys.exit()
extras = pyproject["project"].get("optional-dependencies", {})
requirements = [*pyproject["project"]["dependencies"], *(r for name, rs in extras.items() if name != "dev" for r in rs)]
pins = {}
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:\S*?,)?\s*>=\s*([0-9][^,;\s]*).*", requirement)
    if not match:
        sys.exit(f"no >= floor in dependency {requirement!r}: every dependency needs one")
    pins[match.group(1)] = match.group(2)
torch_minor = ".".join(pins["torch"].split(".")[:2])
if torch_minor not in TORCHVISION_FOR_TORCH:
    sys.exit(f"add the torchvision release for torch {torch_minor} to TORCHVISION_FOR_TORCH in {__file__}")
matching = TORCHVISION_FOR_TORCH[torch_minor]
if "torchvision" in pins and pins["torchvision"].split(".")[:2] != matching.split(".")[:2]:
    sys.exit(f"torchvision floor {pins['torchvision']} is not {matching}, the release made for torch {pins['torch']}")
pins["torchvision"] = matching
print("\n".join(f"{name}=={version}" for name, version in pins.items()))
