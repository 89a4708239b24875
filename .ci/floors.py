"""Print pip constraints that pin every runtime dependency of pyproject.toml to its floor (its ``>=`` version).

With ``--python``, print the floor of ``requires-python`` instead (the interpreter the floor suite runs on).

torchvision is not our dependency but Ultralytics', and it must match torch: it is pinned to the release
made for the torch floor, so that pip does not pick a newer torchvision that needs a newer torch.
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
pins = {}
for requirement in pyproject["project"]["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:\S*?,)?\s*>=\s*([0-9][^,;\s]*).*", requirement)
    if not match:
        sys.exit(f"no >= floor in dependency {requirement!r}: every dependency needs one")
    pins[match.group(1)] = match.group(2)
torch_minor = ".".join(pins["torch"].split(".")[:2])
if torch_minor not in TORCHVISION_FOR_TORCH:
    sys.exit(f"add the torchvision release for torch {torch_minor} to TORCHVISION_FOR_TORCH in {__file__}")
pins["torchvision"] = TORCHVISION_FOR_TORCH[torch_minor]
print("\n".join(f"{name}=={version}" for name, version in pins.items()))
