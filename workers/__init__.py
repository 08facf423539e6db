"""Everything that touches a model: data, teacher, student, pruning, quantization, low rank, distillation
(DeepSpeed engine), evaluation and artifacts. ``import workers`` is cheap; torch loads in the submodules."""

__all__ = ["artifacts", "configs", "data", "distill", "elastic", "evaluate", "lowrank", "prune", "quantize", "student",
           "supernet", "teacher", "trial"]
