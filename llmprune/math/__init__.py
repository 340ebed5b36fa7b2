"""Pure tensor math: scores, masks, solvers, quantization, allocation, DSnoT. Tensors in, tensors out;
nothing here knows about models, blocks, devices of other blocks or files.

The names below are torch-free, so option dataclasses can validate against them cheaply.
"""

GROUPS = ("row", "column", "layer")  # where scores are compared: per output row, per input column, per matrix
METRICS = ("weight", "activation", "wanda")  # |W|, ||X_j||, |W| * ||X_j||
ACTIVATION_METRICS = frozenset({"activation", "wanda"})  # the metrics that read the input norms
