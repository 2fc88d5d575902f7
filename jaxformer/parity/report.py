"""A parity check's result: the per-layer table, the summary, the --json record and the exit status."""

from __future__ import annotations

import dataclasses

from jaxformer.parity.compare import Tolerance


@dataclasses.dataclass
class Report:
    """Rows are {name, max_abs, rel, cosine, ok} in forward order; `lm_head` is the logits' row."""

    source: str
    jax_label: str
    ref_label: str
    inputs_label: str
    tolerance: Tolerance
    layers: list[dict]
    summary: dict  # logits_max_abs, kl_mean, kl_max, top1_agreement
    greedy_match: int
    greedy_tokens: int
    grads: list[dict] | None = None
    loss: tuple[float, float] | None = None  # (jaxformer, reference) with --grads

    @property
    def first_divergent(self) -> str | None:
        """The first layer, in forward order, over tolerance (None when all agree)."""
        return next((r["name"] for r in self.layers if not r["ok"]), None)

    @property
    def ok(self) -> bool:
        return self.first_divergent is None and all(r["ok"] for r in self.grads or [])

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict:
        """The --json record: ok, first_divergent, layers, the logits summary, greedy agreement (and grads)."""
        out = {"ok": self.ok, "first_divergent": self.first_divergent,
               "layers": [{k: r[k] for k in ("name", "max_abs", "rel", "cosine")} for r in self.layers],
               **self.summary, "greedy_match": self.greedy_match, "greedy_tokens": self.greedy_tokens}
        if self.grads is not None:
            out["grads"] = [{k: r[k] for k in ("name", "rel", "max_abs", "cosine")} for r in self.grads]
        return out

    def format(self) -> str:
        """The table and summary `jaxformer parity` prints."""
        lines = [f"parity: {self.source}", f"  {self.jax_label}", f"  vs {self.ref_label}",
                 f"  on {self.inputs_label}", f"  tolerance {self.tolerance.describe(self.grads is not None)}", ""]
        width = max(len(r["name"]) for r in self.layers + (self.grads or []))
        lines.append(f"{'name':<{width}}  {'max|diff|':>10}  {'/max|ref|':>10}  {'cosine':>10}")
        for r in self.layers:
            flag = "" if r["ok"] else "  <- over tolerance"
            lines.append(f"{r['name']:<{width}}  {r['max_abs']:>10.3e}  {r['rel']:>10.3e}  {r['cosine']:>10.7f}{flag}")
        if self.grads is not None:
            lines += ["", f"{'gradient of':<{width}}  {'rel. err':>10}  {'max|diff|':>10}  {'cosine':>10}"]
            for r in self.grads:
                flag = "" if r["ok"] else "  <- over tolerance"
                lines.append(f"{r['name']:<{width}}  {r['rel']:>10.3e}  {r['max_abs']:>10.3e}  "
                             f"{r['cosine']:>10.7f}{flag}")
            lines.append(f"loss: {self.loss[0]:.6f} (jaxformer) vs {self.loss[1]:.6f} (reference)")
        s = self.summary
        lines += ["", f"logits max|diff| {s['logits_max_abs']:.3e}   KL(p_ref || p_jax) mean {s['kl_mean']:.3e} "
                      f"max {s['kl_max']:.3e}   top-1 agreement {100 * s['top1_agreement']:.2f}%   "
                      f"greedy {self.greedy_match}/{self.greedy_tokens} tokens match"]
        if self.ok:
            lines.append("OK: every layer within tolerance" + (" and every gradient" if self.grads else ""))
        elif self.first_divergent is not None:
            lines.append(f"DIVERGES: first layer over tolerance is {self.first_divergent}")
        else:
            bad = [r["name"] for r in self.grads if not r["ok"]]
            lines.append(f"DIVERGES: gradients over tolerance: {', '.join(bad[:8])}"
                         + (f" ... ({len(bad)} in all)" if len(bad) > 8 else ""))
        return "\n".join(lines)
