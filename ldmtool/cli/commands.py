"""The list of command modules joined to the app, in help order.

A task command is added here when its pipeline lands (absent rather than a stub).
"""
from __future__ import annotations

import importlib
from types import ModuleType

COMMAND_MODULES = [
    "ldmtool.cli.txt2img",
    "ldmtool.cli.img2img",
    "ldmtool.cli.inpaint",
    "ldmtool.cli.superres",
    "ldmtool.cli.sample",
    "ldmtool.cli.semantic2img",
    "ldmtool.cli.layout2img",
    "ldmtool.cli.tile_synth",
    "ldmtool.cli.preprocess",
    "ldmtool.cli.workflow",
    "ldmtool.cli.info",
    "ldmtool.cli.replay",
    "ldmtool.cli.manifest",
    "ldmtool.cli.grid",
    "ldmtool.cli.gallery",
    "ldmtool.cli.train",
    "ldmtool.cli.models",
    "ldmtool.cli.user_config",
]


def modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in COMMAND_MODULES]
