"""The paper's method itself, importable with diffusers alone: layout (boxes on token grids, owners), the AnyMS
attention processors and the attention-map recorder. Imports nothing of the methods or the generation stage."""
