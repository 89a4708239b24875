"""The built wheel carries the configs: bare config names work from a wheel install too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_loads_shipped_configs_by_bare_name(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "-w", str(wheels)], check=True, capture_output=True)
    (wheel,) = wheels.glob("revcol-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    script = (
        "import revcol, sys\n"
        f"assert revcol.__file__.startswith({str(target)!r}), revcol.__file__\n"
        "from ultralytics import RTDETR, YOLO\n"
        "for name in ('rtdetr-revcol.yaml', 'rtdetr-revcol-cpu.yaml'):\n"
        "    assert type(RTDETR(name).model.model[0]).__name__ == 'RevColBackbone'\n"
        "assert YOLO('yolo-revcol.yaml').model.model[1].index == 0\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "YOLO_OFFLINE": "true"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
