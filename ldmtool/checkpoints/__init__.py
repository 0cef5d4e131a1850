"""Checkpoints: reading files safely, CompVis configs and presets, family detection, and the model bundle.

Entry points: `ldmtool.checkpoints.api.build_model` / `load_model` (re-exported as `ldmtool.build_model` /
`ldmtool.load_model`); `tools` holds what `ldmtool models list|inspect|convert` do; `tiny` builds small
random models of every family for tests.
"""
