"""Plan a run for GPUs that are not here: compile the sharded step for a target topology and read it.

    jaxformer plan --config llama3-8b --target h100 --devices 8 --mesh.fsdp=8

jaxformer.plan.steps compiles the train step (or the inference engine's decode step) on compile-only
devices of a GPU target (pallas_kernels.targets); jaxformer.plan.hlo reads the optimized per-device HLO
(matmul FLOPs and collective bytes, loops counted as often as they run); jaxformer.plan.report turns
XLA's memory analysis, the FLOPs and the target's peaks into the plan: memory per device against what
JAX may use, a roofline step time and MFU, the largest batch that fits, and the knob that makes a step
fit. Compiling needs the gpu-compile extra (pip install -e '.[gpu-compile]'), not a GPU.
"""

from jaxformer.plan.report import DEFAULT_MEM_FRACTION, format_report, largest_fit, plan_decode, plan_train

__all__ = ["DEFAULT_MEM_FRACTION", "format_report", "largest_fit", "plan_decode", "plan_train"]
