"""`jaxformer parity`: any checkpoint through jaxformer and PyTorch (torch_ref or transformers), layer by layer.

    from jaxformer.parity import check
    report = check("runs/tiny_code", against="torch_ref")   # Report: .ok, .first_divergent, .layers, .to_json()

sides.py runs each side and captures the residual stream (the models' `capture` dict, forward hooks on
transformers); compare.py holds the numbers and tolerances; report.py the table and the --json record;
command.py the command; training.py the check `--train.parity_every` makes. Needs torch (and transformers
for Hugging Face references).
"""

from jaxformer.parity.command import check, make_inputs, run
from jaxformer.parity.compare import Tolerance, tolerance
from jaxformer.parity.report import Report
from jaxformer.parity.sides import HFSide, Inputs, JaxSide, Trace, TorchRefSide, greedy
from jaxformer.parity.training import against_torch_ref

__all__ = ["HFSide", "Inputs", "JaxSide", "Report", "Tolerance", "TorchRefSide", "Trace", "against_torch_ref",
           "check", "greedy", "make_inputs", "run", "tolerance"]
