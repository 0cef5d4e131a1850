"""Model families: one module per family (how it is detected from checkpoint keys, which presets build it,
how its model info is derived), the registry that lists them, and the typed `ModelInfo` the rest of the
tool reads instead of raw configs. This is the only package that names a family."""
