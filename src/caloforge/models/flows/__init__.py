"""Normalizing-flow families and their shared machinery (MADE-RQS toolkit, layer-energy
flows, convolutional blocks, distillation into one-pass students)."""
