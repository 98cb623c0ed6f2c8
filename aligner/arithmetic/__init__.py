"""The bundled arithmetic task (``aligner.arithmetic.task``): two-digit sums with checkable answers."""
